import math
import re

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from skymask_lite.attacks import (
    ATTACKS,
    FANG_KRUM_CONDITION,
    LIE_CONDITION,
    PERTURBATIONS,
    Attack,
    Backdoor,
    add_trigger,
    agr_agnostic_gamma,
    fang_krum,
    fang_krum_lambda0,
    fang_trim,
    flip_labels,
    gaussian,
    lie,
    lie_z,
    make_attack,
    min_max,
    min_max_constraint,
    min_sum,
    min_sum_constraint,
    perturbation_vector,
    sign_flip,
    spread_offsets,
)
from skymask_lite.context import RoundContext
from skymask_lite.defenses import krum_scores


def benign_updates(nb=15, d=40, seed=0, offset=0.3, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(nb, d, generator=gen) + offset).to(dtype)


def round_context(n=12, f=3, seed=0):
    malicious = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:f].sort().values
    return RoundContext(
        round=1,
        num_clients=n,
        num_malicious=f,
        malicious=malicious,
        net=nn.Linear(2, 2),
        global_params=torch.zeros(6),
        generator=torch.Generator().manual_seed(seed),
    )


# ----------------------------------------------------------------------------- Min-Max / Min-Sum


def closed_form_min_max_gamma(benign, p):
    """Largest gamma with max_i ||mean - gamma p - B_i||^2 <= R: the smallest positive root over i."""
    b, p = benign.double(), p.double()
    c = b.mean(0) - b  # [nb, d], c_i = mean - B_i
    bound = torch.cdist(b, b).square().max()
    cp, pp, cc = c @ p, p @ p, c.square().sum(1)
    return ((cp + (cp.square() - pp * (cc - bound)).sqrt()) / pp).min().item()


def closed_form_min_sum_gamma(benign, p, bound):
    """sum_i ||c_i - gamma p||^2 = nb gamma^2 ||p||^2 + sum_i ||c_i||^2 since sum_i c_i = 0."""
    b, p = benign.double(), p.double()
    sums = torch.cdist(b, b).square().sum(1)
    limit = sums.max() if bound == "paper" else sums.min()
    spread = (b.mean(0) - b).square().sum()
    return ((limit - spread) / (len(b) * (p @ p))).sqrt().item()


@pytest.mark.parametrize("perturbation", PERTURBATIONS)
def test_min_max_gamma_is_the_largest_feasible(perturbation):
    benign = benign_updates()
    p = perturbation_vector(benign, perturbation)
    constraint = min_max_constraint(benign)
    gamma = agr_agnostic_gamma(benign, p, constraint)
    assert 0 < gamma < 99  # inside the search's reach, so "largest" is meaningful
    assert gamma == pytest.approx(closed_form_min_max_gamma(benign, p), abs=1e-4)
    mean = benign.mean(0)
    assert constraint(mean - gamma * p)
    assert not constraint(mean - (gamma + 1e-3) * p)
    torch.testing.assert_close(min_max(benign, perturbation), mean - gamma * p)


@pytest.mark.parametrize("bound", ["paper", "authors_code"])
@pytest.mark.parametrize("perturbation", PERTURBATIONS)
def test_min_sum_gamma_is_the_largest_feasible(perturbation, bound):
    benign = benign_updates()
    p = perturbation_vector(benign, perturbation)
    constraint = min_sum_constraint(benign, bound)
    gamma = agr_agnostic_gamma(benign, p, constraint)
    assert 0 < gamma < 99
    assert gamma == pytest.approx(closed_form_min_sum_gamma(benign, p, bound), abs=1e-4)
    mean = benign.mean(0)
    assert constraint(mean - gamma * p)
    assert not constraint(mean - (gamma + 1e-3) * p)
    torch.testing.assert_close(min_sum(benign, perturbation, bound), mean - gamma * p)


