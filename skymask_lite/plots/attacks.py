"""Chapter 2's figures: what the attacks do to the clients' updates."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from ..skymask import pca_2d, variance_share
from .style import BENIGN, FIGSIZE, IMAGE_CMAP, MALICIOUS, PALETTE, ROLE_COLORS, SMALL_FONT, THUMBNAIL, as_image
from .style import image_axes, jitter, panels, row_mask

__all__ = ["coordinate_ranges", "gamma_search", "image_rows", "role_strips", "update_pca"]


def image_rows(rows: Mapping[str, torch.Tensor], *, titles: Sequence[str] | None = None) -> Figure:
    """Images in labelled rows, e.g. ``{"clean": x, "with the trigger": add_trigger(x)}``.

    Args:
        rows: ``{row label: images [k, C, H, W]}``, the same ``k`` in every row (each image is shown
            min-max rescaled, like :func:`~skymask_lite.plots.example_images`).
        titles: one title per column (e.g. the labels), optional.
    """
    counts = {label: images.shape[0] if isinstance(images, torch.Tensor) and images.dim() == 4 else None
              for label, images in rows.items()}
    if not rows or None in counts.values() or len(set(counts.values())) != 1:
        raise ValueError(f"rows must map labels to [k, C, H, W] image batches with the same k, got {counts}")
    k = next(iter(counts.values()))
    if titles is not None and len(titles) != k:
        raise ValueError(f"titles must give one title per column ({k}), got {len(titles)}")
    top = list(titles) if titles is not None else [""] * k
    fig, axes = panels(top + [""] * (k * (len(rows) - 1)), ncols=k, width=THUMBNAIL * k + 1.0,
                       height=THUMBNAIL * len(rows) + 0.5, keep_aspect=True)  # + 1 in for the row labels
    axes = axes.reshape(len(rows), k)
    for r, (label, images) in enumerate(rows.items()):
        for c in range(k):
            axes[r, c].imshow(as_image(images[c]), cmap=IMAGE_CMAP, vmin=0, vmax=1)
            image_axes(axes[r, c])
            axes[r, c].title.set_fontsize(SMALL_FONT)
        axes[r, 0].set_ylabel(label, fontsize=SMALL_FONT)
    return fig


def coordinate_ranges(
    benign: torch.Tensor,
    malicious: torch.Tensor,
    *,
    coords: Sequence[int] | None = None,
    title: str | None = None,
) -> Figure:
    """Per coordinate ``j`` (one column each): the benign values ``B_ij`` (dots), their range
    ``[min_i B_ij, max_i B_ij]`` (a bar), their mean (a tick) and the malicious values (crosses).

    Args:
        benign: benign updates ``[nb, d]``.
        malicious: the crafted updates, ``[f, d]`` or one row ``[d]``.
        coords: the coordinates to show (default: all ``d``).
        title: the axes' title.
    """
    if benign.dim() != 2:
        raise ValueError(f"benign must be a [nb, d] matrix, got shape {tuple(benign.shape)}")
    malicious = malicious.reshape(1, -1) if malicious.dim() == 1 else malicious
    if malicious.dim() != 2 or malicious.shape[1] != benign.shape[1]:
        raise ValueError(f"malicious must be [f, d] or [d] with d = {benign.shape[1]}, got {tuple(malicious.shape)}")
    coords = list(range(benign.shape[1])) if coords is None else list(coords)
    good = benign.detach().float().cpu().numpy()[:, coords]  # [nb, k]
    bad = malicious.detach().float().cpu().numpy()[:, coords]  # [f, k]
    fig, (ax,) = panels(title=title, width=max(FIGSIZE[0], 0.8 * len(coords) + 1.5))
    ax.axhline(0.0, color="0.6", linewidth=0.8)
    for k in range(len(coords)):
        first = k == 0
        ax.vlines(k, good[:, k].min(), good[:, k].max(), color=BENIGN, linewidth=6, alpha=0.25,
                  label="benign range" if first else None)
        ax.scatter(k - 0.12 + jitter(len(good), 0.06, seed=k), good[:, k], s=12, color=BENIGN,
                   label="benign" if first else None, zorder=3)
        ax.scatter([k - 0.12], [good[:, k].mean()], marker="_", s=300, color=BENIGN, linewidths=2,
                   label="benign mean" if first else None, zorder=3)
        ax.scatter(k + 0.15 + jitter(len(bad), 0.04, seed=k), bad[:, k], marker="x", s=25, color=MALICIOUS,
                   label="malicious" if first else None, zorder=4)
    ax.set_xticks(range(len(coords)), [str(j) for j in coords])
    ax.set_xlabel("coordinate j")
    ax.set_ylabel("update value")
    ax.legend(loc="best")
    return fig


def gamma_search(curves: Mapping[str, Mapping[str, Any]], *, title: str | None = None) -> Figure:
    """The ``gamma`` search of Min-Max / Min-Sum, one panel per attack: the constraint's left side
    against ``gamma`` (a line), its bound (dashed) and the ``gamma`` the search returned (vertical line).

    Args:
        curves: ``{panel title: {"gamma": [k] values, "value": [k] left sides, "bound": float,
            "best": float, "ylabel": optional str}}``.
        title: the figure's title.
    """
    for name, curve in curves.items():
        missing = sorted({"gamma", "value", "bound", "best"} - set(curve))
        if missing:
            raise ValueError(f"curve {name!r} lacks {missing}")
    fig, axes = panels(list(curves), title=title)
    for ax, (name, curve) in zip(axes, curves.items()):
        gamma, value = np.asarray(curve["gamma"], dtype=float), np.asarray(curve["value"], dtype=float)
        if gamma.shape != value.shape:
            raise ValueError(f"curve {name!r}: gamma {gamma.shape} and value {value.shape} differ in shape")
        ax.plot(gamma, value, color=PALETTE[0], label="left side")
        ax.axhline(curve["bound"], color="0.3", linestyle="--", label="bound")
        ax.axvline(curve["best"], color=MALICIOUS, label=f"returned $\\gamma$ = {curve['best']:.2f}")
        ax.set_xlabel("$\\gamma$")
        ax.set_ylabel(curve.get("ylabel", "constraint's left side"))
        ax.legend(fontsize=SMALL_FONT)
    return fig


def role_strips(
    values: Mapping[str, Mapping[str, torch.Tensor]],
    malicious: torch.Tensor | Sequence[int],
    *,
    title: str | None = None,
) -> Figure:
    """Per-client statistics, benign vs malicious: one panel per statistic, one group per setting,
    a box and the individual clients (dots) per role.

    Args:
        values: ``{statistic (panel title): {group (e.g. attack): [n] one value per client}}``.
        malicious: the malicious clients' row indices (the same in every group).
        title: the figure's title.
    """
    fig, axes = panels(list(values), title=title)
    for ax, groups in zip(axes, values.values()):
        for g, per_client in enumerate(groups.values()):
            per_client = torch.as_tensor(per_client).detach().float().cpu().reshape(-1).numpy()
            bad = row_mask(len(per_client), malicious, "malicious row")
            for role, rows, shift in (("benign", ~bad, -0.2), ("malicious", bad, 0.2)):
                if not rows.any():
                    continue
                color = {"color": ROLE_COLORS[role]}
                ax.boxplot(per_client[rows], positions=[g + shift], widths=0.3, showfliers=False, medianprops=color,
                           boxprops=color, whiskerprops=color, capprops=color)
                ax.scatter(g + shift + jitter(int(rows.sum()), 0.1, seed=g), per_client[rows], s=8, alpha=0.6,
                           color=ROLE_COLORS[role], label=role if g == 0 else None, zorder=3)
        ax.set_xticks(range(len(groups)), list(groups), fontsize=SMALL_FONT)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.legend(fontsize=SMALL_FONT)
    return fig


def update_pca(
    updates: torch.Tensor | Mapping[str, torch.Tensor],
    malicious: torch.Tensor | Sequence[int],
    *,
    title: str | None = None,
    ncols: int | None = None,
) -> Figure:
    """The clients' updates projected on their first two principal components, coloured by role.

    The projection is :func:`skymask_lite.clustering.pca_2d` (and
    :func:`~skymask_lite.clustering.variance_share` for the axis labels), fitted per panel on all its rows.

    Args:
        updates: one ``[n, d]`` update matrix, or ``{panel title: [n, d]}`` for several panels.
        malicious: the malicious clients' row indices.
        title: the panel's title (one matrix) or the figure's title (several).
        ncols: panels per row (default: all in one row up to 3 panels, else 2 per row).
    """
    matrices = dict(updates) if isinstance(updates, Mapping) else {"": updates}
    for name, matrix in matrices.items():
        if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2 or matrix.shape[0] < 3:
            raise ValueError(f"updates {name!r} must be a [n, d] tensor with n >= 3")
    projections = {name: (pca_2d(matrix).numpy(), variance_share(matrix).tolist()) for name, matrix in matrices.items()}
    fig, axes = panels(list(matrices), title=title, ncols=ncols or (len(matrices) if len(matrices) <= 3 else 2))
    for ax, (points, share) in zip(axes, projections.values()):
        bad = row_mask(len(points), malicious, "malicious row")
        for role, rows, marker in (("benign", ~bad, "o"), ("malicious", bad, "x")):
            if rows.any():
                ax.scatter(points[rows, 0], points[rows, 1], s=18, marker=marker, color=ROLE_COLORS[role],
                           label=role, alpha=0.8)
        ax.set_xlabel(f"PC 1 ({share[0]:.0%} of the variance)")
        ax.set_ylabel(f"PC 2 ({share[1]:.0%})")
        ax.legend(fontsize=SMALL_FONT)
    return fig
