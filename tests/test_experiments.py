import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from skymask_lite import experiments, fl
from skymask_lite.__main__ import main
from skymask_lite.experiments import RESULTS_DIR, Config, grid, load_results, run_experiment, run_name, same_run

TINY = dict(model="lr", num_clients=10, train_size=3000, rounds=2, local_lr=0.05)


def test_results_json_has_the_documented_keys(tmp_path):
    out = tmp_path / "r.json"
    results = run_experiment(Config(num_malicious=2, attack="sign_flip", **TINY), out, progress=False)
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert set(results) == {"config", "malicious", "rounds", "final", "env"}
    assert results["config"]["seed"] == 0 and len(results["malicious"]) == 2
    record = results["rounds"][0]
    assert {"round", "test_acc", "kept", "seconds", "fpr", "fnr"} <= set(record)
    assert record["fpr"] == 0.0 and record["fnr"] == 1.0  # FedAvg keeps everybody
    assert {"package_version", "git_commit", "torch_version", "device", "engine", "threads"} <= set(results["env"])
    assert results["final"]["test_acc"] == results["rounds"][-1]["test_acc"]


def test_same_seed_same_results_other_seed_other_results():
    a, b, c = (run_experiment(Config(seed=s, **TINY), progress=False) for s in (1, 1, 2))
    strip = lambda r: [{k: v for k, v in rec.items() if k not in ("seconds", "timing")} for rec in r["rounds"]]
    assert strip(a) == strip(b)
    assert strip(a) != strip(c)


def test_interrupted_run_resumes_to_the_same_result(tmp_path, interrupt_round):
    config = Config(rounds=3, **{k: v for k, v in TINY.items() if k != "rounds"})
    straight = run_experiment(config, progress=False)
    out = tmp_path / "run.json"
    restore = interrupt_round(3)
    first_started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, out, progress=False)
    first_session = time.perf_counter() - first_started
    assert out.with_suffix(".ckpt.pt").exists() and not out.exists()
    ckpt = torch.load(out.with_suffix(".ckpt.pt"), weights_only=False)
    assert len(ckpt["records"]) == 2 and ckpt["sessions"] == 1
    restore()
    second_started = time.perf_counter()
    resumed = run_experiment(config, out, progress=False)
    second_session = time.perf_counter() - second_started
    assert [r["test_acc"] for r in resumed["rounds"]] == [r["test_acc"] for r in straight["rounds"]]
    assert not out.with_suffix(".ckpt.pt").exists()
    wall = resumed["env"]["wall_seconds"]
    # every round's time is inside the wall time, and no session is counted twice
    assert sum(r["seconds"] for r in resumed["rounds"]) <= wall <= first_session + second_session
    assert wall > ckpt["wall_seconds"] > 0 and resumed["env"]["sessions"] == 2


