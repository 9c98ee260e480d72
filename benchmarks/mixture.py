"""Time SkyMask's two Gaussian-mixture fits per round: scikit-learn against ``fit_mixture``.

Every round, :func:`skymask_lite.clustering.cluster_masks` fits a 1-component and a
2-component (3 restarts) full-covariance mixture to the masks' 2-D PCA points, and needs
both fits' BIC and the 2-component fit's labels. Until commit 57c197a it called
scikit-learn's ``GaussianMixture`` (two ``fit``, two ``bic``, a ``predict`` per use of the
labels); it now calls :func:`skymask_lite._mixture.fit_mixture`, the same algorithm without
the per-call overhead. This script replays both on every mask geometry recorded in
``data/results/`` (:func:`skymask_lite.analysis.recorded_points`), checks that they agree
(labels, BIC to 1e-12; it also counts the rounds whose two BIC are equal to the last bit) and
writes ``benchmarks/results/mixture.json``: per round, the median and mean seconds of each,
one thread.

Run: ``python benchmarks/mixture.py``
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

from skymask_lite._mixture import fit_mixture
from skymask_lite.analysis import recorded_points
from skymask_lite.experiments import environment

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "mixture.json"
N_INIT = 3


def with_sklearn(x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, dict[int, float]]:
    """What ``cluster_masks`` computed through scikit-learn: both fits, both BIC, the labels."""
    fits = {c: GaussianMixture(c, covariance_type="full", random_state=seed, n_init=n).fit(x)
            for c, n in ((1, 1), (2, N_INIT))}
    bic = {c: float(fits[c].bic(x)) for c in fits}
    fits[2].predict(x)  # the partition
    return fits[2].predict(x), bic  # the chosen fit's labels


def with_fit_mixture(x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, dict[int, float]]:
    fits = {c: fit_mixture(x, c, seed, n) for c, n in ((1, 1), (2, N_INIT))}
    return fits[2].labels, {c: fits[c].bic for c in fits}


def main() -> None:
    geometries = recorded_points(ROOT / "data" / "results")
    times: dict[str, list[float]] = {"sklearn": [], "fit_mixture": []}
    disagreements = identical = 0
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for x in geometries:
            out = {}
            for name, fn in (("sklearn", with_sklearn), ("fit_mixture", with_fit_mixture)):
                start = time.perf_counter()
                out[name] = fn(x)
                times[name].append(time.perf_counter() - start)
            (labels_a, bic_a), (labels_b, bic_b) = out["sklearn"], out["fit_mixture"]
            same = np.array_equal(labels_a, labels_b) and all(
                abs(bic_a[c] - bic_b[c]) <= 1e-12 * abs(bic_a[c]) for c in bic_a)
            disagreements += not same
            identical += all(bic_a[c] == bic_b[c] for c in bic_a)  # to the last bit
    summary = {
        name: {"median_seconds": round(statistics.median(t), 6), "mean_seconds": round(statistics.mean(t), 6)}
        for name, t in times.items()
    }
    result = {
        "what": "per round: 1- and 2-component (3 restarts) mixture fits, BIC and labels, one thread",
        "rounds": len(geometries),
        "points_per_round": sorted({len(x) for x in geometries}),
        "disagreements": disagreements,
        "rounds_with_bit_identical_bic": identical,
        "speedup_median": round(summary["sklearn"]["median_seconds"] / summary["fit_mixture"]["median_seconds"], 2),
        "seconds": summary,
        "env": environment("cpu"),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    json.dump({k: v for k, v in result.items() if k != "env"}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
