"""The book's studies: named lists of :class:`~skymask_lite.experiments.Config`, one per folder
of ``data/results/``, so that one command recomputes any of them::

    python -m skymask_lite study decision --out-dir data/results/decision

A study is a function returning its configs; :data:`STUDIES` maps its name to it. The runner
skips finished runs and resumes interrupted ones, so a long study can span sessions.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from .experiments import Config

__all__ = ["STUDIES", "decision_ashman_study", "decision_study", "skymask_study", "study_configs"]

DECISION_BIAS = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9)
DECISION_ALPHA = (0.1, 0.3, 1.0)
DECISION_ATTACKS = ("none", "min_max", "fang_trim", "lie")


def decision_study(rounds: int = 5, seeds: tuple[int, ...] = (0, 1, 2)) -> list[Config]:
    """SkyMask's 1-vs-2 decision across non-IID settings (the chapter "Is there an attack?").

    No attack and Min-Max, Fang-Trim and LIE with 20% attackers; the bias-q split at
    q in {0.1, 0.3, 0.5, 0.7, 0.8, 0.9} and the Dirichlet split at alpha in {0.1, 0.3, 1.0};
    ``seeds``; ``rounds`` rounds each; 100 clients, the book's recipe. Every round records the
    masks' geometry (:func:`~skymask_lite.skymask.mask_geometry`), so that any 1-vs-2 rule can be
    recomputed from the files.
    """
    base = Config(defense="skymask", defense_options={"record_geometry": True}, rounds=rounds, num_clients=100)
    splits = [{"split": "bias", "bias": q} for q in DECISION_BIAS]
    splits += [{"split": "dirichlet", "alpha": a} for a in DECISION_ALPHA]
    return [
        dataclasses.replace(base, **split, attack=attack, num_malicious=0 if attack == "none" else 20, seed=seed)
        for seed in seeds
        for split in splits
        for attack in DECISION_ATTACKS
    ]


def decision_ashman_study() -> list[Config]:
    """The decision study under the earlier 1-vs-2 rule, ``criterion="ashman"`` (BIC and Ashman's
    D > 8 alone), for the chapter's comparison of the two rules."""
    return [
        dataclasses.replace(c, defense_options={**c.defense_options, "criterion": "ashman"})
        for c in decision_study()
    ]


def skymask_study() -> list[Config]:
    """SkyMask under every attack of chapter 5's table (``data/results/skymask/``): 100 clients,
    20 of them malicious, 20 rounds, seed 0."""
    base = Config(defense="skymask", num_malicious=20, rounds=20)
    attacks = ("none", "min_max", "min_sum", "fang_trim", "fang_krum", "label_flip")
    return [dataclasses.replace(base, attack=attack) for attack in attacks]


STUDIES: dict[str, Callable[[], list[Config]]] = {
    "decision": decision_study,
    "decision_ashman": decision_ashman_study,
    "skymask": skymask_study,
}
"""Study name -> its configs (each study's folder is ``data/results/<name>/``)."""


def study_configs(name: str) -> list[Config]:
    """The configs of study ``name``; a clear error for an unknown name."""
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; choose one of {sorted(STUDIES)}")
    return STUDIES[name]()
