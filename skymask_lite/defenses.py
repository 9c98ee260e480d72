"""Byzantine-robust aggregation rules and the detectors SkyMask is compared with.

Every rule is a pure function ``rule(updates, *, ...) -> Aggregation`` on the ``[n, d]`` update
matrix ``U`` (row ``U_i = w_i - w``, the package's sign convention, see
:mod:`skymask_lite.context`) that takes only what it uses: ``num_malicious`` (``f``) for the
rules that need it, ``root_update`` for FLTrust, and so on (keyword parameters named like the
round context's fields; see :mod:`skymask_lite.aggregation`). ``Aggregation.kept`` lists the
clients whose updates were used (all of them for rules that select nobody), ``info`` holds the
rule's scores and labels and ``stats`` a small JSON-safe summary of its decision.

A rule that is robust only for some ``n`` and ``f`` declares its
:class:`~skymask_lite.aggregation.Condition` next to it (e.g. :data:`KRUM_CONDITION`,
``n > 2f + 2``); rules that read ``f`` check it when called, and the bound rule checks it for
every rule, at each call and in ``defense.require(n, f)``, which the experiment's config
validation calls before any compute.

:data:`DEFENSES` maps a name to a factory; ``make_defense(name, **options)`` returns an object
called as ``defense(updates, ctx)`` by the simulator (see
:class:`~skymask_lite.aggregation.BoundRule`). DeepSight, Tolpegin et al.'s detector and
:class:`FLDetector` live in ``skymask_lite.detectors`` and are re-exported here;
FLDetector keeps history across rounds, so it is a class rather than a pure rule.

All pairwise distances are computed at once (one :func:`torch.cdist` or one Gram matrix);
scikit-learn runs on CPU ``float64`` copies and its results come back on the input's device.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np
import torch

from ._rulekit import (
    all_clients,
    check_clients,
    clip_to_norm,
    cosine_distances,
    hdbscan_labels,
    median_of,
    middle_ranks,
    rounded,
    shares,
    summary,
)
from .aggregation import Aggregation, BoundRule, Condition, check_options, check_updates
from .context import RoundContext
from .detectors import FLDetector, deepsight, gap_statistic_clusters, lbfgs_hvp, tolpegin

__all__ = [
    "BULYAN_CONDITION",
    "DEFENSES",
    "Defense",
    "FLAME_CONDITION",
    "FLDetector",
    "KRUM_CONDITION",
    "MEDIAN_CONDITION",
    "MULTI_KRUM_CONDITION",
    "TRIMMED_MEAN_CONDITION",
    "bulyan",
    "deepsight",
    "fedavg",
    "flame",
    "fltrust",
    "gap_statistic_clusters",
    "krum",
    "krum_scores",
    "lbfgs_hvp",
    "make_defense",
    "median",
    "multi_krum",
    "tolpegin",
    "trimmed_mean",
]


class Defense(Protocol):
    """What the simulator calls every round."""

    needs_root_update: bool

    def require(self, num_clients: int, num_malicious: int) -> None: ...

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> Aggregation: ...


# ----------------------------------------------------------------------------- simple statistics


def fedavg(updates: torch.Tensor, *, weights: torch.Tensor | None = None) -> Aggregation:
    """FedAvg (McMahan et al., AISTATS 2017): ``sum_i p_i U_i / sum_i p_i`` (``p_i = 1`` by default,
    or e.g. the client's data size). It decides nothing, so its ``stats`` are empty."""
    check_updates(updates)
    n = updates.shape[0]
    kept = all_clients(n, updates.device)
    if weights is None:
        return Aggregation(updates.mean(dim=0), kept)
    weights = torch.as_tensor(weights, dtype=updates.dtype, device=updates.device)
    if weights.shape != (n,) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(
            f"weights must be {n} non-negative numbers (one per client) with a positive sum; "
            f"got shape {tuple(weights.shape)}"
        )
    return Aggregation(weights @ updates / weights.sum(), kept, {"weights": weights})


#: The median's breakdown point is 1/2, so it is robust while the honest clients are a majority.
MEDIAN_CONDITION = Condition("The coordinate-wise median", 2)


def median(updates: torch.Tensor) -> Aggregation:
    """Coordinate-wise median (Yin et al., ICML 2018): ``agg_j = median_i U_ij``; for even ``n``
    the mean of the two middle values. Robust for ``n > 2f`` (:data:`MEDIAN_CONDITION`, checked by
    the bound rule: the median itself does not read ``f``).

    ``stats``: ``middle_share``, per client the share of coordinates where its value is one of the
    middle ones (summarised; the shares sum to 1 for odd ``n``, 2 for even), and ``never_middle``,
    the number of clients whose value is never used.
    """
    check_updates(updates)
    n = updates.shape[0]
    s = updates.sort(dim=0)
    lo, hi = middle_ranks(n)
    update = median_of(s.values, presorted=True)
    share = shares(s.indices[lo : hi + 1], n)
    stats = {"middle_share": summary(share), "never_middle": int((share == 0).sum())}
    return Aggregation(update, all_clients(n, updates.device), {"middle_share": share}, stats)


#: Yin et al.'s trimmed mean trims a fraction beta = f / n < 1/2 from each side, so n > 2f.
TRIMMED_MEAN_CONDITION = Condition("Trimmed mean", 2)


def trimmed_mean(updates: torch.Tensor, *, num_malicious: int) -> Aggregation:
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018): per coordinate, drop the ``f``
    largest and ``f`` smallest values and average the ``n - 2f`` others. Needs ``n > 2f``
    (:data:`TRIMMED_MEAN_CONDITION`).

    ``stats``: ``trimmed_per_coordinate`` (``2f``), ``trimmed_share``, per client the share of
    coordinates where its value was dropped (summarised; the shares sum to ``2f``), and
    ``never_trimmed``, the number of clients never dropped.
    """
    check_updates(updates)
    n, f = updates.shape[0], num_malicious
    TRIMMED_MEAN_CONDITION.check(n, f)
    s = updates.sort(dim=0)
    trimmed = s.values[f : n - f]
    share = shares(torch.cat([s.indices[:f], s.indices[n - f :]]), n)
    stats = {
        "trimmed_per_coordinate": 2 * f,
        "trimmed_share": summary(share),
        "never_trimmed": int((share == 0).sum()),
    }
    return Aggregation(trimmed.mean(dim=0), all_clients(n, updates.device), {"trimmed_share": share}, stats)


# ----------------------------------------------------------------------------- Krum family


def _krum_scores_from(sq_dist: torch.Tensor, k: int) -> torch.Tensor:
    """Sum of the ``k`` smallest off-diagonal entries per row of a squared-distance matrix."""
    off = sq_dist.clone().fill_diagonal_(float("inf"))
    return off.topk(k, dim=1, largest=False).values.sum(dim=1)


def krum_scores(updates: torch.Tensor, num_malicious: int) -> torch.Tensor:
    """Krum scores (Blanchard et al., NeurIPS 2017), ``[n]``.

    ``s(i) = sum_{i -> j} ||U_i - U_j||^2`` over the ``n - f - 2`` rows ``j != i`` closest to
    ``U_i`` (the row itself is excluded). One :func:`torch.cdist` call.
    """
    n, f = updates.shape[0], num_malicious
    k = n - f - 2
    if k < 1:
        raise ValueError(
            f"Krum scores each update by its n - f - 2 nearest neighbours, which needs n >= f + 3, "
            f"and Krum is only robust for n > 2f + 2; got n={n}, f={f}. "
            "Lower num_malicious or use more clients."
        )
    return _krum_scores_from(torch.cdist(updates, updates).square(), k)


#: Blanchard et al. prove Krum's resilience for n > 2f + 2 (Proposition 1).
KRUM_CONDITION = Condition("Krum", 2, 2)
#: Multi-Krum rests on the same scores, so it needs n > 2f + 2 too.
MULTI_KRUM_CONDITION = Condition("Multi-Krum", 2, 2)


def multi_krum(updates: torch.Tensor, *, num_malicious: int, m: int | None = None) -> Aggregation:
    """Multi-Krum (Blanchard et al., NeurIPS 2017): average the ``m`` updates with the lowest
    Krum scores (default ``m = n - f``); ``m = 1`` is Krum. Needs ``n > 2f + 2``
    (:data:`MULTI_KRUM_CONDITION`, :data:`KRUM_CONDITION` for ``m = 1``).

    ``stats``: ``selected`` (``m``), the ``scores`` summarised and ``max_selected_score``, the
    highest score that was still averaged.
    """
    check_updates(updates)
    n = updates.shape[0]
    (KRUM_CONDITION if m == 1 else MULTI_KRUM_CONDITION).check(n, num_malicious)
    m = n - num_malicious if m is None else m
    if not 1 <= m <= n:
        raise ValueError(f"Multi-Krum averages m of the n = {n} updates; m = {m} must be in [1, {n}]")
    scores = krum_scores(updates, num_malicious)
    kept = scores.topk(m, largest=False).indices.sort().values
    stats = {"selected": m, "scores": summary(scores), "max_selected_score": rounded(scores[kept].max())}
    return Aggregation(updates[kept].mean(dim=0), kept, {"scores": scores}, stats)


def krum(updates: torch.Tensor, *, num_malicious: int) -> Aggregation:
    """Krum (Blanchard et al., NeurIPS 2017): the single update ``U_{i*}``,
    ``i* = argmin_i s(i)`` (see :func:`krum_scores`). Needs ``n > 2f + 2``
    (:data:`KRUM_CONDITION`)."""
    return multi_krum(updates, num_malicious=num_malicious, m=1)


#: El Mhamdi et al.'s Bulyan needs n >= 4f + 3.
BULYAN_CONDITION = Condition("Bulyan", 4, 3, strict=False)


def bulyan(updates: torch.Tensor, *, num_malicious: int) -> Aggregation:
    """Bulyan (El Mhamdi et al., ICML 2018); needs ``n >= 4f + 3`` (:data:`BULYAN_CONDITION`).

    1. Select ``theta = n - 2f`` updates by repeated Krum: take the lowest-scored update of the
       remaining set, remove it, rescore (``max(1, r - f - 2)`` neighbours for ``r`` remaining,
       at most ``r - 1``; distances computed once).
    2. Per coordinate ``j``, average the ``beta = theta - 2f`` selected values closest to their
       median.

    ``stats``: ``selected`` (``theta``), ``averaged_per_coordinate`` (``beta``) and ``used_share``,
    per selected update the share of coordinates where it was averaged (summarised; the shares
    sum to ``beta``).
    """
    check_updates(updates)
    n, f = updates.shape[0], num_malicious
    BULYAN_CONDITION.check(n, f)
    theta, beta = n - 2 * f, n - 4 * f
    sq = torch.cdist(updates, updates).square()
    remaining = torch.ones(n, dtype=torch.bool, device=updates.device)
    selected = []
    for _ in range(theta):
        r = int(remaining.sum())
        k = min(max(r - f - 2, 1), r - 1)
        rows = torch.nonzero(remaining).flatten()
        scores = _krum_scores_from(sq[rows][:, rows], k)
        best = rows[scores.argmin()]
        selected.append(best)
        remaining[best] = False
    kept = torch.stack(selected)
    chosen = updates[kept]
    closest = (chosen - median_of(chosen, dim=0)).abs().topk(beta, dim=0, largest=False).indices
    update = chosen.gather(0, closest).mean(dim=0)
    share = shares(closest, theta)
    stats = {"selected": theta, "averaged_per_coordinate": beta, "used_share": summary(share)}
    return Aggregation(update, kept.sort().values, {"selection_order": kept}, stats)


# ----------------------------------------------------------------------------- FLTrust, FLAME


def fltrust(updates: torch.Tensor, *, root_update: torch.Tensor) -> Aggregation:
    """FLTrust (Cao et al., NDSS 2021).

    ``TS_i = ReLU(cos(U_i, g0))``, ``agg = sum_i TS_i (||g0|| / ||U_i||) U_i / sum_i TS_i``, with
    ``g0`` the server's update on its root data. Zero update (and nobody kept) when every
    ``TS_i = 0``. FLTrust states no bound on ``f``: the root data, not a majority, anchors it.

    ``stats``: the ``trust`` scores summarised, ``zero_trust`` (clients with ``TS_i = 0``, the
    ones not kept), ``root_norm`` ``||g0||`` and ``median_client_norm``.
    """
    check_updates(updates)
    if not isinstance(root_update, torch.Tensor) or root_update.shape != updates.shape[1:]:
        shape = tuple(root_update.shape) if isinstance(root_update, torch.Tensor) else root_update
        raise ValueError(
            f"root_update must be the server's [d] = [{updates.shape[1]}] update on its root data, "
            f"got {shape}; compute it with the clients' recipe from the same global model"
        )
    g0 = root_update.to(updates)
    norms, g0_norm, tiny = updates.norm(dim=1), g0.norm(), torch.finfo(updates.dtype).tiny
    trust = (updates @ g0 / (norms * g0_norm).clamp_min(tiny)).relu()
    kept = torch.nonzero(trust > 0).flatten()
    info = {"trust_scores": trust}
    stats = {
        "trust": summary(trust),
        "zero_trust": int((trust == 0).sum()),
        "root_norm": rounded(g0_norm),
        "median_client_norm": rounded(median_of(norms)),
    }
    if kept.numel() == 0:
        return Aggregation(torch.zeros_like(g0), kept, info, stats)
    coef = trust * g0_norm / norms.clamp_min(tiny)
    return Aggregation(coef @ updates / trust.sum(), kept, info, stats)


#: FLAME keeps the majority cluster, so it assumes the honest clients are a majority (n > 2f).
FLAME_CONDITION = Condition("FLAME", 2)


def flame(updates: torch.Tensor, *, generator: torch.Generator, noise_lambda: float = 0.001) -> Aggregation:
    """FLAME (Nguyen et al., USENIX Security 2022).

    1. HDBSCAN on the pairwise cosine distances ``1 - cos(U_i, U_j)`` with
       ``min_cluster_size = n // 2 + 1``, ``min_samples = 1``, a single cluster allowed; keep
       the majority cluster (everybody if HDBSCAN labels every update noise).
    2. ``S = median_i ||U_i||`` over all clients; clip kept updates to norm ``S``; average.
    3. Add noise ``N(0, (lambda S)^2 I)`` drawn from ``generator`` (on the CPU).

    Robust for ``n > 2f`` (:data:`FLAME_CONDITION`, checked by the bound rule). ``stats``: the
    HDBSCAN ``cluster_sizes`` (largest first), ``noise`` (updates labelled noise), ``clip_norm``
    ``S`` and ``noise_std`` ``lambda S``.
    """
    check_updates(updates)
    n = updates.shape[0]
    check_clients("FLAME", n, 2)
    labels = hdbscan_labels(cosine_distances(updates), precomputed=True, min_cluster_size=n // 2 + 1)
    clustered = labels >= 0
    keep = labels == np.bincount(labels[clustered]).argmax() if clustered.any() else np.ones(n, dtype=bool)
    kept = torch.as_tensor(np.flatnonzero(keep), device=updates.device)
    norms = updates.norm(dim=1)
    clip = median_of(norms)
    mean = clip_to_norm(updates[kept], clip).mean(dim=0)
    noise = torch.randn(updates.shape[1], generator=generator, dtype=updates.dtype)
    update = mean + noise.to(updates.device) * (noise_lambda * clip)
    stats = {
        "cluster_sizes": sorted(np.bincount(labels[clustered]).tolist(), reverse=True),
        "noise": int((~clustered).sum()),
        "clip_norm": rounded(clip),
        "noise_std": rounded(noise_lambda * clip),
    }
    return Aggregation(update, kept, {"labels": labels, "norms": norms, "clip_norm": clip}, stats)


# ----------------------------------------------------------------------------- registry


def _rule(rule: Callable[..., Aggregation], condition: Condition | None = None) -> Callable[..., BoundRule]:
    """Factory ``(**options) -> BoundRule`` for a pure rule and its robustness condition."""

    def factory(**options: Any) -> BoundRule:
        return BoundRule(rule, options=options, condition=condition)

    return factory


def _fldetector(**options: Any) -> FLDetector:
    """A fresh :class:`FLDetector`, its options checked as a pure rule's are."""
    check_options("the 'fldetector' defense", FLDetector, options, skip=0, reads_context=False)
    return FLDetector(**options)


