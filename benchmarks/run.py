"""Speed of skymask-lite: one command, a JSON and a Markdown table under benchmarks/results/.

    python benchmarks/run.py                 # the full benchmark on this machine's CPU
    python benchmarks/run.py --device cuda   # the same on a GPU
    python benchmarks/run.py --quick         # tiny sizes, to check the script itself

Measures, on real Fashion-MNIST (100 clients x ~600 images, the paper's CNN, 1 local epoch):

1. seconds per round split into client training, attack, aggregation and evaluation, for
   FedAvg, FLTrust, Multi-Krum, FLAME and SkyMask (Min-Max attack, 20 malicious);
2. our round against a straightforward per-client loop with a DataLoader and torch.optim.SGD,
   side by side in this run (``round_speedup_vs_dataloader_loop``);
3. the loop and batched (torch.func) client engines;
4. SkyMask's server step (mask training + clustering) as ``n`` grows (20, 100, 200, 500) and as
   ``d`` grows (logistic regression, CNN, ResNet20), with time and peak memory, each point in
   a fresh process, and a least-squares fit ``t = a + b n`` (and the log-log slope).
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from skymask_lite.experiments import Config, build, environment
from skymask_lite.fl import initial_state, run_round, train_clients
from skymask_lite.models import flatten_params, load_flat, make_model
from skymask_lite.skymask import skymask

OUT = Path(__file__).resolve().parent / "results"


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


def round_phases(device: str, quick: bool, rounds: int) -> dict:
    """Seconds per round by phase for each rule, and the DataLoader baseline side by side."""
    base = Config(num_clients=20 if quick else 100, num_malicious=4 if quick else 20, attack="min_max",
                  train_size=6000 if quick else None, device=device)
    table = {}
    for rule in ("fedavg", "fltrust", "multi_krum", "flame", "skymask"):
        fed, attack, defense = build(Config(**{**base.__dict__, "defense": rule}))
        state = initial_state(fed)
        records = [run_round(fed, state, attack, defense) for _ in range(rounds)]
        last = records[-1]  # after warm-up
        table[rule] = {**{k: round(v, 3) for k, v in last["timing"].items()}, "total": round(last["seconds"], 3)}
    fed, attack, defense = build(Config(**{**base.__dict__, "attack": "none", "num_malicious": 0}))
    state = initial_state(fed)
    ours = min(run_round(fed, state, attack, defense)["seconds"] for _ in range(rounds))
    baseline = min(dataloader_round(fed, state) for _ in range(rounds))
    setup = f"{base.num_clients} clients" + (f", {base.train_size} training examples" if base.train_size else "")
    return {"setup": setup, "phases": table, "fedavg_round_seconds": round(ours, 3),
            "dataloader_round_seconds": round(baseline, 3)}


def engines(device: str, quick: bool) -> dict:
    """Client training of one round with each engine (same updates, see tests/test_fl.py)."""
    fed, _, _ = build(Config(num_clients=20 if quick else 100, train_size=6000 if quick else None, device=device))
    state = initial_state(fed)
    seeds = list(range(fed.num_clients))
    out = {}
    for engine in ("loop", "batched"):
        start = time.perf_counter()
        train_clients(fed.net, state.params, fed.client_data, fed.recipe, seeds, state.buffers, engine)
        out[engine] = round(time.perf_counter() - start, 3)
    return out


def _server_step(args: tuple[str, int, str, int]) -> dict:
    """SkyMask's server step for ``n`` synthetic client models around a random global model;
    20 mask steps (no early stop). Runs in a fresh process so ``ru_maxrss`` is its own peak."""
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
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    agg = skymask(updates, net=net, global_params=w, global_buffers=buffers, root_x=root_x, root_y=root_y,
                  root_update=updates[0], patience=10**6)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"model": model, "n": n, "d": len(w), "seconds": round(seconds, 3),
            "mask_seconds": round(agg.info["mask_seconds"], 3), "cluster_seconds": round(agg.info["cluster_seconds"], 3),
            "peak_rss_mb": round(peak / 1024, 1), "rss_growth_mb": round((peak - before) / 1024, 1)}


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
    lines = [f"# skymask-lite benchmark ({result['env']['device']}, {result['env']['threads']} threads)", "",
             f"## Seconds per round ({result['rounds']['setup']}, CNN, Fashion-MNIST, Min-Max, 20% attackers)", "",
             "| rule | clients | attack | aggregation | evaluation | total |", "|---|---|---|---|---|---|"]
    for rule, p in result["rounds"]["phases"].items():
        lines.append(f"| {rule} | {p['clients']:.2f} | {p['attack']:.2f} | {p['defense']:.2f} | {p['eval']:.2f} | {p['total']:.2f} |")
    r = result["rounds"]
    lines += ["", f"FedAvg round: {r['fedavg_round_seconds']:.2f} s here vs {r['dataloader_round_seconds']:.2f} s for a "
              f"per-client DataLoader loop: **{result['round_speedup_vs_dataloader_loop']:.2f}x**.",
              f"SkyMask's server step is **{100 * result['skymask_server_share_at_100']:.1f}%** of its round.", "",
              "## Client engines (one round of client training)", "", "| engine | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in result["engines"].items()]
    lines += ["", "## SkyMask server step versus n (CNN) and d (n = 100)", "",
              "| model | n | d | seconds | masks | clustering | peak RSS MB |", "|---|---|---|---|---|---|---|"]
    for row in result["scaling"]["by_n"] + result["scaling"]["by_d"]:
        lines.append(f"| {row['model']} | {row['n']} | {row['d']} | {row['seconds']:.2f} | {row['mask_seconds']:.2f} | "
                     f"{row['cluster_seconds']:.2f} | {row['peak_rss_mb']:.0f} |")
    f = result["scaling"]["fit_n"]
    lines += ["", f"Fit: t = {f['intercept_seconds']:.3f} + {f['seconds_per_client']:.4f} n s (R² = {f['r2_linear']:.3f}); "
              f"log-log slope {f['loglog_exponent']:.2f}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (checks the script)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per rule; the last one is reported")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rounds = round_phases(args.device, args.quick, args.rounds)
    sky = rounds["phases"]["skymask"]
    result = {
        "round_speedup_vs_dataloader_loop": round(rounds["dataloader_round_seconds"] / rounds["fedavg_round_seconds"], 3),
        "skymask_server_share_at_100": round(sky["defense"] / sky["total"], 4),
        "rounds": rounds,
        "engines": engines(args.device, args.quick),
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
