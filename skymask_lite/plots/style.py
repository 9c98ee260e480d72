"""The book's style, and the one helper that sizes a figure and lays out its panels and titles.

Every figure is at most ``BOOK_WIDTH`` inches wide at ``DPI`` (700 pixels, the book's
column), so it is shown at its own size and its labels stay legible: the smallest text is
``SMALL_FONT`` points.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import seaborn as sns
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = [
    "BENIGN",
    "BOOK_WIDTH",
    "DPI",
    "FIGSIZE",
    "HEATMAP_CMAP",
    "IMAGE_CMAP",
    "LINESTYLES",
    "MALICIOUS",
    "METRIC_LABELS",
    "PALETTE",
    "PANEL_HEIGHT",
    "ROLE_COLORS",
    "ROOT",
    "SMALL_FONT",
    "THUMBNAIL",
    "panels",
    "set_style",
]

#: Size in inches of one-panel figures.
FIGSIZE = (6.4, 4.0)
#: Widest figure in inches: the book's 700-pixel column at ``DPI``.
BOOK_WIDTH = 7.0
#: Height in inches of each row of a figure of several panels side by side.
PANEL_HEIGHT = 3.2
#: Size in inches of each image of an image grid (smaller when the grid would exceed ``BOOK_WIDTH``).
THUMBNAIL = 0.9
#: Resolution of every figure.
DPI = 100
#: The smallest text of a figure, in points (tick labels of crowded axes, legends, image titles).
SMALL_FONT = 9

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
    """Set the book's matplotlib/seaborn style: white grid, ``PALETTE``, fixed size and dpi,
    fonts of 10-11 points (legends, ticks) and 12 (labels, titles)."""
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
            "legend.fontsize": 10,
            "legend.title_fontsize": 10,
            "image.cmap": HEATMAP_CMAP,
        },
    )


def panels(
    names: Sequence[str] | int = 1,
    *,
    title: str | None = None,
    ncols: int | None = None,
    width: float | None = None,
    height: float | None = None,
    keep_aspect: bool = False,
    sharex: bool = False,
    sharey: bool = False,
) -> tuple[Figure, np.ndarray]:
    """A new figure with one panel per name: its size, its grid of axes and its titles.

    Size: ``width`` (default ``FIGSIZE`` for one column, ``BOOK_WIDTH`` for several) and
    ``height`` (default ``FIGSIZE`` for one row of at most two panels, else
    ``PANEL_HEIGHT`` per row); the width never exceeds ``BOOK_WIDTH``, and with
    ``keep_aspect`` the height shrinks in proportion (image grids).

    Titles: several panels, or named ones, get their names as titles and ``title`` as the
    figure's; a single unnamed panel gets ``title`` as its own.

    Args:
        names: the panels' titles ("" for none), or the number of untitled panels.
        ncols: panels per row (default: all in one row); unused cells of the grid are hidden.

    Returns:
        ``(figure, axes)``: ``axes`` is the flat array of the visible panels, in order.
    """
    names = [""] * names if isinstance(names, int) else list(names)
    if not names:
        raise ValueError("a figure needs at least one panel")
    ncols = min(ncols or len(names), len(names))
    nrows = -(-len(names) // ncols)
    width = width if width is not None else (FIGSIZE[0] if ncols == 1 else BOOK_WIDTH)
    if height is None:
        height = FIGSIZE[1] if nrows == 1 and ncols <= 2 else PANEL_HEIGHT * nrows
    if width > BOOK_WIDTH:
        height = height * BOOK_WIDTH / width if keep_aspect else height
        width = BOOK_WIDTH
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    grid = fig.subplots(nrows, ncols, squeeze=False, sharex=sharex, sharey=sharey).ravel()
    for ax in grid[len(names) :]:
        ax.set_visible(False)
    axes = grid[: len(names)]
    for ax, name in zip(axes, names):
        if name:
            ax.set_title(name)
    if title:
        if len(names) == 1 and not names[0]:
            axes[0].set_title(title)
        else:
            fig.suptitle(title)
    return fig, axes


def image_axes(ax: Axes) -> None:
    """An axes that shows an image: no ticks, no grid."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def as_image(image: torch.Tensor) -> np.ndarray:
    """One ``[C, H, W]`` image rescaled to ``[0, 1]``: ``[H, W]`` if ``C == 1``, else ``[H, W, C]``."""
    image = image.detach().float().cpu()
    low, high = image.min(), image.max()
    image = (image - low) / (high - low).clamp_min(1e-12)
    return (image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)).numpy()


def series_style(k: int, label: str, colors: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Colour and line style of series ``k``: ``colors[label]`` if given, else ``PALETTE`` in order."""
    return {"color": (colors or {}).get(label, PALETTE[k % len(PALETTE)]), "linestyle": LINESTYLES[k % len(LINESTYLES)]}


def row_mask(num_rows: int, listed: torch.Tensor | Sequence[int] | None, what: str) -> np.ndarray:
    """Boolean ``[num_rows]`` mask of the rows listed in ``listed`` (all rows when ``None``;
    ``what`` names them in errors)."""
    if listed is None:
        return np.ones(num_rows, dtype=bool)
    rows = torch.as_tensor(listed, dtype=torch.long).cpu().reshape(-1)
    if rows.numel() and (rows.min() < 0 or rows.max() >= num_rows):
        raise ValueError(f"{what} indices must lie in [0, {num_rows - 1}], got {rows.tolist()[:5]}...")
    mask = np.zeros(num_rows, dtype=bool)
    mask[rows.numpy()] = True
    return mask


def jitter(count: int, width: float, seed: int = 0) -> np.ndarray:
    """``count`` reproducible horizontal offsets, uniform in ``[-width, width]``."""
    return np.random.default_rng(seed).uniform(-width, width, count)


def round_records(result: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
    """The per-round records of a results dict (its ``"rounds"``) or of a list of records."""
    if isinstance(result, Mapping):
        if "rounds" not in result:
            raise ValueError("a results dict needs a 'rounds' list (see skymask_lite.experiments)")
        return result["rounds"]
    return result


def per_panel(value: Any, name: str) -> Any:
    """``value[name]`` for a per-panel mapping, ``value`` itself otherwise."""
    return value[name] if isinstance(value, Mapping) else value
