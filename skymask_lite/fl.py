"""The federated-learning simulator: local training, the server step, evaluation, the round.

One round (FedAvg, McMahan et al. AISTATS 2017, with a pluggable rule and attack)::

    clients train from w          -> updates U, [n, d]  (U_i = w_i - w)
                                     (and the server's root update g0, if the rule needs it)
    the attack rewrites rows of U -> U'                 (only the malicious rows)
    the defence aggregates U'     -> Aggregation(update [d], kept)
    the server steps              -> w <- w + global_lr * update

Three client engines compute the same updates (to float tolerance, same seeds):

* ``"loop"``: one client after the other, plain SGD on index tensors (no DataLoader).
* ``"parallel"``: the loop's SGD, clients spread over CPU threads (one per core), each client
  on one core with a channels-last copy of the model; the fastest on a CPU (see
  ``benchmarks/``). Bit-identical for any number of threads; it differs from ``"loop"`` only
  by float rounding (another convolution kernel and one thread per client).
* ``"batched"``: all clients at once with :func:`torch.func.vmap` over
  :func:`torch.func.grad` of a :func:`torch.func.functional_call`; the fastest on a GPU.
  Clients with fewer batches are padded with zero-weight examples, so every client's
  loss is the mean over its real examples exactly as in the loop; models with BatchNorm
  carry every client's running statistics as stacked buffers.

Every random choice (batch order) comes from a generator seeded by ``(seed, round, client)``,
so results do not depend on the engine or on the order clients are trained in.
"""

from __future__ import annotations

import copy
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from .aggregation import Aggregation, nonfinite_rows
from .context import LocalRecipe, RoundContext
from .metrics import accuracy, attack_success_rate, detection_rates
from .models import channels_last, flatten_params, float_buffers, load_flat, unflatten

__all__ = [
    "ATTACKER_STREAM", "CLIENT_STREAM", "ENGINES", "POISON_STREAM", "ROOT_STREAM", "ROUND_STREAM", "SUBSET_STREAM",
    "Federation", "LocalTrainingDiverged", "State", "attacker_sample", "check_local_training", "client_batches",
    "client_schedules", "conv_autotune", "cudnn_autotune_enabled", "derive_seed",
    "evaluate", "initial_state", "local_sgd", "phase_clock", "predict", "resolve_engine", "root_batches",
    "root_steps_like_clients", "round_context", "round_updates", "run_round", "server_step", "torch_threads",
    "train_clients",
    "train_clients_batched", "train_clients_loop", "train_clients_parallel", "train_root",
]

# The independent random streams of a run: fl.derive_seed(seed, round, STREAM, ...) for each.
CLIENT_STREAM = 0  # client i's batch order in round t: (seed, t, CLIENT_STREAM, i)
ROUND_STREAM = 1  # the round's generator (attacks' draws, FLAME's noise): (seed, t, ROUND_STREAM)
ROOT_STREAM = 2  # the root update's batch order: (seed, t, ROOT_STREAM)
POISON_STREAM = 3  # attacker i's data poisoning, once: (seed, 0, POISON_STREAM, i)
SUBSET_STREAM = 4  # the training subset of Config.train_size, once: (seed, 0, SUBSET_STREAM)
ATTACKER_STREAM = 5  # the attackers' sample of their own data (RoundContext.attacker_x), once: (seed, 0, 5)


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from ``seed`` and ``keys`` (e.g. round, client) with NumPy's SeedSequence."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


def client_batches(num_examples: int, batch_size: int, epochs: int, generator: torch.Generator) -> list[torch.Tensor]:
    """The mini-batches of one client: a fresh permutation per epoch, cut into ``batch_size``
    chunks (the last one may be smaller)."""
    return [
        chunk
        for _ in range(epochs)
        for chunk in torch.randperm(num_examples, generator=generator).split(batch_size)
    ]


