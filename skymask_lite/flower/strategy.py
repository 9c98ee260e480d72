"""The book's defences as Flower strategies, and full-knowledge attacks as a strategy wrapper.

Flower's Message API (``flwr.serverapp.strategy``): every round the strategy's
``configure_train(server_round, arrays, config, grid)`` sends the global model to the sampled
clients and ``aggregate_train(server_round, replies)`` returns the new global model and the
round's metrics. Flower clients send their trained weights ``w_i``; the strategies here keep the
global model ``w`` they sent and form the updates ``U_i = w_i - w`` (rows ordered by the
clients' ``partition-id``), so every rule of :mod:`skymask_lite.defenses` and
:func:`skymask_lite.skymask.skymask` runs unchanged on the ``[n, d]`` update matrix.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch

from . import require_flower

require_flower()

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.serverapp.strategy import FedAvg, Strategy  # noqa: E402

from ..aggregation import Aggregation, nonfinite_rows  # noqa: E402
from ..attacks import Attack  # noqa: E402
from ..context import RoundContext  # noqa: E402
from ..defenses import make_defense  # noqa: E402
from ..fl import (  # noqa: E402
    ROOT_STREAM,
    Federation,
    State,
    derive_seed,
    evaluate,
    round_context,
    server_step,
    train_root,
)
from ..metrics import detection_rates  # noqa: E402
from ..models import float_buffers, num_params, unflatten  # noqa: E402

__all__ = [
    "AttackWrapper",
    "DefenseStrategy",
    "FLTrustStrategy",
    "SkyMaskStrategy",
    "from_arrays",
    "modifies_updates",
    "replies_by_partition",
    "round_context_of",
    "to_arrays",
    "updates_of",
]


def to_arrays(params: torch.Tensor, buffers: dict[str, torch.Tensor], net: torch.nn.Module) -> ArrayRecord:
    """A model as Flower's ``ArrayRecord``: ``net``'s parameters by name (cut from the flat
    ``[d]`` vector ``params``), then its float ``buffers``."""
    if params.shape != (num_params(net),):
        raise ValueError(
            f"params must be the flat [{num_params(net)}] parameters of the model, got shape {tuple(params.shape)}"
        )
    return ArrayRecord.from_torch_state_dict({**unflatten(params, net), **buffers})


def from_arrays(
    record: ArrayRecord, net: torch.nn.Module, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The flat parameters ``[d]`` and the float buffers of a model sent as an ``ArrayRecord``
    (the inverse of :func:`to_arrays`), on ``device``."""
    names = [name for name, _ in net.named_parameters()] + list(float_buffers(net))
    missing = [name for name in names if name not in record]
    if missing:
        raise ValueError(
            f"the ArrayRecord lacks {missing[:3]}{'...' if len(missing) > 3 else ''} of the model; "
            "client and server must build the same model (same --model and --dataset)"
        )
    state = {name: torch.from_numpy(record[name].numpy().copy()) for name in names}
    params = torch.cat([state[name].reshape(-1) for name, _ in net.named_parameters()]).to(device)
    return params, {name: state[name].to(device) for name in float_buffers(net)}


def replies_by_partition(replies: Iterable[Message]) -> list[tuple[int, Message]]:
    """The replies without errors as ``(partition-id, message)``, sorted by partition id (the
    row order of the update matrix)."""
    found = []
    for msg in replies:
        if msg.has_error():
            continue
        metrics = next(iter(msg.content.metric_records.values()), None)
        if metrics is None or "partition-id" not in metrics:
            raise ValueError(
                f"the reply of node {msg.metadata.src_node_id} has no 'partition-id' metric; "
                "the ClientApp must report its partition id (skymask_lite.flower.apps.client_app does)"
            )
        found.append((int(metrics["partition-id"]), msg))
    ids = [pid for pid, _ in found]
    if len(set(ids)) != len(ids):
        raise ValueError(f"two replies carry the same partition id: {sorted(ids)}")
    return sorted(found, key=lambda pair: pair[0])


