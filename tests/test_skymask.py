"""Tests of skymask_lite.skymask: the masked model, mask training, binarisation, clustering, the rule."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn
from torch.func import functional_call

from skymask_lite import _mask_kernels as kernels
from skymask_lite import clustering
from skymask_lite import skymask as sm
from skymask_lite.aggregation import BoundRule
from skymask_lite.context import RoundContext
from skymask_lite.models import (
    FMNISTCNN,
    LogisticRegression,
    channels_last,
    flatten_params,
    float_buffers,
    make_model,
    resnet20,
    unflatten,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared 2-core machine intra-op threads
    made some calls 50x slower; restore the setting after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- masked model


def test_masked_weights_equals_its_formula():
    g = torch.Generator().manual_seed(0)
    models = torch.randn(4, 7, generator=g, dtype=torch.float64)
    logits = torch.randn(4, 7, generator=g, dtype=torch.float64)
    expected = []
    for j in range(7):
        s = [1.0 / (1.0 + math.exp(-logits[i, j].item())) for i in range(4)]
        expected.append(sum(s[i] * models[i, j].item() for i in range(4)) / sum(s))
    torch.testing.assert_close(sm.masked_weights(models, logits), torch.tensor(expected, dtype=torch.float64))


def test_closed_form_gradient_matches_numerical():
    g = torch.Generator().manual_seed(1)
    models = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sm.masked_weights, (models, logits))


def _distinct_models(build, k: int) -> list[nn.Module]:
    """``k`` models of one architecture with different weights (and random BatchNorm statistics)."""
    nets = []
    for i in range(k):
        with torch.random.fork_rng():
            torch.manual_seed(100 + i)
            net = build().double()
        for name, buf in net.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_()
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
        nets.append(net)
    return nets


def _per_layer_reference(
    template: nn.Module, nets: list[nn.Module], layer_masks: list[dict], x: torch.Tensor
) -> torch.Tensor:
    """The masked model built layer by layer with plain loops, run as an ordinary nn.Module."""
    ref = copy.deepcopy(template).double().eval()
    client_params = [dict(net.named_parameters()) for net in nets]
    client_buffers = [float_buffers(net) for net in nets]
    with torch.no_grad():
        for name, param in ref.named_parameters():
            numerator, denominator = torch.zeros_like(param), torch.zeros_like(param)
            for params, masks in zip(client_params, layer_masks):
                numerator += torch.sigmoid(masks[name]) * params[name]
                denominator += torch.sigmoid(masks[name])
            param.copy_(numerator / denominator)
        for name, buf in ref.named_buffers():
            if buf.is_floating_point():
                buf.copy_(sum(b[name] for b in client_buffers) / len(nets))
        return ref(x)


@pytest.mark.parametrize("build, shape", [(FMNISTCNN, (1, 28, 28)), (resnet20, (3, 32, 32))])
def test_vectorised_masked_model_equals_per_layer_reference(build, shape):
    k = 3
    nets = _distinct_models(build, k)
    template = build().double().train()
    g = torch.Generator().manual_seed(2)
    layer_masks = [
        {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in net.named_parameters()} for net in nets
    ]
    logits = torch.stack([torch.cat([m.reshape(-1) for m in masks.values()]) for masks in layer_masks])
    models = torch.stack([flatten_params(net) for net in nets])
    buffers = {n: torch.stack([float_buffers(net)[n] for net in nets]).mean(0) for n in float_buffers(nets[0])}
    x = torch.randn(4, *shape, generator=g, dtype=torch.float64)
    before = float_buffers(template)
    out = sm.masked_logits(template, models, logits, x, buffers=buffers)
    torch.testing.assert_close(out, _per_layer_reference(template, nets, layer_masks, x))
    assert template.training, "masked_logits must restore the template's mode"
    assert all(torch.equal(b, float_buffers(template)[n]) for n, b in before.items()), "eval mode: no statistics update"


def test_gradients_reach_every_mask_row():
    nets = _distinct_models(FMNISTCNN, 3)
    models = torch.stack([flatten_params(net) for net in nets]).float()
    logits = torch.ones_like(models, requires_grad=True)
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    F.cross_entropy(sm.masked_logits(FMNISTCNN(), models, logits, x), y).backward()
    assert (logits.grad.abs().sum(dim=1) > 0).all()


# ---------------------------------------------------------------- a tiny logistic-regression problem


def _blobs(n: int, gen: torch.Generator, features: int = 10, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs: class c centred at 3 * e_c."""
    y = torch.randint(0, classes, (n,), generator=gen)
    return torch.randn(n, features, generator=gen) + 3.0 * F.one_hot(y, features).float(), y


def _local_update(
    net: nn.Module, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, steps: int = 10, lr: float = 0.5
) -> torch.Tensor:
    """Full-batch gradient descent from ``w``; returns ``w_local - w``."""
    local = w.clone().requires_grad_()
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(net, unflatten(local, net), (x,)), y)
        (grad,) = torch.autograd.grad(loss, local)
        local = (local - lr * grad).detach().requires_grad_()
    return local.detach() - w


@pytest.fixture(scope="module")
def problem() -> dict:
    """8 honest clients and 3 malicious ones (sign-flipped, scaled), a root set and its update g0."""
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = LogisticRegression(10, 4)
    w = flatten_params(net)
    honest = torch.stack([_local_update(net, w, *_blobs(50, gen)) for _ in range(8)])
    mean = honest.mean(dim=0)
    malicious = torch.stack([-1.0 * mean, -2.0 * mean, -4.0 * mean])
    root_x, root_y = _blobs(100, gen)
    return {
        "net": net, "global_params": w, "root_x": root_x, "root_y": root_y,
        "root_update": _local_update(net, w, root_x, root_y),
        "updates": torch.cat([honest, malicious]), "honest": torch.arange(8),
    }


