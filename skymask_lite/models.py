"""The models of the SkyMask paper, and the flat-vector view of their parameters.

* :class:`FMNISTCNN` - the Fashion-MNIST CNN of FLTrust/SkyMask (about 140k parameters):
  Conv(1->30, 3x3) ReLU MaxPool2, Conv(30->50, 3x3) ReLU MaxPool2, Linear(1250->100) ReLU,
  Linear(100->10).
* :func:`resnet20` - ResNet20 for CIFAR (He et al. 2016): 16/32/64 channels, 3 basic blocks per
  stage, strides 1/2/2, BatchNorm, global average pool, Linear(64->classes).
* :class:`LogisticRegression` - one Linear layer on the flattened image, the fastest demo.

A federated update is a flat ``[d]`` vector over the model's *parameters* in
``named_parameters()`` order; buffers (BatchNorm running statistics) are kept apart: they are
averaged, never attacked or masked as weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IMAGE_SHAPES", "MODELS", "NUM_CLASSES", "BasicBlock", "FMNISTCNN", "LogisticRegression", "ResNet20",
    "channels_last", "flatten_params", "float_buffers", "load_flat", "make_model", "num_params", "param_shapes",
    "param_slices", "resnet20", "unflatten",
]

IMAGE_SHAPES = {"fmnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32)}
NUM_CLASSES = {"fmnist": 10, "cifar10": 10, "cifar100": 100}


class FMNISTCNN(nn.Module):
    """The paper's Fashion-MNIST CNN. Input ``[B, 1, 28, 28]``, output logits ``[B, 10]``.

    ``conv -> relu -> maxpool`` is computed as ``relu(maxpool(conv))``: ReLU is monotone, so both
    orders give the same values and the same gradients bit for bit, and pooling first runs the
    ReLU on a quarter of the values (about 15% of a training step on a CPU).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 30, 3)  # [B, 30, 26, 26] -> pool [B, 30, 13, 13]
        self.conv2 = nn.Conv2d(30, 50, 3)  # [B, 50, 11, 11] -> pool [B, 50, 5, 5]
        self.fc1 = nn.Linear(50 * 5 * 5, 100)
        self.fc2 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: ``y_hat = softmax(W x + b)`` on the flattened image."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with BatchNorm and an identity/projection shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet20 for 32x32 images (He et al. 2016, section 4.2): 6n+2 layers with n = 3."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for block in range(3):
                stages.append(BasicBlock(in_planes, planes, stride if block == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*stages)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet20(in_channels: int = 3, num_classes: int = 10) -> ResNet20:
    """ResNet20 (about 270k parameters) for CIFAR-10/100; arguments in the order of every model here."""
    return ResNet20(in_channels, num_classes)


MODELS = ("cnn", "resnet20", "lr")


def make_model(name: str, dataset: str, *, seed: int = 0) -> nn.Module:
    """Build model ``name`` ("cnn", "resnet20" or "lr") for ``dataset``, initialised from ``seed``."""
    if dataset not in IMAGE_SHAPES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(IMAGE_SHAPES)}")
    channels, height, width = IMAGE_SHAPES[dataset]
    classes = NUM_CLASSES[dataset]
    builders = {
        "cnn": lambda: FMNISTCNN(channels, classes) if dataset == "fmnist" else None,
        "resnet20": lambda: resnet20(channels, classes),
        "lr": lambda: LogisticRegression(channels * height * width, classes),
    }
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; choose one of {list(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = builders[name]()
    if net is None:
        raise ValueError(f"model 'cnn' is the Fashion-MNIST CNN; for {dataset!r} use 'resnet20' or 'lr'")
    return net


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """A copy of the image batch ``x`` ``[N, C, H, W]`` in channels-last memory order, also for ``C = 1``.

    ``x.contiguous(memory_format=torch.channels_last)`` leaves a one-channel batch as it is (its
    strides fit both orders), so convolutions keep computing in NCHW order and the max-pooling
    after them runs in its NCHW kernel, several times slower on a CPU than the channels-last one
    (``benchmarks/channels_last.py``). Here the strides are set explicitly to ``(H W C, 1, W C,
    C)``, which PyTorch reads as channels-last for any ``C``. The values are unchanged; the
    convolutions that read it may round differently from NCHW ones.
    """
    if x.dim() != 4:
        raise ValueError(f"channels_last expects an image batch [N, C, H, W]; got shape {tuple(x.shape)}")
    _, c, h, w = x.shape
    out = torch.empty_strided(x.shape, (h * w * c, 1, w * c, c), dtype=x.dtype, device=x.device)
    return out.copy_(x)


def param_shapes(net: nn.Module) -> dict[str, torch.Size]:
    """Shapes of the parameters in ``named_parameters()`` order (the flat-vector order)."""
    return {name: p.shape for name, p in net.named_parameters()}


def param_slices(net: nn.Module) -> dict[str, slice]:
    """Where each parameter lives in the flat ``[d]`` vector."""
    slices, start = {}, 0
    for name, shape in param_shapes(net).items():
        stop = start + math.prod(shape)
        slices[name] = slice(start, stop)
        start = stop
    return slices


def num_params(net: nn.Module) -> int:
    """``d``, the length of the flat parameter vector."""
    return sum(p.numel() for p in net.parameters())


def flatten_params(net: nn.Module) -> torch.Tensor:
    """The parameters of ``net`` as one detached ``[d]`` vector."""
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def unflatten(vector: torch.Tensor, net: nn.Module) -> dict[str, torch.Tensor]:
    """Split a ``[..., d]`` vector into ``{name: tensor[..., *shape]}`` views (leading dims kept).

    With a ``[k, d]`` input every tensor gets a leading ``k`` dimension, ready for
    :func:`torch.func.vmap` over ``torch.func.functional_call``.
    """
    lead = vector.shape[:-1]
    shapes = param_shapes(net)
    return {name: vector[..., sl].reshape(*lead, *shapes[name]) for name, sl in param_slices(net).items()}


def float_buffers(net: nn.Module) -> dict[str, torch.Tensor]:
    """The floating-point buffers (BatchNorm running mean/var), detached copies."""
    return {n: b.detach().clone() for n, b in net.named_buffers() if b.is_floating_point()}


def load_flat(net: nn.Module, vector: torch.Tensor, buffers: dict[str, torch.Tensor] | None = None) -> None:
    """Copy a flat ``[d]`` vector (and optionally float buffers) into ``net`` in place."""
    with torch.no_grad():
        for p, value in zip(net.parameters(), unflatten(vector, net).values()):
            p.copy_(value)
        if buffers:
            named = dict(net.named_buffers())
            for name, value in buffers.items():
                named[name].copy_(value)