@pytest.mark.parametrize("perturbation", PERTURBATIONS)
def test_min_sum_authors_bound_is_stricter(perturbation):
    benign = benign_updates(seed=1)
    p = perturbation_vector(benign, perturbation)
    paper = agr_agnostic_gamma(benign, p, min_sum_constraint(benign, "paper"))
    authors = agr_agnostic_gamma(benign, p, min_sum_constraint(benign, "authors_code"))
    assert authors <= paper
    assert min_sum(benign, perturbation).shape == (benign.shape[1],)  # default bound is the paper's
    torch.testing.assert_close(min_sum(benign, perturbation), min_sum(benign, perturbation, "paper"))


def test_perturbation_vectors():
    benign = benign_updates()
    mean = benign.mean(0)
    torch.testing.assert_close(perturbation_vector(benign, "unit_vec"), mean / mean.norm())
    torch.testing.assert_close(perturbation_vector(benign, "std"), torch.from_numpy(benign.numpy().std(0, ddof=1)))
    torch.testing.assert_close(perturbation_vector(benign, "sign"), mean.sign())


# ----------------------------------------------------------------------------- Fang et al.


@pytest.mark.parametrize("seed", range(4))
def test_fang_krum_makes_krum_pick_an_attacker(seed):
    benign, f = benign_updates(nb=17, d=30, seed=seed, offset=0.1), 3
    crafted = fang_krum(benign, f)
    stacked = torch.cat([crafted.expand(f, -1), benign])
    assert krum_scores(stacked, f).argmin().item() < f
    # the crafted row is -lambda * sign(sum_i B_i) with lambda = lambda0 / 2^k
    direction = benign.sum(0).sign()
    lam = (-crafted / direction).mean().item()
    torch.testing.assert_close(crafted, -lam * direction)
    halvings = math.log2(fang_krum_lambda0(benign, f, 17 + f) / lam)
    assert halvings == pytest.approx(round(halvings), abs=1e-4) and halvings >= -1e-4


def test_fang_krum_falls_back_to_the_benign_mean():
    # identical benign rows score 0 under Krum; -lambda * sign(...) never equals them, so every
    # crafted row scores > 0 for every lambda and Krum never picks it
    benign = torch.full((5, 8), 0.7)
    torch.testing.assert_close(fang_krum(benign, 2), benign.mean(0))


