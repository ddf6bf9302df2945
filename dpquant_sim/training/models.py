"""Models written in the project (torchvision does not import here), all DP-ready: GroupNorm, never BatchNorm.

Names: ``mlp``, ``cnn`` (small, fast on 8x8 digits), ``resnet18``, ``resnet18-w16``, ``resnet50``,
``densenet121``. ``resnet18-w16`` is ResNet18's topology (the same 21 GEMM layers and names) at a quarter of
the width (16-32-64-128 channels, 1/16 of the parameters and FLOPs): deep enough for per-layer schedules to
matter, small enough to train with per-sample gradients on a CPU.
The three large models follow torchvision's layout and module names (``conv1``, ``layer1.0.conv1``,
``layer1.0.downsample.0``, ``fc``; ``features.denseblock1.denselayer1.conv1``, ``classifier``) with two changes:

* every BatchNorm2d is a GroupNorm with ``gcd(32, C)`` groups and the same parameter count (2C); BatchNorm
  mixes examples of a batch before clipping, which breaks DP-SGD's per-example sensitivity;
* for small inputs (``image_size <= 64``) the stem is a 3x3 stride-1 convolution without max pooling
  (CIFAR-style), so 8x8, 28x28 and 32x32 images keep enough spatial extent. Larger inputs get the ImageNet
  stem (7x7 stride 2 + max pool), which reproduces torchvision's parameter counts exactly.

Layer names are stable: plans and metrics refer to them (``dpquant_sim.nn.quantizable_layers``).

>>> m = build_model("cnn", in_channels=1, num_classes=10, image_size=8)
>>> import torch
>>> m(torch.zeros(2, 1, 8, 8)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from dpquant_sim.errors import ConfigError


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with gcd(max_groups, channels) groups (statistics per example, so DP-safe)."""
    return nn.GroupNorm(math.gcd(max_groups, channels), channels)


# ----------------------------------------------------------------------------------------------------- MLP, CNN
class MLP(nn.Module):
    """Flatten -> (Linear -> ReLU) x len(hidden) -> Linear. GEMM layers: fc1..fcN, then ``head``."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (256, 128)):
        super().__init__()
        self.flatten = nn.Flatten()
        layers: list[tuple[str, nn.Module]] = []
        width = in_features
        for i, h in enumerate(hidden, start=1):
            layers += [(f"fc{i}", nn.Linear(width, h)), (f"relu{i}", nn.ReLU())]
            width = h
        for name, mod in layers:
            self.add_module(name, mod)
        self._order = [n for n, _ in layers]
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        for name in self._order:
            x = getattr(self, name)(x)
        return self.head(x)


class SmallCNN(nn.Module):
    """Three 3x3 conv blocks (conv -> GroupNorm -> ReLU), max-pooling after the first two, then a 2x2 adaptive
    average pool and two linear layers. GEMM layers: conv1, conv2, conv3, fc1, fc2.

    About 40k parameters with the defaults; one DP-SGD epoch on digits takes about a second on one core.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, int, int] = (16, 32, 64), hidden=64):
        super().__init__()
        c1, c2, c3 = widths
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.gn1 = group_norm(c1, 8)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2, ceil_mode=True)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.gn2 = group_norm(c2, 8)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2, ceil_mode=True)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.gn3 = group_norm(c3, 8)
        self.relu3 = nn.ReLU()
        self.pool3 = nn.AdaptiveAvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c3 * 4, hidden)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.gn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.gn2(self.conv2(x))))
        x = self.pool3(self.relu3(self.gn3(self.conv3(x))))
        return self.fc2(self.relu4(self.fc1(self.flatten(x))))


