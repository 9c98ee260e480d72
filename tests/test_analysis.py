"""The offline recomputation of the 1-vs-2 decision agrees with what SkyMask decided in the runs."""

from pathlib import Path

import pytest

from skymask_lite.analysis import decide, decision_rounds, geometry_statistics

RESULTS = Path(__file__).resolve().parent.parent / "data" / "results"


@pytest.mark.parametrize("folder, criterion", [("decision", "collapse_or_ashman"), ("decision_ashman", "ashman")])
def test_recomputed_decisions_equal_the_recorded_ones(folder, criterion):
    rounds = decision_rounds(RESULTS / folder)
    assert len(rounds) >= 5 * 70 and set(rounds.criterion) == {criterion}
    again = rounds.apply(lambda r: decide(r, r.bic_1, r.bic_2, criterion), axis=1)
    assert (again == rounds.num_clusters).all()
    # the recorded FPR follows from the partition whenever two clusters were chosen; the earlier
    # rule drops a collapsed cluster's strays too, the adopted one keeps them
    two = rounds[(rounds.num_clusters == 2) & ((rounds.strays == 0) | (criterion == "collapse_or_ashman"))]
    assert (two.fpr - two.fpr_if_two).abs().max() < 1e-12


def test_geometry_statistics_of_a_hand_made_round():
    geometry = {"points": [[5.0, 5.0], [5.0, 5.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]],
                "labels": [1, 1, 0, 0, 0], "means": [[0.3, 0.3], [5.0, 5.0]],
                "covariances": [[[0.2, 0.0], [0.0, 0.2]], [[1e-6, 0.0], [0.0, 1e-6]]]}
    stats = geometry_statistics(geometry, malicious=[0, 1])
    assert stats["other_size"] == 2 and stats["spread_ratio"] == 0.0
    assert stats["fpr_if_two"] == 0.0 and stats["fnr_if_two"] == 0.0
    assert decide(stats, bic_1=10.0, bic_2=5.0) == 2 and decide(stats, bic_1=5.0, bic_2=10.0) == 1
    stats = geometry_statistics(geometry, malicious=[0, 2])  # one attacker hides among the honest
    assert stats["fpr_if_two"] == pytest.approx(1 / 2) and stats["fnr_if_two"] == pytest.approx(1 / 2)


def test_geometry_statistics_when_the_root_joins_collapsed_colluders():
    """The offline reading keeps the other component when the root's clients collapsed, as
    ``cluster_masks`` does."""
    geometry = {"points": [[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0], [9.0, 9.0], [9.0, 9.0], [7.0, 7.0]],
                "labels": [0, 0, 0, 1, 1, 1], "means": [[0.0, 0.3], [8.3, 8.3]],
                "covariances": [[[0.7, 0.0], [0.0, 0.3]], [[0.9, 0.9], [0.9, 0.9]]]}
    stats = geometry_statistics(geometry, malicious=[3, 4])
    assert stats["root_side_ratio"] == 0.0 and stats["spread_ratio"] > 1
    assert stats["fpr_if_two"] == 0.0 and stats["fnr_if_two"] == 0.0
    assert decide(stats, bic_1=10.0, bic_2=5.0) == 2
    assert decide(stats, bic_1=5.0, bic_2=10.0) == 1  # BIC prefers one component


def _result(attack, defense, seed, accs, fprs, asr=None, collapsed=None):
    rounds = [{"round": t + 1, "test_acc": a, "fpr": f, "fnr": 0.0, "kept": [0, 1], "timing": {"defense": 0.5}}
              for t, (a, f) in enumerate(zip(accs, fprs))]
    final = {"rounds": len(rounds), "test_acc": accs[-1], "mean_fpr": sum(fprs) / len(fprs), "mean_fnr": 0.0}
    if asr is not None:
        final["asr"] = asr
    if collapsed is not None:
        final["collapsed"] = {"round": collapsed, "reason": "nan"}
    config = {"attack": attack, "defense": defense, "seed": seed, "num_clients": 10, "num_malicious": 2,
              "bias": 0.5, "root_size": 100, "root_bias": None, "engine": "auto"}
    env = {"engine": "parallel", "git_commit": "abcdef123"}
    return {"config": config, "rounds": rounds, "final": final, "env": env}


def test_run_and_round_tables_and_the_seed_summary():
    from skymask_lite.analysis import round_table, run_table, summarize_seeds

    runs = [_result("min_max", "skymask", 0, [0.5, 0.7], [0.0, 0.1]),
            _result("min_max", "skymask", 1, [0.6, 0.9], [0.0, 0.0], asr=0.25),
            _result("none", "fedavg", 0, [0.1], [0.0], collapsed=1)]
    table = run_table(runs)
    assert table.test_acc.tolist() == [0.7, 0.9, 0.1]
    assert table.mean_fpr.tolist() == pytest.approx([0.05, 0.0, 0.0])
    assert table.asr.isna().tolist() == [True, False, True] and table.asr[1] == 0.25
    assert table.collapsed.isna().tolist() == [True, True, False]
    assert set(table.engine) == {"parallel"} and set(table.commit) == {"abcdef1"}
    rounds = round_table(runs)
    assert len(rounds) == 5 and rounds["round"].tolist() == [1, 2, 1, 2, 1]
    assert rounds.kept.tolist() == [2] * 5 and rounds.defense_seconds.tolist() == [0.5] * 5
    assert set(rounds.engine) == {"parallel"}
    summary = summarize_seeds(table, "test_acc").set_index(["attack", "defense"])
    row = summary.loc[("min_max", "skymask")]
    assert row["mean"] == pytest.approx(0.8) and (row.low, row.high, row.seeds) == (0.7, 0.9, 2)
    with pytest.raises(ValueError, match="no column"):
        summarize_seeds(table, "nope")


def test_load_study_splits_found_and_missing(tmp_path):
    import json

    from skymask_lite.experiments import run_name
    from skymask_lite.studies import load_study, study_configs

    configs = study_configs("skymask")
    (tmp_path / f"{run_name(configs[1])}.json").write_text(json.dumps({"config": {"attack": "x"}}))
    (tmp_path / f"{run_name(configs[2])}.ckpt.pt").write_text("half")  # unfinished: missing
    found, missing = load_study("skymask", tmp_path)
    assert found == [{"config": {"attack": "x"}}]
    assert missing == [c for k, c in enumerate(configs) if k != 1]
    with pytest.raises(FileNotFoundError, match="study skymask"):
        load_study("skymask", tmp_path / "nope")
