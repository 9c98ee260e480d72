"""Chapter 1's figures: the data, its non-IID split, and accuracy against the round."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .style import HEATMAP_CMAP, IMAGE_CMAP, METRIC_LABELS, SMALL_FONT, THUMBNAIL, as_image, image_axes, panels
from .style import round_records, series_style

__all__ = ["accuracy_curves", "example_images", "label_heatmap"]


def example_images(x: torch.Tensor, y: torch.Tensor, class_names: Sequence[str], per_class: int = 3) -> Figure:
    """A grid of the first ``per_class`` images of every class: one column per class.

    Args:
        x: images ``[N, C, H, W]`` (any scale: each image is shown min-max rescaled).
        y: labels ``[N]`` in ``0 .. len(class_names) - 1``.
        class_names: the column titles.
        per_class: rows of the grid.
    """
    num_classes = len(class_names)
    picked = []
    for c, name in enumerate(class_names):
        rows = torch.nonzero(y == c).flatten()[:per_class]
        if len(rows) < per_class:
            raise ValueError(f"class {c} ({name!r}) has {len(rows)} examples, fewer than per_class={per_class}")
        picked.append(rows.tolist())
    fig, axes = panels(per_class * num_classes, ncols=num_classes, width=THUMBNAIL * num_classes,
                       height=THUMBNAIL * per_class + 0.4, keep_aspect=True)  # + 0.4 in for the titles
    axes = axes.reshape(per_class, num_classes)
    for c, name in enumerate(class_names):
        for row, i in enumerate(picked[c]):
            axes[row, c].imshow(as_image(x[i]), cmap=IMAGE_CMAP, vmin=0, vmax=1)
            image_axes(axes[row, c])
            axes[row, c].set_axis_off()
        axes[0, c].set_title(f"{c}\n{name}", fontsize=SMALL_FONT)
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
    matrices = dict(shares) if isinstance(shares, Mapping) else {"": shares}
    for name, matrix in matrices.items():
        if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
            raise ValueError(f"shares {name!r} must be a [num_clients, num_labels] tensor")
    fig, axes = panels(list(matrices), title=title, sharey=True)
    for ax, matrix in zip(axes, matrices.values()):
        image = ax.imshow(matrix.detach().cpu().numpy(), aspect="auto", interpolation="nearest",
                          cmap=HEATMAP_CMAP, vmin=0.0, vmax=1.0)
        ax.set_xlabel("label")
        ax.grid(False)
        if class_names is not None:
            ax.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=SMALL_FONT)
    axes[0].set_ylabel("client")
    fig.colorbar(image, ax=list(axes), label="share of the client's examples")
    return fig


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
        colors: ``{legend label: colour}``; labels not in it take ``PALETTE`` in order.
    """
    fig, (ax,) = panels(title=title)
    for k, (label, result) in enumerate(results.items()):
        records = round_records(result)
        missing = [r.get("round") for r in records if r.get(metric) is None]
        if missing:
            raise ValueError(f"{label!r}: no {metric!r} in the records of rounds {missing[:5]}")
        ax.plot([r["round"] for r in records], [r[metric] for r in records], label=label, marker="o", markersize=3,
                **series_style(k, label, colors))
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.legend()
    return fig
