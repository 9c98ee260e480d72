import pytest

from skymask_lite.__main__ import main
from skymask_lite.experiments import run_name
from skymask_lite.studies import DECISION_ALPHA, DECISION_ATTACKS, DECISION_BIAS, STUDIES, study_configs, study_queue


def test_decision_study_covers_its_grid_once():
    configs = study_configs("decision")
    assert len(configs) == 3 * (len(DECISION_BIAS) + len(DECISION_ALPHA)) * len(DECISION_ATTACKS)
    assert len({run_name(c) for c in configs}) == len(configs)  # one file per run
    for config in configs:
        config.validate()
        assert config.defense == "skymask" and config.rounds == 5
        assert config.defense_options == {"record_geometry": True}
        assert (config.num_malicious == 0) == (config.attack == "none")
    splits = {(c.split, c.bias if c.split == "bias" else c.alpha) for c in configs}
    assert splits == {("bias", q) for q in DECISION_BIAS} | {("dirichlet", a) for a in DECISION_ALPHA}


def test_unknown_study_names_the_choices():
    with pytest.raises(ValueError, match="decision"):
        study_configs("nope")
    assert set(STUDIES) >= {"decision"}


def test_study_command_checks_its_folder_before_any_run(capsys):
    assert main(["study", "decision", "--out-dir", "/proc/skymask-nope"]) == 2
    assert "--out-dir" in capsys.readouterr().err


def test_skymask_study_names_the_committed_files():
    """The study recomputes exactly the committed skymask/ runs (same run identity, same file)."""
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "data" / "results" / "skymask"
    names = {f"{run_name(c)}.json" for c in study_configs("skymask")}
    assert names == {p.name for p in folder.glob("*.json")}


def test_baselines_study_covers_the_issue_grid_once():
    from skymask_lite import studies

    configs = study_configs("baselines")
    assert len({run_name(c) for c in configs}) == len(configs)
    cells = {(c.attack, c.defense, c.seed) for c in configs}
    for attack in studies.MAIN_ATTACKS:  # the main table, seed 0; three seeds for the paper's three rules
        for defense in studies.MAIN_DEFENSES:
            assert (attack, defense, 0) in cells
        for defense in studies.SEEDED_DEFENSES:
            assert {(attack, defense, s) for s in studies.SEEDS} <= cells
    for attack in studies.DETECTION_ATTACKS:  # every selecting rule under every detection attack
        assert {(attack, rule, 0) for rule in studies.DETECTION_RULES} <= cells
    for defense in studies.COST_DEFENSES:  # the cost of defending: no attack, three seeds
        assert {("none", defense, s) for s in studies.SEEDS} <= cells
    for config in configs:
        config.validate()
        assert (config.num_clients, config.num_malicious, config.rounds) == (100, 20, 20)
    assert configs[0].defense == "skymask"  # the paper's rule is computed first


def test_shards_split_a_study_exactly():
    from skymask_lite.studies import shard

    configs = study_configs("baselines")
    parts = [shard(configs, f"{k}/3") for k in (1, 2, 3)]
    names = [run_name(c) for part in parts for c in part]
    assert sorted(names) == sorted(run_name(c) for c in configs)
    for bad in ("0/2", "3/2", "x", "1/2/3"):
        with pytest.raises(ValueError, match="--shard"):
            shard(configs, bad)


def test_study_command_rejects_a_bad_shard_before_any_run(capsys):
    assert main(["study", "baselines", "--out-dir", "/tmp", "--shard", "5/2"]) == 2
    assert "--shard 5/2" in capsys.readouterr().err


def test_adaptive_study_pairs_each_attack_with_its_references():
    from skymask_lite import studies

    configs = study_configs("adaptive")
    assert len({run_name(c) for c in configs}) == len(configs) == 3 * 2 * 6 * 3
    cells = {(c.attack, tuple(sorted(c.attack_options.items())), c.defense, c.num_malicious, c.seed) for c in configs}
    for attack, options in studies.ADAPTIVE_ATTACKS:
        for defense in studies.ADAPTIVE_DEFENSES:
            for f in studies.ADAPTIVE_SHARES:
                assert {(attack, tuple(sorted(options.items())), defense, f, s) for s in studies.SEEDS} <= cells
    for config in configs:
        config.validate()
    assert configs[0].attack == "adaptive_skymask" and configs[0].defense == "skymask"
    assert (configs[0].seed, configs[0].num_malicious) == (0, 20)


@pytest.mark.parametrize("name", ["share", "scale", "root"])
def test_stress_studies_are_valid_and_named_once(name):
    configs = study_configs(name)
    assert configs and len({run_name(c) for c in configs}) == len(configs)
    for config in configs:
        config.validate()
        assert config.rounds == 20 and config.seed == 0


