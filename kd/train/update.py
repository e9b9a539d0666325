"""The optimizer update of one accumulation window: backward with loss scaling,
averaging the loss adapters' gradients, unscaling, clipping, the step.

``trainer.precision: fp16`` scales the loss with ``torch.amp.GradScaler`` (fp16
gradients underflow otherwise); a step whose gradients hold inf/nan is skipped and the
scale lowered. Every rank takes the same decision: DDP/FSDP and `average_grads` reduce
the gradients *before* ``unscale_`` looks for inf/nan. For fp32/bf16 the scaler is
disabled and each call is the plain operation. The scaler's state is checkpointed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kd.train.parallel import average_grads, clip_grad_norm


class Updater:
    """Backward and step for one worker: ``backward(loss)`` per micro-step, ``step()``
    at the end of each accumulation window."""

    def __init__(self, opt: torch.optim.Optimizer, params: list[nn.Parameter],
                 loss_params: list[nn.Parameter], precision: str, grad_clip: float | None,
                 world: int, device: torch.device) -> None:
        self.opt, self.params, self.loss_params = opt, params, loss_params
        self.grad_clip, self.world = grad_clip, world
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        """Average adapter grads, unscale, clip, step (skipped on inf/nan), update the
        scale, zero the grads."""
        average_grads(self.loss_params, self.world)
        self.scaler.unscale_(self.opt)
        if self.grad_clip:
            clip_grad_norm(self.params, self.grad_clip, self.world)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state (empty when disabled), for the checkpoint."""
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:
            self.scaler.load_state_dict(state)
