"""What an attack or an aggregation rule may see in one federated round.

The simulator (:mod:`skymask_lite.fl`) builds one :class:`RoundContext` per round with
:func:`skymask_lite.fl.round_context` and hands it to the attack and to the defence. Neither
reaches back into the simulator: everything the threat model allows them to know is a field here.
Toy examples that have no federation build theirs with :func:`toy_context`.

Sign convention of the whole package (one row of the ``[n, d]`` update matrix)::

    delta_i = w_i_after_local_training - w_global
    w_global <- w_global + global_lr * aggregate(delta)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["LocalRecipe", "RoundContext", "toy_context"]


@dataclass(frozen=True)
class LocalRecipe:
    """Clients' local training: plain SGD, ``epochs`` passes over the local data in mini-batches
    of ``batch_size``. The defaults are the book's Fashion-MNIST recipe (README, "Recipe").

    ``grad_clip`` clamps every gradient element to ``[-grad_clip, grad_clip]`` (the authors'
    scripts use 0.01 with ``lr = 0.5``); ``None`` disables it.
    """

    lr: float = 0.1
    batch_size: int = 16
    epochs: int = 1
    grad_clip: float | None = None


@dataclass
class RoundContext:
    """The round's shared facts.

    Attributes:
        round: 1-based round number.
        num_clients: ``n``, the number of updates the server receives.
        num_malicious: ``f``, the (assumed known) number of malicious clients.
        malicious: long tensor of the malicious clients' row indices. Attacks read it;
            defences must not (it is the ground truth used only by the metrics).
        net: the model architecture, used as a template with
            :func:`torch.func.functional_call`; its own parameters are not the global model.
        global_params: the global model's parameters as a flat ``[d]`` vector.
        global_buffers: the global model's buffers (BatchNorm statistics), by name.
        root_x, root_y: the server's clean root dataset (``root_size`` examples).
        root_update: the server's own update ``g0`` on the root data (FLTrust, SkyMask),
            or ``None`` when the defence does not need it.
        recipe: the clients' local training (:class:`LocalRecipe`; the attacker knows it).
        global_lr: the server's learning rate ``eta`` (a full-knowledge attacker knows it).
        num_classes: ``L``.
        generator: a seeded :class:`torch.Generator` for this round's randomness
            (attacks' draws, FLAME's noise). On the CPU.
        attacker_x, attacker_y: a seeded sample of the malicious clients' own local data (at most
            as many examples as the root set), for attacks that simulate the server on their own
            data (``needs_attacker_data``); ``None`` otherwise. Defences must not read them.
    """

    round: int
    num_clients: int
    num_malicious: int
    malicious: torch.Tensor
    net: nn.Module
    global_params: torch.Tensor
    global_buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    root_x: torch.Tensor | None = None
    root_y: torch.Tensor | None = None
    root_update: torch.Tensor | None = None
    recipe: LocalRecipe = field(default_factory=LocalRecipe)
    global_lr: float = 2.0
    num_classes: int = 10
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    attacker_x: torch.Tensor | None = None
    attacker_y: torch.Tensor | None = None

    @property
    def benign(self) -> torch.Tensor:
        """Row indices of the honest clients (complement of ``malicious``), on ``malicious``' device."""
        is_mal = torch.zeros(self.num_clients, dtype=torch.bool, device=self.malicious.device)
        is_mal[self.malicious] = True
        return torch.nonzero(~is_mal).flatten()


def toy_context(
    num_clients: int,
    num_malicious: int,
    *,
    global_params: torch.Tensor,
    malicious: torch.Tensor | None = None,
    round: int = 1,
    global_lr: float = 2.0,
    seed: int = 0,
    net: nn.Module | None = None,
) -> RoundContext:
    """A context for updates that come from no federation (the chapters' toy examples).

    The malicious clients are ``malicious`` (default: the first ``num_malicious`` rows); the
    model template is ``net`` (default: ``nn.Identity()``, for rules and attacks that never
    evaluate a model); the round's generator is seeded with ``seed``.
    """
    if malicious is None:
        malicious = torch.arange(num_malicious, device=global_params.device)
    return RoundContext(
        round=round,
        num_clients=num_clients,
        num_malicious=num_malicious,
        malicious=malicious,
        net=nn.Identity() if net is None else net,
        global_params=global_params,
        global_lr=global_lr,
        generator=torch.Generator().manual_seed(seed),
    )
