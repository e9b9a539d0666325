"""The teacher-output cache's column names and top-k decoding, shared by the worker
loop (which reads the columns from a batch) and `kd.train.cache` (which writes them)."""

from __future__ import annotations

import torch

TEACHER_LOGITS = "teacher_logits"
TEACHER_FEATURE = "teacher_feature:"
TEACHER_TOPK_VALUES = "teacher_topk_values"
TEACHER_TOPK_INDICES = "teacher_topk_indices"
TOPK_FLOOR = 1e4  # classes outside the cached top-k get logit min(top-k) - TOPK_FLOOR


def dense_from_topk(values: torch.Tensor, indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Full ``[B, C]`` logits from the cached top-k: the k kept logits in place, every
    other class at ``min(top-k) - TOPK_FLOOR`` (probability 0 at any sane temperature),
    so softmax over the result is the teacher's softmax renormalised over its top k."""
    floor = values.min(1, keepdim=True).values - TOPK_FLOOR
    out = floor.expand(values.shape[0], num_classes).clone()
    return out.scatter(1, indices.long(), values)

