"""The result of an aggregation rule, a rule's robustness condition, and the one binder that
hands a rule or an attack what it reads from the round.

Every rule in :mod:`skymask_lite.defenses` (and :func:`skymask_lite.skymask.skymask`) is a
pure function ``rule(updates, *, ...) -> Aggregation`` on the ``[n, d]`` update matrix, and
every crafting function of :mod:`skymask_lite.attacks` is ``craft(benign, ...) -> rows``.
A function takes only what it uses. Its parameters named like a field of
:class:`~skymask_lite.context.RoundContext` (``num_malicious``, ``global_params``,
``root_update``, ``net``, ``root_x``, ``generator``, ...) are filled from the round's context
by name; all its other parameters are options, fixed once. :func:`context_parameters` and
:func:`check_options` read the signature; :class:`BoundRule` binds a rule so that the
simulator calls every defense the same way: ``defense(updates, ctx)``.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .context import RoundContext

__all__ = [
    "Aggregation",
    "BoundRule",
    "CONTEXT_FIELDS",
    "Condition",
    "check_options",
    "check_updates",
    "context_parameters",
    "nonfinite_rows",
]

#: The names a rule's or an attack's parameter may take to be filled from the round's context.
CONTEXT_FIELDS: frozenset[str] = frozenset(f.name for f in dataclasses.fields(RoundContext))


@dataclass
class Aggregation:
    """What a rule returns.

    Attributes:
        update: the aggregated update, ``[d]``; the server applies
            ``w <- w + global_lr * update``.
        kept: long tensor of the client indices whose updates were used (all of them
            for rules that select nobody, e.g. the coordinate-wise median). Detection
            metrics (FPR/FNR) are computed from it.
        info: rule-specific diagnostics (scores, clusters, tensors), for plots and tests.
        stats: the rule's decision statistics, small and JSON-safe (numbers, short lists):
            what it decided with (SkyMask's number of clusters and Ashman's D, FLTrust's trust
            scores summarised, ...). The simulator records them in every round record as
            ``defense_info``.
    """

    update: torch.Tensor
    kept: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


def nonfinite_rows(updates: torch.Tensor) -> list[int]:
    """Indices of the rows of ``[n, d]`` ``updates`` that hold a NaN or an Inf.

    A NaN or Inf entry makes its row's sum NaN or Inf, so finite row sums prove every entry
    finite with one read-only pass; only a non-finite sum (or a finite overflow) needs the exact check.
    """
    if bool(torch.isfinite(updates.sum(dim=1)).all()):
        return []
    return torch.nonzero(~torch.isfinite(updates).all(dim=1)).flatten().tolist()


def check_updates(updates: torch.Tensor) -> None:
    """Raise a clear error unless ``updates`` is a finite floating ``[n, d]`` tensor."""
    if not isinstance(updates, torch.Tensor) or updates.dim() != 2:
        shape = tuple(updates.shape) if isinstance(updates, torch.Tensor) else type(updates).__name__
        raise ValueError(f"updates must be a [n, d] tensor (one row per client), got {shape}")
    if not updates.is_floating_point():
        raise ValueError(f"updates must be floating point, got dtype {updates.dtype}")
    if updates.shape[0] == 0:
        raise ValueError("updates is empty: the server received no client update")
    bad = nonfinite_rows(updates)
    if bad:
        raise ValueError(f"updates of clients {bad} contain NaN or Inf; drop or repair them first")


# ----------------------------------------------------------------------------- the binder


def _parameters(fn: Callable[..., Any], skip: int) -> list[inspect.Parameter]:
    """``fn``'s named parameters after its first ``skip`` (the data: ``updates`` or ``benign``)."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    return [p for p in params if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]


def context_parameters(fn: Callable[..., Any], skip: int = 1) -> tuple[str, ...]:
    """The parameters of ``fn`` (after its first ``skip``) that are filled from the round's
    context: those named like a :class:`~skymask_lite.context.RoundContext` field, in order."""
    return tuple(p.name for p in _parameters(fn, skip) if p.name in CONTEXT_FIELDS)


