"""What an attack or an aggregation rule may see in one federated round.

The simulator (:mod:`skymask_lite.fl`) builds one :class:`RoundContext` per round and
hands it to the attack and to the defence. Neither reaches back into the simulator:
everything the threat model allows them to know is a field here.

Sign convention of the whole package (one row of the ``[n, d]`` update matrix)::

    delta_i = w_i_after_local_training - w_global
    w_global <- w_global + global_lr * aggregate(delta)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


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
        local_lr, batch_size, local_epochs: the clients' local recipe (the attacker knows it).
        global_lr: the server's learning rate ``eta`` (a full-knowledge attacker knows it).
        num_classes: ``L``.
        generator: a seeded :class:`torch.Generator` for this round's randomness
            (attacks' draws, FLAME's noise). On the CPU.
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
    local_lr: float = 0.1
    batch_size: int = 32
    local_epochs: int = 1
    global_lr: float = 1.0
    num_classes: int = 10
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    @property
    def benign(self) -> torch.Tensor:
        """Row indices of the honest clients (complement of ``malicious``)."""
        is_mal = torch.zeros(self.num_clients, dtype=torch.bool)
        is_mal[self.malicious.cpu()] = True
        return torch.nonzero(~is_mal).flatten()
