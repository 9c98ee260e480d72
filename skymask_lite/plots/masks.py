"""Chapter 4's figures: SkyMask's learnable masks, per layer and per model."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..models import num_params, param_shapes, param_slices
from .style import FIGSIZE, HEATMAP_CMAP, ROLE_COLORS, SMALL_FONT, image_axes, panels, row_mask, series_style

__all__ = ["client_layer_heatmap", "loss_curves", "mask_heatmaps"]


def _layer_views(net: Any, layers: Sequence[str] | None) -> dict[str, tuple[slice, tuple[int, int]]]:
    """``{name: (slice of the flat vector, (rows, columns))}`` of ``net``'s parameters ``layers``
    (default: every parameter with two or more dimensions, i.e. the weights), each viewed as a
    matrix ``[shape[0], rest]`` (a convolution's output channels against its inputs x kernel)."""
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
    of the mask), smaller ones cell by cell. All panels share the colour scale ``[vmin, vmax]``
    and one colour bar; the row labels are coloured by role (``BENIGN``, ``MALICIOUS``,
    ``ROOT``).

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
    if d != num_params(net):
        raise ValueError(f"values have d = {d} columns but the model has {num_params(net)} parameters")
    if not rows:
        raise ValueError("rows is empty: give {row label: row index}")
    bad_rows = [i for i in rows.values() if not -k <= int(i) < k]
    if bad_rows:
        raise ValueError(f"row indices must lie in [0, {k - 1}], got {bad_rows}")
    is_mal = row_mask(k, malicious, "malicious row")
    data = values.detach().float().cpu()
    column_titles = [f"{name}\n[{shape[0]} x {shape[1]}]" for name, (_, shape) in views.items()]
    fig, axes = panels(column_titles + [""] * (len(views) * (len(rows) - 1)), title=title, ncols=len(views),
                       height=0.9 + 0.8 * len(rows))
    axes = axes.reshape(len(rows), len(views))
    for r, (row_label, index) in enumerate(rows.items()):
        index = int(index) % k
        for c, (sl, shape) in enumerate(views.values()):
            ax = axes[r, c]
            image = ax.imshow(data[index, sl].reshape(shape).numpy(), aspect="auto", cmap=HEATMAP_CMAP, vmin=vmin,
                              vmax=vmax, interpolation="nearest" if shape[0] * shape[1] <= 20_000 else "antialiased")
            image_axes(ax)
            ax.title.set_fontsize(SMALL_FONT)
        axes[r, 0].set_ylabel(row_label, rotation=0, ha="right", va="center", fontsize=SMALL_FONT,
                              color=ROLE_COLORS[_role_of(index, k, is_mal, root_index)])
    fig.colorbar(image, ax=axes.ravel().tolist(), label=label, shrink=0.8)
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
        shape = getattr(table, "shape", type(table))
        raise ValueError(f"table must be a [k, L] tensor (one row per model), got {shape}")
    k, num_layers = table.shape
    if len(layer_names) != num_layers:
        raise ValueError(f"layer_names must give one name per column ({num_layers}), got {len(layer_names)}")
    is_mal = row_mask(k, malicious, "malicious row")
    roles = np.array([_role_of(i, k, is_mal, root_index) for i in range(k)])
    groups = [(role, np.flatnonzero(roles == role)) for role in ("benign", "malicious", "root")]
    groups = [(role, members) for role, members in groups if len(members)]
    order = np.concatenate([members for _, members in groups])
    fig, (ax,) = panels(title=title, width=max(FIGSIZE[0], 0.9 * num_layers + 2.5), height=FIGSIZE[1] + 1.0)
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
    fig, (ax,) = panels(title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for k, (name, values) in enumerate(series.items()):
        values = [float(v) for v in values]
        ax.plot(range(len(values)), values, marker="o", markersize=3, label=name or None, **series_style(k, name))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if any(series):
        ax.legend()
    return fig
