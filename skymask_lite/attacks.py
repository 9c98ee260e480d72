"""Attacks of the SkyMask evaluation: model poisoning as pure functions, data poisoning as transforms.

Sign convention (as in the whole package): a client update is
``delta_i = w_i_after_local_training - w_global``; the server applies ``w += global_lr * agg``.

Model poisoning. Every crafting function takes the benign updates ``B`` (``[nb, d]``, one row per
client) that the attackers can see and returns what the ``f`` colluding attackers send:
``[d]`` (all attackers send the same row) or ``[f, d]``. None loops over coordinates or clients.

* :func:`gaussian` - rows drawn from ``N(0, sigma^2 I)``.
* :func:`sign_flip` - ``-c * mean(B)``.
* :func:`lie` - "a little is enough" (Baruch et al., NeurIPS 2019).
* :func:`fang_trim`, :func:`fang_krum` - full-knowledge attacks on Trimmed-Mean and Krum
  (Fang et al., USENIX Security 2020).
* :func:`min_max`, :func:`min_sum` - AGR-agnostic attacks (Shejwalkar and Houmansadr, NDSS 2021),
  with their ``gamma`` search exposed as :func:`agr_agnostic_gamma` (:func:`gamma_search` for any
  acceptance test).

``spread`` (Min-Max, Min-Sum, Fang-Trim, Fang-Krum; default 0, the papers' attacks): each attacker
adds its own seeded offset (:func:`spread_offsets`) and every row still satisfies the attack's
constraint, so the attackers do not send one identical row. :class:`AdaptiveSkyMask` is Min-Max
against a simulated SkyMask (not in the paper).

Data poisoning: :func:`flip_labels`, :func:`add_trigger` and the backdoor of Bagdasaryan et al.
(AISTATS 2020), whose server-side step scales the attackers' updates by ``n / f``.

Attack objects (:class:`Attack` and subclasses) are what the simulator calls each round:
``attack(updates, ctx) -> updates'`` with exactly ``n`` rows, only the rows ``ctx.malicious``
changed. A crafting function's parameters named like a round-context field (``num_malicious``,
``num_clients``, ``generator``) are filled from the round, the others are its options (the
binder of :mod:`skymask_lite.aggregation`). :data:`ATTACKS` maps names to factories;
:func:`make_attack` checks name and options, and ``attack.require(n, f)`` the attack's own
condition on ``n`` and ``f`` (e.g. LIE needs the attackers not to be a majority).
"""

from __future__ import annotations

import math
import time
from functools import partial
from statistics import NormalDist
from typing import Any, Callable

import torch
from torch import Tensor

from .aggregation import Aggregation, Condition, check_options, context_parameters
from .context import RoundContext

__all__ = [
    "ATTACKS",
    "AdaptiveSkyMask",
    "Attack",
    "Backdoor",
    "FANG_KRUM_CONDITION",
    "KNOWLEDGE",
    "LIE_CONDITION",
    "LabelFlip",
    "MIN_SUM_BOUNDS",
    "ModelPoisoning",
    "PERTURBATIONS",
    "add_trigger",
    "agr_agnostic_gamma",
    "fang_krum",
    "fang_krum_lambda0",
    "fang_trim",
    "flip_labels",
    "gamma_search",
    "gaussian",
    "lie",
    "lie_z",
    "make_attack",
    "min_max",
    "min_max_constraint",
    "min_sum",
    "min_sum_constraint",
    "perturbation_vector",
    "sign_flip",
    "spread_offsets",
]

PERTURBATIONS = ("unit_vec", "std", "sign")
MIN_SUM_BOUNDS = ("paper", "authors_code")
KNOWLEDGE = ("full", "partial")

# ----------------------------------------------------------------------------- input checks


def _check_benign(benign: Tensor, min_rows: int = 1, why: str = "") -> None:
    """Raise a clear error unless ``benign`` is a floating ``[nb, d]`` tensor with ``nb >= min_rows``."""
    if not isinstance(benign, Tensor) or benign.dim() != 2:
        shape = tuple(benign.shape) if isinstance(benign, Tensor) else type(benign).__name__
        raise ValueError(f"benign must be a [nb, d] tensor of benign updates (one row per client), got {shape}")
    if not benign.is_floating_point():
        raise ValueError(f"benign must be floating point, got dtype {benign.dtype}")
    if benign.shape[0] < min_rows:
        raise ValueError(
            f"this attack needs at least {min_rows} benign update(s){why}, got {benign.shape[0]}; "
            "give the attackers more benign rows (full knowledge, or more malicious clients)"
        )


def _check_num_malicious(num_malicious: int) -> None:
    if not isinstance(num_malicious, int) or num_malicious <= 0:
        raise ValueError(
            f"num_malicious must be a positive int (the number of rows to craft), got {num_malicious!r}; "
            "with no attacker, use the 'none' attack"
        )


