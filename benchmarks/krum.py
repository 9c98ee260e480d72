"""Time the aggregation rules of :mod:`skymask_lite.defenses` on random updates.

Krum and Multi-Krum run on ``n = 500`` clients with ``d = 10^6`` float32 parameters (2 GB of
updates); the other rules on ``n = 100`` clients with the Fashion-MNIST CNN's ``d = 139,960``.
``f = n / 5`` (the paper's 20% malicious). Prints a table (best of ``REPEATS`` runs) and writes
``benchmarks/results/defenses.json``.

Run: ``python benchmarks/krum.py``
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Callable

import torch

from skymask_lite.context import RoundContext
from skymask_lite.defenses import (
    FLDetector,
    bulyan,
    deepsight,
    fedavg,
    flame,
    fltrust,
    krum,
    median,
    multi_krum,
    tolpegin,
    trimmed_mean,
)
from skymask_lite.models import FMNISTCNN, flatten_params
from timing import best_time

REPEATS = 3
RESULTS = Path(__file__).resolve().parent / "results" / "defenses.json"


def random_updates(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 0.01


def fldetector_round(updates: torch.Tensor, params: torch.Tensor, window: int = 10) -> Callable[[], object]:
    """A detecting FLDetector round (L-BFGS prediction + gap statistic + k-means), after warm-up."""
    n = updates.shape[0]
    detector = FLDetector(window=window)
    gen = torch.Generator().manual_seed(1)

    def ctx(t: int) -> RoundContext:
        return RoundContext(t, n, n // 5, torch.arange(n // 5), FMNISTCNN(), params + 0.01 * t * updates[0])

    for t in range(1, window + 2):
        detector(updates + 0.001 * torch.randn(updates.shape, generator=gen), ctx(t))
    return lambda: detector(updates, ctx(window + 2))


def main() -> None:
    rows = []

    def record(rule: str, n: int, d: int, f: int, fn: Callable[[], object], repeats: int = REPEATS) -> None:
        seconds = best_time(fn, repeats)
        rows.append({"rule": rule, "n": n, "d": d, "f": f, "seconds": round(seconds, 4), "best_of": repeats})
        print(f"{rule:>14} {n:>5} {d:>9} {f:>4} {seconds:>9.3f}", flush=True)

    print(f"{'rule':>14} {'n':>5} {'d':>9} {'f':>4} {'seconds':>9}")
    n, d = 500, 1_000_000
    big = random_updates(n, d)
    record("krum", n, d, n // 5, lambda: krum(big, num_malicious=n // 5), repeats=2)
    record("multi_krum", n, d, n // 5, lambda: multi_krum(big, num_malicious=n // 5), repeats=2)
    del big

    net = FMNISTCNN()
    params = flatten_params(net)
    n, d, f = 100, params.numel(), 20
    u = random_updates(n, d)
    gen = torch.Generator().manual_seed(0)
    root_x = torch.zeros(1, 1, 28, 28)
    rules = {
        "fedavg": lambda: fedavg(u),
        "median": lambda: median(u),
        "trimmed_mean": lambda: trimmed_mean(u, num_malicious=f),
        "krum": lambda: krum(u, num_malicious=f),
        "multi_krum": lambda: multi_krum(u, num_malicious=f),
        "bulyan": lambda: bulyan(u, num_malicious=f),
        "fltrust": lambda: fltrust(u, root_update=u[0]),
        "flame": lambda: flame(u, generator=gen),
        "tolpegin": lambda: tolpegin(u, net=net),
        "deepsight": lambda: deepsight(u, net=net, global_params=params, generator=gen, root_x=root_x),
        "fldetector": fldetector_round(u, params),
    }
    for rule, fn in rules.items():
        record(rule, n, d, f, fn)

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "dtype": "float32",
    }
    RESULTS.write_text(json.dumps({"machine": machine, "results": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
