"""Speed of skymask-lite: one command, a JSON and a Markdown table under benchmarks/results/.

    python benchmarks/run.py                 # the full benchmark on this machine's CPU
    python benchmarks/run.py --device cuda   # the same on a GPU
    python benchmarks/run.py --quick         # tiny sizes, to check the script itself

Measures, on real Fashion-MNIST (100 clients x ~600 images, the paper's CNN, 1 local epoch):

1. seconds per round split into client training, attack, aggregation and evaluation, for
   FedAvg, FLTrust, Multi-Krum, FLAME and SkyMask (Min-Max attack, 20 malicious);
2. our round (the ``parallel`` client engine on a CPU, ``batched`` on a GPU) against a
   straightforward per-client loop with a DataLoader and torch.optim.SGD, side by side in this
   run (``round_speedup_vs_dataloader_loop``);
3. the loop, parallel and batched (torch.func) client engines;
4. SkyMask's server step (mask training + clustering) as ``n`` grows (20, 100, 200, 500) and as
   ``d`` grows (logistic regression, CNN, ResNet20), with time (fastest of 3 runs) and peak
   memory, each point in a fresh process, and a least-squares fit ``t = a + b n`` (and the
   log-log slope).
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from skymask_lite.attacks import make_attack
from skymask_lite.defenses import make_defense
from skymask_lite.experiments import Config, build, environment
from skymask_lite.fl import Federation, LocalRecipe, cudnn_autotune_enabled, initial_state, resolve_engine, run_round, train_clients, train_root
from skymask_lite.models import flatten_params, load_flat, make_model
from skymask_lite.skymask import skymask

OUT = Path(__file__).resolve().parent / "results"
SERVER_STEP_REPEATS = 3


def dataloader_round(fed, state) -> float:
    """The straightforward baseline: per client, deepcopy the model, DataLoader, optim.SGD; then
    FedAvg and a DataLoader evaluation. Returns its wall time."""
    start = time.perf_counter()
    updates = []
    for i, (x, y) in enumerate(fed.client_data):
        model = copy.deepcopy(fed.net)
        load_flat(model, state.params)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=fed.recipe.lr)
        loader = DataLoader(TensorDataset(x, y), batch_size=fed.recipe.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(i))
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        updates.append(flatten_params(model) - state.params)
    params = state.params + torch.stack(updates).mean(dim=0)
    model = copy.deepcopy(fed.net)
    load_flat(model, params)
    model.eval()
    with torch.no_grad():
        correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in DataLoader(TensorDataset(*fed.test), batch_size=1000))
    assert correct > 0
    return time.perf_counter() - start


def root_update_seconds(fed, state, repeats: int) -> float:
    """The server's root update g0 trained alone, as the server would after the updates arrive
    (fastest of ``repeats``); ``run_round`` trains it alongside the clients instead."""
    steps = fed.root_update_steps
    times = []
    for seed in range(repeats):
        start = time.perf_counter()
        train_root(fed.net, state.params, *fed.root, fed.recipe, steps, seed, state.buffers)
        times.append(time.perf_counter() - start)
    return round(min(times), 3)


def federation(device: str, quick: bool) -> Config:
    """The benchmark's federation: 100 clients, 20 of them Min-Max attackers, all of
    Fashion-MNIST (``quick``: 20 clients, 4 attackers, 6,000 images); the defense and engine are
    set by each measurement (here and in ``server_share.py``)."""
    return Config(num_clients=20 if quick else 100, num_malicious=4 if quick else 20, attack="min_max",
                  train_size=6000 if quick else None, device=device)


def round_phases(device: str, quick: bool, rounds: int) -> dict:
    """Seconds per round by phase for each rule and engine, and the DataLoader baseline side by side."""
    base = federation(device, quick)
    table: dict[str, dict] = {}
    for engine in ("loop", resolve_engine("auto", device)):
        for rule in ("fedavg", "skymask") if quick else ("fedavg", "fltrust", "multi_krum", "flame", "skymask"):
            fed, attack, defense = build(Config(**{**base.__dict__, "defense": rule, "engine": engine}))
            state = initial_state(fed)
            records = [run_round(fed, state, attack, defense) for _ in range(rounds)]
            best = min(records, key=lambda r: r["seconds"])  # the least disturbed round
            table.setdefault(engine, {})[rule] = {**{k: round(v, 3) for k, v in best["timing"].items()},
                                                  "total": round(best["seconds"], 3)}
    root_update = root_update_seconds(fed, state, rounds)
    # FedAvg without attack, ours and the baseline alternating, so that both see the same machine
    fed, attack, defense = build(Config(**{**base.__dict__, "attack": "none", "num_malicious": 0,
                                           "engine": resolve_engine("auto", device)}))
    state = initial_state(fed)
    ours, baseline = [], []
    for _ in range(rounds):
        ours.append(run_round(fed, state, attack, defense)["seconds"])
        baseline.append(dataloader_round(fed, state))
    setup = f"{base.num_clients} clients" + (f", {base.train_size} training examples" if base.train_size else "")
    return {"setup": setup, "engine": resolve_engine("auto", device), "phases": table, "root_update_seconds": root_update,
            "fedavg_round_seconds": [round(t, 3) for t in ours],
            "dataloader_round_seconds": [round(t, 3) for t in baseline]}


def engines(device: str, quick: bool) -> dict:
    """Client training of one round with each engine (same updates, see tests/test_fl.py)."""
    fed, _, _ = build(Config(num_clients=20 if quick else 100, train_size=6000 if quick else None, device=device))
    state = initial_state(fed)
    seeds = list(range(fed.num_clients))
    out = {}
    for engine in ("loop", "parallel", "batched") if device == "cpu" else ("loop", "batched"):
        start = time.perf_counter()
        train_clients(fed.net, state.params, fed.client_data, fed.recipe, seeds, state.buffers, engine)
        out[engine] = round(time.perf_counter() - start, 3)
    return out


def resnet_round(device: str, quick: bool, rounds: int) -> dict:
    """A FedAvg round of ResNet20 (BatchNorm) on CIFAR-shaped synthetic data: 500 random 3x32x32
    images per client (CIFAR-10's 50,000 over 100 clients), the fast engine, fastest of ``rounds``.

    Random images cost the same as real ones; CIFAR itself cannot be downloaded here. On a CPU a
    round of 100 clients takes many minutes, so the CPU measures 10 clients (``clients`` says
    how many) and ``seconds_per_client`` scales it. On CUDA the round is timed again with the
    other cuDNN setting (``seconds_other_cudnn_setting``; the engine lets cuDNN time its
    convolution algorithms by default, ``SKYMASK_CUDNN_BENCHMARK``).
    """
    clients = 4 if quick else (10 if device == "cpu" else 100)
    per_client = 50 if quick else 500
    g = torch.Generator().manual_seed(0)
    net = make_model("resnet20", "cifar10").to(device)
    data = [(torch.randn(per_client, 3, 32, 32, generator=g).to(device),
             torch.randint(0, 10, (per_client,), generator=g).to(device)) for _ in range(clients)]
    test = (torch.randn(1000, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (1000,), generator=g).to(device))
    engine = resolve_engine("auto", device)
    fed = Federation(net, data, test=test, root=test, malicious=torch.tensor([], dtype=torch.long), num_classes=10,
                     recipe=LocalRecipe(lr=0.1, batch_size=16, epochs=1), engine=engine)
    attack, defense = make_attack("none"), make_defense("fedavg")

    def fastest_round() -> float:
        state = initial_state(fed)
        run_round(fed, state, attack, defense)  # warm-up (kernel selection, allocator)
        return min(run_round(fed, state, attack, defense)["seconds"] for _ in range(rounds))

    seconds = fastest_round()  # as the engine runs by default
    out = {"engine": engine, "clients": clients, "images_per_client": per_client, "d": len(flatten_params(net)),
           "seconds": round(seconds, 3), "seconds_per_client": round(seconds / clients, 4)}
    if torch.device(device).type == "cuda":  # the same round with cuDNN's default algorithms
        out["cudnn_benchmark"] = cudnn_autotune_enabled()
        before = os.environ.get("SKYMASK_CUDNN_BENCHMARK")
        os.environ["SKYMASK_CUDNN_BENCHMARK"] = "0" if out["cudnn_benchmark"] else "1"
        try:
            out["seconds_other_cudnn_setting"] = round(fastest_round(), 3)
        finally:
            if before is None:
                del os.environ["SKYMASK_CUDNN_BENCHMARK"]
            else:
                os.environ["SKYMASK_CUDNN_BENCHMARK"] = before
    return out


def _rss_mb(field: str) -> float | None:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process in MB, Linux only."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); ``ru_maxrss`` cannot be reset and is
    inherited through fork + exec, so it would report the parent's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _server_step(args: tuple[str, int, str, int]) -> dict:
    """SkyMask's server step for ``n`` synthetic client models around a random global model;
    20 mask steps (no early stop), the fastest of ``SERVER_STEP_REPEATS`` runs. Runs in a fresh
    process; memory is the growth of the peak resident set (CPU) or of the peak allocated CUDA
    memory during the first run."""
    model, n, device, threads = args
    torch.set_num_threads(threads)
    dataset = "cifar10" if model == "resnet20" else "fmnist"
    net = make_model(model, dataset).to(device)
    w = flatten_params(net)
    g = torch.Generator().manual_seed(n)
    updates = (0.01 * torch.randn(n, len(w), generator=g)).to(device)
    shape = (3, 32, 32) if dataset == "cifar10" else (1, 28, 28)
    root_x, root_y = torch.randn(100, *shape, generator=g).to(device), torch.randint(0, 10, (100,), generator=g).to(device)
    buffers = {k: v.detach().clone() for k, v in net.named_buffers() if v.is_floating_point()}
    skymask(updates[:2], net=net, global_params=w, global_buffers=buffers, root_x=root_x, root_y=root_y,
            root_update=updates[0], steps=2)  # warm-up: library pages and allocator pools are not the step's memory
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        _reset_peak_rss()
        before = _rss_mb("VmRSS")
    runs = []
    for _ in range(SERVER_STEP_REPEATS):
        start = time.perf_counter()
        agg = skymask(updates, net=net, global_params=w, global_buffers=buffers, root_x=root_x, root_y=root_y,
                      root_update=updates[0], patience=10**6)
        if cuda:
            torch.cuda.synchronize()
        runs.append((time.perf_counter() - start, agg.info["mask_seconds"], agg.info["cluster_seconds"]))
        if len(runs) == 1:  # the peak of the first run: later runs reuse freed pages
            peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mb("VmHWM")
    seconds, mask_seconds, cluster_seconds = min(runs)
    growth = None if peak is None or before is None else round(peak - before, 1)
    return {"model": model, "n": n, "d": len(w), "seconds": round(seconds, 3),
            "mask_seconds": round(mask_seconds, 3), "cluster_seconds": round(cluster_seconds, 3),
            "peak_memory_growth_mb": growth, "matrix_mb": round(4 * (n + 1) * len(w) / 2**20, 1)}


def scaling(device: str, quick: bool) -> dict:
    """SkyMask server time and memory versus n (CNN) and versus d (n = 100)."""
    threads = torch.get_num_threads()
    ns = (10, 20, 40) if quick else (20, 100, 200, 500)
    ctx = mp.get_context("spawn")
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        by_n = pool.map(_server_step, [("cnn", n, device, threads) for n in ns], chunksize=1)
        by_d = pool.map(_server_step, [(m, 20 if quick else 100, device, threads) for m in ("lr", "cnn", "resnet20")], chunksize=1)
    n = np.array([r["n"] for r in by_n], dtype=float)
    t = np.array([r["seconds"] for r in by_n])
    slope, intercept = np.polyfit(n, t, 1)
    residual = t - (intercept + slope * n)
    r2 = 1 - (residual ** 2).sum() / ((t - t.mean()) ** 2).sum()
    loglog = np.polyfit(np.log(n), np.log(t), 1)[0]
    fit = {"seconds_per_client": round(float(slope), 4), "intercept_seconds": round(float(intercept), 3),
           "r2_linear": round(float(r2), 4), "loglog_exponent": round(float(loglog), 3)}
    return {"by_n": by_n, "by_d": by_d, "fit_n": fit}


def markdown(result: dict) -> str:
    r = result["rounds"]
    lines = [f"# skymask-lite benchmark ({result['env']['device']}, {result['env']['threads']} threads)", "",
             f"## Seconds per round ({r['setup']}, CNN, Fashion-MNIST, Min-Max, 20% attackers)", "",
             "| engine | rule | clients | attack | aggregation | evaluation | total |", "|---|---|---|---|---|---|---|"]
    for engine, phases in r["phases"].items():
        for rule, p in phases.items():
            lines.append(f"| {engine} | {rule} | {p['clients']:.2f} | {p['attack']:.2f} | {p['defense']:.2f} | "
                         f"{p['eval']:.2f} | {p['total']:.2f} |")
    ours, base = min(r["fedavg_round_seconds"]), min(r["dataloader_round_seconds"])
    lines += ["", f"FedAvg round without attack, {r['engine']} engine: {ours:.2f} s; a per-client DataLoader loop with "
              f"`torch.optim.SGD`: {base:.2f} s (fastest of {len(r['fedavg_round_seconds'])} alternating rounds each): "
              f"**{result['round_speedup_vs_dataloader_loop']:.2f}x**.", ""]
    for engine, share in result["skymask_server_share_by_engine"].items():
        lines.append(f"SkyMask's server step (masks and clustering, after the updates arrive) with the {engine} engine: "
                     f"**{100 * share:.1f}%** of its round.")
    root, p = r["root_update_seconds"], r["phases"][r["engine"]]["skymask"]
    lines += ["", f"The server's root update g0 is trained alongside the clients (it needs only the global model and "
              f"the root data), so it is in the clients' column. Trained alone it takes {root:.2f} s; trained after "
              f"the updates arrive it would make the server step about "
              f"{100 * (p['defense'] + root) / (p['total'] + root):.1f}% of the {r['engine']} round."]
    rr = result.get("resnet20_round")
    if rr:
        lines += ["", "## ResNet20 (BatchNorm), CIFAR-shaped data: one FedAvg round", "",
                  f"{rr['clients']} clients x {rr['images_per_client']} images, {rr['engine']} engine: "
                  f"**{rr['seconds']:.2f} s** ({rr['seconds_per_client']:.3f} s per client)."]
        if "seconds_other_cudnn_setting" in rr:
            timed, default = "algorithms timed by cuDNN", "cuDNN's default algorithms"
            setting, other = (timed, default) if rr["cudnn_benchmark"] else (default, timed)
            lines[-1] += f" Convolutions: {setting}; with {other}: {rr['seconds_other_cudnn_setting']:.2f} s."
    lines += ["", "## Client engines (one round of client training)", "", "| engine | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in result["engines"].items()]
    lines += ["", "## SkyMask server step versus n (CNN) and d (n = 100)", "",
              "| model | n | d | seconds | masks | clustering | peak memory growth MB | one (n+1) x d float matrix, MB |",
              "|---|---|---|---|---|---|---|---|"]
    for row in result["scaling"]["by_n"] + result["scaling"]["by_d"]:
        lines.append(f"| {row['model']} | {row['n']} | {row['d']} | {row['seconds']:.2f} | {row['mask_seconds']:.2f} | "
                     f"{row['cluster_seconds']:.2f} | {row['peak_memory_growth_mb']} | {row['matrix_mb']:.0f} |")
    f = result["scaling"]["fit_n"]
    lines += ["", f"Fit: t = {f['intercept_seconds']:.3f} + {f['seconds_per_client']:.4f} n s (R² = {f['r2_linear']:.3f}); "
              f"log-log slope {f['loglog_exponent']:.2f}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (checks the script)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per measurement; the fastest is reported")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rounds = round_phases(args.device, args.quick, args.rounds)
    shares = {engine: round(p["skymask"]["defense"] / p["skymask"]["total"], 4) for engine, p in rounds["phases"].items()}
    result = {
        "round_speedup_vs_dataloader_loop": round(min(rounds["dataloader_round_seconds"]) / min(rounds["fedavg_round_seconds"]), 3),
        "skymask_server_share_at_100": shares[rounds["engine"]],
        "skymask_server_share_by_engine": shares,
        "rounds": rounds,
        "engines": engines(args.device, args.quick),
        "resnet20_round": resnet_round(args.device, args.quick, args.rounds),
        "scaling": scaling(args.device, args.quick),
        "env": {**environment(args.device), "machine": platform.machine(), "quick": args.quick},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "benchmark_quick" if args.quick else f"benchmark_{args.device.split(':')[0]}"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
