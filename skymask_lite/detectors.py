"""The detectors SkyMask is compared with that look at the model or at each client's history:
DeepSight (Rieger et al., NDSS 2022), Tolpegin et al. (ESORICS 2020) and FLDetector (Zhang et
al., KDD 2022). Like the rules of :mod:`skymask_lite.defenses` (which registers them), each
takes only what it uses and returns an :class:`~skymask_lite.aggregation.Aggregation` whose
``kept`` lists the clients it did not flag.
"""

from __future__ import annotations

import functools
from collections import deque

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from torch import nn
from torch.func import functional_call, vmap

from ._rulekit import (
    check_clients,
    clip_to_norm,
    cosine_distances,
    hdbscan_labels,
    mean_of,
    median_of,
    output_layer,
    rounded,
    summary,
    to_numpy,
)
from .aggregation import Aggregation, check_updates
from .context import RoundContext
from .models import unflatten

__all__ = ["FLDetector", "deepsight", "gap_statistic_clusters", "lbfgs_hvp", "tolpegin"]

_VMAP_CHUNK = 8  # clients per vmap chunk in DeepSight's DDifs (bounds activation memory)


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


def _suspicious(te: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """DeepSight's labels: update ``i`` is suspicious when ``TE_i < median(TE) / 2``, ``[n]`` bool."""
    te = te.to(dtype)
    return te < median_of(te) / 2


def _random_inputs(
    generator: torch.Generator, num_seeds: int, num_samples: int, example: torch.Tensor, like: torch.Tensor
) -> torch.Tensor:
    """``num_seeds`` batches of ``num_samples`` standard-normal inputs shaped like ``example``
    (one root example), ``[s, b, ...]``, drawn on the CPU ``generator`` in ``like``'s dtype and
    moved to its device."""
    shape = (num_seeds, num_samples, *example.shape)
    return torch.randn(shape, generator=generator, dtype=like.dtype).to(like.device)


def _same_cluster_distances(labels: np.ndarray) -> np.ndarray:
    """0 for two members of the same cluster, 1 otherwise (noise points are singletons)."""
    same = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
    dist = 1.0 - same
    np.fill_diagonal(dist, 0.0)
    return dist


def _combined_clusters(
    bias: torch.Tensor, neups: torch.Tensor, ddifs: torch.Tensor, min_cluster_size: int
) -> np.ndarray:
    """DeepSight's clustering, ``[n]`` labels with every noise point a cluster of its own.

    HDBSCAN on the cosine distances of the bias updates, on the NEUPs and on the DDifs of each
    seed; each labelling becomes a 0/1 "different cluster" matrix (the seeds' matrices
    averaged); the three are averaged and HDBSCAN runs again on that matrix.
    """
    n = bias.shape[0]
    cluster = functools.partial(hdbscan_labels, min_cluster_size=min_cluster_size)
    ddif_dist = np.mean([_same_cluster_distances(cluster(d, precomputed=False)) for d in ddifs], axis=0)
    merged = np.mean(
        [
            _same_cluster_distances(cluster(cosine_distances(bias), precomputed=True)),
            _same_cluster_distances(cluster(neups, precomputed=False)),
            ddif_dist,
        ],
        axis=0,
    )
    labels = cluster(torch.from_numpy(merged), precomputed=True)
    return np.where(labels >= 0, labels, labels.max() + 1 + np.arange(n))  # noise: singletons


def _accepted_clusters(labels: np.ndarray, suspicious: torch.Tensor, tau: float) -> np.ndarray:
    """Per cluster label, whether fewer than ``tau`` of its members are suspicious."""
    return np.bincount(labels, weights=suspicious.cpu().numpy()) < tau * np.bincount(labels)


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
) -> Aggregation:
    """DeepSight (Rieger et al., NDSS 2022), on the output layer (weight ``W``, bias ``b``).

    1. NEUPs ``c_ik`` (``_neups``) and threshold exceedings ``TE_i``; update ``i`` is
       labelled suspicious when ``TE_i < median(TE) / 2`` (``_suspicious``).
    2. DDifs (``_ddifs``): ``num_seeds`` batches of ``num_samples`` standard-normal inputs (the
       shape of one ``root_x`` example; the data are normalised per channel), ``DDif_isk =
       mean_x p_i(k|x) / p_G(k|x)`` with ``p_i`` the model ``w + U_i`` and ``p_G`` the global one.
    3. HDBSCAN clusterings on the cosine distances of the bias updates, on the NEUPs and on
       the DDifs of each seed, combined into one clustering (``_combined_clusters``).
    4. A cluster (a noise point is its own cluster) is accepted when fewer than ``tau`` of its
       members are suspicious (``_accepted_clusters``); accepted updates are clipped to the
       median norm of all updates and averaged (zero update when nothing is accepted).

    Simplified: few random inputs (``num_seeds * num_samples``, evaluated for every client);
    they are standard normal because the package's images are normalised per channel, and
    ``root_x`` only supplies their shape (DeepSight uses no data); scikit-learn's HDBSCAN
    (``min_samples = 1``) replaces the ``hdbscan`` package; the "different cluster" matrices
    weigh the bias, NEUP and DDif clusterings equally. DeepSight states no bound on ``f``.

    ``stats``: ``suspicious`` (count), ``cluster_sizes`` of the clusters with two or more members
    (largest first), ``singletons``, ``accepted_clusters`` and ``clip_norm``.
    """
    check_updates(updates)
    n = updates.shape[0]
    check_clients("DeepSight", n, 2)
    weight, bias = output_layer(updates, net)
    neups = _neups(weight, bias)
    te = _threshold_exceedings(neups)
    suspicious = _suspicious(te, updates.dtype)
    inputs = _random_inputs(generator, num_seeds, num_samples, root_x[0], updates)
    ddifs = _ddifs(updates, net, global_params.to(updates), global_buffers or {}, inputs)
    labels = _combined_clusters(bias, neups, ddifs, min(min_cluster_size, n))
    accepted = _accepted_clusters(labels, suspicious, tau)
    kept = torch.as_tensor(np.flatnonzero(accepted[labels]), device=updates.device)
    clip = median_of(updates.norm(dim=1))
    update = mean_of(clip_to_norm(updates, clip), kept)
    info = {
        "labels": labels,
        "suspicious": suspicious,
        "threshold_exceedings": te,
        "neups": neups,
        "ddifs": ddifs,
        "clip_norm": clip,
    }
    sizes = np.bincount(labels)
    stats = {
        "suspicious": int(suspicious.sum()),
        "cluster_sizes": sorted(sizes[sizes >= 2].tolist(), reverse=True),
        "singletons": int((sizes == 1).sum()),
        "accepted_clusters": int(accepted[sizes > 0].sum()),
        "clip_norm": rounded(clip),
    }
    return Aggregation(update, kept, info, stats)


