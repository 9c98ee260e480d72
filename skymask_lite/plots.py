"""The book's figures, in one style.

Call :func:`set_style` once (every chapter does it in its import cell). Each figure function
then draws on a new ``matplotlib.figure.Figure`` and returns it. The figures are made
without ``matplotlib.pyplot``, so a figure returned as a notebook cell's last expression
is shown exactly once, whatever the backend, and no figure stays open between cells.

Fixed colours, the same in every figure:

* :data:`BENIGN`, :data:`MALICIOUS`, :data:`ROOT`: benign clients, malicious clients and the
  server's root model (looked up by name in :data:`ROLE_COLORS`);
* :data:`PALETTE`: the cycle for every other series (defences, settings), colour-blind safe
  and disjoint from the three role colours; series ``k`` also gets line style
  ``LINESTYLES[k % 4]``, so curves that coincide stay visible.

Chapter 1 introduces :func:`example_images`, :func:`label_heatmap` and :func:`accuracy_curves`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import seaborn as sns
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

#: Size in inches of one-panel figures.
FIGSIZE = (6.4, 4.0)
#: Width in inches of each panel of a multi-panel figure (its height is ``FIGSIZE[1]``).
PANEL_WIDTH = 4.0
#: Size in inches of each image of an image grid.
THUMBNAIL = 0.9
#: Resolution of every figure.
DPI = 100

#: Colour of benign clients (blue).
BENIGN = "#0173b2"
#: Colour of malicious clients (vermillion).
MALICIOUS = "#d55e00"
#: Colour of the server's root model (black).
ROOT = "#000000"
#: The three role colours by name.
ROLE_COLORS = {"benign": BENIGN, "malicious": MALICIOUS, "root": ROOT}
#: Colours of the other series, in order (seaborn's colour-blind palette minus the role colours).
PALETTE = ("#de8f05", "#029e73", "#cc78bc", "#ca9161", "#949494", "#ece133")
#: Line styles of the series, in order.
LINESTYLES = ("-", "--", ":", "-.")
#: Sequential colour map of the heatmaps of shares in [0, 1], light for 0 and dark for 1.
HEATMAP_CMAP = "mako_r"
#: Colour map of grey images (dark garments on a white background).
IMAGE_CMAP = "gray_r"
#: Axis labels of the round records' metrics.
METRIC_LABELS = {"test_acc": "test accuracy", "asr": "attack success rate", "fpr": "FPR", "fnr": "FNR"}


def set_style() -> None:
    """Set the book's matplotlib/seaborn style: white grid, :data:`PALETTE`, fixed size and dpi."""
    sns.set_theme(
        context="notebook",
        style="whitegrid",
        palette=list(PALETTE),
        rc={
            "figure.figsize": FIGSIZE,
            "figure.dpi": DPI,
            "savefig.dpi": DPI,
            "savefig.bbox": "tight",
            "axes.titlesize": "medium",
            "image.cmap": HEATMAP_CMAP,
        },
    )


def _figure(width: float = FIGSIZE[0], height: float = FIGSIZE[1]) -> Figure:
    """A new constrained-layout figure of ``width x height`` inches at :data:`DPI`."""
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _as_image(image: torch.Tensor) -> np.ndarray:
    """One ``[C, H, W]`` image rescaled to ``[0, 1]``: ``[H, W]`` if ``C == 1``, else ``[H, W, C]``."""
    image = image.detach().float().cpu()
    low, high = image.min(), image.max()
    image = (image - low) / (high - low).clamp_min(1e-12)
    return (image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)).numpy()


def example_images(x: torch.Tensor, y: torch.Tensor, class_names: Sequence[str], per_class: int = 3) -> Figure:
    """A grid of the first ``per_class`` images of every class: one column per class.

    Args:
        x: images ``[N, C, H, W]`` (any scale: each image is shown min-max rescaled).
        y: labels ``[N]`` in ``0 .. len(class_names) - 1``.
        class_names: the column titles.
        per_class: rows of the grid.
    """
    num_classes = len(class_names)
    fig = _figure(THUMBNAIL * num_classes, THUMBNAIL * per_class + 0.3)  # + 0.3 in for the titles
    axes = fig.subplots(per_class, num_classes, squeeze=False)
    for c, name in enumerate(class_names):
        picked = torch.nonzero(y == c).flatten()[:per_class]
        if len(picked) < per_class:
            raise ValueError(f"class {c} ({name!r}) has {len(picked)} examples, fewer than per_class={per_class}")
        for row, i in enumerate(picked.tolist()):
            ax = axes[row, c]
            ax.imshow(_as_image(x[i]), cmap=IMAGE_CMAP, vmin=0, vmax=1)
            ax.set_axis_off()
        axes[0, c].set_title(f"{c}: {name}", fontsize="x-small")
    return fig


