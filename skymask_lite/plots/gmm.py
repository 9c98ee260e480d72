"""Chapter 5's figures: the masks' Gaussian mixture (the paper's motivating figure) and the
detection rates per round."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import seaborn as sns
import torch
from matplotlib.axes import Axes
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .style import BENIGN, BOOK_WIDTH, MALICIOUS, METRIC_LABELS, ROOT, SMALL_FONT, panels, per_panel, round_records
from .style import row_mask, series_style

__all__ = ["detection_rounds", "mask_pca"]

_Indices = torch.Tensor | Sequence[int]


def _ellipse(mean: np.ndarray, cov: np.ndarray, radius: float, num: int = 120) -> np.ndarray:
    """``[num, 2]`` points of the ellipse ``(x - mean)^T cov^{-1} (x - mean) = radius^2``."""
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    angle = np.linspace(0.0, 2.0 * np.pi, num)
    circle = np.stack([np.cos(angle), np.sin(angle)])  # [2, num]
    axes = radius * np.sqrt(np.clip(eigenvalues, 0.0, None))[:, None] * circle  # [2, num]
    return mean + (eigenvectors @ axes).T


def _draw_mixture(ax: Axes, fit: Mapping[str, Any]) -> None:
    """The 1-sigma (solid) and 2-sigma (dashed) ellipses of every component of a fitted mixture."""
    means = torch.as_tensor(fit["means"]).double().cpu().numpy()
    covariances = torch.as_tensor(fit["covariances"]).double().cpu().numpy()
    for mean, cov in zip(means, covariances):
        for radius, style in ((1.0, "-"), (2.0, "--")):
            xy = _ellipse(mean, cov, radius)
            ax.plot(xy[:, 0], xy[:, 1], color="0.35", linestyle=style, linewidth=1)


def _client_series(
    is_mal: np.ndarray, groups: _Indices | None, group_name: str
) -> list[tuple[str, np.ndarray, str, str]]:
    """``(legend label, members, colour, marker)`` of the clients: benign (or one series per
    group of benign clients, coloured with ``tab10``), then malicious."""
    series = [("benign", ~is_mal, BENIGN, "o")]
    if groups is not None:
        group = torch.as_tensor(groups).cpu().numpy().astype(int)
        if group.shape != is_mal.shape or group.min() < 0:
            raise ValueError(f"groups must give one integer >= 0 per client ({len(is_mal)}), got shape {group.shape}")
        palette = sns.color_palette("tab10", int(group.max()) + 1)
        series = [(f"{group_name} {g}", ~is_mal & (group == g), to_hex(palette[g]), "o") for g in np.unique(group)]
    return series + [("malicious", is_mal, MALICIOUS, "X")]


def _draw_clients(ax: Axes, clients: np.ndarray, series: list, is_kept: np.ndarray, shown: dict) -> None:
    """Scatter every series, kept clients filled and dropped ones hollow; records the legend entries in ``shown``."""
    for label, members, color, marker in series:
        if not members.any():
            continue
        shown.setdefault(label, (marker, color))
        for was_kept in (True, False):
            rows = members & (is_kept == was_kept)
            if rows.any():
                ax.scatter(clients[rows, 0], clients[rows, 1], s=26, marker=marker, linewidths=1.1, zorder=3,
                           facecolors=color if was_kept else "none", edgecolors=color)


def _mask_pca_legend(shown: Mapping[str, tuple[str, Any]], any_dropped: bool) -> list[Line2D]:
    """Legend handles: the ellipses, the client series, the root and (if any) the hollow dropped clients."""
    handles = [Line2D([], [], color="0.35", linewidth=1, linestyle=style, label=f"{r} ellipse")
               for r, style in (("1$\\sigma$", "-"), ("2$\\sigma$", "--"))]
    handles += [Line2D([], [], marker=marker, color=color, linestyle="none", label=label)
                for label, (marker, color) in shown.items()]
    handles.append(Line2D([], [], marker="*", markersize=12, color=ROOT, linestyle="none", label="root"))
    if any_dropped:
        handles.append(Line2D([], [], marker="o", linestyle="none", markerfacecolor="none", markeredgecolor="0.35",
                              label="dropped (hollow)"))
    return handles


def mask_pca(
    info: Mapping[str, Any],
    malicious: _Indices | Mapping[str, _Indices],
    *,
    kept: _Indices | Mapping[str, _Indices | None] | None = None,
    mixture: str = "chosen",
    groups: _Indices | None = None,
    group_name: str = "group",
    title: str | None = None,
) -> Figure:
    """SkyMask's binary masks on their first two principal components with the Gaussian mixture's
    1-sigma (solid) and 2-sigma (dashed) ellipses: the paper's motivating figure.

    Clients are circles (benign) and crosses (malicious) in the role colours, the root model a
    black star; clients the rule dropped (not in ``kept``) are hollow, as in
    :func:`~skymask_lite.plots.client_scatter`. The points and the mixtures are computed by
    :func:`skymask_lite.clustering.cluster_masks`; this function only draws them.

    Args:
        info: the ``info`` dict of :func:`skymask_lite.clustering.cluster_masks` (or of
            :func:`skymask_lite.skymask.skymask`): ``points`` ``[n+1, 2]`` with the ROOT LAST,
            ``means`` ``[c, 2]`` and ``covariances`` ``[c, 2, 2]`` of the chosen mixture, ``fit2``
            (the same for the 2-component mixture); or ``{panel title: info}`` for side-by-side
            panels.
        malicious: the malicious clients' row indices, one set or ``{panel title: indices}``.
        kept: the clients the rule kept (default: all), one set or ``{panel title: indices}``.
        mixture: "chosen" draws the mixture the 1-vs-2 criterion chose, "two" the 2-component one.
        groups: optional ``[n]`` integer group of every client (e.g. its majority label); benign
            clients are then coloured by group (``tab10``) instead of ``BENIGN``.
        group_name: legend prefix of the groups ("group 3").
        title: the panel's title (one info) or the figure's title (several).
    """
    if mixture not in ("chosen", "two"):
        raise ValueError(f"mixture must be 'chosen' or 'two', got {mixture!r}")
    infos = dict(info) if "points" not in info else {"": info}
    for name, panel in infos.items():
        missing = sorted({"points", "means", "covariances", "fit2"} - set(panel))
        if missing:
            raise ValueError(f"info {name!r} lacks {missing}: pass the info dict of cluster_masks")
    fig, axes = panels(list(infos), title=title, width=BOOK_WIDTH)  # the legend sits beside the panels
    shown: dict[str, tuple[str, Any]] = {}  # legend label -> (marker, colour), in first-seen order
    any_dropped = False
    for ax, (name, panel) in zip(axes, infos.items()):
        points = torch.as_tensor(panel["points"]).detach().double().cpu().numpy()  # [n+1, 2], root last
        clients, root = points[:-1], points[-1]
        is_mal = row_mask(len(clients), per_panel(malicious, name), "malicious row")
        is_kept = row_mask(len(clients), per_panel(kept, name), "kept client")
        any_dropped |= not is_kept.all()
        _draw_mixture(ax, panel["fit2"] if mixture == "two" else panel)
        _draw_clients(ax, clients, _client_series(is_mal, groups, group_name), is_kept, shown)
        ax.scatter([root[0]], [root[1]], marker="*", s=170, color=ROOT, zorder=4)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    fig.legend(handles=_mask_pca_legend(shown, any_dropped), loc="outside right upper", fontsize=SMALL_FONT)
    return fig


def detection_rounds(
    runs: Mapping[str, Sequence[Mapping[str, Any]] | Mapping[str, Any]],
    *,
    title: str | None = None,
    colors: Mapping[str, str] | None = None,
) -> Figure:
    """FPR (left panel) and FNR (right panel) against the round, one line per run.

    Args:
        runs: ``{legend label: run}``; a run is a results dict (its ``"rounds"``) or a list of round
            records ``{"round": t, "fpr": ., "fnr": ., ...}``. Records whose rate is ``None`` (no
            benign or no malicious client) are left out of that panel.
        title: the figure's title.
        colors: ``{legend label: colour}``; labels not in it take ``PALETTE`` in order.
    """
    fig, axes = panels([METRIC_LABELS["fpr"], METRIC_LABELS["fnr"]], title=title, sharey=True)
    for ax, metric in zip(axes, ("fpr", "fnr")):
        for k, (label, run) in enumerate(runs.items()):
            records = [r for r in round_records(run) if r.get(metric) is not None]
            ax.plot([r["round"] for r in records], [r[metric] for r in records], label=label, marker="o",
                    markersize=3, **series_style(k, label, colors))
        ax.set_xlabel("round")
        ax.set_ylim(-0.05, 1.05)
    axes[0].set_ylabel("rate")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=SMALL_FONT)
    return fig
