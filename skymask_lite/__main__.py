"""Command line: ``skymask-lite run ...`` (or ``python -m skymask_lite run ...``) for one
experiment, ``... grid ...`` for many. Every flag of ``run`` is a field of
:class:`~skymask_lite.experiments.Config`, and its help is that field's documented meaning.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence

from . import flower
from .attacks import ATTACKS
from .data import DATASETS
from .defenses import DEFENSES
from .experiments import (
    DEFAULT_OUT_DIR,
    EXECUTION_FIELDS,
    SPLITS,
    Config,
    UsageError,
    check_output,
    grid,
    run_experiment,
    run_grid,
    run_name,
)
from .fl import ENGINES
from .models import MODELS
from .studies import STUDIES, load_study, shard, study_configs

__all__ = ["main"]

GRID_AXES = ("attack", "defense", "num_malicious", "num_clients", "bias", "seed", "root_bias", "root_steps")

CHOICES = {
    "dataset": DATASETS, "model": MODELS, "split": SPLITS, "engine": ("auto", *ENGINES), "attack": tuple(ATTACKS),
    "defense": tuple(DEFENSES),
}
"""The valid names of the flags that take one, listed in ``--help``."""

DESCRIPTION = (
    "Federated learning under attack: simulate n clients, f of them malicious, and a server that "
    "aggregates their updates with a robust rule (defense), and write one results JSON per run."
)

RUN_EXAMPLES = """examples:
  # 3 quick rounds on 6,000 images (about a minute on a laptop CPU), results in ./results/
  {prog} run --num-clients 20 --num-malicious 4 --train-size 6000 --rounds 3 --attack min_max --defense skymask
  # an attack that destroys FedAvg: the run stops and records the collapse (exit code 0)
  {prog} run --attack gaussian --defense fedavg --num-clients 20 --num-malicious 4 --train-size 6000 --rounds 3
  # one of the book's runs, on one thread (a loaded machine), into a file of your choice
  {prog} run --num-malicious 20 --rounds 20 --attack min_max --defense median --threads 1 --out runs/median.json
"""

GRID_EXAMPLES = """examples:
  {prog} grid --attack none min_max fang_trim --defense fedavg median skymask --num-malicious 20 --rounds 20
  {prog} grid --attack min_max --defense krum --num-malicious 5 10 20 --out-dir results/krum
  {prog} grid --attack lie --defense fedavg --seed 0 1 2 --rounds 10 --no-resume
"""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``error: ...``) with exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def _prog() -> str:
    """``skymask-lite`` when run as the console script, else ``python -m skymask_lite``."""
    return "skymask-lite" if Path(sys.argv[0]).name == "skymask-lite" else "python -m skymask_lite"


def _option(text: str) -> tuple[str, Any]:
    """``key=value`` with ``value`` read as JSON when it parses (numbers, true, null), else a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _or_none(kind: type) -> Any:
    """``kind`` or the word ``none`` (for settings whose ``None`` means "the default rule")."""

    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = f"{kind.__name__} (or none)"
    return parse


def _parse_type(hint: Any) -> Any:
    """The argparse ``type`` of a config field annotated ``hint`` (``int``, ``float | None``, ...)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (kind,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _or_none(kind)
    return hint


def _add_config_flags(parser: argparse.ArgumentParser, multi: bool) -> None:
    """One flag per :class:`Config` field (its help: the field's meaning, the valid names, the default)."""
    hints, defaults = typing.get_type_hints(Config), Config()
    for f in dataclasses.fields(Config):
        if f.name in ("attack_options", "defense_options"):
            continue
        many = multi and f.name in GRID_AXES
        default = getattr(defaults, f.name)
        text = f.metadata["help"]
        if f.name in CHOICES:
            text += f" One of: {', '.join(CHOICES[f.name])}."
        text += f" Default: {'none' if default is None else default}."
        if many:
            text += " Several values: one run each."
        parser.add_argument(
            "--" + f.name.replace("_", "-"), type=_parse_type(hints[f.name]), nargs="+" if many else None,
            default=[default] if many else default, help=text, metavar=f.name.upper(),
        )
    for kind in ("attack", "defense"):
        meaning = next(f.metadata["help"] for f in dataclasses.fields(Config) if f.name == f"{kind}_options")
        parser.add_argument(f"--{kind}-option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                            help=f"{meaning} Repeat the flag for several options.")
    parser.add_argument("--no-resume", action="store_true",
                        help="Compute from round 0 and replace the results file, instead of returning a finished "
                             "run or resuming its checkpoint.")
    parser.add_argument("--no-progress", action="store_true", help="Do not show a progress bar.")


def _config(args: argparse.Namespace, **overrides: Any) -> Config:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)}
    values.update(attack_options=dict(args.attack_option), defense_options=dict(args.defense_option), **overrides)
    return Config(**values)


