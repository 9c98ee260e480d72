"""The book's Fashion-MNIST federation as a Flower ClientApp and ServerApp, and its simulation.

* :data:`client_app`: one client. It reads the run's :class:`~skymask_lite.experiments.Config`
  from the server's train message, builds (once per process) the book's partitions with
  :func:`skymask_lite.experiments.build` and trains partition ``partition-id`` (from its node
  config) exactly as the simulator's loop engine does: :func:`skymask_lite.fl.local_sgd` on the
  batches drawn from ``(seed, round, CLIENT_STREAM, partition-id)``. A malicious client's data
  is poisoned by ``build`` (label flipping, backdoor); attacks that need everyone's updates are
  the server-side :class:`~skymask_lite.flower.strategy.AttackWrapper`.
* :func:`serve`: the ServerApp's body: the defence as a
  :class:`~skymask_lite.flower.strategy.DefenseStrategy` (wrapped by the attack when the attack
  rewrites updates), run by Flower's ``Strategy.start`` with central evaluation on the test set.
* :func:`run_flower`: the whole run on Flower's simulation engine (Ray), returning the results
  JSON of :func:`skymask_lite.experiments.run_experiment` (same schema).
* :data:`server_app`: the ServerApp for a real deployment (``flwr run``), configured by the
  run config (``num-clients = 100``, ``attack = "min_max"``, ... : :func:`config_from_run_config`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from . import require_flower

require_flower()

import flwr  # noqa: E402
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from ..experiments import Config, build, environment, summarize  # noqa: E402
from ..fl import CLIENT_STREAM, Federation, client_schedules, derive_seed, initial_state, local_sgd, torch_threads  # noqa: E402
from ..models import flatten_params, float_buffers  # noqa: E402
from .strategy import AttackWrapper, DefenseStrategy, from_arrays, modifies_updates, to_arrays  # noqa: E402

__all__ = [
    "LocalGrid",
    "agreement",
    "client_app",
    "config_from_run_config",
    "run_flower",
    "serve",
    "server_app",
    "server_view",
]

CONFIG_KEY = "federation"  # the train message's ConfigRecord entry holding the Config as JSON


@lru_cache(maxsize=2)
def _client_federation(config_json: str) -> Federation:
    """The federation of a config (built once per client process: a Ray actor serves many
    partitions, round after round)."""
    fed, _, _ = build(Config(**json.loads(config_json)))
    return fed


client_app = ClientApp()
"""A client of the book's federation (see the module docstring)."""


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Train partition ``partition-id`` from the received global model; reply with the trained
    weights, ``num-examples`` and ``partition-id``."""
    config_json = str(msg.content["config"][CONFIG_KEY])
    server_round = int(msg.content["config"]["server-round"])
    fed = _client_federation(config_json)
    pid = int(context.node_config["partition-id"])
    if not 0 <= pid < fed.num_clients:
        raise ValueError(
            f"partition-id {pid} is outside the federation's {fed.num_clients} clients; "
            "start as many SuperNodes as --num-clients"
        )
    params, buffers = from_arrays(msg.content["arrays"], fed.net, fed.test[0].device)
    x, y = fed.client_data[pid]
    [batches] = client_schedules([(x, y)], fed.recipe, [derive_seed(fed.seed, server_round, CLIENT_STREAM, pid)])
    with torch_threads(1):  # one CPU per client: the same arithmetic in any process
        local_sgd(fed.net, params, x, y, batches, fed.recipe, buffers)
    # the trained weights themselves (not params + update): the server's w_i - w is then
    # bit for bit the simulator's update
    trained = to_arrays(flatten_params(fed.net), float_buffers(fed.net), fed.net)
    metrics = MetricRecord({"num-examples": len(y), "partition-id": pid})
    return Message(content=RecordDict({"arrays": trained, "metrics": metrics}), reply_to=msg)


class LocalGrid:
    """A Flower grid whose nodes are calls of :data:`client_app` in this process (no Ray, no
    network): for examples and tests. Node ``100 + i`` holds partition ``i``; the partitions in
    ``drop`` never answer (dropped clients, or stragglers past the server's timeout).

    Flower's runtime gives every process a task identity (run, task, node); a process without
    one (a notebook, a test) gets run 1, task 1, node 0 here, as Flower's in-memory runtime does.
    """

    def __init__(self, num_nodes: int, drop: Iterable[int] = ()) -> None:
        self.num_nodes, self.drop = num_nodes, frozenset(drop)
        try:
            TaskIdentity.run_id
        except RuntimeError:
            TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0

    def get_node_ids(self) -> list[int]:
        """The node ids, ``100, ..., 100 + num_nodes - 1``."""
        return list(range(100, 100 + self.num_nodes))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Each message's reply from its node's ClientApp, except the dropped nodes'."""
        replies = []
        for msg in messages:
            pid = msg.metadata.dst_node_id - 100
            if pid in self.drop:
                continue
            context = Context(run_id=1, node_id=msg.metadata.dst_node_id, node_config={"partition-id": pid},
                              state=RecordDict(), run_config={})
            replies.append(client_app(msg, context))
        return replies


def server_view(fed: Federation) -> Federation:
    """The server's federation: no client data (the server never reads it), the root update's
    number of steps fixed from the partition sizes (``root_steps`` or the median client's)."""
    return dataclasses.replace(fed, client_data=[], root_steps=fed.root_update_steps)


def check_flower_config(config: Config, fraction_train: float = 1.0) -> Config:
    """The config a Flower run executes (``"auto"`` engine and device become ``"loop"`` and
    ``"cpu"``: Flower's clients train one by one on the CPU); a ``ValueError`` saying what to change
    for a config the Flower run cannot honour."""
    config = dataclasses.replace(
        config,
        engine="loop" if config.engine == "auto" else config.engine,
        device="cpu" if config.device == "auto" else config.device,
    )
    if config.engine != "loop":
        raise ValueError(
            f"engine {config.engine!r}: Flower's clients train one by one with the loop engine's SGD; "
            "use --engine loop or auto (the default)"
        )
    if torch.device(config.device).type != "cpu":
        raise ValueError(
            f"device {config.device!r}: the Flower simulation here runs its clients on CPU; use --device cpu or auto"
        )
    if not 0.0 < fraction_train <= 1.0:
        raise ValueError(f"fraction_train must be in (0, 1], got {fraction_train}")
    config.validate()
    return config


def serve(grid: Grid, config: Config, fraction_train: float = 1.0) -> dict[str, Any]:
    """The ServerApp's body: run ``config.rounds`` rounds of the config's defence (wrapped by its
    attack when the attack rewrites updates) on ``grid``; returns the results JSON."""
    config = check_flower_config(config, fraction_train)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    fed, attack, defense = build(config)
    fed = server_view(fed)
    n = config.num_clients
    strategy = DefenseStrategy(
        defense, fed, attack=attack, fraction_train=fraction_train, fraction_evaluate=0.0,
        min_train_nodes=1, min_available_nodes=n,
    )
    outer = AttackWrapper(strategy, attack, fed) if modifies_updates(attack) else strategy
    state = initial_state(fed)
    env = environment(config.device)  # the code's version as the run starts, not as it ends
    outer.start(
        grid=grid,
        initial_arrays=to_arrays(state.params, state.buffers, fed.net),
        num_rounds=config.rounds,
        train_config=ConfigRecord({CONFIG_KEY: json.dumps(config.to_dict())}),
        evaluate_fn=strategy.evaluate_global,
    )
    env.update(wall_seconds=time.perf_counter() - started, runtime="flower", flwr_version=flwr.__version__)
    return {
        "config": config.to_dict(),
        "malicious": fed.malicious.tolist(),
        "rounds": strategy.records,
        "final": summarize(strategy.records),
        "env": env,
    }


def config_from_run_config(run_config: dict[str, Any]) -> Config:
    """A :class:`~skymask_lite.experiments.Config` from a Flower run config (``pyproject.toml``'s ``[tool.flwr.app.config]``
    or ``flwr run --run-config``): keys are Config fields with ``-`` for ``_``
    (``num-clients``, ``attack``, ...); ``attack-options``/``defense-options`` are JSON strings;
    ``out`` and ``fraction-train`` belong to the run, not to the Config."""
    fields = {f.name for f in dataclasses.fields(Config)}
    values: dict[str, Any] = {}
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if key in ("out", "fraction-train"):
            continue
        if name not in fields:
            raise ValueError(f"unknown run-config key {key!r}; use Config fields with '-': {sorted(fields)}")
        values[name] = json.loads(value) if name in ("attack_options", "defense_options") else value
    return Config(**values)


server_app = ServerApp()
"""The ServerApp for a deployment (``flwr run``), configured by the run config."""


@server_app.main()
def _deployment_main(grid: Grid, context: Context) -> None:
    """Serve the run config's federation; write its results JSON to ``out`` when given."""
    run_config = dict(context.run_config)
    results = serve(grid, config_from_run_config(run_config), float(run_config.get("fraction-train", 1.0)))
    if run_config.get("out"):
        Path(str(run_config["out"])).write_text(json.dumps(results, indent=1))


@contextlib.contextmanager
def quiet_flower() -> Iterator[None]:
    """Flower's and Ray's INFO logs off for the duration (warnings and errors still show)."""
    # ray.widgets.util logs at import time, in a notebook without ipywidgets
    loggers = [logging.getLogger(name) for name in ("flwr", "ray", "ray.widgets.util")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def run_flower(
    config: Config,
    out: str | os.PathLike | None = None,
    *,
    ray_cpus: int = 1,
    fraction_train: float = 1.0,
) -> dict[str, Any]:
    """Run ``config`` on Flower's simulation engine: ``config.num_clients`` virtual SuperNodes
    running :data:`client_app` on Ray (one CPU per client, ``ray_cpus`` clients at a time) and a
    ServerApp running :func:`serve`. Returns (and, with ``out``, writes) the results JSON.

    Flower's telemetry is switched off unless ``FLWR_TELEMETRY_ENABLED`` is set.
    """
    config = check_flower_config(config, fraction_train)
    if ray_cpus < 1:
        raise ValueError(f"ray_cpus must be >= 1, got {ray_cpus}")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    found: list[dict[str, Any]] = []
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        found.append(serve(grid, config, fraction_train))

    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": ray_cpus, "num_gpus": 0, "logging_level": logging.ERROR, "log_to_driver": False},
    }
    with quiet_flower(), warnings.catch_warnings():
        # Ray's notice about a future default for CPU-only actors: nothing to act on here
        warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
        warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto, imported by Ray
        from flwr.simulation import run_simulation

        run_simulation(server_app=app, client_app=client_app, num_supernodes=config.num_clients,
                       backend_config=backend_config)
    if not found:
        raise RuntimeError("the Flower simulation ended without results; rerun with the flwr logger at INFO")
    results = found[0]
    import ray

    results["env"].update(ray_version=ray.__version__, ray_cpus=ray_cpus, fraction_train=fraction_train)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=1))
    return results


