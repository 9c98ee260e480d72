"""The kernels behind SkyMask's mask step (:func:`skymask_lite.skymask.train_masks`); private.

The masked average ``W = sum_i s_i W_i / S`` (``s = sigmoid(M)``, ``S = sum_i s_i``) and its
closed-form gradient, and the training loop that runs them over column blocks of the ``[k, d]``
models with preallocated buffers. Why blocks: on a CPU a contiguous ``[k, block]`` block of
``M``, ``sigmoid(M)`` and the models stays in the cache between the operations of a step; on a
GPU one whole block (``block = d``, a view, no copy) launches the fewest kernels. The block
width is a memory layout: the result does not depend on it beyond float rounding.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .models import channels_last, unflatten

__all__ = [
    "ALIGN",
    "CPU_BLOCK",
    "ColumnBlocks",
    "GRAPH_ENV",
    "MaskedAverage",
    "binarize_columns",
    "block_width",
    "column_blocks",
    "cuda_graphed",
    "eval_mode",
    "from_blocks",
    "make_optimizer",
    "padded_scratch",
    "resolve_block",
    "sigmoid_into",
    "stack_blocks",
    "to_blocks",
    "train_mask_columns",
    "transform_grad",
    "use_graph",
]

CPU_BLOCK = 4096
"""Columns per block on a CPU: ``[k, block]`` float blocks of a few ``k = 101`` models fit the cache."""


def resolve_block(block: int | None, device: torch.device, d: int) -> int:
    """Columns per block: ``block`` if given, else :data:`CPU_BLOCK` on a CPU and ``d`` (one block) elsewhere."""
    if block is None:
        return CPU_BLOCK if device.type == "cpu" else max(d, 1)
    if block < 1:
        raise ValueError(f"block must be a positive number of columns (or None for automatic), got {block}")
    return block


def column_blocks(d: int, block: int) -> list[slice]:
    """The column ranges ``[start, start + block)`` that cover ``0 .. d-1``, the last one shorter."""
    return [slice(start, min(start + block, d)) for start in range(0, d, block)]


ALIGN = 64
"""Block widths that are multiples of this take only the vectorised loop of the CPU sigmoid."""


def padded_scratch(like: torch.Tensor, k: int, width: int) -> torch.Tensor | None:
    """The flat scratch buffer :func:`sigmoid_into` needs for blocks of up to ``width`` columns
    (``None`` off the CPU, where it is not used)."""
    return like.new_empty(k * (-(-width // ALIGN) * ALIGN)) if like.device.type == "cpu" else None


def sigmoid_into(mask_logits: torch.Tensor, out: torch.Tensor | None, scratch: torch.Tensor | None) -> torch.Tensor:
    """``sigmoid(M)`` of a ``[k, w]`` column block, into ``out`` (if given); returns the values.

    On a CPU, PyTorch's sigmoid rounds differently in its vectorised loop and in the scalar loop
    that finishes a row whose width is not a multiple of the vector length. A block of such a
    width (the last one) goes through ``scratch`` (:func:`padded_scratch`), padded to a multiple
    of :data:`ALIGN` columns, so that every coordinate takes the vectorised loop and the masks
    do not depend on where ``d`` ends.
    """
    k, width = mask_logits.shape
    if scratch is None or width % ALIGN == 0:
        return torch.sigmoid(mask_logits) if out is None else torch.sigmoid(mask_logits, out=out)
    padded = scratch[: k * (-(-width // ALIGN) * ALIGN)].view(k, -1)
    padded[:, width:].zero_()
    padded[:, :width].copy_(mask_logits)
    values = torch.sigmoid(padded, out=padded)[:, :width]
    return values if out is None else out.copy_(values)


def masked_average_into(
    mask_logits: torch.Tensor, models: torch.Tensor, s: torch.Tensor, total: torch.Tensor, weights: torch.Tensor,
    product: torch.Tensor, scratch: torch.Tensor | None = None,
) -> None:
    """Forward of the masked average, into given buffers: ``s = sigmoid(M)``, ``S = sum_i s_i``
    (``total``), ``W = sum_i s_i W_i / S`` (``weights``); ``product`` is ``[k, w]`` scratch and
    ``scratch`` that of :func:`sigmoid_into`."""
    sigmoid_into(mask_logits, s, scratch)
    torch.sum(s, dim=0, out=total)
    torch.mul(s, models, out=product)
    torch.sum(product, dim=0, out=weights)
    weights.div_(total)


def mask_grad_into(
    models: torch.Tensor, s: torch.Tensor, shift: torch.Tensor, scaled: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """``dL/dM_i = s_i (1 - s_i) (W_i - W) dL/dW / S`` into ``out``, from ``scaled = dL/dW / S`` and
    ``shift = -W * scaled``: one ``addcmul`` and the fused sigmoid derivative."""
    torch.addcmul(shift, models, scaled, out=out)
    return torch.ops.aten.sigmoid_backward.grad_input(out, s, grad_input=out)


class MaskedAverage(torch.autograd.Function):
    """``W = sum_i s_i W_i / S`` with ``s = sigmoid(M)``, ``S = sum_j s_j``, and its closed-form
    gradient ``dL/dM_i = s_i (1 - s_i) (W_i - W) / S * dL/dW`` (``dL/dW_i = s_i / S * dL/dW``).

    The backward makes two passes over ``[k, d]`` (one ``addcmul``, one fused sigmoid
    derivative) where autograd through the same expression makes three.
    """

    @staticmethod
    def forward(ctx: Any, models: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        s, product = torch.empty_like(models), torch.empty_like(models)
        total, weights = models.new_empty(models.shape[1]), models.new_empty(models.shape[1])
        masked_average_into(mask_logits, models, s, total, weights, product)
        ctx.save_for_backward(models, s, total, weights)
        return weights

    @staticmethod
    def backward(ctx: Any, grad_w: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        models, s, total, weights = ctx.saved_tensors
        scaled = grad_w / total
        grad_models = s * scaled if ctx.needs_input_grad[0] else None
        grad_mask = None
        if ctx.needs_input_grad[1]:
            grad_mask = mask_grad_into(models, s, -weights * scaled, scaled, torch.empty_like(models))
        return grad_models, grad_mask


@contextlib.contextmanager
def eval_mode(net: nn.Module) -> Iterator[None]:
    """Put ``net`` in eval mode (BatchNorm uses the given buffers) and restore its mode after."""
    was_training = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was_training)


def make_optimizer(mask: torch.Tensor, optimizer: str, lr: float) -> torch.optim.Optimizer:
    """``torch.optim.Adam`` for "adam", plain SGD (on a clamped or sign gradient) otherwise."""
    return torch.optim.Adam([mask], lr=lr) if optimizer == "adam" else torch.optim.SGD([mask], lr=lr)


def transform_grad(grad: torch.Tensor, optimizer: str, grad_clip: float | None) -> None:
    """In place: clamp to ``[-grad_clip, grad_clip]`` ("clipped_sgd") or take the sign ("sign_sgd")."""
    if optimizer == "clipped_sgd" and grad_clip is not None:
        grad.clamp_(-grad_clip, grad_clip)
    elif optimizer == "sign_sgd":
        grad.sign_()


def _stalled(losses: list[float], patience: int, min_delta: float) -> bool:
    """True when the loss improved by less than ``min_delta`` over the last ``patience`` steps."""
    return len(losses) > patience and losses[-1 - patience] - losses[-1] < min_delta


@dataclass
class ColumnBlocks:
    """A ``[k, d]`` matrix stored as contiguous column blocks: ``data[b]`` is ``[k, block]`` and
    holds columns ``b*block .. (b+1)*block - 1``, the last block padded with zeros."""

    data: torch.Tensor
    d: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape[1], self.d

    @property
    def device(self) -> torch.device:
        return self.data.device


def block_width(block: int, d: int, device: torch.device) -> int:
    """The width of the blocks of ``d`` columns: ``block``, or one block of ``d`` columns (on a CPU
    padded to a multiple of :data:`ALIGN`, so its column sums round as in wider blocks)."""
    whole = -(-d // ALIGN) * ALIGN if device.type == "cpu" else d
    return min(block, whole)


def stack_blocks(
    global_params: torch.Tensor, updates: torch.Tensor, root_update: torch.Tensor, dtype: torch.dtype, block: int
) -> ColumnBlocks:
    """``W_i = w + U_i`` then ``W_0 = w + g0`` written straight into :class:`ColumnBlocks`: one pass
    and one buffer, no ``[n+1, d]`` matrix and no blocked copy of it."""
    n, d = updates.shape
    block = block_width(block, d, updates.device)
    nb, full = -(-d // block), (d // block) * block
    data = torch.empty(nb, n + 1, block, dtype=dtype, device=updates.device)
    rows = data.transpose(0, 1)  # [n+1, nb, block], a view
    for src, dst in ((updates, rows[:n]), (root_update.reshape(1, d), rows[n:])):
        torch.add(global_params[:full].view(1, -1, block), src[:, :full].view(len(src), -1, block),
                  out=dst[:, : d // block])
        if full < d:
            torch.add(global_params[full:], src[:, full:], out=dst[:, -1, : d - full])
    data[-1, :, d - full if full < d else block :].zero_()
    return ColumnBlocks(data, d)


def to_blocks(models: torch.Tensor, block: int) -> ColumnBlocks:
    """A ``[k, d]`` matrix as :class:`ColumnBlocks` (one copy; a view when there is one block)."""
    k, d = models.shape
    block = block_width(block, d, models.device)
    if block == d and models.is_contiguous():
        return ColumnBlocks(models.view(1, k, d), d)
    nb, full = -(-d // block), (d // block) * block
    data = models.new_empty(nb, k, block)
    rows = data.transpose(0, 1)  # [k, nb, block], a view
    rows[:, : d // block].copy_(models[:, :full].view(k, -1, block))
    if full < d:
        rows[:, -1, : d - full].copy_(models[:, full:])
        rows[:, -1, d - full :].zero_()
    return ColumnBlocks(data, d)


def from_blocks(blocks: ColumnBlocks) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: the ``[k, d]`` matrix (a view when there is one block)."""
    nb, k, block = blocks.data.shape
    if nb == 1:
        return blocks.data[0, :, : blocks.d]
    return blocks.data.transpose(0, 1).reshape(k, nb * block)[:, : blocks.d].contiguous()