def check_options(
    what: str,
    fn: Callable[..., Any],
    options: dict[str, Any],
    *,
    skip: int = 1,
    extra: tuple[str, ...] = (),
    reads_context: bool = True,
) -> None:
    """Raise a ``ValueError`` listing the accepted options unless ``options`` fit ``fn``.

    The accepted options are ``fn``'s parameters after its first ``skip`` that are not context
    fields (see :func:`context_parameters`; all of them if not ``reads_context``, e.g. a class
    whose constructor is called once, at setup), plus ``extra`` (options of the wrapper, e.g. an
    attack's ``knowledge``); those without a default must be given. ``what`` names ``fn`` in
    the message (e.g. ``"the 'krum' defense"``).
    """
    params = [p for p in _parameters(fn, skip) if not (reads_context and p.name in CONTEXT_FIELDS)]
    accepted = [p.name for p in params] + list(extra)
    unknown = sorted(set(options) - set(accepted))
    missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in options]
    if unknown or missing:
        problem = f"unknown option(s) {unknown}" if unknown else f"missing option(s) {missing}"
        accepts = f"it accepts {sorted(accepted)}" if accepted else "it takes no options"
        raise ValueError(f"{problem} for {what}; {accepts}")


# ----------------------------------------------------------------------------- robustness conditions


@dataclass(frozen=True)
class Condition:
    """A rule's robustness condition on ``n`` clients of which ``f`` are malicious:
    ``n > slope * f + offset`` (``strict``) or ``n >= slope * f + offset``.

    ``Condition("Krum", 2, 2)`` is Krum's ``n > 2f + 2``. :meth:`check` raises a ``ValueError``
    that names the condition and the fix.
    """

    rule: str
    slope: int
    offset: int = 0
    strict: bool = True

    @property
    def bound(self) -> str:
        """The right-hand side as text, e.g. ``"2f + 2"``."""
        return f"{self.slope}f" + (f" + {self.offset}" if self.offset else "")

    def __str__(self) -> str:
        return f"n {'>' if self.strict else '>='} {self.bound}"

    def holds(self, num_clients: int, num_malicious: int) -> bool:
        """Whether ``n`` clients with ``f`` malicious satisfy the condition."""
        rhs = self.slope * num_malicious + self.offset
        return num_clients > rhs if self.strict else num_clients >= rhs

    def max_malicious(self, num_clients: int) -> int:
        """The largest ``f`` the condition allows for ``n`` clients (``-1`` when none does)."""
        return (num_clients - self.offset - self.strict) // self.slope

    def check(self, num_clients: int, num_malicious: int) -> None:
        """Raise a ``ValueError`` naming the condition and the fix unless it holds."""
        if self.holds(num_clients, num_malicious):
            return
        n, f = num_clients, num_malicious
        fmax = self.max_malicious(n)
        fix = (
            f"Lower num_malicious to at most {fmax} or use more clients."
            if fmax >= 0
            else f"Use at least {self.slope * f + self.offset + self.strict} clients."
        )
        raise ValueError(
            f"{self.rule} needs {self} clients; got n={n}, f={f} ({self.bound} = {self.slope * f + self.offset}). {fix}"
        )


# ----------------------------------------------------------------------------- a bound rule


@dataclass
class BoundRule:
    """A pure rule with its options, its robustness condition and the context fields it reads.

    ``BoundRule(multi_krum, options={"m": 5})(updates, ctx)`` calls
    ``multi_krum(updates, num_malicious=ctx.num_malicious, m=5)``: the rule's parameters named
    like a :class:`~skymask_lite.context.RoundContext` field are read from ``ctx``, the others
    are options (checked here, once). ``context_args`` is read from the signature; when given,
    it must list exactly those fields.

    Attributes:
        rule: the pure rule ``rule(updates, *, ...) -> Aggregation``.
        context_args: the context fields the rule reads.
        options: the rule's other keyword arguments.
        condition: the rule's robustness condition on ``n`` and ``f`` (``None``: it states none).
    """

    rule: Callable[..., Aggregation]
    context_args: tuple[str, ...] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    condition: Condition | None = None

    def __post_init__(self) -> None:
        reads = context_parameters(self.rule)
        if self.context_args is not None and set(self.context_args) != set(reads):
            raise ValueError(
                f"{self.rule.__name__} reads {list(reads)} from the round context (its parameters named like "
                f"RoundContext fields), not {list(self.context_args)}; leave context_args out"
            )
        self.context_args = reads
        check_options(f"the {self.rule.__name__!r} defense", self.rule, self.options)

    @property
    def needs_root_update(self) -> bool:
        """True if the server must compute its own root update ``g0`` each round."""
        return "root_update" in self.context_args

    def require(self, num_clients: int, num_malicious: int) -> None:
        """Raise a ``ValueError`` unless ``n`` and ``f`` satisfy the rule's robustness condition."""
        if self.condition is not None:
            self.condition.check(num_clients, num_malicious)

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> Aggregation:
        self.require(ctx.num_clients, ctx.num_malicious)
        kwargs = {name: getattr(ctx, name) for name in self.context_args}
        return self.rule(updates, **kwargs, **self.options)
