"""skymask-lite: Byzantine-robust federated learning and SkyMask (Yan et al., ECCV 2024), small and vectorised.

Modules, one idea each: :mod:`~skymask_lite.data` (datasets, non-IID splits, root set),
:mod:`~skymask_lite.models`, :mod:`~skymask_lite.fl` (the simulator),
:mod:`~skymask_lite.attacks`, :mod:`~skymask_lite.defenses`, :mod:`~skymask_lite.skymask`,
:mod:`~skymask_lite.metrics`, :mod:`~skymask_lite.experiments` (configs, runs, results JSON;
the command line is ``skymask-lite`` or ``python -m skymask_lite``) and :mod:`~skymask_lite.plots`.

The names most readers need are here, imported on first use (``import skymask_lite`` stays
light): ``Config`` and ``run_experiment`` (from experiments), ``ATTACKS`` and ``DEFENSES`` (the
registries of names) and the module ``skymask`` (the rule is ``skymask_lite.skymask.skymask``).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = ["ATTACKS", "Config", "DEFENSES", "run_experiment", "skymask"]

_EXPORTS = {"Config": "experiments", "run_experiment": "experiments", "ATTACKS": "attacks", "DEFENSES": "defenses"}


def __getattr__(name: str) -> Any:
    """The re-exported names, imported when first asked for (no import cycle with the submodules)."""
    if name == "skymask":
        return importlib.import_module(".skymask", __name__)
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
