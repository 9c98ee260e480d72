"""The GPU acceptance run of skymask-lite: one command, one JSON.

    python benchmarks/gpu_check.py --out-dir benchmarks/results     # on a CUDA machine, < 8 min
    python benchmarks/gpu_check.py --device cpu --quick --out-dir /tmp/check   # the script itself

In order:

0. the mask step replayed as a CUDA graph against the plain loop on the device (logits, losses,
   kept clients); if the capture fails or the kept clients differ, ``SKYMASK_MASK_GRAPH=0``
   switches graphs off for everything that follows, and the report says so;
1. ``benchmarks/run.py --device cuda --rounds 2``, alone on the machine (its JSON and Markdown
   land in ``--out-dir`` as ``benchmark_cuda.*``): the round phases, the engines, ResNet20's
   batched round and SkyMask's server step;
2. then, side by side:

   * every chapter notebook executed top to bottom on the device, each in a fresh Python
     process with ``book/`` as working directory (the cells' code in order, as Jupyter would
     run it; the Colab install cell, tagged ``nbval-skip``, is skipped; the kernel is not
     needed, so IPython line magics are dropped); a chapter that needs an optional extra
     that is not installed (chapter 6: Flower and Ray) is recorded as ``skipped``, with the
     missing packages named;
   * every attack x defense pair for 2 rounds (20 clients, 4 malicious, 6,000 training images)
     through :func:`~skymask_lite.experiments.run_experiment`: ``ok``, ``collapsed`` (the attack
     destroyed the model, recorded as a result) or ``failed`` with the error;
   * ``RECOMPUTE``'s mechanism on the device: a grid computed twice with ``resume=False`` into
     one folder leaves exactly one results file per experiment;
   * the batched and loop engines on the device: the CNN on real Fashion-MNIST (float32) and
     ResNet20 on CIFAR-shaped random images (float64, where rounding does not blow up);
   * with ``--study``, once the matrix is done, studies of :mod:`skymask_lite.studies` pulled
     from one queue by ``--study-workers`` processes until ``--study-deadline`` (or
     ``--end-by``); the runs already in ``--study-dir`` are skipped and the new ones packed
     into ``studies.tar.gz``.

``gpu_check.json`` ends with ``acceptance``: the chapters that ran, failed or were skipped (and
why), whether the matrix has no failure other than recorded collapses, ResNet20's batched round
of 100 clients <= 3 s, SkyMask's server step <= 10% of the batched round.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"


def _display():
    """Jupyter's ``display`` (IPython's where installed, else one that prints the object's repr)."""
    try:
        from IPython.display import display
    except ImportError:
        def display(*objects, **_):
            for obj in objects:
                print(repr(obj))
    return display


def checked_cells(path: Path) -> list[tuple[int, str]]:
    """The code cells the check runs, ``(number, source)`` in order: all but those tagged
    ``nbval-skip`` (the Colab install cells), with IPython's magic and shell lines dropped."""
    out = []
    for number, cell in enumerate(json.loads(path.read_text())["cells"]):
        if cell["cell_type"] != "code" or "nbval-skip" in cell.get("metadata", {}).get("tags", []):
            continue
        lines = "".join(cell["source"]).splitlines()
        out.append((number, "\n".join(line for line in lines if not line.lstrip().startswith(("%", "!")))))
    return out


