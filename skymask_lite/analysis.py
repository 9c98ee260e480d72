"""Reading the studies back: one table row per round of SkyMask, and any 1-vs-2 rule recomputed
from what a round recorded.

Every round of a study run with ``record_geometry`` (:func:`~skymask_lite.skymask.mask_geometry`)
holds the masks' 2-D PCA points, the 2-component mixture's partition, means and covariances.
:func:`geometry_statistics` derives from them every statistic a 1-vs-2 rule reads (BIC is
recorded by the rule itself), and :func:`decide` applies a criterion to them with the same code
as :func:`~skymask_lite.clustering.cluster_masks`. A rule recomputed this way on a round decides as
SkyMask with that rule would have decided on the same masks; later rounds also depend on the
earlier decisions, which is why the chapter recomputes the study with the rule it adopts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from .clustering import DEFAULT_THRESHOLD, _two_clusters, ashman_d, benign_side, read_partition

__all__ = [
    "SETTING_KEYS",
    "decide",
    "decision_rounds",
    "geometry_statistics",
    "recorded_points",
    "round_table",
    "run_table",
    "setting_label",
    "summarize_seeds",
]


SETTING_KEYS = ("attack", "defense", "seed", "num_clients", "num_malicious", "bias", "root_size", "root_bias")
"""The config fields that tell the runs of a study apart (the columns that lead every table)."""


def _setting(result: dict[str, Any]) -> dict[str, Any]:
    config = result["config"]
    return {key: config.get(key) for key in SETTING_KEYS}


def run_table(results: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per run (a results dict of :func:`~skymask_lite.experiments.run_experiment`).

    Columns: :data:`SETTING_KEYS`; the final ``test_acc``, ``asr`` (NaN without a backdoor),
    ``mean_fpr`` and ``mean_fnr`` over the rounds; ``collapsed`` (the round the model collapsed
    in, NaN if it did not) and ``rounds`` run; and where it ran: ``engine`` (the resolved one
    when the file records it, else the config's), ``device``,
    ``threads`` and ``commit`` (the first 7 characters).
    """
    rows = []
    for result in results:
        final, env = result["final"], result.get("env", {})
        collapsed = final.get("collapsed")
        rows.append({
            **_setting(result),
            "test_acc": final["test_acc"],
            "asr": final.get("asr", math.nan),
            "mean_fpr": final.get("mean_fpr", math.nan),
            "mean_fnr": final.get("mean_fnr", math.nan),
            "collapsed": collapsed["round"] if collapsed else math.nan,
            "rounds": final["rounds"],
            "engine": env.get("engine") or result["config"].get("engine"),  # the one that ran, if recorded
            "device": env.get("device"),
            "threads": env.get("threads"),
            "commit": (env.get("git_commit") or "")[:7],
        })
    return pd.DataFrame(rows)


