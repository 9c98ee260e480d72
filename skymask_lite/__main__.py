"""Command line: ``python -m skymask_lite run ...`` for one experiment, ``... grid ...`` for many.

Examples::

    python -m skymask_lite run --dataset fmnist --model cnn --num-clients 100 --num-malicious 20 \\
        --bias 0.5 --rounds 30 --attack min_max --defense skymask --seed 0 --device cpu --out results.json
    python -m skymask_lite grid --attack min_max fang_trim --defense fedavg skymask --rounds 20 \\
        --num-malicious 20 --out-dir data/results/grid
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from . import flower
from .experiments import RESULTS_DIR, Config, grid, run_experiment, run_grid, run_name

GRID_AXES = ("attack", "defense", "num_malicious", "num_clients", "bias", "seed", "root_bias", "root_steps")


def _option(text: str) -> tuple[str, Any]:
    """``key=value`` with ``value`` read as JSON when it parses (numbers, true, null), else a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _optional_int(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def _add_config_flags(parser: argparse.ArgumentParser, multi: bool) -> None:
    types = {
        "dataset": str, "model": str, "num_clients": int, "num_malicious": int, "split": str, "bias": float,
        "alpha": float, "root_size": int, "root_bias": _optional_float, "train_size": _optional_int, "rounds": int,
        "attack": str, "defense": str, "local_lr": float, "batch_size": int, "local_epochs": int,
        "grad_clip": _optional_float, "global_lr": float, "root_steps": _optional_int, "engine": str, "seed": int,
        "device": str,
    }
    defaults = Config()
    for name, kind in types.items():
        many = multi and name in GRID_AXES
        parser.add_argument(
            "--" + name.replace("_", "-"), type=kind, nargs="+" if many else None,
            default=[getattr(defaults, name)] if many else getattr(defaults, name),
            help=f"default: {getattr(defaults, name)}" + (" (several values: one run each)" if many else ""),
        )
    parser.add_argument("--attack-option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the attack, e.g. perturbation=std (repeatable)")
    parser.add_argument("--defense-option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the defence, e.g. m=10 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _config(args: argparse.Namespace, **overrides: Any) -> Config:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)}
    values.update(attack_options=dict(args.attack_option), defense_options=dict(args.defense_option), **overrides)
    return Config(**values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skymask_lite", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one experiment and write its results JSON")
    _add_config_flags(run, multi=False)
    run.add_argument("--out", type=Path, default=None, help="results JSON (default: data/results/<run name>.json)")
    many = sub.add_parser("grid", help="run the product of several values (resumable)")
    _add_config_flags(many, multi=True)
    many.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help=f"default: {RESULTS_DIR}")
    flower.add_cli(sub, _add_config_flags, _config)
    args = parser.parse_args(argv)
    try:
        if args.command == "flower":
            return args.handler(args)
        if args.command == "run":
            config = _config(args)
            out = args.out or RESULTS_DIR / f"{run_name(config)}.json"
            results = run_experiment(config, out, progress=not args.no_progress)
            print(json.dumps({"out": str(out), **results["final"]}))
        else:
            base = _config(args, **{axis: getattr(args, axis)[0] for axis in GRID_AXES})
            configs = grid(base, **{axis: getattr(args, axis) for axis in GRID_AXES})
            for config in configs:
                config.validate()
            for results in run_grid(configs, args.out_dir, progress=not args.no_progress):
                print(json.dumps({"name": run_name(Config(**results["config"])), **results["final"]}))
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
