"""Experiment configs, the run loop with checkpoints, grids, and the results JSON.

A results file is the only way a number reaches the book. Its keys:

* ``config``: the full :class:`Config` (the seed included),
* ``malicious``: the malicious clients' ids,
* ``rounds``: one record per round, ``{round, test_acc, kept, fpr, fnr, [asr], seconds, timing}``,
* ``final``: last accuracy (and ASR), mean FPR/FNR over the rounds, seconds per round,
* ``env``: package version, git commit, torch version, device, threads, python, wall time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm import tqdm

from . import __version__
from .attacks import make_attack
from .data import DATASETS, bias_split, choose_malicious, dirichlet_split, load_dataset, root_split
from .defenses import make_defense
from .fl import (
    ENGINES,
    POISON_STREAM,
    SUBSET_STREAM,
    Federation,
    LocalRecipe,
    State,
    derive_seed,
    initial_state,
    run_round,
)
from .models import MODELS, NUM_CLASSES, make_model

RESULTS_DIR = Path(__file__).resolve().parent.parent / "data" / "results"


@dataclass
class Config:
    """One federated run. Defaults: the book's Fashion-MNIST recipe (see README, "Recipe").

    ``train_size`` keeps a seeded random subset of the training pool (fast demos);
    ``root_steps`` is the number of SGD steps of the server's root update (``None``: as many
    as the median client makes in its local epochs).
    """

    dataset: str = "fmnist"
    model: str = "cnn"
    num_clients: int = 100
    num_malicious: int = 0
    split: str = "bias"
    bias: float = 0.5
    alpha: float = 0.5
    root_size: int = 100
    root_bias: float | None = None
    train_size: int | None = None
    rounds: int = 30
    attack: str = "none"
    attack_options: dict[str, Any] = field(default_factory=dict)
    defense: str = "fedavg"
    defense_options: dict[str, Any] = field(default_factory=dict)
    local_lr: float = 0.1
    batch_size: int = 16
    local_epochs: int = 1
    grad_clip: float | None = None
    global_lr: float = 2.0
    root_steps: int | None = None
    engine: str = "loop"
    seed: int = 0
    device: str = "cpu"

    def validate(self) -> None:
        """Raise ``ValueError`` for impossible or unknown settings, saying how to fix them."""
        choices = {"dataset": DATASETS, "model": MODELS, "engine": ENGINES, "split": ("bias", "dirichlet")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"unknown {key} {getattr(self, key)!r}; choose one of {list(allowed)}")
        if self.num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {self.num_clients}")
        if not 0 <= self.num_malicious < self.num_clients:
            raise ValueError(
                f"num_malicious must be in [0, num_clients) = [0, {self.num_clients}), got {self.num_malicious}"
            )
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        # the attack's and the defense's names, options and conditions on n and f, before any compute
        make_attack(self.attack, **self.attack_options).require(self.num_clients, self.num_malicious)
        make_defense(self.defense, **self.defense_options).require(self.num_clients, self.num_malicious)
        check_device(self.device)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_device(device: str) -> torch.device:
    """The torch device for ``device``; a clear error if CUDA is asked for but absent."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available here; use --device cpu")
    return dev


def run_name(config: Config) -> str:
    """A readable, unique file stem: key settings plus a hash of the whole config."""
    digest = hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    return (
        f"{config.dataset}-{config.model}-n{config.num_clients}-f{config.num_malicious}-"
        f"{config.attack}-{config.defense}-r{config.rounds}-s{config.seed}-{digest}"
    )


def build(config: Config, data_root: str | os.PathLike | None = None):
    """The :class:`~skymask_lite.fl.Federation`, the attack and the defence of ``config``."""
    config.validate()
    num_classes = NUM_CLASSES[config.dataset]
    attack_options = dict(config.attack_options)
    if config.attack == "label_flip":
        attack_options.setdefault("num_classes", num_classes)
    attack = make_attack(config.attack, **attack_options)
    defense = make_defense(config.defense, **config.defense_options)
    device = check_device(config.device)
    net = make_model(config.model, config.dataset, seed=config.seed).to(device)
    train, test = load_dataset(config.dataset, data_root)
    x, y = train.tensors
    if config.train_size is not None:
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(derive_seed(config.seed, 0, SUBSET_STREAM)))
        x, y = x[keep[: config.train_size]], y[keep[: config.train_size]]
    root_idx, pool = root_split(
        y, config.root_size, num_classes=num_classes, root_bias=config.root_bias, seed=config.seed
    )
    if config.split == "bias":
        splits = bias_split(y[pool], config.num_clients, config.bias, num_classes=num_classes, seed=config.seed)
    else:
        splits = dirichlet_split(y[pool], config.num_clients, config.alpha, num_classes=num_classes, seed=config.seed)
    malicious = choose_malicious(config.num_clients, config.num_malicious, seed=config.seed)
    client_data = [(x[pool[idx]], y[pool[idx]]) for idx in splits]
    for i in malicious.tolist():
        gen = torch.Generator().manual_seed(derive_seed(config.seed, 0, POISON_STREAM, i))
        client_data[i] = attack.poison_data(*client_data[i], gen)
    fed = Federation(
        net=net,
        client_data=[(cx.to(device), cy.to(device)) for cx, cy in client_data],
        test=(test.tensors[0].to(device), test.tensors[1].to(device)),
        root=(x[root_idx].to(device), y[root_idx].to(device)),
        malicious=malicious,
        num_classes=num_classes,
        recipe=LocalRecipe(config.local_lr, config.batch_size, config.local_epochs, config.grad_clip),
        global_lr=config.global_lr,
        root_steps=config.root_steps,
        engine=config.engine,
        seed=config.seed,
    )
    return fed, attack, defense