def _rule_args(problem: dict) -> dict:
    return {k: problem[k] for k in ("net", "global_params", "root_x", "root_y", "root_update")}


# ---------------------------------------------------------------- mask training


@pytest.mark.parametrize("optimizer", ["clipped_sgd", "sign_sgd", "adam"])
def test_train_masks_decreases_root_loss(problem, optimizer):
    models = sm.stack_models(problem["global_params"], problem["updates"], problem["root_update"])
    logits, losses = sm.train_masks(problem["net"], models, problem["root_x"], problem["root_y"], optimizer=optimizer)
    assert logits.shape == models.shape and not logits.requires_grad
    out = sm.masked_logits(problem["net"], models, logits, problem["root_x"])
    final = F.cross_entropy(out, problem["root_y"]).item()
    assert final < losses[0] - 0.05 and losses[-1] < losses[0]
    if optimizer == "clipped_sgd":  # the reference step moves a logit by at most lr * clip = 1
        assert (logits - 1.0).abs().max() <= len(losses) + 1e-4


def _autograd_masks(net, models, x, y, *, optimizer, steps=20, buffers=None):
    """Reference: autograd through masked_logits and the torch optimiser, the plain formulation."""
    mask = torch.full_like(models, 1.0, requires_grad=True)
    opt = kernels.make_optimizer(mask, optimizer, sm.DEFAULT_LR[optimizer])
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(sm.masked_logits(net, models, mask, x, buffers=buffers), y)
        losses.append(loss.item())
        loss.backward()
        kernels.transform_grad(mask.grad, optimizer, 1e-7)
        opt.step()
    return mask.detach(), losses


@pytest.mark.parametrize("optimizer", ["clipped_sgd", "sign_sgd", "adam"])
@pytest.mark.parametrize("block", [7, 64, 4096, None])
def test_blocked_mask_training_equals_autograd(problem, optimizer, block):
    """The blocked, preallocated mask step computes what autograd computes (d = 44 here, so
    blocks of 7 leave a short last block, and 4096 or automatic is one padded block). Tolerance: ``W_i - W`` is a small
    difference of close numbers, and clipped SGD multiplies gradients below the clip by 1e7, so
    one-ulp differences in ``W`` move such logits by up to ~1e-3; a wrong formula moves them by ~1."""
    net, models = problem["net"], sm.stack_models(problem["global_params"], problem["updates"], problem["root_update"])
    ref, ref_losses = _autograd_masks(net, models, problem["root_x"], problem["root_y"], optimizer=optimizer)
    got, losses = sm.train_masks(net, models, problem["root_x"], problem["root_y"], optimizer=optimizer,
                                 block=block, patience=100)
    torch.testing.assert_close(got, ref, atol=1e-2, rtol=0)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert torch.equal(sm.binarize(got), sm.binarize(ref))


def test_blocked_mask_training_equals_autograd_on_a_cnn_with_batchnorm():
    """ResNet20 with BatchNorm buffers, clipped SGD at lr 1e7: each step moves a logit by
    ``1e7 * dL/dM`` (up to 1), so the comparison needs both sides to see the same ``dL/dW``.
    The blocked step feeds the root images in channels-last order; NCHW convolutions round
    differently, and where ``dL/dM`` is within that rounding of 0 its step can change sign (one
    element in a million moved by 0.014 in torch 2.14.1). The reference therefore gets the same
    channels-last images (a memory layout: the values are equal), which leaves the mask step,
    the code under test, as the only difference."""
    net = make_model("resnet20", "cifar10", seed=1)
    w = flatten_params(net)
    gen = torch.Generator().manual_seed(2)
    models = w + 0.01 * torch.randn(4, len(w), generator=gen)
    x, y = torch.randn(6, 3, 32, 32, generator=gen), torch.arange(6) % 10
    buffers = {k: v + 0.1 for k, v in net.named_buffers() if v.is_floating_point()}
    ref, ref_losses = _autograd_masks(net, models, channels_last(x), y, optimizer="clipped_sgd", steps=3,
                                      buffers=buffers)
    got, losses = sm.train_masks(net, models, x, y, buffers=buffers, steps=3, patience=100, lr=1e8)
    assert not torch.equal(got, ref)  # lr 1e8 vs the reference's 1e7: the check below can fail
    got, losses = sm.train_masks(net, models, x, y, buffers=buffers, steps=3, patience=100)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)  # equal here; a wrong formula moves logits by ~1
    assert losses == pytest.approx(ref_losses, rel=1e-5)


def test_early_stopping_on_flat_loss(problem):
    same = problem["global_params"].expand(5, -1).clone()  # identical models: W does not depend on M
    args = (problem["net"], same, problem["root_x"], problem["root_y"])
    _, losses = sm.train_masks(*args, steps=20, patience=10, min_delta=1e-2)
    assert len(losses) == 11  # stopped after 10 steps without 1e-2 improvement
    _, losses = sm.train_masks(*args, steps=20, patience=20)
    assert len(losses) == 20


def _graph_loop_vs_plain(net, models, x, y, **options):
    """The graphed loop's logic (through :func:`_eager`, the capture without a graph) and the
    plain loop on the same problem: logits and losses."""
    blocked = kernels.to_blocks(models, models.shape[1])  # one block, as on a GPU
    common = dict(buffers=None, init=1.0, grad_clip=1e-7, **options)
    plain, plain_losses = kernels.train_mask_columns(net, blocked, x, y, graph=False, **common)
    graphed, graphed_losses = kernels.train_mask_columns(net, blocked, x, y, capture=kernels._eager, **common)
    return kernels.from_blocks(plain), plain_losses, kernels.from_blocks(graphed), graphed_losses


