"""Experiment configs, the run loop with checkpoints, grids, and the results JSON.

A results file is the only way a number reaches the book. Its keys:

* ``config``: the full :class:`Config` (the seed included),
* ``malicious``: the ids of the clients scored as malicious (none when nobody attacks),
* ``rounds``: one record per round, ``{round, test_acc, kept, fpr, fnr, [asr], seconds, timing}``,
* ``final``: last accuracy (and ASR), mean FPR/FNR over the rounds, seconds per round, and
  ``collapsed = {round, reason}`` when an attack destroyed the model,
* ``env``: package version, git commit and ``git_dirty`` (read when the run started), torch
  version, the device, engine and thread count that ran it, python, wall time, sessions.

A run's identity is its config without the execution fields (:mod:`skymask_lite.config`): the
same experiment computed on a GPU has the same name as on a CPU and replaces or matches its
file, never sits beside it. The config names are re-exported here.
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
from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm import tqdm

from . import __version__
from .data import (
    bias_split,
    choose_malicious,
    dirichlet_split,
    load_dataset,
    locate_dataset,
    root_split,
)
from .config import (
    DEFAULT_OUT_DIR,
    EXECUTION_FIELDS,
    RESULTS_DIR,
    SPLITS,
    Config,
    ConfigError,
    OutputPathError,
    ResumeRefused,
    UsageError,
    _attack_and_defense,
    attack_present,
    check_output,
    resolve_device,
    run_identity,
    run_name,
    same_run,
)
from .fl import (
    POISON_STREAM,
    SUBSET_STREAM,
    Federation,
    LocalRecipe,
    LocalTrainingDiverged,
    State,
    cudnn_autotune_enabled,
    derive_seed,
    evaluate,
    initial_state,
    resolve_engine,
    run_round,
    torch_threads,
)
from ._mask_kernels import use_graph
from .metrics import detection_rates
from .models import NUM_CLASSES, make_model

__all__ = [
    "Config", "ConfigError", "DEFAULT_OUT_DIR", "EXECUTION_FIELDS", "OutputPathError", "RESULTS_DIR",
    "ResumeRefused", "UsageError", "attack_present", "build", "check_output", "code_version", "environment",
    "grid", "load_results", "resolve_device", "run_experiment", "run_grid", "run_identity", "run_name",
    "same_run", "summarize", "SPLITS",
]

def build(config: Config, data_root: str | os.PathLike | None = None):
    """The :class:`~skymask_lite.fl.Federation`, the attack and the defense of ``config``, on
    its resolved device and engine (:func:`resolve_device`, :func:`~skymask_lite.fl.resolve_engine`)."""
    config.validate()
    num_classes = NUM_CLASSES[config.dataset]
    attack, defense = _attack_and_defense(config)
    device = resolve_device(config.device)
    net = make_model(config.model, config.dataset, seed=config.seed).to(device)
    train, test = load_dataset(config.dataset, data_root)
    x, y = train.tensors
    if config.train_size is not None:
        subset = torch.Generator().manual_seed(derive_seed(config.seed, 0, SUBSET_STREAM))
        keep = torch.randperm(len(y), generator=subset)
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
        engine=resolve_engine(config.engine, device),
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
    done = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def code_version() -> dict[str, Any]:
    """The version of the code that runs: package version, git commit, ``git_dirty`` (uncommitted
    changes to the package's tracked files) and a hash of those changes (``git_diff``); the git
    entries are ``None`` outside a repository. Read when a run starts; a checkpoint resumes only
    under the same version."""
    try:
        commit = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", "."))
        diff = hashlib.sha1(_git("diff", "HEAD", "--", ".").encode()).hexdigest()[:12] if dirty else None
    except (OSError, subprocess.CalledProcessError):
        commit = dirty = diff = None
    return {"package_version": __version__, "git_commit": commit, "git_dirty": dirty, "git_diff": diff}


def environment(
    device: str | torch.device, engine: str | None = None, code: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Where a result was computed: versions, git commit and ``git_dirty`` (of ``code``, default:
    :func:`code_version` now), the resolved device and engine, torch's thread count; on CUDA
    also whether TF32 was allowed (``tf32``: cuDNN convolutions, cuBLAS matrix products), which
    makes a GPU run differ from the same run on a CPU by more than float32 rounding, and
    whether SkyMask's mask step may replay CUDA graphs (``mask_graph``) and the batched engine
    lets cuDNN time its convolutions (``cudnn_benchmark``)."""
    dev = resolve_device(device)
    code = code if code is not None else code_version()
    env = {
        "package_version": code["package_version"],
        "git_commit": code["git_commit"],
        "git_dirty": code["git_dirty"],
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
    }
    if engine is not None:
        env["engine"] = resolve_engine(engine, dev)
    if dev.type == "cuda":
        env["tf32"] = {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
        env["mask_graph"] = use_graph(None, dev, "clipped_sgd", 1)
        env["cudnn_benchmark"] = cudnn_autotune_enabled()
    return env


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


def _finished(done: dict[str, Any], config: Config) -> bool:
    """Whether the results ``done`` are a finished run of ``config`` (all rounds, or a recorded collapse)."""
    complete = len(done.get("rounds", [])) == config.rounds or "collapsed" in done.get("final", {})
    return complete and same_run(done.get("config", {}), config)


def _collapsed_round(fed: Federation, state: State, attack: Any, err: LocalTrainingDiverged, seconds: float):
    """The record of the round in which local training diverged under attack: the server could
    aggregate nothing (``kept`` empty, no FPR/FNR), the global model is the destroyed one."""
    return {"round": err.round, **evaluate(fed, state, attack), "kept": [], "fpr": None, "fnr": None,
            "defense_info": {}, "collapsed": True, "seconds": seconds, "timing": {}}


def _collapse_reason(err: LocalTrainingDiverged) -> str:
    clients = sum(row < err.num_clients for row in err.rows)
    root = " and the server's root update" if err.rows and err.rows[-1] >= err.num_clients else ""
    return (f"local training diverged (NaN or Inf) for {clients} of {err.num_clients} clients{root}: "
            "the attack destroyed the global model")


def _rescore(record: dict[str, Any], num_clients: int) -> None:
    """Without an attack nobody is malicious: FPR over all clients, FNR undefined (``None``)."""
    kept = torch.tensor(record["kept"], dtype=torch.long)
    record.update(detection_rates(kept, torch.empty(0, dtype=torch.long), num_clients))


def _load_checkpoint(ckpt_path: Path, config: Config, code: dict[str, Any], device: torch.device):
    """The checkpoint of this run, or ``None`` (absent, or another run's). Raises
    :class:`ResumeRefused` when it was written by another version of the code."""
    if not ckpt_path.exists():
        return None
    ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
    if not same_run(ckpt.get("config", {}), config):
        return None
    then = ckpt.get("code")
    if then != code:
        def says(v):
            if v is None:
                return "an unknown version (written before versions were recorded)"
            dirty = f" with uncommitted changes {v['git_diff']}" if v.get("git_dirty") else ""
            return f"commit {str(v['git_commit'])[:12]}{dirty} (package {v['package_version']})"

        raise ResumeRefused(
            f"checkpoint {ckpt_path} was written by {says(then)}, this code is {says(code)}; resuming would mix "
            "two code versions in one result. Restart the run from round 0 with --no-resume "
            "(Python: run_experiment(..., resume=False)), or check out the checkpoint's commit to finish it"
        )
    return ckpt


def _save_checkpoint(ckpt_path: Path, content: dict[str, Any]) -> None:
    partial = ckpt_path.with_suffix(".partial")  # atomic: an interrupted save leaves the old checkpoint
    torch.save(content, partial)
    os.replace(partial, ckpt_path)


def _now() -> float:
    return time.perf_counter()


def run_experiment(
    config: Config,
    out: str | os.PathLike | None = None,
    *,
    resume: bool = True,
    progress: bool = True,
    data_root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run ``config`` and return (and, with ``out``, write) its results.

    Everything is checked before any compute: the config, the output path, the checkpoint's code
    version, the data location. With ``resume``, a finished results file of the same run
    (:func:`same_run`) is returned as is, and an interrupted run continues from its checkpoint
    (``<out>.ckpt.pt``, written when the run starts and after every round, removed at the end)
    when the code version is the one that wrote it (else :class:`ResumeRefused`). Without
    ``resume`` the run is computed from round 0 and its file replaced.

    When an attack is present and local training diverges (the attack destroyed the global model),
    the run ends as a result: the rounds so far, the collapsed round and ``final["collapsed"] =
    {round, reason}``. Without an attack the divergence is an error of the recipe
    (:class:`~skymask_lite.fl.LocalTrainingDiverged`).

    With ``attack="none"`` nobody is scored as malicious (``malicious`` empty, FPR over all clients,
    FNR ``None``); training is unchanged (the defense still sees ``num_malicious``), so results
    computed before this rule keep their training and differ only in those scores.
    ``env["wall_seconds"]`` sums every session's time up to its last saved round.
    """
    config.validate()
    out_path = check_output(out) if out is not None else None
    ckpt_path = out_path.with_suffix(".ckpt.pt") if out_path else None
    if resume and out_path and out_path.exists():
        done = json.loads(out_path.read_text())
        if _finished(done, config):
            return done
    started = _now()
    code, device = code_version(), resolve_device(config.device)
    ckpt = _load_checkpoint(ckpt_path, config, code, device) if resume and ckpt_path else None
    locate_dataset(config.dataset, data_root)
    with torch_threads(config.threads):
        return _run(config, out_path, ckpt_path, ckpt, code, started, progress, data_root)


def _run(config, out_path, ckpt_path, ckpt, code, started, progress, data_root) -> dict[str, Any]:
    """The body of :func:`run_experiment`, once everything is checked."""
    torch.manual_seed(config.seed)
    fed, attack, defense = build(config, data_root)
    state, records, earlier, sessions = initial_state(fed), [], 0.0, 1
    if ckpt is not None:
        state, records, defense = ckpt["state"], ckpt["records"], ckpt["defense"]
        earlier, sessions = ckpt["wall_seconds"], ckpt["sessions"] + 1  # the sessions before this one
    attacked, collapsed = attack_present(config), None

    def save() -> None:
        if ckpt_path:
            _save_checkpoint(ckpt_path, {"config": config.to_dict(), "code": code, "state": state, "records": records,
                                         "defense": defense, "wall_seconds": earlier + _now() - started,
                                         "sessions": sessions})

    save()  # the code version is on disk from the start
    bar = tqdm(range(state.round, config.rounds), desc=run_name(config), disable=not progress, initial=state.round,
               total=config.rounds)
    for _ in bar:
        t0 = _now()
        try:
            record = run_round(fed, state, attack, defense)
        except LocalTrainingDiverged as err:
            if not attacked:
                raise
            records.append(_collapsed_round(fed, state, attack, err, _now() - t0))
            collapsed = {"round": err.round, "reason": _collapse_reason(err)}
            break
        if not attacked:
            _rescore(record, fed.num_clients)
        records.append(record)
        save()
    bar.close()
    env = environment(config.device, config.engine, code)
    env["wall_seconds"] = earlier + _now() - started  # all sessions, each up to its last saved round
    env["sessions"] = sessions
    final = summarize(records)
    if collapsed:
        final["collapsed"] = collapsed
    results = {
        "config": config.to_dict(),
        "malicious": fed.malicious.tolist() if attacked else [],
        "rounds": records,
        "final": final,
        "env": env,
    }
    if out_path:
        partial = out_path.with_suffix(".json.partial")
        partial.write_text(json.dumps(results, indent=1))
        os.replace(partial, out_path)
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
    configs: list[Config],
    out_dir: str | os.PathLike = DEFAULT_OUT_DIR,
    *,
    resume: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every config into ``out_dir`` (default ``./results/``), as ``<run_name>.json``: with
    ``resume`` (the default) finished runs are skipped and interrupted ones resumed; without,
    every run is recomputed and its file replaced. Every config and the folder are checked before
    the first run; a run whose model collapses under attack is a result, and the grid goes on."""
    for config in configs:
        config.validate()
    folder = check_output(out_dir, "--out-dir", folder=True)
    return [run_experiment(c, folder / f"{run_name(c)}.json", resume=resume, progress=progress) for c in configs]


def load_results(folder: str | os.PathLike = RESULTS_DIR, **match: Any) -> list[dict[str, Any]]:
    """Every results JSON in ``folder`` (recursively) whose config has the given field values.

    Execution fields (device, engine, threads) in ``match`` are ignored: they are not part of a
    run's identity, so a run computed anywhere matches. A field that a file's config lacks (it was
    written before the field existed) counts as its default."""
    wanted = {k: v for k, v in match.items() if k not in EXECUTION_FIELDS}
    found = []
    for path in sorted(Path(folder).rglob("*.json")):
        result = json.loads(path.read_text())
        if "config" not in result:
            continue
        try:
            config = run_identity(result["config"])
        except TypeError:  # a field this version does not know: compare what the file says
            config = result["config"]
        if all(config.get(k) == v for k, v in wanted.items()):
            found.append(result)
    return found
