"""The optimizer and the per-epoch learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from kd.config import Experiment


def lr_factor(epoch: int, epochs: int, name: str, warmup: int, step_size: int,
              gamma: float) -> float:
    """LR multiplier for ``epoch``: linear warm-up to 1 over ``warmup`` epochs, then
    cosine ``0.5 (1 + cos(pi e / E))`` over the rest, or ``gamma ** (e // step)``."""
    if epoch < warmup:
        return (epoch + 1) / warmup
    e, span = epoch - warmup, max(1, epochs - warmup)
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * e / span))
    if name == "step":
        return gamma ** (e // step_size)
    return 1.0


def make_optimizer(exp: Experiment, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay), Adam or AdamW from ``optim``."""
    o = exp.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(params, lr=o.lr, weight_decay=o.weight_decay)



def set_epoch_lr(opt: torch.optim.Optimizer, base_lrs: list[float], epoch: int, exp: Experiment) -> None:
    """Set every param group's LR to its base LR times `lr_factor` of ``epoch``."""
    sched = exp.optim.schedule
    f = lr_factor(epoch, exp.trainer.epochs, sched.name, sched.warmup_epochs, sched.step_size, sched.gamma)
    for g, lr in zip(opt.param_groups, base_lrs, strict=True):
        g["lr"] = lr * f
