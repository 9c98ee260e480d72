"""The book's figures, in one style, one module per chapter.

Call :func:`set_style` once (every chapter does it in its import cell). Each figure function
then draws on a new ``matplotlib.figure.Figure`` and returns it. The figures are made
without ``matplotlib.pyplot``, so a figure returned as a notebook cell's last expression
is shown exactly once, whatever the backend, and no figure stays open between cells. Every
figure is sized and titled by one helper, :func:`panels`, and is at
most ``BOOK_WIDTH`` inches (700 pixels) wide; plot functions only draw what the package's
computations give them.

Fixed colours, the same in every figure:

* ``BENIGN``, ``MALICIOUS``, ``ROOT``: benign clients, malicious clients and the
  server's root model (looked up by name in ``ROLE_COLORS``);
* ``PALETTE``: the cycle for every other series (defenses, settings), colour-blind safe
  and disjoint from the three role colours; series ``k`` also gets line style
  ``LINESTYLES[k % 4]``, so curves that coincide stay visible.

Modules, in chapter order: ``style``, ``data`` (chapter 1), ``attacks`` (2), ``defenses`` (3),
``masks`` (4), ``gmm`` (5), ``baselines`` (SkyMask against every baseline, Stress tests). Every public name is
importable from ``skymask_lite.plots``.
"""

from __future__ import annotations

from .baselines import ACCURACY_DROP_BINS, accuracy_grid, rate_grids, round_bands, seed_spread, setting_curves
from .attacks import coordinate_ranges, gamma_search, image_rows, role_strips, update_pca
from .data import accuracy_curves, example_images, label_heatmap
from .defenses import client_scatter, client_scores, detection_bars, metric_heatmap
from .gmm import detection_rounds, mask_pca
from .masks import client_layer_heatmap, loss_curves, mask_heatmaps
from . import style
from .style import *  # noqa: F403  (the colours, sizes, panels and set_style)

__all__ = [
    *style.__all__,
    "ACCURACY_DROP_BINS",
    "accuracy_curves",
    "accuracy_grid",
    "client_layer_heatmap",
    "client_scatter",
    "client_scores",
    "coordinate_ranges",
    "detection_bars",
    "detection_rounds",
    "example_images",
    "gamma_search",
    "image_rows",
    "label_heatmap",
    "loss_curves",
    "mask_heatmaps",
    "mask_pca",
    "metric_heatmap",
    "rate_grids",
    "role_strips",
    "round_bands",
    "seed_spread",
    "setting_curves",
    "update_pca",
]
