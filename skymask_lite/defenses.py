"""Byzantine-robust aggregation rules and the detectors SkyMask is compared with.

Every rule is a pure function ``rule(updates, *, num_malicious, ...) -> Aggregation`` on the
``[n, d]`` update matrix ``U`` (row ``U_i = w_i - w``, the package's sign convention, see
:mod:`skymask_lite.context`). ``num_malicious`` is ``f``; rules that do not need it accept it
anyway so that every rule can be called the same way. ``Aggregation.kept`` lists the clients
whose updates were used (all of them for rules that select nobody) and ``info`` holds the
rule's scores and labels.

:data:`DEFENSES` maps a name to a factory; ``make_defense(name, **options)`` returns an object
called as ``defense(updates, ctx)`` by the simulator (see
:class:`~skymask_lite.aggregation.BoundRule`). :class:`FLDetector` keeps history across rounds,
so it is a class rather than a pure rule.

All pairwise distances are computed at once (one :func:`torch.cdist` or one Gram matrix);
scikit-learn runs on CPU ``float64`` copies and its results come back on the input's device.
"""

from __future__ import annotations

import functools
from collections import deque
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import HDBSCAN, KMeans
from sklearn.decomposition import PCA
from torch import nn
from torch.func import functional_call, vmap

from .aggregation import Aggregation, BoundRule, check_updates
from .context import RoundContext
from .models import param_slices, unflatten

_VMAP_CHUNK = 8  # clients per vmap chunk in DeepSight's DDifs (bounds activation memory)


class Defense(Protocol):
    """What the simulator calls every round."""

    needs_root_update: bool

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> Aggregation: ...


# ----------------------------------------------------------------------------- helpers


def _all(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device)


