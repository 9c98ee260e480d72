"""The Gaussian mixtures of SkyMask's clustering step against scikit-learn, their reference."""

import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from skymask_lite._mixture import fit_mixture, kmeans_labels
from skymask_lite.analysis import recorded_points

RESULTS = Path(__file__).resolve().parents[1] / "data" / "results"


def random_points(count: int = 60) -> list[np.ndarray]:
    """Point sets of 3-150 points at scales 0.01-100, some with a collapsed group or with half of
    the points identical (colluding masks), some with every point identical."""
    rng = np.random.default_rng(0)
    sets = []
    for i in range(count):
        m = int(rng.integers(3, 150))
        x = rng.normal(size=(m, 2)) * rng.uniform(0.01, 100)
        if i % 3 == 0:
            x[: m // 4] = x[0] + rng.normal(size=(m // 4, 2)) * 1e-4
        if i % 5 == 0:
            x[: m // 2] = x[0]
        if i % 17 == 0:
            x[:] = x[0]
        sets.append(x)
    return sets


def sklearn_fit(x: np.ndarray, k: int, seed: int, n_init: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm = GaussianMixture(k, covariance_type="full", random_state=seed, n_init=n_init).fit(x)
    return {"labels": gmm.predict(x), "weights": gmm.weights_, "means": gmm.means_,
            "covariances": gmm.covariances_, "bic": gmm.bic(x), "converged": gmm.converged_}


def assert_same_fit(x: np.ndarray, k: int, seed: int, n_init: int) -> None:
    ref = sklearn_fit(x, k, seed, n_init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = fit_mixture(x, k, seed, n_init)
    np.testing.assert_array_equal(ours.labels, ref["labels"])
    for name in ("weights", "means", "covariances"):
        np.testing.assert_allclose(getattr(ours, name), ref[name], rtol=1e-9, atol=1e-14, err_msg=name)
    assert ours.bic == pytest.approx(ref["bic"], rel=1e-12, abs=1e-9)
    assert ours.converged == ref["converged"]


@pytest.mark.parametrize("k, n_init", [(1, 1), (2, 3)])
def test_fit_mixture_equals_sklearn_on_recorded_mask_geometries(k, n_init):
    sets = recorded_points(RESULTS)[::6]  # every 6th recorded round
    assert len(sets) > 100, "the results folders should hold recorded mask geometries"
    for x in sets:
        assert_same_fit(x, k, 0, n_init)


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("k, n_init", [(1, 1), (2, 1), (2, 3), (3, 2)])
def test_fit_mixture_equals_sklearn_on_random_and_degenerate_points(k, n_init, seed):
    for x in random_points():
        if len(x) >= k:
            assert_same_fit(x, k, seed, n_init)


@pytest.mark.parametrize("k", [2, 3])
def test_kmeans_labels_equal_sklearns_kmeans(k):
    for x in random_points():
        if len(x) < k:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            ref = KMeans(k, n_init=1, random_state=np.random.RandomState(3)).fit(x).labels_
        np.testing.assert_array_equal(kmeans_labels(x, k, np.random.RandomState(3)), ref)


def test_the_seed_draws_the_restarts():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=(40, 2)), rng.normal(size=(40, 2)) + [3, 0]])
    fits = [fit_mixture(x, 2, seed, 1) for seed in range(8)]
    assert all(np.array_equal(f.means, fit_mixture(x, 2, s, 1).means) for s, f in enumerate(fits))
    # the first k-means++ centre differs between seeds: so do some restarts' label orders
    assert len({tuple(f.labels[:3]) for f in fits}) > 1


@pytest.mark.parametrize(
    "points, k, n_init",
    [
        (np.zeros((5, 3)), 2, 1),  # not 2-D
        (np.zeros((1, 2)), 1, 1),  # one point
        (np.array([[0.0, 1.0], [np.nan, 0.0], [1.0, 1.0]]), 2, 1),
        (np.zeros((4, 2)), 0, 1),
        (np.zeros((4, 2)), 2, 0),
    ],
)
def test_fit_mixture_rejects_bad_input(points, k, n_init):
    with pytest.raises(ValueError, match="points|positive"):
        fit_mixture(points, k, 0, n_init)
