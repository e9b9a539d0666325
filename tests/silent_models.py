"""A user-defined student for tests/test_silent_tune.py (named as
``tests.silent_models:TopK`` in a config)."""

from __future__ import annotations

import torch
from torch import nn


class TopK(nn.Module):
    """A user student whose ``k`` must not exceed the class count, and whose first
    layer takes ``in_features`` inputs (it must match the data)."""

    def __init__(self, k: int = 1, in_features: int = 64, hidden: int = 8,
                 num_classes: int = 2) -> None:
        super().__init__()
        if k > num_classes:
            raise ValueError(f"k={k} > num_classes={num_classes}")
        if hidden > 100:
            raise RuntimeError("out of memory (pretend)")
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