def label_heatmap(
    shares: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Clients x labels heatmap of a split: cell ``(i, c)`` is the share of label ``c`` in client
    ``i``'s data (the ``[n, L]`` matrix of :func:`skymask_lite.data.label_shares`).

    Args:
        shares: one ``[n, L]`` matrix, or ``{panel title: [n, L] matrix}`` for side-by-side
            panels that share the colour scale ``[0, 1]`` and one colour bar.
        class_names: tick labels of the label axis (default: the label indices).
        title: the panel's title (one matrix) or the figure's title (several).
    """
    panels = dict(shares) if isinstance(shares, Mapping) else {title or "": shares}
    for name, matrix in panels.items():
        if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
            raise ValueError(f"shares {name!r} must be a [num_clients, num_labels] tensor")
    fig = _figure(FIGSIZE[0] if len(panels) == 1 else PANEL_WIDTH * len(panels))
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, (name, matrix) in zip(axes, panels.items()):
        image = ax.imshow(matrix.detach().cpu().numpy(), aspect="auto", interpolation="nearest",
                          cmap=HEATMAP_CMAP, vmin=0.0, vmax=1.0)
        ax.set_title(name)
        ax.set_xlabel("label")
        ax.grid(False)
        if class_names is not None:
            ax.set_xticks(range(len(class_names)), class_names, rotation=90)
    axes[0].set_ylabel("client")
    fig.colorbar(image, ax=list(axes), label="share of the client's examples")
    if isinstance(shares, Mapping) and title:
        fig.suptitle(title)
    return fig


def _round_records(result: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
    """The per-round records of a results dict (its ``"rounds"``) or of a list of records."""
    if isinstance(result, Mapping):
        if "rounds" not in result:
            raise ValueError("a results dict needs a 'rounds' list (see skymask_lite.experiments)")
        return result["rounds"]
    return result


def accuracy_curves(
    results: Mapping[str, Sequence[Mapping[str, Any]] | Mapping[str, Any]],
    *,
    metric: str = "test_acc",
    title: str | None = None,
    colors: Mapping[str, str] | None = None,
) -> Figure:
    """``metric`` (default: test accuracy) against the round, one line per entry of ``results``.

    Args:
        results: ``{legend label: run}``; a run is a results dict of
            :func:`skymask_lite.experiments.run_experiment` or a list of round records
            ``{"round": t, metric: value, ...}`` (e.g. those of :func:`skymask_lite.fl.run_round`).
        metric: the record key on the y axis (``"test_acc"``, ``"asr"``, ``"fpr"``, ``"fnr"``).
        title: the axes' title.
        colors: ``{legend label: colour}``; labels not in it take :data:`PALETTE` in order.
    """
    fig = _figure()
    ax = fig.subplots()
    for k, (label, result) in enumerate(results.items()):
        records = _round_records(result)
        missing = [r.get("round") for r in records if r.get(metric) is None]
        if missing:
            raise ValueError(f"{label!r}: no {metric!r} in the records of rounds {missing[:5]}")
        color = (colors or {}).get(label, PALETTE[k % len(PALETTE)])
        ax.plot([r["round"] for r in records], [r[metric] for r in records], label=label, color=color,
                linestyle=LINESTYLES[k % len(LINESTYLES)], marker="o", markersize=3)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    if title:
        ax.set_title(title)
    ax.legend()
    return fig


# ----------------------------------------------------------------------------- chapter 2: attacks
# Chapter 2 introduces :func:`image_rows`, :func:`coordinate_ranges`, :func:`gamma_search`,
# :func:`role_strips` and :func:`update_pca`.


def _row_mask(num_rows: int, listed: torch.Tensor | Sequence[int], what: str) -> np.ndarray:
    """Boolean ``[num_rows]`` mask of the rows listed in ``listed`` (``what`` names them in errors)."""
    rows = torch.as_tensor(listed, dtype=torch.long).cpu().reshape(-1)
    if rows.numel() and (rows.min() < 0 or rows.max() >= num_rows):
        raise ValueError(f"{what} indices must lie in [0, {num_rows - 1}], got {rows.tolist()[:5]}...")
    mask = np.zeros(num_rows, dtype=bool)
    mask[rows.numpy()] = True
    return mask


def _is_malicious(num_rows: int, malicious: torch.Tensor | Sequence[int]) -> np.ndarray:
    """Boolean ``[num_rows]`` mask of the rows listed in ``malicious``."""
    return _row_mask(num_rows, malicious, "malicious row")


def _jitter(count: int, width: float, seed: int = 0) -> np.ndarray:
    """``count`` reproducible horizontal offsets, uniform in ``[-width, width]``."""
    return np.random.default_rng(seed).uniform(-width, width, count)


def image_rows(rows: Mapping[str, torch.Tensor], *, titles: Sequence[str] | None = None) -> Figure:
    """Images in labelled rows, e.g. ``{"clean": x, "with the trigger": add_trigger(x)}``.

    Args:
        rows: ``{row label: images [k, C, H, W]}``, the same ``k`` in every row (each image is shown
            min-max rescaled, like :func:`example_images`).
        titles: one title per column (e.g. the labels), optional.
    """
    counts = {label: images.shape[0] if isinstance(images, torch.Tensor) and images.dim() == 4 else None
              for label, images in rows.items()}
    if not rows or None in counts.values() or len(set(counts.values())) != 1:
        raise ValueError(f"rows must map labels to [k, C, H, W] image batches with the same k, got {counts}")
    k = next(iter(counts.values()))
    if titles is not None and len(titles) != k:
        raise ValueError(f"titles must give one title per column ({k}), got {len(titles)}")
    fig = _figure(THUMBNAIL * k + 1.0, THUMBNAIL * len(rows) + 0.3)  # + 1 in for the row labels
    axes = fig.subplots(len(rows), k, squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c in range(k):
            ax = axes[r, c]
            ax.imshow(_as_image(images[c]), cmap=IMAGE_CMAP, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            if titles is not None and r == 0:
                ax.set_title(titles[c], fontsize="x-small")
        axes[r, 0].set_ylabel(label, fontsize="small")
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
    good = benign.detach().float().cpu().numpy()[:, coords]   # [nb, k]
    bad = malicious.detach().float().cpu().numpy()[:, coords]  # [f, k]
    fig = _figure(max(FIGSIZE[0], 0.8 * len(coords) + 1.5))
    ax = fig.subplots()
    ax.axhline(0.0, color="0.6", linewidth=0.8)
    for k in range(len(coords)):
        ax.vlines(k, good[:, k].min(), good[:, k].max(), color=BENIGN, linewidth=6, alpha=0.25,
                  label="benign range" if k == 0 else None)
        ax.scatter(k - 0.12 + _jitter(len(good), 0.06, seed=k), good[:, k], s=12, color=BENIGN,
                   label="benign" if k == 0 else None, zorder=3)
        ax.scatter([k - 0.12], [good[:, k].mean()], marker="_", s=300, color=BENIGN, linewidths=2,
                   label="benign mean" if k == 0 else None, zorder=3)
        ax.scatter(k + 0.15 + _jitter(len(bad), 0.04, seed=k), bad[:, k], marker="x", s=25, color=MALICIOUS,
                   label="malicious" if k == 0 else None, zorder=4)
    ax.set_xticks(range(len(coords)), [str(j) for j in coords])
    ax.set_xlabel("coordinate j")
    ax.set_ylabel("update value")
    if title:
        ax.set_title(title)
    ax.legend(loc="best", fontsize="small")
    return fig


def gamma_search(curves: Mapping[str, Mapping[str, Any]], *, title: str | None = None) -> Figure:
    """The ``gamma`` search of Min-Max / Min-Sum, one panel per attack: the constraint's left side
    against ``gamma`` (a line), its bound (dashed) and the ``gamma`` the search returned (vertical line).

    Args:
        curves: ``{panel title: {"gamma": [k] values, "value": [k] left sides, "bound": float,
            "best": float, "ylabel": optional str}}``.
        title: the figure's title.
    """
    fig = _figure(FIGSIZE[0] if len(curves) == 1 else PANEL_WIDTH * len(curves))
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (name, curve) in zip(axes, curves.items()):
        missing = sorted({"gamma", "value", "bound", "best"} - set(curve))
        if missing:
            raise ValueError(f"curve {name!r} lacks {missing}")
        gamma, value = np.asarray(curve["gamma"], dtype=float), np.asarray(curve["value"], dtype=float)
        if gamma.shape != value.shape:
            raise ValueError(f"curve {name!r}: gamma {gamma.shape} and value {value.shape} differ in shape")
        ax.plot(gamma, value, color=PALETTE[0], label="left side")
        ax.axhline(curve["bound"], color="0.3", linestyle="--", label="bound")
        ax.axvline(curve["best"], color=MALICIOUS, label=f"returned $\\gamma$ = {curve['best']:.2f}")
        ax.set_title(name)
        ax.set_xlabel("$\\gamma$")
        ax.set_ylabel(curve.get("ylabel", "constraint's left side"))
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
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
    fig = _figure(FIGSIZE[0] if len(values) == 1 else PANEL_WIDTH * len(values))
    axes = fig.subplots(1, len(values), squeeze=False)[0]
    for ax, (stat, groups) in zip(axes, values.items()):
        for g, (group, per_client) in enumerate(groups.items()):
            per_client = torch.as_tensor(per_client).detach().float().cpu().reshape(-1).numpy()
            bad = _is_malicious(len(per_client), malicious)
            for role, rows, shift in (("benign", ~bad, -0.2), ("malicious", bad, 0.2)):
                if not rows.any():
                    continue
                ax.boxplot(per_client[rows], positions=[g + shift], widths=0.3, showfliers=False,
                           medianprops={"color": ROLE_COLORS[role]}, boxprops={"color": ROLE_COLORS[role]},
                           whiskerprops={"color": ROLE_COLORS[role]}, capprops={"color": ROLE_COLORS[role]})
                ax.scatter(g + shift + _jitter(int(rows.sum()), 0.1, seed=g), per_client[rows], s=8, alpha=0.6,
                           color=ROLE_COLORS[role], label=role if g == 0 else None, zorder=3)
        ax.set_xticks(range(len(groups)), list(groups))
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set_title(stat)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def update_pca(
    updates: torch.Tensor | Mapping[str, torch.Tensor],
    malicious: torch.Tensor | Sequence[int],
    *,
    title: str | None = None,
    ncols: int | None = None,
) -> Figure:
    """The clients' updates projected on their first two principal components, coloured by role.

    Args:
        updates: one ``[n, d]`` update matrix, or ``{panel title: [n, d]}`` for several panels
            (each with its own PCA, fitted on all its rows).
        malicious: the malicious clients' row indices.
        title: the panel's title (one matrix) or the figure's title (several).
        ncols: panels per row (default: all in one row up to 3 panels, else 2 per row).
    """
    from sklearn.decomposition import PCA

    panels = dict(updates) if isinstance(updates, Mapping) else {title or "": updates}
    ncols = ncols or (len(panels) if len(panels) <= 3 else 2)
    nrows = -(-len(panels) // ncols)
    fig = _figure(FIGSIZE[0] if len(panels) == 1 else PANEL_WIDTH * ncols, FIGSIZE[1] * nrows)
    grid = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in grid[len(panels):]:
        ax.set_visible(False)
    axes = grid[: len(panels)]
    for ax, (name, matrix) in zip(axes, panels.items()):
        if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2 or matrix.shape[0] < 3:
            raise ValueError(f"updates {name!r} must be a [n, d] tensor with n >= 3")
        pca = PCA(n_components=2, svd_solver="full", random_state=0)
        points = pca.fit_transform(matrix.detach().double().cpu().numpy())  # [n, 2]
        bad = _is_malicious(len(points), malicious)
        for role, rows, marker in (("benign", ~bad, "o"), ("malicious", bad, "x")):
            if rows.any():
                ax.scatter(points[rows, 0], points[rows, 1], s=18, marker=marker, color=ROLE_COLORS[role],
                           label=role, alpha=0.8)
        share = pca.explained_variance_ratio_
        ax.set_xlabel(f"PC 1 ({share[0]:.0%} of the variance)")
        ax.set_ylabel(f"PC 2 ({share[1]:.0%})")
        ax.set_title(name)
        ax.legend(fontsize="small")
    if isinstance(updates, Mapping) and title:
        fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------- chapter 3: robust aggregation
# Chapter 3 introduces :func:`client_scores`, :func:`client_scatter`, :func:`metric_heatmap` and
# :func:`detection_bars`.


def _kept_mask(kept: torch.Tensor | Sequence[int] | None, n: int) -> np.ndarray:
    """Boolean ``[n]`` mask of the clients a rule kept (everybody when ``kept`` is None)."""
    return np.ones(n, dtype=bool) if kept is None else _row_mask(n, kept, "kept client")


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

    Bars are coloured by role (:data:`BENIGN`, :data:`MALICIOUS`); clients the rule dropped
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
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    values = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"scores must be a non-empty [n] vector (one score per client), got shape {values.shape}")
    n = values.size
    is_mal, is_kept = _is_malicious(n, malicious), _kept_mask(kept, n)
    order = np.argsort(values, kind="stable") if sort else np.arange(n)
    fig = _figure()
    ax = fig.subplots()
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
    if title:
        ax.set_title(title)
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

    Benign clients are circles, malicious ones crosses (as in :func:`update_pca`), coloured by
    role; clients the rule dropped (not in ``kept``) are hollow, kept ones filled. ``root`` (``[2]``), e.g. the server's root update, is a black star.
    """
    xy = np.asarray(points.detach().cpu() if isinstance(points, torch.Tensor) else points, dtype=float)
    if xy.ndim != 2 or xy.shape[1] != 2 or xy.shape[0] == 0:
        raise ValueError(f"points must be a non-empty [n, 2] array (one point per client), got shape {xy.shape}")
    n = xy.shape[0]
    is_mal, is_kept = _is_malicious(n, malicious), _kept_mask(kept, n)
    fig = _figure()
    ax = fig.subplots()
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
    if title:
        ax.set_title(title)
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
    fig = _figure(max(FIGSIZE[0], 1.1 * len(columns) + 2.0), max(2.2, 0.55 * len(rows) + 1.6))
    ax = fig.subplots()
    sns.heatmap(values, ax=ax, annot=True, fmt=fmt, cmap=HEATMAP_CMAP, vmin=vmin, vmax=vmax,
                xticklabels=columns, yticklabels=rows, cbar_kws={"label": label}, linewidths=0.5)
    ax.tick_params(axis="y", rotation=0)
    ax.set_xticks(ax.get_xticks(), columns, rotation=30, ha="right")
    ax.grid(False)
    if title:
        ax.set_title(title)
    return fig


def detection_bars(rows: Sequence[tuple[str, float, float]], *, title: str | None = None) -> Figure:
    """Grouped bars of detection error rates: FPR (benign flagged / benign) and FNR (malicious
    kept / malicious) for each ``(label, fpr, fnr)`` row, with the values written on the bars."""
    if not rows:
        raise ValueError("rows is empty: give a list of (label, fpr, fnr)")
    for label, *rates in rows:
        if len(rates) != 2 or any(r is None or not 0.0 <= float(r) <= 1.0 for r in rates):
            raise ValueError(f"{label!r}: expected (label, fpr, fnr) with both rates in [0, 1], got {rates}")
    labels = [r[0] for r in rows]
    x, width = np.arange(len(rows)), 0.38
    fig = _figure(max(FIGSIZE[0], 1.2 * len(rows) + 1.0))
    ax = fig.subplots()
    for k, (name, color) in enumerate((("FPR", PALETTE[0]), ("FNR", PALETTE[1]))):
        heights = [float(r[1 + k]) for r in rows]
        bars = ax.bar(x + (k - 0.5) * width, heights, width, label=name, color=color,
                      hatch=None if k == 0 else "..", edgecolor="white")
        ax.bar_label(bars, labels=[f"{h:.2f}" for h in heights], fontsize="x-small", padding=2)
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 1.3)  # room for the values on the bars and the legend above 1
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("rate")
    ax.grid(axis="x", visible=False)
    if title:
        ax.set_title(title)
    ax.legend(loc="upper left", ncols=2)
    return fig


