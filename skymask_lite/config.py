"""What one federated run is: :class:`Config`, its checks before any compute, its identity.

Every field carries one sentence of help (its metadata), from which the command line's flags and
the class's documentation are generated. :meth:`Config.validate` checks every value, the attack's
and the defense's options and their conditions on ``n`` and ``f`` without reading data or
training; each problem is a :class:`ConfigError` that names the flag and the fix.

A run's identity is its config without the execution fields (``EXECUTION_FIELDS``: device,
engine, threads): the same experiment computed on a GPU has the same name as on a CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .attacks import ATTACKS, make_attack
from .data import DATASETS, TRAIN_SIZES
from .defenses import DEFENSES, make_defense
from .fl import ENGINES, resolve_engine
from .models import MODELS, NUM_CLASSES, make_model

__all__ = [
    "Config", "ConfigError", "DEFAULT_OUT_DIR", "EXECUTION_FIELDS", "OutputPathError", "RESULTS_DIR", "SPLITS",
    "ResumeRefused", "UsageError", "attack_present", "check_output", "resolve_device", "run_identity", "run_name",
    "same_run",
]

RESULTS_DIR = Path(__file__).resolve().parent.parent / "data" / "results"
"""The book's results, read by the chapters; new runs go to :data:`DEFAULT_OUT_DIR` unless told otherwise."""

DEFAULT_OUT_DIR = Path("results")
"""The folder ``./results/`` of the current directory, where the command line and
:func:`~skymask_lite.experiments.run_grid` write by default."""

EXECUTION_FIELDS = ("device", "engine", "threads")
"""The config fields that say how a run is computed, not what it computes, hence not part of its identity."""

SPLITS = ("bias", "dirichlet")


