"""SkyMask, step 5: from binary masks to "who is benign" (Yan et al., ECCV 2024).

PCA of the masks to 2-D (:func:`pca_2d`), Gaussian mixtures with one and two components
(fitted as scikit-learn's ``GaussianMixture`` fits them, by the private module
``skymask_lite._mixture``, without its per-call overhead), and
the 1-vs-2 decision (:func:`cluster_masks`, criteria in ``DEFAULT_THRESHOLD``; the module
docstring of :mod:`skymask_lite.skymask` explains the default, ``"collapse_or_ashman"``).
The cluster that holds the server's root mask is benign.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from ._mixture import Mixture, fit_mixture

__all__ = [
    "COLLAPSE_RATIO",
    "CORE_RADIUS",
    "DEFAULT_THRESHOLD",
    "ashman_d",
    "benign_side",
    "cluster_masks",
    "collapsed_strays",
    "pca_2d",
    "read_partition",
    "robust_spread",
    "variance_share",
]

DEFAULT_THRESHOLD = {"collapse_or_ashman": 8.0, "ashman": 8.0, "bic_margin": 0.2, "bic": None, "always": None}
"""1-vs-2-cluster criteria and their default thresholds (see the module docstring)."""

COLLAPSE_RATIO = 0.1
"""``"collapse_or_ashman"``: the other component counts as collapsed when its robust spread is
below this share of the root component's (see :func:`~skymask_lite.clustering.robust_spread`);
calibrated on seed 0 of the decision study (``data/results/decision/``, chapter "Is there an attack?")."""

CORE_RADIUS = 0.5
"""A collapsed cluster holds the clients within this many robust spreads of the root's
component from its median point; a client of the same mixture component farther away is a
stray the mixture merely attached to it, and is kept (chapter "Is there an attack?")."""


@functools.lru_cache(maxsize=1)
def _threadpools() -> ThreadpoolController:
    """The process's BLAS/OpenMP thread pools, inspected once:
    ``threadpool_limits(1)`` scans the loaded libraries on every call (about 2.5 ms on the
    book's CPU), ``controller.limit(limits=1)`` reuses the scan (0.02 ms)."""
    return ThreadpoolController()


def _one_thread():
    """A context in which BLAS and OpenMP run on one thread (tiny ``k x k`` and 2-D problems)."""
    return _threadpools().limit(limits=1)


def _centred_gram_eigh(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors of the centred Gram matrix ``H x x^T H``,
    ``H = I - 11^T / k``; only the ``k x k`` Gram matrix leaves ``x``'s device."""
    if x.is_floating_point():
        gram = x.double() @ x.double().T
    else:  # 0/1 masks: the float32 Gram matrix holds integer counts, exact below 2^24
        if x.shape[1] >= 2**24:
            raise ValueError("the float32 Gram matrix is exact only for d < 2^24 coordinates")
        b = x.to(torch.float32)
        gram = b @ b.T
    gram = gram.cpu().double().numpy()
    row = gram.mean(axis=1, keepdims=True)
    with _one_thread():  # threaded LAPACK is far slower than one thread on a k x k problem
        eigenvalues, eigenvectors = np.linalg.eigh(gram - row - row.T + gram.mean())
    order = np.argsort(eigenvalues)[::-1]
    return eigenvalues[order], eigenvectors[:, order]


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """Coordinates of the ``k`` rows of ``x`` (binary masks, or any ``[k, d]`` matrix) on their
    first two principal components, ``[k, 2]``, a float64 CPU tensor.

    Through the ``k x k`` Gram matrix ``G = x x^T``, computed on ``x``'s device (float32 for
    bool masks, exact; float64 otherwise): centred as ``H G H`` with ``H = I - 11^T / k`` and,
    with ``H G H = V L V^T``, the scores are ``V[:, :2] sqrt(L[:2])`` (the same as the SVD of the
    centred rows). Each axis' sign is fixed so that its largest-magnitude score is positive.
    """
    eigenvalues, eigenvectors = _centred_gram_eigh(x)
    points = eigenvectors[:, :2] * np.sqrt(np.clip(eigenvalues[:2], 0.0, None))
    signs = np.sign(points[np.abs(points).argmax(axis=0), [0, 1]])
    return torch.from_numpy(points * np.where(signs == 0, 1.0, signs))


def variance_share(x: torch.Tensor) -> torch.Tensor:
    """Share of the rows' total variance along each of the first two principal components of
    :func:`pca_2d`: ``L[:2] / sum(L)``, ``[2]`` float64 on the CPU (0 when the rows coincide)."""
    eigenvalues = np.clip(_centred_gram_eigh(x)[0], 0.0, None)
    total = eigenvalues.sum()
    return torch.from_numpy(eigenvalues[:2] / total if total > 0 else np.zeros(2))


def ashman_d(means: np.ndarray, covariances: np.ndarray) -> float:
    """Ashman's D of two Gaussian components along the line of their means.

    With ``e = (mu_1 - mu_2) / |mu_1 - mu_2|`` and ``s_c^2 = e^T Sigma_c e``:
    ``D = sqrt(2) |mu_1 - mu_2| / sqrt(s_1^2 + s_2^2)`` (0 when the means coincide).
    D > 2 is the usual "clean separation" of two 1-D Gaussians.
    """
    diff = means[0] - means[1]
    gap = float(np.linalg.norm(diff))
    if gap == 0.0:
        return 0.0
    e = diff / gap
    spread = float(e @ covariances[0] @ e + e @ covariances[1] @ e)
    return math.sqrt(2.0) * gap / math.sqrt(spread)


def robust_spread(points: np.ndarray) -> float:
    """The median distance of ``points`` ``[m, 2]`` to their coordinate-wise median (0 for one point):
    a spread that a single far-away member cannot inflate."""
    if len(points) == 0:
        return math.nan
    return float(np.median(np.linalg.norm(points - np.median(points, axis=0), axis=1)))


def collapsed_strays(points: np.ndarray, collapsed: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The rows of the ``collapsed`` group (a boolean row mask) farther than ``CORE_RADIUS``
    robust spreads of the ``reference`` group from the collapsed group's median point: clients
    the mixture merely attached to the collapsed core."""
    group = np.flatnonzero(collapsed)
    if len(group) == 0:
        return group
    distance = np.linalg.norm(points[group] - np.median(points[group], axis=0), axis=1)
    return group[distance > CORE_RADIUS * robust_spread(points[reference])]


def read_partition(points: np.ndarray, labels: np.ndarray, root: int) -> dict[str, Any]:
    """What the 2-component partition ``labels`` of ``points`` ``[k, 2]`` says about collapse.

    ``inside``: the rows of the root's component (the root included); ``other_size``: the clients
    outside it; ``spread_ratio``: the other component's
    :func:`~skymask_lite.clustering.robust_spread` over the root component's (root included;
    ``inf`` if the other component is empty); ``root_side_ratio``: the
    root component's CLIENTS' robust spread (the root left out) over the other component's
    (``inf`` unless at least two clients share the root's component).

    The root is one point among ``n + 1``; its mask is trained on the small root set and can lie
    apart from every client's. The mixture may then put it beside a collapsed group of colluders
    (``root_side_ratio`` small): the collapsed group is still the colluders', wherever the root
    fell (the 10-client run of the chapter "SkyMask in a real federation").
    """
    inside = labels == labels[root]
    clients_inside = inside.copy()
    clients_inside[root] = False
    other_size = int((~inside).sum())
    spread_ratio = math.inf
    if other_size:
        spread_ratio = robust_spread(points[~inside]) / max(robust_spread(points[inside]), 1e-300)
    root_side_ratio = math.inf
    if other_size and clients_inside.sum() >= 2:
        root_side_ratio = robust_spread(points[clients_inside]) / max(robust_spread(points[~inside]), 1e-300)
    return {"inside": inside, "other_size": other_size, "spread_ratio": spread_ratio,
            "root_side_ratio": root_side_ratio}


def benign_side(points: np.ndarray, partition: dict[str, Any], root: int) -> tuple[np.ndarray, list[int]]:
    """The rows ``collapse_or_ashman`` keeps once it has chosen two clusters, and its strays.

    A collapsed component (``COLLAPSE_RATIO``) is the colluders': if it is the other one, the
    root's component is kept; if the root's own clients collapsed (``root_side_ratio``), the
    OTHER component is kept. Either way the collapsed group's strays
    (:func:`~skymask_lite.clustering.collapsed_strays`, measured against the kept component's
    spread) are kept too. No collapse: the root's component.
    """
    inside = partition["inside"]
    if partition["spread_ratio"] < COLLAPSE_RATIO:
        kept, collapsed = inside.copy(), ~inside
    elif partition["root_side_ratio"] < COLLAPSE_RATIO:
        kept, collapsed = ~inside, inside.copy()
        collapsed[root] = False
    else:
        return inside.copy(), []
    strays = collapsed_strays(points, collapsed, kept).tolist()
    kept[strays] = True
    return kept, strays


def _two_clusters(
    criterion: str, threshold: float | None, bic: dict[int, float], d: float, margin: float,
    other_size: int, spread_ratio: float, root_side_ratio: float = math.inf,
) -> bool:
    """Apply the 1-vs-2 criterion (see the module docstring)."""
    if criterion == "always":
        return True
    if criterion == "bic_margin":
        return margin > threshold
    if criterion == "collapse_or_ashman":  # a cluster is >= 2 clients: tight (colluding) or far apart
        collapsed = spread_ratio < COLLAPSE_RATIO
        root_side_collapsed = root_side_ratio < COLLAPSE_RATIO
        return bic[2] < bic[1] and (root_side_collapsed or (other_size >= 2 and (collapsed or d > threshold)))
    return bic[2] < bic[1] and (criterion == "bic" or d > threshold)


def _mixture_info(fit: Mixture) -> dict[str, torch.Tensor]:
    """Labels of every point, means and covariances of a fitted mixture, as CPU tensors."""
    return {
        "labels": torch.from_numpy(fit.labels).long(),
        "means": torch.from_numpy(fit.means),
        "covariances": torch.from_numpy(fit.covariances),
    }


def cluster_masks(
    binary_masks: torch.Tensor,
    *,
    root_index: int = -1,
    seed: int = 0,
    criterion: str = "collapse_or_ashman",
    threshold: float | None = None,
    n_init: int = 3,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Who is benign, from the binary masks (SkyMask, step 5).

    PCA to 2-D (:func:`pca_2d`), full-covariance Gaussian mixtures with 1 and 2 components
    (``random_state=seed``), then ``criterion`` decides between one cluster (no attack: everyone
    is benign) and two (benign = the clients sharing the root mask's component; possibly none).

    Args:
        binary_masks: ``[k, d]`` bool/0-1 masks, one of them the root's.
        root_index: the root's row (default: last).
        criterion: "collapse_or_ashman" (the default: BIC prefers 2, the other component of the
            2-component fit holds at least 2 clients, and it is either collapsed, its
            :func:`~skymask_lite.clustering.robust_spread` below ``COLLAPSE_RATIO`` times the root
            component's, or apart, Ashman's D > threshold, default 8; or BIC prefers 2 and the
            CLIENTS of the root's component collapsed, ``root_side_ratio`` below
            ``COLLAPSE_RATIO``, in which case the other component is kept: see
            :func:`~skymask_lite.clustering.read_partition`), "ashman" (BIC prefers 2 and D > threshold),
            "bic_margin" (``(BIC1 - BIC2) / |BIC1| > threshold``, default 0.2), "bic" (BIC prefers 2)
            or "always" (two clusters, as in the authors' code).
        threshold: overrides the criterion's default (``DEFAULT_THRESHOLD``).

    Returns:
        ``(benign, info)``: ``benign`` is a long tensor of positions among the NON-root rows
        (client indices ``0..k-2`` when the root is last), on the masks' device. ``info`` holds
        ``points`` ``[k, 2]``; ``labels``, ``means``, ``covariances`` of the chosen mixture;
        ``fit2`` (the same for the 2-component mixture); ``bic`` ``{1: ., 2: .}``; ``ashman_d``;
        ``relative_bic_margin``; ``other_size`` and ``spread_ratio`` (the 2-component fit's
        non-root component: its number of clients and robust spread over the root component's);
        ``root_side_ratio`` (:func:`~skymask_lite.clustering.read_partition`);
        ``strays`` (rows of a collapsed component farther than ``CORE_RADIUS`` from its
        core, kept as benign);
        ``num_clusters``; ``root_label``; ``criterion``; ``threshold``.
    """
    if criterion not in DEFAULT_THRESHOLD:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {sorted(DEFAULT_THRESHOLD)}")
    threshold = DEFAULT_THRESHOLD[criterion] if threshold is None else threshold
    k = binary_masks.shape[0]
    root = root_index % k
    points = pca_2d(binary_masks)
    xy = points.numpy()
    # identical masks (fewer distinct points than components) are legitimate: two coinciding
    # components, D = 0; one component needs no restarts
    fits = {1: fit_mixture(xy, 1, seed, 1), 2: fit_mixture(xy, 2, seed, n_init)}
    bic = {c: fits[c].bic for c in (1, 2)}
    margin = (bic[1] - bic[2]) / abs(bic[1]) if bic[1] != 0 else math.inf
    d = ashman_d(fits[2].means, fits[2].covariances)
    partition = read_partition(xy, fits[2].labels, root)  # the 2-component partition
    ratio, root_side = partition["spread_ratio"], partition["root_side_ratio"]
    two = _two_clusters(criterion, threshold, bic, d, margin, partition["other_size"], ratio, root_side)
    num_clusters = 2 if two else 1
    chosen = _mixture_info(fits[num_clusters])
    root_label = int(chosen["labels"][root])
    same = chosen["labels"] == root_label
    strays = []
    if criterion == "collapse_or_ashman" and num_clusters == 2:
        kept, strays = benign_side(xy, partition, root)
        same = torch.from_numpy(kept)
    benign = torch.nonzero(torch.cat([same[:root], same[root + 1 :]])).flatten().to(binary_masks.device)
    info = {
        "points": points,
        **chosen,
        "fit2": _mixture_info(fits[2]),
        "bic": bic,
        "ashman_d": d,
        "relative_bic_margin": margin,
        "other_size": partition["other_size"],
        "spread_ratio": ratio,
        "root_side_ratio": partition["root_side_ratio"],
        "strays": strays,
        "num_clusters": num_clusters,
        "root_label": root_label,
        "criterion": criterion,
        "threshold": threshold,
    }
    return benign, info