# ----------------------------------------------------------------------------- simple attacks


def gaussian(
    benign: Tensor, num_malicious: int, sigma: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """Gaussian attack: ``f`` rows drawn i.i.d. from ``N(0, sigma^2 I_d)``, ``[f, d]``.

    Only the shape, dtype and device of ``benign`` are used. The draw is made on the CPU
    ``generator`` (reproducible) and moved to ``benign.device``.
    """
    _check_benign(benign)
    _check_num_malicious(num_malicious)
    if sigma < 0:
        raise ValueError(f"sigma is a standard deviation and must be >= 0, got {sigma}")
    noise = torch.randn(num_malicious, benign.shape[1], generator=generator, dtype=benign.dtype)
    return (sigma * noise).to(benign.device)


def sign_flip(benign: Tensor, num_malicious: int, scale: float = 1.0) -> Tensor:
    """Sign-flipping attack: every attacker sends ``-c * mean_i(B_i)`` (``c = scale``), ``[f, d]``."""
    _check_benign(benign)
    _check_num_malicious(num_malicious)
    return (-scale * benign.mean(dim=0)).repeat(num_malicious, 1)


#: LIE's ``s = floor(n/2 + 1) - f > 0`` (the attackers are not a majority) is ``n >= 2f``.
LIE_CONDITION = Condition("The LIE attack", 2, strict=False)


def lie_z(num_clients: int, num_malicious: int) -> float:
    """The LIE factor (Baruch et al., NeurIPS 2019): ``s = floor(n/2 + 1) - f``,
    ``z = Phi^{-1}((n - s) / n)`` with ``Phi`` the standard normal CDF."""
    n, f = num_clients, num_malicious
    _check_num_malicious(f)
    s = math.floor(n / 2 + 1) - f
    if s <= 0:
        raise ValueError(
            f"LIE needs s = floor(n/2 + 1) - f > 0, i.e. the attackers are not a majority; got n={n}, f={f}. "
            "Use fewer malicious clients or another attack"
        )
    return NormalDist().inv_cdf((n - s) / n)


def lie(benign: Tensor, num_malicious: int, num_clients: int) -> Tensor:
    """"A little is enough" (Baruch et al., NeurIPS 2019), ``[d]``, sent by all ``f`` attackers.

    ``m_j = mu_j - z * sigma_j * sign(mu_j)`` where ``mu``, ``sigma`` are the coordinate-wise mean
    and (unbiased) standard deviation of ``B`` over clients and ``z`` is :func:`lie_z`.
    Direction: each coordinate moves ``z`` standard deviations *against* the sign of the benign mean
    (towards and past zero), the stronger of the two choices; where ``mu_j = 0`` it stays ``mu_j``.
    """
    _check_benign(benign, 2, " to estimate the standard deviation")
    z = lie_z(num_clients, num_malicious)
    mu, sigma = benign.mean(dim=0), benign.std(dim=0)
    return mu - z * sigma * mu.sign()


# ----------------------------------------------------------------------------- spread attackers


def spread_offsets(benign: Tensor, num_malicious: int, spread: float, generator: torch.Generator | None) -> Tensor:
    """Per-attacker offsets that keep colluding attackers from sending one identical row, ``[f, d]``::

        o_i = spread * r * z_i / sqrt(d),   z_i ~ N(0, I_d),   r = mean_j ||B_j - mean(B)||

    ``||o_i|| ~ spread * r``: ``spread = 1`` spreads the attackers about as far from their centre as
    the benign rows are from theirs. Why: identical rows give identical masks, a collapsed cluster
    that SkyMask's clustering (and Tolpegin's, FLTrust's scores) single out. ``z`` is drawn on the
    CPU ``generator`` (reproducible) and moved to ``benign.device``.
    """
    if not spread > 0:
        raise ValueError(f"spread must be > 0 to draw offsets (0 means identical rows), got {spread}")
    _check_benign(benign, 2, " to measure the benign spread r that scales the attackers' offsets")
    _check_num_malicious(num_malicious)
    d = benign.shape[1]
    r = (benign - benign.mean(dim=0)).norm(dim=1).mean()
    z = torch.randn(num_malicious, d, generator=generator, dtype=benign.dtype).to(benign.device)
    return (spread * r / math.sqrt(d)) * z


def _check_spread(spread: float) -> None:
    if not (isinstance(spread, (int, float)) and math.isfinite(spread) and spread >= 0):
        raise ValueError(
            f"spread scales the attackers' per-row offsets and must be a finite number >= 0, got {spread!r}"
        )


# ----------------------------------------------------------------------------- Fang et al.


def fang_trim(
    benign: Tensor,
    num_malicious: int,
    b: float = 2.0,
    generator: torch.Generator | None = None,
    spread: float = 0.0,
) -> Tensor:
    """Fang et al.'s Trim attack with full knowledge (USENIX Security 2020), ``[f, d]``.

    With ``s_j = sign(sum_i B_ij)``, attackers push coordinate ``j`` against ``s_j``: the target is
    ``t_j = min_i B_ij`` if ``s_j > 0``, else ``t_j = max_i B_ij``. Each attacker ``k`` draws
    ``m_kj`` uniformly between ``t_j`` and ``t_j * b`` (if that moves away from the benign range,
    i.e. ``t_j < 0`` below the minimum or ``t_j > 0`` above the maximum) or ``t_j / b`` (otherwise);
    a fresh draw per attacker and coordinate, on the CPU ``generator``.

    ``spread > 0`` adds :func:`spread_offsets` (drawn after the uniform draws) and clamps back into
    the interval: ``m_kj <- clamp(m_kj + o_kj, [t_j, far_j])``, so every row stays inside the
    attack's own interval (its constraint). ``spread = 0`` draws nothing more.
    """
    _check_benign(benign)
    _check_num_malicious(num_malicious)
    _check_spread(spread)
    if b < 1:
        raise ValueError(f"b scales the benign extreme outward and must be >= 1 (Fang et al. use 2), got {b}")
    push_down = benign.sum(dim=0) > 0
    target = torch.where(push_down, benign.amin(dim=0), benign.amax(dim=0))
    outward = torch.where(push_down, target < 0, target > 0)
    far = torch.where(outward, target * b, target / b)
    u = torch.rand(num_malicious, benign.shape[1], generator=generator, dtype=benign.dtype).to(benign.device)
    rows = target + u * (far - target)
    if spread == 0:
        return rows
    low, high = torch.minimum(target, far), torch.maximum(target, far)  # the interval [t_j, far_j]
    return torch.clamp(rows + spread_offsets(benign, num_malicious, spread, generator), low, high)


#: Fang et al.'s bound on lambda divides by ``n - 2f - 1``, so it needs ``n > 2f + 1``.
FANG_KRUM_CONDITION = Condition("Fang's Krum attack", 2, 1)


def fang_krum_lambda0(benign: Tensor, num_malicious: int, num_clients: int) -> float:
    """Upper bound on Fang et al.'s Krum-attack ``lambda`` (USENIX Security 2020, in update space)::

        lambda0 = 1 / ((n - 2f - 1) sqrt(d)) * min_i sum_{l in Gamma(i)} ||B_i - B_l||
                  + 1 / sqrt(d) * max_i ||B_i||

    ``Gamma(i)``: the ``n - f - 2`` benign rows nearest to ``B_i`` (itself excluded), capped at the
    ``nb - 1`` rows available (partial knowledge sees fewer benign rows).
    """
    n, f = num_clients, num_malicious
    nb, d = benign.shape
    if n - 2 * f - 1 <= 0:
        raise ValueError(
            f"Fang's Krum attack bounds lambda with 1/(n - 2f - 1), which needs n > 2f + 1; got n={n}, f={f}. "
            "Krum itself assumes n > 2f + 2: use fewer malicious clients"
        )
    k = min(n - f - 2, nb - 1)
    dist = torch.cdist(benign, benign).fill_diagonal_(float("inf"))
    nearest = dist.topk(k, dim=1, largest=False).values.sum(dim=1)
    return (nearest.min() / ((n - 2 * f - 1) * math.sqrt(d)) + benign.norm(dim=1).max() / math.sqrt(d)).item()


def fang_krum(
    benign: Tensor,
    num_malicious: int,
    num_clients: int | None = None,
    spread: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Fang et al.'s Krum attack with full knowledge (USENIX Security 2020), ``[d]``.

    All ``f`` attackers send ``-lambda * s`` with ``s = sign(sum_i B_i)``. ``lambda`` starts at
    :func:`fang_krum_lambda0` and is halved until Krum, run on the ``f`` crafted rows followed by the
    benign rows, selects a crafted one; if ``lambda`` falls below ``1e-5`` the attackers send the
    benign mean. ``num_clients`` (``n``) defaults to ``nb + f``.

    ``spread > 0``: attacker ``i`` sends ``-lambda * s + o_i`` (:func:`spread_offsets`, ``[f, d]``) and
    the halving stops at the first ``lambda`` for which Krum, run on these ``f`` rows and the benign
    ones, selects one of them (the constraint the spread keeps); the fallback is ``mean(B) + o_i``.
    """
    from .defenses import krum_scores

    _check_benign(benign, 3, " (Krum on f crafted + nb benign rows scores each by its nb - 2 nearest)")
    _check_num_malicious(num_malicious)
    _check_spread(spread)
    n = benign.shape[0] + num_malicious if num_clients is None else num_clients
    lam = fang_krum_lambda0(benign, num_malicious, n)
    direction = benign.sum(dim=0).sign()
    offsets = spread_offsets(benign, num_malicious, spread, generator) if spread > 0 else None
    while lam >= 1e-5:
        crafted = -lam * direction
        rows = crafted.expand(num_malicious, -1) if offsets is None else crafted + offsets
        stacked = torch.cat([rows, benign])
        if krum_scores(stacked, num_malicious).argmin().item() < num_malicious:
            return crafted if offsets is None else rows
        lam /= 2
    return benign.mean(dim=0) if offsets is None else benign.mean(dim=0) + offsets


# ----------------------------------------------------------------------------- Min-Max / Min-Sum


def perturbation_vector(benign: Tensor, perturbation: str = "unit_vec") -> Tensor:
    """The perturbation ``p`` of Shejwalkar and Houmansadr (NDSS 2021), ``[d]``:
    ``unit_vec = mean(B) / ||mean(B)||``, ``std = std(B)`` (coordinate-wise, unbiased),
    ``sign = sign(mean(B))``."""
    _check_benign(benign)
    mean = benign.mean(dim=0)
    if perturbation == "unit_vec":
        return mean / mean.norm()
    if perturbation == "std":
        _check_benign(benign, 2, " to estimate the standard deviation")
        return benign.std(dim=0)
    if perturbation == "sign":
        return mean.sign()
    raise ValueError(f"unknown perturbation {perturbation!r}; choose one of {list(PERTURBATIONS)}")


def min_max_constraint(benign: Tensor) -> Callable[[Tensor], bool]:
    """Min-Max's constraint on a crafted ``m`` (``[d]``, or ``[k, d]``: then on every row):
    ``max_i ||m - B_i||^2 <= max_{i,j} ||B_i - B_j||^2``."""
    bound = torch.cdist(benign, benign).square().max()
    return lambda m: bool(torch.cdist(m.reshape(-1, benign.shape[1]), benign).square().max() <= bound)


def min_sum_constraint(benign: Tensor, bound: str = "paper") -> Callable[[Tensor], bool]:
    """Min-Sum's constraint on a crafted ``m`` (``[d]``, or ``[k, d]``: then on every row):
    ``sum_i ||m - B_i||^2 <= max_i sum_j ||B_i - B_j||^2`` (``bound="paper"``, as the paper writes it)
    or ``<= min_i sum_j ...`` (``bound="authors_code"``, what the released code compares with; stricter)."""
    if bound not in MIN_SUM_BOUNDS:
        raise ValueError(f"unknown Min-Sum bound {bound!r}; choose one of {list(MIN_SUM_BOUNDS)}")
    sums = torch.cdist(benign, benign).square().sum(dim=1)
    limit = sums.max() if bound == "paper" else sums.min()
    return lambda m: bool(torch.cdist(m.reshape(-1, benign.shape[1]), benign).square().sum(dim=1).max() <= limit)


def gamma_search(accept: Callable[[float], bool], start: float = 50.0, tol: float = 1e-5) -> tuple[float, list]:
    """The ``gamma`` search of Shejwalkar and Houmansadr (NDSS 2021) for any acceptance test:
    ``gamma = start, step = start / 2, best = 0``; while ``|best - gamma| > tol``: if
    ``accept(gamma)`` then ``best = gamma; gamma += step`` else ``gamma -= step``; then ``step /= 2``.

    It tests ``ceil(log2(start / tol))`` candidates (a bisection of ``[0, 2 start)``; the paper's
    ``start = 50, tol = 1e-5`` makes 23). Returns ``(best, trace)``, ``trace`` the tested
    ``(gamma, accepted)`` pairs in order (``best = 0`` when none was accepted; 0 itself is not tested).
    """
    gamma, step, best = start, start / 2, 0.0
    trace = []
    while abs(best - gamma) > tol:
        ok = bool(accept(gamma))
        trace.append((gamma, ok))
        if ok:
            best = gamma
            gamma += step
        else:
            gamma -= step
        step /= 2
    return best, trace


def agr_agnostic_gamma(
    benign: Tensor, perturbation_vec: Tensor, constraint: Callable[[Tensor], bool], offsets: Tensor | None = None
) -> float:
    """The largest ``gamma`` for which ``m = mean(B) - gamma * p`` satisfies ``constraint``, found by the
    search of Shejwalkar and Houmansadr (NDSS 2021, :func:`gamma_search` with ``start = 50``,
    ``tol = 1e-5``; its reach is ``gamma < 100``).

    With ``offsets`` (``[f, d]``, the attackers' :func:`spread_offsets`) the candidate is the ``[f, d]``
    matrix of rows ``m_i = mean(B) - gamma * p + o_i`` and ``constraint`` must hold for every row.
    """
    mean = benign.mean(dim=0)
    if offsets is None:
        return gamma_search(lambda gamma: constraint(mean - gamma * perturbation_vec))[0]
    if not constraint(mean + offsets):
        raise ValueError(
            "the spread rows violate the attack's constraint even at gamma = 0 (m_i = mean(B) + o_i); "
            "lower the spread option"
        )
    return gamma_search(lambda gamma: constraint(mean - gamma * perturbation_vec + offsets))[0]


def _agr_agnostic_rows(
    benign: Tensor,
    perturbation: str,
    constraint: Callable[[Tensor], bool],
    num_malicious: int | None,
    spread: float,
    generator: torch.Generator | None,
) -> Tensor:
    """``mean(B) - gamma * p`` (``[d]``) or, with ``spread > 0``, the rows ``mean(B) - gamma * p + o_i``
    (``[f, d]``) with the largest ``gamma`` for which every row satisfies ``constraint``."""
    _check_benign(benign)
    _check_spread(spread)
    p = perturbation_vector(benign, perturbation)
    if spread == 0:
        return benign.mean(dim=0) - agr_agnostic_gamma(benign, p, constraint) * p
    if num_malicious is None:
        raise ValueError("spread > 0 crafts one row per attacker: give num_malicious (the round fills it)")
    offsets = spread_offsets(benign, num_malicious, spread, generator)
    return benign.mean(dim=0) - agr_agnostic_gamma(benign, p, constraint, offsets) * p + offsets


def min_max(
    benign: Tensor,
    perturbation: str = "unit_vec",
    spread: float = 0.0,
    num_malicious: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Min-Max (Shejwalkar and Houmansadr, NDSS 2021), ``[d]``, sent by all attackers:
    ``m = mean(B) - gamma * p`` with the largest ``gamma`` (:func:`agr_agnostic_gamma`) such that
    ``max_i ||m - B_i||^2 <= max_{i,j} ||B_i - B_j||^2``; ``p`` from :func:`perturbation_vector`.

    ``spread > 0``: attacker ``i`` sends ``m_i = mean(B) - gamma * p + o_i`` (``[f, d]``, ``o_i`` of
    :func:`spread_offsets`) with the largest ``gamma`` for which EVERY ``m_i`` satisfies the constraint.
    """
    _check_benign(benign)
    return _agr_agnostic_rows(benign, perturbation, min_max_constraint(benign), num_malicious, spread, generator)


def min_sum(
    benign: Tensor,
    perturbation: str = "unit_vec",
    bound: str = "paper",
    spread: float = 0.0,
    num_malicious: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Min-Sum (Shejwalkar and Houmansadr, NDSS 2021), ``[d]``, sent by all attackers:
    ``m = mean(B) - gamma * p`` with the largest ``gamma`` such that
    ``sum_i ||m - B_i||^2 <= max_i sum_j ||B_i - B_j||^2``. ``bound="authors_code"`` uses ``min_i``
    on the right, as the authors' released code does (stricter); the default follows the paper.

    ``spread > 0``: attacker ``i`` sends ``m_i = mean(B) - gamma * p + o_i`` (``[f, d]``, ``o_i`` of
    :func:`spread_offsets`) with the largest ``gamma`` for which EVERY ``m_i`` satisfies the constraint.
    """
    _check_benign(benign)
    constraint = min_sum_constraint(benign, bound)
    return _agr_agnostic_rows(benign, perturbation, constraint, num_malicious, spread, generator)


# ----------------------------------------------------------------------------- data poisoning


def flip_labels(y: Tensor, num_classes: int) -> Tensor:
    """Label flipping: ``l -> L - 1 - l`` (``L = num_classes``); returns a new tensor."""
    if y.is_floating_point() or y.is_complex():
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
    if y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}] for num_classes={num_classes}, "
            f"got range [{y.min().item()}, {y.max().item()}]; pass the dataset's number of classes"
        )
    return num_classes - 1 - y


def add_trigger(x: Tensor, *, size: int = 5, value: float | Tensor | None = None) -> Tensor:
    """Stamp a ``size x size`` square in the bottom-right corner of ``[N, C, H, W]`` images.

    ``value`` is the patch's intensity: a number, a per-channel ``[C]`` tensor, or ``None`` for "max
    intensity", which on normalised data means the per-channel maximum of ``x`` itself. Returns a new
    tensor; ``x`` is not modified.
    """
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty [N, C, H, W] batch of images, got shape {tuple(x.shape)}")
    channels, height, width = x.shape[1:]
    if not 1 <= size <= min(height, width):
        raise ValueError(f"trigger size must be in [1, {min(height, width)}] for {height}x{width} images, got {size}")
    patch = x.amax(dim=(0, 2, 3)) if value is None else torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if patch.numel() not in (1, channels):
        raise ValueError(f"value must be a number or one value per channel ({channels}), got {patch.numel()} values")
    out = x.clone()
    out[:, :, height - size :, width - size :] = patch.reshape(-1, 1, 1)
    return out


# ----------------------------------------------------------------------------- attack objects


class Attack:
    """Honest behaviour; subclasses override what they change.

    ``target_class`` is set only by backdoor attacks; the simulator then measures the ASR with
    :meth:`add_trigger`. ``needs_attacker_data`` asks :func:`skymask_lite.fl.round_context` for the
    attackers' own data (``ctx.attacker_x``, ``ctx.attacker_y``); only :class:`AdaptiveSkyMask` does.
    """

    name: str = "none"
    target_class: int | None = None
    needs_attacker_data: bool = False

    def require(self, num_clients: int, num_malicious: int) -> None:
        """Raise a ``ValueError`` unless the attack can run with ``n`` clients, ``f`` of them
        malicious. Honest behaviour and data poisoning run with any."""

    def poison_data(self, x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Applied once, at setup, to each malicious client's local data. Honest: unchanged."""
        return x, y

    def add_trigger(self, x: Tensor) -> Tensor:
        """The backdoor trigger; only backdoor attacks have one."""
        raise NotImplementedError(f"the {self.name!r} attack has no trigger; only backdoor attacks stamp one")

    def __call__(self, updates: Tensor, ctx: RoundContext) -> Tensor:
        """``[n, d] -> [n, d]``; only the rows ``ctx.malicious`` may change. Honest: unchanged."""
        return updates


class LabelFlip(Attack):
    """Label flipping ``l -> L - 1 - l`` on the attackers' data (:func:`flip_labels`); honest training."""

    name = "label_flip"

    def __init__(self, num_classes: int = 10) -> None:
        self.num_classes = num_classes

    def poison_data(self, x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return x, flip_labels(y, self.num_classes)


class Backdoor(Attack):
    """Backdoor with model replacement (Bagdasaryan et al., AISTATS 2020).

    Data: the trigger (:func:`add_trigger`) is stamped on a ``share`` of each attacker's examples
    (a seeded choice) and those are relabelled ``target_class``; the attackers train honestly on it.
    Server side: the attackers' updates ``delta`` are scaled by ``gamma`` so that their share of the
    FedAvg step replaces the global model: ``eta * (f / n) * gamma * delta = delta`` gives
    ``gamma = n / (f * eta)`` with ``eta`` the server's learning rate (``ctx.global_lr``). With
    ``eta = 1`` this is the ``n / f`` of the specification; ``scale`` overrides ``gamma``.
    """

    name = "backdoor"

    def __init__(
        self,
        share: float = 0.5,
        target_class: int = 0,
        size: int = 5,
        value: float | None = None,
        scale: float | None = None,
    ) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share is the fraction of an attacker's examples to poison, in (0, 1]; got {share}")
        if target_class < 0:
            raise ValueError(f"target_class must be a class index >= 0, got {target_class}")
        if scale is not None and scale <= 0:
            raise ValueError(
                f"scale multiplies the attackers' updates and must be > 0 (or None for n / (f * eta)); got {scale}"
            )
        self.share, self.target_class, self.size, self.value, self.scale = share, target_class, size, value, scale

    def add_trigger(self, x: Tensor) -> Tensor:
        return add_trigger(x, size=self.size, value=self.value)

    def poison_data(self, x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        count = round(self.share * len(y))
        if count == 0:
            return x, y
        chosen = torch.randperm(len(y), generator=generator)[:count].to(y.device)
        value = x.amax(dim=(0, 2, 3)) if self.value is None else self.value
        x, y = x.clone(), y.clone()
        x[chosen] = add_trigger(x[chosen], size=self.size, value=value)
        y[chosen] = self.target_class
        return x, y

    def __call__(self, updates: Tensor, ctx: RoundContext) -> Tensor:
        if ctx.num_malicious == 0:
            return updates
        gamma = self.scale if self.scale is not None else ctx.num_clients / (ctx.num_malicious * ctx.global_lr)
        mal = ctx.malicious.to(updates.device)
        out = updates.clone()
        out[mal] = updates[mal] * gamma
        return out


_CHOICES = {"perturbation": PERTURBATIONS, "bound": MIN_SUM_BOUNDS}  # checked at construction, not at round 1


class ModelPoisoning(Attack):
    """A crafting function bound to its options; the attackers' rows are replaced by its output.

    ``knowledge="full"``: the function sees the honest clients' updates (``ctx.benign``);
    ``"partial"``: only the attackers' own honest updates (``ctx.malicious``). The function's
    parameters named like a round-context field (``num_malicious``, ``num_clients``,
    ``generator``) are read from the round; the others are ``options``. ``condition`` is the
    attack's own condition on ``n`` and ``f`` (:meth:`require`), ``None`` if it has none.
    """

    def __init__(
        self,
        name: str,
        craft: Callable[..., Tensor],
        condition: Condition | None = None,
        *,
        knowledge: str = "full",
        **options: Any,
    ) -> None:
        check_options(f"the {name!r} attack", craft, options, extra=("knowledge",))
        if knowledge not in KNOWLEDGE:
            raise ValueError(f"knowledge must be one of {list(KNOWLEDGE)}, got {knowledge!r}")
        for option, choices in _CHOICES.items():
            if option in options and options[option] not in choices:
                raise ValueError(
                    f"{option} must be one of {list(choices)} for the {name!r} attack, got {options[option]!r}"
                )
        self.name, self.craft, self.condition, self.knowledge, self.options = name, craft, condition, knowledge, options
        self.context_args = context_parameters(craft)

    def require(self, num_clients: int, num_malicious: int) -> None:
        """Raise a ``ValueError`` unless ``n`` and ``f`` satisfy the attack's condition (none
        without attackers: nothing is crafted)."""
        if self.condition is not None and num_malicious > 0:
            self.condition.check(num_clients, num_malicious)

    def __call__(self, updates: Tensor, ctx: RoundContext) -> Tensor:
        if ctx.num_malicious == 0:
            return updates
        mal = ctx.malicious.to(updates.device)
        seen = ctx.benign if self.knowledge == "full" else ctx.malicious
        context = {arg: getattr(ctx, arg) for arg in self.context_args}
        crafted = self.craft(updates[seen.to(updates.device)], **context, **self.options)
        out = updates.clone()
        out[mal] = crafted
        return out


class AdaptiveSkyMask(Attack):
    """An attack that knows SkyMask (not in the paper; the book's "beyond" chapter): Min-Max whose
    ``gamma`` is the largest one that a SIMULATED SkyMask still keeps.

    Threat model: the ``f`` attackers know SkyMask (``tau``, the mask-training schedule, the
    clustering rule, all at the defense's defaults unless ``tau`` is given), the global model and
    their own honest updates ``H`` (``[f, d]``, partial knowledge) and data; NOT the server's root
    set nor the honest clients' updates. Each round they simulate the server's SkyMask
    (:func:`~skymask_lite.skymask.skymask` itself) on their estimate of the round:

    * clients: their own honest rows ``H`` (standing for the honest clients) and the candidate
      rows ``m_i(gamma) = mean(H) - gamma * p + o_i`` (``p`` of :func:`perturbation_vector` on ``H``,
      ``o_i`` of :func:`spread_offsets` with ``spread``, so that the rows do not collapse);
    * root update: ``g0~ = mean(H) * median_i ||H_i|| / ||mean(H)||``. Why: the server's ``g0`` is one
      update with a median client's number of steps on a class-balanced set; the union of the
      attackers' data is closer to balanced than any single client's, so ``mean(H)`` gives the
      direction, and a single client's norm the length (a plain mean would be shrunk by averaging
      non-IID updates). It costs no training;
    * root data: ``ctx.attacker_x, ctx.attacker_y`` (a sample of the attackers' own data, at most
      ``root_size`` examples; :func:`skymask_lite.fl.attacker_sample`).

    A candidate is accepted iff every row satisfies Min-Max's constraint on ``H`` (always applied:
    it is the partial-knowledge Min-Max envelope, and bounds the search) AND the simulated SkyMask
    keeps all ``f`` candidate rows. Search: ``gamma_mm`` = Min-Max's ``gamma`` for the spread rows
    (:func:`agr_agnostic_gamma`); if ``gamma_mm`` is accepted it is the answer (1 simulated SkyMask
    call), else :func:`gamma_search` from ``start = gamma_mm / 2`` with ``tol = gamma_mm / 2^(s+1)``
    (``s = search_steps``), a bisection of ``[0, gamma_mm)`` in ``s`` tests: at most ``1 + s``
    simulated SkyMask calls per round on ``2f`` client rows. If nothing is accepted the attackers send
    ``mean(H) + o_i`` (``gamma = 0``). ``stats`` holds the last round's ``gamma``, ``gamma_min_max``,
    ``calls``, ``trace`` (tested ``(gamma, accepted)`` pairs) and ``seconds``.
    """

    name = "adaptive_skymask"
    needs_attacker_data = True

    def __init__(
        self, perturbation: str = "unit_vec", spread: float = 0.5, search_steps: int = 5, tau: float = 0.5
    ) -> None:
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {list(PERTURBATIONS)}, got {perturbation!r}")
        _check_spread(spread)
        if not isinstance(search_steps, int) or search_steps < 0:
            raise ValueError(
                f"search_steps is the number of bisection tests and must be an int >= 0, got {search_steps!r}"
            )
        if not 0 < tau < 1:
            raise ValueError(f"tau is SkyMask's mask threshold, in (0, 1); got {tau}")
        self.perturbation, self.spread, self.search_steps, self.tau = perturbation, spread, search_steps, tau
        self.stats: dict[str, Any] = {}

    def require(self, num_clients: int, num_malicious: int) -> None:
        """At least two attackers (or none): the spread and Min-Max's bound need two honest rows."""
        if num_malicious == 1:
            raise ValueError(
                "the 'adaptive_skymask' attack needs at least 2 malicious clients (their own honest updates set "
                "Min-Max's bound and the spread); got f=1. Use --num-malicious 2 or more"
            )

    @staticmethod
    def surrogate_root(honest: Tensor) -> Tensor:
        """``g0~ = mean(H) * median_i ||H_i|| / ||mean(H)||`` (see the class docstring), ``[d]``."""
        mean = honest.mean(dim=0)
        return mean * (torch.quantile(honest.norm(dim=1), 0.5) / mean.norm())

    def simulate(self, honest: Tensor, rows: Tensor, ctx: RoundContext) -> Aggregation:
        """The attackers' simulated SkyMask on ``[H; rows]`` with root ``g0~`` and their own data."""
        from .skymask import skymask

        if ctx.attacker_x is None or ctx.attacker_y is None:
            raise ValueError(
                "the 'adaptive_skymask' attack needs the attackers' own data (ctx.attacker_x, ctx.attacker_y); "
                "build the round context with skymask_lite.fl.round_context(..., attacker_data=True)"
            )
        return skymask(
            torch.cat([honest, rows]), net=ctx.net, global_params=ctx.global_params, root_x=ctx.attacker_x,
            root_y=ctx.attacker_y, root_update=self.surrogate_root(honest), global_buffers=ctx.global_buffers,
            tau=self.tau,
        )

    def kept_by_simulation(self, honest: Tensor, rows: Tensor, ctx: RoundContext) -> bool:
        """Whether the simulated SkyMask keeps every candidate row (positions ``f .. 2f - 1``)."""
        kept = set(self.simulate(honest, rows, ctx).kept.tolist())
        return all(honest.shape[0] + i in kept for i in range(rows.shape[0]))

    def __call__(self, updates: Tensor, ctx: RoundContext) -> Tensor:
        if ctx.num_malicious == 0:
            return updates
        self.require(ctx.num_clients, ctx.num_malicious)
        start = time.perf_counter()
        mal = ctx.malicious.to(updates.device)
        honest = updates[mal]  # H, [f, d]
        p = perturbation_vector(honest, self.perturbation)
        offsets = (
            spread_offsets(honest, ctx.num_malicious, self.spread, ctx.generator)
            if self.spread > 0 else torch.zeros_like(honest)
        )
        mean, in_envelope = honest.mean(dim=0), min_max_constraint(honest)
        gamma_mm = agr_agnostic_gamma(honest, p, in_envelope, offsets if self.spread > 0 else None)
        calls = 0

        def accept(gamma: float) -> bool:  # Min-Max's constraint on every row, then the simulated SkyMask
            nonlocal calls
            rows = mean - gamma * p + offsets
            if not in_envelope(rows):
                return False
            calls += 1
            return self.kept_by_simulation(honest, rows, ctx)

        trace = [(gamma_mm, accept(gamma_mm))]
        if trace[0][1]:
            gamma = gamma_mm
        else:
            gamma, more = gamma_search(accept, start=gamma_mm / 2, tol=gamma_mm / 2 ** (self.search_steps + 1))
            trace += more
        out = updates.clone()
        out[mal] = mean - gamma * p + offsets
        self.stats = {
            "gamma": gamma, "gamma_min_max": gamma_mm, "calls": calls, "trace": trace,
            "seconds": time.perf_counter() - start,
        }
        return out


def _checked(cls: type[Attack]) -> Callable[..., Attack]:
    """Factory ``(**options) -> cls(**options)`` whose options are checked by the binder."""

    def factory(**options: Any) -> Attack:
        check_options(f"the {cls.name!r} attack", cls, options, skip=0, reads_context=False)
        return cls(**options)

    return factory


#: Attack name -> factory taking the attack's options as keywords (see :func:`make_attack`).
ATTACKS: dict[str, Callable[..., Attack]] = {
    "none": _checked(Attack),
    "label_flip": _checked(LabelFlip),
    "gaussian": partial(ModelPoisoning, "gaussian", gaussian),
    "sign_flip": partial(ModelPoisoning, "sign_flip", sign_flip),
    "lie": partial(ModelPoisoning, "lie", lie, LIE_CONDITION),
    "fang_trim": partial(ModelPoisoning, "fang_trim", fang_trim),
    "fang_krum": partial(ModelPoisoning, "fang_krum", fang_krum, FANG_KRUM_CONDITION),
    "min_max": partial(ModelPoisoning, "min_max", min_max),
    "min_sum": partial(ModelPoisoning, "min_sum", min_sum),
    "backdoor": _checked(Backdoor),
    "adaptive_skymask": _checked(AdaptiveSkyMask),
}


def make_attack(name: str, **options: Any) -> Attack:
    """The attack ``name`` of :data:`ATTACKS` with its ``options``; clear errors for unknown
    ones. ``attack.require(n, f)`` then checks the attack's condition on ``n`` and ``f``."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known attacks: {sorted(ATTACKS)}")
    return ATTACKS[name](**options)