# ----------------------------------------------------------------------------- chapter 5: the Gaussian mixture
# Chapter 5 introduces :func:`mask_pca` (the paper's motivating figure) and :func:`detection_rounds`.


def _ellipse(mean: np.ndarray, cov: np.ndarray, radius: float, num: int = 120) -> np.ndarray:
    """``[num, 2]`` points of the ellipse ``(x - mean)^T cov^{-1} (x - mean) = radius^2``."""
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    angle = np.linspace(0.0, 2.0 * np.pi, num)
    circle = np.stack([np.cos(angle), np.sin(angle)])                                  # [2, num]
    axes = radius * np.sqrt(np.clip(eigenvalues, 0.0, None))[:, None] * circle       # [2, num]
    return mean + (eigenvectors @ axes).T


def _per_panel(value: Any, name: str) -> Any:
    """``value[name]`` for a per-panel mapping, ``value`` itself otherwise."""
    return value[name] if isinstance(value, Mapping) else value


def mask_pca(
    info: Mapping[str, Any],
    malicious: torch.Tensor | Sequence[int] | Mapping[str, torch.Tensor | Sequence[int]],
    *,
    kept: torch.Tensor | Sequence[int] | Mapping[str, torch.Tensor | Sequence[int] | None] | None = None,
    mixture: str = "chosen",
    groups: torch.Tensor | Sequence[int] | None = None,
    group_name: str = "group",
    title: str | None = None,
) -> Figure:
    """SkyMask's binary masks on their first two principal components with the Gaussian mixture's
    1-sigma (solid) and 2-sigma (dashed) ellipses: the paper's motivating figure.

    Clients are circles (benign) and crosses (malicious) in the role colours, the root model a
    black star; clients the rule dropped (not in ``kept``) are hollow, as in :func:`client_scatter`.

    Args:
        info: the ``info`` dict of :func:`skymask_lite.skymask.cluster_masks` (or of
            :func:`skymask_lite.skymask.skymask`): ``points`` ``[n+1, 2]`` with the ROOT LAST,
            ``means`` ``[c, 2]`` and ``covariances`` ``[c, 2, 2]`` of the chosen mixture, ``fit2``
            (the same for the 2-component mixture); or ``{panel title: info}`` for side-by-side
            panels.
        malicious: the malicious clients' row indices, one set or ``{panel title: indices}``.
        kept: the clients the rule kept (default: all), one set or ``{panel title: indices}``.
        mixture: "chosen" draws the mixture the 1-vs-2 criterion chose, "two" the 2-component one.
        groups: optional ``[n]`` integer group of every client (e.g. its majority label); benign
            clients are then coloured by group (``tab10``) instead of :data:`BENIGN`.
        group_name: legend prefix of the groups ("group 3").
        title: the panel's title (one info) or the figure's title (several).
    """
    from matplotlib.colors import to_hex
    from matplotlib.lines import Line2D

    if mixture not in ("chosen", "two"):
        raise ValueError(f"mixture must be 'chosen' or 'two', got {mixture!r}")
    several = "points" not in info
    panels = dict(info) if several else {title or "": info}
    fig = _figure(FIGSIZE[0] + 1.2 if len(panels) == 1 else PANEL_WIDTH * len(panels) + 1.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    shown: dict[str, tuple[str, Any]] = {}  # legend label -> (marker, colour), in first-seen order
    any_dropped = False
    for ax, (name, panel) in zip(axes, panels.items()):
        missing = sorted({"points", "means", "covariances", "fit2"} - set(panel))
        if missing:
            raise ValueError(f"info {name!r} lacks {missing}: pass the info dict of cluster_masks")
        points = torch.as_tensor(panel["points"]).detach().double().cpu().numpy()  # [n+1, 2], root last
        clients, root = points[:-1], points[-1]
        n = len(clients)
        is_mal, is_kept = _is_malicious(n, _per_panel(malicious, name)), _kept_mask(_per_panel(kept, name), n)
        any_dropped |= not is_kept.all()
        fit = panel["fit2"] if mixture == "two" else panel
        for mean, cov in zip(torch.as_tensor(fit["means"]).double().cpu().numpy(),
                             torch.as_tensor(fit["covariances"]).double().cpu().numpy()):
            for radius, style in ((1.0, "-"), (2.0, "--")):
                xy = _ellipse(mean, cov, radius)
                ax.plot(xy[:, 0], xy[:, 1], color="0.35", linestyle=style, linewidth=1)
        series = [("benign", ~is_mal, BENIGN, "o")]
        if groups is not None:
            group = torch.as_tensor(groups).cpu().numpy().astype(int)
            if group.shape != (n,) or group.min() < 0:
                raise ValueError(f"groups must give one integer >= 0 per client ({n}), got shape {group.shape}")
            palette = sns.color_palette("tab10", int(group.max()) + 1)
            series = [(f"{group_name} {g}", ~is_mal & (group == g), to_hex(palette[g]), "o")
                      for g in np.unique(group)]
        series.append(("malicious", is_mal, MALICIOUS, "X"))
        for label, members, color, marker in series:
            if not members.any():
                continue
            shown.setdefault(label, (marker, color))
            for was_kept in (True, False):
                rows = members & (is_kept == was_kept)
                if rows.any():
                    ax.scatter(clients[rows, 0], clients[rows, 1], s=26, marker=marker, linewidths=1.1, zorder=3,
                               facecolors=color if was_kept else "none", edgecolors=color)
        ax.scatter([root[0]], [root[1]], marker="*", s=170, color=ROOT, zorder=4)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        if several or title:
            ax.set_title(name)
    handles = [Line2D([], [], color="0.35", linewidth=1, linestyle=style, label=f"{r} ellipse")
               for r, style in (("1$\\sigma$", "-"), ("2$\\sigma$", "--"))]
    handles += [Line2D([], [], marker=marker, color=color, linestyle="none", label=label)
                for label, (marker, color) in shown.items()]
    handles.append(Line2D([], [], marker="*", markersize=12, color=ROOT, linestyle="none", label="root"))
    if any_dropped:
        handles.append(Line2D([], [], marker="o", linestyle="none", markerfacecolor="none", markeredgecolor="0.35",
                              label="dropped (hollow)"))
    fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    if several and title:
        fig.suptitle(title)
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
        colors: ``{legend label: colour}``; labels not in it take :data:`PALETTE` in order.
    """
    fig = _figure(2 * PANEL_WIDTH + 1.6)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, metric in zip(axes, ("fpr", "fnr")):
        for k, (label, run) in enumerate(runs.items()):
            records = [r for r in _round_records(run) if r.get(metric) is not None]
            color = (colors or {}).get(label, PALETTE[k % len(PALETTE)])
            ax.plot([r["round"] for r in records], [r[metric] for r in records], label=label, color=color,
                    linestyle=LINESTYLES[k % len(LINESTYLES)], marker="o", markersize=3)
        ax.set_xlabel("round")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(METRIC_LABELS[metric])
    axes[0].set_ylabel("rate")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------- chapter 4: learnable masks


def _layer_views(net: Any, layers: Sequence[str] | None) -> dict[str, tuple[slice, tuple[int, int]]]:
    """``{name: (slice of the flat vector, (rows, columns))}`` of ``net``'s parameters ``layers``
    (default: every parameter with two or more dimensions, i.e. the weights), each viewed as a
    matrix ``[shape[0], rest]`` (a convolution's output channels against its inputs x kernel)."""
    from .models import param_shapes, param_slices

    shapes, slices = param_shapes(net), param_slices(net)
    names = [n for n, s in shapes.items() if len(s) >= 2] if layers is None else list(layers)
    unknown = [n for n in names if n not in shapes]
    if unknown or not names:
        raise ValueError(f"unknown or no layers {unknown}; choose among the parameters {list(shapes)}")
    views = {}
    for name in names:
        shape = shapes[name]
        rows = shape[0] if len(shape) >= 2 else 1
        views[name] = (slices[name], (rows, shape.numel() // rows))
    return views


def _role_of(index: int, num_rows: int, malicious: np.ndarray, root_index: int | None) -> str:
    """"root", "malicious" or "benign" for row ``index`` of a ``[num_rows, d]`` stack of models."""
    if root_index is not None and index == root_index % num_rows:
        return "root"
    return "malicious" if malicious[index] else "benign"


def mask_heatmaps(
    values: torch.Tensor,
    net: Any,
    rows: Mapping[str, int],
    *,
    malicious: torch.Tensor | Sequence[int] = (),
    root_index: int | None = -1,
    layers: Sequence[str] | None = None,
    label: str = "mask value $\\sigma(M)$",
    vmin: float = 0.0,
    vmax: float = 1.0,
    title: str | None = None,
) -> Figure:
    """SkyMask's masks, one image per model (rows) and layer (columns).

    Each panel shows one model's mask values on one weight tensor, viewed as a matrix
    ``[output units, inputs x kernel]`` (e.g. ``conv2.weight`` ``[50, 30, 3, 3]`` as ``[50, 270]``);
    matrices of more than 20,000 coordinates are drawn antialiased (each pixel is the local mean
    of the mask), smaller ones cell by cell. All panels share the colour scale ``[vmin, vmax]`` and one colour bar; the row
    labels are coloured by role (:data:`BENIGN`, :data:`MALICIOUS`, :data:`ROOT`).

    Args:
        values: ``[k, d]`` mask values of ``k`` models, e.g. ``sigmoid(M)`` or the binary masks.
        net: the model whose flat parameter layout ``values`` follows (see
            :func:`skymask_lite.models.param_slices`).
        rows: ``{row label: row of values}``, in display order.
        malicious: rows of ``values`` that are malicious clients (for the label colours).
        root_index: the root model's row (default: the last, as in
            :func:`skymask_lite.skymask.stack_models`); ``None`` if there is none.
        layers: parameter names to show (default: every weight, i.e. every parameter of two or
            more dimensions).
        label: the colour bar's label.
        title: the figure's title.

    Chapter 4 introduces it.
    """
    views = _layer_views(net, layers)
    if not isinstance(values, torch.Tensor) or values.dim() != 2:
        raise ValueError(f"values must be a [k, d] tensor of masks, got {getattr(values, 'shape', type(values))}")
    k, d = values.shape
    total = sum(p.numel() for p in net.parameters())
    if d != total:
        raise ValueError(f"values have d = {d} columns but the model has {total} parameters")
    if not rows:
        raise ValueError("rows is empty: give {row label: row index}")
    bad_rows = [i for i in rows.values() if not -k <= int(i) < k]
    if bad_rows:
        raise ValueError(f"row indices must lie in [0, {k - 1}], got {bad_rows}")
    is_mal = _is_malicious(k, malicious)
    data = values.detach().float().cpu()
    fig = _figure(1.4 + 2.1 * len(views) + 0.9, 0.6 + 0.8 * len(rows))
    axes = fig.subplots(len(rows), len(views), squeeze=False)
    for r, (row_label, index) in enumerate(rows.items()):
        index = int(index) % k
        for c, (name, (sl, shape)) in enumerate(views.items()):
            ax = axes[r, c]
            image = ax.imshow(data[index, sl].reshape(shape).numpy(), aspect="auto", cmap=HEATMAP_CMAP, vmin=vmin,
                              vmax=vmax, interpolation="nearest" if shape[0] * shape[1] <= 20_000 else "antialiased")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            if r == 0:
                ax.set_title(f"{name}\n[{shape[0]} x {shape[1]}]", fontsize="small")
        role = _role_of(index, k, is_mal, root_index)
        axes[r, 0].set_ylabel(row_label, rotation=0, ha="right", va="center", fontsize="small",
                              color=ROLE_COLORS[role])
    fig.colorbar(image, ax=axes.ravel().tolist(), label=label, shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig


def client_layer_heatmap(
    table: torch.Tensor,
    layer_names: Sequence[str],
    malicious: torch.Tensor | Sequence[int],
    *,
    root_index: int | None = -1,
    label: str = "mean mask value",
    vmin: float = 0.0,
    vmax: float = 1.0,
    title: str | None = None,
) -> Figure:
    """Models x layers heatmap of a per-layer statistic (e.g. each model's mean ``sigmoid(M)`` on
    each layer), the rows grouped by role: benign clients, malicious clients, then the root model,
    each group in index order and labelled on the left in its role colour.

    Args:
        table: ``[k, L]``, row ``i`` for model ``i`` (clients, and the root at ``root_index``).
        layer_names: the ``L`` column labels.
        malicious: rows that are malicious clients.
        root_index: the root model's row (default: the last); ``None`` if there is none.
        label: the colour bar's label; the colour scale is fixed to ``[vmin, vmax]``.
        title: the axes' title.

    Chapter 4 introduces it.
    """
    if not isinstance(table, torch.Tensor) or table.dim() != 2:
        raise ValueError(f"table must be a [k, L] tensor (one row per model), got {getattr(table, 'shape', type(table))}")
    k, num_layers = table.shape
    if len(layer_names) != num_layers:
        raise ValueError(f"layer_names must give one name per column ({num_layers}), got {len(layer_names)}")
    is_mal = _is_malicious(k, malicious)
    roles = np.array([_role_of(i, k, is_mal, root_index) for i in range(k)])
    groups = [(role, np.flatnonzero(roles == role)) for role in ("benign", "malicious", "root")]
    groups = [(role, members) for role, members in groups if len(members)]
    order = np.concatenate([members for _, members in groups])
    fig = _figure(max(FIGSIZE[0], 0.9 * num_layers + 2.5), FIGSIZE[1] + 1.0)
    ax = fig.subplots()
    image = ax.imshow(table.detach().float().cpu().numpy()[order], aspect="auto", interpolation="nearest",
                      cmap=HEATMAP_CMAP, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(num_layers), list(layer_names), rotation=45, ha="right")
    start, centres, names = 0, [], []
    for role, members in groups:
        centres.append(start + (len(members) - 1) / 2)
        names.append(role if role == "root" else f"{role} ({len(members)})")
        if start:
            ax.axhline(start - 0.5, color="white", linewidth=2)
        start += len(members)
    ax.set_yticks(centres, names)
    for tick, (role, _) in zip(ax.get_yticklabels(), groups):
        tick.set_color(ROLE_COLORS[role])
    ax.grid(False)
    fig.colorbar(image, ax=ax, label=label)
    if title:
        ax.set_title(title)
    return fig


def loss_curves(
    losses: Mapping[str, Sequence[float]] | Sequence[float],
    *,
    xlabel: str = "step",
    ylabel: str = "loss",
    title: str | None = None,
) -> Figure:
    """Loss against the optimisation step (step 0 = before the first update), one line with dots
    per entry of ``{legend label: losses}`` (or one unlabelled line).

    Chapter 4 introduces it (the mask training's root loss).
    """
    series = dict(losses) if isinstance(losses, Mapping) else {"": losses}
    if not series or any(len(v) == 0 for v in series.values()):
        raise ValueError("losses must be a non-empty sequence, or {label: non-empty sequence}")
    from matplotlib.ticker import MaxNLocator

    fig = _figure()
    ax = fig.subplots()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for k, (name, values) in enumerate(series.items()):
        values = [float(v) for v in values]
        ax.plot(range(len(values)), values, marker="o", markersize=3, color=PALETTE[k % len(PALETTE)],
                linestyle=LINESTYLES[k % len(LINESTYLES)], label=name or None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if any(series):
        ax.legend()
    return fig