def execute_notebook(path: Path) -> None:
    """Run a notebook's code cells in order in this process (called in a fresh process)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # also for a chapter that never imports it (e.g. 11 without CIFAR)

    namespace: dict = {"__name__": "__main__", "display": _display()}
    for number, code in checked_cells(path):
        try:
            exec(compile(code, f"{path.name}, cell {number}", "exec"), namespace)
        except Exception:
            print(f"{path.name}: cell {number} failed", file=sys.stderr)
            raise
        plt.close("all")


SIDE_THREADS = "2"  # torch threads of each process that runs beside others (notebooks, study workers)
# a chapter that imports one of these modules needs the packages of an optional extra
EXTRAS = {"skymask_lite.flower": ("flower", ("flwr", "ray"))}


def missing_extra(path: Path) -> str | None:
    """Why ``path`` cannot run here: the extra its code imports and the packages of it that are not
    installed (``None`` when nothing is missing). Flower's simulation needs Ray, whose wheel alone
    is larger than what travels to a device machine that cannot reach a package index."""
    import importlib.util

    code = "\n".join(source for _, source in checked_cells(path))
    for module, (extra, packages) in EXTRAS.items():
        absent = [p for p in packages if importlib.util.find_spec(p) is None]
        if module in code and absent:
            return f"needs the {extra} extra (pip install -e '.[{extra}]'); not installed: {', '.join(absent)}"
    return None


def run_notebooks(timeout: float, pattern: str, at_once: int) -> dict:
    """Every chapter in a subprocess of its own, ``at_once`` at a time; seconds and the error's last lines."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg", "PYTHONHASHSEED": "0",
           "OMP_NUM_THREADS": SIDE_THREADS}

    def one(path: Path) -> tuple[str, dict]:
        start = time.perf_counter()
        missing = missing_extra(path)
        if missing:  # recorded as such, never as a chapter that ran
            return path.name, {"status": "skipped", "seconds": 0.0, "error": [missing]}
        try:
            proc = subprocess.run([sys.executable, __file__, "--execute-notebook", str(path)], cwd=BOOK, env=env,
                                  capture_output=True, text=True, timeout=timeout)
            status = "ok" if proc.returncode == 0 else "failed"
            tail = proc.stderr.strip().splitlines()[-6:] if proc.returncode else []
        except subprocess.TimeoutExpired:
            status, tail = "timeout", [f"stopped after {timeout:.0f} s"]
        return path.name, {"status": status, "seconds": round(time.perf_counter() - start, 1), "error": tail}

    with ThreadPoolExecutor(at_once) as pool:
        return dict(pool.map(one, sorted(BOOK.glob(pattern))))


@functools.lru_cache(maxsize=None)
def _cached_dataset(name: str, root=None):
    from skymask_lite.data import load_dataset

    return load_dataset(name, root)


def attack_defense_matrix(device: str, quick: bool, budget: float) -> dict:
    """Every registered attack x defense for 2 rounds; the dataset is parsed once (cached)."""
    from skymask_lite.attacks import ATTACKS
    from skymask_lite.defenses import DEFENSES
    from skymask_lite.experiments import Config, run_experiment
    from skymask_lite.fl import resolve_engine

    base = Config(num_clients=20, num_malicious=4, train_size=3000 if quick else 6000, rounds=2, device=device,
                  engine=resolve_engine("auto", device))
    cells, start = {}, time.perf_counter()
    with mock.patch("skymask_lite.experiments.load_dataset", _cached_dataset):
        for attack in ATTACKS:
            for defense in DEFENSES:
                key = f"{attack} x {defense}"
                if time.perf_counter() - start > budget:
                    cells[key] = {"status": "not run (time budget)"}
                    continue
                t0 = time.perf_counter()
                try:
                    config = dataclasses.replace(base, attack=attack, defense=defense)
                    result = run_experiment(config, progress=False)
                    collapsed = result["final"].get("collapsed")
                    cells[key] = {"status": "collapsed" if collapsed else "ok", "test_acc": result["final"]["test_acc"],
                                  **({"collapsed": collapsed} if collapsed else {})}
                except Exception as err:  # recorded, the matrix goes on
                    cells[key] = {"status": "failed", "error": f"{type(err).__name__}: {err}"[:400]}
                cells[key]["seconds"] = round(time.perf_counter() - t0, 2)
    return cells