def _cpu_name() -> str:
    """The CPU's model name (Linux: ``/proc/cpuinfo``), else the platform's processor or machine."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    """Output of ``git *args`` run in the package's directory."""
    return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, check=True).stdout.strip()


def environment(device: str) -> dict[str, Any]:
    """Where a result was computed: versions, git commit (and whether tracked files had
    uncommitted changes, ``git_dirty``), device, threads."""
    try:
        commit, dirty = _git("rev-parse", "HEAD"), bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        commit = dirty = None
    dev = torch.device(device)
    return {
        "package_version": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": device,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
    }


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``final`` block: last accuracy/ASR, mean FPR and FNR over rounds (where defined)."""

    def mean(key: str) -> float | None:
        values = [r[key] for r in records if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    final = {
        "rounds": len(records),
        "test_acc": records[-1]["test_acc"],
        "mean_fpr": mean("fpr"),
        "mean_fnr": mean("fnr"),
        "seconds_per_round": mean("seconds"),
    }
    if "asr" in records[-1]:
        final["asr"] = records[-1]["asr"]
    return final


def run_experiment(
    config: Config,
    out: str | os.PathLike | None = None,
    *,
    resume: bool = True,
    progress: bool = True,
    data_root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run ``config`` and return (and, with ``out``, write) its results.

    With ``resume``, a finished results file for the same config is returned as is, and an
    interrupted run continues from its checkpoint (``<out>.ckpt.pt``, written after every
    round, removed at the end).
    """
    out_path = Path(out) if out is not None else None
    ckpt_path = out_path.with_suffix(".ckpt.pt") if out_path else None
    if resume and out_path and out_path.exists():
        done = json.loads(out_path.read_text())
        if done.get("config") == config.to_dict() and len(done.get("rounds", [])) == config.rounds:
            return done
    torch.manual_seed(config.seed)
    fed, attack, defense = build(config, data_root)
    state, records, earlier = initial_state(fed), [], 0.0
    if resume and ckpt_path and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=config.device, weights_only=False)
        if ckpt["config"] == config.to_dict():
            state, records, defense = ckpt["state"], ckpt["records"], ckpt["defense"]
            earlier = ckpt.get("wall_seconds", 0.0)  # time spent before the interruption
    started = time.perf_counter()
    for _ in tqdm(range(state.round, config.rounds), desc=run_name(config), disable=not progress, initial=state.round, total=config.rounds):
        records.append(run_round(fed, state, attack, defense))
        if ckpt_path:
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            partial = ckpt_path.with_suffix(".partial")  # atomic: an interrupted save leaves the old checkpoint
            wall = earlier + time.perf_counter() - started
            torch.save({"config": config.to_dict(), "state": state, "records": records, "defense": defense,
                        "wall_seconds": wall}, partial)
            os.replace(partial, ckpt_path)
    env = environment(config.device)
    env["wall_seconds"] = earlier + time.perf_counter() - started  # all sessions of a resumed run
    results = {
        "config": config.to_dict(),
        "malicious": fed.malicious.tolist(),
        "rounds": records,
        "final": summarize(records),
        "env": env,
    }
    if out_path:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=1))
        if ckpt_path and ckpt_path.exists():
            ckpt_path.unlink()
    return results


def grid(base: Config, **axes: Iterable[Any]) -> list[Config]:
    """The Cartesian product of ``axes`` (config field -> values) applied to ``base``."""
    unknown = sorted(set(axes) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown} in the grid")
    keys = list(axes)
    return [dataclasses.replace(base, **dict(zip(keys, values))) for values in itertools.product(*axes.values())]


def run_grid(
    configs: list[Config], out_dir: str | os.PathLike = RESULTS_DIR, *, resume: bool = True, progress: bool = True
) -> list[dict[str, Any]]:
    """Run every config into ``out_dir``: with ``resume`` (the default) finished runs are skipped
    and interrupted ones resumed; without, every run is recomputed and its file replaced."""
    return [
        run_experiment(c, Path(out_dir) / f"{run_name(c)}.json", resume=resume, progress=progress) for c in configs
    ]


def load_results(folder: str | os.PathLike = RESULTS_DIR, **match: Any) -> list[dict[str, Any]]:
    """Every results JSON in ``folder`` (recursively) whose config has the given field values."""
    found = []
    for path in sorted(Path(folder).rglob("*.json")):
        result = json.loads(path.read_text())
        if "config" in result and all(result["config"].get(k) == v for k, v in match.items()):
            found.append(result)
    return found