def _field(default: Any, help: str) -> Any:
    """A config field whose ``help`` (one sentence) is the one source of its meaning: the docs
    of :class:`Config` and the command line's ``--help`` are both written from it."""
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    """One federated run. Defaults: the book's Fashion-MNIST recipe (see README, "Recipe").

    Device, engine and threads are execution details (``EXECUTION_FIELDS``): recorded in a
    result's ``env``, never part of its identity (:func:`run_name`).
    """

    dataset: str = _field("fmnist", "The dataset: fmnist (Fashion-MNIST), cifar10 or cifar100.")
    model: str = _field("cnn", "The network: cnn (the Fashion-MNIST CNN), resnet20 (CIFAR) or lr (logistic "
                               "regression).")
    num_clients: int = _field(100, "Number of clients n; every client takes part in every round.")
    num_malicious: int = _field(0, "Number of malicious clients f, a seeded random choice among the n.")
    split: str = _field("bias", "How the training data is dealt to clients: bias (FLTrust's bias q) or dirichlet.")
    bias: float = _field(0.5, "The bias q in [0, 1] of the bias split: the share of a client's data from its "
                              "group's label (1/L is IID).")
    alpha: float = _field(0.5, "The concentration alpha > 0 of the dirichlet split: small is skewed, large near IID.")
    root_size: int = _field(100, "Size of the server's clean root set (FLTrust, SkyMask), removed from the "
                                 "clients' data.")
    root_bias: float | None = _field(None, "Root bias p in [0, 1]: the share of the root set drawn from one class "
                                          "(none: uniform).")
    train_size: int | None = _field(None, "Keep a seeded random subset of this many training examples, for fast "
                                          "demos (none: all).")
    rounds: int = _field(30, "Number of federated rounds.")
    attack: str = _field("none", "The malicious clients' attack (none: nobody attacks and nobody is scored as "
                                 "malicious).")
    attack_options: dict[str, Any] = _field({}, "Keyword options of the attack, e.g. sigma=0.1 for gaussian.")
    defense: str = _field("fedavg", "The server's aggregation rule (defense).")
    defense_options: dict[str, Any] = _field({}, "Keyword options of the defense, e.g. m=10 for multi_krum.")
    local_lr: float = _field(0.1, "Learning rate of the clients' local SGD.")
    batch_size: int = _field(16, "Mini-batch size of the clients' local SGD.")
    local_epochs: int = _field(1, "Passes over its own data each client makes per round.")
    grad_clip: float | None = _field(None, "Clamp every gradient element to [-grad_clip, grad_clip] in local SGD "
                                           "(none: no clamping).")
    global_lr: float = _field(2.0, "The server's learning rate eta in w <- w + eta x aggregate.")
    root_steps: int | None = _field(None, "SGD steps of the server's root update g0 (none: as many as the median "
                                          "client makes).")
    engine: str = _field("auto", "How clients are trained, an execution detail: auto (batched on a GPU, parallel "
                                 "on a CPU), loop, parallel or batched.")
    seed: int = _field(0, "The seed of every random choice: split, attackers, initial model, batch order.")
    device: str = _field("auto", "Where to compute, an execution detail: auto (CUDA when available, else the CPU), "
                                 "cpu, cuda or cuda:N.")
    threads: int | None = _field(None, "Torch threads for the run, an execution detail (none: torch's default, the "
                                       "cores); the parallel engine trains one client per thread.")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # 1 and 1.0 are the same setting (and the same run name)
            value = getattr(self, f.name)
            if _HINTS.get(f.name) in (float, float | None) and type(value) is int:
                setattr(self, f.name, float(value))

    def validate(self) -> None:
        """Raise :class:`ConfigError` (a ``ValueError`` naming the field and the fix) for an
        unknown or impossible setting. Cheap: no data is read and nothing is trained."""
        _check_types(self)
        choices = {"dataset": DATASETS, "model": MODELS, "split": SPLITS, "engine": ("auto", *ENGINES),
                   "attack": tuple(ATTACKS), "defense": tuple(DEFENSES)}
        for key, allowed in choices.items():
            value = getattr(self, key)
            _require(value in allowed, key, value, f"unknown {key}; choose one of {', '.join(allowed)}")
        n, f = self.num_clients, self.num_malicious
        _require(n >= 1, "num_clients", n, "there must be at least one client")
        _require(0 <= f < n, "num_malicious", f,
                 f"must be in [0, num_clients) = [0, {n}): at least one client is honest")
        _require(0.0 <= self.bias <= 1.0, "bias", self.bias, "the bias q is a probability; choose it in [0, 1]")
        _require(self.alpha > 0, "alpha", self.alpha, "the Dirichlet concentration must be > 0, e.g. 0.5")
        num_classes = NUM_CLASSES[self.dataset]
        _require(self.split != "bias" or n >= num_classes, "num_clients", n,
                 f"the bias split needs a client per class group ({num_classes}); use more clients or "
                 "--split dirichlet")
        _require(self.root_size >= 1, "root_size", self.root_size, "the root set needs at least one example")
        _require(self.root_bias is None or 0.0 <= self.root_bias <= 1.0, "root_bias", self.root_bias,
                 "the root bias p is a share; choose it in [0, 1] or none")
        available = TRAIN_SIZES[self.dataset]
        _require(self.root_size + n <= available, "root_size", self.root_size,
                 f"the root set and {n} clients need more than the {available} training images of {self.dataset}")
        _require(self.train_size is None or self.train_size <= available, "train_size", self.train_size,
                 f"{self.dataset} has {available} training images; ask for at most that many, or none for all")
        _require(self.train_size is None or self.train_size >= self.root_size + n, "train_size", self.train_size,
                 f"must leave data for the root set and the clients: at least root_size + num_clients = "
                 f"{self.root_size + n}, or none for the whole set")
        _require(self.rounds >= 1, "rounds", self.rounds, "run at least one round")
        _require(self.local_lr > 0, "local_lr", self.local_lr, "the local learning rate must be > 0, e.g. 0.1")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "a mini-batch holds at least one example")
        _require(self.local_epochs >= 1, "local_epochs", self.local_epochs, "clients train at least one epoch")
        _require(self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip,
                 "the clamp bound must be > 0, or none for no clamping")
        _require(self.global_lr > 0, "global_lr", self.global_lr, "the server's learning rate must be > 0, e.g. 2.0")
        _require(self.root_steps is None or self.root_steps >= 1, "root_steps", self.root_steps,
                 "the root update takes at least one step, or none for the median client's")
        _require(0 <= self.seed < 2**63, "seed", self.seed, "seeds are integers in [0, 2**63)")
        _require(self.threads is None or self.threads >= 1, "threads", self.threads,
                 "use at least one thread, or none for torch's default")
        try:
            make_model(self.model, self.dataset)
        except ValueError as err:
            raise ConfigError("model", self.model, str(err)) from None
        device = resolve_device(self.device)
        engine = resolve_engine(self.engine, device)
        _require(not (engine == "parallel" and device.type != "cpu"), "engine", self.engine,
                 f"the parallel engine spreads clients over CPU threads; on {device} use batched or loop")
        _attack_and_defense(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_HINTS = typing.get_type_hints(Config)
Config.__doc__ = (Config.__doc__ or "").rstrip() + "\n\n    Attributes:\n" + "".join(  # from the one source
    f"        {f.name}: {f.metadata['help']}\n" for f in dataclasses.fields(Config)
)


class UsageError(ValueError):
    """A bad setting found before any compute: ``name`` (a config field or an argument), its
    ``value`` and the ``problem`` with its fix; :meth:`for_cli` says it with the flag ``flag``."""

    def __init__(self, name: str, flag: str, value: Any, problem: str):
        self.name, self.flag, self.value, self.problem = name, flag, value, problem
        super().__init__(f"{name}={value!r}: {problem}")

    def for_cli(self) -> str:
        """One line naming the command-line flag."""
        value = "none" if self.value is None else self.value
        if isinstance(value, dict):
            value = " ".join(f"{key}={item}" for key, item in value.items()) or "(none)"
        return f"{self.flag} {value}: {self.problem}"


class ConfigError(UsageError):
    """A :class:`Config` field with an impossible or unknown value."""

    def __init__(self, name: str, value: Any, problem: str):
        flag = {"attack_options": "--attack-option", "defense_options": "--defense-option"}.get(name)
        super().__init__(name, flag or "--" + name.replace("_", "-"), value, problem)


class OutputPathError(UsageError):
    """An output file or folder that cannot be written."""


class ResumeRefused(ValueError):
    """A checkpoint written by another version of the code: resuming it would mix versions in one result."""


def _require(ok: bool, name: str, value: Any, problem: str) -> None:
    if not ok:
        raise ConfigError(name, value, problem)


def _check_types(config: Config) -> None:
    """Every field has its annotated type (an int is a float; a float must be finite)."""
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), _HINTS[f.name]
        kinds = _kinds(hint)
        ok = isinstance(value, kinds) and not isinstance(value, bool)
        if ok and isinstance(value, float):
            ok = math.isfinite(value)
        names = " or ".join("none" if k is type(None) else k.__name__ for k in kinds)
        _require(ok, f.name, value, f"expected {names}" + (" (finite)" if float in kinds else ""))


