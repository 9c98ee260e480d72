"""Chapter 3's figures: what robust aggregation rules see and decide."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import seaborn as sns
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from .style import BENIGN, FIGSIZE, HEATMAP_CMAP, MALICIOUS, PALETTE, ROLE_COLORS, ROOT, SMALL_FONT, panels, row_mask

__all__ = ["client_scatter", "client_scores", "detection_bars", "metric_heatmap"]


def client_scores(
    scores: torch.Tensor | Sequence[float],
    malicious: torch.Tensor | Sequence[int],
    *,
    ylabel: str,
    kept: torch.Tensor | Sequence[int] | None = None,
    threshold: float | None = None,
    threshold_label: str = "threshold",
    sort: bool = True,
    title: str | None = None,
) -> Figure:
    """One bar per client: a rule's score of each update (Krum score, trust score, ...).

    Bars are coloured by role (``BENIGN``, ``MALICIOUS``); clients the rule dropped
    (not in ``kept``) are drawn faded and hatched.

    Args:
        scores: ``[n]``, one score per client.
        malicious: the malicious clients' indices (the ground truth, for the colours only).
        ylabel: what the score is.
        kept: the clients the rule kept (default: all of them).
        threshold: a horizontal line at this score (e.g. a cut-off), labelled ``threshold_label``.
        sort: order the bars by score (lowest first); otherwise by client index.
        title: the axes' title.
    """
    values = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"scores must be a non-empty [n] vector (one score per client), got shape {values.shape}")
    n = values.size
    is_mal, is_kept = row_mask(n, malicious, "malicious row"), row_mask(n, kept, "kept client")
    order = np.argsort(values, kind="stable") if sort else np.arange(n)
    fig, (ax,) = panels(title=title)
    colors = np.where(is_mal, MALICIOUS, BENIGN)[order]
    bars = ax.bar(np.arange(n), values[order], width=1.0, color=colors, edgecolor="white", linewidth=0.3)
    for bar, k in zip(bars, is_kept[order]):
        if not k:
            bar.set_alpha(0.35)
            bar.set_hatch("///")
    handles = [Patch(color=BENIGN, label="benign"), Patch(color=MALICIOUS, label="malicious")]
    if not is_kept.all():
        handles.append(Patch(facecolor="0.55", edgecolor="white", alpha=0.5, hatch="///", label="dropped by the rule"))
    if threshold is not None:
        handles.append(ax.axhline(threshold, color=ROOT, linestyle="--", linewidth=1, label=threshold_label))
    ax.set_xlim(-0.5, n - 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("rank (clients sorted by score)" if sort else "client")
    ax.set_ylabel(ylabel)
    ax.grid(axis="x", visible=False)
    ax.legend(handles=handles)
    return fig


def client_scatter(
    points: torch.Tensor | np.ndarray,
    malicious: torch.Tensor | Sequence[int],
    *,
    kept: torch.Tensor | Sequence[int] | None = None,
    root: torch.Tensor | np.ndarray | None = None,
    xlabel: str = "PC 1",
    ylabel: str = "PC 2",
    title: str | None = None,
) -> Figure:
    """Clients as points in a plane (e.g. the first two principal components of their updates).

    Benign clients are circles, malicious ones crosses (as in
    :func:`~skymask_lite.plots.update_pca`), coloured by role; clients the rule dropped (not in
    ``kept``) are hollow, kept ones filled. ``root`` (``[2]``), e.g. the server's root update, is a
    black star.
    """
    xy = np.asarray(points.detach().cpu() if isinstance(points, torch.Tensor) else points, dtype=float)
    if xy.ndim != 2 or xy.shape[1] != 2 or xy.shape[0] == 0:
        raise ValueError(f"points must be a non-empty [n, 2] array (one point per client), got shape {xy.shape}")
    n = xy.shape[0]
    is_mal, is_kept = row_mask(n, malicious, "malicious row"), row_mask(n, kept, "kept client")
    fig, (ax,) = panels(title=title)
    for role, members, marker in (("benign", ~is_mal, "o"), ("malicious", is_mal, "X")):
        color = ROLE_COLORS[role]
        for was_kept, suffix in ((True, "kept"), (False, "dropped")):
            chosen = members & (is_kept == was_kept)
            if not chosen.any():
                continue
            label = role if is_kept.all() else f"{role}, {suffix}"
            ax.scatter(xy[chosen, 0], xy[chosen, 1], s=30, marker=marker, label=label, linewidths=1.2,
                       facecolors=color if was_kept else "none", edgecolors=color)
    if root is not None:
        r = np.asarray(root.detach().cpu() if isinstance(root, torch.Tensor) else root, dtype=float).reshape(2)
        ax.scatter([r[0]], [r[1]], marker="*", s=160, color=ROOT, label="root", zorder=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    return fig


def metric_heatmap(
    table: Mapping[str, Mapping[str, float | None]],
    *,
    label: str = "test accuracy",
    fmt: str = ".2f",
    vmin: float = 0.0,
    vmax: float = 1.0,
    title: str | None = None,
) -> Figure:
    """Annotated heatmap of ``table[row][column]`` (e.g. final accuracy per attack and rule).

    Rows are the outer keys in order, columns the union of the inner keys in first-seen order;
    a missing or ``None`` cell is left blank. The colour scale is fixed to ``[vmin, vmax]``.
    """
    rows = list(table)
    if not rows:
        raise ValueError("table is empty: give {row: {column: value}}")
    columns: list[str] = []
    for row in rows:
        columns += [c for c in table[row] if c not in columns]
    values = np.array([[np.nan if table[r].get(c) is None else float(table[r][c]) for c in columns] for r in rows])
    fig, (ax,) = panels(title=title, width=max(FIGSIZE[0], 1.1 * len(columns) + 2.0),
                        height=max(2.2, 0.55 * len(rows) + 1.8))
    sns.heatmap(values, ax=ax, annot=True, fmt=fmt, cmap=HEATMAP_CMAP, vmin=vmin, vmax=vmax, xticklabels=columns,
                yticklabels=rows, cbar_kws={"label": label}, linewidths=0.5, annot_kws={"fontsize": SMALL_FONT})
    ax.tick_params(axis="y", rotation=0)
    ax.set_xticks(ax.get_xticks(), columns, rotation=30, ha="right")
    ax.grid(False)
    return fig


def detection_bars(rows: Sequence[tuple[str, float, float]], *, title: str | None = None) -> Figure:
    """Grouped bars of detection error rates: FPR (benign flagged / benign) and FNR (malicious
    kept / malicious) for each ``(label, fpr, fnr)`` row, with the values written on the bars."""
    if not rows:
        raise ValueError("rows is empty: give a list of (label, fpr, fnr)")
    for label, *rates in rows:
        if len(rates) != 2 or any(r is None or not 0.0 <= float(r) <= 1.0 for r in rates):
            raise ValueError(f"{label!r}: expected (label, fpr, fnr) with both rates in [0, 1], got {rates}")
    x, width = np.arange(len(rows)), 0.38
    fig, (ax,) = panels(title=title, width=max(FIGSIZE[0], 1.2 * len(rows) + 1.0))
    for k, (name, color) in enumerate((("FPR", PALETTE[0]), ("FNR", PALETTE[1]))):
        heights = [float(r[1 + k]) for r in rows]
        bars = ax.bar(x + (k - 0.5) * width, heights, width, label=name, color=color,
                      hatch=None if k == 0 else "..", edgecolor="white")
        ax.bar_label(bars, labels=[f"{h:.2f}" for h in heights], fontsize=SMALL_FONT, padding=2)
    ax.set_xticks(x, [r[0] for r in rows])
    ax.set_ylim(0, 1.3)  # room for the values on the bars and the legend above 1
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("rate")
    ax.grid(axis="x", visible=False)
    ax.legend(loc="upper left", ncols=2)
    return fig
