"""CIFAR-style ResNets as in the CRD / mdistiller repositories.

The module and state-dict names match those repositories (``conv1``, ``bn1``,
``layer1..3``, ``fc``; blocks with ``conv1, bn1, conv2, bn2, downsample``), so their
released teacher checkpoints load with `kd.models.weights.load_into`. Unlike them the
pooling is adaptive, so 8x8 inputs work too, and ``forward`` returns logits only.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from ..errors import InputError
from . import MODELS, image_shape, init_conv_bn, int_list, scaled


class BasicBlock(nn.Module):
    """3x3 conv-bn-relu, 3x3 conv-bn, plus the (1x1 conv-bn projected) input, relu."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        """One residual block."""
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class ResNetCifar(nn.Module):
    """``conv1 -> bn1 -> relu -> layer1 -> layer2 (/2) -> layer3 (/2) -> avgpool -> fc``.

    Feature paths: ``layer1``..``layer3``, ``layer3.<i>``, ``layer3.<i>.conv2`` etc.
    """

    def __init__(self, depth: int, filters: list[int], in_channels: int, num_classes: int) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.inplanes = filters[0]
        self.conv1 = nn.Conv2d(in_channels, filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(filters[1], n, 1)
        self.layer2 = self._make_layer(filters[2], n, 2)
        self.layer3 = self._make_layer(filters[3], n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(filters[3], num_classes)
        init_conv_bn(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(self.inplanes, planes, stride)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, C, H, W]`` -> logits ``[B, num_classes]``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


BASE = [16, 16, 32, 64]
X4 = [32, 64, 128, 256]


def _resnet(
    depth: int,
    filters: list[int],
    name: str,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    width: float = 1.0,
) -> ResNetCifar:
    if depth < 8 or (depth - 2) % 6:
        raise InputError(f"model {name!r}: argument 'depth' must be 6n+2 and >= 8, got {depth!r}")
    c, _, _ = image_shape(name, input_shape)
    return ResNetCifar(depth, [scaled(f, width) for f in filters], c, num_classes)


@MODELS.register("resnet_cifar")
def resnet_cifar(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    width: float = 1.0,
    depth: int = 20,
    filters: list[int] | None = None,
) -> ResNetCifar:
    """Generic CIFAR ResNet of ``depth`` (6n+2) with stem/stage ``filters``
    (default ``[16, 16, 32, 64]``)."""
    f = int_list("resnet_cifar", "filters", BASE if filters is None else filters)
    if len(f) != 4:
        raise InputError(f"model 'resnet_cifar': argument 'filters' needs 4 ints, got {f}")
    return _resnet(
        int(depth), f, "resnet_cifar", input_shape=input_shape, num_classes=num_classes,
        width=width,
    )


def _register(name: str, depth: int, filters: list[int]) -> None:
    fn = partial(_resnet, depth, filters, name)

    def factory(
        *, input_shape: tuple[int, ...], num_classes: int, width: float = 1.0
    ) -> ResNetCifar:
        return fn(input_shape=input_shape, num_classes=num_classes, width=width)

    factory.__name__ = name
    factory.__doc__ = f"CIFAR ResNet-{depth} with stem/stage filters {filters} (CRD naming)."
    MODELS.register(name)(factory)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(f"resnet{_depth}", _depth, BASE)
_register("resnet8x4", 8, X4)
_register("resnet32x4", 32, X4)