def _kinds(hint: Any) -> tuple[type, ...] | None:
    """The classes a value annotated ``hint`` may be (``None`` when the hint is not a plain class or union)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kinds = tuple(typing.get_origin(a) or a for a in (typing.get_args(hint) if union else (hint,)))
    return kinds if all(isinstance(k, type) for k in kinds) else None


def _check_option_types(name: str, owner: Any, options: dict[str, Any]) -> None:
    """Each option of the attack or defense ``owner`` has the type its function annotates (an int
    is a float), so that ``m=x`` fails here, not in the middle of a round."""
    func = getattr(owner, "craft", None) or getattr(owner, "rule", None) or type(owner).__init__
    try:
        hints = typing.get_type_hints(func)
    except (NameError, TypeError):  # an annotation this check cannot evaluate: the function checks itself
        return
    for key, value in options.items():
        kinds = _kinds(hints.get(key))
        if kinds is None:
            continue
        ok = isinstance(value, kinds) or (float in kinds and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            names = " or ".join("none" if k is type(None) else k.__name__ for k in kinds)
            raise ConfigError(name, options, f"option {key}={value!r} must be {names}")


def _attack_and_defense(config: Config):
    """The attack and the defense of ``config``; bad options become a :class:`ConfigError`."""
    attack_options = dict(config.attack_options)
    if config.attack == "label_flip":
        attack_options.setdefault("num_classes", NUM_CLASSES[config.dataset])
    try:
        attack = make_attack(config.attack, **attack_options)
    except (TypeError, ValueError) as err:
        raise ConfigError("attack_options", config.attack_options, f"{err}") from None
    try:
        defense = make_defense(config.defense, **config.defense_options)
    except (TypeError, ValueError) as err:
        raise ConfigError("defense_options", config.defense_options, f"{err}") from None
    _check_option_types("attack_options", attack, config.attack_options)
    _check_option_types("defense_options", defense, config.defense_options)
    # each rule's and attack's condition on n and f (e.g. Krum: n > 2f + 2), before any compute
    for name, rule in (("attack", attack), ("defense", defense)):
        try:
            rule.require(config.num_clients, config.num_malicious)
        except ValueError as err:
            raise ConfigError(name, getattr(config, name), f"{err}") from None
    return attack, defense


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device of ``device``: ``"auto"`` is CUDA when available, else the CPU; a clear
    :class:`ConfigError` for a name torch does not know or a CUDA device this machine lacks."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError("device", device, "unknown device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", device, "CUDA is not available here; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError("device", device, f"this machine has {torch.cuda.device_count()} CUDA device(s); "
                                                "use cuda:0 or auto")
    elif dev.type != "cpu":
        raise ConfigError("device", device, "the simulator runs on cpu or cuda; use auto, cpu or cuda")
    return dev


def run_identity(config: Config | dict[str, Any]) -> dict[str, Any]:
    """What a run computes: its config without the ``EXECUTION_FIELDS`` (a dict is read as
    a config first, so that fields it lacks take their defaults)."""
    values = config.to_dict() if isinstance(config, Config) else Config(**config).to_dict()
    return {key: value for key, value in values.items() if key not in EXECUTION_FIELDS}


def same_run(a: Config | dict[str, Any], b: Config | dict[str, Any]) -> bool:
    """Whether two configs describe the same experiment (same :func:`run_identity`)."""
    try:
        return run_identity(a) == run_identity(b)
    except TypeError:  # a config dict with a field this version does not know
        return False


def run_name(config: Config) -> str:
    """A readable, unique file stem: key settings plus a hash of the run's identity (the config
    without device, engine and threads, :func:`run_identity`)."""
    identity = json.dumps(run_identity(config), sort_keys=True)
    digest = hashlib.sha1(identity.encode()).hexdigest()[:8]
    return (
        f"{config.dataset}-{config.model}-n{config.num_clients}-f{config.num_malicious}-"
        f"{config.attack}-{config.defense}-r{config.rounds}-s{config.seed}-{digest}"
    )


def attack_present(config: Config) -> bool:
    """Whether some client attacks: an attack other than ``"none"`` and at least one malicious client."""
    return config.attack != "none" and config.num_malicious > 0


def check_output(path: str | os.PathLike, flag: str = "--out", *, folder: bool = False) -> Path:
    """Make sure ``path`` (a results file, or with ``folder`` a results folder) can be written:
    its folder is created and a file is written to it and removed. Raises
    :class:`OutputPathError` (naming ``flag``) before any compute rather than after it."""
    path = Path(path)
    target = path if folder else path.parent
    name = flag.lstrip("-").replace("-", "_")
    if not folder and path.is_dir():
        raise OutputPathError(name, flag, path, f"is a folder; give a file, e.g. {path / 'run.json'}")
    try:
        target.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-check-", dir=target)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise OutputPathError(name, flag, path, f"cannot write to the folder {target} ({reason}); "
                                                "choose a writable location") from None
    if not folder and path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(name, flag, path, "the file exists and is read-only; choose another path")
    return path


