"""Wide ResNets (pre-activation) as in the CRD / mdistiller repositories.

Module names match those repositories (``conv1``, ``block1..3`` each holding
``layer.<i>`` blocks of ``bn1, conv1, bn2, conv2, convShortcut``, ``bn1``, ``fc``), so
their released checkpoints load. Pooling is adaptive; ``forward`` returns logits only.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import InputError
from . import MODELS, image_shape, init_conv_bn, scaled


class WideBasic(nn.Module):
    """bn-relu-conv3x3, bn-relu-(dropout)-conv3x3, plus the (1x1 projected) input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
        self.droprate = drop
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut: nn.Module | None = None  # noqa: N815 - checkpoint key name
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """One pre-activation residual block."""
        act = self.relu1(self.bn1(x))
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        return shortcut + self.conv2(out)


class NetworkBlock(nn.Module):
    """``n`` WideBasic blocks under ``layer``; the first one may stride."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasic(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1,
                          drop)
                for i in range(n)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        """The stage's blocks in order."""
        return self.layer(x)


class WideResNet(nn.Module):
    """``conv1 -> block1 -> block2 (/2) -> block3 (/2) -> bn1 -> relu -> pool -> fc``.

    Feature paths: ``block1``..``block3``, ``block3.layer.<i>``, ``bn1``.
    """

    def __init__(
        self, depth: int, widen: int, in_channels: int, num_classes: int, width: float = 1.0,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        n = (depth - 4) // 6
        ch = [scaled(c, width) for c in (16, 16 * widen, 32 * widen, 64 * widen)]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch[3], num_classes)
        init_conv_bn(self)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, C, H, W]`` -> logits ``[B, num_classes]``."""
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(self.pool(x).flatten(1))


@MODELS.register("wrn")
def wrn(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    width: float = 1.0,
    depth: int = 16,
    widen_factor: int = 1,
    dropout: float = 0.0,
) -> WideResNet:
    """Wide ResNet WRN-``depth``-``widen_factor`` (depth 6n+4)."""
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise InputError(f"model 'wrn': argument 'depth' must be 6n+4 and >= 10, got {depth!r}")
    if not isinstance(widen_factor, int) or widen_factor < 1:
        raise InputError(f"model 'wrn': argument 'widen_factor' must be an int >= 1, "
                         f"got {widen_factor!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise InputError(f"model 'wrn': argument 'dropout' must be in [0, 1), got {dropout!r}")
    c, _, _ = image_shape("wrn", input_shape)
    return WideResNet(depth, widen_factor, c, num_classes, width, float(dropout))


def _register(depth: int, widen: int) -> None:
    name = f"wrn_{depth}_{widen}"

    def factory(
        *, input_shape: tuple[int, ...], num_classes: int, width: float = 1.0,
        dropout: float = 0.0,
    ) -> WideResNet:
        return wrn(input_shape=input_shape, num_classes=num_classes, width=width, depth=depth,
                   widen_factor=widen, dropout=dropout)

    factory.__name__ = name
    factory.__doc__ = f"Wide ResNet WRN-{depth}-{widen} (CRD naming)."
    MODELS.register(name)(factory)


for _d, _w in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register(_d, _w)
