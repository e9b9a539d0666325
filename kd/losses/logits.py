"""Logit-based distillation losses: ``kd``, ``dkd`` and ``multi_kd``.

Notation: ``s`` / ``t`` are student / teacher logits ``[B, C]``, ``T`` the
temperature, ``p^T = softmax(z / T)`` and ``KL(p ‖ q) = Σ_c p_c (log p_c − log q_c)``.
Every registered term returns a scalar averaged over the batch (sum over classes,
mean over samples) and always keeps the ``T²`` factor, so that gradient magnitudes
do not depend on ``T`` (Hinton et al., 2015). Teacher logits are detached.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.errors import InputError
from kd.losses.base import LOSSES, DistillBatch, LossContext, check_number


def _temperature(value: float | None, ctx: LossContext) -> float:
    """The term's temperature: its own ``temperature`` param, else ``ctx.temperature``."""
    T = ctx.temperature if value is None else value
    try:
        T = float(T)
    except (TypeError, ValueError):
        raise InputError(f"temperature must be a number, got {T!r}") from None
    if not math.isfinite(T) or T <= 0:
        raise InputError(f"temperature must be a finite number > 0, got {T!r}")
    return T


def _teacher(batch: DistillBatch, loss: str) -> list[Tensor]:
    """The batch's teacher logits, detached; an empty list is an `InputError`."""
    if not batch.teacher_logits:
        raise InputError(f"loss {loss!r} needs teacher logits, but the batch has none")
    return [t.detach() for t in batch.teacher_logits]


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, T: float) -> Tensor:
    """Hinton KD, batch-averaged: ``T² · (1/B) Σ_i KL(p^T_t,i ‖ p^T_s,i)``.

    The gradient w.r.t. the student logits is ``T · (p^T_s − p^T_t) / B``. Computed
    in float32 from log-softmaxes; gradients flow into both arguments.
    """
    log_ps = F.log_softmax(student_logits.float() / T, dim=-1)
    log_pt = F.log_softmax(teacher_logits.float() / T, dim=-1)
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * (T * T)


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-row ``KL(p ‖ q) = Σ_c p_c (log p_c − log q_c)`` from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _target_mask(logits: Tensor, target: Tensor) -> Tensor:
    """Boolean ``[B, C]``: True at each row's target class."""
    return F.one_hot(target.long(), logits.shape[-1]).bool()


def _binary_log_probs(z: Tensor, mask: Tensor) -> Tensor:
    """``[B, 2]`` log of (p_target, 1 − p_target) for ``softmax(z)``, computed stably as
    ``log p_t = z_t − lse(z)`` and ``log(1 − p_t) = lse(z_{c≠t}) − lse(z)``."""
    big_neg = torch.finfo(z.dtype).min / 2
    lse_all = torch.logsumexp(z, dim=-1)
    log_pt = (z * mask).sum(dim=-1) - lse_all
    log_rest = torch.logsumexp(z.masked_fill(mask, big_neg), dim=-1) - lse_all
    return torch.stack([log_pt, log_rest], dim=-1)


def tckd(s: Tensor, t: Tensor, target: Tensor, T: float) -> Tensor:
    """Target-class KD per sample, NOT scaled by ``T²``: ``[B]`` of
    ``KL(b_t ‖ b_s)`` with ``b = (p^T_target, 1 − p^T_target)`` (Zhao et al., 2022)."""
    mask = _target_mask(s, target)
    return _kl_rows(_binary_log_probs(t.float() / T, mask), _binary_log_probs(s.float() / T, mask))


def nckd(s: Tensor, t: Tensor, target: Tensor, T: float) -> Tensor:
    """Non-target-class KD per sample, NOT scaled by ``T²`` nor by ``1 − p_t``: ``[B]`` of
    ``KL(p̂_t ‖ p̂_s)`` where ``p̂ = softmax(z_{c≠target} / T)`` over the C−1 other classes.

    The target class is masked with a large finite negative logit (never ``inf``), so
    values and gradients stay finite. With `tckd`, per sample:
    ``KL(p^T_t ‖ p^T_s) = tckd + (1 − p^T_t,target) · nckd``.
    """
    mask = _target_mask(s, target)
    big_neg = torch.finfo(torch.float32).min / 2
    log_ps = F.log_softmax((s.float() / T).masked_fill(mask, big_neg), dim=-1)
    log_pt = F.log_softmax((t.float() / T).masked_fill(mask, big_neg), dim=-1)
    per_class = torch.where(mask, 0.0, log_pt.exp() * (log_pt - log_ps))
    return per_class.sum(dim=-1)


