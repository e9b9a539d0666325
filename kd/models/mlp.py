"""Multi-layer perceptron over any input, flattened."""

from __future__ import annotations

import math
from collections import OrderedDict

from torch import Tensor, nn

from ..errors import InputError
from . import MODELS, int_list, scaled


class MLP(nn.Module):
    """``flatten -> body.<i>(linear, [bn], act, [drop]) ... -> fc``.

    Feature paths: ``body.0`` ... ``body.<n-1>`` (each hidden block's output) and
    ``body.<i>.linear``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: list[int],
        dropout: float = 0.0,
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        blocks = []
        prev = in_features
        for h in hidden:
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            layers["linear"] = nn.Linear(prev, h, bias=not batchnorm)
            if batchnorm:
                layers["bn"] = nn.BatchNorm1d(h)
            layers["act"] = nn.ReLU(inplace=True)
            if dropout > 0:
                layers["drop"] = nn.Dropout(dropout)
            blocks.append(nn.Sequential(layers))
            prev = h
        self.body = nn.Sequential(*blocks)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: any ``[B, ...]`` float tensor -> logits ``[B, num_classes]``."""
        return self.fc(self.body(x.flatten(1).float()))


@MODELS.register("mlp")
def mlp(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    width: float = 1.0,
    hidden: list[int] | None = None,
    dropout: float = 0.0,
    batchnorm: bool = False,
) -> MLP:
    """MLP with ``hidden`` layer widths (default ``[64]``; ``[]`` is logistic regression),
    ReLU, optional BatchNorm1d and dropout. Flattens its input."""
    widths = int_list("mlp", "hidden", [64] if hidden is None else hidden)
    if not 0.0 <= float(dropout) < 1.0:
        raise InputError(f"model 'mlp': argument 'dropout' must be in [0, 1), got {dropout!r}")
    return MLP(
        math.prod(input_shape),
        num_classes,
        [scaled(h, width) for h in widths],
        dropout=float(dropout),
        batchnorm=bool(batchnorm),
    )
