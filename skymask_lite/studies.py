"""The book's studies: named lists of :class:`~skymask_lite.experiments.Config`, one per folder
of ``data/results/``, so that one command recomputes any of them::

    python -m skymask_lite study decision --out-dir data/results/decision

A study is a function returning its configs; :data:`STUDIES` maps its name to it. The runner
skips finished runs and resumes interrupted ones, so a long study can span sessions.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

from .experiments import RESULTS_DIR, Config, run_name

__all__ = [
    "STUDIES",
    "adaptive_study",
    "baselines_study",
    "cifar_study",
    "decision_ashman_study",
    "decision_study",
    "load_study",
    "root_study",
    "scale_study",
    "shard",
    "share_study",
    "skymask_study",
    "study_configs",
    "study_queue",
]

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


#: The attack cases of the main table (``none`` keeps f = 20 honest "attackers").
MAIN_ATTACKS = ("none", "label_flip", "lie", "fang_trim", "fang_krum", "min_max", "min_sum", "backdoor")
#: The rules of the main table, in the chapter's column order.
MAIN_DEFENSES = (
    "fedavg", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "fltrust", "flame", "deepsight", "skymask",
)
#: The paper's three rules, run with every seed of ``SEEDS``.
SEEDED_DEFENSES = ("fedavg", "fltrust", "skymask")
#: The order the main table is computed in: the paper's three rules first.
COMPUTE_ORDER = (*reversed(SEEDED_DEFENSES), *(d for d in MAIN_DEFENSES if d not in SEEDED_DEFENSES))
#: The rules that select clients, with an FPR and an FNR.
DETECTION_RULES = ("tolpegin", "fldetector", "flame", "multi_krum", "deepsight", "fltrust", "skymask")
#: The attacks of the detection table.
DETECTION_ATTACKS = ("min_max", "min_sum", "fang_krum", "fang_trim", "label_flip", "backdoor")
#: The rules whose cost without attack the chapter compares (three seeds).
COST_DEFENSES = ("fedavg", "skymask", "fltrust", "krum", "multi_krum", "median", "trimmed_mean")
#: The seeds of the repeated runs.
SEEDS = (0, 1, 2)


def baselines_study() -> list[Config]:
    """SkyMask against every baseline (the chapter of that name): 100 clients, 20 of them
    malicious (20%), 20 rounds, the book's recipe; ``attack="none"`` keeps f = 20 so that every
    rule is configured as under attack (the cost of defending).

    In the order the chapter needs them:

    1. the main table, seed 0: ``MAIN_DEFENSES`` x ``MAIN_ATTACKS``, the paper's three
       (SkyMask, FLTrust, FedAvg) first (``COMPUTE_ORDER``);
    2. the detection table's two pure detectors (Tolpegin, FLDetector) under
       ``DETECTION_ATTACKS``, seed 0 (the other rules of ``DETECTION_RULES`` are in 1);
    3. seeds 1 and 2 of FedAvg, FLTrust and SkyMask under every attack of the main table;
    4. seeds 1 and 2 of the other rules of ``COST_DEFENSES`` without attack.
    """
    base = Config(num_malicious=20, rounds=20)
    configs = [dataclasses.replace(base, attack=a, defense=d) for d in COMPUTE_ORDER for a in MAIN_ATTACKS]
    configs += [
        dataclasses.replace(base, attack=a, defense=d)
        for a in DETECTION_ATTACKS
        for d in DETECTION_RULES
        if d not in MAIN_DEFENSES
    ]
    for seed in SEEDS[1:]:
        configs += [
            dataclasses.replace(base, attack=a, defense=d, seed=seed) for a in MAIN_ATTACKS for d in SEEDED_DEFENSES
        ]
        configs += [
            dataclasses.replace(base, attack="none", defense=d, seed=seed)
            for d in COST_DEFENSES
            if d not in SEEDED_DEFENSES
        ]
    return configs


#: The adaptive study's attacks, ``(name, options)``: the adaptive one and its two references.
ADAPTIVE_ATTACKS = (
    ("adaptive_skymask", {}),
    ("min_max", {"spread": 0.5}),
    ("min_max", {}),
)
#: The adaptive study's defenses.
ADAPTIVE_DEFENSES = ("skymask", "fltrust", "tolpegin", "flame", "multi_krum", "median")
#: The adaptive study's numbers of malicious clients (of 100).
ADAPTIVE_SHARES = (20, 40)


def adaptive_study() -> list[Config]:
    """Attackers who know SkyMask (the chapter "Can an attacker fool the masks?"): 100 clients,
    20 rounds, the book's recipe; ``adaptive_skymask`` (default options), Min-Max whose attackers
    each add their own offset (``spread=0.5``, the same offsets as the adaptive attack) and
    colluding Min-Max (the reference), with 20 and 40 malicious clients, against
    ``ADAPTIVE_DEFENSES``, seeds 0-2. Computed seed by seed, 20% before 40%, the adaptive attack
    and its non-colluding reference first."""
    base = Config(rounds=20)
    return [
        dataclasses.replace(base, attack=attack, attack_options=options, defense=defense, num_malicious=f, seed=seed)
        for seed in SEEDS
        for f in ADAPTIVE_SHARES
        for defense in ADAPTIVE_DEFENSES
        for attack, options in ADAPTIVE_ATTACKS
    ]


#: The attacker shares of the share study, malicious clients of 100.
SHARE_FRACTIONS = (20, 40, 60, 80)
#: The share study's attacks.
SHARE_ATTACKS = ("min_max", "fang_trim", "min_sum")
#: The share study's defenses.
SHARE_DEFENSES = ("fedavg", "median", "fltrust", "skymask")
#: The federation sizes of the scale study (20% of them malicious).
SCALE_CLIENTS = (200, 500)
#: The root-set sizes of the root study.
ROOT_SIZES = (50, 100, 200)
#: The root biases of the root study (``None``: uniform).
ROOT_BIASES = (None, 0.5, 0.9)


def _valid(config: Config) -> bool:
    """Whether the config passes its checks (a rule's robustness condition included)."""
    try:
        config.validate()
    except ValueError:
        return False
    return True


def share_study() -> list[Config]:
    """The attacker share (the chapter "Stress tests"): 20, 40, 60 and 80 of 100 clients
    malicious, under Min-Max, Fang-Trim and Min-Sum, against FedAvg, the median, FLTrust and
    SkyMask; 20 rounds, seed 0. Pairs a rule's own condition excludes (the median needs an
    honest majority) are left out: the chapter shows them as not applicable. The largest shares
    come first (the paper's boldest claim; a study stopped early has computed them)."""
    base = Config(rounds=20)
    configs = [
        dataclasses.replace(base, attack=a, defense=d, num_malicious=f)
        for f in sorted(SHARE_FRACTIONS, reverse=True)
        for d in ("skymask", "fltrust", "fedavg", "median")
        for a in SHARE_ATTACKS
    ]
    return [c for c in configs if _valid(c)]


def scale_study() -> list[Config]:
    """Scale (the chapter "Stress tests"): 200 and 500 clients, 20% of them malicious, under every
    attack of the detection table, against SkyMask and FLTrust; 20 rounds, seed 0. The round
    records hold the server step's time (``timing["defense"]``)."""
    base = Config(rounds=20)
    return [
        dataclasses.replace(base, attack=a, defense=d, num_clients=n, num_malicious=n // 5)
        for n in SCALE_CLIENTS
        for d in ("skymask", "fltrust")
        for a in DETECTION_ATTACKS
    ]


def root_study() -> list[Config]:
    """The root set (the chapter "Stress tests"): root sizes 50, 100 and 200 (uniform) and root
    bias p = 0.5 and 0.9 (size 100; ``None`` is uniform, the default), under Min-Max and without
    attack, against SkyMask and FLTrust; 100 clients, 20 of them malicious, 20 rounds, seed 0."""
    base = Config(num_malicious=20, rounds=20)
    settings = [{"root_size": size} for size in ROOT_SIZES]
    settings += [{"root_bias": p} for p in ROOT_BIASES if p is not None]
    return [
        dataclasses.replace(base, **setting, attack=a, defense=d)
        for setting in settings
        for d in ("skymask", "fltrust")
        for a in ("min_max", "none")
    ]


#: The CIFAR study's datasets, attacks (the paper's CIFAR table, plus no attack) and defenses.
CIFAR_DATASETS = ("cifar10", "cifar100")
CIFAR_ATTACKS = ("none", "min_max", "fang_trim", "fang_krum")
CIFAR_DEFENSES = ("fedavg", "fltrust", "skymask")
#: The attacks of the paper's CIFAR-10 detection table.
CIFAR_DETECTION_ATTACKS = ("min_max", "min_sum", "fang_krum")
#: Rounds of a CIFAR run: ResNet20 learns more slowly than the Fashion-MNIST CNN.
CIFAR_ROUNDS = 100


def cifar_study() -> list[Config]:
    """The paper's CIFAR rows of every study (the chapter "Reproducing on CIFAR"), ResNet20, 100
    clients (20 malicious), bias 0.5, root set of 100, seed 0, in four parts:

    1. the main table: CIFAR-10 and CIFAR-100; no attack, Min-Max, Fang-Trim and Fang-Krum
       against FedAvg, FLTrust and SkyMask (24 runs);
    2. the detection table: CIFAR-10; Tolpegin and FLDetector under Min-Max, Min-Sum and
       Fang-Krum, and SkyMask under Min-Sum (7 runs);
    3. the attacker share: CIFAR-10, 40, 60 and 80 malicious, Min-Max, SkyMask and FLTrust (6);
    4. scale: CIFAR-10, 200 and 500 clients (20% malicious), Min-Max, SkyMask (2).

    The recipe is the book's with two changes for ResNet20: batch 64 (the authors' CIFAR batch)
    and a plain average, global learning rate 1 (BatchNorm's running statistics are averaged,
    not stepped, so eta = 2 would move the weights twice as far as their statistics);
    ``CIFAR_ROUNDS`` rounds; SkyMask's mask learning rate 1e8, the authors' for ResNet20. Never
    run on the book's machine (CIFAR cannot be downloaded there): for a reader with a GPU and a
    network, where torchvision downloads the data."""
    base = Config(model="resnet20", num_malicious=20, rounds=CIFAR_ROUNDS, batch_size=64, global_lr=1.0)

    def run(**fields: Any) -> Config:
        options = {"lr": 1e8} if fields["defense"] == "skymask" else {}
        return dataclasses.replace(base, **{"dataset": "cifar10", "defense_options": options, **fields})

    main = [run(dataset=data, attack=a, defense=d)
            for data in CIFAR_DATASETS for a in CIFAR_ATTACKS for d in CIFAR_DEFENSES]
    detection = [run(attack=a, defense=d) for d in ("tolpegin", "fldetector") for a in CIFAR_DETECTION_ATTACKS]
    detection.append(run(attack="min_sum", defense="skymask"))
    share = [run(attack="min_max", defense=d, num_malicious=f)
             for f in SHARE_FRACTIONS[1:] for d in ("skymask", "fltrust")]
    scale = [run(attack="min_max", defense="skymask", num_clients=n, num_malicious=n // 5) for n in SCALE_CLIENTS]
    return main + detection + share + scale


STUDIES: dict[str, Callable[[], list[Config]]] = {
    "decision": decision_study,
    "decision_ashman": decision_ashman_study,
    "skymask": skymask_study,
    "baselines": baselines_study,
    "adaptive": adaptive_study,
    "share": share_study,
    "cifar": cifar_study,
    "scale": scale_study,
    "root": root_study,
}
"""Study name -> its configs (each study's folder is ``data/results/<name>/``)."""


def study_configs(name: str) -> list[Config]:
    """The configs of study ``name``; a clear error for an unknown name."""
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; choose one of {sorted(STUDIES)}")
    return STUDIES[name]()


def study_queue(names: list[str], seed_first: bool = False) -> list[tuple[str, Config]]:
    """The runs of the studies ``names`` as one queue of ``(study, config)``: study after study,
    each in its own order, or with ``seed_first`` every study's seed 0 before any seed 1 (a
    stable sort by seed), so that a queue cut short leaves whole single-seed tables."""
    queue = [(name, config) for name in names for config in study_configs(name)]
    return sorted(queue, key=lambda item: item[1].seed) if seed_first else queue


def shard(configs: list[Config], spec: str) -> list[Config]:
    """Shard ``"k/m"`` (1 <= k <= m) of ``configs``: every m-th config from the k-th on, so that m
    processes (or machines) writing to one folder split a study without running a config twice."""
    try:
        k, m = (int(part) for part in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard {spec}: expected K/M, e.g. 1/2 for the first of two shards") from None
    if not 1 <= k <= m:
        raise ValueError(f"--shard {spec}: K must be between 1 and M, e.g. 1/2 or 2/2")
    return configs[k - 1 :: m]


def load_study(name: str, folder: str | os.PathLike | None = None) -> tuple[list[dict[str, Any]], list[Config]]:
    """The results files of study ``name`` in ``folder`` (default ``data/results/<name>/``):
    ``(found, missing)``, the results dicts of the finished runs and the configs not run yet,
    both in the study's order. A run counts wherever and however it was computed (engine and
    device are not part of its name); a half-finished run (only its checkpoint) is missing."""
    folder = Path(folder) if folder is not None else RESULTS_DIR / name
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is not a folder; compute the study with "
            f"`python -m skymask_lite study {name} --out-dir {folder}`"
        )
    found, missing = [], []
    for config in study_configs(name):
        path = folder / f"{run_name(config)}.json"
        if path.exists():
            found.append(json.loads(path.read_text()))
        else:
            missing.append(config)
    return found, missing