def _skymask(**options: Any) -> BoundRule:
    """SkyMask (Yan et al., ECCV 2024), imported lazily from :mod:`skymask_lite.skymask`; it
    states no bound on ``f`` (it is designed for a malicious majority too)."""
    from .skymask import skymask

    return BoundRule(skymask, options=options)


#: Defense name -> factory taking the rule's options as keywords (see :func:`make_defense`).
DEFENSES: dict[str, Callable[..., Defense]] = {
    "fedavg": _rule(fedavg),
    "median": _rule(median, MEDIAN_CONDITION),
    "trimmed_mean": _rule(trimmed_mean, TRIMMED_MEAN_CONDITION),
    "krum": _rule(krum, KRUM_CONDITION),
    "multi_krum": _rule(multi_krum, MULTI_KRUM_CONDITION),
    "bulyan": _rule(bulyan, BULYAN_CONDITION),
    "fltrust": _rule(fltrust),
    "flame": _rule(flame, FLAME_CONDITION),
    "deepsight": _rule(deepsight),
    "tolpegin": _rule(tolpegin),
    "fldetector": _fldetector,
    "skymask": _skymask,
}


def make_defense(name: str, **options: Any) -> Defense:
    """The defense ``name`` with its options, ready for ``defense(updates, ctx)``; its
    ``require(n, f)`` checks the rule's robustness condition before any compute."""
    if name not in DEFENSES:
        raise ValueError(f"unknown defense {name!r}; known defenses: {', '.join(DEFENSES)}")
    return DEFENSES[name](**options)
