"""Figures of the chapters "SkyMask against every baseline" and "Stress tests": accuracy and
detection grids, the spread over seeds, per-round curves averaged over seeds, and a metric
against a varied setting (the attackers' share)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .style import BOOK_WIDTH, HEATMAP_CMAP, METRIC_LABELS, SMALL_FONT, panels, series_style

__all__ = ["ACCURACY_DROP_BINS", "accuracy_grid", "rate_grids", "round_bands", "seed_spread", "setting_curves"]

MISSING = "#eeeeee"
"""Colour of a grid cell without a value (a run not computed)."""

ACCURACY_DROP_BINS = (-100.0, 1.0, 3.0, 5.0, 10.0, 30.0, 100.0)
"""Bins of the accuracy drop, in percentage points below the reference, that
:func:`accuracy_grid` colours: within 1 point, 1-3, 3-5, 5-10, 10-30, and more."""


def _grid_axes(ax, columns: Sequence[str], rows: Sequence[str]) -> None:
    ax.set_xticks(np.arange(len(columns)) + 0.5, columns, rotation=30, ha="right")
    ax.set_yticks(np.arange(len(rows)) + 0.5, rows, rotation=0)
    ax.tick_params(length=0)
    ax.grid(False)


def _check_table(table: pd.DataFrame, what: str) -> np.ndarray:
    if not isinstance(table, pd.DataFrame) or table.empty:
        raise ValueError(f"{what} must be a non-empty pandas DataFrame (rows x columns of values)")
    return table.to_numpy(dtype=float)


def accuracy_grid(
    accuracy: pd.DataFrame,
    reference: float,
    *,
    reference_label: str = "FedAvg without attack",
    title: str | None = None,
) -> Figure:
    """Final accuracy per row (attack) and column (rule), annotated in percent, coloured by the
    drop below ``reference`` in percentage points, binned by ``ACCURACY_DROP_BINS`` so that
    a one-point loss and a collapse look different. NaN cells (not run) are grey with a dot.
    """
    values = _check_table(accuracy, "accuracy")
    if not 0.0 <= reference <= 1.0:
        raise ValueError(f"reference is an accuracy in [0, 1], got {reference}")
    drop = 100.0 * (reference - values)  # percentage points below the reference
    colours = ListedColormap(sns.color_palette("rocket_r", len(ACCURACY_DROP_BINS) - 1)).with_extremes(bad=MISSING)
    norm = BoundaryNorm(ACCURACY_DROP_BINS, colours.N)
    rows, columns = [str(r) for r in accuracy.index], [str(c) for c in accuracy.columns]
    fig, (ax,) = panels(title=title, width=BOOK_WIDTH, height=max(2.6, 0.42 * len(rows) + 2.0))
    mesh = ax.pcolormesh(np.ma.masked_invalid(drop), cmap=colours, norm=norm, edgecolors="white", linewidth=1)
    for (i, j), value in np.ndenumerate(values):
        dark = not np.isnan(value) and drop[i, j] >= ACCURACY_DROP_BINS[3]
        text = "·" if np.isnan(value) else f"{100 * value:.1f}"
        ax.text(j + 0.5, i + 0.5, text, ha="center", va="center", fontsize=SMALL_FONT,
                color="white" if dark else "black")
    ax.invert_yaxis()
    _grid_axes(ax, columns, rows)
    bar = fig.colorbar(mesh, ax=ax, ticks=ACCURACY_DROP_BINS[1:-1], extend="neither")
    bar.set_label(f"points below {reference_label} ({100 * reference:.1f}%)")
    return fig


def rate_grids(
    rates: Mapping[str, pd.DataFrame],
    *,
    title: str | None = None,
) -> Figure:
    """One annotated heatmap per entry of ``rates`` (e.g. ``{"FPR": ..., "FNR": ...}``), rows
    and columns as in the tables, values in [0, 1] shown in percent on one shared colour scale
    (light 0, dark 1). NaN cells (not run) are grey with a dot."""
    if not rates:
        raise ValueError("rates is empty: give {panel title: DataFrame of rates in [0, 1]}")
    tables = {name: _check_table(table, f"rates[{name!r}]") for name, table in rates.items()}
    for name, values in tables.items():
        if np.nanmin(values, initial=0.0) < 0 or np.nanmax(values, initial=0.0) > 1:
            raise ValueError(f"rates[{name!r}] must lie in [0, 1] (shares of clients)")
    first = next(iter(rates.values()))
    fig, axes = panels(list(rates), title=title, width=BOOK_WIDTH, height=max(2.6, 0.42 * len(first.index) + 2.0),
                       sharey=True)
    cmap = sns.color_palette(HEATMAP_CMAP, as_cmap=True).with_extremes(bad=MISSING)
    for ax, (name, table) in zip(axes, rates.items()):
        values = tables[name]
        mesh = ax.pcolormesh(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=1.0, edgecolors="white",
                             linewidth=1)
        for (i, j), value in np.ndenumerate(values):
            text = "·" if np.isnan(value) else f"{100 * value:.0f}"
            ax.text(j + 0.5, i + 0.5, text, ha="center", va="center", fontsize=SMALL_FONT,
                    color="white" if not np.isnan(value) and value > 0.5 else "black")
        ax.invert_yaxis()
        _grid_axes(ax, [str(c) for c in table.columns], [str(r) for r in table.index])
    fig.colorbar(mesh, ax=list(axes), label="% of clients", ticks=[0, 0.25, 0.5, 0.75, 1.0],
                 format=lambda x, _: f"{100 * x:.0f}")
    return fig


def seed_spread(
    table: pd.DataFrame,
    *,
    value: str = "test_acc",
    group: str = "attack",
    series: str = "defense",
    order: Sequence[str] | None = None,
    labels: Mapping[str, str] | None = None,
    colors: Mapping[str, str] | None = None,
    title: str | None = None,
) -> Figure:
    """Every seed's ``value`` as a dot and their mean as a horizontal bar, per ``group`` (x) and
    ``series`` (one colour each, side by side), from a run table
    (:func:`~skymask_lite.analysis.run_table`). The y axis spans the values, not [0, 1], so
    that the spread between seeds stays visible."""
    missing = [c for c in (value, group, series) if c not in table.columns]
    if missing:
        raise ValueError(f"the table has no column(s) {missing}; give a run_table()")
    groups = list(order) if order is not None else list(dict.fromkeys(table[group]))
    names = list(dict.fromkeys(table[series]))
    labels = labels or {}
    width = 0.8 / len(names)
    fig, (ax,) = panels(title=title, width=BOOK_WIDTH)
    for k, name in enumerate(names):
        label = labels.get(name, name)
        color = series_style(k, label, colors)["color"]
        rows = table[table[series] == name]
        for j, g in enumerate(groups):
            points = rows.loc[rows[group] == g, value].to_numpy(dtype=float)
            if len(points) == 0:
                continue
            x = j + (k - (len(names) - 1) / 2) * width
            ax.hlines(points.mean(), x - 0.42 * width, x + 0.42 * width, color=color, linewidth=2.5,
                      label=label if j == 0 or label not in ax.get_legend_handles_labels()[1] else None)
            ax.scatter(np.full(len(points), x), points, s=16, color=color, edgecolor="black", linewidth=0.4,
                       zorder=3)
    ax.set_xticks(np.arange(len(groups)), [labels.get(g, g) for g in groups], rotation=30, ha="right")
    for j in range(1, len(groups)):
        ax.axvline(j - 0.5, color="#dddddd", linewidth=0.8)
    ax.set_ylabel(METRIC_LABELS.get(value, value))
    ax.grid(axis="x", visible=False)
    ax.legend(ncols=min(len(names), 4), loc="best", fontsize=SMALL_FONT)
    return fig


def round_bands(
    rounds: pd.DataFrame,
    *,
    metric: str = "test_acc",
    series: str = "defense",
    labels: Mapping[str, str] | None = None,
    colors: Mapping[str, str] | None = None,
    ylim: tuple[float, float] | None = None,
    title: str | None = None,
) -> Figure:
    """``metric`` against the round, one line per ``series`` value: the mean over the seeds,
    with a band from the lowest to the highest seed, from a round table
    (:func:`~skymask_lite.analysis.round_table`)."""
    missing = [c for c in (metric, series, "round") if c not in rounds.columns]
    if missing:
        raise ValueError(f"the table has no column(s) {missing}; give a round_table()")
    labels = labels or {}
    fig, (ax,) = panels(title=title, width=BOOK_WIDTH)
    for k, (name, rows) in enumerate(rounds.groupby(series, sort=False)):
        label = labels.get(name, name)
        style = series_style(k, label, colors)
        stats = rows.groupby("round")[metric].agg(["mean", "min", "max"])
        ax.plot(stats.index, stats["mean"], label=label, **style)
        ax.fill_between(stats.index, stats["min"], stats["max"], color=style["color"], alpha=0.18, linewidth=0)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.legend(ncols=2, fontsize=SMALL_FONT)
    return fig


def setting_curves(
    table: pd.DataFrame,
    setting: str,
    *,
    value: str = "test_acc",
    panel: str = "attack",
    series: str = "defense",
    labels: Mapping[str, str] | None = None,
    colors: Mapping[str, str] | None = None,
    xlabel: str | None = None,
    title: str | None = None,
) -> Figure:
    """``value`` against ``setting`` (e.g. the number of attackers), one panel per ``panel``
    value and one line per ``series`` value, from a run table
    (:func:`~skymask_lite.analysis.run_table`); a series has points only where it was run.
    The y axis spans the values (the differences, not [0, 1])."""
    missing = [c for c in (value, setting, panel, series) if c not in table.columns]
    if missing:
        raise ValueError(f"the table has no column(s) {missing}; give a run_table()")
    labels = labels or {}
    names = list(dict.fromkeys(table[panel]))
    lines = list(dict.fromkeys(table[series]))  # one style per series in every panel
    fig, axes = panels([labels.get(n, n) for n in names], title=title, sharey=True)
    legend: dict[str, object] = {}
    for ax, name in zip(axes, names):
        rows = table[table[panel] == name]
        for line, points in rows.groupby(series, sort=False):
            label = labels.get(line, line)
            points = points.sort_values(setting)
            (legend[label],) = ax.plot(points[setting], points[value], label=label, marker="o", markersize=4,
                                       **series_style(lines.index(line), label, colors))
        ax.set_xticks(sorted(table[setting].unique()))
    fig.supxlabel(xlabel or setting, fontsize=SMALL_FONT + 1)
    axes[0].set_ylabel(METRIC_LABELS.get(value, value))
    fig.legend(list(legend.values()), list(legend), loc="outside right upper", fontsize=SMALL_FONT)
    return fig
