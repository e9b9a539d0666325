"""The optimizer and the learning-rate schedule (per epoch or per optimizer step)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from kd.config import Experiment
from kd.train.parallel import is_sharded


def lr_factor(unit: int, units: int, units_per_epoch: int, name: str, warmup: int,
              step_size: int, gamma: float) -> float:
    """LR multiplier at ``unit`` of ``units`` (units are epochs, or optimizer steps with
    ``units_per_epoch`` of them an epoch): linear warm-up ``(u + 1) / W`` over the first
    ``W = warmup`` units, then cosine ``0.5 (1 + cos(pi (u - W) / (U - W)))`` over the rest,
    or ``gamma ** (epoch // step_size)`` by whole epochs, or 1 (``none``)."""
    if unit < warmup:
        return (unit + 1) / warmup
    u, span = unit - warmup, max(1, units - warmup)
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * u / span))
    if name == "step":
        return gamma ** ((unit // units_per_epoch) // step_size)
    return 1.0


def make_optimizer(exp: Experiment, params: list[nn.Parameter],
                   adapters: list[nn.Parameter] | None = None) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay), Adam or AdamW from ``optim`` over the trainee's
    ``params`` and the loss's ``adapters``. FSDP2's parameters are DTensors and the
    adapters plain tensors: a foreach update (the default on CUDA) cannot take both in
    one list, so then each is its own param group (same settings); else one group."""
    adapters = adapters or []
    sharded = any(is_sharded(p) for p in params)
    groups: list[Any] = ([{"params": params}, {"params": adapters}] if sharded and adapters
                         else [*params, *adapters])
    o = exp.optim
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(groups, lr=o.lr, weight_decay=o.weight_decay)


def per_step(exp: Experiment) -> bool:
    """Whether the LR is set before every optimizer update (``optim.schedule.per: step``)."""
    return exp.optim.schedule.per == "step"


def set_lr(opt: torch.optim.Optimizer, base_lrs: list[float], exp: Experiment, epoch: int,
           step: int, steps_per_epoch: int) -> None:
    """Set every param group's LR to its base LR times `lr_factor` at batch ``step`` of
    ``epoch``. Per epoch the unit is the epoch; per step it is
    ``epoch * steps_per_epoch + min(step, steps_per_epoch - 1)``: a pure function of the
    epoch and the batch index, so every rank (same batch count) and a resumed run set the
    same LR."""
    sched, epochs = exp.optim.schedule, exp.trainer.epochs
    if sched.per == "step":
        n = max(1, steps_per_epoch)
        unit, units, warmup = epoch * n + min(step, n - 1), epochs * n, sched.warmup_epochs * n + sched.warmup_steps
    else:
        n, unit, units, warmup = 1, epoch, epochs, sched.warmup_epochs
    f = lr_factor(unit, units, n, sched.name, warmup, sched.step_size, sched.gamma)
    for g, lr in zip(opt.param_groups, base_lrs, strict=True):
        g["lr"] = lr * f
