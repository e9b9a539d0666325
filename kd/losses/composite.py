"""The training objective: ``total = ce_weight · CE + Σ_i weight_i · term_i``.

CE is averaged over the labeled samples only; with ``min_teacher_confidence``
the terms see only the samples whose primary-teacher confidence is high enough.

Built from the config's ``distill.losses`` list by `build_composite`. The composite
is an ``nn.Module``: its parameters (adapters of feature terms) must be optimised
together with the student, and it must be moved to the student's device.
"""

from __future__ import annotations

import inspect
from collections import Counter

import torch.nn.functional as F
from torch import Tensor, nn

from kd.errors import InputError
from kd.losses.base import LOSSES, DistillBatch, LossContext, check_number


def hard_label_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy averaged over the labeled samples (``label >= 0``) only.

    ``Σ_{i labeled} CE(logits_i, y_i) / max(1, #labeled)``: exactly 0, with finite
    (zero) gradients, when no sample is labeled. No host-device sync.
    """
    mask = labels >= 0
    per_sample = F.cross_entropy(logits.float(), labels.clamp(min=0).long(), reduction="none")
    return per_sample.where(mask, 0.0).sum() / mask.sum().clamp(min=1)


def teacher_confidence(teacher_logits: Tensor) -> Tensor:
    """``[B]`` confidence of the teacher: ``max_c softmax(t)_c`` at temperature 1."""
    return F.softmax(teacher_logits.detach().float(), dim=-1).amax(dim=-1)


def _build_term(i: int, term: dict, ctx: LossContext) -> tuple[str, float, dict, nn.Module]:
    """One ``distill.losses[i]`` entry -> (name, weight, params, module)."""
    if not isinstance(term, dict) or not isinstance(term.get("name"), str):
        raise InputError(f"distill.losses[{i}]: must be a mapping with a string 'name'")
    params = dict(term)
    name = params.pop("name")
    where = f"distill.losses[{i}] ({name})"
    weight = check_number(params.pop("weight", 1.0), f"{where}: weight")
    try:
        factory = LOSSES.get(name)
    except InputError as e:
        raise InputError(f"distill.losses[{i}]: {e}") from None
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        try:
            sig.bind(ctx, **params)
        except TypeError as e:
            accepted = [p for p in list(sig.parameters)[1:] if p not in ("args", "kwargs")]
            unknown = [k for k in params if k not in sig.parameters]
            what = f"unexpected parameter {', '.join(map(repr, unknown))}" if unknown else str(e)
            raise InputError(
                f"{where}: {what} (accepted: {', '.join(accepted) or 'none'}, weight)"
            ) from None
    try:
        module = factory(ctx, **params)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None
    if not isinstance(module, nn.Module):
        raise InputError(f"{where}: the factory returned {type(module).__name__}, not nn.Module")
    return name, weight, params, module


class CompositeLoss(nn.Module):
    """``total = ce_weight · CE(labeled) + Σ_i weight_i · term_i(batch[keep])``.

    ``keep`` is every sample, or (with ``min_teacher_confidence = τ`` and teacher
    logits in the batch) the samples with ``teacher_confidence(t_0) >= τ``; each
    term is then averaged over the kept samples only, and is 0 when none is kept.
    CE always uses every labeled sample. The mask used is stored in
    ``batch.distill_mask`` (unless the caller set one, which is then used as is).

    ``forward`` returns ``(total, parts)``; ``parts`` holds detached values: ``"ce"``
    (only when ``ce_weight > 0``) and one entry per term keyed by its name, or
    ``"name.i"`` (``i`` = its index in the term list) for names used more than once.
    """

    def __init__(
        self,
        names: list[str],
        weights: list[float],
        params: list[dict],
        modules: list[nn.Module],
        ce_weight: float,
        min_teacher_confidence: float | None = None,
    ) -> None:
        super().__init__()
        self.names, self.weights, self.params = names, weights, params
        self.terms = nn.ModuleList(modules)
        self.ce_weight = ce_weight
        self.min_teacher_confidence = min_teacher_confidence
        counts = Counter(names)
        self.keys = [n if counts[n] == 1 else f"{n}.{i}" for i, n in enumerate(names)]

    def forward(self, batch: DistillBatch) -> tuple[Tensor, dict[str, Tensor]]:
        parts: dict[str, Tensor] = {}
        total = batch.student_logits.sum().float() * 0  # 0, but connected to the graph
        if self.ce_weight > 0:
            ce = hard_label_ce(batch.student_logits, batch.labels)
            parts["ce"] = ce.detach()
            total = total + self.ce_weight * ce
        if (batch.distill_mask is None and self.min_teacher_confidence is not None
                and batch.teacher_logits and len(self.terms)):
            conf = teacher_confidence(batch.teacher_logits[0])
            batch.distill_mask = conf >= self.min_teacher_confidence
        sub = batch
        if batch.distill_mask is not None:
            if not bool(batch.distill_mask.any()):
                zero = total.detach() * 0
                parts.update({key: zero for key in self.keys})
                return total, parts
            if not bool(batch.distill_mask.all()):
                sub = batch.select(batch.distill_mask)
        for key, weight, term in zip(self.keys, self.weights, self.terms, strict=True):
            value = term(sub)
            parts[key] = value.detach()
            total = total + weight * value
        return total, parts


def build_composite(terms: list[dict], ce_weight: float, ctx: LossContext,
                    min_teacher_confidence: float | None = None) -> CompositeLoss:
    """Build every ``{"name": ..., "weight": w, **params}`` term with
    ``LOSSES.get(name)(ctx, **params)`` (``weight`` defaults to 1). Unknown names,
    unexpected or missing params and a factory's own `InputError` are reported as
    `InputError` prefixed ``distill.losses[i] (name):``. No terms and ``ce_weight == 0``
    is an `InputError` (nothing to train). ``min_teacher_confidence`` (in [0, 1]) is
    the confidence filter of `CompositeLoss`."""
    ce_w = check_number(ce_weight, "distill.ce_weight")
    built = [_build_term(i, term, ctx) for i, term in enumerate(terms or [])]
    if not built and ce_w == 0:
        raise InputError("distill: no loss terms and ce_weight is 0, so there is nothing to train")
    return CompositeLoss(
        names=[b[0] for b in built],
        weights=[b[1] for b in built],
        params=[b[2] for b in built],
        modules=[b[3] for b in built],
        ce_weight=ce_w,
        min_teacher_confidence=min_teacher_confidence,
    )