def _mean_of(updates: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Mean of the kept rows; the zero vector when nobody is kept."""
    if kept.numel() == 0:
        return torch.zeros_like(updates[0])
    return updates[kept].mean(dim=0)


def _median(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The usual median (mean of the two middle values for an even count), unlike
    :meth:`torch.Tensor.median`, which returns the lower one."""
    s = x.sort(dim=dim).values
    k = x.shape[dim]
    return (s.select(dim, (k - 1) // 2) + s.select(dim, k // 2)) / 2


def _cosine_distances(x: torch.Tensor) -> torch.Tensor:
    """Pairwise ``1 - cos(x_i, x_j)`` from one Gram matrix, in ``[0, 2]`` with a zero diagonal."""
    unit = F.normalize(x, dim=1)
    dist = (1 - unit @ unit.T).clamp_(0, 2)
    return dist.fill_diagonal_(0)


def _clip_to_norm(updates: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """``U_i * min(1, bound / ||U_i||)`` row-wise."""
    norms = updates.norm(dim=1, keepdim=True)
    return updates * (bound / norms.clamp_min(torch.finfo(updates.dtype).tiny)).clamp(max=1)


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy()


def _output_layer(updates: torch.Tensor, net: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The last Linear layer's part of each update: weights ``[n, L, h]`` and bias ``[n, L]``.

    It is the last two entries of :func:`~skymask_lite.models.param_slices`.
    """
    slices, shapes = param_slices(net), [p.shape for p in net.parameters()]
    if len(shapes) < 2 or len(shapes[-2]) != 2 or shapes[-1] != shapes[-2][:1]:
        raise ValueError(
            "the model's last two parameters must be the weight [L, h] and bias [L] of its output "
            f"Linear layer; got shapes {[tuple(s) for s in shapes[-2:]]}"
        )
    w_slice, b_slice = list(slices.values())[-2:]
    n = updates.shape[0]
    return updates[:, w_slice].reshape(n, *shapes[-2]), updates[:, b_slice]


def _hdbscan_labels(features: torch.Tensor, *, precomputed: bool, min_cluster_size: int) -> np.ndarray:
    """HDBSCAN labels (``-1`` = noise) with ``min_samples = 1`` and a single cluster allowed."""
    return HDBSCAN(
        min_cluster_size=min_cluster_size,
        min_samples=1,
        metric="precomputed" if precomputed else "euclidean",
        allow_single_cluster=True,
        copy=True,
    ).fit_predict(_numpy(features))


def _check_clients(rule: str, n: int, minimum: int) -> None:
    if n < minimum:
        raise ValueError(f"{rule} clusters the updates and needs at least {minimum} clients, got n={n}")


# ----------------------------------------------------------------------------- simple statistics


def fedavg(
    updates: torch.Tensor, *, num_malicious: int = 0, weights: torch.Tensor | None = None
) -> Aggregation:
    """FedAvg (McMahan et al., AISTATS 2017): ``sum_i p_i U_i / sum_i p_i`` (``p_i = 1`` by default,
    or e.g. the client's data size). ``num_malicious`` is unused."""
    check_updates(updates)
    n = updates.shape[0]
    kept = _all(n, updates.device)
    if weights is None:
        return Aggregation(updates.mean(dim=0), kept)
    weights = torch.as_tensor(weights, dtype=updates.dtype, device=updates.device)
    if weights.shape != (n,) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(
            f"weights must be {n} non-negative numbers (one per client) with a positive sum; "
            f"got shape {tuple(weights.shape)}"
        )
    return Aggregation(weights @ updates / weights.sum(), kept, {"weights": weights})


def median(updates: torch.Tensor, *, num_malicious: int = 0) -> Aggregation:
    """Coordinate-wise median (Yin et al., ICML 2018): ``agg_j = median_i U_ij``; for even ``n``
    the mean of the two middle values. ``num_malicious`` is unused."""
    check_updates(updates)
    return Aggregation(_median(updates, dim=0), _all(updates.shape[0], updates.device))


def trimmed_mean(updates: torch.Tensor, *, num_malicious: int) -> Aggregation:
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018): per coordinate, drop the ``f``
    largest and ``f`` smallest values and average the ``n - 2f`` others."""
    check_updates(updates)
    n, f = updates.shape[0], num_malicious
    if n <= 2 * f:
        raise ValueError(
            f"trimmed mean drops 2f = {2 * f} of n = {n} values per coordinate and needs n > 2f; "
            "lower num_malicious or use more clients"
        )
    trimmed = updates.sort(dim=0).values[f : n - f]
    return Aggregation(trimmed.mean(dim=0), _all(n, updates.device))


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


def multi_krum(updates: torch.Tensor, *, num_malicious: int, m: int | None = None) -> Aggregation:
    """Multi-Krum (Blanchard et al., NeurIPS 2017): average the ``m`` updates with the lowest
    Krum scores (default ``m = n - f``); ``m = 1`` is Krum."""
    check_updates(updates)
    n = updates.shape[0]
    m = n - num_malicious if m is None else m
    if not 1 <= m <= n:
        raise ValueError(f"Multi-Krum averages m of the n = {n} updates; m = {m} must be in [1, {n}]")
    scores = krum_scores(updates, num_malicious)
    kept = scores.topk(m, largest=False).indices.sort().values
    return Aggregation(updates[kept].mean(dim=0), kept, {"scores": scores})


def krum(updates: torch.Tensor, *, num_malicious: int) -> Aggregation:
    """Krum (Blanchard et al., NeurIPS 2017): the single update ``U_{i*}``,
    ``i* = argmin_i s(i)`` (see :func:`krum_scores`)."""
    return multi_krum(updates, num_malicious=num_malicious, m=1)


def bulyan(updates: torch.Tensor, *, num_malicious: int) -> Aggregation:
    """Bulyan (El Mhamdi et al., ICML 2018); needs ``n >= 4f + 3``.

    1. Select ``theta = n - 2f`` updates by repeated Krum: take the lowest-scored update of the
       remaining set, remove it, rescore (``max(1, r - f - 2)`` neighbours for ``r`` remaining,
       at most ``r - 1``; distances computed once).
    2. Per coordinate ``j``, average the ``beta = theta - 2f`` selected values closest to their
       median.
    """
    check_updates(updates)
    n, f = updates.shape[0], num_malicious
    if n < 4 * f + 3:
        raise ValueError(
            f"Bulyan needs n >= 4f + 3 clients; got n={n}, f={f} (4f + 3 = {4 * f + 3}). "
            f"Lower num_malicious to at most {(n - 3) // 4} or use more clients."
        )
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
    closest = (chosen - _median(chosen, dim=0)).abs().topk(beta, dim=0, largest=False).indices
    update = chosen.gather(0, closest).mean(dim=0)
    return Aggregation(update, kept.sort().values, {"selection_order": kept})


# ----------------------------------------------------------------------------- FLTrust, FLAME


def fltrust(updates: torch.Tensor, *, root_update: torch.Tensor, num_malicious: int = 0) -> Aggregation:
    """FLTrust (Cao et al., NDSS 2021).

    ``TS_i = ReLU(cos(U_i, g0))``, ``agg = sum_i TS_i (||g0|| / ||U_i||) U_i / sum_i TS_i``, with
    ``g0`` the server's update on its root data. Zero update (and nobody kept) when every
    ``TS_i = 0``. ``num_malicious`` is unused.
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
    if kept.numel() == 0:
        return Aggregation(torch.zeros_like(g0), kept, info)
    coef = trust * g0_norm / norms.clamp_min(tiny)
    return Aggregation(coef @ updates / trust.sum(), kept, info)


def flame(
    updates: torch.Tensor,
    *,
    generator: torch.Generator,
    noise_lambda: float = 0.001,
    num_malicious: int = 0,
) -> Aggregation:
    """FLAME (Nguyen et al., USENIX Security 2022).

    1. HDBSCAN on the pairwise cosine distances ``1 - cos(U_i, U_j)`` with
       ``min_cluster_size = n // 2 + 1``, ``min_samples = 1``, a single cluster allowed; keep
       the majority cluster (everybody if HDBSCAN labels every update noise).
    2. ``S = median_i ||U_i||`` over all clients; clip kept updates to norm ``S``; average.
    3. Add noise ``N(0, (lambda S)^2 I)`` drawn from ``generator`` (on the CPU).

    ``num_malicious`` is unused.
    """
    check_updates(updates)
    n = updates.shape[0]
    _check_clients("FLAME", n, 2)
    labels = _hdbscan_labels(_cosine_distances(updates), precomputed=True, min_cluster_size=n // 2 + 1)
    clustered = labels >= 0
    keep = labels == np.bincount(labels[clustered]).argmax() if clustered.any() else np.ones(n, dtype=bool)
    kept = torch.as_tensor(np.flatnonzero(keep), device=updates.device)
    norms = updates.norm(dim=1)
    clip = _median(norms)
    mean = _clip_to_norm(updates[kept], clip).mean(dim=0)
    noise = torch.randn(updates.shape[1], generator=generator, dtype=updates.dtype)
    update = mean + noise.to(updates.device) * (noise_lambda * clip)
    return Aggregation(update, kept, {"labels": labels, "norms": norms, "clip_norm": clip})


# ----------------------------------------------------------------------------- DeepSight


def _neups(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Normalised update energies ``c_ik = eps_ik^2 / sum_l eps_il^2``, with
    ``eps_ik = sum_p |dW_ikp| + |db_ik|`` the energy of output neuron ``k``, ``[n, L]``."""
    energy = weight.abs().sum(dim=2) + bias.abs()
    sq = energy.square()
    return sq / sq.sum(dim=1, keepdim=True).clamp_min(torch.finfo(sq.dtype).tiny)


def _threshold_exceedings(neups: torch.Tensor) -> torch.Tensor:
    """``TE_i = #{k : c_ik > max(0.01, 1/L) * max_l c_il}``, ``[n]``."""
    bound = max(0.01, 1 / neups.shape[1]) * neups.amax(dim=1, keepdim=True)
    return (neups > bound).sum(dim=1)


def _ddifs(
    updates: torch.Tensor,
    net: nn.Module,
    global_params: torch.Tensor,
    buffers: dict[str, torch.Tensor],
    inputs: torch.Tensor,
) -> torch.Tensor:
    """Division differences ``DDif_ik = mean_x p_i(k | x) / p_G(k | x)`` for each batch of random
    inputs ``[s, b, ...]``: ``[s, n, L]``. Clients are batched with :func:`torch.func.vmap`."""
    seeds, batch = inputs.shape[:2]
    x = inputs.flatten(0, 1)

    def log_probs(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(net, {**params, **buffers}, (x,)).log_softmax(dim=-1)

    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            global_lp = log_probs(unflatten(global_params, net))
            client_lp = vmap(log_probs, chunk_size=_VMAP_CHUNK)(unflatten(global_params + updates, net))
    finally:
        net.train(was_training)
    ratio = (client_lp - global_lp).exp()  # [n, s*b, L]
    return ratio.unflatten(1, (seeds, batch)).mean(dim=2).transpose(0, 1)


def _same_cluster_distances(labels: np.ndarray) -> np.ndarray:
    """0 for two members of the same cluster, 1 otherwise (noise points are singletons)."""
    same = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
    dist = 1.0 - same
    np.fill_diagonal(dist, 0.0)
    return dist


def deepsight(
    updates: torch.Tensor,
    *,
    net: nn.Module,
    global_params: torch.Tensor,
    generator: torch.Generator,
    root_x: torch.Tensor,
    global_buffers: dict[str, torch.Tensor] | None = None,
    num_seeds: int = 3,
    num_samples: int = 64,
    tau: float = 1 / 3,
    min_cluster_size: int = 2,
    num_malicious: int = 0,
) -> Aggregation:
    """DeepSight (Rieger et al., NDSS 2022), on the output layer (weight ``W``, bias ``b``).

    1. NEUPs ``c_ik`` (``_neups``) and threshold exceedings ``TE_i``; update ``i`` is
       labelled suspicious when ``TE_i < median(TE) / 2``.
    2. DDifs: ``num_seeds`` batches of ``num_samples`` standard-normal inputs (the shape of
       one ``root_x`` example; the data are normalised per channel), ``DDif_isk =
       mean_x p_i(k|x) / p_G(k|x)`` with ``p_i`` the model ``w + U_i`` and ``p_G`` the global one.
    3. HDBSCAN clusterings on the cosine distances of the bias updates, on the NEUPs and on
       the DDifs of each seed; each turned into a 0/1 "different cluster" matrix (the seeds'
       matrices averaged), the three averaged, and HDBSCAN run again on that matrix.
    4. A cluster (a noise point is its own cluster) is accepted when fewer than ``tau`` of its
       members are suspicious; accepted updates are clipped to the median norm of all updates
       and averaged (zero update when nothing is accepted).

    Simplified: few random inputs (``num_seeds * num_samples``, evaluated for every client);
    they are standard normal because the package's images are normalised per channel, and
    ``root_x`` only supplies their shape (DeepSight uses no data); scikit-learn's HDBSCAN
    (``min_samples = 1``) replaces the ``hdbscan`` package; the "different cluster" matrices
    weigh the bias, NEUP and DDif clusterings equally. ``num_malicious`` is unused.
    """
    check_updates(updates)
    n = updates.shape[0]
    _check_clients("DeepSight", n, 2)
    weight, bias = _output_layer(updates, net)
    neups = _neups(weight, bias)
    te = _threshold_exceedings(neups)
    suspicious = te.to(updates.dtype) < _median(te.to(updates.dtype)) / 2

    shape = (num_seeds, num_samples, *root_x.shape[1:])
    inputs = torch.randn(shape, generator=generator, dtype=updates.dtype).to(updates.device)
    ddifs = _ddifs(updates, net, global_params.to(updates), global_buffers or {}, inputs)

    cluster = functools.partial(_hdbscan_labels, min_cluster_size=min(min_cluster_size, n))
    ddif_dist = np.mean([_same_cluster_distances(cluster(d, precomputed=False)) for d in ddifs], axis=0)
    merged = np.mean(
        [
            _same_cluster_distances(cluster(_cosine_distances(bias), precomputed=True)),
            _same_cluster_distances(cluster(neups, precomputed=False)),
            ddif_dist,
        ],
        axis=0,
    )
    labels = cluster(torch.from_numpy(merged), precomputed=True)
    labels = np.where(labels >= 0, labels, labels.max() + 1 + np.arange(n))  # noise: singletons
    sus = suspicious.cpu().numpy()
    accepted = np.bincount(labels, weights=sus) < tau * np.bincount(labels)
    kept = torch.as_tensor(np.flatnonzero(accepted[labels]), device=updates.device)
    clip = _median(updates.norm(dim=1))
    update = _mean_of(_clip_to_norm(updates, clip), kept)
    info = {
        "labels": labels,
        "suspicious": suspicious,
        "threshold_exceedings": te,
        "neups": neups,
        "ddifs": ddifs,
        "clip_norm": clip,
    }
    return Aggregation(update, kept, info)


# ----------------------------------------------------------------------------- Tolpegin et al.


def tolpegin(
    updates: torch.Tensor,
    *,
    net: nn.Module,
    target_class: int | None = None,
    random_state: int = 0,
    num_malicious: int = 0,
) -> Aggregation:
    """Tolpegin et al. (ESORICS 2020): PCA of the output-layer updates to 2 components, then
    2-means; the smaller cluster is flagged (cluster 0 on a tie) and the rest averaged.

    ``target_class = c`` uses only the weights ``W_c`` of output neuron ``c`` (the paper's choice,
    the attacked class); the default uses the whole output layer (weights and bias).
    ``num_malicious`` is unused.
    """
    check_updates(updates)
    n = updates.shape[0]
    _check_clients("Tolpegin's detector", n, 2)
    weight, bias = _output_layer(updates, net)
    if target_class is None:
        features = torch.cat([weight.flatten(1), bias], dim=1)
    elif 0 <= target_class < weight.shape[1]:
        features = weight[:, target_class]
    else:
        raise ValueError(f"target_class = {target_class} is not a class of the {weight.shape[1]}-way output layer")
    points = PCA(n_components=min(2, *features.shape), random_state=random_state).fit_transform(_numpy(features))
    labels = KMeans(2, n_init=10, random_state=random_state).fit_predict(points)
    flagged = np.bincount(labels, minlength=2).argmin()
    kept = torch.as_tensor(np.flatnonzero(labels != flagged), device=updates.device)
    return Aggregation(_mean_of(updates, kept), kept, {"labels": labels, "pca": points})


# ----------------------------------------------------------------------------- FLDetector


def lbfgs_hvp(dw: torch.Tensor, dg: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """L-BFGS approximation ``H v`` from ``N`` pairs ``dw = [N, d]``, ``dg = [N, d]`` with
    ``dg_r ~= H dw_r`` (compact representation, Byrd, Nocedal and Schnabel 1994, as in
    FLDetector's Algorithm 1).

    With ``S = dw^T``, ``Y = dg^T``, ``A = S^T Y = L + D + R`` (strictly lower, diagonal, upper),
    ``sigma = y_N^T s_N / s_N^T s_N``::

        H v = sigma v - [sigma S, Y] M^+ [sigma S^T v; Y^T v],
        M = [[sigma S^T S, L], [L^T, -D]]

    (pseudo-inverse, so that degenerate histories do not fail).
    """
    a = dw @ dg.T
    lower = a.tril(-1)
    sigma = (dg[-1] @ dw[-1]) / (dw[-1] @ dw[-1]).clamp_min(torch.finfo(dw.dtype).tiny)
    m = torch.cat([torch.cat([sigma * dw @ dw.T, lower], 1), torch.cat([lower.T, -a.diag().diag()], 1)], 0)
    p = torch.cat([sigma * dw @ v, dg @ v])
    return sigma * v - torch.cat([sigma * dw, dg]).T @ (torch.linalg.pinv(m) @ p)


def gap_statistic_clusters(scores: np.ndarray, *, max_k: int = 10, num_refs: int = 10, random_state: int = 0) -> int:
    """Number of clusters in 1-D ``scores`` by the gap statistic (Tibshirani et al. 2001).

    Scores are min-max scaled to ``[0, 1]``; ``Gap(k) = E*[log W*_k] - log W_k`` with ``W_k`` the
    k-means inertia and ``E*`` over ``num_refs`` uniform reference samples; the answer is the
    smallest ``k`` with ``Gap(k) >= Gap(k+1) - s_{k+1}``, ``s = sd(log W*) sqrt(1 + 1/num_refs)``.
    ``k`` is capped at the number of distinct scores.
    """
    span = scores.max() - scores.min()
    if span <= 0:
        return 1
    x = ((scores - scores.min()) / span)[:, None]
    rng = np.random.default_rng(random_state)
    refs = rng.uniform(size=(num_refs, *x.shape))
    max_k = min(max_k, len(x) - 1, len(np.unique(x)))  # k-means cannot find more clusters than points
    tiny = np.finfo(float).tiny

    def log_w(data: np.ndarray, k: int) -> float:
        return np.log(max(KMeans(k, n_init=3, random_state=random_state).fit(data).inertia_, tiny))

    gap, sd = [], []
    for k in range(1, max_k + 1):
        ref = np.array([log_w(r, k) for r in refs])
        gap.append(ref.mean() - log_w(x, k))
        sd.append(ref.std() * np.sqrt(1 + 1 / num_refs))
    return next((k + 1 for k in range(max_k - 1) if gap[k] >= gap[k + 1] - sd[k + 1]), max_k)


class FLDetector:
    """FLDetector (Zhang et al., KDD 2022): flags clients whose updates are inconsistent with
    their own history.

    Round ``t`` with global model ``w_t`` (``ctx.global_params``) and updates ``g_i^t``:

    1. ``H`` from the last ``window`` pairs ``(w_r - w_{r-1}, gbar_r - gbar_{r-1})`` (global
       model and aggregated-update differences, :func:`lbfgs_hvp`); predicted update
       ``ghat_i^t = g_i^{t-1} + H (w_t - w_{t-1})``.
    2. ``d_i^t = ||ghat_i^t - g_i^t|| / sum_j ||ghat_j^t - g_j^t||``; suspicious score
       ``s_i`` = mean of ``d_i`` over the last ``window`` rounds.
    3. Once ``window`` rounds of scores exist: if the gap statistic finds more than one
       cluster in ``s``, k-means(2) flags the cluster with the larger mean score.
    4. ``gbar_t`` = mean of the kept updates (everybody before detection starts).

    Simplified: the paper removes flagged clients for good and restarts training; here the
    detector is re-run every round and drops the flagged clients from that round only. The gap
    statistic uses the k-means inertia (Tibshirani et al.); the authors' code sums
    unsquared distances.
    """

    needs_root_update = False

    def __init__(self, window: int = 10, max_k: int = 10, num_refs: int = 10, random_state: int = 0) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1 round, got {window}")
        self.window, self.max_k, self.num_refs, self.random_state = window, max_k, num_refs, random_state
        self.pairs: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=window)
        self.distances: deque[torch.Tensor] = deque(maxlen=window)
        self.previous: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # w, updates, gbar

    def _distances(self, updates: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
        """Normalised prediction errors ``d^t``, or None without enough history."""
        if self.previous is None or not self.pairs:
            return None
        w_prev, updates_prev, _ = self.previous
        dw, dg = (torch.stack(x) for x in zip(*self.pairs))
        predicted = updates_prev + lbfgs_hvp(dw, dg, w - w_prev)
        err = (predicted - updates).norm(dim=1)
        return err / err.sum().clamp_min(torch.finfo(err.dtype).tiny)

    def _flag(self, scores: torch.Tensor) -> np.ndarray:
        """Boolean mask of flagged clients (none when the gap statistic finds one cluster)."""
        s = _numpy(scores)
        k = gap_statistic_clusters(s, max_k=self.max_k, num_refs=self.num_refs, random_state=self.random_state)
        if k <= 1:
            return np.zeros(len(s), dtype=bool)
        labels = KMeans(2, n_init=10, random_state=self.random_state).fit_predict(s[:, None])
        means = np.bincount(labels, weights=s, minlength=2) / np.bincount(labels, minlength=2)
        return labels == means.argmax()

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> Aggregation:
        check_updates(updates)
        n = updates.shape[0]
        w = ctx.global_params.to(updates, copy=True)
        if self.previous is not None and self.previous[1].shape != updates.shape:
            raise ValueError(
                f"FLDetector follows the same clients every round: got updates {tuple(updates.shape)} "
                f"after {tuple(self.previous[1].shape)}; use a new FLDetector for a new federation"
            )
        dist = self._distances(updates, w)
        if dist is not None:
            self.distances.append(dist)
        scores, flagged = None, np.zeros(n, dtype=bool)
        if len(self.distances) == self.window:
            scores = torch.stack(list(self.distances)).mean(dim=0)
            flagged = self._flag(scores)
        info = {"distances": dist, "scores": scores, "detecting": scores is not None, "flagged": flagged}
        kept = torch.as_tensor(np.flatnonzero(~flagged), device=updates.device)
        gbar = _mean_of(updates, kept)
        if self.previous is not None:
            w_prev, _, gbar_prev = self.previous
            self.pairs.append((w - w_prev, gbar - gbar_prev))
        self.previous = (w, updates.detach().clone(), gbar)
        return Aggregation(gbar, kept, info)


# ----------------------------------------------------------------------------- registry


def _bound(rule: Callable[..., Aggregation], *context_args: str) -> Callable[..., BoundRule]:
    """Factory ``(**options) -> BoundRule`` reading ``num_malicious`` and ``context_args`` from
    the round context."""

    def factory(**options: Any) -> BoundRule:
        return BoundRule(rule, ("num_malicious", *context_args), options)

    return factory


def _skymask_defense(**options: Any) -> BoundRule:
    """SkyMask (Yan et al., ECCV 2024), imported lazily from :mod:`skymask_lite.skymask`."""
    from .skymask import skymask

    context = ("net", "global_params", "global_buffers", "root_x", "root_y", "root_update")
    return BoundRule(skymask, context, options)


#: Defence name -> factory taking the rule's options as keywords (see :func:`make_defense`).
DEFENSES: dict[str, Callable[..., Defense]] = {
    "fedavg": _bound(fedavg),
    "median": _bound(median),
    "trimmed_mean": _bound(trimmed_mean),
    "krum": _bound(krum),
    "multi_krum": _bound(multi_krum),
    "bulyan": _bound(bulyan),
    "fltrust": _bound(fltrust, "root_update"),
    "flame": _bound(flame, "generator"),
    "deepsight": _bound(deepsight, "net", "global_params", "generator", "root_x", "global_buffers"),
    "tolpegin": _bound(tolpegin, "net"),
    "fldetector": FLDetector,
    "skymask": _skymask_defense,
}


def make_defense(name: str, **options: Any) -> Defense:
    """The defence ``name`` with its options, ready for ``defense(updates, ctx)``."""
    if name not in DEFENSES:
        raise ValueError(f"unknown defence {name!r}; known defences: {', '.join(DEFENSES)}")
    return DEFENSES[name](**options)
