"""SkyMask on Flower (skymask_lite.flower): strategies, apps, and agreement with the simulator.

Most tests drive the real ServerApp body (`serve`) and the real ClientApp through an in-process
grid (no Ray: fast). One test runs the command line on Flower's simulation engine (Ray).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

pytest.importorskip("flwr", reason="the flower extra is not installed (pip install -e '.[flower]')")
pytest.importorskip("ray", reason="the flower extra is not installed (pip install -e '.[flower]')")

from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from skymask_lite.__main__ import main  # noqa: E402
from skymask_lite.experiments import Config, build, run_experiment  # noqa: E402
from skymask_lite.flower.apps import (  # noqa: E402
    LocalGrid,
    agreement,
    check_flower_config,
    client_app,
    config_from_run_config,
    serve,
)
from skymask_lite.flower.strategy import (  # noqa: E402
    AttackWrapper,
    DefenseStrategy,
    from_arrays,
    modifies_updates,
    to_arrays,
)
from skymask_lite.attacks import make_attack  # noqa: E402
from skymask_lite.fl import initial_state  # noqa: E402

@pytest.fixture(autouse=True)
def task_identity():
    """The identity a Flower process gets from its runtime (the in-process grid has none)."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


SMALL = dict(num_clients=10, num_malicious=2, rounds=2, train_size=1500, root_size=60, seed=0)


def _simulator(config: Config) -> dict:
    """The simulator on what a Flower run executes: the loop engine on the CPU, one thread (a
    Flower client trains on one thread; another thread count rounds the convolutions
    differently, which once made this comparison depend on OMP_NUM_THREADS)."""
    return run_experiment(dataclasses.replace(check_flower_config(config), threads=1), progress=False)


def _same_rounds(flower: dict, simulator: dict) -> None:
    """Same kept clients and rates every round; the same accuracy bit for bit until a round
    aggregates an attacker's update (rounded by the weights round trip, see AttackWrapper),
    close after."""
    assert len(flower["rounds"]) == len(simulator["rounds"]) == simulator["config"]["rounds"]
    rounded = False
    for ours, theirs in zip(flower["rounds"], simulator["rounds"]):
        assert ours["kept"] == theirs["kept"]
        assert ours["fpr"] == theirs["fpr"] and ours["fnr"] == theirs["fnr"]
        assert set(theirs) - {"timing"} <= set(ours)
        assert set(ours["timing"]) == set(theirs["timing"])
        assert ours.get("attack_rounding", 0.0) < 1e-6
        rounded = rounded or (ours.get("attack_rounding", 0.0) > 0 and ours["fnr"] > 0)
        if not rounded:
            assert ours["test_acc"] == theirs["test_acc"]
        else:
            assert ours["test_acc"] == pytest.approx(theirs["test_acc"], abs=5e-3)


def test_flower_strategy_and_client_app_agree_with_the_simulator():
    """FLTrust (the Flower run's second strategy) under LIE (the attack wrapper), in process;
    Min-Max and SkyMask run on Ray in the command-line test."""
    config = Config(attack="lie", defense="fltrust", **SMALL)
    flower = serve(LocalGrid(config.num_clients), config)
    simulator = _simulator(config)
    same_run = {**simulator["config"], "threads": flower["config"]["threads"]}  # threads: execution only
    assert flower["config"] == same_run and flower["malicious"] == simulator["malicious"]
    assert set(flower) == set(simulator)
    _same_rounds(flower, simulator)


def test_dropped_clients_are_left_out_and_scored_among_those_that_replied():
    config = Config(attack="min_max", defense="fltrust", **{**SMALL, "rounds": 1})
    malicious = build(config)[0].malicious.tolist()
    drop = frozenset({malicious[0], 0 if malicious[0] != 0 else 1, 9 if 9 not in malicious else 8})
    results = serve(LocalGrid(config.num_clients, drop), config)
    [record] = results["rounds"]
    replied = [i for i in range(config.num_clients) if i not in drop]
    assert record["replied"] == replied
    assert set(record["kept"]) <= set(replied)
    benign = [i for i in replied if i not in malicious]
    bad = [i for i in replied if i in malicious]
    assert record["fpr"] == pytest.approx(len(set(benign) - set(record["kept"])) / len(benign))
    assert record["fnr"] == pytest.approx(len(set(bad) & set(record["kept"])) / len(bad))
    assert math.isfinite(record["test_acc"])


def test_arrays_round_trip_exactly_and_name_what_is_missing():
    fed, _, _ = build(Config(**SMALL))
    state = initial_state(fed)
    params = state.params + torch.randn(state.params.shape, generator=torch.Generator().manual_seed(0))
    record = to_arrays(params, state.buffers, fed.net)
    back, buffers = from_arrays(record, fed.net)
    assert torch.equal(back, params) and buffers.keys() == state.buffers.keys()
    del record[next(iter(record))]
    with pytest.raises(ValueError, match="lacks"):
        from_arrays(record, fed.net)
    with pytest.raises(ValueError, match="flat"):
        to_arrays(params[:-1], state.buffers, fed.net)


def test_only_attacks_that_rewrite_updates_are_wrapped():
    assert modifies_updates(make_attack("min_max")) and modifies_updates(make_attack("backdoor"))
    assert not modifies_updates(make_attack("none")) and not modifies_updates(make_attack("label_flip"))


