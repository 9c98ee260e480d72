"""Gaussian mixtures of a few hundred 2-D points, fitted as scikit-learn fits them; private.

SkyMask's step 5 fits two full-covariance mixtures to the masks' PCA points every round
(:func:`skymask_lite.clustering.cluster_masks`). scikit-learn's ``GaussianMixture(k,
covariance_type="full", random_state=seed, n_init=n_init).fit(points)`` spends most of its
time on such tiny inputs outside the arithmetic (validating arguments, dispatching array
namespaces, a fresh ``KMeans`` estimator per restart): about 7 ms a round for 101 points on
the book's CPU, and on a GPU, where the masks take milliseconds, a large part of the server
step (the clustering was about 40% of it on an H200). :func:`fit_mixture` is the same
algorithm with the same operations in the same order on plain NumPy arrays (2.2 ms a round,
``benchmarks/mixture.py``):

1. initialise each restart from k-means: k-means++ seeding (``2 + floor(ln k)`` local trials,
   the first centre drawn uniformly) and Lloyd iterations (at most 300, stopped when the labels
   repeat or the centres move less than ``1e-4`` times the mean per-coordinate variance), on
   the centred points, drawing from one ``numpy.random.RandomState(seed)`` across restarts;
2. EM from the k-means labels, ``reg_covar = 1e-6`` on every covariance's diagonal, until the
   mean log-likelihood changes by less than ``1e-3`` (at most 100 iterations);
3. keep the restart with the highest final mean log-likelihood; the labels are the most likely
   component of each point (``predict``) and ``BIC = -2 log L + p ln m`` with
   ``p = 6k - 1`` free parameters in 2-D and ``m`` points.

The tests compare it with scikit-learn on the recorded mask geometries of ``data/results/``
and on random and degenerate point sets (same labels; parameters and BIC up to float rounding,
and in practice to the last bit: all 1,080 recorded rounds in ``benchmarks/mixture.py``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.linalg.lapack import dpotrf, dtrtrs
from sklearn.exceptions import ConvergenceWarning

__all__ = ["Mixture", "fit_mixture", "kmeans_labels"]

REG_COVAR = 1e-6
"""Added to every covariance's diagonal (scikit-learn's default ``reg_covar``)."""

EM_TOL, EM_MAX_ITER = 1e-3, 100
"""EM stops when the mean log-likelihood changes by less than ``EM_TOL`` (scikit-learn's ``tol``)."""

KMEANS_TOL, KMEANS_MAX_ITER = 1e-4, 300
"""Lloyd stops when the centres move (sum of squared shifts) by at most ``KMEANS_TOL`` times the
mean per-coordinate variance of the points."""

_EPS = np.finfo(np.float64).eps
_LOG_2PI = math.log(2 * math.pi)
_EYE2 = np.eye(2)


@dataclass
class Mixture:
    """A fitted mixture of ``k`` Gaussians in 2-D: ``weights`` ``[k]``, ``means`` ``[k, 2]``,
    ``covariances`` ``[k, 2, 2]``, ``labels`` ``[m]`` (the most likely component of each point),
    ``bic`` and whether the kept restart's EM ``converged``."""

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    labels: np.ndarray
    bic: float
    converged: bool


def _squared_distances(a: np.ndarray, x: np.ndarray, x_sq: np.ndarray) -> np.ndarray:
    """``|a_i - x_j|^2`` as ``-2 a x^T + |a|^2 + |x|^2``, clipped at 0 (``[len(a), len(x)]``)."""
    d = -2 * (a @ x.T)
    d += np.einsum("ij,ij->i", a, a)[:, None]
    d += x_sq.reshape(1, -1)
    return np.maximum(d, 0, out=d)


def _kmeans_plusplus(x: np.ndarray, x_sq: np.ndarray, k: int, rng: np.random.RandomState) -> np.ndarray:
    """k-means++ seeds: the first centre uniformly, each next one the best (lowest potential
    ``sum_j min_c |x_j - c|^2``) of ``2 + floor(ln k)`` candidates drawn with probability
    proportional to the squared distance to the nearest centre so far."""
    n = len(x)
    weight = np.ones(n)
    centers = np.empty((k, x.shape[1]))
    trials = 2 + int(np.log(k))
    centers[0] = x[rng.choice(n, p=weight / weight.sum())]
    closest = _squared_distances(centers[0, np.newaxis], x, x_sq)
    potential = closest @ weight
    for c in range(1, k):
        draws = rng.uniform(size=trials) * potential
        candidates = np.searchsorted(np.cumsum(weight * closest), draws)
        np.clip(candidates, None, closest.size - 1, out=candidates)
        distances = _squared_distances(x[candidates], x, x_sq)
        np.minimum(closest, distances, out=distances)
        potentials = distances @ weight.reshape(-1, 1)
        best = np.argmin(potentials)
        potential, closest = potentials[best], distances[best]
        centers[c] = x[candidates[best]]
    return centers


def _assign(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """The nearest centre of each point, from ``|c|^2 - 2 x c^T`` (the first on a tie)."""
    scores = np.einsum("ij,ij->i", centers, centers)[None, :] + -2.0 * (x @ centers.T)
    return scores.argmin(axis=1).astype(np.int32)


def _lloyd_step(x: np.ndarray, labels: np.ndarray, old: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """New centres from ``labels`` (the points' running sums in order, an empty cluster taking
    the point farthest from its centre, then times ``1 / count``) and each centre's shift."""
    k = len(old)
    sums, counts = np.zeros_like(old), np.zeros(k)
    for j in range(k):
        members = x[labels == j]
        if len(members):
            sums[j] = np.cumsum(members, axis=0)[-1]  # sequential, as the compiled loop adds
            counts[j] = len(members)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        distances = ((x - old[labels]) ** 2).sum(axis=1)
        far = np.argpartition(distances, -len(empty))[: -len(empty) - 1 : -1]
        if np.max(distances) != 0:  # all points on their centres: nothing to relocate
            for j, i in zip(empty, far):
                sums[labels[i]] -= x[i]
                sums[j] = x[i]
                counts[j], counts[labels[i]] = 1.0, counts[labels[i]] - 1.0
    biggest = int(np.argmax(counts))
    for j in range(k):  # in order: an empty cluster copies the biggest one's row as it is now
        if counts[j] > 0:
            sums[j] *= 1.0 / counts[j]
        else:
            sums[j] = sums[biggest]
    diff = sums - old
    shift = np.sqrt(diff[:, 0] * diff[:, 0] + diff[:, 1] * diff[:, 1])
    return sums, shift


def kmeans_labels(x: np.ndarray, k: int, rng: np.random.RandomState) -> np.ndarray:
    """Lloyd's k-means from k-means++ seeds on the centred points: each point's cluster, ``[m]``."""
    tol = np.mean(np.var(x, axis=0)) * KMEANS_TOL
    x = x - x.mean(axis=0)
    x_sq = np.einsum("ij,ij->i", x, x)
    centers = _kmeans_plusplus(x, x_sq, k, rng)
    previous = np.full(len(x), -1, dtype=np.int32)
    for _ in range(KMEANS_MAX_ITER):
        labels = _assign(x, centers)
        centers, shift = _lloyd_step(x, labels, centers)
        if np.array_equal(labels, previous):
            return labels  # the labels repeat: they belong to the centres
        if (shift**2).sum() <= tol:
            break
        previous = labels
    return _assign(x, centers)


def _gaussian_parameters(x: np.ndarray, resp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """M-step: ``n_c = sum_j r_jc``, ``mu_c = sum_j r_jc x_j / n_c``,
    ``Sigma_c = sum_j r_jc (x_j - mu_c)(x_j - mu_c)^T / n_c + reg_covar I``."""
    nk = resp.sum(axis=0) + 10 * _EPS
    means = (resp.T @ x) / nk[:, np.newaxis]
    covariances = np.empty((len(nk), 2, 2))
    for c in range(len(nk)):
        diff = x - means[c, :]
        covariances[c, :, :] = ((resp[:, c] * diff.T) @ diff) / nk[c]
        covariances[c, :, :].flat[:4:3] += REG_COVAR
    return nk, means, covariances


def _precision_cholesky(covariances: np.ndarray) -> np.ndarray:
    """``L_c^{-T}`` with ``Sigma_c = L_c L_c^T`` (the Cholesky factor of the precision)."""
    out = np.empty_like(covariances)
    for c, covariance in enumerate(covariances):
        chol, info = dpotrf(covariance, lower=1, clean=1)
        if info != 0:
            raise ValueError(
                "a Gaussian mixture component has an ill-defined covariance (collapsed points); "
                "this should not happen with reg_covar > 0: check the points for NaN or huge values"
            )
        out[c, :, :] = dtrtrs(chol, _EYE2, lower=1)[0].T
    return out


def _weighted_log_prob(x: np.ndarray, weights: np.ndarray, means: np.ndarray, prec_chol: np.ndarray) -> np.ndarray:
    """``log pi_c + log N(x_j; mu_c, Sigma_c)``, ``[m, k]``, with ``P_c = L_c^{-T}``:
    ``-(2 log 2 pi + |x_j P_c - mu_c P_c|^2) / 2 + log det P_c``."""
    k = len(means)
    log_det = np.log(prec_chol.reshape(k, -1)[:, ::3]).sum(axis=1)
    sq = np.empty((len(x), k))
    for c in range(k):
        y = (x @ prec_chol[c]) - (means[c, :] @ prec_chol[c])
        sq[:, c] = np.square(y).sum(axis=1)
    return -0.5 * (2 * _LOG_2PI + sq) + log_det + np.log(weights)


def _logsumexp(a: np.ndarray) -> np.ndarray:
    """``log sum_c exp(a_jc)`` per row, shifted by the row's maximum (``log1p`` of the rest)."""
    top = a.max(axis=1, keepdims=True)
    at_top = a == top
    rest = a.copy()
    rest[at_top] = -np.inf
    count = at_top.astype(a.dtype).sum(axis=1, keepdims=True, dtype=a.dtype)
    shift = np.where(np.isfinite(top), top, 0)
    s = np.exp(rest - shift).sum(axis=1, keepdims=True, dtype=a.dtype)
    s = np.where(s == 0, s, s / count)
    return (np.log1p(s) + np.log(count) + top)[:, 0]


def _em(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[float, bool, tuple[np.ndarray, ...]]:
    """EM from hard ``labels``: the final mean log-likelihood, whether it converged, and
    ``(weights, means, covariances, precision Cholesky factors)``."""
    resp = np.zeros((len(x), k))
    resp[np.arange(len(x)), labels] = 1
    weights, means, covariances = _gaussian_parameters(x, resp)
    weights /= len(x)
    prec_chol = _precision_cholesky(covariances)
    lower_bound, converged = -np.inf, False
    with np.errstate(under="ignore"):  # responsibilities that underflow to 0 are fine
        for _ in range(EM_MAX_ITER):
            previous = lower_bound
            weighted = _weighted_log_prob(x, weights, means, prec_chol)  # E-step
            log_norm = _logsumexp(weighted)
            log_resp = weighted - log_norm[:, np.newaxis]
            weights, means, covariances = _gaussian_parameters(x, np.exp(log_resp))  # M-step
            weights /= weights.sum()
            prec_chol = _precision_cholesky(covariances)
            lower_bound = log_norm.mean()
            if abs(lower_bound - previous) < EM_TOL:
                converged = True
                break
    return lower_bound, converged, (weights, means, covariances, prec_chol)


def fit_mixture(points: np.ndarray, k: int, seed: int, n_init: int = 1) -> Mixture:
    """A full-covariance mixture of ``k`` Gaussians fitted to ``points`` ``[m, 2]`` (float64):
    ``n_init`` k-means-initialised EM restarts from ``RandomState(seed)``, the best kept (the
    module docstring gives the algorithm)."""
    x = np.ascontiguousarray(points, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 2 or len(x) < max(k, 2) or not np.isfinite(x).all():
        raise ValueError(f"need at least max(k, 2) = {max(k, 2)} finite 2-D points [m, 2], got shape {x.shape}")
    if k < 1 or n_init < 1:
        raise ValueError(f"k and n_init must be positive, got k={k}, n_init={n_init}")
    rng = np.random.RandomState(seed)
    best, best_bound, converged = None, -np.inf, False
    for _ in range(n_init):
        labels = np.zeros(len(x), dtype=np.int32) if k == 1 else kmeans_labels(x, k, rng)
        bound, done, params = _em(x, labels, k)
        if bound > best_bound or best_bound == -np.inf:  # the first restart, or a better one
            best, best_bound, converged = params, bound, done
    if not converged:
        warnings.warn(
            "Best performing initialization did not converge. Try different init parameters, "
            "or increase max_iter, tol, or check for degenerate data.", ConvergenceWarning, stacklevel=2,
        )
    weights, means, covariances, prec_chol = best
    weighted = _weighted_log_prob(x, weights, means, prec_chol)
    parameters = 6 * k - 1  # k - 1 weights, 2k means, 3k covariance entries
    bic = -2 * float(_logsumexp(weighted).mean()) * len(x) + parameters * math.log(len(x))
    return Mixture(weights, means, covariances, np.argmax(weighted, axis=1), bic, converged)