def _parser() -> argparse.ArgumentParser:
    prog = _prog()
    parser = _Parser(prog=prog, description=DESCRIPTION, epilog=RUN_EXAMPLES.format(prog=prog),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,grid,study,flower}")
    run = sub.add_parser("run", help="run one experiment and write its results JSON",
                         description="Run one experiment and write its results JSON.",
                         epilog=RUN_EXAMPLES.format(prog=prog), formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_flags(run, multi=False)
    run.add_argument("--out", type=Path, default=None,
                     help=f"The results JSON to write. Default: {DEFAULT_OUT_DIR}/<run name>.json in the current "
                          "folder.")
    many = sub.add_parser("grid", help="run every combination of several values (resumable)",
                          description="Run every combination of the values given to the flags that take several, "
                                      "one results JSON per run, named after the run.",
                          epilog=GRID_EXAMPLES.format(prog=prog), formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_flags(many, multi=True)
    many.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                      help=f"The folder of the results JSONs. Default: {DEFAULT_OUT_DIR}/ in the current folder.")
    study = sub.add_parser("study", help="run one of the book's studies (resumable)",
                           description="Run every config of a study of skymask_lite.studies, one results JSON per "
                                       "run; finished runs are skipped, interrupted ones resumed.",
                           epilog=f"example:\n  {prog} study decision --out-dir data/results/decision",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    study.add_argument("name", choices=sorted(STUDIES), help="The study's name.")
    study.add_argument("--out-dir", type=Path, required=True, help="The folder of the study's results JSONs.")
    for name in EXECUTION_FIELDS:
        study.add_argument("--" + name, type=str if name != "threads" else int, default=None,
                           help=f"Override the configs' {name} (an execution detail, not part of a run's identity).")
    study.add_argument("--shard", default=None, metavar="K/M",
                       help="Run only shard K of M (every M-th config from the K-th): M processes with the same "
                            "--out-dir split the study. Default: the whole study.")
    study.add_argument("--status", action="store_true",
                       help="Compute nothing: print how many runs of the study are in --out-dir and list the missing "
                            "ones (one JSON line each).")
    study.add_argument("--no-resume", action="store_true", help="Recompute every run, replacing its file.")
    study.add_argument("--no-progress", action="store_true", help="No progress bar.")
    flower.add_cli(sub, _add_config_flags, _config)
    return parser


def _notice(results: dict[str, Any], where: Any) -> None:
    """A one-line notice on stderr when the model collapsed under attack."""
    collapsed = results["final"].get("collapsed")
    if collapsed:
        config = results["config"]
        print(f"notice: the global model collapsed in round {collapsed['round']} under the {config['attack']!r} "
              f"attack against {config['defense']!r} ({collapsed['reason']}); the run stopped and is recorded "
              f"in {where}", file=sys.stderr)


def _one_line(err: BaseException) -> str:
    return err.for_cli() if isinstance(err, UsageError) else " ".join(str(err).split())


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit code (2 for bad input, with one ``error:`` line)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a flag argparse rejected (its one-line error is printed)
        return int(stop.code or 0)
    try:
        if args.command == "flower":
            return args.handler(args)
        if args.command == "run":
            config = _config(args)
            config.validate()
            out = check_output(args.out or DEFAULT_OUT_DIR / f"{run_name(config)}.json")
            results = run_experiment(config, out, resume=not args.no_resume, progress=not args.no_progress)
            print(json.dumps({"out": str(out), **results["final"]}))
            _notice(results, out)
        elif args.command == "study":
            execution = {name: getattr(args, name) for name in EXECUTION_FIELDS if getattr(args, name) is not None}
            configs = [dataclasses.replace(c, **execution) for c in study_configs(args.name)]
            if args.shard is not None:
                configs = shard(configs, args.shard)
            if args.status:
                found, missing = load_study(args.name, args.out_dir)
                wanted = {run_name(c) for c in configs}
                missing = [c for c in missing if run_name(c) in wanted]
                print(json.dumps({"study": args.name, "runs": len(configs), "computed": len(configs) - len(missing),
                                  "missing": len(missing)}))
                for config in missing:
                    print(json.dumps({"missing": run_name(config)}))
                return 0
            for config in configs:
                config.validate()
            out_dir = check_output(args.out_dir, "--out-dir", folder=True)
            for results in run_grid(configs, out_dir, resume=not args.no_resume, progress=not args.no_progress):
                name = run_name(Config(**results["config"]))
                print(json.dumps({"name": name, **results["final"]}))
                _notice(results, out_dir / f"{name}.json")
        else:
            base = _config(args, **{axis: getattr(args, axis)[0] for axis in GRID_AXES})
            configs = grid(base, **{axis: getattr(args, axis) for axis in GRID_AXES})
            runs = run_grid(configs, args.out_dir, resume=not args.no_resume, progress=not args.no_progress)
            for results in runs:
                name = run_name(Config(**results["config"]))
                print(json.dumps({"name": name, **results["final"]}))
                _notice(results, Path(args.out_dir) / f"{name}.json")
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
