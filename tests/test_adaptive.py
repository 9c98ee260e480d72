"""The attack that knows SkyMask (``adaptive_skymask``) and the attackers' own data in the round context."""

import pytest
import torch

from skymask_lite.attacks import (
    ATTACKS,
    AdaptiveSkyMask,
    make_attack,
    min_max_constraint,
    perturbation_vector,
    spread_offsets,
)
from skymask_lite.context import LocalRecipe
from skymask_lite.defenses import make_defense
from skymask_lite.fl import Federation, initial_state, round_context, round_updates, run_round
from skymask_lite.models import make_model


def _federation(n=8, malicious=(1, 4, 6), seed=0):
    """A tiny learnable federation: the class of an image is the argmax of 10 fixed projections."""
    g = torch.Generator().manual_seed(1)
    proj = torch.randn(10, 784, generator=g)

    def data(m):
        x = torch.randn(m, 1, 28, 28, generator=g)
        return x, (x.flatten(1) @ proj.T).argmax(1)

    clients = [data(40) for _ in range(n)]
    return Federation(
        net=make_model("lr", "fmnist"), client_data=clients, test=data(100), root=data(30),
        malicious=torch.tensor(malicious), num_classes=10, recipe=LocalRecipe(lr=0.05), seed=seed,
    )


def _round(fed):
    state = initial_state(fed)
    updates, _, _ = round_updates(fed, state)
    return updates, round_context(fed, state, attacker_data=True)