def test_fang_krum_lambda0_formula():
    benign, f, n = benign_updates(nb=9, d=10), 2, 11
    b = benign.double().numpy()
    dist = np.sqrt(((b[:, None] - b[None]) ** 2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    nearest = np.sort(dist, axis=1)[:, : n - f - 2].sum(1)
    expected = nearest.min() / ((n - 2 * f - 1) * math.sqrt(10)) + np.linalg.norm(b, axis=1).max() / math.sqrt(10)
    assert fang_krum_lambda0(benign, f, n) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("b", [2.0, 3.0])
def test_fang_trim_goes_past_the_benign_extremes(b):
    benign, f = benign_updates(nb=10, d=60, offset=0.0), 4
    out = fang_trim(benign, f, b=b, generator=torch.Generator().manual_seed(0))
    assert out.shape == (f, 60)
    down = benign.sum(0) > 0
    mn, mx = benign.amin(0), benign.amax(0)
    assert down.any() and (~down).any()
    low, high = out[:, down], out[:, ~down]
    # opposite the benign mean's sign, strictly outside the benign range ...
    assert (low < mn[down]).all() and (high > mx[~down]).all()
    # ... by at most the factor b
    assert (low >= torch.minimum(mn[down] * b, mn[down] / b)).all()
    assert (high <= torch.maximum(mx[~down] * b, mx[~down] / b)).all()
    # fresh draws per attacker, reproducible with the same generator
    assert all((out[i] != out[j]).all() for i in range(f) for j in range(i))
    torch.testing.assert_close(out, fang_trim(benign, f, b=b, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(out, fang_trim(benign, f, b=b, generator=torch.Generator().manual_seed(1)))


# ----------------------------------------------------------------------------- LIE, sign flip, Gaussian


def test_lie_equals_its_formula():
    n, f = 20, 4
    benign = benign_updates(nb=n - f, d=30)
    s = math.floor(n / 2 + 1) - f
    z = norm.ppf((n - s) / n)
    b = benign.double().numpy()
    mu, sigma = b.mean(0), b.std(0, ddof=1)
    expected = torch.from_numpy(mu - z * sigma * np.sign(mu)).float()
    out = lie(benign, f, n)
    torch.testing.assert_close(out, expected)
    assert lie_z(n, f) == pytest.approx(z)
    mu_t = benign.mean(0)
    assert (out[mu_t > 0] < mu_t[mu_t > 0]).all() and (out[mu_t < 0] > mu_t[mu_t < 0]).all()


def test_sign_flip():
    benign = benign_updates()
    out = sign_flip(benign, 3, scale=2.5)
    assert out.shape == (3, benign.shape[1])
    torch.testing.assert_close(out, (-2.5 * benign.mean(0)).expand(3, -1))


@pytest.mark.parametrize("sigma", [1.0, 200.0])
def test_gaussian_statistics(sigma):
    benign = benign_updates(nb=2, d=5000, dtype=torch.float64)
    out = gaussian(benign, 4, sigma=sigma, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 5000) and out.dtype == torch.float64
    assert abs(out.mean().item()) < 5 * sigma / math.sqrt(out.numel())
    assert out.std().item() == pytest.approx(sigma, rel=0.03)
    torch.testing.assert_close(out, gaussian(benign, 4, sigma=sigma, generator=torch.Generator().manual_seed(0)))


def test_crafting_functions_follow_the_input_dtype():
    benign, gen = benign_updates(dtype=torch.float64), torch.Generator().manual_seed(0)
    outs = [
        gaussian(benign, 2, generator=gen), sign_flip(benign, 2), lie(benign, 2, 17),
        fang_trim(benign, 2, generator=gen), fang_krum(benign, 2), min_max(benign), min_sum(benign),
    ]
    assert all(out.dtype == torch.float64 for out in outs)


# ----------------------------------------------------------------------------- data poisoning


def test_flip_labels():
    assert flip_labels(torch.arange(10), 10).tolist() == list(range(9, -1, -1))
    assert flip_labels(torch.tensor([37, 0]), 100).tolist() == [62, 99]
    with pytest.raises(ValueError, match="num_classes"):
        flip_labels(torch.tensor([10]), 10)
    with pytest.raises(ValueError, match="integer"):
        flip_labels(torch.tensor([1.0]), 10)


def test_add_trigger_stamps_exactly_the_patch():
    x = torch.randn(4, 3, 8, 8)
    before = x.clone()
    out = add_trigger(x, size=3)
    torch.testing.assert_close(x, before)
    patch = torch.zeros(8, 8, dtype=torch.bool)
    patch[5:, 5:] = True
    expected = x.amax(dim=(0, 2, 3)).view(1, 3, 1, 1).expand(4, 3, 3, 3)
    torch.testing.assert_close(out[:, :, 5:, 5:], expected)
    torch.testing.assert_close(out[:, :, ~patch], x[:, :, ~patch])
    assert (add_trigger(x, size=2, value=2.5)[:, :, 6:, 6:] == 2.5).all()
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        add_trigger(x[0])
    with pytest.raises(ValueError, match="size"):
        add_trigger(x, size=9)


def test_backdoor_poisons_a_seeded_share():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 1, 8, 8, generator=gen), torch.randint(1, 10, (20,), generator=gen)
    x0, y0 = x.clone(), y.clone()
    attack = make_attack("backdoor", share=0.5, target_class=0)
    xp, yp = attack.poison_data(x, y, torch.Generator().manual_seed(1))
    torch.testing.assert_close(x, x0)
    torch.testing.assert_close(y, y0)
    stamped = (xp != x).flatten(1).any(1)
    assert stamped.sum().item() == 10
    assert (yp[stamped] == 0).all() and torch.equal(yp[~stamped], y[~stamped])
    torch.testing.assert_close(xp[stamped], add_trigger(x[stamped], size=5, value=x.amax(dim=(0, 2, 3))))
    xq, yq = attack.poison_data(x, y, torch.Generator().manual_seed(1))
    assert torch.equal(xp, xq) and torch.equal(yp, yq)


def test_backdoor_scales_malicious_rows_by_n_over_f_eta():
    ctx, updates = round_context(n=12, f=3), benign_updates(nb=12, d=7)
    ctx.global_lr = 1.0
    attack = Backdoor()
    out = attack(updates, ctx)
    torch.testing.assert_close(out[ctx.malicious], updates[ctx.malicious] * 4)
    assert torch.equal(out[ctx.benign], updates[ctx.benign])
    ctx.global_lr = 2.0
    torch.testing.assert_close(attack(updates, ctx)[ctx.malicious], updates[ctx.malicious] * 2)
    torch.testing.assert_close(Backdoor(scale=3.0)(updates, ctx)[ctx.malicious], updates[ctx.malicious] * 3)
    assert attack.target_class == 0
    assert attack.add_trigger(torch.zeros(2, 1, 8, 8)).shape == (2, 1, 8, 8)


def test_backdoor_replaces_the_global_model_under_fedavg():
    """Model replacement: if the honest updates cancel, the server's step equals the attackers' delta."""
    ctx = round_context(n=10, f=2)
    ctx.global_lr = 2.0
    delta = torch.randn(5, generator=torch.Generator().manual_seed(3))
    updates = torch.zeros(10, 5)
    updates[ctx.malicious] = delta
    benign = torch.randn(8, 5, generator=torch.Generator().manual_seed(4))
    updates[ctx.benign] = benign - benign.mean(0)
    step = ctx.global_lr * Backdoor()(updates, ctx).mean(0)
    torch.testing.assert_close(step, delta)


# ----------------------------------------------------------------------------- attack objects


@pytest.mark.parametrize("name", sorted(set(ATTACKS) - {"adaptive_skymask"}))  # needs a model: test_adaptive.py
def test_attacks_change_only_malicious_rows(name):
    ctx, updates = round_context(n=12, f=3), benign_updates(nb=12, d=20)
    before = updates.clone()
    out = make_attack(name)(updates, ctx)
    assert out.shape == updates.shape and torch.isfinite(out).all()
    assert torch.equal(out[ctx.benign], before[ctx.benign])
    assert torch.equal(updates, before)  # the input is not mutated
    no_attackers = round_context(n=12, f=0)
    assert torch.equal(make_attack(name)(updates, no_attackers), updates)


@pytest.mark.parametrize("name", ["gaussian", "sign_flip", "lie", "fang_trim", "fang_krum", "min_max", "min_sum"])
def test_model_poisoning_replaces_malicious_rows(name):
    ctx, updates = round_context(n=12, f=3), benign_updates(nb=12, d=20)
    out = make_attack(name)(updates, ctx)
    assert not torch.equal(out[ctx.malicious], updates[ctx.malicious])


@pytest.mark.parametrize("name", ["gaussian", "sign_flip", "lie", "fang_trim", "fang_krum", "min_max", "min_sum"])
def test_partial_knowledge_uses_only_malicious_rows(name):
    updates = benign_updates(nb=12, d=20)
    ctx = round_context(n=12, f=3)
    out = make_attack(name, knowledge="partial")(updates, ctx)
    other = updates.clone()
    other[ctx.benign] = 10 * torch.randn(9, 20)
    out_other = make_attack(name, knowledge="partial")(other, round_context(n=12, f=3))
    assert torch.equal(out[ctx.malicious], out_other[ctx.malicious])
    full = make_attack(name)(other, round_context(n=12, f=3))
    if name != "gaussian":  # the only attack that ignores the benign rows
        assert not torch.equal(full[ctx.malicious], out_other[ctx.malicious])


def test_partial_sign_flip_is_minus_the_attackers_mean():
    ctx, updates = round_context(n=12, f=3), benign_updates(nb=12, d=20)
    out = make_attack("sign_flip", knowledge="partial", scale=2.0)(updates, ctx)
    torch.testing.assert_close(out[ctx.malicious], (-2 * updates[ctx.malicious].mean(0)).expand(3, -1))


def test_options_reach_the_crafting_function():
    ctx, updates = round_context(n=12, f=3), benign_updates(nb=12, d=20)
    out = make_attack("min_sum", perturbation="std", bound="authors_code")(updates, ctx)
    torch.testing.assert_close(out[ctx.malicious[0]], min_sum(updates[ctx.benign], "std", "authors_code"))
    ctx = round_context(n=12, f=3)
    out = ATTACKS["gaussian"](sigma=200)(updates, ctx)
    expected = gaussian(updates[ctx.benign], 3, sigma=200, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[ctx.malicious], expected)


def test_registry_errors():
    with pytest.raises(ValueError, match="min_max"):
        make_attack("minmax")
    with pytest.raises(ValueError, match="unknown option.*gamma"):
        make_attack("min_max", gamma=3.0)
    with pytest.raises(ValueError, match="unknown option.*shares"):
        make_attack("backdoor", shares=0.5)
    with pytest.raises(ValueError, match="unknown option"):
        make_attack("none", sigma=1.0)
    with pytest.raises(ValueError, match="perturbation"):
        make_attack("min_max", perturbation="unit")
    with pytest.raises(ValueError, match="bound"):
        make_attack("min_sum", bound="code")
    with pytest.raises(ValueError, match="knowledge"):
        make_attack("lie", knowledge="some")
    with pytest.raises(ValueError, match="share"):
        make_attack("backdoor", share=1.5)
    with pytest.raises(ValueError, match="scale"):
        make_attack("backdoor", scale=0)
    with pytest.raises(NotImplementedError, match="trigger"):
        Attack().add_trigger(torch.zeros(1, 1, 8, 8))


def test_bad_inputs_raise_clear_errors():
    benign = benign_updates()
    with pytest.raises(ValueError, match="num_malicious"):
        sign_flip(benign, 0)
    with pytest.raises(ValueError, match=r"\[nb, d\]"):
        gaussian(benign[0], 2)
    with pytest.raises(ValueError, match="floating"):
        min_max(benign.long())
    with pytest.raises(ValueError, match="perturbation"):
        min_max(benign, "unit")
    with pytest.raises(ValueError, match="bound"):
        min_sum(benign, bound="code")
    with pytest.raises(ValueError, match="majority"):
        lie(benign, 6, 10)
    with pytest.raises(ValueError, match="n > 2f"):
        fang_krum(benign, 8, 16)
    with pytest.raises(ValueError, match="b"):
        fang_trim(benign, 2, b=0.5)
    with pytest.raises(ValueError, match="at least 2"):
        lie(benign[:1], 1, 10)


# ----------------------------------------------------------------------------- the binder and conditions


def test_crafting_functions_read_context_fields_by_name_and_list_their_options():
    assert make_attack("gaussian").context_args == ("num_malicious", "generator")
    assert make_attack("lie").context_args == ("num_malicious", "num_clients")
    assert make_attack("fang_krum").context_args == ("num_malicious", "num_clients", "generator")
    assert make_attack("min_max").context_args == ("num_malicious", "generator")
    accepted = "['gamma'] for the 'min_max' attack; it accepts ['knowledge', 'perturbation', 'spread']"
    with pytest.raises(ValueError, match=re.escape(accepted)):
        make_attack("min_max", gamma=3.0)
    with pytest.raises(ValueError, match=re.escape("['num_clients'] for the 'lie' attack; it accepts ['knowledge']")):
        make_attack("lie", num_clients=10)  # a context field is read from the round, never an option
    with pytest.raises(ValueError, match=re.escape("['sigma'] for the 'none' attack; it takes no options")):
        make_attack("none", sigma=1.0)
    assert make_attack("label_flip", num_classes=4).num_classes == 4  # set at setup: an option of the class


def test_declared_attack_conditions_match_the_attacks_own_checks():
    benign = benign_updates(nb=30, d=5)
    for n in range(2, 24):
        for f in range(1, n):
            try:
                lie_z(n, f)
                lie_ok = True
            except ValueError:
                lie_ok = False
            assert LIE_CONDITION.holds(n, f) == lie_ok, (n, f)
            try:
                fang_krum_lambda0(benign, f, n)
                fang_ok = True
            except ValueError:
                fang_ok = False
            assert FANG_KRUM_CONDITION.holds(n, f) == fang_ok, (n, f)


def test_attack_require_checks_its_condition_before_any_round():
    make_attack("lie").require(10, 5)
    make_attack("lie").require(10, 0)  # no attacker: nothing to craft
    with pytest.raises(ValueError, match=re.escape("The LIE attack needs n >= 2f clients; got n=10, f=6")):
        make_attack("lie").require(10, 6)
    with pytest.raises(ValueError, match=re.escape("Fang's Krum attack needs n > 2f + 1 clients; got n=10, f=5")):
        make_attack("fang_krum").require(10, 5)
    for name in sorted(set(ATTACKS) - {"lie", "fang_krum"}):
        make_attack(name).require(10, 9)


# ----------------------------------------------------------------------------- spread attackers


def _paper_search(benign, p, ok):
    """The NDSS 2021 search written out again, as the reference for spread = 0."""
    mean, gamma, step, best = benign.mean(0), 50.0, 25.0, 0.0
    while abs(best - gamma) > 1e-5:
        if ok(mean - gamma * p):
            best, gamma = gamma, gamma + step
        else:
            gamma -= step
        step /= 2
    return mean - best * p


@pytest.mark.parametrize("seed", range(3))
def test_spread_zero_is_bit_identical_to_the_identical_row_attacks(seed):
    benign = benign_updates(nb=15, d=40, seed=seed)
    p = perturbation_vector(benign, "unit_vec")
    bound = torch.cdist(benign, benign).square().max()
    old_min_max = _paper_search(benign, p, lambda m: bool(torch.cdist(m[None], benign).square().max() <= bound))
    sums = torch.cdist(benign, benign).square().sum(dim=1)
    old_min_sum = _paper_search(benign, p, lambda m: bool(torch.cdist(m[None], benign).square().sum() <= sums.max()))
    assert torch.equal(min_max(benign, spread=0.0, num_malicious=3), old_min_max)
    assert torch.equal(min_sum(benign, spread=0.0, num_malicious=3), old_min_sum)
    for name in ("min_max", "min_sum", "fang_trim", "fang_krum"):
        a, b = round_context(n=12, f=3, seed=seed), round_context(n=12, f=3, seed=seed)
        updates = benign_updates(nb=12, d=20, seed=seed)
        out_default, out_zero = make_attack(name)(updates, a), make_attack(name, spread=0.0)(updates, b)
        assert torch.equal(out_default, out_zero)
        assert torch.equal(a.generator.get_state(), b.generator.get_state())  # nothing more was drawn


def test_spread_offsets_formula():
    benign, f = benign_updates(nb=15, d=400), 4
    offsets = spread_offsets(benign, f, 0.5, torch.Generator().manual_seed(3))
    r = (benign - benign.mean(0)).norm(dim=1).mean()
    z = torch.randn(f, 400, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(offsets, 0.5 * r * z / 20.0)
    assert offsets.norm(dim=1).div(r).sub(0.5).abs().max() < 0.1  # ||o_i|| ~ spread * r


def _min_max_gamma_of_rows(benign, p, offsets):
    """Closed form with offsets: the smallest positive root over every (row i, benign j) pair."""
    b, p, o = benign.double(), p.double(), offsets.double()
    c = (b.mean(0) + o)[:, None] - b[None]  # [f, nb, d], c_ij = mean + o_i - B_j
    bound = torch.cdist(b, b).square().max()
    cp, pp, cc = c @ p, p @ p, c.square().sum(-1)
    return ((cp + (cp.square() - pp * (cc - bound)).sqrt()) / pp).min().item()


@pytest.mark.parametrize("name", ["min_max", "min_sum"])
@pytest.mark.parametrize("perturbation", PERTURBATIONS)
def test_spread_rows_all_satisfy_the_constraint_at_the_returned_gamma_and_not_above(name, perturbation):
    benign, f, spread = benign_updates(), 5, 0.3
    p = perturbation_vector(benign, perturbation)
    constraint = min_max_constraint(benign) if name == "min_max" else min_sum_constraint(benign)
    craft = min_max if name == "min_max" else min_sum
    rows = craft(benign, perturbation, spread=spread, num_malicious=f, generator=torch.Generator().manual_seed(7))
    offsets = spread_offsets(benign, f, spread, torch.Generator().manual_seed(7))
    assert rows.shape == (f, benign.shape[1])
    assert torch.cdist(rows, rows).fill_diagonal_(float("inf")).min() > 0  # no two attackers send the same row
    gamma = agr_agnostic_gamma(benign, p, constraint, offsets)
    assert 0 < gamma < 99
    mean = benign.mean(0)
    torch.testing.assert_close(rows, mean - gamma * p + offsets)
    assert all(constraint(row) for row in rows)
    above = mean - (gamma + 1e-3) * p + offsets
    assert not all(constraint(row) for row in above)
    if name == "min_max":
        assert gamma == pytest.approx(_min_max_gamma_of_rows(benign, p, offsets), abs=1e-4)
    no_spread = agr_agnostic_gamma(benign, p, constraint)
    assert gamma <= no_spread + 1e-5  # the spread rows use part of the room


def test_spread_too_large_for_the_constraint_is_a_clear_error():
    with pytest.raises(ValueError, match="lower the spread"):
        min_max(benign_updates(), spread=50.0, num_malicious=3)
    with pytest.raises(ValueError, match="spread"):
        make_attack("min_max", spread=-1.0)(benign_updates(nb=12, d=20), round_context())
    with pytest.raises(ValueError, match="num_malicious"):
        min_max(benign_updates(), spread=0.1)


@pytest.mark.parametrize("seed", range(3))
def test_fang_trim_spread_rows_stay_inside_the_attack_interval(seed):
    benign, f, b = benign_updates(nb=17, d=60, seed=seed), 5, 2.0
    plain = fang_trim(benign, f, b, torch.Generator().manual_seed(seed))
    rows = fang_trim(benign, f, b, torch.Generator().manual_seed(seed), spread=1.0)
    push_down = benign.sum(0) > 0
    t = torch.where(push_down, benign.amin(0), benign.amax(0))
    far = torch.where(torch.where(push_down, t < 0, t > 0), t * b, t / b)
    assert (rows >= torch.minimum(t, far)).all() and (rows <= torch.maximum(t, far)).all()
    assert not torch.equal(rows, plain)
    assert (rows != plain).float().mean() > 0.3  # the offsets move most coordinates, not only a few


@pytest.mark.parametrize("seed", range(4))
def test_fang_krum_spread_rows_are_still_selected_by_krum(seed):
    benign, f = benign_updates(nb=17, d=30, seed=seed, offset=0.1), 3
    rows = fang_krum(benign, f, 20, spread=0.1, generator=torch.Generator().manual_seed(seed))
    assert rows.shape == (f, 30)
    assert torch.cdist(rows, rows).fill_diagonal_(float("inf")).min() > 0
    assert krum_scores(torch.cat([rows, benign]), f).argmin().item() < f


def test_spread_is_an_attack_option_from_the_command_line(cli_run):
    results = cli_run("--attack", "min_max", "--num-malicious", "3", "--defense", "median",
                      "--attack-option", "spread=0.1")
    assert results["config"]["attack_options"] == {"spread": 0.1}