def test_finished_results_are_not_recomputed(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    first = run_experiment(Config(**TINY), out, progress=False)
    monkeypatch.setattr(experiments, "build", lambda *a, **k: pytest.fail("recomputed a finished run"))
    assert run_experiment(Config(**TINY), out, progress=False) == json.loads(json.dumps(first))


def test_grid_and_load_results(tmp_path):
    configs = grid(Config(**TINY), seed=[0, 1], attack=["none", "sign_flip"], num_malicious=[2])
    assert len(configs) == 4 and len({run_name(c) for c in configs}) == 4
    experiments.run_grid(configs[:2], tmp_path, progress=False)
    assert len(load_results(tmp_path)) == 2 and len(load_results(tmp_path, attack="sign_flip")) == 1
    with pytest.raises(ValueError, match="unknown config field"):
        grid(Config(), colour=["red"])


def test_cli_run_writes_results(cli_run, tmp_path, capsys):
    results = cli_run("--attack", "min_max", "--num-malicious", "2", "--defense", "median",
                      "--attack-option", "perturbation=std")
    assert results["config"]["attack_options"] == {"perturbation": "std"}
    assert json.loads(capsys.readouterr().out)["out"] == str(tmp_path / "cli.json")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--attack", "teleport"], "unknown attack"),
        (["--defense", "magic"], "unknown defen"),
        (["--dataset", "mnist"], "unknown dataset"),
        (["--num-malicious", "10", "--num-clients", "10"], "--num-malicious 10: must be in"),
        (["--model", "cnn", "--dataset", "cifar10"], "use 'resnet20'"),
        (["--attack-option", "colour=red", "--attack", "min_max"], "unknown option"),
    ],
)
def test_cli_errors_are_clear(argv, message, capsys, tmp_path):
    assert main(["run", "--rounds", "1", "--no-progress", "--out", str(tmp_path / "x.json"), *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_asked_but_absent_is_an_error(capsys):
    assert main(["run", "--device", "cuda", "--rounds", "1"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_environment_records_uncommitted_changes(tmp_path, monkeypatch):
    """git_dirty is what git says of the tracked files, and None outside a repository."""
    calls = []

    def fake_git(*args):
        calls.append(args)
        return {"rev-parse": "abc123", "status": " M skymask_lite/fl.py", "diff": "+x = 1"}[args[0]]

    monkeypatch.setattr(experiments, "_git", fake_git)
    env = experiments.environment("cpu")
    assert env["git_commit"] == "abc123" and env["git_dirty"] is True
    assert ("status", "--porcelain", "--untracked-files=no", "--", ".") in calls
    dirty = experiments.code_version()["git_diff"]
    monkeypatch.setattr(experiments, "_git", lambda *a: {"rev-parse": "abc123", "status": "", "diff": "+y"}[a[0]])
    assert experiments.environment("cpu")["git_dirty"] is False
    assert experiments.code_version()["git_diff"] is None and dirty is not None

    def no_repo(*args):
        raise subprocess.CalledProcessError(128, ["git", *args])

    monkeypatch.setattr(experiments, "_git", no_repo)
    env = experiments.environment("cpu")
    assert env["git_commit"] is None and env["git_dirty"] is None


def test_environment_names_the_cpu_model_on_linux():
    env = experiments.environment("cpu")
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "model name" in cpuinfo.read_text():
        expected = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("model name"))
        assert env["device_name"] == expected.split(":", 1)[1].strip()
    assert env["device_name"] and env["threads"] == torch.get_num_threads()


def test_environment_on_cuda_records_tf32_the_mask_graph_and_autotuning(monkeypatch):
    """A GPU run records what makes it differ from a CPU run (TF32), how the mask step ran and
    whether cuDNN timed its convolutions; a CPU run records none (checked here without a GPU: the device lookups are faked)."""
    assert not {"tf32", "mask_graph", "cudnn_benchmark"} & experiments.environment("cpu").keys()
    monkeypatch.setattr(experiments, "resolve_device", lambda device: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "a GPU")
    monkeypatch.delenv("SKYMASK_MASK_GRAPH", raising=False)
    monkeypatch.delenv("SKYMASK_CUDNN_BENCHMARK", raising=False)
    matmul = torch.backends.cuda.matmul.allow_tf32
    for cudnn in (True, False):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", cudnn)
        env = experiments.environment("cuda")
        assert env["tf32"] == {"cudnn": cudnn, "matmul": matmul} and env["mask_graph"] is True
        assert env["cudnn_benchmark"] is True
    monkeypatch.setenv("SKYMASK_MASK_GRAPH", "0")
    monkeypatch.setenv("SKYMASK_CUDNN_BENCHMARK", "0")
    env = experiments.environment("cuda")
    assert env["mask_graph"] is False and env["cudnn_benchmark"] is False


def test_run_name_and_identity_ignore_device_engine_and_threads():
    here = Config(**TINY, device="cpu", engine="loop", threads=1)
    there = Config(**TINY, device="auto", engine="parallel", threads=None)
    assert run_name(here) == run_name(there) and same_run(here, there)
    assert run_name(Config(**TINY, seed=1)) != run_name(here) and not same_run(Config(**TINY, seed=1), here)
    old_file_config = {k: v for k, v in here.to_dict().items() if k != "threads"}  # written before threads existed
    assert same_run(old_file_config, there)
    assert run_name(Config(**{**TINY, "local_lr": 1})) == run_name(Config(**{**TINY, "local_lr": 1.0}))


def _chapter_configs():
    """The configs the book's chapters hand to run_grid / load_results, by results folder."""
    setup = dict(num_clients=100, num_malicious=20, rounds=20)
    runs = {
        "attacks": [(a, "fedavg") for a in ["none", "fang_trim", "min_max", "min_sum", "lie", "backdoor"]],
        "robust": [(a, r) for a in ["min_max", "fang_trim"]
                   for r in ["median", "trimmed_mean", "multi_krum", "fltrust", "flame"]],
        "detectors": [(a, r) for a in ["min_max", "min_sum", "fang_krum"] for r in ["tolpegin", "fldetector"]],
        "skymask": [(a, "skymask") for a in ["none", "min_max", "min_sum", "fang_trim", "fang_krum", "label_flip"]],
    }
    return {folder: [Config(**setup, attack=a, defense=r) for a, r in pairs] for folder, pairs in runs.items()}


def test_committed_results_are_found_by_run_grid_without_computing(monkeypatch):
    committed = sorted(path for folder in _chapter_configs() for path in (RESULTS_DIR / folder).glob("*.json"))
    for path in sorted(RESULTS_DIR.rglob("*-s[0-9]*-*.json")):  # each run file is named after its run's identity
        assert path.name == run_name(Config(**json.loads(path.read_text())["config"])) + ".json"
    monkeypatch.setattr(experiments, "build", lambda *a, **k: pytest.fail("recomputed a committed run"))
    found = 0
    for folder, configs in _chapter_configs().items():
        for config, result in zip(configs, experiments.run_grid(configs, RESULTS_DIR / folder, progress=False)):
            assert same_run(result["config"], config) and result["env"].get("engine", result["config"]["engine"]) in ("loop", "batched", "parallel")
            # the chapters' loaders pass the whole config (device and engine included): exactly one match
            assert len(load_results(RESULTS_DIR / folder, **config.to_dict())) == 1
            found += 1
    assert found == len(committed) == 28


def test_recompute_replaces_the_file_on_any_engine(tmp_path, monkeypatch):
    first = experiments.run_grid([Config(**TINY, engine="loop")], tmp_path, progress=False)[0]
    builds = []
    real_build = experiments.build
    monkeypatch.setattr(experiments, "build", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    again = experiments.run_grid([Config(**TINY, engine="parallel")], tmp_path, progress=False)[0]
    assert builds == [] and again == first  # the same run: found, not recomputed
    fresh = experiments.run_grid([Config(**TINY, engine="parallel")], tmp_path, resume=False, progress=False)[0]
    assert builds == [1] and fresh["env"]["engine"] == "parallel" and first["env"]["engine"] == "loop"
    files = list(tmp_path.glob("*.json"))
    assert [f.name for f in files] == [run_name(Config(**TINY)) + ".json"]
    assert json.loads(files[0].read_text())["env"]["engine"] == "parallel"
    assert len(load_results(tmp_path, **Config(**TINY).to_dict())) == 1


def test_load_results_reads_a_missing_field_as_its_default(tmp_path):
    config = {k: v for k, v in Config(**TINY).to_dict().items() if k not in ("root_steps", "threads")}
    (tmp_path / "old.json").write_text(json.dumps({"config": config}))
    assert len(load_results(tmp_path, **Config(**TINY).to_dict())) == 1
    assert load_results(tmp_path, **Config(**TINY, root_steps=3).to_dict()) == []


def test_auto_device_engine_and_threads_are_resolved_and_recorded():
    before = torch.get_num_threads()
    results = run_experiment(Config(**{**TINY, "rounds": 1}, threads=1), progress=False)
    assert results["config"]["device"] == "auto" and results["config"]["engine"] == "auto"
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert results["env"]["device"].startswith(expected_device)
    assert results["env"]["engine"] == ("batched" if expected_device == "cuda" else "parallel")
    assert results["env"]["threads"] == 1 and torch.get_num_threads() == before


def _diverge(fed, state, attack, defense):
    """Client 0 and the server's root update diverge (NaN), as fl.round_updates would find it."""
    updates = torch.zeros(fed.num_clients + 1, 3)
    updates[[0, -1]] = float("nan")
    fl.check_local_training(updates, fed, state.round + 1)


def test_a_model_destroyed_by_an_attack_is_a_recorded_result(tmp_path):
    # Gaussian noise of sigma 1e37 pushes FedAvg's model towards float32's limit: local training overflows
    config = Config(**{**TINY, "rounds": 5}, num_malicious=2, attack="gaussian", attack_options={"sigma": 1e37})
    out = tmp_path / "collapse.json"
    results = run_experiment(config, out, progress=False)
    collapsed, records = results["final"]["collapsed"], results["rounds"]
    assert 1 < collapsed["round"] < 5 and "diverged" in collapsed["reason"]
    assert [r["round"] for r in records] == list(range(1, collapsed["round"] + 1))
    assert records[-1]["collapsed"] is True and not any("collapsed" in r for r in records[:-1])
    assert 0.0 <= records[-1]["test_acc"] <= 1.0 and results["final"]["rounds"] == collapsed["round"]
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert not out.with_suffix(".ckpt.pt").exists()
    assert run_experiment(config, out, progress=False) == json.loads(out.read_text())  # finished: not recomputed


def test_divergence_without_an_attack_is_an_error(monkeypatch):
    monkeypatch.setattr(experiments, "run_round", _diverge)
    with pytest.raises(FloatingPointError, match="--local-lr"):
        run_experiment(Config(**TINY), progress=False)
    recorded = run_experiment(Config(**TINY, num_malicious=2, attack="sign_flip"), progress=False)
    assert recorded["final"]["collapsed"]["round"] == 1 and len(recorded["rounds"]) == 1
    assert "1 of 10 clients and the server's root update" in recorded["final"]["collapsed"]["reason"]


def test_a_grid_goes_on_after_a_collapse(tmp_path, monkeypatch):
    real_round = experiments.run_round
    monkeypatch.setattr(experiments, "run_round", lambda fed, state, attack, defense: (_diverge if fed.seed == 0
                        else real_round)(fed, state, attack, defense))
    configs = grid(Config(**TINY, num_malicious=2, attack="sign_flip"), seed=[0, 1])
    first, second = experiments.run_grid(configs, tmp_path, progress=False)
    assert "collapsed" in first["final"] and "collapsed" not in second["final"] and len(second["rounds"]) == 2


def test_the_code_version_is_in_the_checkpoint_from_the_start(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    monkeypatch.setattr(experiments, "run_round", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run_experiment(Config(**TINY), out, progress=False)
    ckpt = torch.load(out.with_suffix(".ckpt.pt"), weights_only=False)
    assert ckpt["code"] == experiments.code_version() and ckpt["records"] == []


def test_a_checkpoint_of_another_commit_is_refused_before_any_compute(tmp_path, monkeypatch, interrupt_round):
    config, out = Config(**TINY), tmp_path / "r.json"
    restore = interrupt_round(2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, out, progress=False)
    restore()
    real_version = experiments.code_version
    monkeypatch.setattr(experiments, "code_version", lambda: {**real_version(), "git_commit": "f" * 40})
    monkeypatch.setattr(experiments, "load_dataset", lambda *a, **k: pytest.fail("loaded data"))
    with pytest.raises(experiments.ResumeRefused, match="--no-resume"):
        run_experiment(config, out, progress=False)
    monkeypatch.undo()
    monkeypatch.setattr(experiments, "code_version", lambda: {**real_version(), "git_commit": "f" * 40})
    fresh = run_experiment(config, out, resume=False, progress=False)
    assert len(fresh["rounds"]) == 2 and fresh["env"]["git_commit"] == "f" * 40 and fresh["env"]["sessions"] == 1


def test_without_an_attack_nobody_is_scored_as_malicious():
    config = Config(**TINY, num_malicious=2, defense="multi_krum", defense_options={"m": 5})
    results = run_experiment(config, progress=False)
    assert results["malicious"] == []
    for record in results["rounds"]:
        assert record["fnr"] is None and record["fpr"] == (10 - len(record["kept"])) / 10
    assert results["final"]["mean_fnr"] is None


BAD_CONFIGS = [
    ({"bias": 1.5}, "--bias"), ({"alpha": 0.0, "split": "dirichlet"}, "--alpha"), ({"root_size": 0}, "--root-size"),
    ({"root_bias": -0.1}, "--root-bias"), ({"train_size": 10}, "--train-size"), ({"rounds": 0}, "--rounds"),
    ({"local_lr": float("nan")}, "--local-lr"), ({"batch_size": 0}, "--batch-size"), ({"seed": -1}, "--seed"),
    ({"threads": 0}, "--threads"), ({"device": "tpu"}, "--device"), ({"engine": "fast"}, "--engine"),
    ({"num_clients": 5}, "--num-clients"), ({"train_size": 70_000}, "--train-size"),
    ({"root_size": 60_000}, "--root-size"),
    ({"seed": 2**64}, "--seed"),
    ({"defense": "multi_krum", "defense_options": {"m": "x"}}, "--defense-option"),
    ({"attack": "gaussian", "attack_options": {"sigma": "big"}}, "--attack-option"), ({"bias": "0.5"}, "--bias"),
]


@pytest.mark.parametrize("bad,flag", BAD_CONFIGS)
def test_bad_configs_fail_before_any_compute(bad, flag, monkeypatch, tmp_path):
    monkeypatch.setattr(experiments, "load_dataset", lambda *a, **k: pytest.fail("loaded data"))
    monkeypatch.setattr(experiments, "run_round", lambda *a: pytest.fail("trained"))
    with pytest.raises(experiments.ConfigError) as err:
        run_experiment(Config(**{**TINY, **bad}), tmp_path / "x.json", progress=False)
    assert err.value.for_cli().startswith(flag) and "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())
