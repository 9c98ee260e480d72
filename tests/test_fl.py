import copy

import pytest
import torch

from skymask_lite.aggregation import Aggregation
from skymask_lite.attacks import make_attack
from skymask_lite.defenses import make_defense
from skymask_lite.fl import (
    CLIENT_STREAM,
    ROOT_STREAM,
    Federation,
    LocalRecipe,
    client_batches,
    client_schedules,
    conv_autotune,
    cudnn_autotune_enabled,
    derive_seed,
    initial_state,
    local_sgd,
    predict,
    root_steps_like_clients,
    run_round,
    torch_threads,
    train_clients,
    train_clients_parallel,
    train_root,
)
from skymask_lite.models import float_buffers, flatten_params, make_model


def _clients(n=4, sizes=(70, 45, 64, 33), shape=(1, 28, 28)):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(m, *shape, generator=g), torch.randint(0, 10, (m,), generator=g)) for m in sizes[:n]]


def test_client_batches_cover_each_epoch_once():
    batches = client_batches(70, 32, 2, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [32, 32, 6] * 2
    assert sorted(torch.cat(batches[:3]).tolist()) == list(range(70))


def test_local_sgd_is_plain_sgd_on_the_class_dimension():
    """One step equals w - lr * grad of the mean cross-entropy over classes."""
    net = make_model("lr", "fmnist")
    w = flatten_params(net)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    update, _ = local_sgd(net, w, x, y, [torch.arange(8)], LocalRecipe(lr=0.3))
    W, b = w[:7840].view(10, 784).clone().requires_grad_(), w[7840:].clone().requires_grad_()
    logits = x.flatten(1) @ W.T + b
    loss = -(logits.log_softmax(dim=1)[torch.arange(8), y]).mean()
    gW, gb = torch.autograd.grad(loss, (W, b))
    assert torch.allclose(update, -0.3 * torch.cat([gW.flatten(), gb]), atol=1e-6)


def test_gradient_clamp_bounds_each_step():
    net = make_model("lr", "fmnist")
    x, y = torch.randn(8, 1, 28, 28) * 100, torch.randint(0, 10, (8,))
    update, _ = local_sgd(net, flatten_params(net), x, y, [torch.arange(8)] * 3, LocalRecipe(lr=0.5, grad_clip=0.01))
    assert update.abs().max() <= 3 * 0.5 * 0.01 + 1e-7


@pytest.mark.parametrize("model,epochs", [("cnn", 1), ("lr", 3)])
def test_loop_and_batched_engines_agree(model, epochs):
    net = make_model(model, "fmnist")
    w, data = flatten_params(net), _clients()
    recipe = LocalRecipe(lr=0.05, batch_size=32, epochs=epochs)
    seeds = [derive_seed(0, 1, 0, i) for i in range(len(data))]
    loop, _ = train_clients(net, w, data, recipe, seeds, engine="loop")
    batched, _ = train_clients(net, w, data, recipe, seeds, engine="batched")
    assert loop.shape == (4, len(w))
    assert torch.allclose(loop, batched, atol=1e-6, rtol=1e-4)
    assert loop.norm(dim=1).min() > 0


@pytest.mark.parametrize("model", ["cnn", "lr"])
def test_parallel_engine_agrees_with_the_loop_and_not_with_its_thread_count(model):
    net = make_model(model, "fmnist")
    w, data = flatten_params(net), _clients()
    recipe = LocalRecipe(lr=0.05, batch_size=16, epochs=2)
    seeds = [derive_seed(0, 1, 0, i) for i in range(len(data))]
    schedules = client_schedules(data, recipe, seeds)
    one, _ = train_clients_parallel(net, w, data, recipe, schedules, workers=1)
    two, _ = train_clients_parallel(net, w, data, recipe, schedules, workers=2)
    assert torch.equal(flatten_params(net), w)  # the parallel engine trains copies, not the template
    loop, _ = train_clients(net, w, data, recipe, seeds, engine="loop")
    assert torch.equal(one, two)
    assert torch.allclose(loop, two, atol=1e-6, rtol=1e-4)


def test_parallel_engine_keeps_batchnorm_statistics_per_client():
    """ResNet20 (BatchNorm, batch 8) amplifies float32 rounding (about 15% after 3 steps at init),
    so both engines are compared with a float64 run of the loop: the parallel engine must be
    about as close as the loop. The given statistics (not the template's) must be the start."""
    net = make_model("resnet20", "cifar10")
    w, data = flatten_params(net), _clients(2, sizes=(20, 12), shape=(3, 32, 32))
    buffers = {n: b + 0.5 for n, b in net.named_buffers() if b.is_floating_point()}
    recipe = LocalRecipe(lr=0.05, batch_size=8)
    loop, loop_buf = train_clients(net, w, data, recipe, [1, 2], buffers, engine="loop")
    par, par_buf = train_clients(net, w, data, recipe, [1, 2], buffers, engine="parallel")
    exact, exact_buf = train_clients(
        net.double(), w.double(), [(x.double(), y) for x, y in data], recipe, [1, 2],
        {n: b.double() for n, b in buffers.items()}, engine="loop",
    )

    def error(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    assert error(par, exact) < 2 * error(loop, exact) + 1e-6
    for name in exact_buf:
        assert error(par_buf[name], exact_buf[name]) < 2 * error(loop_buf[name], exact_buf[name]) + 1e-6


def test_batched_engine_carries_batchnorm_statistics_like_the_loop():
    """ResNet20: the batched engine's updates and running statistics equal the loop's, with
    clients of different sizes (a smaller last batch, fewer steps) and 2 epochs.

    In float64: ResNet20 on random images with batches of 5-8 amplifies float32 rounding to
    about 1e-2 within a few steps in EITHER engine, which would hide a real difference; in
    float64 both agree to about 1e-15 and a padded example in the batch statistics would show.
    """
    net = make_model("resnet20", "cifar10").double()
    w, buffers = flatten_params(net), float_buffers(net)
    data = [(x.double(), y) for x, y in _clients(3, sizes=(20, 13, 7), shape=(3, 32, 32))]
    recipe = LocalRecipe(lr=0.05, batch_size=8, epochs=2)
    loop, loop_buf = train_clients(net, w, data, recipe, [3, 4, 5], buffers, engine="loop")
    batched, batched_buf = train_clients(net, w, data, recipe, [3, 4, 5], buffers, engine="batched")
    assert loop.norm() > 0 and set(batched_buf) == set(loop_buf) == set(buffers)
    torch.testing.assert_close(batched, loop, atol=1e-12, rtol=1e-10)
    for name in buffers:
        assert not torch.equal(loop_buf[name][0], buffers[name])  # the statistics did move
        torch.testing.assert_close(batched_buf[name], loop_buf[name], atol=1e-12, rtol=1e-10)


def test_conv_autotune_switches_cudnn_benchmark_on_cuda_only_and_restores_it(monkeypatch):
    """The batched engine's cuDNN autotuning: on inside the block on a CUDA device (a device
    object needs no GPU), the previous setting back after it, also after an error; nothing on
    the CPU; ``SKYMASK_CUDNN_BENCHMARK=0`` switches it off and any other value is an error."""
    monkeypatch.delenv("SKYMASK_CUDNN_BENCHMARK", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with conv_autotune(torch.device("cpu")):
        assert torch.backends.cudnn.benchmark is False
    with pytest.raises(RuntimeError, match="inside"):
        with conv_autotune(torch.device("cuda", 0)):
            assert torch.backends.cudnn.benchmark is True
            raise RuntimeError("inside")
    assert torch.backends.cudnn.benchmark is False
    monkeypatch.setenv("SKYMASK_CUDNN_BENCHMARK", "0")
    with conv_autotune(torch.device("cuda", 0)):
        assert torch.backends.cudnn.benchmark is False
    monkeypatch.setenv("SKYMASK_CUDNN_BENCHMARK", "yes")
    with pytest.raises(ValueError, match="SKYMASK_CUDNN_BENCHMARK must be 0 or 1"):
        cudnn_autotune_enabled()


def test_batched_engine_trains_inside_conv_autotune(monkeypatch):
    """Both batched paths (padded, BatchNorm) train inside ``conv_autotune`` of their device."""
    import contextlib

    from skymask_lite import fl

    seen = []

    @contextlib.contextmanager
    def record(device):
        seen.append(device)
        yield

    monkeypatch.setattr(fl, "conv_autotune", record)
    recipe = LocalRecipe(lr=0.05, batch_size=4, epochs=1)
    for model, shape in (("cnn", (1, 28, 28)), ("resnet20", (3, 32, 32))):
        net = make_model(model, "cifar10" if model == "resnet20" else "fmnist")
        w, buffers = flatten_params(net), float_buffers(net)
        train_clients(net, w, _clients(2, sizes=(4, 4), shape=shape), recipe, [1, 2], buffers, engine="batched")
    assert seen == [torch.device("cpu")] * 2


def test_batched_engine_runs_a_resnet_round_like_the_loop():
    """A whole round of ResNet20 (root update included) by both engines: the same kept clients
    and the same averaged running statistics to float tolerance."""
    results = {}
    for engine in ("loop", "batched"):
        net = make_model("resnet20", "cifar10").double()
        data = [(x.double(), y) for x, y in _clients(3, sizes=(12, 9, 16), shape=(3, 32, 32))]
        root = tuple(t.double() if t.is_floating_point() else t for t in _clients(1, sizes=(10,), shape=(3, 32, 32))[0])
        fed = Federation(net, data, test=root, root=root, malicious=torch.tensor([0]), num_classes=10,
                         recipe=LocalRecipe(lr=0.05, batch_size=8), engine=engine)
        state = initial_state(fed)
        record = run_round(fed, state, make_attack("none"), make_defense("fltrust"))
        results[engine] = (record, state)
    (rec_loop, s_loop), (rec_batched, s_batched) = results["loop"], results["batched"]
    assert rec_loop["kept"] == rec_batched["kept"]
    torch.testing.assert_close(s_batched.params, s_loop.params, atol=1e-12, rtol=1e-10)
    for name, value in s_loop.buffers.items():
        torch.testing.assert_close(s_batched.buffers[name], value, atol=1e-12, rtol=1e-10)


def test_unknown_engine():
    net = make_model("lr", "fmnist")
    with pytest.raises(ValueError, match="unknown engine"):
        train_clients(net, flatten_params(net), _clients(1), LocalRecipe(), [0], engine="threads")
    with pytest.raises(ValueError, match="CPU threads"):
        train_clients(net, flatten_params(net).to("meta"), _clients(1), LocalRecipe(), [0], engine="parallel")


def test_root_update_takes_the_asked_number_of_steps():
    net = make_model("lr", "fmnist")
    w = flatten_params(net)
    x, y = torch.randn(100, 1, 28, 28), torch.randint(0, 10, (100,))
    assert root_steps_like_clients([600, 590, 610], LocalRecipe(batch_size=32)) == 19
    short = train_root(net, w, x, y, LocalRecipe(lr=0.01), 1, seed=0)
    long = train_root(net, w, x, y, LocalRecipe(lr=0.01), 19, seed=0)
    assert long.norm() > 3 * short.norm()


def _federation(malicious=(), engine="loop", model="lr"):
    data = _clients()
    g = torch.Generator().manual_seed(2)
    test = (torch.randn(50, 1, 28, 28, generator=g), torch.randint(0, 10, (50,), generator=g))
    return Federation(
        net=make_model(model, "fmnist"), client_data=data, test=test, root=data[0],
        malicious=torch.tensor(malicious, dtype=torch.long), num_classes=10, engine=engine,
    )


def _mean(updates, ctx):
    return Aggregation(updates.mean(dim=0), torch.arange(updates.shape[0]))


def test_run_round_applies_the_rule_and_records_detection():
    fed = _federation(malicious=(1,))
    state = initial_state(fed)
    w0 = state.params.clone()
    seen = {}

    def keep_first_two(updates, ctx):
        seen["updates"] = updates
        return Aggregation(updates[:2].mean(dim=0), torch.tensor([0, 1]))

    record = run_round(fed, state, lambda u, ctx: u, keep_first_two)
    assert torch.allclose(state.params, w0 + seen["updates"][:2].mean(dim=0))
    assert record["round"] == 1 and record["kept"] == [0, 1]
    assert record["fpr"] == pytest.approx(2 / 3) and record["fnr"] == 1.0
    assert record["test_acc"] == pytest.approx((predict(fed.net, state.params, fed.test[0]) == fed.test[1]).float().mean().item())
    assert set(record["timing"]) == {"clients", "attack", "defense", "eval"}


def test_each_phase_of_a_round_waits_for_its_device(monkeypatch):
    import skymask_lite.fl as fl_module

    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    fl_module.phase_clock(torch.device("cpu"))
    assert synced == []  # the CPU has no queue to wait for
    fl_module.phase_clock(torch.device("cuda", 1))
    assert synced == [torch.device("cuda", 1)]

    clocks = []
    real = fl_module.phase_clock
    monkeypatch.setattr(fl_module, "phase_clock", lambda device: clocks.append(device) or real(device))
    fed = _federation()
    state = initial_state(fed)
    record = run_round(fed, state, lambda u, ctx: u, _mean)
    assert clocks == [state.params.device] * 5  # round start and the end of each of four phases
    assert record["seconds"] == pytest.approx(sum(record["timing"].values()))


def test_rounds_are_reproducible_and_engine_independent():
    records = []
    for engine in ("loop", "loop", "batched", "parallel"):
        fed = _federation(engine=engine)
        state = initial_state(fed)
        records.append([run_round(fed, state, lambda u, c: u, _mean)["test_acc"] for _ in range(2)] + [state.params])
    assert records[0][:2] == records[1][:2] and torch.equal(records[0][2], records[1][2])
    assert torch.allclose(records[0][2], records[2][2], atol=1e-5)
    assert torch.allclose(records[0][2], records[3][2], atol=1e-5)


def test_attack_must_return_n_rows():
    fed = _federation()
    with pytest.raises(RuntimeError, match="must receive 4"):
        run_round(fed, initial_state(fed), lambda u, c: u[:3], _mean)


def test_diverged_local_training_stops_the_run_and_names_the_clients():
    fed = _federation(malicious=(2,))
    state = initial_state(fed)
    fed.client_data[2] = (fed.client_data[2][0] * float("inf"), fed.client_data[2][1])
    with pytest.raises(FloatingPointError, match=r"round 1: .*clients 2 \(malicious\).*--grad-clip"):
        run_round(fed, state, lambda u, c: u, _mean)
    assert state.round == 0


def test_the_context_tells_the_attack_the_server_learning_rate():
    fed = _federation()
    fed.global_lr = 2.5
    seen = []
    run_round(fed, initial_state(fed), lambda u, c: seen.append(c.global_lr) or u, _mean)
    assert seen == [2.5]


class _NeedsRoot:
    """A rule asking for the root update; it records what it and the attack saw."""

    needs_root_update = True

    def __init__(self):
        self.seen, self.attack_saw = [], []

    def attack(self, updates, ctx):
        self.attack_saw.append(ctx.root_update)
        return updates

    def __call__(self, updates, ctx):
        self.seen.append((updates.clone(), ctx.root_update.clone()))
        return _mean(updates, ctx)


def test_root_update_is_given_only_when_asked():
    fed = _federation()
    rule, seen = _NeedsRoot(), []
    run_round(fed, initial_state(fed), rule.attack, rule)
    run_round(fed, initial_state(fed), lambda u, c: u, lambda u, ctx: seen.append(ctx.root_update) or _mean(u, ctx))
    assert rule.seen[0][1].shape == (7850,) and seen == [None]
    assert rule.attack_saw == [None]  # trained alongside the clients, but shown to the rule only


@pytest.mark.parametrize("model", ["lr", "cnn"])
def test_root_update_trained_with_the_clients_is_train_root(model):
    """The loop engine trains g0 next to the clients: bit for bit train_root and train_clients.
    The parallel (one core, channels-last) and batched (vmap, padded schedules) engines agree
    to float rounding."""
    for engine in ("loop", "parallel", "batched"):
        fed, rule = _federation(engine=engine, model=model), _NeedsRoot()
        fed.root = (torch.randn(30, 1, 28, 28, generator=torch.Generator().manual_seed(5)), torch.arange(30) % 10)
        fed.root_steps = 3
        state = initial_state(fed)
        w = state.params.clone()
        run_round(fed, state, lambda u, c: u, rule)
        updates, g0 = rule.seen[0]
        seeds = [derive_seed(fed.seed, 1, CLIENT_STREAM, i) for i in range(fed.num_clients)]
        ref_updates, _ = train_clients(fed.net, w, fed.client_data, fed.recipe, seeds)
        ref_g0 = train_root(fed.net, w, *fed.root, fed.recipe, 3, derive_seed(fed.seed, 1, ROOT_STREAM))
        if engine == "loop":
            assert torch.equal(g0, ref_g0) and torch.equal(updates, ref_updates)
        else:
            torch.testing.assert_close(g0, ref_g0, atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(updates, ref_updates, atol=1e-6, rtol=1e-4)
        assert g0.norm() > 0


def test_diverged_root_update_stops_the_run():
    fed = _federation()
    start = initial_state(fed)  # before any training: the loop engine trains in fed.net itself
    fed.root = (fed.root[0] * float("inf"), fed.root[1])
    with pytest.raises(FloatingPointError, match="diverged for the server's root update: "):
        run_round(fed, copy.deepcopy(start), lambda u, c: u, _NeedsRoot())
    fed.client_data[1] = (fed.client_data[1][0] * float("inf"), fed.client_data[1][1])
    with pytest.raises(FloatingPointError, match=r"diverged for clients 1 \(honest\) and the server's root update: "):
        run_round(fed, copy.deepcopy(start), lambda u, c: u, _NeedsRoot())


def test_predict_agrees_with_the_model_in_nchw_order():
    """predict feeds channels-last batches (several, with a short last one); the labels are the
    model's own on NCHW input, and so are the logits up to float rounding."""
    net = make_model("cnn", "fmnist", seed=4)
    w = flatten_params(net)
    x = torch.randn(600, 1, 28, 28, generator=torch.Generator().manual_seed(6))
    net.eval()
    with torch.no_grad():
        expected = net(x).argmax(dim=1)
    got = predict(net, w, x, batch_size=256)
    assert got.shape == (600,) and torch.equal(got, expected)
    assert len(set(expected.tolist())) > 1  # a constant prediction would make the check above weak


def test_torch_threads_sets_and_restores_the_thread_count():
    """Inside: the count asked for (``None`` leaves it); after: the previous one, also after
    an error."""
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="inside"):
        with torch_threads(1):
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before