@pytest.mark.parametrize("optimizer,lr", [("clipped_sgd", 1e7), ("sign_sgd", 1.0)])
def test_graph_loop_equals_plain_loop(problem, optimizer, lr):
    """The loop that replays one whole step per call (CUDA graphs) returns the plain loop's
    logits and losses, with and without early stopping (which must undo the stalled step)."""
    models = sm.stack_models(problem["global_params"], problem["updates"], problem["root_update"])
    args = (problem["net"], models, problem["root_x"], problem["root_y"])
    for patience, min_delta, expect_stop in ((100, 1e-2, False), (2, 10.0, True)):
        plain, plain_losses, graphed, graphed_losses = _graph_loop_vs_plain(
            *args, optimizer=optimizer, lr=lr, steps=8, patience=patience, min_delta=min_delta)
        assert (len(plain_losses) < 8) == expect_stop  # early stopping fired exactly when asked
        assert graphed_losses == plain_losses
        assert torch.equal(graphed, plain)
        assert not torch.equal(plain, torch.ones_like(plain))  # the masks moved: the check can fail


def test_captured_step_is_replayed_for_the_next_call_with_new_inputs(problem):
    """The graphed loop keeps its captured step for the next call of the same shapes (the next
    round) and copies that call's inputs into the step's own tensors: each call equals the
    plain loop on its own models, root data and buffers (a replay that read the first call's
    inputs would not), the callers' tensors and the first call's returned logits are left as
    they were, and another shape captures anew."""
    net = make_model("resnet20", "cifar10", seed=1)  # BatchNorm: buffers are inputs too
    w = flatten_params(net)
    gen = torch.Generator().manual_seed(3)
    calls = []
    for shift in (0.0, 0.2):  # two rounds: other models, root batch and buffers
        models = kernels.to_blocks(w + 0.01 * torch.randn(4, len(w), generator=gen), len(w))
        x, y = torch.randn(6, 3, 32, 32, generator=gen), (torch.arange(6) + int(10 * shift)) % 10
        buffers = {k: v + shift for k, v in net.named_buffers() if v.is_floating_point()}
        calls.append((models, x, y, buffers))
    common = dict(steps=4, init=1.0, optimizer="clipped_sgd", lr=1e8, grad_clip=1e-7, patience=100, min_delta=1e-2)
    captured, replays = {}, []

    def capture(step):  # as _eager, counting the captures
        replays.append(step)
        return kernels._eager(step)

    results, snapshots = [], [[t.clone() for t in (m.data, x, y, *b.values())] for m, x, y, b in calls]
    for models, x, y, buffers in calls:
        plain = kernels.train_mask_columns(net, models, x, y, buffers=buffers, graph=False, **common)
        got = kernels.train_mask_columns(net, models, x, y, buffers=buffers, capture=capture, captured=captured,
                                         **common)
        assert got[1] == plain[1] and torch.equal(got[0].data, plain[0].data)
        results.append((got[0].data.clone(), got[0].data))
    for snapshot, (models, x, y, buffers) in zip(snapshots, calls):  # no call wrote into a caller's tensors
        assert all(torch.equal(a, b) for a, b in zip(snapshot, (models.data, x, y, *buffers.values())))
    assert len(replays) == 1  # captured once, replayed for the second call
    assert not torch.equal(results[0][0], results[1][0])  # the two calls differ: the check can fail
    assert torch.equal(results[0][0], results[0][1])  # the first call's logits survived the second
    models, x, y, buffers = calls[0]
    kernels.train_mask_columns(net, kernels.to_blocks(kernels.from_blocks(models)[:3], len(w)), x, y,
                               buffers=buffers, capture=capture, captured=captured, **common)
    assert len(replays) == 2  # three models instead of four: a new capture


def test_captured_step_outlives_its_call_as_a_graph_needs(problem):
    """A CUDA graph keeps raw pointers into the tensors it captured, not the Python objects:
    the captured step itself must own the function whose closure holds its scratch tensors.
    Without that they were freed when the call returned, and the next round's replay wrote
    into memory the clients' training had taken over (a 25-round run on an H200 diverged).
    Here the capture, like a graph, holds the function only weakly."""
    import gc
    import weakref

    def capture(step):
        step()
        function = weakref.ref(step)

        def replay():
            alive = function()
            assert alive is not None, "the captured step's function (and its scratch tensors) was freed"
            alive()
        return replay

    models = sm.stack_models(problem["global_params"], problem["updates"], problem["root_update"])
    blocked = kernels.to_blocks(models, models.shape[1])
    common = dict(buffers=None, steps=4, init=1.0, optimizer="clipped_sgd", lr=1e7, grad_clip=1e-7,
                  patience=100, min_delta=1e-2)
    args = (problem["net"], blocked, problem["root_x"], problem["root_y"])
    captured = {}
    kernels.train_mask_columns(*args, capture=capture, captured=captured, **common)
    gc.collect()
    got, losses = kernels.train_mask_columns(*args, capture=capture, captured=captured, **common)
    plain, plain_losses = kernels.train_mask_columns(*args, graph=False, **common)
    assert losses == plain_losses and torch.equal(got.data, plain.data)


