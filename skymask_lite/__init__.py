"""skymask-lite: Byzantine-robust federated learning and SkyMask (Yan et al., ECCV 2024), small and vectorised.

Modules, one idea each: :mod:`~skymask_lite.data` (datasets, non-IID splits, root set),
:mod:`~skymask_lite.models`, :mod:`~skymask_lite.fl` (the simulator),
:mod:`~skymask_lite.attacks`, :mod:`~skymask_lite.defenses`, :mod:`~skymask_lite.skymask`,
:mod:`~skymask_lite.metrics`, :mod:`~skymask_lite.experiments` (configs, CLI, results JSON)
and :mod:`~skymask_lite.plots`.
"""

__version__ = "0.1.0"
