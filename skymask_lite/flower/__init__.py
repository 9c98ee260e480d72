"""SkyMask on Flower: the book's defences as Flower strategies, its federation as Flower apps.

The simulator (:mod:`skymask_lite.fl`) trains every client inside one process. Flower
(``flwr``, https://flower.ai) runs the same round across separate processes or machines:

* a **ClientApp** (:data:`skymask_lite.flower.apps.client_app`) answers the server's ``train``
  messages: it receives the global model as an ``ArrayRecord``, trains it on its own partition
  with :func:`skymask_lite.fl.local_sgd` and replies with its trained WEIGHTS;
* a **ServerApp** runs a **Strategy**: ``configure_train`` sends the global model,
  ``aggregate_train(server_round, replies)`` turns the replies into the new global model.
  :class:`~skymask_lite.flower.strategy.DefenseStrategy` (a subclass of Flower's ``FedAvg``)
  forms the updates ``U_i = w_i - w`` and hands them to any defence of
  :mod:`skymask_lite.defenses` (SkyMask and FLTrust need the server's root update ``g0``,
  which the strategy trains on its root data);
* attacks that craft their updates from everyone's updates (Min-Max, Fang, LIE) cannot be
  independent ClientApps: :class:`~skymask_lite.flower.strategy.AttackWrapper` wraps the
  strategy and rewrites the malicious replies before the defence sees them, the way Flower's
  differential-privacy wrappers wrap a strategy.

Everything that needs Flower lives in the submodules :mod:`skymask_lite.flower.strategy` and
:mod:`skymask_lite.flower.apps`; this package itself only registers the command line
(``python -m skymask_lite flower ...``), so the package imports without Flower installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

INSTALL_HINT = "install the extra: pip install -e \".[flower]\" (flwr[simulation] >= 1.42, Python >= 3.11)"


def require_flower() -> None:
    """Raise a clear ``ModuleNotFoundError`` when Flower (and Ray) are not installed."""
    try:
        import flwr  # noqa: F401
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"skymask_lite.flower needs Flower; {INSTALL_HINT}") from err


def add_cli(
    subparsers: Any,
    add_config_flags: Callable[[argparse.ArgumentParser, bool], None],
    make_config: Callable[[argparse.Namespace], Any],
) -> None:
    """Register ``flower`` in the command line's ``subparsers``: the run's flags are ``run``'s
    (``add_config_flags``), read into a :class:`~skymask_lite.experiments.Config` by ``make_config``."""
    parser = subparsers.add_parser(
        "flower", help="run one experiment on Flower's simulation engine (Ray) and write its results JSON"
    )
    add_config_flags(parser, False)
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: print the summary only)")
    parser.add_argument("--ray-cpus", type=int, default=1,
                        help="CPUs Ray may use; one client trains per CPU (default: 1)")
    parser.add_argument("--fraction-train", type=float, default=1.0,
                        help="share of the clients sampled each round (default: 1.0, all of them)")
    parser.add_argument("--compare-simulator", action="store_true",
                        help="also run the simulator on the same config; --out then holds both results and "
                             "their agreement ({flower, simulator, agreement})")
    parser.set_defaults(handler=lambda args: _run_cli(args, make_config))


def _run_cli(args: argparse.Namespace, make_config: Callable[[argparse.Namespace], Any]) -> int:
    """The ``flower`` subcommand: run the federation on Flower, write ``--out``, print the summary."""
    try:
        require_flower()
    except ModuleNotFoundError as err:  # the command line reports it as a usage error
        raise ValueError(str(err)) from err
    from ..experiments import run_experiment
    from .apps import agreement, check_flower_config, run_flower

    config = check_flower_config(make_config(args), args.fraction_train)  # the simulator runs the same
    out = None if args.compare_simulator else args.out
    results = run_flower(config, out, ray_cpus=args.ray_cpus, fraction_train=args.fraction_train)
    print(json.dumps({"out": str(args.out) if args.out else None, **results["final"]}))
    if args.compare_simulator:
        simulator = run_experiment(config, progress=not args.no_progress)
        both = {"command": " ".join(["python -m skymask_lite", *sys.argv[1:]]), "flower": results,
                "simulator": simulator, "agreement": agreement(results, simulator)}
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(both, indent=1))
        summary = {k: v for k, v in both["agreement"].items() if k != "rounds"}
        print(json.dumps({"agreement": summary}))
    return 0