# ----------------------------------------------------------------------------------------------------- ResNet
def _stem(model: nn.Module, in_channels: int, width: int, image_size: int) -> None:
    """Set conv1/gn1/relu/maxpool on ``model``: CIFAR-style for small images, ImageNet-style otherwise."""
    if image_size <= 64:
        model.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    else:
        model.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        model.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    model.gn1 = group_norm(width)
    model.relu = nn.ReLU()


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.gn1 = group_norm(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.gn2 = group_norm(planes)
        self.relu2 = nn.ReLU()
        self.downsample = _downsample(inplanes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        return self.relu2(out + identity)


class Bottleneck(nn.Module):
    """torchvision v1.5 bottleneck: the stride sits on the 3x3 convolution."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.gn1 = group_norm(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.gn2 = group_norm(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.gn3 = group_norm(planes * 4)
        self.relu3 = nn.ReLU()
        self.downsample = _downsample(inplanes, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.gn1(self.conv1(x)))
        out = self.relu2(self.gn2(self.conv2(out)))
        out = self.gn3(self.conv3(out))
        return self.relu3(out + identity)


def _downsample(inplanes: int, outplanes: int, stride: int) -> nn.Module | None:
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False), group_norm(outplanes))


class ResNet(nn.Module):
    """ResNet with GroupNorm; ``block`` BasicBlock (18/34) or Bottleneck (50/101)."""

    def __init__(self, block, layers: tuple[int, ...], in_channels: int, num_classes: int, image_size: int,
                 width: int = 64):
        super().__init__()
        _stem(self, in_channels, width, image_size)
        self.inplanes = width
        for i, (planes, n) in enumerate(zip((width, 2 * width, 4 * width, 8 * width), layers), start=1):
            blocks = []
            for j in range(n):
                stride = 1 if (i == 1 or j > 0) else 2
                blocks.append(block(self.inplanes, planes, stride))
                self.inplanes = planes * block.expansion
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.gn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


# ----------------------------------------------------------------------------------------------------- DenseNet
class _DenseLayer(nn.Module):
    def __init__(self, in_features: int, growth: int, bn_size: int):
        super().__init__()
        self.norm1 = group_norm(in_features)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_features, bn_size * growth, 1, bias=False)
        self.norm2 = group_norm(bn_size * growth)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class _DenseBlock(nn.Module):
    def __init__(self, n: int, in_features: int, growth: int, bn_size: int):
        super().__init__()
        for i in range(n):
            self.add_module(f"denselayer{i + 1}", _DenseLayer(in_features + i * growth, growth, bn_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for layer in self.children():
            feats.append(layer(torch.cat(feats, 1)))
        return torch.cat(feats, 1)


class _Transition(nn.Sequential):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.norm = group_norm(in_features)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_features, out_features, 1, bias=False)
        self.pool = nn.AvgPool2d(2, ceil_mode=True)


class DenseNet(nn.Module):
    """DenseNet-BC (torchvision layout, no memory-efficient checkpointing), GroupNorm."""

    def __init__(self, growth: int, block_config: tuple[int, ...], init_features: int, bn_size: int,
                 in_channels: int, num_classes: int, image_size: int):
        super().__init__()
        self.features = nn.Sequential()
        if image_size <= 64:
            self.features.add_module("conv0", nn.Conv2d(in_channels, init_features, 3, padding=1, bias=False))
        else:
            self.features.add_module("conv0", nn.Conv2d(in_channels, init_features, 7, 2, 3, bias=False))
        self.features.add_module("norm0", group_norm(init_features))
        self.features.add_module("relu0", nn.ReLU())
        if image_size > 64:
            self.features.add_module("pool0", nn.MaxPool2d(3, 2, 1))
        nf = init_features
        for i, n in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", _DenseBlock(n, nf, growth, bn_size))
            nf += n * growth
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(nf, nf // 2))
                nf //= 2
        self.features.add_module("norm5", group_norm(nf))
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(nf, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.features(x))
        return self.classifier(self.flatten(self.avgpool(x)))


# ----------------------------------------------------------------------------------------------------- registry
ModelFactory = Callable[[int, int, int], nn.Module]

MODELS: dict[str, ModelFactory] = {
    "mlp": lambda c, k, s: MLP(c * s * s, k),
    "cnn": lambda c, k, s: SmallCNN(c, k),
    "resnet18": lambda c, k, s: ResNet(BasicBlock, (2, 2, 2, 2), c, k, s),
    "resnet18-w16": lambda c, k, s: ResNet(BasicBlock, (2, 2, 2, 2), c, k, s, width=16),
    "resnet50": lambda c, k, s: ResNet(Bottleneck, (3, 4, 6, 3), c, k, s),
    "densenet121": lambda c, k, s: DenseNet(32, (6, 12, 24, 16), 64, 4, c, k, s),
}


def build_model(name: str, *, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Build a registered model for square ``image_size`` x ``image_size`` inputs with ``in_channels``
    channels (1 or 3 typically) and ``num_classes`` outputs. Weights come from torch's global RNG: seed it first.

    >>> build_model("resnet18", in_channels=3, num_classes=10, image_size=32).fc.in_features
    512
    """
    if name not in MODELS:
        raise ConfigError("model", name, tuple(MODELS))
    for field, v in (("in_channels", in_channels), ("num_classes", num_classes), ("image_size", image_size)):
        if not isinstance(v, int) or v < 1 or (field == "num_classes" and v < 2):
            raise ConfigError(field, v, "a positive integer" + (" >= 2" if field == "num_classes" else ""))
    return MODELS[name](in_channels, num_classes, image_size)
