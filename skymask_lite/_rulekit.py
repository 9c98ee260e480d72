"""Small pieces the aggregation rules of :mod:`skymask_lite.defenses` and
:mod:`skymask_lite.detectors` share: the usual median, cosine distances, clipping, HDBSCAN
labels, the output layer's slice of an update, and the rounding of decision statistics."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import HDBSCAN
from torch import nn

from .models import param_slices

__all__ = [
    "all_clients",
    "check_clients",
    "clip_to_norm",
    "cosine_distances",
    "hdbscan_labels",
    "mean_of",
    "median_of",
    "middle_ranks",
    "output_layer",
    "rounded",
    "shares",
    "summary",
    "to_numpy",
]


def all_clients(n: int, device: torch.device) -> torch.Tensor:
    """Every client's index, for rules that keep everybody."""
    return torch.arange(n, device=device)


def mean_of(updates: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Mean of the kept rows; the zero vector when nobody is kept."""
    if kept.numel() == 0:
        return torch.zeros_like(updates[0])
    return updates[kept].mean(dim=0)


def middle_ranks(k: int) -> tuple[int, int]:
    """The ranks of the middle values of ``k`` sorted values (the same one for odd ``k``)."""
    return (k - 1) // 2, k // 2


def median_of(x: torch.Tensor, dim: int = 0, *, presorted: bool = False) -> torch.Tensor:
    """The usual median (mean of the two middle values for an even count), unlike
    :meth:`torch.Tensor.median`, which returns the lower one. ``presorted``: ``x`` is already
    sorted along ``dim``."""
    s = x if presorted else x.sort(dim=dim).values
    lo, hi = middle_ranks(x.shape[dim])
    return (s.select(dim, lo) + s.select(dim, hi)) / 2


def cosine_distances(x: torch.Tensor) -> torch.Tensor:
    """Pairwise ``1 - cos(x_i, x_j)`` from one Gram matrix, in ``[0, 2]`` with a zero diagonal.

    The Gram matrix is symmetrised, ``(G + G^T) / 2``: a float32 matmul need not return an exactly
    symmetric one (for some ``n``), which HDBSCAN rejects as a precomputed distance; where it is
    symmetric the average changes no bit.
    """
    unit = F.normalize(x, dim=1)
    gram = unit @ unit.T
    dist = (1 - (gram + gram.T) / 2).clamp_(0, 2)
    return dist.fill_diagonal_(0)


def clip_to_norm(updates: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """``U_i * min(1, bound / ||U_i||)`` row-wise."""
    norms = updates.norm(dim=1, keepdim=True)
    return updates * (bound / norms.clamp_min(torch.finfo(updates.dtype).tiny)).clamp(max=1)


def to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy()


def output_layer(updates: torch.Tensor, net: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
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


def hdbscan_labels(features: torch.Tensor, *, precomputed: bool, min_cluster_size: int) -> np.ndarray:
    """HDBSCAN labels (``-1`` = noise) with ``min_samples = 1`` and a single cluster allowed."""
    return HDBSCAN(
        min_cluster_size=min_cluster_size,
        min_samples=1,
        metric="precomputed" if precomputed else "euclidean",
        allow_single_cluster=True,
        copy=True,
    ).fit_predict(to_numpy(features))


def check_clients(rule: str, n: int, minimum: int) -> None:
    if n < minimum:
        raise ValueError(f"{rule} clusters the updates and needs at least {minimum} clients, got n={n}")


def rounded(x: float | torch.Tensor) -> float:
    """A statistic for ``defense_info``: a Python float with 4 significant digits."""
    return float(f"{float(x):.4g}")


def summary(x: torch.Tensor) -> dict[str, float] | None:
    """``{min, median, max}`` of a 1-D tensor, rounded (``None`` when it is empty)."""
    if x.numel() == 0:
        return None
    x = x.double()
    return {"min": rounded(x.min()), "median": rounded(median_of(x)), "max": rounded(x.max())}


def shares(indices: torch.Tensor, n: int) -> torch.Tensor:
    """Per client, the share of coordinates in which it appears in ``indices`` ``[k, d]``
    (a row index per coordinate, e.g. the rows a sort put at given ranks), ``[n]``."""
    return torch.bincount(indices.flatten(), minlength=n).double() / indices.shape[1]