def test_share_study_leaves_out_only_what_a_rule_forbids():
    from skymask_lite import studies
    from skymask_lite.defenses import make_defense

    cells = {(c.attack, c.defense, c.num_malicious) for c in study_configs("share")}
    for f in studies.SHARE_FRACTIONS:
        for defense in studies.SHARE_DEFENSES:
            allowed = True
            try:
                make_defense(defense).require(100, f)
            except ValueError:
                allowed = False
            for attack in studies.SHARE_ATTACKS:
                assert ((attack, defense, f) in cells) == allowed
    assert ("min_max", "median", 60) not in cells and ("min_max", "skymask", 80) in cells


def test_scale_and_root_studies_cover_their_settings():
    from skymask_lite import studies

    scale = study_configs("scale")
    assert {(c.num_clients, c.num_malicious) for c in scale} == {(n, n // 5) for n in studies.SCALE_CLIENTS}
    assert {c.attack for c in scale} == set(studies.DETECTION_ATTACKS)
    root = study_configs("root")
    assert {c.root_size for c in root} == set(studies.ROOT_SIZES)
    assert {c.root_bias for c in root} == set(studies.ROOT_BIASES)


def test_study_status_counts_and_lists_the_missing_runs_without_computing(tmp_path, capsys, monkeypatch):
    import json

    from skymask_lite import experiments

    monkeypatch.setattr(experiments, "run_experiment", lambda *a, **k: pytest.fail("computed a run"))
    configs = study_configs("skymask")
    (tmp_path / f"{run_name(configs[0])}.json").write_text("{}")
    assert main(["study", "skymask", "--out-dir", str(tmp_path), "--status"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == {"study": "skymask", "runs": len(configs), "computed": 1, "missing": len(configs) - 1}
    assert [line["missing"] for line in lines[1:]] == [run_name(c) for c in configs[1:]]
    assert main(["study", "skymask", "--out-dir", str(tmp_path / "nope"), "--status"]) == 2
    assert "study skymask" in capsys.readouterr().err


def test_cifar_study_holds_the_papers_cifar_rows():
    from skymask_lite import studies

    configs = study_configs("cifar")
    assert len({run_name(c) for c in configs}) == len(configs) == 24 + 7 + 6 + 2
    for config in configs:
        config.validate()
        assert (config.model, config.bias, config.root_size, config.seed) == ("resnet20", 0.5, 100, 0)
        assert config.defense_options == ({"lr": 1e8} if config.defense == "skymask" else {})
    main = {(c.dataset, c.attack, c.defense) for c in configs if (c.num_clients, c.num_malicious) == (100, 20)}
    assert {(d, a, r) for d in studies.CIFAR_DATASETS for a in ("none", "min_max", "fang_trim", "fang_krum")
            for r in ("fedavg", "fltrust", "skymask")} <= main
    for rule in ("tolpegin", "fldetector", "skymask"):  # the paper's CIFAR-10 detection table
        assert {("cifar10", a, rule) for a in ("min_max", "min_sum", "fang_krum")} <= main
    shares = {(c.num_malicious, c.defense) for c in configs if c.num_malicious > 20 and c.num_clients == 100}
    assert shares == {(f, r) for f in (40, 60, 80) for r in ("skymask", "fltrust")}
    assert {(c.num_clients, c.num_malicious) for c in configs if c.num_clients > 100} == {(200, 40), (500, 100)}


def test_a_cifar_row_runs_end_to_end_on_tiny_cifar_files(tmp_path, monkeypatch, fake_cifar):
    """The study's SkyMask row under Min-Max, shrunk to 10 clients and one round, on tiny
    CIFAR-10 files in torchvision's format: the runner, ResNet20 (BatchNorm), the attack and
    SkyMask's ResNet20 mask step run through; the attackers are found."""
    import dataclasses

    from skymask_lite.experiments import run_experiment

    monkeypatch.setenv("SKYMASK_DATA", str(fake_cifar(tmp_path / "data", "cifar10", 10, per_file=40)))
    [row] = [c for c in study_configs("cifar")
             if (c.dataset, c.attack, c.defense, c.num_clients, c.num_malicious)
             == ("cifar10", "min_max", "skymask", 100, 20)]
    small = dataclasses.replace(row, num_clients=10, num_malicious=2, root_size=10, rounds=1, threads=1)
    result = run_experiment(small, progress=False)
    assert result["config"]["model"] == "resnet20" and len(result["rounds"]) == 1
    assert result["rounds"][0]["fnr"] == 0.0  # the two colluding attackers were dropped


def test_study_queue_keeps_each_study_whole_or_puts_every_seed_0_first():
    """Study order: the studies' configs one after the other. Seed first: the same runs, seeds
    never decreasing, and within a seed each study's own order (the sort is stable)."""
    names = ["baselines", "adaptive"]
    plain = study_queue(names)
    assert plain == [(n, c) for n in names for c in study_configs(n)]
    first = study_queue(names, seed_first=True)
    assert sorted(map(repr, first)) == sorted(map(repr, plain)) and len(first) == len(plain)
    seeds = [c.seed for _, c in first]
    assert seeds == sorted(seeds) and len(set(seeds)) == 3
    for seed in set(seeds):
        assert [x for x in first if x[1].seed == seed] == [x for x in plain if x[1].seed == seed]