class KDLoss(nn.Module):
    """``T² · (1/B) Σ_i KL(softmax(t_i/T) ‖ softmax(s_i/T))`` with the first teacher."""

    def __init__(self, T: float) -> None:
        super().__init__()
        self.T = T

    def forward(self, batch: DistillBatch) -> Tensor:
        return kd_loss(batch.student_logits, _teacher(batch, "kd")[0], self.T)


class DKDLoss(nn.Module):
    """``α · T² · mean_i TCKD_i + β · T² · mean_i NCKD_i`` (NCKD not weighted by 1 − p_t).

    The target is the label, or the first teacher's argmax where the label is -1.
    """

    def __init__(self, alpha: float, beta: float, T: float) -> None:
        super().__init__()
        self.alpha, self.beta, self.T = float(alpha), float(beta), T

    def forward(self, batch: DistillBatch) -> Tensor:
        s, t = batch.student_logits, _teacher(batch, "dkd")[0]
        target = torch.where(batch.label_mask, batch.labels, t.argmax(dim=-1))
        T2 = self.T * self.T
        loss_t = tckd(s, t, target, self.T).mean()
        loss_n = nckd(s, t, target, self.T).mean()
        return T2 * (self.alpha * loss_t + self.beta * loss_n)


class MultiKDLoss(nn.Module):
    """``T² · (1/B) Σ_i KL(q_i ‖ softmax(s_i/T))`` with ``q = Σ_k w_k softmax(t_k/T)``.

    ``weights`` are normalised to sum to 1 (``None``: uniform over the batch's teachers).
    """

    def __init__(self, weights: Sequence[float] | None, T: float) -> None:
        super().__init__()
        self.weights = None if weights is None else [float(w) for w in weights]
        self.T = T

    def forward(self, batch: DistillBatch) -> Tensor:
        teachers = _teacher(batch, "multi_kd")
        k = len(teachers)
        if self.weights is not None and len(self.weights) != k:
            raise InputError(
                f"multi_kd: weights has {len(self.weights)} entries but there are {k} teachers"
            )
        w = self.weights or [1.0] * k
        total = sum(w)
        log_ps = F.log_softmax(batch.student_logits.float() / self.T, dim=-1)
        probs = [F.softmax(t.float() / self.T, dim=-1) for t in teachers]
        q = sum((wk / total) * p for wk, p in zip(w, probs, strict=True))
        per_class = torch.where(q > 0, q * (q.clamp_min(1e-30).log() - log_ps), 0.0)
        return per_class.sum(dim=-1).mean() * (self.T * self.T)


@LOSSES.register("kd")
def kd(ctx: LossContext, temperature: float | None = None) -> nn.Module:
    """Hinton KD: ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, batch-averaged."""
    return KDLoss(_temperature(temperature, ctx))


@LOSSES.register("dkd")
def dkd(
    ctx: LossContext, alpha: float = 1.0, beta: float = 8.0, temperature: float | None = None
) -> nn.Module:
    """Decoupled KD: ``α · T² · TCKD + β · T² · NCKD``, batch-averaged.

    ``alpha`` and ``beta`` must be finite numbers >= 0 (else an `InputError` naming them)."""
    return DKDLoss(check_number(alpha, "alpha"), check_number(beta, "beta"),
                   _temperature(temperature, ctx))


@LOSSES.register("multi_kd")
def multi_kd(
    ctx: LossContext, weights: Sequence[float] | None = None, temperature: float | None = None
) -> nn.Module:
    """Multi-teacher KD: ``T² · KL(Σ_k w_k softmax(t_k/T) ‖ softmax(s/T))``, batch-averaged.

    ``weights`` (one per teacher, >= 0, not all 0) are normalised to sum to 1; a length
    that differs from ``len(ctx.teachers)`` (when known) is an `InputError`.
    """
    if weights is not None:
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            raise InputError(f"multi_kd: weights must be a list of numbers, got {weights!r}")
        try:
            ws = [float(w) for w in weights]
        except (TypeError, ValueError):
            raise InputError(f"multi_kd: weights must be numbers, got {weights!r}") from None
        if any(not math.isfinite(w) or w < 0 for w in ws) or sum(ws) <= 0:
            raise InputError(f"multi_kd: weights must be >= 0 and not all 0, got {weights!r}")
        if ctx.teachers and len(ws) != len(ctx.teachers):
            raise InputError(
                f"multi_kd: weights has {len(ws)} entries but there are "
                f"{len(ctx.teachers)} teachers"
            )
        weights = ws
    return MultiKDLoss(weights, _temperature(temperature, ctx))
