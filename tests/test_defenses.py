"""Defenses against independent brute-force references (plain loops), planted attackers and
the error messages of impossible settings."""

import pickle
import warnings

import numpy as np
import pytest
import torch

from skymask_lite.aggregation import Aggregation, check_updates
from skymask_lite.context import RoundContext
from skymask_lite.defenses import (
    DEFENSES,
    FLDetector,
    bulyan,
    deepsight,
    fedavg,
    flame,
    gap_statistic_clusters,
    fltrust,
    krum,
    krum_scores,
    make_defense,
    median,
    multi_krum,
    tolpegin,
    trimmed_mean,
)
from skymask_lite.models import LogisticRegression, flatten_params, num_params


def rand(n, d, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ref_krum_scores(u, f, rows=None):
    """Brute force: per row, sum of squared distances to its n - f - 2 nearest other rows."""
    rows = list(range(len(u))) if rows is None else rows
    k = min(max(len(rows) - f - 2, 1), len(rows) - 1)
    scores = []
    for i in rows:
        dists = sorted(float(((u[i] - u[j]) ** 2).sum()) for j in rows if j != i)
        scores.append(sum(dists[:k]))
    return np.array(scores)


def assert_valid(agg, n, d):
    assert isinstance(agg, Aggregation)
    assert agg.update.shape == (d,) and torch.isfinite(agg.update).all()
    assert agg.kept.dtype == torch.long
    assert agg.kept.unique().numel() == agg.kept.numel() and all(0 <= k < n for k in agg.kept.tolist())


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("n", [7, 8])
def test_median_and_trimmed_mean_per_coordinate(n):
    u, f = rand(n, 6), 2
    arr = u.numpy()
    np.testing.assert_allclose(median(u).update.numpy(), np.median(arr, axis=0))
    ref = [np.mean(sorted(arr[:, j])[f : n - f]) for j in range(arr.shape[1])]
    np.testing.assert_allclose(trimmed_mean(u, num_malicious=f).update.numpy(), ref)
    assert trimmed_mean(u, num_malicious=f).kept.tolist() == list(range(n))


def test_fedavg_weights():
    u, w = rand(4, 3), torch.tensor([1.0, 0.0, 2.0, 1.0], dtype=torch.float64)
    ref = sum(w[i] * u[i] for i in range(4)) / 4
    torch.testing.assert_close(fedavg(u, weights=w).update, ref)
    torch.testing.assert_close(fedavg(u).update, u.mean(0))


# ----------------------------------------------------------------------------- Krum family


def test_krum_scores_match_double_loop_and_exclude_self():
    u, f = rand(9, 7), 2
    u[1] = u[0]  # a duplicate: its zero distance to row 0 counts, only the row itself is excluded
    np.testing.assert_allclose(krum_scores(u, f).numpy(), ref_krum_scores(u.numpy(), f), rtol=1e-9)


def test_krum_picks_an_inlier_and_multi_krum_averages_the_lowest_scores():
    u, f = rand(10, 5) * 0.1, 3
    u[[2, 5, 7]] += 10.0 * rand(3, 5, seed=1)
    agg = krum(u, num_malicious=f)
    assert agg.kept.numel() == 1 and agg.kept.item() not in (2, 5, 7)
    torch.testing.assert_close(agg.update, u[agg.kept.item()])
    ref = np.argsort(ref_krum_scores(u.numpy(), f))
    for m, expected in [(None, 7), (4, 4)]:
        agg = multi_krum(u, num_malicious=f, m=m)
        assert sorted(agg.kept.tolist()) == sorted(ref[:expected].tolist())
        torch.testing.assert_close(agg.update, u[sorted(ref[:expected])].mean(0))
    assert set(multi_krum(u, num_malicious=f).kept.tolist()).isdisjoint({2, 5, 7})


def test_bulyan_matches_a_reference_implementation():
    n, f, d = 12, 2, 6
    u = rand(n, d, seed=3).numpy()
    remaining, selected = list(range(n)), []
    while len(selected) < n - 2 * f:
        best = remaining[int(np.argmin(ref_krum_scores(u, f, remaining)))]
        selected.append(best)
        remaining.remove(best)
    beta, ref = n - 4 * f, []
    for j in range(d):
        col = u[selected, j]
        med = np.median(col)
        ref.append(np.mean(sorted(col, key=lambda v: abs(v - med))[:beta]))
    agg = bulyan(torch.from_numpy(u), num_malicious=f)
    assert sorted(agg.kept.tolist()) == sorted(selected) and len(selected) == n - 2 * f
    assert agg.info["selection_order"].tolist() == selected
    np.testing.assert_allclose(agg.update.numpy(), ref, rtol=1e-9)


# ----------------------------------------------------------------------------- FLTrust, FLAME


def test_fltrust_formula_and_all_zero_trust():
    u, g0 = rand(6, 5), rand(1, 5, seed=9)[0]
    ts = [max(0.0, float(u[i] @ g0 / (u[i].norm() * g0.norm()))) for i in range(6)]
    ref = sum(ts[i] * g0.norm() / u[i].norm() * u[i] for i in range(6)) / sum(ts)
    agg = fltrust(u, root_update=g0)
    torch.testing.assert_close(agg.update, ref)
    assert agg.kept.tolist() == [i for i in range(6) if ts[i] > 0]
    opposed = -g0.abs()[None] * (1 + torch.rand(4, 5, dtype=torch.float64))
    agg = fltrust(opposed, root_update=g0.abs())
    assert agg.kept.numel() == 0 and torch.equal(agg.update, torch.zeros(5, dtype=torch.float64))


def test_flame_clips_to_the_median_norm_and_drops_a_far_minority():
    base = torch.ones(20, dtype=torch.float64)
    benign = base + 0.1 * rand(9, 20)
    benign *= torch.linspace(0.5, 3.0, 9, dtype=torch.float64)[:, None]  # varied norms
    u = torch.cat([benign, -base + 0.1 * rand(3, 20, seed=1)])
    agg = flame(u, generator=torch.Generator().manual_seed(0), noise_lambda=0.0)
    kept = agg.kept.tolist()
    assert set(kept) <= set(range(9)) and len(kept) >= 12 // 2 + 1  # the majority cluster
    s = float(np.median(u.norm(dim=1).numpy()))
    clipped = [u[i] * min(1.0, s / float(u[i].norm())) for i in kept]
    assert all(float(c.norm()) <= s + 1e-9 for c in clipped)
    assert any(float(u[i].norm()) > s for i in kept)  # clipping was exercised
    torch.testing.assert_close(agg.update, torch.stack(clipped).mean(0))
    noisy = [flame(u, generator=torch.Generator().manual_seed(1)).update for _ in range(2)]
    torch.testing.assert_close(noisy[0], noisy[1])
    assert 0 < float((noisy[0] - agg.update).std()) < 2e-3 * s


# ----------------------------------------------------------------------------- detectors


def planted_output_layer(net, n=12, bad=(1, 4, 10), seed=0):
    d = num_params(net)
    u = 0.1 * rand(n, d, seed)
    u[list(bad), -num_params(net.linear) :] += 2.0
    return u


def test_tolpegin_flags_a_planted_minority():
    net = LogisticRegression(8, 3)
    u = planted_output_layer(net)
    for target in (None, 2):
        agg = tolpegin(u, net=net, target_class=target)
        assert agg.kept.tolist() == [i for i in range(12) if i not in (1, 4, 10)]
        torch.testing.assert_close(agg.update, u[agg.kept].mean(0))


def test_deepsight_returns_a_valid_aggregation_and_neups_follow_the_formula():
    net = LogisticRegression(16, 4)
    u = 0.05 * rand(10, num_params(net))
    u[[0, 1], 16 * 3 : 16 * 4] += 1.0  # two updates put all their energy on class 3
    kwargs = dict(net=net, global_params=flatten_params(net).double(), root_x=torch.zeros(2, 1, 4, 4))
    agg = deepsight(u, generator=torch.Generator().manual_seed(0), **kwargs)
    assert_valid(agg, 10, num_params(net))
    w, b = u[:, :64].reshape(10, 4, 16), u[:, 64:]
    for i in range(10):
        energy = [float(w[i, k].abs().sum() + b[i, k].abs()) for k in range(4)]
        ref = np.square(energy) / np.square(energy).sum()
        np.testing.assert_allclose(agg.info["neups"][i].numpy(), ref, rtol=1e-9)
    assert agg.info["suspicious"][:2].all() and not agg.info["suspicious"][2:].any()
    assert set(agg.kept.tolist()).isdisjoint({0, 1})
    again = deepsight(u, generator=torch.Generator().manual_seed(0), **kwargs)
    torch.testing.assert_close(again.update, agg.update)


def linear_stream(detector, rounds, attackers, seed=0):
    """Clients of a quadratic model, ``g_i(w) = -0.5 (w - c_i)`` plus small gradient noise;
    the attackers send fresh Gaussian vectors, inconsistent with their history."""
    n, d = 10, 8
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(d, generator=gen, dtype=torch.float64)
    out = []
    for t in range(1, rounds + 1):
        u = -0.5 * (w - centres) + 0.05 * torch.randn(n, d, generator=gen, dtype=torch.float64)
        u[attackers] = torch.randn(len(attackers), d, generator=gen, dtype=torch.float64)
        ctx = RoundContext(t, n, len(attackers), torch.tensor(attackers), LogisticRegression(1, 1), w)
        out.append((u, detector(u, ctx)))
        w = w + 0.5 * out[-1][1].update
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_fldetector_keeps_everyone_during_warmup_then_flags_attackers(seed):
    out = linear_stream(FLDetector(window=3, max_k=4, num_refs=5), 7, [2, 6, 7], seed)
    for u, agg in out[:4]:  # rounds 1-2 give no prediction, rounds 3-5 fill the window
        assert agg.kept.tolist() == list(range(10)) and not agg.info["detecting"]
        torch.testing.assert_close(agg.update, u.mean(0))
    for u, agg in out[4:]:
        assert agg.info["detecting"] and agg.kept.tolist() == [0, 1, 3, 4, 5, 8, 9]
        assert agg.info["scores"][[2, 6, 7]].min() > agg.info["scores"][agg.kept].max()
        torch.testing.assert_close(agg.update, u[agg.kept].mean(0))


def test_gap_statistic_counts_clusters():
    assert gap_statistic_clusters(np.linspace(0, 1, 30), max_k=4) == 1
    assert gap_statistic_clusters(np.full(10, 0.3)) == 1
    two = np.concatenate([np.linspace(0, 0.05, 12), np.linspace(0.9, 1, 5)])
    assert gap_statistic_clusters(two, max_k=4) == 2


def test_gap_statistic_caps_k_at_distinct_scores():
    """Three distinct values among 20 scores: asking k-means for more clusters would warn."""
    three = np.repeat([0.0, 0.5, 1.0], [10, 5, 5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gap_statistic_clusters(three, max_k=10) in (1, 2, 3)


# ----------------------------------------------------------------------------- errors and registry


def test_clear_errors_for_impossible_settings():
    u = rand(5, 3)
    with pytest.raises(ValueError, match=r"Krum needs n > 2f \+ 2 clients; got n=5, f=3"):
        krum(u, num_malicious=3)
    with pytest.raises(ValueError, match=r"n >= f \+ 3.*n=5, f=3"):
        krum_scores(u, 3)
    with pytest.raises(ValueError, match=r"n >= 4f \+ 3.*n=5, f=1"):
        bulyan(u, num_malicious=1)
    with pytest.raises(ValueError, match="n > 2f"):
        trimmed_mean(u, num_malicious=3)
    with pytest.raises(ValueError, match=r"root_update must be .*\[3\]"):
        fltrust(u, root_update=torch.zeros(4))
    bad = u.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"clients \[3\] contain NaN"):
        median(bad)
    bad[3, 1], bad[0, 2], bad[0, 0] = 1.0, float("inf"), float("-inf")  # row 0 sums to NaN, row 3 is fine
    with pytest.raises(ValueError, match=r"clients \[0\] contain NaN or Inf"):
        median(bad)
    check_updates(torch.full((4, 3), 3e38))  # finite entries whose row sums overflow to Inf are accepted
    with pytest.raises(ValueError, match="unknown defense 'krun'.*krum, multi_krum"):
        make_defense("krun")


def test_registry_objects_run_on_a_round_context():
    net = LogisticRegression(4, 3)
    d = num_params(net)
    u = rand(12, d).float()
    ctx = RoundContext(
        1, 12, 2, torch.tensor([0, 1]), net, flatten_params(net),
        root_x=torch.zeros(5, 1, 2, 2), root_y=torch.zeros(5, dtype=torch.long), root_update=u[5:].mean(0),
    )
    for name in DEFENSES:
        if name == "skymask":
            continue
        defense = make_defense(name)
        assert defense.needs_root_update == (name == "fltrust")
        assert_valid(defense(u, ctx), 12, d)
        pickle.loads(pickle.dumps(defense))  # experiments checkpoint the defence
    assert make_defense("multi_krum", m=5)(u, ctx).kept.numel() == 5
    with pytest.raises(ValueError, match="unknown option"):
        make_defense("krum", m=5)


def test_skymask_is_registered_lazily():
    pytest.importorskip("skymask_lite.skymask")
    assert make_defense("skymask").needs_root_update
