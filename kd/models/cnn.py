"""A small conv net with BatchNorm, sized for 8x8 digits up to CIFAR images."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from ..errors import InputError
from . import MODELS, image_shape, int_list, scaled


class SmallCNN(nn.Module):
    """``block1 .. blockN -> pool -> fc``.

    Each ``block<i>`` is ``conv`` (3x3, no bias) -> ``bn`` -> ``relu`` and, except the
    last block, a 2x2 max ``pool`` while the feature map is at least 4 pixels wide.
    Feature paths: ``block1``, ``block2``, ..., ``block2.conv``, ``block2.bn``, ``pool``.
    """

    def __init__(self, in_channels: int, size: int, channels: list[int], num_classes: int) -> None:
        super().__init__()
        prev = in_channels
        for i, c in enumerate(channels, start=1):
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            layers["conv"] = nn.Conv2d(prev, c, 3, padding=1, bias=False)
            layers["bn"] = nn.BatchNorm2d(c)
            layers["relu"] = nn.ReLU(inplace=True)
            if i < len(channels) and size >= 4:
                layers["pool"] = nn.MaxPool2d(2)
                size //= 2
            self.add_module(f"block{i}", nn.Sequential(layers))
            prev = c
        self.num_blocks = len(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, C, H, W]`` -> logits ``[B, num_classes]``."""
        for i in range(1, self.num_blocks + 1):
            x = getattr(self, f"block{i}")(x)
        return self.fc(self.pool(x).flatten(1))


@MODELS.register("cnn_small")
def cnn_small(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    width: float = 1.0,
    channels: list[int] | None = None,
) -> SmallCNN:
    """Conv-BN-ReLU blocks with ``channels`` (default ``[32, 64]``, about 20k params on
    8x8 digits), adaptive average pooling and a linear head."""
    c, h, w = image_shape("cnn_small", input_shape)
    chans = int_list("cnn_small", "channels", [32, 64] if channels is None else channels)
    if not chans:
        raise InputError("model 'cnn_small': argument 'channels' must not be empty")
    return SmallCNN(c, min(h, w), [scaled(ch, width) for ch in chans], num_classes)