def updates_of(
    messages: list[Message], global_params: torch.Tensor, net: torch.nn.Module
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``U_i = w_i - w`` of the replies (rows in ``messages``' order), ``[n, d]``, and their
    buffers ``{name: [n, ...]}``."""
    models = [from_arrays(next(iter(m.content.array_records.values())), net, global_params.device) for m in messages]
    updates = torch.stack([params for params, _ in models]) - global_params
    names = models[0][1]
    return updates, {name: torch.stack([b[name] for _, b in models]) for name in names}


def round_context_of(fed: Federation, state: State, ids: torch.Tensor) -> RoundContext:
    """The simulator's round context (:func:`skymask_lite.fl.round_context`) for the clients that
    replied: ``num_clients`` is the number of replies, ``malicious`` the rows of the malicious
    ones among them and ``num_malicious`` their number (with every client replying, exactly the
    simulator's context)."""
    ctx = round_context(fed, state)
    ctx.num_clients = len(ids)
    ctx.malicious = torch.nonzero(torch.isin(ids, fed.malicious.cpu())).flatten().to(fed.malicious.device)
    ctx.num_malicious = len(ctx.malicious)
    return ctx


def modifies_updates(attack: Attack) -> bool:
    """True if ``attack`` rewrites updates (model poisoning, scaled backdoors), i.e. needs the
    :class:`AttackWrapper`; data-poisoning attacks act in the ClientApp alone."""
    return type(attack).__call__ is not Attack.__call__


def _metric_record(record: dict[str, Any]) -> MetricRecord:
    """The numeric entries of a round's record as a Flower ``MetricRecord`` (``defense_info``
    flattened to ``defense_info.<key>``; ``None`` and non-numeric entries left out)."""
    flat = {k: v for k, v in record.items() if k not in ("defense_info", "timing")}
    flat.update({f"defense_info.{k}": v for k, v in record.get("defense_info", {}).items()})

    def numeric(v: Any) -> bool:
        if isinstance(v, list):
            return len(v) > 0 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    return MetricRecord({k: v for k, v in flat.items() if numeric(v)})


class DefenseStrategy(FedAvg):
    """A defence of :mod:`skymask_lite.defenses` (SkyMask, FLTrust, ...) as a Flower strategy.

    ``configure_train`` keeps the global model ``w`` it sends; ``aggregate_train`` forms
    ``U_i = w_i - w`` from the replies (rows by partition id), trains the server's root update
    ``g0`` on the root data when the defence needs it (``(seed, round, ROOT_STREAM)`` batches,
    as in the simulator), calls ``defense(U, ctx)`` and steps ``w <- w + global_lr * update``
    (:func:`skymask_lite.fl.server_step`). Each round's record (``kept`` as partition ids,
    ``fpr``, ``fnr``, ``defense_info``, timing; ``test_acc`` once :meth:`evaluate_global` ran)
    is appended to ``records`` and returned as the round's ``MetricRecord``.

    Args:
        defense: ``defense(updates, ctx) -> Aggregation``, e.g. ``make_defense("skymask")``.
        fed: the server's view of the federation: model template, root and test data, recipe,
            ``global_lr``, seed. ``fed.malicious`` (partition ids) is used only to score FPR/FNR.
        attack: the run's attack, used only to measure a backdoor's success rate.
        **fedavg_options: Flower ``FedAvg`` options (``fraction_train``, ``min_train_nodes``, ...).
    """

    def __init__(self, defense: Any, fed: Federation, *, attack: Attack | None = None, **fedavg_options: Any) -> None:
        super().__init__(**fedavg_options)
        self.defense, self.fed, self.attack = defense, fed, attack
        self.records: list[dict[str, Any]] = []
        self.attack_seconds = 0.0  # set by an AttackWrapper around this strategy
        self.attack_rounding: float | None = None  # likewise (see AttackWrapper)
        self._state: State | None = None
        self._sent = 0.0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Keep the global model ``w`` of this round, then sample and send as ``FedAvg`` does."""
        params, buffers = from_arrays(arrays, self.fed.net, self.fed.test[0].device)
        self._state = State(params, buffers, round=server_round - 1)
        self._sent = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def root_update(self, state: State) -> torch.Tensor:
        """The server's ``g0`` of round ``state.round + 1``: ``fed.root_update_steps`` SGD steps of
        the clients' recipe on the root data (:func:`skymask_lite.fl.train_root`)."""
        fed = self.fed
        seed = derive_seed(fed.seed, state.round + 1, ROOT_STREAM)
        return train_root(fed.net, state.params, *fed.root, fed.recipe, fed.root_update_steps, seed, state.buffers)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """``U = [w_i - w]``, ``g0``, ``defense(U, ctx)``, ``w <- w + global_lr * update``."""
        if self._state is None or self._state.round != server_round - 1:
            raise RuntimeError(f"aggregate_train of round {server_round} before its configure_train")
        t1 = time.perf_counter()
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:  # nobody answered: FedAvg's behaviour, the global model stays
            return None, None
        pairs = replies_by_partition(valid)
        ids = torch.tensor([pid for pid, _ in pairs])
        state = self._state
        updates, buffers = updates_of([m for _, m in pairs], state.params, self.fed.net)
        bad = nonfinite_rows(updates)
        if bad:
            raise FloatingPointError(
                f"round {server_round}: the updates of partitions {ids[bad].tolist()} contain NaN or Inf; "
                "lower the local learning rate (--local-lr) or clip gradients (--grad-clip)"
            )
        ctx = round_context_of(self.fed, state, ids)
        g0 = self.root_update(state) if getattr(self.defense, "needs_root_update", False) else None
        t2 = time.perf_counter()
        ctx.root_update = g0
        agg: Aggregation = self.defense(updates, ctx)
        t3 = time.perf_counter()
        server_step(self.fed, state, agg, buffers)
        record: dict[str, Any] = {"round": server_round, "kept": ids[agg.kept.cpu()].tolist()}
        record.update(detection_rates(agg.kept, ctx.malicious, len(ids)))
        record["defense_info"] = agg.stats
        record["replied"] = ids.tolist()
        if self.attack_rounding is not None:
            record["attack_rounding"] = self.attack_rounding
        record["timing"] = {"clients": t1 - self._sent - self.attack_seconds + (t2 - t1), "attack": self.attack_seconds,
                            "defense": t3 - t2}
        self.records.append(record)
        return to_arrays(state.params, state.buffers, self.fed.net), _metric_record(record)

    def evaluate_global(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: the test accuracy (and a backdoor's success rate) of the
        global model after round ``server_round``, added to that round's record."""
        if server_round == 0 or not self.records or self.records[-1]["round"] != server_round:
            return None  # before training, or a round without replies: nothing to add to
        t0 = time.perf_counter()
        params, buffers = from_arrays(arrays, self.fed.net, self.fed.test[0].device)
        metrics = evaluate(self.fed, State(params, buffers, server_round), self.attack)
        record = self.records[-1]
        record.update(metrics)
        record["timing"]["eval"] = time.perf_counter() - t0
        record["seconds"] = time.perf_counter() - self._sent
        return MetricRecord(metrics)


class SkyMaskStrategy(DefenseStrategy):
    """SkyMask (Yan et al., ECCV 2024) as a Flower strategy: :class:`DefenseStrategy` with
    :func:`skymask_lite.skymask.skymask` and its ``options`` (``steps``, ``criterion``, ...)."""

    def __init__(self, fed: Federation, *, options: dict[str, Any] | None = None, attack: Attack | None = None,
                 **fedavg_options: Any) -> None:
        super().__init__(make_defense("skymask", **(options or {})), fed, attack=attack, **fedavg_options)


class FLTrustStrategy(DefenseStrategy):
    """FLTrust (Cao et al., NDSS 2021), which Flower does not ship, as a Flower strategy:
    :class:`DefenseStrategy` with :func:`skymask_lite.defenses.fltrust`."""

    def __init__(self, fed: Federation, *, attack: Attack | None = None, **fedavg_options: Any) -> None:
        super().__init__(make_defense("fltrust"), fed, attack=attack, **fedavg_options)


class AttackWrapper(Strategy):
    """A strategy wrapper that lets the malicious clients collude: it rewrites their replies
    before the wrapped strategy (the defence) sees them.

    Attacks such as Min-Max, Fang or LIE craft the malicious updates from every client's
    update, which no single ClientApp can see. The wrapper plays the colluding attackers at the
    server's door, like Flower's differential-privacy wrappers wrap a strategy: it forms
    ``U = [w_i - w]`` of the replies, calls ``attack(U, ctx)`` with the simulator's round
    context (:func:`round_context_of`), and replaces each malicious reply whose update changed by
    the weights ``w + U'_i``. It works around any Flower strategy (Flower's own ``Krum`` too).

    Weights are what a Flower client sends, so the server receives ``fl(w + U'_i) - w``, not
    ``U'_i``: the attackers' updates are rounded, by at most about half a float32 ulp of ``w``.
    Around a :class:`DefenseStrategy` the largest such change of a round is recorded as
    ``attack_rounding``. It is the one place where a Flower run can differ from the simulator's
    (whose attackers send ``U'_i`` itself), and only in rounds whose aggregate uses an attacker.

    Args:
        strategy: the wrapped strategy (a :class:`DefenseStrategy` or any Flower strategy).
        attack: the attack, ``attack(updates, ctx) -> updates``.
        fed: the federation as the attackers know it (model template, recipe, seed, and who
            the malicious clients are).
    """

    def __init__(self, strategy: Strategy, attack: Attack, fed: Federation) -> None:
        super().__init__()
        self.strategy, self.attack, self.fed = strategy, attack, fed
        self._state: State | None = None

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Keep the global model, then let the wrapped strategy configure the round."""
        params, buffers = from_arrays(arrays, self.fed.net, self.fed.test[0].device)
        self._state = State(params, buffers, round=server_round - 1)
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Rewrite the malicious replies with the attack's updates, then aggregate as the wrapped
        strategy does."""
        replies = list(replies)
        t0 = time.perf_counter()
        rounding = 0.0
        pairs = replies_by_partition(replies)
        if pairs and self._state is not None:
            ids = torch.tensor([pid for pid, _ in pairs])
            messages = [m for _, m in pairs]
            updates, _ = updates_of(messages, self._state.params, self.fed.net)
            ctx = round_context_of(self.fed, self._state, ids)
            crafted = self.attack(updates, ctx)
            for row in ctx.malicious.tolist():
                if torch.equal(crafted[row], updates[row]):
                    continue
                content = messages[row].content
                key = next(iter(content.array_records))
                _, buffers = from_arrays(content[key], self.fed.net, self._state.params.device)
                content[key] = to_arrays(self._state.params + crafted[row], buffers, self.fed.net)
                received = from_arrays(content[key], self.fed.net, self._state.params.device)[0] - self._state.params
                rounding = max(rounding, (received - crafted[row]).abs().max().item())
        if isinstance(self.strategy, DefenseStrategy):
            self.strategy.attack_seconds = time.perf_counter() - t0
            self.strategy.attack_rounding = rounding
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's federated evaluation."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The wrapped strategy's federated evaluation."""
        return self.strategy.aggregate_evaluate(server_round, replies)
