"""SkyMask (Yan et al., "SkyMask: Attack-agnostic robust federated learning with fine-grained
learnable masks", ECCV 2024, arXiv 2312.12484): the server's mask step, one function per idea.

Every round, with the paper's symbols (``w`` the global parameters, ``U_i`` client ``i``'s update,
``g0`` the server's own update on its root data, ``d`` parameters, ``n`` clients)::

    1. models      W_i = w + U_i (i = 1..n),  W_0 = w + g0          -> [n+1, d], root LAST (row n)
    2. masks       M, [n+1, d] logits, all = 1 (sigmoid(1) = 0.731); the W_i are frozen;
                   masked model, per coordinate:  W = sum_i sigmoid(M_i) W_i / sum_i sigmoid(M_i)
    3. training    only M, on the full root batch, cross-entropy, at most 20 steps, early stop
    4. binarise    B_i = 1[sigmoid(M_i) > tau],  tau = 0.5
    5. clustering  PCA of the B_i to 2-D, Gaussian mixtures with 1 and 2 components; one
                   cluster -> no attack, everyone is kept; two -> keep the ROOT mask's cluster
    6. aggregate   plain mean of the kept clients' ORIGINAL updates U_i (zero if nobody is kept)

:func:`stack_models`, :func:`train_masks`, :func:`binarize`, :func:`~skymask_lite.clustering.cluster_masks` and
:func:`average_kept` are the steps; :func:`skymask` chains them into an aggregation rule
returning an :class:`~skymask_lite.aggregation.Aggregation`, whose ``stats`` (recorded per round
as ``defense_info``) are :func:`decision_stats`. The blocked kernels of step 3 live in the
private module ``skymask_lite._mask_kernels``.

BatchNorm: running statistics are buffers, never masked. The masked model is evaluated in
EVAL mode with the buffers it is given (the global model's, or the average of the clients'),
so BatchNorm normalises with those statistics instead of the root batch's, and mask
training never writes to them.

1 vs 2 clusters (the paper: without attack the masks form one cluster and nobody is removed).
BIC alone does not work: honest non-IID label groups are visible in mask space, and BIC then
prefers two components without any attack. Default (``criterion="collapse_or_ashman"``): two
clusters only if BIC prefers two components, the non-root component of the 2-component fit
holds at least two clients, and that component is either

* collapsed: its robust spread (median distance to its median point) is below
  ``COLLAPSE_RATIO = 0.1`` times the root component's. Colluding attackers (Min-Max, Fang, LIE)
  send one crafted update, so their masks coincide; honest clients' data differ, so do their
  masks. The cluster then is its core, the clients within ``CORE_RADIUS = 0.5`` root spreads of
  its median point: an honest client the mixture attached to it from farther away is kept; or
* apart: Ashman's D of the two components along the line of their means exceeds 8 (D is
  dimensionless, independent of the scale of the PCA coordinates).

A collapsed group is the colluders' wherever the root falls: when the mixture puts the root
beside it (the root's mask, trained on 100 examples, can lie apart from every client's; with
10 clients it happened), the root's component's CLIENTS are collapsed and the OTHER component is
kept (``root_side_ratio`` of :func:`~skymask_lite.clustering.read_partition`).

``"ashman"`` (the earlier rule: BIC and D > 8 alone) misses LIE under strong label skew and
splits off single honest outliers; the chapter "Is there an attack?" measures both rules on
``data/results/decision/``. ``"bic_margin"`` (relative BIC margin, depends on the
coordinates' units), ``"bic"`` and ``"always"`` (the authors' code) are there for comparison.

How this differs from the authors' code:

* models are ``w + U_i``; the authors define the update as ``w - w_local`` and rebuild the model
  as ``w - local_lr * update``, i.e. ``w + local_lr * U_i``: the same direction, rescaled by
  ``local_lr`` (not flipped);
* every parameter reads its own slice of the flat vector; the authors never advance their
  slice index, so every layer reads the first slice;
* cross-entropy over the CLASS dimension; the authors apply log-softmax over the batch (dim 0);
* the number of clusters is decided (see above); the authors always force two, dropping whole
  honest label groups when there is no attack;
* an empty root cluster gives a zero update; the authors divide by zero.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from ._mask_kernels import (
    ColumnBlocks,
    MaskedAverage,
    binarize_columns,
    eval_mode,
    from_blocks,
    resolve_block,
    stack_blocks,
    to_blocks,
    train_mask_columns,
)
from .aggregation import Aggregation, check_updates
from .clustering import (
    COLLAPSE_RATIO,
    CORE_RADIUS,
    DEFAULT_THRESHOLD,
    ashman_d,
    cluster_masks,
    collapsed_strays,
    pca_2d,
    robust_spread,
    variance_share,
)
from .models import unflatten

__all__ = [
    "ColumnBlocks",
    "DEFAULT_LR",
    "DEFAULT_THRESHOLD",
    "MIN_KEPT_SHARE",
    "NORM_RATIO_RANGE",
    "COLLAPSE_RATIO",
    "CORE_RADIUS",
    "ashman_d",
    "average_kept",
    "binarize",
    "cluster_masks",
    "collapsed_strays",
    "decision_stats",
    "mask_geometry",
    "masked_logits",
    "masked_weights",
    "robust_spread",
    "pca_2d",
    "skymask",
    "stack_models",
    "train_masks",
    "variance_share",
]

DEFAULT_LR = {"clipped_sgd": 1e7, "sign_sgd": 1.0, "adam": 0.1}
"""Mask optimisers and their default learning rates. ``clipped_sgd`` is the authors': SGD after
clamping every gradient element to ``[-grad_clip, grad_clip]`` (lr 1e7, clip 1e-7: at most one
logit per step; they use lr 1e8 for ResNet20)."""

NORM_RATIO_RANGE = (0.1, 10.0)
"""The range of ``||g0|| / median_i ||U_i||`` outside which the round's statistics get a warning.