def test_registered_with_checked_options():
    assert "adaptive_skymask" in ATTACKS
    attack = make_attack("adaptive_skymask", spread=0.2, search_steps=3)
    assert isinstance(attack, AdaptiveSkyMask) and attack.needs_attacker_data
    assert (attack.spread, attack.search_steps) == (0.2, 3)
    with pytest.raises(ValueError, match="unknown option.*gamma"):
        make_attack("adaptive_skymask", gamma=1.0)
    for bad in ({"perturbation": "unit"}, {"spread": -0.1}, {"search_steps": -1}, {"tau": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            make_attack("adaptive_skymask", **bad)
    with pytest.raises(ValueError, match="at least 2 malicious"):
        attack.require(10, 1)
    attack.require(10, 0)
    attack.require(10, 2)


def test_round_context_fills_the_attackers_own_data_only_when_asked():
    fed = _federation()
    state = initial_state(fed)
    plain, asked = round_context(fed, state), round_context(fed, state, attacker_data=True)
    assert plain.attacker_x is None and plain.attacker_y is None
    assert torch.equal(plain.generator.get_state(), asked.generator.get_state())  # nothing else changes
    x, y = asked.attacker_x, asked.attacker_y
    assert len(y) == len(fed.root[1]) == len(x)  # root_size examples (the attackers hold 120)
    own = torch.cat([fed.client_data[i][0] for i in fed.malicious.tolist()]).flatten(1)
    honest = torch.cat([fed.client_data[i][0] for i in range(8) if i not in fed.malicious.tolist()]).flatten(1)
    def found_in(rows):
        return (x.flatten(1)[:, None] == rows[None]).all(dim=2).any(dim=1)

    assert found_in(own).all() and not found_in(honest).any()  # every example is an attacker's
    assert len(torch.unique(x.flatten(1), dim=0)) == len(y)  # sampled without replacement
    state.round = 3
    later = round_context(fed, state, attacker_data=True)
    assert torch.equal(later.attacker_x, x) and torch.equal(later.attacker_y, y)  # drawn once per run, seeded
    small = _federation(malicious=(2, 5))
    small.root = (torch.zeros(500, 1, 28, 28), torch.zeros(500, dtype=torch.long))
    assert len(round_context(small, initial_state(small), attacker_data=True).attacker_y) == 80  # all they have


def test_missing_attacker_data_is_a_clear_error():
    fed = _federation()
    state = initial_state(fed)
    updates, _, _ = round_updates(fed, state)
    with pytest.raises(ValueError, match="attacker_data=True"):
        make_attack("adaptive_skymask")(updates, round_context(fed, state))


def test_only_malicious_rows_change_and_the_attack_is_deterministic():
    fed = _federation()
    updates, ctx = _round(fed)
    before = updates.clone()
    out = make_attack("adaptive_skymask")(updates, ctx)
    assert torch.equal(updates, before)
    assert torch.equal(out[ctx.benign], before[ctx.benign])
    mal = out[ctx.malicious]
    assert not torch.equal(mal, before[ctx.malicious])
    assert torch.cdist(mal, mal).fill_diagonal_(float("inf")).min() > 0  # spread: no two identical rows
    again = make_attack("adaptive_skymask")(*_round(_federation()))
    assert torch.equal(out, again)
    other_seed = make_attack("adaptive_skymask")(*_round(_federation(seed=1)))
    assert not torch.equal(out[ctx.malicious], other_seed[ctx.malicious])


def test_surrogate_root_has_the_attackers_mean_direction_and_a_median_norm():
    honest = torch.randn(5, 30, generator=torch.Generator().manual_seed(0)) + 0.2
    g0 = AdaptiveSkyMask.surrogate_root(honest)
    mean = honest.mean(0)
    torch.testing.assert_close(g0 / g0.norm(), mean / mean.norm())
    torch.testing.assert_close(g0.norm(), honest.norm(dim=1).median())


@pytest.mark.parametrize("search_steps", [0, 4])
def test_the_returned_gamma_is_kept_by_the_simulation_and_the_next_rejected_one_is_not(search_steps):
    fed = _federation()
    updates, ctx = _round(fed)
    attack = make_attack("adaptive_skymask", search_steps=search_steps)
    out = attack(updates, ctx)
    stats = attack.stats
    honest = updates[ctx.malicious]
    p = perturbation_vector(honest, "unit_vec")
    offsets = spread_offsets(honest, 3, attack.spread, round_context(fed, initial_state(fed)).generator)
    gamma, gamma_mm = stats["gamma"], stats["gamma_min_max"]
    rows = honest.mean(0) - gamma * p + offsets
    torch.testing.assert_close(out[ctx.malicious], rows)
    assert 0 <= gamma <= gamma_mm
    assert stats["calls"] <= 1 + search_steps and len(stats["trace"]) <= 1 + search_steps
    in_envelope = min_max_constraint(honest)
    assert not in_envelope(honest.mean(0) - (gamma_mm * (1 + 1e-3)) * p + offsets)  # the Min-Max bound
    if gamma > 0:
        assert in_envelope(rows) and attack.kept_by_simulation(honest, rows, ctx)  # a direct call agrees
    rejected_above = [g for g, ok in stats["trace"] if not ok and g > gamma]
    assert rejected_above or gamma == gamma_mm  # the search stopped at a rejection or at its cap
    if rejected_above:
        g = min(rejected_above)
        assert g - gamma <= gamma_mm / 2 ** search_steps * (1 + 1e-6)  # resolution of s bisection tests
        assert not attack.kept_by_simulation(honest, honest.mean(0) - g * p + offsets, ctx)
    assert any(not ok for _, ok in stats["trace"])  # this toy round does reject Min-Max's own gamma


def test_runs_in_a_federation_against_skymask():
    fed = _federation()
    state = initial_state(fed)
    attack = make_attack("adaptive_skymask", search_steps=2)
    records = [run_round(fed, state, attack, make_defense("skymask")) for _ in range(2)]
    assert [r["round"] for r in records] == [1, 2]
    assert all(0 <= r["fnr"] <= 1 and 0 <= r["fpr"] <= 1 for r in records)
    assert attack.stats["calls"] <= 3
    assert records[-1]["attack_info"] == attack.stats and records[0]["attack_info"]["gamma"] >= 0
    assert "attack_info" not in run_round(fed, state, make_attack("min_max"), make_defense("skymask"))


def test_runs_from_the_command_line(cli_run):
    results = cli_run("--attack", "adaptive_skymask", "--num-malicious", "3", "--defense", "skymask",
                      "--attack-option", "search_steps=2")
    assert results["config"]["attack"] == "adaptive_skymask"
    assert results["config"]["attack_options"] == {"search_steps": 2}
    assert results["rounds"][0]["attack_info"]["calls"] <= 3
