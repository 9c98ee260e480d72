import pytest
import torch

from skymask_lite.models import (
    FMNISTCNN,
    channels_last,
    float_buffers,
    flatten_params,
    load_flat,
    make_model,
    num_params,
    param_slices,
    unflatten,
)


def test_cnn_matches_the_paper():
    net = FMNISTCNN()
    shapes = [tuple(p.shape) for p in net.parameters()]
    assert shapes == [(30, 1, 3, 3), (30,), (50, 30, 3, 3), (50,), (100, 1250), (100,), (10, 100), (10,)]
    assert num_params(net) == 139_960


@pytest.mark.parametrize("name,dataset,d", [("cnn", "fmnist", 139_960), ("lr", "fmnist", 7_850), ("resnet20", "cifar10", 272_474), ("resnet20", "cifar100", 278_324)])
def test_models_forward_and_size(name, dataset, d):
    net = make_model(name, dataset)
    shape = (1, 28, 28) if dataset == "fmnist" else (3, 32, 32)
    classes = 100 if dataset == "cifar100" else 10
    assert net(torch.zeros(2, *shape)).shape == (2, classes)
    assert num_params(net) == d


def test_resnet20_buffers_are_apart_from_parameters():
    net = make_model("resnet20", "cifar10")
    buffers = float_buffers(net)
    assert buffers and all("running" in name for name in buffers)
    assert len(flatten_params(net)) == num_params(net)


def test_flatten_unflatten_roundtrip():
    net = make_model("cnn", "fmnist", seed=1)
    vec = flatten_params(net)
    parts = unflatten(vec, net)
    for (name, p), (name2, q) in zip(net.named_parameters(), parts.items()):
        assert name == name2 and torch.equal(p, q)
    batch = torch.stack([vec, 2 * vec])
    assert unflatten(batch, net)["fc2.weight"].shape == (2, 10, 100)
    other = make_model("cnn", "fmnist", seed=2)
    load_flat(other, vec)
    assert torch.equal(flatten_params(other), vec)
    assert param_slices(net)["fc2.bias"] == slice(139_950, 139_960)


def test_seeded_init_and_errors():
    assert torch.equal(flatten_params(make_model("lr", "fmnist", seed=3)), flatten_params(make_model("lr", "fmnist", seed=3)))
    assert not torch.equal(flatten_params(make_model("lr", "fmnist", seed=3)), flatten_params(make_model("lr", "fmnist", seed=4)))
    with pytest.raises(ValueError, match="unknown model"):
        make_model("vgg", "fmnist")
    with pytest.raises(ValueError, match="use 'resnet20'"):
        make_model("cnn", "cifar10")


def test_cnn_pooling_before_relu_changes_nothing():
    """relu(maxpool(conv)) equals the paper's maxpool(relu(conv)) bit for bit, values and gradients."""
    import torch.nn.functional as F

    net = make_model("cnn", "fmnist", seed=3)
    x, y = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(4)), torch.arange(16) % 10

    def paper_order(m, x):
        x = F.max_pool2d(F.relu(m.conv1(x)), 2)
        x = F.max_pool2d(F.relu(m.conv2(x)), 2)
        return m.fc2(F.relu(m.fc1(x.flatten(1))))

    params = list(net.parameters())
    ours, ref = net(x), paper_order(net, x)
    assert torch.equal(ours, ref)
    for a, b in zip(torch.autograd.grad(F.cross_entropy(ours, y), params),
                    torch.autograd.grad(F.cross_entropy(ref, y), params)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("channels", [1, 3])
def test_channels_last_copies_also_one_channel_batches(channels):
    """``contiguous(memory_format=channels_last)`` leaves a one-channel batch in NCHW strides;
    :func:`channels_last` does not, so a convolution on it computes and returns channels-last."""
    x = torch.randn(4, channels, 8, 8, generator=torch.Generator().manual_seed(0))
    got = channels_last(x)
    assert torch.equal(got, x) and got.stride() == (64 * channels, 1, 8 * channels, channels)
    conv = torch.nn.Conv2d(channels, 5, 3)
    out = conv(got)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.stride()[1] == 1
    torch.testing.assert_close(out, conv(x))
    if channels == 1:  # the case the helper exists for
        assert conv(x.contiguous(memory_format=torch.channels_last)).stride()[1] != 1
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        channels_last(x[0])


def test_resnet20_takes_its_arguments_in_the_order_of_every_model():
    """``(in_channels, num_classes)``, like :class:`FMNISTCNN` and :class:`ResNet20`."""
    from skymask_lite.models import ResNet20, resnet20

    for build in (resnet20, ResNet20, FMNISTCNN):
        size = 32 if build is not FMNISTCNN else 28
        assert build(1, 7)(torch.zeros(2, 1, size, size)).shape == (2, 7)
    assert num_params(resnet20(3, 10)) == num_params(make_model("resnet20", "cifar10"))
