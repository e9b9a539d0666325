"""Distillation with few labels: the teacher as labeller.

Unlabeled samples carry label -1 all the way through (see `kd.data`), so the one
loop needs no special path: CE skips them, distillation terms use them. This
module holds what needs both the recipe and the data, run by the driver before
any worker starts:

- `check_label_use`: bad-input checks (a run with no labels to learn from, a
  confidence filter without distillation terms, labels outside the teacher's
  class range, balancing without a teacher).
- `balance_by_teacher`: ``data.balance_by_teacher: true`` resamples the unlabeled
  part of ``train`` so every class the teacher predicts occurs equally often.
  The result is an ordinary `Splits`; the loop just sees a different train set.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from kd.config import Experiment
from kd.data import ArraySplit, Splits
from kd.data.base import content_hash
from kd.errors import InputError


def _terms(exp: Experiment, role: str) -> list:
    return list(exp.distill.losses) if role == "student" else []


def _teacher_num_classes(weights: str) -> int | None:
    """``kd.num_classes`` from a local kdflow safetensors file's header, else None."""
    from kd.models.weights import read_metadata

    p = Path(weights)
    if p.suffix != ".safetensors" or not p.is_file():
        return None
    value = read_metadata(p).get("kd.num_classes")
    return int(value) if value and value.isdigit() else None


def check_label_use(exp: Experiment, role: str, splits: Splits) -> None:
    """Raise a one-line `InputError` when the recipe cannot use the data's labels:

    - the train split has no label and the recipe is CE only (``kd teacher``, or
      ``kd distill`` with empty ``distill.losses``): nothing to learn from;
    - ``distill.min_teacher_confidence`` without distillation terms;
    - ``data.balance_by_teacher`` without a teacher with weights, or for ``kd teacher``;
    - a label >= the class count recorded in the teacher's weights file.
    """
    terms = _terms(exp, role)
    if splits.train.labeled == 0 and not terms:
        what = ("data.labels: none" if exp.data.labels == "none"
                else f"{exp.data.source}: the train split has no labels")
        how = ("`kd teacher` trains with CE only and needs labels" if role == "teacher"
               else "the recipe has only CE; add a distillation term to distill.losses, "
                    "e.g. {name: kd}")
        raise InputError(f"{what}, but {how}")
    if role == "student" and exp.distill.min_teacher_confidence is not None and not terms:
        raise InputError("distill.min_teacher_confidence: filters the distillation terms, "
                         "but distill.losses is empty")
    if exp.data.balance_by_teacher:
        if role == "teacher":
            raise InputError("data.balance_by_teacher: resamples by teacher prediction, "
                             "which `kd teacher` has none of; set it to false")
        if exp.teacher is None or not exp.teacher.weights:
            raise InputError("data.balance_by_teacher: needs a teacher with weights "
                             "(teacher.weights)")
    if role == "student" and exp.teacher is not None and exp.teacher.weights:
        classes = _teacher_num_classes(exp.teacher.weights)
        top = max(int(s.y.max(initial=-1)) for s in (splits.train, splits.val, splits.holdout))
        if classes is not None and top >= classes:
            raise InputError(f"{exp.data.source}: label {top} is outside the class range "
                             f"[0, {classes}) of teacher.weights {exp.teacher.weights}")


def balanced_indices(pred: np.ndarray, seed: int) -> np.ndarray:
    """Indices into ``pred`` (predicted classes) giving every predicted class
    ``m = ceil(N / K)`` rows, K = classes predicted at least once: a class with
    ``n_c >= m`` rows is subsampled without replacement, a smaller one keeps all its
    rows plus ``m - n_c`` drawn with replacement. Deterministic for a ``seed``."""
    rng = np.random.default_rng(seed)
    classes = np.unique(pred)
    if classes.size == 0:
        return np.zeros(0, dtype=np.int64)
    m = -(-len(pred) // classes.size)
    out = []
    for c in classes:
        members = np.flatnonzero(pred == c)
        if len(members) >= m:
            out.append(rng.choice(members, size=m, replace=False))
        else:
            out.append(np.concatenate([members, rng.choice(members, size=m - len(members))]))
    return np.sort(np.concatenate(out)).astype(np.int64)


def balance_by_teacher(exp: Experiment, role: str, splits: Splits) -> Splits:
    """``splits`` with the unlabeled train rows resampled by `balanced_indices` of the
    primary teacher's argmax (labeled rows unchanged, first); unchanged when
    ``data.balance_by_teacher`` is off or no train row is unlabeled. The data hash
    covers the resampled train set."""
    if not exp.data.balance_by_teacher or role != "student" or exp.teacher is None:
        return splits
    from kd.models.weights import freeze
    from kd.train.assemble import build_spec
    from kd.train.evaluate import predict_logits

    train = splits.train
    unl = np.flatnonzero(train.y < 0)
    if unl.size == 0:
        print("[kd] data.balance_by_teacher: no unlabeled train rows, nothing to balance",
              flush=True)
        return splits
    teacher = freeze(build_spec(exp.teacher, "teacher", splits.input_shape,
                                splits.num_classes, True))
    pred = predict_logits(teacher, train.x[unl]).argmax(1).numpy()
    pick = unl[balanced_indices(pred, exp.data.split.seed)]
    lab = np.flatnonzero(train.y >= 0)
    new = ArraySplit(np.concatenate([train.x[lab], train.x[pick]]),
                     np.concatenate([train.y[lab], train.y[pick]]))
    before = np.bincount(pred, minlength=splits.num_classes).tolist()
    print(f"[kd] data.balance_by_teacher: {unl.size} unlabeled rows, teacher predicts "
          f"{before} per class -> {len(pick)} rows, {len(pick) // len(np.unique(pred))} "
          f"per predicted class", flush=True)
    return replace(splits, train=new,
                   data_hash=content_hash(new.x, new.y, extra=f"{splits.data_hash}|balanced"))
