"""The contract every distillation loss term follows.

A loss factory is registered in `LOSSES` under a short name and called as
``factory(ctx: LossContext, **params) -> nn.Module``; the module's
``forward(batch: DistillBatch) -> Tensor`` returns a scalar averaged over the batch.
Feature losses name the module paths they read with the params ``student`` and
``teacher`` (see `feature_paths`); kdflow hooks exactly those paths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kd.errors import InputError
from kd.plugins import Registry

LOSSES = Registry("loss")


@dataclass
class DistillBatch:
    """What one training step hands to the loss terms.

    ``labels`` holds -1 for samples without a label; ``teacher_logits`` has one
    ``[B, C]`` tensor per teacher (the primary teacher first) and is empty when
    no teacher is configured; feature dicts map module path -> captured output.
    ``distill_mask`` (boolean ``[B]``, None = every sample) marks the samples the
    distillation terms use; `CompositeLoss` fills it when it filters by teacher
    confidence.

    For ``task: embed`` the names are kept but ``student_logits`` and each
    ``teacher_logits[k]`` hold sentence embeddings ``[B, D]`` instead of logits, and
    ``token_mask`` (boolean ``[B, L]``, True for real tokens; None = every token is
    real) marks the non-pad positions of token-level features (hidden states ``[B, L, H]``,
    attention probabilities ``[B, H, L, L]``).
    """

    student_logits: Tensor
    labels: Tensor
    teacher_logits: list[Tensor] = field(default_factory=list)
    student_features: dict[str, Tensor] = field(default_factory=dict)
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    distill_mask: Tensor | None = None
    token_mask: Tensor | None = None

    def select(self, mask: Tensor) -> DistillBatch:
        """The sub-batch of rows where ``mask`` is True (logits, labels, features,
        ``token_mask``); its ``distill_mask`` is None (every row of it is used)."""

        def rows(t: Tensor) -> Tensor:
            return t[mask] if t.ndim and t.shape[0] == mask.shape[0] else t

        return DistillBatch(
            rows(self.student_logits), rows(self.labels), [rows(t) for t in self.teacher_logits],
            {k: rows(v) for k, v in self.student_features.items()},
            {k: rows(v) for k, v in self.teacher_features.items()},
            token_mask=None if self.token_mask is None else rows(self.token_mask),
        )

    @property
    def label_mask(self) -> Tensor:
        """Boolean ``[B]``: True where the sample has a label."""
        return self.labels >= 0


@dataclass
class LossContext:
    """What a factory may look at when it builds a term (adapters need shapes).

    ``student_shapes`` / ``teacher_shapes`` map each hooked module path to the
    shape of its output for a dry-run batch (batch dimension included).
    """

    temperature: float
    num_classes: int
    student: nn.Module | None = None
    teachers: list[nn.Module] = field(default_factory=list)
    student_shapes: dict[str, torch.Size] = field(default_factory=dict)
    teacher_shapes: dict[str, torch.Size] = field(default_factory=dict)


FEATURE_KEYS = ("student", "teacher")


def feature_paths(params: dict) -> tuple[list[str], list[str]]:
    """The student and teacher module paths a loss term's params name.

    ``student`` / ``teacher`` may each be one path or a list of paths.
    """
    out: list[list[str]] = []
    for key in FEATURE_KEYS:
        value = params.get(key)
        if value is None:
            out.append([])
        elif isinstance(value, str):
            out.append([value])
        else:
            out.append([str(v) for v in value])
    return out[0], out[1]


def required_paths(terms: list[dict]) -> tuple[list[str], list[str]]:
    """Union (in order) of the student and teacher module paths the loss terms name."""
    s_paths: list[str] = []
    t_paths: list[str] = []
    for term in terms:
        s, t = feature_paths(term)
        s_paths += [p for p in s if p not in s_paths]
        t_paths += [p for p in t if p not in t_paths]
    return s_paths, t_paths


def check_number(value: object, name: str, positive: bool = False) -> float:
    """``value`` as a float, or an `InputError` naming the param ``name``.

    Accepts ints, floats and numeric strings (YAML reads ``1e-3`` as a string); refuses
    booleans, other strings, NaN and infinities, and values < 0 (<= 0 when ``positive``).
    """
    bound = "> 0" if positive else ">= 0"
    if isinstance(value, bool):
        raise InputError(f"{name}: must be a finite number {bound}, got {value!r}")
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"{name}: must be a finite number {bound}, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise InputError(f"{name}: must be a finite number {bound}, got {value!r}")
    return v
