"""Build what one training run needs from an Experiment: trainee, teachers, loss.

The driver calls `assemble` before any Ray worker starts (so bad names, weights
that do not fit, missing feature paths and class-count mismatches fail fast with
one line), and each worker calls it again to build its own copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from kd.config import Experiment, ModelSpec
from kd.errors import InputError
from kd.losses import CompositeLoss, LossContext, build_composite
from kd.losses.base import required_paths
from kd.models import build_model
from kd.models.weights import freeze, freeze_paths, load_into, load_state_dict
from kd.train.capture import check_paths, feature_shapes
from kd.train.text import init_text_student, weights_ref

TEXT_INITS = ("teacher_layers", "model2vec")

Role = Literal["teacher", "student"]


@dataclass
class Assembly:
    """The trainee (the model being trained), frozen teachers and the composite loss."""

    trainee: nn.Module
    teachers: list[nn.Module]
    loss: CompositeLoss
    student_paths: list[str]
    teacher_paths: list[str]


def build_spec(spec: ModelSpec, field: str, input_shape: tuple[int, ...], num_classes: int,
               load_weights: bool) -> nn.Module:
    """Build one model from its spec; load its weights (strictly) when asked and set."""
    model = build_model(spec.model, spec.args, input_shape, num_classes, spec.width)
    if load_weights and spec.weights:
        state, meta = load_state_dict(spec.weights)
        trained_on = meta.get("kd.num_classes")
        if trained_on is not None and int(trained_on) != num_classes:
            raise InputError(f"{field}.weights {spec.weights}: the model was trained on {trained_on} "
                             f"classes but the data has {num_classes}")
        load_into(model, state, what=f"{field} ({spec.weights})")
    return model


def _check_classes(model: nn.Module, sample: torch.Tensor, num_classes: int, what: str,
                   task: str = "classify") -> None:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(sample)
    model.train(was_training)
    if out.ndim != 2 or out.shape[1] != num_classes:
        has = (f"the teacher's embeddings are {num_classes} wide" if task == "embed"
               else f"the data has {num_classes} classes")
        raise InputError(f"{what} outputs shape {tuple(out.shape)} but {has} "
                         f"(expected [batch, {num_classes}])")


def primary_teacher(exp: Experiment, splits: Any) -> nn.Module | None:
    """The frozen primary teacher with its weights, or None if the config has none."""
    if weights_ref(exp.teacher) is None:
        return None
    return freeze(build_spec(exp.teacher, "teacher", splits.input_shape, splits.num_classes, True))


def trainee_spec(exp: Experiment, role: Role) -> ModelSpec:
    """The spec of the model a run trains: the teacher for `kd teacher`, else the student."""
    spec = exp.teacher if role == "teacher" else exp.student
    if spec is None:
        raise InputError(f"{role}: section is required for `kd {role if role == 'teacher' else 'distill'}`")
    return spec


def init_from_teacher(exp: Experiment, student: nn.Module, input_shape: tuple[int, ...],
                      num_classes: int) -> None:
    """``student.init: teacher_pruned``: fill the student with the teacher's most
    important channels (`kd.train.prune.prune_into`)."""
    from kd.train.prune import prune_into

    if exp.teacher is None or not exp.teacher.weights:
        raise InputError("student.init: teacher_pruned needs teacher.weights")
    if exp.student is not None and (exp.student.model != exp.teacher.model
                                    or exp.student.args != exp.teacher.args):
        raise InputError(f"student.init: teacher_pruned needs the teacher's model and args "
                         f"(student {exp.student.model} {exp.student.args}, teacher "
                         f"{exp.teacher.model} {exp.teacher.args}); only student.width may differ")
    teacher = build_spec(exp.teacher, "teacher", input_shape, num_classes, load_weights=True)
    prune_into(student, teacher)


def assemble(exp: Experiment, role: Role, input_shape: tuple[int, ...], num_classes: int,
             sample: torch.Tensor) -> Assembly:
    """Build and validate trainee, teachers and loss. ``sample`` is a small input batch
    used for the dry run that finds feature shapes and output sizes."""
    spec = trainee_spec(exp, role)
    trainee = build_spec(spec, role, input_shape, num_classes, load_weights=role == "student")
    if role == "student" and exp.student is not None and exp.student.init == "teacher_pruned":
        init_from_teacher(exp, trainee, input_shape, num_classes)
    _check_classes(trainee, sample, num_classes, f"{role} model {spec.model!r}", exp.task)
    teachers: list[nn.Module] = []
    terms = [] if role == "teacher" else [t.model_dump() for t in exp.distill.losses]
    if terms:
        if exp.teacher is None:
            raise InputError("distill.losses need a teacher: add a teacher: section")
        for i, tspec in enumerate(exp.teacher.all()):
            field = "teacher" if i == 0 else f"teacher.teachers[{i - 1}]"
            if weights_ref(tspec) is None:
                raise InputError(f"{field}.weights: required to distil (train one with "
                                 "`kd teacher CONFIG`, then point teacher.weights at it)")
            t = freeze(build_spec(tspec, field, input_shape, num_classes, load_weights=True))
            _check_classes(t, sample, num_classes, f"{field} model {tspec.model!r}", exp.task)
            teachers.append(t)
    if role == "student" and exp.student is not None and exp.student.init in TEXT_INITS:
        if not teachers:
            raise InputError(f"student.init: {exp.student.init} copies from the teacher: "
                             "configure a teacher and distill.losses")
        init_text_student(exp, trainee, teachers[0], sample)
    if role == "student" and exp.student is not None and exp.student.freeze:
        freeze_paths(trainee, exp.student.freeze, "student.freeze")  # after any init copies
    ce_weight = 1.0 if role == "teacher" else exp.distill.ce_weight
    s_paths, t_paths = required_paths(terms)
    check_paths(trainee, s_paths, "student")
    if teachers:
        check_paths(teachers[0], t_paths, "teacher")
    ctx = LossContext(
        temperature=exp.distill.temperature, num_classes=num_classes, student=trainee,
        teachers=teachers,
        student_shapes=feature_shapes(trainee, s_paths, sample, "student") if s_paths else {},
        teacher_shapes=(feature_shapes(teachers[0], t_paths, sample, "teacher")
                        if t_paths and teachers else {}),
    )
    if ce_weight == 0 and not terms:
        raise InputError("distill: ce_weight is 0 and no losses are configured: nothing to train")
    loss = build_composite(terms, ce_weight, ctx,
                           None if role == "teacher" else exp.distill.min_teacher_confidence)
    return Assembly(trainee, teachers, loss, s_paths, t_paths)