GRAPH_ENV = "SKYMASK_MASK_GRAPH"
"""Set to ``0`` to switch CUDA graphs off in the mask step everywhere (``1``: on where they apply);
unset: ``train_masks(graph=None)`` decides (:func:`use_graph`)."""


def use_graph(graph: bool | None, device: torch.device, optimizer: str, nb: int) -> bool:
    """Whether the mask step replays a CUDA graph: ``graph`` if given, else :data:`GRAPH_ENV`
    if set, else on CUDA for the SGD optimizers on one column block (Adam steps through
    ``torch.optim``, left eager). ``graph=True`` where it cannot apply is an error."""
    if graph is None:
        env = os.environ.get(GRAPH_ENV)
        if env not in (None, "", "0", "1"):
            raise ValueError(f"{GRAPH_ENV} must be 0 or 1 (or unset), got {env!r}")
        graph = env == "1" if env else True
        return graph and device.type == "cuda" and optimizer != "adam" and nb == 1
    if graph and not (device.type == "cuda" and optimizer != "adam" and nb == 1):
        raise ValueError(
            "graph=True needs CUDA models in one column block and an SGD mask optimizer "
            f"(got device {device.type}, optimizer {optimizer!r}, {nb} blocks); pass graph=None or False"
        )
    return graph


