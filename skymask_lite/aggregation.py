"""The result of an aggregation rule, and how a pure rule is bound to a round.

Every rule in :mod:`skymask_lite.defenses` (and :func:`skymask_lite.skymask.skymask`) is a
pure function ``rule(updates, *, ...) -> Aggregation`` on the ``[n, d]`` update matrix.
:class:`BoundRule` binds such a function to its options and to the fields of a
:class:`~skymask_lite.context.RoundContext` it needs, so that the simulator can call every
defence the same way: ``defense(updates, ctx)``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .context import RoundContext

__all__ = [
    "Aggregation", "BoundRule", "check_updates", "nonfinite_rows",
]


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


@dataclass
class BoundRule:
    """A pure rule with its options and the context fields it reads.

    ``BoundRule(krum, ("num_malicious",), {"m": 5})(updates, ctx)`` calls
    ``krum(updates, num_malicious=ctx.num_malicious, m=5)``.
    """

    rule: Callable[..., Aggregation]
    context_args: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        params = inspect.signature(self.rule).parameters
        unknown = sorted(set(self.options) - set(params))
        if unknown:
            allowed = sorted(set(params) - {"updates", *self.context_args})
            raise ValueError(
                f"unknown option(s) {unknown} for {self.rule.__name__}; it accepts {allowed}"
            )

    @property
    def needs_root_update(self) -> bool:
        """True if the server must compute its own root update ``g0`` each round."""
        return "root_update" in self.context_args

    def __call__(self, updates: torch.Tensor, ctx: RoundContext) -> Aggregation:
        kwargs = {name: getattr(ctx, name) for name in self.context_args}
        return self.rule(updates, **kwargs, **self.options)