def local_sgd(
    net: nn.Module,
    start: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    batches: list[torch.Tensor],
    recipe: LocalRecipe,
    buffers: dict[str, torch.Tensor] | None = None,
    nhwc: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SGD on ``(x, y)`` from the flat parameters ``start``; returns the update
    ``w_local - start`` (``[d]``) and the final float buffers.

    ``w <- w - lr * clamp(grad_w CE(f_w(x_b), y_b))`` for each batch ``b``; cross-entropy over
    the class dimension, mean over the batch. ``nhwc`` feeds image batches in
    channels-last memory order (for a ``net`` converted with ``.to(memory_format=...)``).
    """
    load_flat(net, start, buffers)
    net.train()
    params = list(net.parameters())
    for idx in batches:
        idx = idx.to(x.device)
        xb = x[idx]
        if nhwc and xb.dim() == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(net(xb), y[idx])
        grads = torch.autograd.grad(loss, params)
        if recipe.grad_clip is not None:
            grads = [g.clamp_(-recipe.grad_clip, recipe.grad_clip) for g in grads]
        with torch.no_grad():
            torch._foreach_add_(params, grads, alpha=-recipe.lr)
    update = flatten_params(net) - start
    return update, float_buffers(net)


def client_schedules(data: list[tuple[torch.Tensor, torch.Tensor]], recipe: LocalRecipe, seeds: list[int]) -> list[list[torch.Tensor]]:
    """Every client's mini-batches (:func:`client_batches`), client ``i`` drawn from ``seeds[i]``."""
    return [
        client_batches(len(y), recipe.batch_size, recipe.epochs, torch.Generator().manual_seed(seed))
        for (_, y), seed in zip(data, seeds)
    ]


def train_clients_loop(
    net: nn.Module,
    global_params: torch.Tensor,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    recipe: LocalRecipe,
    schedules: list[list[torch.Tensor]],
    global_buffers: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Train every client on its mini-batches ``schedules[i]``, one after the other; returns
    updates ``[n, d]`` and buffers ``{name: [n, ...]}``."""
    results = [
        local_sgd(net, global_params, x, y, batches, recipe, global_buffers) for (x, y), batches in zip(data, schedules)
    ]
    return _stack_clients(results)


def _stack_clients(
    results: list[tuple[torch.Tensor, dict[str, torch.Tensor]]],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-client ``(update, buffers)`` pairs -> updates ``[n, d]`` and buffers ``{name: [n, ...]}``."""
    buffers = [b for _, b in results]
    stacked = {name: torch.stack([b[name] for b in buffers]) for name in buffers[0]} if buffers[0] else {}
    return torch.stack([u for u, _ in results]), stacked


def _padded_data(data: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every client's examples in one zero-padded stack: ``x [m, longest, ...]``, ``y [m, longest]``."""
    longest = max(len(y) for _, y in data)
    xs = torch.stack([F.pad(x, (0, 0) * (x.dim() - 1) + (0, longest - len(x))) for x, _ in data])
    ys = torch.stack([F.pad(y, (0, longest - len(y))) for _, y in data])
    return xs, ys


def train_clients_batched(
    net: nn.Module,
    global_params: torch.Tensor,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    recipe: LocalRecipe,
    schedules: list[list[torch.Tensor]],
    global_buffers: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Train every client at once with ``vmap(grad(loss))`` over a ``[m, ...]`` stack of models.

    Models without buffers take one ``vmap`` call per step for all clients: a client with fewer
    or smaller batches is padded with zero-weight examples, so its loss is still the mean over its
    real examples. Models with BatchNorm statistics cannot be padded (a padded example would enter
    the batch statistics), so ``_train_batched_with_buffers`` groups the clients by batch size.

    On CUDA, cuDNN times its convolution algorithms for these shapes (:func:`conv_autotune`):
    under ``vmap`` every convolution is one grouped convolution over all clients, a shape whose
    default algorithm can be several times slower than the best.
    """
    train = _train_batched_with_buffers if global_buffers else _train_batched_padded
    with conv_autotune(global_params.device):
        return train(net, global_params, data, recipe, schedules, global_buffers)


@contextmanager
def conv_autotune(device: torch.device) -> Iterator[None]:
    """On CUDA, let cuDNN time the convolution algorithms (``torch.backends.cudnn.benchmark``)
    inside the block, and restore the setting after it; elsewhere do nothing.

    ``SKYMASK_CUDNN_BENCHMARK=0`` switches it off (cuDNN's default choice; the algorithm timed
    may differ between runs, so a GPU result is not bit-reproducible either way).
    """
    if device.type != "cuda" or not cudnn_autotune_enabled():
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def cudnn_autotune_enabled() -> bool:
    """Whether the batched engine lets cuDNN time convolutions on CUDA: ``SKYMASK_CUDNN_BENCHMARK``
    ``"1"`` (the default) or ``"0"``."""
    value = os.environ.get("SKYMASK_CUDNN_BENCHMARK", "1")
    if value not in ("0", "1"):
        raise ValueError(f"SKYMASK_CUDNN_BENCHMARK must be 0 or 1, got {value!r}")
    return value == "1"


def _train_batched_padded(
    net: nn.Module,
    global_params: torch.Tensor,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    recipe: LocalRecipe,
    schedules: list[list[torch.Tensor]],
    global_buffers: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The batched engine for models without buffers: every client padded to the same steps."""
    device, n = global_params.device, len(data)
    steps = max(len(s) for s in schedules)
    # index [n, steps, B] into each client's padded data, weight 0 marks padding
    index = torch.zeros(n, steps, recipe.batch_size, dtype=torch.long)
    weight = torch.zeros(n, steps, recipe.batch_size)
    for i, schedule in enumerate(schedules):
        for s, idx in enumerate(schedule):
            index[i, s, : len(idx)] = idx
            weight[i, s, : len(idx)] = 1.0
    xs, ys = _padded_data(data)
    index, weight = index.to(device), weight.to(device, global_params.dtype)
    rows = torch.arange(n, device=device).unsqueeze(1)

    def loss_fn(flat: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
        logits = functional_call(net, unflatten(flat, net), (xb,))
        ce = F.cross_entropy(logits, yb, reduction="none")
        return (ce * wb).sum() / wb.sum().clamp_min(1.0)

    grad_all = vmap(grad(loss_fn))
    net.train()
    params = global_params.expand(n, -1).clone()  # [n, d]
    for s in range(steps):
        idx = index[:, s]  # [n, B]
        grads = grad_all(params, xs[rows, idx], ys[rows, idx], weight[:, s])
        if recipe.grad_clip is not None:
            grads = grads.clamp_(-recipe.grad_clip, recipe.grad_clip)
        params -= recipe.lr * grads
    return params - global_params, {}


def _train_batched_with_buffers(
    net: nn.Module,
    global_params: torch.Tensor,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    recipe: LocalRecipe,
    schedules: list[list[torch.Tensor]],
    global_buffers: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The batched engine for models with BatchNorm: every client's running statistics are a row
    of stacked buffers ``{name: [m, ...]}`` that :func:`torch.func.functional_call` updates under
    ``vmap``, exactly as BatchNorm updates its own in the loop engine
    (``running <- (1 - momentum) running + momentum batch_stat``).

    Step ``s`` makes one ``vmap`` call per distinct batch size among the clients that have an
    ``s``-th batch (usually one: the full batches; the last batch of an epoch may be smaller),
    so the batch statistics see real examples only.
    """
    device, m = global_params.device, len(data)
    xs, ys = _padded_data(data)
    params = global_params.expand(m, -1).clone()  # [m, d]
    floats = {k: v.expand(m, *v.shape).clone() for k, v in global_buffers.items()}  # [m, ...] each
    # BatchNorm also increments num_batches_tracked in place: it must be an input of the transform
    counters = {k: v.expand(m, *v.shape).clone() for k, v in net.named_buffers() if k not in global_buffers}

    def loss_fn(flat, stats, counts, xb, yb):  # one client, one batch
        stats = {k: v.clone() for k, v in stats.items()}  # updated in place by BatchNorm's forward
        logits = functional_call(net, {**unflatten(flat, net), **stats, **counts}, (xb,))
        return F.cross_entropy(logits, yb), stats

    step = vmap(grad(loss_fn, has_aux=True))
    net.train()
    everyone = torch.arange(m, device=device)
    for clients, idx in _buffered_plan(schedules, device):
        rows = everyone if clients is None else clients
        pick = (lambda t: t) if clients is None else (lambda t: t[clients])  # all clients: no gather
        grads, stats = step(
            pick(params), {k: pick(v) for k, v in floats.items()}, {k: pick(v).clone() for k, v in counters.items()},
            xs[rows.unsqueeze(1), idx], ys[rows.unsqueeze(1), idx],
        )
        if recipe.grad_clip is not None:
            grads = grads.clamp_(-recipe.grad_clip, recipe.grad_clip)
        if clients is None:  # no scatter either
            params -= recipe.lr * grads
            floats = stats
        else:
            params[clients] -= recipe.lr * grads
            for k, v in stats.items():
                floats[k][clients] = v
    return params - global_params, floats


def _buffered_plan(
    schedules: list[list[torch.Tensor]], device: torch.device,
) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    """The batched BatchNorm engine's calls in order: ``(clients, idx)`` per step and batch size,
    ``clients`` the rows that train (``None``: all of them) and ``idx [k, B]`` their examples.

    Planned on the CPU and moved to ``device`` in one copy each, so the training loop makes no
    host-to-device copy per step.
    """
    m, calls = len(schedules), []
    for s in range(max(len(schedule) for schedule in schedules)):
        groups: dict[int, list[int]] = {}
        for i, schedule in enumerate(schedules):
            if s < len(schedule):
                groups.setdefault(len(schedule[s]), []).append(i)
        calls += [(clients, torch.stack([schedules[i][s] for i in clients])) for clients in groups.values()]
    idx = torch.cat([i.reshape(-1) for _, i in calls]).to(device).split([i.numel() for _, i in calls])
    rows = torch.cat([torch.tensor(c) for c, _ in calls]).to(device).split([len(c) for c, _ in calls])
    return [(None if len(c) == m else r, i.view(len(c), -1)) for (c, _), r, i in zip(calls, rows, idx)]


def train_clients_parallel(
    net: nn.Module,
    global_params: torch.Tensor,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    recipe: LocalRecipe,
    schedules: list[list[torch.Tensor]],
    global_buffers: dict[str, torch.Tensor] | None = None,
    workers: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loop's local SGD with clients spread over ``workers`` threads (default: the torch
    thread count, i.e. the cores), each client on ONE core, on channels-last model copies.

    Small batches (16 images) keep two cores busy badly inside one convolution; one client per
    core keeps both busy. PyTorch releases the GIL inside its kernels. The intra-op thread count
    is set to 1 for the call and restored after.
    """
    if global_params.device.type != "cpu":
        raise ValueError(
            f"the parallel engine spreads clients over CPU threads; the model is on {global_params.device}. "
            "Use engine='batched' on a GPU (or 'loop')."
        )
    workers = workers or torch.get_num_threads()
    local, lock = threading.local(), threading.Lock()

    def one_client(i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not hasattr(local, "net"):
            with lock:
                local.net = copy.deepcopy(net).to(memory_format=torch.channels_last)
        x, y = data[i]
        return local_sgd(local.net, global_params, x, y, schedules[i], recipe, global_buffers, nhwc=True)

    with torch_threads(1), ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one_client, range(len(data))))
    return _stack_clients(results)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Torch's intra-op thread count set to ``threads`` inside the block (``None``: unchanged),
    the previous count restored after it, also after an error."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


ENGINES: dict[str, Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]] = {
    "loop": train_clients_loop,
    "batched": train_clients_batched,
    "parallel": train_clients_parallel,
}
"""Every client engine, by name. Each is called as
``engine(net, global_params, data, recipe, schedules, global_buffers)`` and returns the updates
``[m, d]`` and the buffers ``{name: [m, ...]}``; the name ``"auto"`` is :func:`resolve_engine`'s."""


def resolve_engine(engine: str, device: str | torch.device) -> str:
    """The engine that runs: ``engine`` itself, or for ``"auto"`` the fastest one on ``device``
    (``"batched"`` on a GPU, ``"parallel"`` on a CPU)."""
    if engine == "auto":
        return "parallel" if torch.device(device).type == "cpu" else "batched"
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {['auto', *ENGINES]}")
    return engine


def train_clients(
    net: nn.Module,
    global_params: torch.Tensor,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    recipe: LocalRecipe,
    seeds: list[int],
    global_buffers: dict[str, torch.Tensor] | None = None,
    engine: str = "loop",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Local training of every client from ``global_params`` (client ``i``'s batch order drawn
    from ``seeds[i]``, :func:`client_schedules`) by ``engine``: updates ``[n, d]`` and buffers."""
    train = ENGINES[resolve_engine(engine, global_params.device)]
    return train(net, global_params, data, recipe, client_schedules(data, recipe, seeds), global_buffers)


def root_steps_like_clients(client_sizes: list[int], recipe: LocalRecipe) -> int:
    """SGD steps of the median client: ``epochs * ceil(median size / batch_size)``."""
    return recipe.epochs * math.ceil(float(np.median(client_sizes)) / recipe.batch_size)


def root_batches(num_examples: int, recipe: LocalRecipe, steps: int, seed: int) -> list[torch.Tensor]:
    """The root update's mini-batches: the first ``steps`` of as many epochs over the root data
    as needed (:func:`client_batches` from ``seed``)."""
    epochs = math.ceil(steps * recipe.batch_size / num_examples) + 1
    return client_batches(num_examples, recipe.batch_size, epochs, torch.Generator().manual_seed(seed))[:steps]


def train_root(
    net: nn.Module,
    global_params: torch.Tensor,
    root_x: torch.Tensor,
    root_y: torch.Tensor,
    recipe: LocalRecipe,
    steps: int,
    seed: int,
    global_buffers: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The server's root update ``g0``: ``steps`` SGD steps of the clients' recipe on the root data,
    cycling through it (epoch after epoch) as often as needed."""
    batches = root_batches(len(root_y), recipe, steps, seed)
    update, _ = local_sgd(net, global_params, root_x, root_y, batches, recipe, global_buffers)
    return update


@torch.no_grad()
def predict(
    net: nn.Module,
    params: torch.Tensor,
    x: torch.Tensor,
    buffers: dict[str, torch.Tensor] | None = None,
    batch_size: int = 250,
) -> torch.Tensor:
    """Predicted labels of the model with flat parameters ``params`` (eval mode).

    Image batches go through :func:`~skymask_lite.models.channels_last`, so a CPU runs the
    CNN in its faster channels-last kernels; the logits differ from NCHW evaluation by float
    rounding only.
    """
    net.eval()
    state = {**unflatten(params, net), **(buffers or {})}
    return torch.cat([
        functional_call(net, state, (channels_last(xb) if xb.dim() == 4 else xb,)).argmax(dim=1)
        for xb in x.split(batch_size)
    ])


@dataclass
class Federation:
    """Everything fixed for a whole run: the model template, the clients' data, the test and
    root sets, who is malicious, and the recipes."""

    net: nn.Module
    client_data: list[tuple[torch.Tensor, torch.Tensor]]
    test: tuple[torch.Tensor, torch.Tensor]
    root: tuple[torch.Tensor, torch.Tensor]
    malicious: torch.Tensor
    num_classes: int
    recipe: LocalRecipe = field(default_factory=LocalRecipe)
    global_lr: float = 1.0
    root_steps: int | None = None
    engine: str = "loop"
    seed: int = 0

    @property
    def num_clients(self) -> int:
        return len(self.client_data)

    @property
    def root_update_steps(self) -> int:
        """The number of SGD steps of the server's root update (``root_steps``, or the median client's)."""
        return self.root_steps or root_steps_like_clients([len(y) for _, y in self.client_data], self.recipe)


@dataclass
class State:
    """The global model between rounds: flat parameters, float buffers, the last finished round."""

    params: torch.Tensor
    buffers: dict[str, torch.Tensor]
    round: int = 0


def initial_state(fed: Federation) -> State:
    """The global model as ``fed.net`` was initialised."""
    return State(flatten_params(fed.net), float_buffers(fed.net))


class LocalTrainingDiverged(FloatingPointError):
    """Local training produced NaN or Inf in round ``round``: ``rows`` are the update rows that
    diverged (client ids; the server's root update is row ``num_clients``).

    Why a class of its own: the experiment runner tells a model destroyed by an attack (a result
    to record) from a recipe that diverges by itself (an error to fix) by catching exactly this.
    """

    def __init__(self, message: str, round: int, rows: list[int], num_clients: int):
        super().__init__(message)
        self.round, self.rows, self.num_clients = round, rows, num_clients


def check_local_training(updates: torch.Tensor, fed: Federation, rnd: int) -> None:
    """Stop the run when local training diverged (NaN or Inf in an update): ``updates`` holds the
    clients' rows and, when the defense needs one, the server's root update as row ``n``.

    The simulator's policy: a diverged round is never repaired or dropped silently, because either
    choice would change what the defense under study sees. It raises
    :class:`LocalTrainingDiverged`; the experiment runner records it as the model's collapse
    when an attack is present, and reports it as an error of the recipe otherwise.
    """
    bad = nonfinite_rows(updates)
    if not bad:
        return
    mal = set(fed.malicious.tolist())
    clients = [f"{i} ({'malicious' if i in mal else 'honest'})" for i in bad if i < fed.num_clients]
    who = ([f"clients {', '.join(clients)}"] if clients else []) + (
        ["the server's root update"] if bad[-1] >= fed.num_clients else []
    )
    raise LocalTrainingDiverged(
        f"round {rnd}: local training diverged for {' and '.join(who)}: their updates contain NaN or Inf. "
        "The run stops instead of dropping or repairing them. Lower the local learning rate "
        "(--local-lr), clip gradients (--grad-clip) or lower the server's learning rate (--global-lr).",
        round=rnd, rows=bad, num_clients=fed.num_clients,
    )


def round_updates(
    fed: Federation, state: State, with_root_update: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """The honest updates of round ``state.round + 1`` and, with ``with_root_update``, the
    server's root update ``g0``: ``(updates [n, d], buffers {name: [n, ...]}, g0 [d] or None)``.

    Client ``i`` trains on its batches drawn from ``(seed, round, CLIENT_STREAM, i)``; ``g0`` is
    ``fed.root_update_steps`` steps on the root data drawn from ``(seed, round, ROOT_STREAM)``
    (:func:`root_batches`), trained by the same engine as one more local training: it needs only
    the global model and the root data, so a real server computes it while it waits. Diverged
    training stops the run (:func:`check_local_training`).
    """
    rnd = state.round + 1
    seeds = [derive_seed(fed.seed, rnd, CLIENT_STREAM, i) for i in range(fed.num_clients)]
    data, schedules = fed.client_data, client_schedules(fed.client_data, fed.recipe, seeds)
    if with_root_update:
        root_seed = derive_seed(fed.seed, rnd, ROOT_STREAM)
        data = [*data, fed.root]
        schedules = [*schedules, root_batches(len(fed.root[1]), fed.recipe, fed.root_update_steps, root_seed)]
    engine = ENGINES[resolve_engine(fed.engine, state.params.device)]
    trained, buffers = engine(fed.net, state.params, data, fed.recipe, schedules, state.buffers)
    check_local_training(trained, fed, rnd)
    n = fed.num_clients
    g0 = trained[n] if with_root_update else None
    return trained[:n], {name: b[:n] for name, b in buffers.items()}, g0


def attacker_sample(fed: Federation) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded sample of the malicious clients' own data, as many examples as the root set (or all
    of theirs if fewer): what an attacker that simulates the server trains its masks on. Drawn once
    per run from ``(seed, 0, ATTACKER_STREAM)``, so it is the same every round."""
    if len(fed.malicious) == 0:
        raise ValueError("attacker_sample needs malicious clients; the federation has none")
    x = torch.cat([fed.client_data[i][0] for i in fed.malicious.tolist()])
    y = torch.cat([fed.client_data[i][1] for i in fed.malicious.tolist()])
    size = min(len(fed.root[1]), len(y))
    chosen = torch.randperm(len(y), generator=torch.Generator().manual_seed(derive_seed(fed.seed, 0, ATTACKER_STREAM)))
    chosen = chosen[:size].to(y.device)
    return x[chosen], y[chosen]


def round_context(
    fed: Federation, state: State, root_update: torch.Tensor | None = None, attacker_data: bool = False
) -> RoundContext:
    """What the attack and the defence of round ``state.round + 1`` may see (the one builder of a
    :class:`~skymask_lite.context.RoundContext`; its generator is ``(seed, round, ROUND_STREAM)``).
    ``attacker_data`` fills ``attacker_x, attacker_y`` with :func:`attacker_sample` (only for an
    attack that declares ``needs_attacker_data``, and only when there are attackers)."""
    rnd = state.round + 1
    attacker_x, attacker_y = attacker_sample(fed) if attacker_data and len(fed.malicious) else (None, None)
    return RoundContext(
        round=rnd,
        num_clients=fed.num_clients,
        num_malicious=len(fed.malicious),
        malicious=fed.malicious,
        net=fed.net,
        global_params=state.params,
        global_buffers=state.buffers,
        root_x=fed.root[0],
        root_y=fed.root[1],
        root_update=root_update,
        recipe=fed.recipe,
        global_lr=fed.global_lr,
        num_classes=fed.num_classes,
        generator=torch.Generator().manual_seed(derive_seed(fed.seed, rnd, ROUND_STREAM)),
        attacker_x=attacker_x,
        attacker_y=attacker_y,
    )


def server_step(fed: Federation, state: State, agg: Aggregation, buffers: dict[str, torch.Tensor]) -> None:
    """``w <- w + global_lr * aggregate``; the buffers (BatchNorm statistics) become the mean of
    the kept clients' (unchanged when nobody is kept). Mutates ``state``."""
    state.params = state.params + fed.global_lr * agg.update
    if buffers and len(agg.kept):
        state.buffers = {name: b[agg.kept].mean(dim=0) for name, b in buffers.items()}
    state.round += 1


def evaluate(fed: Federation, state: State, attack: Any) -> dict[str, float]:
    """Test accuracy of the global model and, for a backdoor attack, its attack success rate."""
    record = {"test_acc": accuracy(predict(fed.net, state.params, fed.test[0], state.buffers), fed.test[1])}
    if getattr(attack, "target_class", None) is not None:
        record["asr"] = attack_success_rate(
            lambda x: predict(fed.net, state.params, x, state.buffers), *fed.test, attack.add_trigger, attack.target_class
        )
    return record


def phase_clock(device: torch.device) -> float:
    """``time.perf_counter()`` once ``device`` has finished the work queued on it so far.

    CUDA runs kernels asynchronously: without the wait, the tail of one phase's GPU work (the
    clients' training, say) would be timed as part of the next phase (the attack or the rule).
    On a CPU it is the plain clock.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def run_round(
    fed: Federation,
    state: State,
    attack: Callable[[torch.Tensor, RoundContext], torch.Tensor],
    defense: Callable[[torch.Tensor, RoundContext], Aggregation],
) -> dict[str, Any]:
    """One round: train, attack, aggregate, step, evaluate. Mutates ``state``; returns the
    round's record ``{round, test_acc, kept, fpr, fnr, [asr], defense_info, [attack_info], seconds, timing}``;
    ``attack_info`` is the attack's ``stats`` of the round, for attacks that keep some
    (:class:`~skymask_lite.attacks.AdaptiveSkyMask`).

    ``timing["clients"]`` includes the root update ``g0`` (trained next to the clients, see
    :func:`round_updates`); ``timing["defense"]`` is the rule alone. The attack does not see ``g0``.
    Each phase ends when the device has finished its work (:func:`phase_clock`).
    """
    device = state.params.device
    t0 = phase_clock(device)
    updates, buffers, g0 = round_updates(fed, state, with_root_update=getattr(defense, "needs_root_update", False))
    t1 = phase_clock(device)
    ctx = round_context(fed, state, attacker_data=getattr(attack, "needs_attacker_data", False))
    updates = attack(updates, ctx)
    if updates.shape[0] != fed.num_clients:
        raise RuntimeError(f"the attack returned {updates.shape[0]} updates; the server must receive {fed.num_clients}")
    t2 = phase_clock(device)
    ctx.root_update = g0
    agg = defense(updates, ctx)
    t3 = phase_clock(device)
    server_step(fed, state, agg, buffers)
    record: dict[str, Any] = {"round": state.round, **evaluate(fed, state, attack), "kept": agg.kept.tolist()}
    record.update(detection_rates(agg.kept, fed.malicious, fed.num_clients))
    record["defense_info"] = agg.stats
    if getattr(attack, "stats", None) is not None:
        record["attack_info"] = attack.stats
    t4 = phase_clock(device)
    record["seconds"] = t4 - t0
    record["timing"] = {"clients": t1 - t0, "attack": t2 - t1, "defense": t3 - t2, "eval": t4 - t3}
    return record