def agreement(flower: dict[str, Any], simulator: dict[str, Any]) -> dict[str, Any]:
    """How a Flower run and the simulator's run of the same config agree, round by round: the
    kept clients (equal or not), both accuracies and their difference, both FPR/FNR."""
    if flower["config"] != simulator["config"]:
        raise ValueError("the two results come from different configs; compare runs of the same Config")
    rounds = [
        {
            "round": ours["round"],
            "same_kept": ours["kept"] == theirs["kept"],
            "test_acc": {"flower": ours["test_acc"], "simulator": theirs["test_acc"],
                         "abs_diff": abs(ours["test_acc"] - theirs["test_acc"])},
            "fpr": {"flower": ours["fpr"], "simulator": theirs["fpr"]},
            "fnr": {"flower": ours["fnr"], "simulator": theirs["fnr"]},
        }
        for ours, theirs in zip(flower["rounds"], simulator["rounds"])
    ]
    return {
        "rounds": rounds,
        "same_kept_every_round": all(r["same_kept"] for r in rounds),
        "max_abs_test_acc_diff": max(r["test_acc"]["abs_diff"] for r in rounds),
        "seconds_per_round": {"flower": flower["final"]["seconds_per_round"],
                              "simulator": simulator["final"]["seconds_per_round"]},
    }