def round_table(results: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per round of every run: :data:`SETTING_KEYS`, ``round``, ``test_acc``, ``fpr``,
    ``fnr``, ``asr`` (NaN without a backdoor), ``kept`` (how many clients were kept), the
    server step's ``defense_seconds``, and the run's ``engine`` and ``device`` (as in
    :func:`run_table`: the same kept clients give the same model only on the same engine)."""
    rows = []
    for result in results:
        setting = _setting(result)
        env = result.get("env", {})
        engine, device = env.get("engine") or result["config"].get("engine"), env.get("device")
        for record in result["rounds"]:
            rows.append({
                **setting,
                "round": record["round"],
                "test_acc": record["test_acc"],
                "fpr": record.get("fpr", math.nan),
                "fnr": record.get("fnr", math.nan),
                "asr": record.get("asr", math.nan),
                "kept": len(record.get("kept", [])),
                "defense_seconds": record.get("timing", {}).get("defense", math.nan),
                "engine": engine,
                "device": device,
            })
    return pd.DataFrame(rows)


def summarize_seeds(table: pd.DataFrame, value: str, by: tuple[str, ...] = ("attack", "defense")) -> pd.DataFrame:
    """Mean, minimum, maximum and number of seeds of ``value`` per group ``by`` of a
    :func:`run_table` (the spread over seeds is ``max - min``)."""
    missing = [key for key in (*by, value, "seed") if key not in table.columns]
    if missing:
        raise ValueError(f"the table has no column(s) {missing}; give a run_table() or round_table()")
    grouped = table.groupby(list(by), sort=False)[value]
    return grouped.agg(mean="mean", low="min", high="max", seeds="count").reset_index()


def setting_label(config: dict[str, Any]) -> str:
    """``"q=0.5"`` for the bias split, ``"α=0.3"`` for the Dirichlet split."""
    return f"q={config['bias']}" if config["split"] == "bias" else f"α={config['alpha']}"


def geometry_statistics(geometry: dict[str, Any], malicious: list[int]) -> dict[str, Any]:
    """What the 2-component partition says, from a round's recorded geometry.

    ``ashman_d`` of the two components; ``other_size``, the clients outside the root's component;
    ``spread_ratio``, the :func:`~skymask_lite.clustering.robust_spread` of that component over the
    root's (root included); ``root_side_ratio`` (:func:`~skymask_lite.clustering.read_partition`);
    and, were two clusters chosen, the ``fpr_if_two`` (honest clients dropped) and ``fnr_if_two``
    (attackers kept; ``None`` without attackers) of the side ``collapse_or_ashman`` keeps
    (:func:`~skymask_lite.clustering.benign_side`: the root's component, or the other one when the
    root's clients collapsed, with a collapsed group's ``strays``).
    """
    points, labels = np.asarray(geometry["points"]), np.asarray(geometry["labels"])
    n = len(labels) - 1  # the root is the last row
    partition = read_partition(points, labels, n)
    kept, strays = benign_side(points, partition, n)
    other = np.flatnonzero(~kept[:n])
    bad = set(malicious)
    honest = n - len(bad)
    return {
        "ashman_d": ashman_d(np.asarray(geometry["means"]), np.asarray(geometry["covariances"])),
        "other_size": partition["other_size"],
        "spread_ratio": partition["spread_ratio"],
        "root_side_ratio": partition["root_side_ratio"],
        "strays": int(len(strays)),
        "fpr_if_two": sum(1 for i in other if i not in bad) / honest if honest else None,
        "fnr_if_two": sum(1 for i in bad if kept[i]) / len(bad) if bad else None,
    }


def decide(stats: dict[str, Any], bic_1: float, bic_2: float, criterion: str = "collapse_or_ashman",
           threshold: float | None = None) -> int:
    """The number of clusters ``criterion`` chooses for a round's statistics (1 or 2)."""
    threshold = DEFAULT_THRESHOLD[criterion] if threshold is None else threshold
    bic = {1: bic_1, 2: bic_2}
    margin = (bic_1 - bic_2) / abs(bic_1) if bic_1 != 0 else math.inf
    root_side = stats.get("root_side_ratio", math.inf)  # read by collapse_or_ashman only
    two = _two_clusters(criterion, threshold, bic, stats["ashman_d"], margin, stats["other_size"],
                        stats["spread_ratio"], root_side)
    return 2 if two else 1


def recorded_points(root: str | Path) -> list[np.ndarray]:
    """The masks' 2-D PCA points (``[n + 1, 2]``, root last) of every round that recorded its
    geometry, in the results files of ``root``'s study folders (``root/*/*.json``): the points
    SkyMask's clustering really saw."""
    points = []
    for path in sorted(Path(root).glob("*/*.json")):
        result = json.loads(path.read_text())
        for record in result.get("rounds", []) if isinstance(result, dict) else []:
            geometry = (record.get("defense_info") or {}).get("geometry")
            if geometry:
                points.append(np.array(geometry["points"]))
    return points


def decision_rounds(folder: str | Path) -> pd.DataFrame:
    """One row per recorded round of every results file in ``folder``: the setting, attack, seed
    and round, what SkyMask decided and measured (``num_clusters``, ``fpr``, ``fnr``, BIC), the
    :func:`geometry_statistics` of the round, and the rule the run used (``criterion``)."""
    rows = []
    for path in sorted(Path(folder).glob("*.json")):
        result = json.loads(path.read_text())
        config = result["config"]
        for record in result["rounds"]:
            info = record["defense_info"]
            rows.append({
                "setting": setting_label(config),
                "split": config["split"],
                "attack": config["attack"],
                "seed": config["seed"],
                "round": record["round"],
                "criterion": info["criterion"],
                "num_clusters": info["num_clusters"],
                "fpr": record["fpr"],
                "fnr": record["fnr"],
                "bic_1": info["bic_1"],
                "bic_2": info["bic_2"],
                **geometry_statistics(info["geometry"], result["malicious"]),
            })
    return pd.DataFrame(rows)