def cuda_graphed(step: Callable[[], None]) -> Callable[[], None]:
    """Run ``step`` once for real (the warm-up, on a side stream, as CUDA graph capture asks),
    capture it into a CUDA graph and return the graph's replay: every later call replays the
    same kernels on the same static tensors, one launch instead of a few hundred."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


@dataclass
class CapturedStep:
    """A captured mask step and the static tensors its replays read and write: the inputs
    (models, root images and labels, buffers, private copies the caller never sees), the mask
    logits, the copy of them taken at the step's start and the step's loss. ``key`` names what
    the kernels were captured for (shapes, dtypes, device, network, optimizer, ``lr``,
    ``grad_clip``); ``net`` is held so that its ``id`` in the key cannot be reused."""

    key: tuple
    net: nn.Module
    inputs: list[torch.Tensor]
    mask: torch.Tensor
    before: torch.Tensor
    loss_out: torch.Tensor
    replay: Callable[[], None]
    step: Callable[[], None]  # its closure holds every scratch tensor the graph reads or writes


CAPTURED: dict[str, CapturedStep] = {}
"""The last captured mask step of this process (one entry, ``"last"``): the next
:func:`train_mask_columns` call of the same shapes copies its inputs in and replays it instead
of capturing a new graph (capturing costs about two steps). One entry bounds the memory held."""


def _capture_key(net: nn.Module, inputs: list[torch.Tensor], *settings: Any) -> tuple:
    """What a captured step depends on besides its inputs' values: the network, the inputs'
    shapes, dtypes and devices, and ``settings`` (buffer names, optimizer, ``lr``, ``grad_clip``)."""
    return (id(net), *settings, tuple((tuple(t.shape), t.dtype, t.device) for t in inputs))


def _eager(step: Callable[[], None]) -> Callable[[], None]:
    """The capture of :func:`cuda_graphed` without a graph: run ``step`` once, return it (the
    same loop on any device; the tests run the graph loop's logic through it on a CPU)."""
    step()
    return step


def train_mask_columns(
    net: nn.Module,
    models: ColumnBlocks,
    root_x: torch.Tensor,
    root_y: torch.Tensor,
    *,
    buffers: dict[str, torch.Tensor] | None,
    steps: int,
    init: float,
    optimizer: str,
    lr: float,
    grad_clip: float | None,
    patience: int,
    min_delta: float,
    graph: bool | None = None,
    capture: Callable[[Callable[[], None]], Callable[[], None]] | None = None,
    captured: dict[str, CapturedStep] | None = None,
) -> tuple[ColumnBlocks, list[float]]:
    """:func:`skymask_lite.skymask.train_masks` on models in :class:`ColumnBlocks` (a contiguous
    block streams through the CPU cache; a column slice of a ``[k, d]`` matrix does not).

    Per step: the forward of the masked average block by block into ``s`` and ``W``, autograd
    through the network for ``dL/dW`` only, then the closed-form ``dL/dM`` and the SGD step
    block by block (Adam steps the whole gradient at once). The padded columns have zero
    gradient. Returns the logits in the same layout.

    Two loops, the same operations:

    * plain (CPU, Adam, ``graph=False``): forward, read the loss, stop if stalled, else
      backward and step;
    * graphed (``graph``, see :func:`use_graph`; ``capture`` replaces :func:`cuda_graphed`, the
      tests pass :func:`_eager`): the whole step (forward, backward, update) is one CUDA graph
      replayed ``steps`` times, the loss read after each replay. The graph is kept in
      ``captured`` (default: :data:`CAPTURED` with real graphs, none with ``capture``) and
      replayed by the next call of the same shapes (the next round) after its inputs are
      copied into the graph's static tensors; the returned logits are a copy. A step that
      reads a stalled loss has already updated ``M``; its update is undone from the copy taken at the step's
      start, so both loops take the same steps (equal on a CPU, tested). On a GPU the graph
      replaces a few hundred kernel launches per step by one, and the launches, not the
      arithmetic, were the step's cost: on an H200 the masks of 101 CNN models took 0.03 s
      (``benchmarks/results/benchmark_cuda.json``, ``scaling``), 0.05-0.06 s before; with
      the graph kept across rounds the whole server step took a median of 0.024 s over 25
      rounds (``benchmarks/results/server_share_cuda.json``). The
      GPU's convolution backward is not bit-deterministic, and the clipped-SGD step turns the
      sign of a near-zero gradient into a whole step of ``M``: the two loops differed in a few
      logits there (up to 4) and kept the same clients.
    """
    blocks, d = models.data, models.d
    nb, k, width = blocks.shape
    graphed = steps > 0 and (capture is not None or use_graph(graph, blocks.device, optimizer, nb))
    if root_x.dim() == 4:  # channels-last convolutions and pooling are faster on CPUs
        root_x = channels_last(root_x)
    if graphed:
        if captured is None or optimizer == "adam":  # Adam's moments must not outlive a call
            captured = CAPTURED if capture is None and optimizer != "adam" else {}
        inputs = [blocks, root_x, root_y, *(buffers or {}).values()]
        key = _capture_key(net, inputs, tuple(buffers or {}), optimizer, lr, grad_clip)
        last = captured.get("last")
        if last is not None and last.key == key:
            for static, new in zip(last.inputs, inputs):
                static.copy_(new)
            last.mask.fill_(init)
            return _replay_steps(last, steps, patience, min_delta, d)
        inputs = [t.clone() for t in inputs]  # the step reads private copies, refilled per call
        blocks, root_x, root_y = inputs[:3]
        buffers = dict(zip(buffers, inputs[3:])) if buffers is not None else None
    mask = torch.full_like(blocks, init, requires_grad=optimizer == "adam")
    opt = make_optimizer(mask, optimizer, lr) if optimizer == "adam" else None
    s, product = torch.empty_like(blocks), torch.empty_like(blocks[0])
    padded = padded_scratch(blocks, k, width)
    # SGD needs one block of the gradient at a time (the forward's scratch block); Adam the whole
    grad = torch.empty_like(blocks) if opt is not None else None
    total, weights = blocks.new_empty(nb, width), blocks.new_empty(nb, width)

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():  # forward of masked_weights: W = sum_i s_i W_i / sum_i s_i
            for b in range(nb):
                masked_average_into(mask[b], blocks[b], s[b], total[b], weights[b], product, padded)
        w = weights.view(-1)[:d].clone().requires_grad_()
        state = {**unflatten(w, net), **(buffers or {})}
        with eval_mode(net):
            return F.cross_entropy(functional_call(net, state, (root_x,)), root_y), w

    def backward(loss: torch.Tensor, w: torch.Tensor) -> None:
        (grad_w,) = torch.autograd.grad(loss, w)
        with torch.no_grad():  # backward: dL/dM_i = s_i (1 - s_i) (W_i - W) dL/dW / S, then the step
            scaled = F.pad(grad_w, (0, nb * width - d)).view_as(weights).div_(total)
            shift = -weights * scaled
            for b in range(nb):
                g = product if grad is None else grad[b]
                mask_grad_into(blocks[b], s[b], shift[b], scaled[b], g)
                transform_grad(g, optimizer, grad_clip)
                if opt is None:
                    mask[b].add_(g, alpha=-lr)
        if opt is not None:
            mask.grad = grad
            opt.step()

    losses: list[float] = []
    if not graphed:
        for _ in range(steps):
            loss, w = forward()
            losses.append(loss.item())
            if _stalled(losses, patience, min_delta):
                break
            backward(loss, w)
        return ColumnBlocks(mask.detach(), d), losses

    before, loss_out = torch.empty_like(blocks), blocks.new_empty(())

    def step() -> None:  # static tensors only: what a CUDA graph can replay
        with torch.no_grad():
            before.copy_(mask)
        loss, w = forward()
        loss_out.copy_(loss.detach())
        backward(loss, w)

    # the first step runs inside the capture (its warm-up), which returns the replay
    replay = (capture or cuda_graphed)(step)
    captured["last"] = CapturedStep(key, net, inputs, mask, before, loss_out, replay, step)
    return _replay_steps(captured["last"], steps, patience, min_delta, d, first_done=True)


def _replay_steps(
    step: CapturedStep, steps: int, patience: int, min_delta: float, d: int, first_done: bool = False
) -> tuple[ColumnBlocks, list[float]]:
    """The graphed loop: ``steps`` replays (the first already run when ``first_done``), the loss
    read after each; a stalled step's update is undone. Returns a copy of the logits (the
    static ones belong to the captured step) and the losses."""
    losses: list[float] = []
    for t in range(steps):
        if t > 0 or not first_done:
            step.replay()
        losses.append(step.loss_out.item())
        if _stalled(losses, patience, min_delta):
            with torch.no_grad():
                step.mask.copy_(step.before)  # the plain loop stops before this step's update
            break
    return ColumnBlocks(step.mask.detach().clone(), d), losses


def binarize_columns(mask_logits: torch.Tensor | ColumnBlocks, tau: float, block: int) -> torch.Tensor:
    """``1[sigmoid(M) > tau]`` as a bool ``[k, d]`` tensor, block by block (no ``[k, d]`` float copy
    of ``sigmoid(M)`` on a CPU); ``M`` is a ``[k, d]`` matrix or :class:`ColumnBlocks`."""
    k, d = mask_logits.shape
    out = torch.empty(k, d, dtype=torch.bool, device=mask_logits.device)
    if isinstance(mask_logits, ColumnBlocks):
        parts = list(mask_logits.data)  # [k, block] each, padded
        block = mask_logits.data.shape[2]
    else:
        parts = [mask_logits[:, cols] for cols in column_blocks(d, block)]
    padded = padded_scratch(parts[0], k, parts[0].shape[1])
    for b, part in enumerate(parts):
        cols = slice(b * block, min((b + 1) * block, d))
        torch.gt(sigmoid_into(part, None, padded)[:, : cols.stop - cols.start], tau, out=out[:, cols])
    return out
