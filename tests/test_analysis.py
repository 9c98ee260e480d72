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