def recompute_check(device: str) -> dict:
    """RECOMPUTE = True recomputes (resume=False) and the folder still holds one file per run."""
    from skymask_lite.experiments import Config, load_results, run_grid
    from skymask_lite.fl import resolve_engine

    configs = [Config(num_clients=10, num_malicious=2, train_size=3000, rounds=2, attack="min_max", defense=rule,
                      device=device, engine=resolve_engine("auto", device)) for rule in ("fedavg", "skymask")]
    with tempfile.TemporaryDirectory() as folder, mock.patch("skymask_lite.experiments.load_dataset", _cached_dataset):
        first = run_grid(configs, folder, resume=False, progress=False)
        second = run_grid(configs, folder, resume=False, progress=False)
        files = sorted(p.name for p in Path(folder).glob("*.json"))
        loaded = load_results(folder)
    recomputed = all(a["env"] != b["env"] or a["rounds"][0]["seconds"] != b["rounds"][0]["seconds"]
                     for a, b in zip(first, second))
    return {"files": files, "one_file_per_run": len(files) == len(configs) == len(loaded), "recomputed": recomputed,
            "device_recorded": sorted({r["env"]["device"] for r in loaded})}


def engine_agreement(device: str) -> dict:
    """Batched against loop on the device: max relative row error of the updates (and buffers)."""
    from skymask_lite.experiments import Config, build
    from skymask_lite.fl import LocalRecipe, initial_state, train_clients
    from skymask_lite.models import flatten_params, float_buffers, make_model

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-30)).max())

    out = {}
    with mock.patch("skymask_lite.experiments.load_dataset", _cached_dataset):
        fed, _, _ = build(Config(num_clients=10, train_size=3000, device=device, engine="loop"))
    state = initial_state(fed)
    seeds = list(range(fed.num_clients))
    loop, _ = train_clients(fed.net, state.params, fed.client_data, fed.recipe, seeds, engine="loop")
    batched, _ = train_clients(fed.net, state.params, fed.client_data, fed.recipe, seeds, engine="batched")
    out["cnn_fmnist_float32"] = {"max_relative_error": rel(batched, loop)}
    net = make_model("resnet20", "cifar10").to(device, torch.float64)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(m, 3, 32, 32, generator=g, dtype=torch.float64).to(device),
             torch.randint(0, 10, (m,), generator=g).to(device)) for m in (40, 27, 16, 9)]
    recipe = LocalRecipe(lr=0.05, batch_size=8, epochs=1)
    w, buffers = flatten_params(net), float_buffers(net)
    loop, loop_buf = train_clients(net, w, data, recipe, [0, 1, 2, 3], buffers, engine="loop")
    batched, batched_buf = train_clients(net, w, data, recipe, [0, 1, 2, 3], buffers, engine="batched")
    out["resnet20_float64"] = {"max_relative_error": rel(batched, loop),
                               "max_buffer_error": max(float((batched_buf[k] - loop_buf[k]).abs().max()) for k in buffers)}
    return out


STUDY_WORKER = """
import os, sys
from pathlib import Path
from skymask_lite.config import run_name
from skymask_lite.experiments import run_grid
from skymask_lite.studies import study_queue
for name, config in study_queue(sys.argv[1].split(","), seed_first=sys.argv[3] == "seed-first"):
    folder = Path(sys.argv[2]) / name
    folder.mkdir(parents=True, exist_ok=True)
    stem = run_name(config)
    if (folder / f"{stem}.json").exists():
        continue
    try:  # claim the run: the first worker to create the file computes it
        os.close(os.open(folder / f".claim-{stem}", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        continue
    run_grid([config], folder, progress=False)
"""


