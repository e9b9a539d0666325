"""``student.init: teacher_pruned``: build the student by structured width pruning
of the teacher (Minitron-style "model distillation" init), then distil as usual.

For chain-structured families (``cnn_small``, ``mlp``: each conv / linear layer
reads exactly the previous one's output) where student and teacher share the
architecture and the student is narrower (``student.width`` < ``teacher.width``):
for every conv / linear layer, output channels are ranked by importance and the
top ``c_student`` kept (in their original order):

- importance ``|gamma_c|``, the scale of the BatchNorm that follows the layer, when
  there is one (network-slimming criterion);
- else the L1 norm of the channel's weights ``sum |W[c, ...]|``.

The student layer gets ``W_t[keep_out][:, keep_in]`` (``keep_in`` = the previous
layer's kept channels), bias / BN parameters and running stats sliced alike; the
classifier keeps all classes.
"""

from __future__ import annotations

import torch
from torch import nn

from kd.errors import InputError

PRUNABLE = (nn.Conv2d, nn.Conv1d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE + NORMS)]


def _check_same_family(student: nn.Module, teacher: nn.Module) -> None:
    s, t = _layers(student), _layers(teacher)
    if [(n, type(m)) for n, m in s] != [(n, type(m)) for n, m in t]:
        raise InputError("student.init: teacher_pruned needs a student of the teacher's "
                         "architecture at a smaller width (same model and args, student.width "
                         "< teacher.width); their layers differ")


def importance(layer: nn.Module, norm: nn.Module | None) -> torch.Tensor:
    """Per output channel: ``|gamma|`` of the following BatchNorm, else the L1 norm of
    the channel's weights."""
    if norm is not None:
        return norm.weight.detach().abs()
    return layer.weight.detach().abs().flatten(1).sum(1)


@torch.no_grad()
def prune_into(student: nn.Module, teacher: nn.Module) -> dict[str, int]:
    """Copy the most important teacher channels into ``student`` in place (see the
    module docstring); returns ``{layer: kept channels}``. Raises `InputError` for
    families that are not chains or shapes that cannot be sliced."""
    _check_same_family(student, teacher)
    s_layers = dict(_layers(student))
    t_list = _layers(teacher)
    keep_in: torch.Tensor | None = None
    prev_out: int | None = None
    kept: dict[str, int] = {}
    for i, (name, t_mod) in enumerate(t_list):
        s_mod = s_layers[name]
        if isinstance(t_mod, NORMS):
            if keep_in is None or t_mod.num_features != prev_out:
                raise InputError(f"student.init: teacher_pruned: norm {name} does not follow "
                                 "a prunable layer; this family is not a plain chain")
            for attr in ("weight", "bias", "running_mean", "running_var"):
                getattr(s_mod, attr).copy_(getattr(t_mod, attr)[keep_in])
            s_mod.num_batches_tracked.copy_(t_mod.num_batches_tracked)
            continue
        t_w, s_w = t_mod.weight, s_mod.weight
        in_t = t_w.shape[1]
        if prev_out is not None and in_t != prev_out:
            raise InputError(f"student.init: teacher_pruned: layer {name} reads {in_t} channels "
                             f"but the previous layer gives {prev_out}; only chain-structured "
                             "families (cnn_small, mlp) can be pruned this way")
        if s_w.shape[0] > t_w.shape[0] or s_w.shape[1] > in_t:
            raise InputError(f"student.init: teacher_pruned: student layer {name} "
                             f"{tuple(s_w.shape)} is wider than the teacher's {tuple(t_w.shape)}")
        nxt = t_list[i + 1][1] if i + 1 < len(t_list) else None
        norm = nxt if isinstance(nxt, NORMS) and nxt.num_features == t_w.shape[0] else None
        n_out = s_w.shape[0]
        if n_out == t_w.shape[0]:
            keep_out = torch.arange(n_out)
        else:
            keep_out = importance(t_mod, norm).topk(n_out).indices.sort().values
        cols = keep_in if keep_in is not None and len(keep_in) == s_w.shape[1] else None
        w = t_w[keep_out]
        if cols is not None:
            w = w[:, cols]
        elif s_w.shape[1] != in_t:  # first layer: inputs are the data, never pruned
            raise InputError(f"student.init: teacher_pruned: cannot slice inputs of {name}")
        s_w.copy_(w)
        if getattr(t_mod, "bias", None) is not None and s_mod.bias is not None:
            s_mod.bias.copy_(t_mod.bias[keep_out])
        kept[name] = n_out
        keep_in, prev_out = keep_out, t_w.shape[0]
    return kept
