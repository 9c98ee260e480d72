"""Defenses against independent brute-force references (plain loops), planted attackers and
the error messages of impossible settings."""

import functools
import json
import math
import pickle
import re
import warnings

import numpy as np
import pytest
import torch

from skymask_lite import detectors
from skymask_lite._rulekit import clip_to_norm, cosine_distances, hdbscan_labels, mean_of, median_of, output_layer
from skymask_lite.aggregation import Aggregation, BoundRule, Condition, check_updates, context_parameters
from skymask_lite.context import RoundContext
from skymask_lite.defenses import (
    BULYAN_CONDITION,
    DEFENSES,
    FLAME_CONDITION,
    KRUM_CONDITION,
    MEDIAN_CONDITION,
    MULTI_KRUM_CONDITION,
    TRIMMED_MEAN_CONDITION,
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
from skymask_lite.experiments import Config
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
        pickle.loads(pickle.dumps(defense))  # experiments checkpoint the defense
    assert make_defense("multi_krum", m=5)(u, ctx).kept.numel() == 5
    with pytest.raises(ValueError, match="unknown option"):
        make_defense("krum", m=5)


def test_skymask_is_registered_lazily():
    pytest.importorskip("skymask_lite.skymask")
    assert make_defense("skymask").needs_root_update


# ----------------------------------------------------------------------------- the binder


def test_rules_read_from_the_context_only_the_fields_they_name():
    assert context_parameters(median) == ()
    assert context_parameters(fedavg) == ()
    assert context_parameters(krum) == ("num_malicious",)
    assert context_parameters(fltrust) == ("root_update",)
    assert context_parameters(flame) == ("generator",)
    assert context_parameters(tolpegin) == ("net",)
    assert set(context_parameters(deepsight)) == {"net", "global_params", "generator", "root_x", "global_buffers"}
    for name in ("median", "fltrust", "flame", "tolpegin"):  # no rule is handed f it does not use
        assert "num_malicious" not in make_defense(name).context_args


def test_a_rule_gets_context_fields_by_name_and_its_options():
    def scaled(updates, *, global_lr, num_clients, factor=1.0):
        return Aggregation(factor * global_lr * updates.sum(0) / num_clients, torch.arange(updates.shape[0]))

    u = rand(4, 3)
    ctx = RoundContext(1, 4, 0, torch.tensor([], dtype=torch.long), LogisticRegression(1, 1), torch.zeros(3))
    ctx.global_lr = 3.0
    rule = BoundRule(scaled, options={"factor": 0.5})
    assert rule.context_args == ("global_lr", "num_clients") and not rule.needs_root_update
    torch.testing.assert_close(rule(u, ctx).update, 0.5 * 3.0 * u.mean(0))
    with pytest.raises(ValueError, match=re.escape("unknown option(s) ['global_lr'] for the 'scaled' defense")):
        BoundRule(scaled, options={"global_lr": 1.0})  # a context field is never an option
    with pytest.raises(ValueError, match="leave context_args out"):
        BoundRule(scaled, ("num_clients",))


def test_unknown_and_missing_options_list_the_accepted_ones():
    with pytest.raises(ValueError, match=re.escape("option(s) ['k'] for the 'multi_krum' defense; it accepts ['m']")):
        make_defense("multi_krum", k=3)
    with pytest.raises(ValueError, match=re.escape("['num_malicious'] for the 'krum' defense; it takes no options")):
        make_defense("krum", num_malicious=3)
    with pytest.raises(ValueError, match=re.escape("unknown option(s) ['windows'] for the 'fldetector' defense")):
        make_defense("fldetector", windows=3)

    def needs_alpha(updates, *, alpha):
        return fedavg(updates)

    with pytest.raises(ValueError, match=re.escape("missing option(s) ['alpha'] for the 'needs_alpha' defense")):
        BoundRule(needs_alpha)
    assert make_defense("fldetector", window=3).window == 3


# ----------------------------------------------------------------------------- robustness conditions

#: name -> (declared condition, the smallest n it allows for f, written from the papers' formulas)
CONDITIONS = {
    "median": (MEDIAN_CONDITION, lambda f: 2 * f + 1),
    "trimmed_mean": (TRIMMED_MEAN_CONDITION, lambda f: 2 * f + 1),
    "krum": (KRUM_CONDITION, lambda f: 2 * f + 3),
    "multi_krum": (MULTI_KRUM_CONDITION, lambda f: 2 * f + 3),
    "bulyan": (BULYAN_CONDITION, lambda f: 4 * f + 3),
    "flame": (FLAME_CONDITION, lambda f: 2 * f + 1),
}


def context_for(n, f, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return RoundContext(1, n, f, torch.arange(f), LogisticRegression(1, 1), torch.zeros(d), generator=gen)


@pytest.mark.parametrize("name", sorted(CONDITIONS))
@pytest.mark.parametrize("f", [1, 2, 3])
def test_each_condition_holds_at_its_boundary_and_fails_just_past_it(name, f):
    condition, smallest = CONDITIONS[name]
    defense, n, d = make_defense(name), smallest(f), 5
    assert defense.condition is condition
    defense.require(n, f)
    assert_valid(defense(rand(n, d), context_for(n, f, d)), n, d)
    message = re.escape(f"needs {condition} clients; got n={n - 1}, f={f}") + ".*" + re.escape(f"at most {f - 1} ")
    with pytest.raises(ValueError, match=message):
        defense.require(n - 1, f)
    with pytest.raises(ValueError, match=message):  # at call time, the same check
        defense(rand(n - 1, d), context_for(n - 1, f, d))
    rule = DEFENSES[name]().rule
    if "num_malicious" in context_parameters(rule):  # rules that read f check it themselves
        with pytest.raises(ValueError, match=message):
            rule(rand(n - 1, d), **{k: getattr(context_for(n - 1, f, d), k) for k in context_parameters(rule)})


def test_rules_without_a_condition_accept_any_f():
    for name in sorted(set(DEFENSES) - set(CONDITIONS)):
        make_defense(name).require(10, 9)


def test_condition_arithmetic_and_messages():
    for condition in [c for c, _ in CONDITIONS.values()] + [Condition("x", 3, 5), Condition("y", 1, 0, strict=False)]:
        for n in range(0, 40):
            f = condition.max_malicious(n)
            if f >= 0:
                assert condition.holds(n, f) and not condition.holds(n, f + 1)
            else:
                assert not condition.holds(n, 0)
                with pytest.raises(ValueError, match="Use at least"):
                    condition.check(n, 0)
    n, f = 20, 5  # chapter 3 prints this message: it keeps the words Bulyan always used
    old = (
        f"Bulyan needs n >= 4f + 3 clients; got n={n}, f={f} (4f + 3 = {4 * f + 3}). "
        f"Lower num_malicious to at most {(n - 3) // 4} or use more clients."
    )
    with pytest.raises(ValueError, match=re.escape(old) + "$"):
        bulyan(rand(n, 3), num_malicious=f)


def test_config_validation_rejects_a_rule_outside_its_condition_before_any_compute():
    with pytest.raises(ValueError, match=re.escape("Krum needs n > 2f + 2 clients; got n=10, f=5")):
        Config(defense="krum", num_clients=10, num_malicious=5).validate()
    Config(defense="krum", num_clients=10, num_malicious=3).validate()
    with pytest.raises(ValueError, match="unknown option"):
        Config(defense="krum", defense_options={"m": 2}, num_clients=10).validate()
    with pytest.raises(ValueError, match="unknown option"):
        Config(attack="min_max", attack_options={"gamma": 2}).validate()
    with pytest.raises(ValueError, match="LIE attack needs n >= 2f"):
        Config(attack="lie", num_clients=10, num_malicious=6).validate()


def test_cli_rejects_krum_outside_its_condition_with_exit_code_2(capsys, tmp_path):
    from skymask_lite.__main__ import main

    argv = ["run", "--defense", "krum", "--num-clients", "10", "--num-malicious", "5", "--rounds", "1"]
    assert main([*argv, "--no-progress", "--out", str(tmp_path / "x.json")]) == 2
    assert "Krum needs n > 2f + 2" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


# ----------------------------------------------------------------------------- decision statistics


def assert_json_safe(value):
    """Only numbers, strings, booleans, None, short lists and dicts; finite floats."""
    if isinstance(value, dict):
        assert all(isinstance(k, str) for k in value)
        for v in value.values():
            assert_json_safe(v)
    elif isinstance(value, list):
        assert len(value) <= 20
        for v in value:
            assert_json_safe(v)
    else:
        assert value is None or isinstance(value, (bool, int, str)) or isinstance(value, float)
        assert not isinstance(value, float) or math.isfinite(value)


def assert_summary_of(summary, values):
    values = np.sort(np.asarray(values, dtype=float))
    expected = [values[0], (values[(len(values) - 1) // 2] + values[len(values) // 2]) / 2, values[-1]]
    np.testing.assert_allclose([summary["min"], summary["median"], summary["max"]], expected, rtol=1e-3, atol=1e-12)


def test_every_rule_records_json_safe_statistics_consistent_with_kept():
    n, f, net = 12, 2, LogisticRegression(4, 3)
    d = num_params(net)
    u = planted_output_layer(net, n=n, bad=(0, 1)).float()
    ctx = RoundContext(
        1, n, f, torch.tensor([0, 1]), net, flatten_params(net), root_x=torch.zeros(5, 1, 2, 2),
        root_y=torch.zeros(5, dtype=torch.long), root_update=u[2:].mean(0),
    )
    out = {name: make_defense(name)(u, ctx) for name in DEFENSES if name != "skymask"}
    for name, agg in out.items():
        assert_json_safe(agg.stats)
        json.dumps(agg.stats, allow_nan=False)
        assert (agg.stats == {}) == (name == "fedavg")  # FedAvg alone decides nothing
    kept = {name: agg.kept.numel() for name, agg in out.items()}
    stats = {name: agg.stats for name, agg in out.items()}

    share = out["median"].info["middle_share"]
    assert float(share.sum()) == pytest.approx(2.0)  # even n: two middle values per coordinate
    assert_summary_of(stats["median"]["middle_share"], share)
    assert stats["median"]["never_middle"] == int((share == 0).sum())

    share = out["trimmed_mean"].info["trimmed_share"]
    assert float(share.sum()) == pytest.approx(2 * f) and stats["trimmed_mean"]["trimmed_per_coordinate"] == 2 * f
    assert_summary_of(stats["trimmed_mean"]["trimmed_share"], share)

    for name in ("krum", "multi_krum"):
        scores = out[name].info["scores"]
        assert stats[name]["selected"] == kept[name] == (1 if name == "krum" else n - f)
        assert_summary_of(stats[name]["scores"], scores)
        assert stats[name]["max_selected_score"] == pytest.approx(float(scores[out[name].kept].max()), rel=1e-3)

    assert stats["bulyan"]["selected"] == kept["bulyan"] == n - 2 * f
    assert stats["bulyan"]["averaged_per_coordinate"] == n - 4 * f
    assert stats["bulyan"]["used_share"]["max"] <= 1.0

    trust = out["fltrust"].info["trust_scores"]
    assert stats["fltrust"]["zero_trust"] + kept["fltrust"] == n
    assert_summary_of(stats["fltrust"]["trust"], trust)
    assert stats["fltrust"]["root_norm"] == pytest.approx(float(ctx.root_update.norm()), rel=1e-3)

    sizes, noise = stats["flame"]["cluster_sizes"], stats["flame"]["noise"]
    assert sum(sizes) + noise == n and kept["flame"] == (sizes[0] if sizes else n)
    assert stats["flame"]["noise_std"] == pytest.approx(0.001 * stats["flame"]["clip_norm"], rel=1e-3)

    ds = stats["deepsight"]
    assert sum(ds["cluster_sizes"]) + ds["singletons"] == n
    assert ds["suspicious"] == int(out["deepsight"].info["suspicious"].sum())
    assert ds["accepted_clusters"] <= len(ds["cluster_sizes"]) + ds["singletons"]

    tp = stats["tolpegin"]
    assert sum(tp["cluster_sizes"]) == n and tp["flagged"] + kept["tolpegin"] == n
    assert tp["flagged"] == min(tp["cluster_sizes"])

    assert stats["fldetector"] == {"detecting": False, "gap_k": None, "flagged": 0, "scores": None}


def test_fldetector_statistics_once_detecting():
    out = linear_stream(FLDetector(window=3, max_k=4, num_refs=5), 7, [2, 6, 7])
    for u, agg in out[4:]:
        stats = agg.stats
        json.dumps(stats, allow_nan=False)
        assert stats["detecting"] and stats["gap_k"] >= 2
        assert stats["flagged"] + agg.kept.numel() == 10
        assert_summary_of(stats["scores"], agg.info["scores"])


# ----------------------------------------------------------------------------- DeepSight in named steps


def deepsight_before_the_split(updates, *, net, global_params, generator, root_x, global_buffers=None,
                               num_seeds=3, num_samples=64, tau=1 / 3, min_cluster_size=2):
    """DeepSight as one function, as it was written before it was split into named steps."""
    n = updates.shape[0]
    weight, bias = output_layer(updates, net)
    neups = detectors._neups(weight, bias)
    te = detectors._threshold_exceedings(neups)
    suspicious = te.to(updates.dtype) < median_of(te.to(updates.dtype)) / 2
    shape = (num_seeds, num_samples, *root_x.shape[1:])
    inputs = torch.randn(shape, generator=generator, dtype=updates.dtype).to(updates.device)
    ddifs = detectors._ddifs(updates, net, global_params.to(updates), global_buffers or {}, inputs)
    cluster = functools.partial(hdbscan_labels, min_cluster_size=min(min_cluster_size, n))
    same = detectors._same_cluster_distances
    ddif_dist = np.mean([same(cluster(d, precomputed=False)) for d in ddifs], axis=0)
    merged = np.mean(
        [same(cluster(cosine_distances(bias), precomputed=True)), same(cluster(neups, precomputed=False)), ddif_dist],
        axis=0,
    )
    labels = cluster(torch.from_numpy(merged), precomputed=True)
    labels = np.where(labels >= 0, labels, labels.max() + 1 + np.arange(n))
    sus = suspicious.cpu().numpy()
    accepted = np.bincount(labels, weights=sus) < tau * np.bincount(labels)
    kept = torch.as_tensor(np.flatnonzero(accepted[labels]), device=updates.device)
    clip = median_of(updates.norm(dim=1))
    return mean_of(clip_to_norm(updates, clip), kept), kept


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("options", [{}, {"num_seeds": 2, "num_samples": 8, "tau": 0.5, "min_cluster_size": 3}])
def test_deepsight_in_named_steps_is_the_one_long_function_it_was(seed, options):
    net = LogisticRegression(16, 4)
    u = 0.05 * rand(12, num_params(net), seed=seed)
    u[[0, 1, 2], 16 * 3 : 16 * 4] += 1.0
    kwargs = dict(net=net, global_params=flatten_params(net).double(), root_x=torch.zeros(2, 1, 4, 4), **options)
    agg = deepsight(u, generator=torch.Generator().manual_seed(seed), **kwargs)
    update, kept = deepsight_before_the_split(u, generator=torch.Generator().manual_seed(seed), **kwargs)
    assert torch.equal(agg.kept, kept) and torch.equal(agg.update, update)
    assert 0 < kept.numel() < 12  # the fixed input makes it decide something


def test_cosine_distances_are_exactly_symmetric_in_float32():
    """A float32 Gram matrix need not be symmetric (here for n = 11); HDBSCAN refused it."""
    u = (0.1 * rand(11, 68, seed=49)).float()
    dist = cosine_distances(u)
    assert torch.equal(dist, dist.T)
    torch.testing.assert_close(dist.double(), cosine_distances(u.double()), atol=1e-6, rtol=0)
    agg = flame(u, generator=torch.Generator().manual_seed(0))
    assert_valid(agg, 11, 68)