def start_studies(names: list[str], folder: Path, workers: int, deadline: float,
                  seed_first: bool = False) -> list[subprocess.Popen]:
    """The studies ``names`` (:mod:`skymask_lite.studies`) as one queue, in the given order, each
    study's runs in its own order (``seed_first``: every seed 0 first, :func:`study_queue`),
    pulled by ``workers`` processes (a run is claimed by the first worker that reaches it);
    every process is stopped after ``deadline`` seconds (finished runs stay). Runs already in ``folder/<study>/`` (copy the committed ones in) are skipped."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": SIDE_THREADS}
    for name in names:  # claims of an earlier, stopped queue
        for claim in (folder / name).glob(".claim-*"):
            claim.unlink()
    return [subprocess.Popen(["timeout", str(int(deadline)), sys.executable, "-c", STUDY_WORKER, ",".join(names),
                              str(folder), "seed-first" if seed_first else "study"], cwd=ROOT, env=env)
            for _ in range(workers)]


def pack_studies(names: list[str], folder: Path, before: dict[str, set[str]], out: Path) -> dict:
    """The runs each study gained, packed as one ``out`` archive (paths ``<study>/<file>.json``)."""
    new = {name: sorted(p.name for p in (folder / name).glob("*.json") if p.name not in before[name])
           for name in names}
    files = [f"{name}/{file}" for name, names_ in new.items() for file in names_]
    if files:
        subprocess.run(["tar", "czf", str(out), *files], cwd=folder, check=True)
    return {name: {"new_runs": len(runs), "runs": runs} for name, runs in new.items()}


def graph_check(device: str) -> dict:
    """The mask step replayed as a CUDA graph against the plain loop on the device (real FMNIST
    updates, 20 steps), for two problems in a row, as two rounds: four colluders, then five
    others; the second, after a round of client training, replays the graph captured for the
    first with its own inputs copied in (the version at 94c8225, whose kept graph lost its
    scratch tensors, passed the check as it ran then, probably because the plain loop between
    the two graph calls allocated the same buffers again; not run on a GPU since).
    The kept clients must agree in both; the logits and losses are reported, not required equal
    (the GPU's convolution backward is not bit-deterministic). Every loop is timed after a
    warm-up call of the plain loop (at commit b2d7968 the plain loop was timed cold)."""
    from skymask_lite._mask_kernels import CAPTURED, GRAPH_ENV, use_graph
    from skymask_lite.experiments import Config, build
    from skymask_lite.fl import initial_state, round_updates
    from skymask_lite.skymask import binarize, cluster_masks, stack_models, train_masks

    if not use_graph(None, torch.device(device), "clipped_sgd", 1):
        return {"status": "not used", "why": f"device {device} or {GRAPH_ENV}=0"}
    with mock.patch("skymask_lite.experiments.load_dataset", _cached_dataset):
        fed, _, _ = build(Config(num_clients=20, train_size=6000, device=device, engine="batched"))
    state = initial_state(fed)
    honest, _, g0 = round_updates(fed, state, with_root_update=True)
    first, second = honest.clone(), honest.clone()
    first[:4] = -3 * honest[4:].mean(dim=0)  # four colluders
    second[-5:] = -2 * honest[:-5].mean(dim=0)  # the next round: five others
    CAPTURED.clear()
    train_masks(fed.net, stack_models(state.params, first, g0), *fed.root, buffers=state.buffers, graph=False)
    report: dict = {"status": "ok"}
    for name, updates, order in (("first", first, (False, True)), ("reused", second, (True, False))):
        if name == "reused":  # a round of client training in between, as in a run: its allocations
            round_updates(fed, state)  # take over any memory the kept graph still uses
        models = stack_models(state.params, updates, g0)
        out, kept = {}, {}
        for graph in order:  # the kept graph replays before the plain loop reallocates its buffers
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits, losses = train_masks(fed.net, models, *fed.root, buffers=state.buffers, graph=graph)
            torch.cuda.synchronize()
            out[graph] = (logits, losses, time.perf_counter() - t0)
            kept[graph] = cluster_masks(binarize(logits))[0].tolist()
        report[name] = {"max_abs_logit_difference": float((out[True][0] - out[False][0]).abs().max()),
                        "losses_equal": out[True][1] == out[False][1], "kept_equal": kept[True] == kept[False],
                        "kept": len(kept[True]), "steps": len(out[True][1]),
                        "seconds_plain": round(out[False][2], 4), "seconds_graph": round(out[True][2], 4)}
    report["kept_equal"] = report["first"]["kept_equal"] and report["reused"]["kept_equal"]
    return report


def _guarded(name: str, fn, *args) -> dict:
    """Run one part; a crash is recorded with its traceback instead of ending the check."""
    start = time.perf_counter()
    try:
        result = fn(*args)
    except Exception:
        result = {"status": "crashed", "error": traceback.format_exc().splitlines()[-8:]}
    print(f"[gpu_check] {name}: {time.perf_counter() - start:.1f} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and sizes (checks the script on a CPU)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--skip-benchmark", action="store_true")
    parser.add_argument("--chapters", default="*.ipynb", help="glob of the notebooks under book/ to execute")
    parser.add_argument("--study", nargs="*", default=[],
                        help="also run these studies of skymask_lite.studies, one queue in this order; "
                             "the new runs are packed as <out-dir>/studies.tar.gz")
    parser.add_argument("--seed-first", action="store_true",
                        help="the studies' seed 0 runs before any seed 1 (whole one-seed tables if cut short)")
    parser.add_argument("--study-workers", type=int, default=3, help="processes pulling the studies' runs")
    parser.add_argument("--study-dir", type=Path, default=ROOT / "data" / "results",
                        help="folder of the study folders; their runs are skipped, the new ones packed")
    parser.add_argument("--skip-checks", action="store_true", help="no matrix, RECOMPUTE or engine checks")
    parser.add_argument("--study-deadline", type=float, default=300, help="seconds the study may run")
    parser.add_argument("--end-by", type=float, help="the studies stop this many seconds after the check started "
                        "(at the latest; --study-deadline still applies), so the check ends inside a time limit")
    parser.add_argument("--benchmark-timeout", type=float, default=270, help="seconds benchmarks/run.py may take")
    parser.add_argument("--notebook-timeout", type=float, default=240, help="seconds a chapter may take")
    parser.add_argument("--matrix-budget", type=float, default=150, help="seconds for the attack x defense pairs")
    parser.add_argument("--commit", help="the commit checked, where the copy has no git history")
    parser.add_argument("--execute-notebook", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.execute_notebook:
        execute_notebook(args.execute_notebook)
        return
    sys.path.insert(0, str(ROOT))
    from skymask_lite.experiments import code_version, environment

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: CUDA is not available here; run on a GPU machine, or pass --device cpu --quick")
    problem = commit_mismatch(args.commit, code_version())
    if problem:
        sys.exit(f"error: {problem}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report: dict = {"env": environment(args.device)}
    if args.commit:
        report["env"].update(git_commit=args.commit, git_dirty=None)
    report["mask_graph"] = _guarded("mask graph", graph_check, args.device)
    if report["mask_graph"].get("status") == "crashed" or not report["mask_graph"].get("kept_equal", True):
        from skymask_lite._mask_kernels import GRAPH_ENV

        os.environ[GRAPH_ENV] = "0"  # recorded: every process started from here runs the plain loop
        report["mask_graph"]["switched_off"] = True
    if not args.skip_benchmark:
        bench = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--device", args.device, "--rounds", "2",
                 "--out", str(args.out_dir)] + (["--quick"] if args.quick else [])
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(bench, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                                  text=True, timeout=args.benchmark_timeout)
            code, error = proc.returncode, proc.stderr.strip().splitlines()[-8:] if proc.returncode else []
        except subprocess.TimeoutExpired:
            code, error = None, [f"stopped after {args.benchmark_timeout:.0f} s"]
        report["benchmark"] = {"returncode": code, "seconds": round(time.perf_counter() - t0, 1), "error": error}
        print(f"[gpu_check] benchmark: {report['benchmark']['seconds']} s, rc {code}", flush=True)
    before = {name: {p.name for p in (args.study_dir / name).glob("*.json")} for name in args.study}
    out_json = args.out_dir / ("gpu_check_quick.json" if args.quick else "gpu_check.json")

    def save() -> None:  # after every part, so that a run stopped from outside still leaves its report
        out_json.write_text(json.dumps(report, indent=1))

    save()
    with ThreadPoolExecutor(1) as pool:
        notebooks = pool.submit(run_notebooks, 600 if args.quick else args.notebook_timeout, args.chapters,
                                2 if args.quick else 8)
        if not args.skip_checks:
            report["recompute"] = _guarded("recompute", recompute_check, args.device)
            save()
            report["engine_agreement"] = _guarded("engines", engine_agreement, args.device)
            save()
            report["matrix"] = _guarded("matrix", attack_defense_matrix, args.device, args.quick, args.matrix_budget)
            save()
        # the studies start after the checks: beside 12 study processes the matrix once ran 87
        # of its 132 pairs within its budget; the chapters may still be running beside them
        deadline = args.study_deadline
        if args.end_by is not None:
            deadline = min(deadline, args.end_by - (time.perf_counter() - start))
        study = (start_studies(args.study, args.study_dir, args.study_workers, deadline, args.seed_first)
                 if args.study and deadline > 0 else [])
        report["notebooks"] = notebooks.result()
    for proc in study:
        proc.wait()
    if args.study:
        report["studies"] = pack_studies(args.study, args.study_dir, before, args.out_dir / "studies.tar.gz")
    report["study_returncodes"] = [p.returncode for p in study]
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["acceptance"] = acceptance(report, args.out_dir / f"benchmark_{'quick' if args.quick else args.device.split(':')[0]}.json")
    save()
    print(json.dumps(report["acceptance"], indent=1))


def commit_mismatch(commit: str | None, code: dict) -> str | None:
    """Why ``--commit`` and the copy's own git history disagree, or ``None``.

    Every results file records the commit its process finds in git (``code_version``), not
    ``--commit``: a stale ``.git`` left on the machine by an earlier copy would stamp every run
    with the wrong commit (it happened once: the runs said 5ba5561, the code was 1e3324a).
    """
    if commit is None or code["git_commit"] is None:
        return None  # nothing to compare: no --commit, or no git history at all
    if not code["git_commit"].startswith(commit) and not commit.startswith(code["git_commit"]):
        return (f"--commit {commit[:12]} but this copy's git says {code['git_commit'][:12]}; every run "
                "would record the latter. Remove the stale .git (or pass the right --commit)")
    if code["git_dirty"]:
        return (f"this copy differs from commit {code['git_commit'][:12]} in the package's tracked files; "
                "every run would record uncommitted changes. Check out the commit cleanly")
    return None


def acceptance(report: dict, benchmark_path: Path) -> dict:
    """The four acceptance checks of the GPU issue, from the report and the benchmark JSON."""
    matrix = report.get("matrix", {})
    if "benchmark" not in report:
        benchmark_path = Path("/nonexistent")
    failures = sorted(k for k, v in matrix.items() if isinstance(v, dict) and v.get("status") == "failed")
    out = {
        "chapters_ok": sorted(k for k, v in report["notebooks"].items() if v["status"] == "ok"),
        "chapters_failed": sorted(k for k, v in report["notebooks"].items() if v["status"] not in ("ok", "skipped")),
        "chapters_skipped": {k: v["error"][0] for k, v in report["notebooks"].items() if v["status"] == "skipped"},
        "matrix_cells": len(matrix),
        "matrix_collapsed": sorted(k for k, v in matrix.items() if isinstance(v, dict) and v.get("status") == "collapsed"),
        "matrix_failures": failures,
        "matrix_not_run": sorted(k for k, v in matrix.items() if isinstance(v, dict) and v.get("status", "").startswith("not run")),
    }
    if benchmark_path.exists():
        bench = json.loads(benchmark_path.read_text())
        rr = bench.get("resnet20_round", {})
        out["resnet20_round_seconds"] = rr.get("seconds")
        out["resnet20_round_clients"] = rr.get("clients")
        out["resnet20_round_ok"] = rr.get("clients") == 100 and rr.get("seconds", 1e9) <= 3.0
        out["skymask_server_share"] = bench.get("skymask_server_share_at_100")
        out["skymask_share_ok"] = (bench.get("skymask_server_share_at_100") or 1.0) <= 0.10
    return out


if __name__ == "__main__":
    main()