def test_configs_the_flower_run_cannot_honour_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="--engine loop"):
        check_flower_config(Config(engine="parallel"))
    with pytest.raises(ValueError, match="--device cpu"):
        check_flower_config(Config(device="meta"))
    with pytest.raises(ValueError, match="fraction_train"):
        check_flower_config(Config(), fraction_train=0.0)


def test_run_config_reads_config_fields_and_refuses_unknown_keys():
    config = config_from_run_config({"num-clients": 20, "attack": "lie", "defense-options": '{"steps": 5}', "out": "x"})
    assert (config.num_clients, config.attack, config.defense_options) == (20, "lie", {"steps": 5})
    with pytest.raises(ValueError, match="num-client"):
        config_from_run_config({"num-client": 20})


def test_command_line_runs_on_flowers_simulation_engine(tmp_path, capsys):
    """The acceptance run at small scale, on Ray: same results as the simulator."""
    out = tmp_path / "flower.json"
    args = ["flower", "--attack", "min_max", "--defense", "skymask", "--out", str(out)]
    for key, value in SMALL.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    flower = json.loads(out.read_text())
    assert printed["test_acc"] == flower["final"]["test_acc"]
    assert flower["env"]["runtime"] == "flower" and flower["env"]["ray_cpus"] == 1
    assert [(r["fpr"], r["fnr"]) for r in flower["rounds"]] == [(0.0, 0.0)] * 2  # the acceptance
    _same_rounds(flower, _simulator(Config(**flower["config"])))


def test_agreement_reports_kept_sets_and_accuracy_differences():
    config = Config(**SMALL).to_dict()
    rounds = [{"round": 1, "kept": [0, 1], "test_acc": 0.5, "fpr": 0.0, "fnr": 0.0}]
    other = [{**rounds[0], "kept": [0], "test_acc": 0.25}]
    final = {"seconds_per_round": 1.0}
    same = agreement({"config": config, "rounds": rounds, "final": final},
                     {"config": config, "rounds": rounds, "final": final})
    assert same["same_kept_every_round"] and same["max_abs_test_acc_diff"] == 0.0
    differ = agreement({"config": config, "rounds": rounds, "final": final},
                       {"config": config, "rounds": other, "final": final})
    assert not differ["same_kept_every_round"] and differ["max_abs_test_acc_diff"] == 0.25
    with pytest.raises(ValueError, match="same Config"):
        agreement({"config": config, "rounds": rounds, "final": final},
                  {"config": {**config, "seed": 1}, "rounds": rounds, "final": final})


def _start_one_round(strategy, config: Config, fed):
    """``Strategy.start`` for one round on a LocalGrid, from the federation's initial model."""
    from flwr.app import ConfigRecord

    from skymask_lite.flower.apps import CONFIG_KEY

    state = initial_state(fed)
    return strategy.start(grid=LocalGrid(config.num_clients), num_rounds=1,
                          initial_arrays=to_arrays(state.params, state.buffers, fed.net),
                          train_config=ConfigRecord({CONFIG_KEY: json.dumps(config.to_dict())}))


def test_the_attack_wrapper_works_around_flowers_own_krum():
    """Flower's Krum (on weights) behind the AttackWrapper picks the model our Krum rule picks."""
    from flwr.serverapp.strategy import Krum

    from skymask_lite.defenses import make_defense
    from skymask_lite.flower.apps import server_view

    config = Config(attack="min_max", defense="krum", global_lr=1.0, **{**SMALL, "rounds": 1})
    fed, attack, _ = build(config)
    fed = server_view(fed)
    n, f = config.num_clients, config.num_malicious
    ours = DefenseStrategy(make_defense("krum"), fed, fraction_evaluate=0.0, min_available_nodes=n)
    mine = _start_one_round(AttackWrapper(ours, attack, fed), config, fed)
    krum = Krum(num_malicious_nodes=f, fraction_evaluate=0.0, min_available_nodes=n)
    theirs = _start_one_round(AttackWrapper(krum, attack, fed), config, fed)
    assert len(ours.records[0]["kept"]) == 1
    # ours: w + 1.0 * U_j; Flower's Krum: the selected client's weights w_j = w + U_j
    assert torch.allclose(from_arrays(mine.arrays, fed.net)[0], from_arrays(theirs.arrays, fed.net)[0], atol=1e-6)


def test_provenance_is_read_before_the_first_round(monkeypatch):
    """The code version a Flower run records is the one it started with (a commit made while it
    runs must not be credited with it)."""
    from skymask_lite.flower import apps

    events = []
    environment, aggregate = apps.environment, DefenseStrategy.aggregate_train
    monkeypatch.setattr(apps, "environment", lambda device: events.append("env") or environment(device))
    monkeypatch.setattr(DefenseStrategy, "aggregate_train",
                        lambda self, *a, **k: events.append("round") or aggregate(self, *a, **k))
    config = Config(attack="none", defense="fedavg", **{**SMALL, "rounds": 1})
    results = serve(LocalGrid(config.num_clients), config)
    assert events == ["env", "round"] and results["env"]["wall_seconds"] > 0