def test_use_graph_decides_by_device_optimizer_and_switch(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv(kernels.GRAPH_ENV, raising=False)
    assert kernels.use_graph(None, cuda, "clipped_sgd", 1)
    assert not kernels.use_graph(None, cuda, "adam", 1)  # Adam steps through torch.optim: eager
    assert not kernels.use_graph(None, cuda, "clipped_sgd", 3)
    assert not kernels.use_graph(None, cpu, "clipped_sgd", 1)
    assert not kernels.use_graph(False, cuda, "clipped_sgd", 1)
    monkeypatch.setenv(kernels.GRAPH_ENV, "0")
    assert not kernels.use_graph(None, cuda, "clipped_sgd", 1)
    monkeypatch.setenv(kernels.GRAPH_ENV, "yes")
    with pytest.raises(ValueError, match="must be 0 or 1"):
        kernels.use_graph(None, cuda, "clipped_sgd", 1)
    with pytest.raises(ValueError, match="graph=True needs CUDA"):
        kernels.use_graph(True, cpu, "clipped_sgd", 1)


def test_binarize_threshold():
    logits = torch.tensor([[-2.0, -0.01, 0.0, 0.01, 2.0]])
    assert sm.binarize(logits).tolist() == [[False, False, False, True, True]]
    assert sm.binarize(logits, tau=0.8).tolist() == [[False, False, False, False, True]]  # logit(0.8) = 1.39
    assert sm.binarize(logits).dtype == torch.bool


# ---------------------------------------------------------------- clustering


def _groups(
    sizes: list[int], blocks: list[tuple[int, int]], seed: int, d: int = 3000, noise: float = 0.05
) -> torch.Tensor:
    """Binary masks: group ``g`` = a shared random pattern with coordinates ``blocks[g]`` flipped,
    then every bit flipped with probability ``noise``; groups stacked in order."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(d, generator=gen) < 0.7
    rows = []
    for size, (start, stop) in zip(sizes, blocks):
        pattern = base.clone()
        pattern[start:stop] = ~pattern[start:stop]
        rows.append(pattern.expand(size, -1) ^ (torch.rand(size, d, generator=gen) < noise))
    return torch.cat(rows)


@pytest.mark.parametrize("root_group", ["larger", "smaller"])
def test_cluster_masks_returns_the_roots_group(root_group):
    masks = _groups([70, 31], [(0, 0), (0, 300)], seed=0)  # the root (last row) is in the group of 31
    if root_group == "larger":
        masks = masks.flip(0)  # now groups of 31 then 70, the root still last, in the group of 70
    benign, info = sm.cluster_masks(masks)
    expected = torch.arange(70, 100) if root_group == "smaller" else torch.arange(31, 100)
    assert info["num_clusters"] == 2 and torch.equal(benign, expected)
    assert info["points"].shape == (101, 2) and info["labels"].shape == (101,)
    assert info["means"].shape == (2, 2) and info["covariances"].shape == (2, 2, 2)


def test_cluster_masks_root_not_last():
    masks = _groups([31, 70], [(0, 300), (0, 0)], seed=1)  # root = row 0, in the first group
    benign, _ = sm.cluster_masks(masks, root_index=0)
    assert torch.equal(benign, torch.arange(30))  # the other 30 members, indexed among rows 1..100


def test_cluster_masks_one_homogeneous_group_keeps_everyone():
    masks = _groups([101], [(0, 0)], seed=2)
    benign, info = sm.cluster_masks(masks)
    assert info["num_clusters"] == 1 and torch.equal(benign, torch.arange(100))
    assert info["means"].shape == (1, 2) and info["fit2"]["means"].shape == (2, 2)
    assert sm.cluster_masks(masks, criterion="always")[1]["num_clusters"] == 2  # the authors' code


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cluster_masks_mild_substructure_keeps_everyone(seed):
    """Ten subgroups of 10 (plus the root), each with its own 12 flipped bits, like non-IID label
    groups: BIC alone prefers two components and drops honest clients; the default does not."""
    masks = _groups([10] * 9 + [11], [(12 * j, 12 * j + 12) for j in range(10)], seed=seed)
    benign, info = sm.cluster_masks(masks)
    assert info["bic"][2] < info["bic"][1] and info["ashman_d"] < 8
    assert info["num_clusters"] == 1 and torch.equal(benign, torch.arange(100))
    assert len(sm.cluster_masks(masks, criterion="bic")[0]) < 100


def test_cluster_masks_is_reproducible():
    masks = _groups([60, 41], [(0, 0), (0, 200)], seed=3)
    (b1, i1), (b2, i2) = sm.cluster_masks(masks, seed=5), sm.cluster_masks(masks, seed=5)
    assert torch.equal(b1, b2) and torch.equal(i1["points"], i2["points"])
    assert torch.equal(i1["labels"], i2["labels"])


def test_pca_2d_matches_svd():
    masks = _groups([60, 41], [(0, 0), (0, 200)], seed=4, d=500)
    centred = masks.double().numpy() - masks.double().numpy().mean(axis=0)
    with threadpool_limits(1):
        u, s, _ = np.linalg.svd(centred, full_matrices=False)
    torch.testing.assert_close(sm.pca_2d(masks).abs(), torch.from_numpy(u[:, :2] * s[:2]).abs())


# ---------------------------------------------------------------- the rule


# A 44-parameter model's mask gradients (median ~1e-4) are far above the reference clip (1e-7),
# so each step moves every logit by a full 1 and 20 steps drive each coordinate to its extreme
# model (honest masks become sparse). Three steps play the part of a CNN round, where ~98% of
# the mask gradients are below the clip (real Fashion-MNIST, 100 clients) and logits move by
# fractions of 1 per step.
TINY_STEPS = 3


def test_stack_models_adds_updates_and_puts_the_root_last(problem):
    w, updates, g0 = problem["global_params"], problem["updates"], problem["root_update"]
    models = sm.stack_models(w, updates, g0)
    assert models.shape == (len(updates) + 1, len(w))
    torch.testing.assert_close(models[:-1], w + updates)  # W_i = w + U_i, not w - lr * U_i
    torch.testing.assert_close(models[-1], w + g0)


def test_stack_models_promotes_dtype_and_checks_shapes(problem):
    w, updates, g0 = problem["global_params"], problem["updates"], problem["root_update"]
    models = sm.stack_models(w.double(), updates, g0)
    assert models.dtype == torch.float64
    torch.testing.assert_close(models, w.double() + torch.cat([updates, g0[None]]).double())
    with pytest.raises(ValueError, match="root_update must be"):
        sm.stack_models(w, updates, g0[:-1])


@pytest.mark.parametrize("block", [5, 11, 44, 64, 4096])
def test_blocked_models_are_the_stacked_models_in_column_blocks(problem, block):
    """``stack_models(blocked=True)`` writes W_i = w + U_i (root last) straight into the layout that
    train_masks computes in; d = 44: blocks of 5 leave a tail, 11 and 44 divide d, 4096 is padded."""
    w, updates, g0 = problem["global_params"], problem["updates"], problem["root_update"]
    models = sm.stack_models(w, updates, g0)
    blocked = sm.stack_models(w, updates, g0, blocked=True, block=block)
    assert blocked.shape == models.shape and blocked.data.shape[2] == min(block, 64)  # one block: padded to 64
    assert torch.equal(blocked.data, kernels.to_blocks(models, block).data)
    assert torch.equal(kernels.from_blocks(blocked), models)
    padding = blocked.data.transpose(0, 1).reshape(12, -1)[:, 44:]
    assert torch.equal(padding, torch.zeros_like(padding))
    (logits, losses), (blocked_logits, blocked_losses) = (
        sm.train_masks(problem["net"], m, problem["root_x"], problem["root_y"], steps=TINY_STEPS, block=block)
        for m in (models, blocked)
    )
    assert isinstance(blocked_logits, sm.ColumnBlocks) and blocked_losses == losses
    assert torch.equal(kernels.from_blocks(blocked_logits), logits)
    assert torch.equal(sm.binarize(blocked_logits), sm.binarize(logits))


@pytest.mark.parametrize("block", [5, 11, 44, 64, 4096, None])
def test_binarize_is_the_threshold_of_the_sigmoid_for_every_block(block):
    """Column blocks are a memory layout: near-threshold logits are binarised as ``sigmoid(M) > tau``."""
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(9, 44, generator=gen)
    logits[0, :6] = torch.tensor([0.0, 1e-9, -1e-9, 3e-8, 1e-6, -1e-6])  # around sigmoid(M) = 0.5
    logits[1, :3] = torch.logit(torch.tensor([0.8, 0.8, 0.8])) + torch.tensor([0.0, 1e-6, -1e-6])
    for tau in (0.5, 0.8):
        got = sm.binarize(logits, tau, block=block)
        assert got.dtype == torch.bool and torch.equal(got, torch.sigmoid(logits) > tau)


def test_block_is_a_memory_layout_on_a_small_cnn():
    """One whole block (what other devices use) and the CPU's 4096 columns train the same masks up
    to float rounding, and the rule keeps the same clients (d = 139,960: 35 blocks, a short last one)."""
    net = FMNISTCNN()
    w = flatten_params(net)
    gen = torch.Generator().manual_seed(3)
    honest = 0.01 * torch.randn(12, len(w), generator=gen)
    updates = torch.cat([honest, -4.0 * honest.mean(dim=0).expand(4, -1)])
    g0 = honest.mean(dim=0)
    x, y = torch.randn(32, 1, 28, 28, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    models = sm.stack_models(w, updates, g0)
    (whole, whole_losses), (blocked, losses) = (
        sm.train_masks(net, models, x, y, steps=4, patience=100, block=b) for b in (len(w), 4096)
    )
    # the column sums round differently for other row widths, and lr 1e7 turns a one-ulp change of
    # W into ~1e-4 on a logit; a layout bug moves logits by ~1
    torch.testing.assert_close(blocked, whole, atol=1e-3, rtol=0)
    assert losses == pytest.approx(whole_losses, rel=1e-5)
    kept_whole, _ = sm.cluster_masks(sm.binarize(whole, block=len(w)))
    kept_blocked, _ = sm.cluster_masks(sm.binarize(blocked))
    assert torch.equal(kept_whole, kept_blocked) and torch.equal(kept_blocked, torch.arange(12))


def test_skymask_equals_its_steps_chained(problem):
    """The rule's block layout changes nothing: same masks, clusters and update as the public steps."""
    args = _rule_args(problem)
    agg = sm.skymask(problem["updates"], **args, steps=TINY_STEPS, return_masks=True)
    models = sm.stack_models(problem["global_params"], problem["updates"], problem["root_update"])
    logits, losses = sm.train_masks(args["net"], models, args["root_x"], args["root_y"],
                                    buffers=args.get("global_buffers"), steps=TINY_STEPS)
    masks = sm.binarize(logits)
    benign, info = sm.cluster_masks(masks)
    assert torch.equal(agg.info["masks"], masks) and agg.info["mask_losses"] == losses
    assert torch.equal(agg.kept, benign) and torch.equal(agg.info["points"], info["points"])
    assert torch.equal(agg.update, sm.average_kept(problem["updates"], benign))
    assert agg.stats == sm.decision_stats(info, benign, problem["updates"], problem["root_update"])


def test_skymask_keeps_exactly_the_honest_clients(problem):
    agg = sm.skymask(problem["updates"], **_rule_args(problem), steps=TINY_STEPS, return_masks=True)
    assert torch.equal(agg.kept, problem["honest"])
    torch.testing.assert_close(agg.update, problem["updates"][problem["honest"]].mean(dim=0))
    assert agg.info["num_clusters"] == 2 and agg.info["masks"].shape == (12, problem["updates"].shape[1])
    assert len(agg.info["mask_losses"]) == TINY_STEPS
    assert agg.info["mask_seconds"] >= 0 and agg.info["cluster_seconds"] >= 0


def test_skymask_no_attack_keeps_everyone(problem):
    honest = problem["updates"][problem["honest"]]
    agg = sm.skymask(honest, **_rule_args(problem), steps=TINY_STEPS)
    assert torch.equal(agg.kept, problem["honest"]) and "masks" not in agg.info


def test_cluster_masks_root_alone_gives_no_benign_client():
    masks = _groups([100, 1], [(0, 0), (0, 300)], seed=0)
    benign, info = sm.cluster_masks(masks)
    assert info["num_clusters"] == 2 and benign.numel() == 0


def test_skymask_empty_root_cluster_gives_zero_update(problem, monkeypatch):
    nobody = torch.empty(0, dtype=torch.long)
    info = {"num_clusters": 2, "ashman_d": 20.0, "bic": {1: 3.0, 2: 1.0}, "criterion": "ashman", "threshold": 8.0,
            "other_size": 11, "spread_ratio": 1.0}
    monkeypatch.setattr(sm, "cluster_masks", lambda masks, **kw: (nobody, dict(info)))
    agg = sm.skymask(problem["updates"], **_rule_args(problem))
    assert agg.kept.numel() == 0 and torch.equal(agg.update, torch.zeros_like(problem["updates"][0]))
    assert agg.stats["root_cluster_size"] == 0 and any("minority" in w for w in agg.stats["warnings"])


def test_skymask_is_reproducible(problem):
    a, b = (sm.skymask(problem["updates"], **_rule_args(problem), steps=TINY_STEPS, seed=3) for _ in range(2))
    assert torch.equal(a.kept, b.kept) and torch.equal(a.update, b.update)
    assert torch.equal(a.info["points"], b.info["points"]) and a.info["mask_losses"] == b.info["mask_losses"]


def test_skymask_through_bound_rule(problem):
    fields = ("net", "global_params", "global_buffers", "root_x", "root_y", "root_update")
    rule = BoundRule(sm.skymask, fields, {"steps": TINY_STEPS})
    ctx = RoundContext(
        round=1, num_clients=11, num_malicious=3, malicious=torch.arange(8, 11), net=problem["net"],
        global_params=problem["global_params"], root_x=problem["root_x"], root_y=problem["root_y"],
        root_update=problem["root_update"],
    )
    assert rule.needs_root_update and torch.equal(rule(problem["updates"], ctx).kept, problem["honest"])
    with pytest.raises(ValueError, match="root update"):
        sm.skymask(problem["updates"], **{**_rule_args(problem), "root_update": None})


# ---------------------------------------------------------------- decision statistics (defense_info)


def _norm_rows(n: int = 10, d: int = 6) -> torch.Tensor:
    """Row ``i`` is ``(i + 1) e_0``: norms 1..n, median (n + 1) / 2."""
    rows = torch.zeros(n, d)
    rows[:, 0] = torch.arange(1, n + 1, dtype=torch.float32)
    return rows


_INFO = {"num_clusters": 2, "ashman_d": 12.5, "bic": {1: 40.0, 2: 10.0}, "criterion": "ashman", "threshold": 8.0,
         "other_size": 20, "spread_ratio": 0.5}


@pytest.mark.parametrize(
    "root_norm, num_kept, reasons",
    [(5.5, 10, []), (5.5, 5, []), (5.5, 4, ["minority"]), (100.0, 10, ["outside"]), (0.5, 10, ["outside"]),
     (0.0, 3, ["outside", "minority"])],
)
def test_decision_stats_are_json_safe_and_warn_why(root_norm, num_kept, reasons):
    """||g0|| / median ||U_i|| outside [0.1, 10] and a kept minority (< half) are reported, nothing else."""
    updates = _norm_rows()  # median norm 5.5
    root_update = torch.zeros(6)
    root_update[1] = root_norm
    stats = sm.decision_stats(dict(_INFO), torch.arange(num_kept), updates, root_update)
    json.dumps(stats, allow_nan=False)  # plain JSON: no tensors, no NaN or Inf
    assert stats["root_norm_ratio"] == pytest.approx(root_norm / 5.5)
    assert stats["root_cluster_size"] == num_kept and isinstance(stats["root_cluster_size"], int)
    assert (stats["num_clusters"], stats["ashman_d"], stats["bic_1"], stats["bic_2"]) == (2, 12.5, 40.0, 10.0)
    assert (stats["criterion"], stats["threshold"]) == ("ashman", 8.0)
    assert len(stats["warnings"]) == len(reasons)
    for warning, reason in zip(stats["warnings"], reasons):
        assert reason in warning


def test_decision_stats_with_zero_client_updates_record_no_infinity():
    stats = sm.decision_stats(dict(_INFO), torch.arange(10), torch.zeros(10, 6), torch.ones(6))
    assert stats["root_norm_ratio"] is None and "outside" in stats["warnings"][0]
    json.dumps(stats, allow_nan=False)


def test_skymask_stats_describe_its_decision(problem):
    agg = sm.skymask(problem["updates"], **_rule_args(problem), steps=TINY_STEPS)
    norms = np.linalg.norm(problem["updates"].numpy(), axis=1)
    ratio = np.linalg.norm(problem["root_update"].numpy()) / np.median(norms)
    assert agg.stats["root_norm_ratio"] == pytest.approx(ratio, rel=1e-5)
    assert agg.stats["num_clusters"] == agg.info["num_clusters"] and agg.stats["ashman_d"] == agg.info["ashman_d"]
    assert (agg.stats["bic_1"], agg.stats["bic_2"]) == (agg.info["bic"][1], agg.info["bic"][2])
    assert agg.stats["root_cluster_size"] == len(agg.kept) == 8 and agg.stats["warnings"] == []
    json.dumps(agg.stats, allow_nan=False)
    # issue 14's measured failure: the clients' updates scaled up with g0 unchanged; the round says so
    scaled = sm.skymask(1000.0 * problem["updates"], **_rule_args(problem), steps=TINY_STEPS)
    assert any("root update norm" in w for w in scaled.stats["warnings"])


# ---------------------------------------------------------------- devices


def test_skymask_creates_no_tensor_on_the_default_device(problem):
    """With the default device set to ``meta``, any tensor made without an explicit device lands
    there and fails against the CPU inputs: the rule must build everything on the inputs' device."""
    expected = sm.skymask(problem["updates"], **_rule_args(problem), steps=TINY_STEPS)
    with torch.device("meta"):
        got = sm.skymask(problem["updates"], **_rule_args(problem), steps=TINY_STEPS)
    assert got.update.device.type == "cpu" and got.kept.device.type == "cpu"
    assert torch.equal(got.kept, expected.kept) and torch.equal(got.update, expected.update)
    assert got.stats == expected.stats


def test_mask_steps_run_on_meta_tensors():
    """The steps that need no value on the host (stacking, the masked model and its gradient,
    binarising) run on ``meta`` tensors: their outputs stay on the inputs' device."""
    net = FMNISTCNN().to("meta")
    d = sum(p.numel() for p in net.parameters())
    w, updates, g0 = torch.empty(d, device="meta"), torch.empty(5, d, device="meta"), torch.empty(d, device="meta")
    models = sm.stack_models(w, updates, g0)
    assert models.device.type == "meta" and models.shape == (6, d)
    logits = torch.ones_like(models, requires_grad=True)
    out = sm.masked_logits(net, models, logits, torch.empty(4, 1, 28, 28, device="meta"))
    F.cross_entropy(out, torch.zeros(4, dtype=torch.long, device="meta")).backward()
    assert out.shape == (4, 10) and logits.grad.device.type == "meta"
    for block in (None, 4096):
        masks = sm.binarize(logits.detach(), block=block)
        assert masks.device.type == "meta" and masks.dtype == torch.bool and masks.shape == (6, d)
    blocked = sm.stack_models(w, updates, g0, blocked=True)  # one whole block off the CPU
    assert blocked.data.device.type == "meta" and blocked.data.shape == (1, 6, d)
    assert sm.binarize(blocked).device.type == "meta"
    assert kernels.resolve_block(None, torch.device("meta"), d) == d  # one whole block off the CPU
    assert kernels.resolve_block(None, torch.device("cpu"), d) == kernels.CPU_BLOCK


def test_mask_geometry_records_what_recomputes_the_decision(problem):
    """With record_geometry the stats hold the PCA points, the 2-component fit and per-mask bit
    shares that agree with the masks themselves; the decision can be recomputed from them."""
    agg = sm.skymask(problem["updates"], **_rule_args(problem), steps=TINY_STEPS, return_masks=True,
                     record_geometry=True)
    geometry, masks = agg.stats["geometry"], agg.info["masks"]
    json.dumps(agg.stats, allow_nan=False)
    k = masks.shape[0]
    assert len(geometry["points"]) == len(geometry["labels"]) == len(geometry["root_hamming"]) == k
    hamming = (masks != masks[-1]).double().mean(dim=1)
    assert geometry["root_hamming"][-1] == 0.0
    torch.testing.assert_close(torch.tensor(geometry["root_hamming"], dtype=torch.float64), hamming, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(geometry["ones"], dtype=torch.float64), masks.double().mean(dim=1),
                               atol=1e-5, rtol=0)
    d = sm.ashman_d(np.array(geometry["means"]), np.array(geometry["covariances"]))
    assert d == pytest.approx(agg.stats["ashman_d"], rel=1e-3)
    root = geometry["labels"][-1]
    kept = [i for i, label in enumerate(geometry["labels"][:-1]) if label == root]
    assert agg.stats["num_clusters"] == 1 or kept == agg.kept.tolist()


def _clusters(centre, spread, count, gen):
    return centre + spread * torch.randn(count, 2, generator=gen, dtype=torch.float64)


def test_robust_spread_ignores_one_far_member():
    gen = torch.Generator().manual_seed(0)
    tight = np.zeros((20, 2))
    assert sm.robust_spread(tight) == 0.0
    assert sm.robust_spread(np.vstack([tight, [[50.0, 50.0]]])) == 0.0  # the median is not moved
    cloud = _clusters(torch.zeros(2), 1.0, 200, gen).numpy()
    assert 0.8 < sm.robust_spread(cloud) < 1.6  # median of a 2-D Rayleigh(1) is 1.18


@pytest.mark.parametrize("criterion", ["collapse_or_ashman", "ashman"])
def test_collapsed_colluders_are_a_cluster_even_close_by(criterion, monkeypatch):
    """20 identical (colluding) points close to an honest cloud of 80 and the root: D stays
    below 8, yet the new rule splits them off; the old rule keeps them."""
    gen = torch.Generator().manual_seed(1)
    honest = _clusters(torch.zeros(2), 1.0, 80, gen)
    colluders = torch.tensor([[3.0, 0.0]], dtype=torch.float64).expand(20, 2)
    points = torch.cat([colluders, honest, torch.zeros(1, 2, dtype=torch.float64)])  # root last, in the cloud
    monkeypatch.setattr(clustering, "pca_2d", lambda masks: points)
    benign, info = sm.cluster_masks(torch.zeros(101, 3, dtype=torch.bool), criterion=criterion)
    assert info["ashman_d"] < 8 and info["other_size"] == 20 and info["spread_ratio"] < sm.COLLAPSE_RATIO
    if criterion == "collapse_or_ashman":
        assert info["num_clusters"] == 2 and benign.tolist() == list(range(20, 100))
    else:
        assert info["num_clusters"] == 1 and len(benign) == 100


def test_a_single_outlier_is_not_a_cluster(monkeypatch):
    """One honest client far from the rest: D is large, but a cluster needs two clients."""
    gen = torch.Generator().manual_seed(2)
    points = torch.cat([torch.tensor([[40.0, 40.0]], dtype=torch.float64), _clusters(torch.zeros(2), 1.0, 99, gen),
                        torch.zeros(1, 2, dtype=torch.float64)])
    monkeypatch.setattr(clustering, "pca_2d", lambda masks: points)
    benign, info = sm.cluster_masks(torch.zeros(101, 3, dtype=torch.bool))
    old, _ = sm.cluster_masks(torch.zeros(101, 3, dtype=torch.bool), criterion="ashman")
    assert info["other_size"] == 1 and info["num_clusters"] == 1 and len(benign) == 100
    assert len(old) == 99  # the earlier rule drops the outlier


def test_two_honest_groups_stay_one_cluster(monkeypatch):
    """Two spread-out honest groups (non-IID labels): neither collapsed nor far apart."""
    gen = torch.Generator().manual_seed(3)
    points = torch.cat([_clusters(torch.tensor([0.0, 0.0]), 1.0, 50, gen),
                        _clusters(torch.tensor([4.0, 0.0]), 1.0, 50, gen), torch.zeros(1, 2, dtype=torch.float64)])
    monkeypatch.setattr(clustering, "pca_2d", lambda masks: points)
    benign, info = sm.cluster_masks(torch.zeros(101, 3, dtype=torch.bool))
    assert info["bic"][2] < info["bic"][1] and info["ashman_d"] < 8 and info["spread_ratio"] > sm.COLLAPSE_RATIO
    assert info["num_clusters"] == 1 and len(benign) == 100


def test_a_stray_near_a_collapsed_cluster_is_kept(monkeypatch):
    """20 coinciding attackers plus one honest client the mixture attaches to them from 2 root
    spreads away: the cluster dropped is the attackers' core; the stray is kept."""
    gen = torch.Generator().manual_seed(4)
    honest = _clusters(torch.zeros(2), 1.0, 79, gen)
    colluders = torch.tensor([[9.0, 0.0]], dtype=torch.float64).expand(20, 2)
    stray = torch.tensor([[9.0, 2.5]], dtype=torch.float64)
    points = torch.cat([colluders, stray, honest, torch.zeros(1, 2, dtype=torch.float64)])  # root last
    monkeypatch.setattr(clustering, "pca_2d", lambda masks: points)
    benign, info = sm.cluster_masks(torch.zeros(101, 3, dtype=torch.bool))
    assert info["num_clusters"] == 2 and info["spread_ratio"] < sm.COLLAPSE_RATIO
    assert info["other_size"] == 21 and info["strays"] == [20]  # the mixture put the stray with them
    assert benign.tolist() == list(range(20, 100))


def test_a_root_beside_collapsed_colluders_does_not_save_them():
    """The root's mask lies between 8 honest clients and 2 identical attackers, nearer the
    attackers (as in the 10-client Flower run): the mixture puts it with them. The collapsed
    group is still the colluders': the default keeps the 8 honest clients, while keeping "the
    root's component" (``criterion="ashman"``, the paper's reading) keeps the attackers."""
    gen = torch.Generator().manual_seed(0)
    d = 4000
    honest_base = torch.rand(d, generator=gen) < 0.8
    attack = honest_base ^ (torch.rand(d, generator=gen) < 0.3)

    def noisy(base: torch.Tensor, p: float) -> torch.Tensor:
        return base ^ (torch.rand(d, generator=gen) < p)

    masks = torch.stack([*(noisy(honest_base, 0.1) for _ in range(8)), attack, attack, noisy(attack, 0.12)])
    benign, info = sm.cluster_masks(masks)
    labels = info["fit2"]["labels"]
    assert labels[10] == labels[8] == labels[9] and (labels[:8] != labels[10]).all()  # root with the attackers
    assert info["root_side_ratio"] < sm.COLLAPSE_RATIO and info["num_clusters"] == 2
    assert benign.tolist() == list(range(8))
    paper, _ = sm.cluster_masks(masks, criterion="ashman")
    assert paper.tolist() == [8, 9]


def test_a_root_side_stray_is_kept(monkeypatch):
    """The root beside 20 coinciding attackers and one honest client the mixture put with them
    from far away: the honest stray is kept, the collapsed core dropped."""
    gen = torch.Generator().manual_seed(5)
    honest = _clusters(torch.zeros(2), 1.0, 79, gen)
    colluders = torch.tensor([[12.0, 0.0]], dtype=torch.float64).expand(20, 2)
    stray = torch.tensor([[12.0, 3.0]], dtype=torch.float64)
    root = torch.tensor([[10.0, 0.0]], dtype=torch.float64)
    points = torch.cat([colluders, stray, honest, root])
    monkeypatch.setattr(clustering, "pca_2d", lambda masks: points)
    benign, info = sm.cluster_masks(torch.zeros(101, 3, dtype=torch.bool))
    assert info["fit2"]["labels"][100] == info["fit2"]["labels"][0]  # the root joined the attackers
    assert info["num_clusters"] == 2 and info["root_side_ratio"] < sm.COLLAPSE_RATIO
    assert info["strays"] == [20] and benign.tolist() == list(range(20, 100))