The root mask anchors the cluster choice, and a root update an order of magnitude larger or
smaller than the clients' gives a mask unlike any honest client's. The server may observe
this, so the rule warns; it does not rescale anything."""

MIN_KEPT_SHARE = 0.5
"""The share of the clients under which a kept cluster gets a warning in the round's statistics.

The rule assumes an honest majority, so a kept minority means the root's cluster is suspect."""


def stack_models(
    global_params: torch.Tensor,
    updates: torch.Tensor,
    root_update: torch.Tensor,
    *,
    blocked: bool = False,
    block: int | None = None,
) -> torch.Tensor | ColumnBlocks:
    """The frozen models of step 1: ``W_i = w + U_i`` for the ``n`` clients, then ``W_0 = w + g0``
    as the LAST row; ``[n+1, d]``, written in one pass into one buffer.

    ``blocked=True`` writes them straight into the :class:`ColumnBlocks` layout that
    :func:`train_masks` computes in (``block`` as there): :func:`skymask` does so, which makes
    neither the ``[n+1, d]`` matrix nor a blocked copy of it.
    """
    n, d = updates.shape
    if global_params.shape != (d,) or root_update.numel() != d:
        raise ValueError(
            f"global_params and root_update must be [d] with d = {d} (the updates' columns); "
            f"got {tuple(global_params.shape)} and {tuple(root_update.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(global_params.dtype, updates.dtype), root_update.dtype)
    if blocked:
        return stack_blocks(global_params, updates, root_update, dtype, resolve_block(block, updates.device, d))
    models = torch.empty(n + 1, d, dtype=dtype, device=updates.device)
    torch.add(global_params, updates, out=models[:n])  # W_i = w + U_i
    torch.add(global_params, root_update.reshape(d), out=models[n])  # W_0 = w + g0
    return models


def masked_weights(models: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """The masked model of SkyMask (step 2), per coordinate ``j``::

        W[j] = sum_i sigmoid(M[i, j]) * W_i[j] / sum_i sigmoid(M[i, j])

    Args:
        models: the frozen models ``W_i``, ``[k, d]``.
        mask_logits: the mask logits ``M``, ``[k, d]``.

    Returns:
        ``[d]``, differentiable in ``M`` (closed-form backward) and in the models.
    """
    if models.shape != mask_logits.shape or models.dim() != 2:
        raise ValueError(
            f"models and mask_logits must both be [k, d]; got {tuple(models.shape)} and {tuple(mask_logits.shape)}"
        )
    return MaskedAverage.apply(models, mask_logits)


def masked_logits(
    net: nn.Module,
    models: torch.Tensor,
    mask_logits: torch.Tensor,
    x: torch.Tensor,
    *,
    buffers: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Output of the masked model ``W = masked_weights(models, M)`` on ``x``, in eval mode.

    One :func:`torch.func.functional_call` of ``net`` on ``{unflatten(W), buffers}``: no loop
    over clients or layers. ``buffers`` (BatchNorm statistics) are used as they are, never masked.
    """
    state = {**unflatten(masked_weights(models, mask_logits), net), **(buffers or {})}
    with eval_mode(net):
        return functional_call(net, state, (x,))


def train_masks(
    net: nn.Module,
    models: torch.Tensor | ColumnBlocks,
    root_x: torch.Tensor,
    root_y: torch.Tensor,
    *,
    buffers: dict[str, torch.Tensor] | None = None,
    steps: int = 20,
    init: float = 1.0,
    optimizer: str = "clipped_sgd",
    lr: float | None = None,
    grad_clip: float | None = 1e-7,
    patience: int = 10,
    min_delta: float = 1e-2,
    block: int | None = None,
    graph: bool | None = None,
) -> tuple[torch.Tensor | ColumnBlocks, list[float]]:
    """Train the mask logits ``M`` of the frozen models ``W_i`` on the root data (SkyMask, step 3).

    Minimises ``CE(f_W(root_x), root_y)`` (cross-entropy over classes, mean over the full root
    batch) in ``M`` only, with ``W = masked_weights(models, M)``; ``M`` starts at ``init``
    everywhere. Early stop: when the loss improved by less than ``min_delta`` over the last
    ``patience`` steps (set ``patience >= steps`` to disable).

    Each step is the forward and closed-form backward of :func:`masked_weights`, computed over
    contiguous column blocks (:class:`ColumnBlocks`; a ``[k, d]`` matrix is copied into them
    once) with preallocated buffers; only the ``[d]`` masked model goes through autograd and
    the network. The result equals autograd through :func:`masked_logits` up to float
    rounding (the root images are fed in channels-last order, see
    :func:`~skymask_lite.models.channels_last`; see the tests).

    Args:
        net: architecture template (its own parameters are not used).
        models: ``[k, d]`` flat models ``W_i`` (clients first, root last in :func:`skymask`), or
            the same as :class:`ColumnBlocks` (``stack_models(..., blocked=True)``); read only.
        buffers: float buffers (BatchNorm statistics) used unmasked, in eval mode; pass the
            global model's or the clients' average (``None``: the template's own buffers).
        optimizer: "clipped_sgd" (the authors': ``M -= lr * clamp(grad, -grad_clip, grad_clip)``,
            lr 1e7; use 1e8 for ResNet20), "sign_sgd" (``M -= lr * sign(grad)``, lr 1) or
            "adam" (lr 0.1). ``lr=None`` takes the default of :data:`DEFAULT_LR`.
        block: columns per block of a ``[k, d]`` ``models``, a memory layout only (the result
            does not depend on it beyond float rounding); ``None``: cache-sized blocks on a CPU,
            one whole block on other devices.
        graph: replay each step as one CUDA graph (the same operations, one launch instead
            of a few hundred per step); ``None``: on CUDA for the SGD optimizers, unless the
            environment variable ``SKYMASK_MASK_GRAPH=0`` switches graphs off. The graph is
            kept for the next call with the same shapes (the next round) and holds its own
            copies of the inputs (about four ``[k, d]`` matrices) until then;
            ``skymask_lite._mask_kernels.CAPTURED.clear()`` releases them.

    Returns:
        ``(M, losses)``: the detached logits, ``[k, d]`` (:class:`ColumnBlocks` for blocked
        models), and the root loss before each step
        (``losses[t]`` after ``t`` updates; the last entry is the returned mask's loss when
        early stopping fired).
    """
    if optimizer not in DEFAULT_LR:
        raise ValueError(f"unknown mask optimizer {optimizer!r}; choose one of {sorted(DEFAULT_LR)}")
    blocked = isinstance(models, ColumnBlocks)
    if not blocked:
        if models.dim() != 2:
            raise ValueError(f"models must be a [k, d] matrix (one flat model per row), got {tuple(models.shape)}")
        models = to_blocks(models.detach(), resolve_block(block, models.device, models.shape[1]))
    logits, losses = train_mask_columns(
        net, models, root_x, root_y, buffers=buffers, steps=steps, init=init, optimizer=optimizer,
        lr=DEFAULT_LR[optimizer] if lr is None else lr, grad_clip=grad_clip, patience=patience, min_delta=min_delta,
        graph=graph,
    )
    return (logits if blocked else from_blocks(logits)), losses


def binarize(
    mask_logits: torch.Tensor | ColumnBlocks, tau: float = 0.5, *, block: int | None = None
) -> torch.Tensor:
    """Binary masks ``B = 1[sigmoid(M) > tau]`` (SkyMask, step 4), a bool tensor of ``M``'s shape.

    A ``[k, d]`` ``M`` (or :class:`ColumnBlocks`, as :func:`train_masks` returns for blocked
    models) is thresholded over column blocks (``block`` as in :func:`train_masks`), so no
    ``[k, d]`` float copy of ``sigmoid(M)`` is made; the result does not depend on ``block``.
    """
    if isinstance(mask_logits, ColumnBlocks):
        return binarize_columns(mask_logits, tau, mask_logits.data.shape[2])
    if mask_logits.dim() != 2:
        return torch.sigmoid(mask_logits) > tau
    return binarize_columns(mask_logits, tau, resolve_block(block, mask_logits.device, mask_logits.shape[1]))


def average_kept(updates: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Step 6: the plain mean of the kept clients' original updates, ``mean_{i in kept} U_i``
    (a zero update when nobody is kept: the server then keeps ``w``)."""
    return updates[kept].mean(dim=0) if len(kept) else torch.zeros_like(updates[0])


def _finite(value: float) -> float | None:
    """``value`` as a Python float, ``None`` when it is not finite (JSON has no Inf or NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


def decision_stats(
    info: dict[str, Any], kept: torch.Tensor, updates: torch.Tensor, root_update: torch.Tensor
) -> dict[str, Any]:
    """SkyMask's decision statistics for the round record (``defense_info``), small and JSON-safe.

    ``num_clusters``, ``ashman_d``, ``bic_1`` and ``bic_2`` (BIC of the 1- and 2-component
    mixtures), ``criterion`` and ``threshold`` come from :func:`~skymask_lite.clustering.cluster_masks`' ``info``;
    ``root_cluster_size`` is the number of clients in the root's cluster (the root not counted);
    ``root_norm_ratio`` is ``||g0|| / median_i ||U_i||``. ``warnings`` lists why the decision is
    suspect: the ratio outside :data:`NORM_RATIO_RANGE`, or fewer than :data:`MIN_KEPT_SHARE` of
    the clients kept.
    """
    n = updates.shape[0]
    norms = torch.linalg.vector_norm(updates, dim=1)  # [n], ||U_i||
    ratio = _finite((torch.linalg.vector_norm(root_update) / torch.quantile(norms, 0.5)).item())
    low, high = NORM_RATIO_RANGE
    problems = []
    if ratio is None or not low <= ratio <= high:
        problems.append(
            f"root update norm / median client update norm = {ratio}, outside [{low}, {high}]: "
            "the root mask may not represent the honest clients"
        )
    if len(kept) < MIN_KEPT_SHARE * n:
        problems.append(
            f"kept {len(kept)} of {n} clients, fewer than {MIN_KEPT_SHARE:.0%}: the root's cluster is a minority"
        )
    threshold = info["threshold"]
    return {
        "num_clusters": int(info["num_clusters"]),
        "ashman_d": _finite(info["ashman_d"]),
        "bic_1": _finite(info["bic"][1]),
        "bic_2": _finite(info["bic"][2]),
        "root_cluster_size": int(len(kept)),
        "other_size": int(info["other_size"]),
        "spread_ratio": _finite(info["spread_ratio"]),
        "root_side_ratio": _finite(info.get("root_side_ratio", math.inf)),
        "strays": [int(i) for i in info.get("strays", [])],
        "root_norm_ratio": ratio,
        "criterion": info["criterion"],
        "threshold": None if threshold is None else float(threshold),
        "warnings": problems,
    }


def mask_geometry(masks: torch.Tensor, info: dict[str, Any], digits: int = 5) -> dict[str, Any]:
    """Everything a study of the 1-vs-2 decision needs to recompute it offline, JSON-safe: the
    masks' 2-D PCA ``points`` (``[k, 2]``, root last), the 2-component mixture (``labels``,
    ``means``, ``covariances``), and per mask the share of its bits that differ from the root's
    (``root_hamming``, ``mean_i 1[B_i != B_root]``) and the share of its bits that are 1
    (``ones``)."""
    bits = masks.to(torch.float32)
    root_hamming = (bits - bits[-1]).abs_().mean(dim=1)  # [k]
    ones = bits.mean(dim=1)  # [k]
    fit2 = info["fit2"]

    def rounded(t: torch.Tensor) -> Any:
        return np.round(t.detach().cpu().double().numpy(), digits).tolist()

    return {
        "points": rounded(info["points"]),
        "labels": fit2["labels"].tolist(),
        "means": rounded(fit2["means"]),
        "covariances": rounded(fit2["covariances"]),
        "root_hamming": rounded(root_hamming),
        "ones": rounded(ones),
    }


def skymask(
    updates: torch.Tensor,
    *,
    net: nn.Module,
    global_params: torch.Tensor,
    root_x: torch.Tensor,
    root_y: torch.Tensor,
    root_update: torch.Tensor | None,
    global_buffers: dict[str, torch.Tensor] | None = None,
    steps: int = 20,
    tau: float = 0.5,
    seed: int = 0,
    optimizer: str = "clipped_sgd",
    lr: float | None = None,
    grad_clip: float | None = 1e-7,
    patience: int = 10,
    min_delta: float = 1e-2,
    criterion: str = "collapse_or_ashman",
    threshold: float | None = None,
    n_init: int = 3,
    return_masks: bool = False,
    record_geometry: bool = False,
) -> Aggregation:
    """The SkyMask aggregation rule (Yan et al., ECCV 2024), steps 1-6 of the module docstring.

    ``global_buffers`` are the BatchNorm statistics the masked model is evaluated with (eval
    mode, never masked). Returns the mean of the kept clients' ORIGINAL updates (a zero update
    with empty ``kept`` when no client shares the root's cluster). ``info`` holds the cluster
    info of :func:`~skymask_lite.clustering.cluster_masks`, ``mask_losses``, ``mask_seconds``,
    ``cluster_seconds`` and, if
    ``return_masks``, ``masks`` (the ``[n+1, d]`` binary masks); ``stats`` holds
    :func:`decision_stats` and, with ``record_geometry``, :func:`mask_geometry` (for studies of
    the 1-vs-2 decision).
    """
    check_updates(updates)
    if root_update is None:
        raise ValueError(
            "the SkyMask defense needs the server's root update g0 (root_update); compute it on the root data"
        )
    start = time.perf_counter()
    models = stack_models(global_params, updates, root_update, blocked=True)  # [n+1, d], root last, in blocks
    mask_logits, losses = train_masks(
        net, models, root_x, root_y, buffers=global_buffers, steps=steps, optimizer=optimizer, lr=lr,
        grad_clip=grad_clip, patience=patience, min_delta=min_delta,
    )
    del models
    masks = binarize(mask_logits, tau)  # [n+1, d] bool
    del mask_logits
    middle = time.perf_counter()
    kept, info = cluster_masks(masks, seed=seed, criterion=criterion, threshold=threshold, n_init=n_init)
    end = time.perf_counter()
    kept = kept.to(updates.device)
    info.update(mask_losses=losses, mask_seconds=middle - start, cluster_seconds=end - middle)
    if return_masks:
        info["masks"] = masks
    stats = decision_stats(info, kept, updates, root_update)
    if record_geometry:
        stats["geometry"] = mask_geometry(masks, info)
    return Aggregation(average_kept(updates, kept), kept, info, stats)