# ----------------------------------------------------------------------------- Tolpegin et al.


def tolpegin(
    updates: torch.Tensor,
    *,
    net: nn.Module,
    target_class: int | None = None,
    random_state: int = 0,
) -> Aggregation:
    """Tolpegin et al. (ESORICS 2020): PCA of the output-layer updates to 2 components, then
    2-means; the smaller cluster is flagged (cluster 0 on a tie) and the rest averaged.

    ``target_class = c`` uses only the weights ``W_c`` of output neuron ``c`` (the paper's choice,
    the attacked class); the default uses the whole output layer (weights and bias).

    ``stats``: the two ``cluster_sizes``, ``flagged`` (the smaller one's size) and the PCA's
    ``explained_variance`` ratios.
    """
    check_updates(updates)
    n = updates.shape[0]
    check_clients("Tolpegin's detector", n, 2)
    weight, bias = output_layer(updates, net)
    if target_class is None:
        features = torch.cat([weight.flatten(1), bias], dim=1)
    elif 0 <= target_class < weight.shape[1]:
        features = weight[:, target_class]
    else:
        raise ValueError(f"target_class = {target_class} is not a class of the {weight.shape[1]}-way output layer")
    pca = PCA(n_components=min(2, *features.shape), random_state=random_state)
    points = pca.fit_transform(to_numpy(features))
    labels = KMeans(2, n_init=10, random_state=random_state).fit_predict(points)
    sizes = np.bincount(labels, minlength=2)
    flagged = sizes.argmin()
    kept = torch.as_tensor(np.flatnonzero(labels != flagged), device=updates.device)
    stats = {
        "cluster_sizes": sizes.tolist(),
        "flagged": int(sizes[flagged]),
        "explained_variance": [rounded(r) for r in pca.explained_variance_ratio_],
    }
    return Aggregation(mean_of(updates, kept), kept, {"labels": labels, "pca": points}, stats)


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
    unsquared distances. FLDetector states no bound on ``f``.

    ``stats``: ``detecting`` (whether the window is full), ``gap_k`` (the gap statistic's number
    of clusters, ``None`` before detection), ``flagged`` (count) and the ``scores`` summarised.
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

    def require(self, num_clients: int, num_malicious: int) -> None:
        """FLDetector states no condition on ``n`` and ``f``: nothing to check."""

    def _flag(self, scores: torch.Tensor) -> tuple[np.ndarray, int]:
        """Boolean mask of flagged clients (none when the gap statistic finds one cluster) and
        the gap statistic's number of clusters."""
        s = to_numpy(scores)
        k = gap_statistic_clusters(s, max_k=self.max_k, num_refs=self.num_refs, random_state=self.random_state)
        if k <= 1:
            return np.zeros(len(s), dtype=bool), k
        labels = KMeans(2, n_init=10, random_state=self.random_state).fit_predict(s[:, None])
        means = np.bincount(labels, weights=s, minlength=2) / np.bincount(labels, minlength=2)
        return labels == means.argmax(), k

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
        scores, flagged, k = None, np.zeros(n, dtype=bool), None
        if len(self.distances) == self.window:
            scores = torch.stack(list(self.distances)).mean(dim=0)
            flagged, k = self._flag(scores)
        info = {"distances": dist, "scores": scores, "detecting": scores is not None, "flagged": flagged}
        stats = {
            "detecting": scores is not None,
            "gap_k": k,
            "flagged": int(flagged.sum()),
            "scores": None if scores is None else summary(scores),
        }
        kept = torch.as_tensor(np.flatnonzero(~flagged), device=updates.device)
        gbar = mean_of(updates, kept)
        if self.previous is not None:
            w_prev, _, gbar_prev = self.previous
            self.pairs.append((w - w_prev, gbar - gbar_prev))
        self.previous = (w, updates.detach().clone(), gbar)
        return Aggregation(gbar, kept, info, stats)
