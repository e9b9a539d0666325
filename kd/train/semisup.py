"""Distillation with few labels: the teacher as labeller.

Unlabeled samples carry label -1 all the way through (see `kd.data`), so the one
loop needs no special path: CE skips them, distillation terms use them. This
module holds what needs both the recipe and the data, run by the driver before
any worker starts:

- `check_label_use`: bad-input checks (a run with no labels to learn from, a
  confidence filter without distillation terms, labels outside the teacher's
  class range, balancing without a teacher).
- `balance_by_teacher`: ``data.balance_by_teacher: true`` resamples the unlabeled
  part of ``train`` (streaming, see there) so every class the teacher predicts occurs
  about equally often. The result is an ordinary `Splits`; the loop just sees a
  different train stream.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from kd.config import Experiment
from kd.data import Splits, StreamSplit, data_task_cpus
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
        top = max(s.top_label for s in (splits.train, splits.val, splits.holdout))
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


class TeacherPredict:
    """``map_batches`` callable: the frozen teacher's argmax for the unlabeled rows of a
    batch; ``weights`` None -> one row of per-class counts (the counting pass), else the
    batch resampled: labeled rows once, an unlabeled row predicted ``c`` repeated
    ``floor(w_c)`` times plus once more with probability ``w_c - floor(w_c)`` (by the
    hash of its ``idx`` and ``seed``: deterministic)."""

    def __init__(self, teacher: Any, num_classes: int, weights: list[float] | None,
                 seed: int) -> None:
        self.teacher, self.num_classes, self.seed = teacher, num_classes, seed
        self.weights = None if weights is None else np.asarray(weights)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from kd.data.stream import unit
        from kd.train.evaluate import predict_logits

        x, y, idx = np.asarray(batch["x"]), np.asarray(batch["y"]), np.asarray(batch["idx"])
        unl = np.flatnonzero(y < 0)
        pred = (predict_logits(self.teacher, x[unl]).argmax(1).numpy() if unl.size
                else np.zeros(0, np.int64))
        if self.weights is None:
            return {"counts": np.bincount(pred, minlength=self.num_classes)[None]}
        w = self.weights[pred]
        reps = np.ones(len(y), np.int64)
        reps[unl] = np.floor(w).astype(np.int64) + (unit(idx[unl], self.seed, 2) < w - np.floor(w))
        keep = np.repeat(np.arange(len(y)), reps)
        return {k: np.asarray(v)[keep] for k, v in batch.items()}


def balance_by_teacher(exp: Experiment, role: str, splits: Splits) -> Splits:
    """``splits`` with the unlabeled train rows resampled by the primary teacher's argmax
    so every predicted class gets about ``m = ceil(N / K)`` rows (K = classes predicted
    at least once; labeled rows unchanged). Streaming: one counting pass, then the
    train stream carries a `TeacherPredict` resampling step (each row's repeat count
    is fixed by its ``idx``; per class the count is ``m`` in expectation, not exactly).
    Unchanged when ``data.balance_by_teacher`` is off or no train row is unlabeled.
    The data hash covers the resampling."""
    if not exp.data.balance_by_teacher or role != "student" or exp.teacher is None:
        return splits
    from kd.data.base import content_hash
    from kd.data.profile import SplitCounts
    from kd.models.weights import freeze
    from kd.train.assemble import build_spec

    train = splits.train
    n_unl = len(train) - train.labeled
    if n_unl == 0:
        print("[kd] data.balance_by_teacher: no unlabeled train rows, nothing to balance",
              flush=True)
        return splits
    teacher = freeze(build_spec(exp.teacher, "teacher", splits.input_shape,
                                splits.num_classes, True))
    seed = exp.data.split.seed
    args = {"teacher": teacher, "num_classes": splits.num_classes, "seed": seed}
    before = np.zeros(splits.num_classes, np.int64)
    for b in train.dataset().map_batches(TeacherPredict, fn_constructor_kwargs={**args, "weights": None},
                                         batch_size=1024, batch_format="numpy", concurrency=1,
                                         num_cpus=data_task_cpus()).iter_batches(batch_size=None):
        before += np.asarray(b["counts"]).sum(0)
    k = int((before > 0).sum())
    m = -(-n_unl // k)
    weights = [m / c if c else 0.0 for c in before]
    new = StreamSplit(train.sources, train.counts, "train",
                      maps=[*train.maps, (TeacherPredict, {**args, "weights": weights})])
    rows = int(new.dataset().count())  # one more pass: the exact size, for steps per epoch
    new.counts = SplitCounts(rows, train.labeled, list(train.counts.per_class))
    print(f"[kd] data.balance_by_teacher: {n_unl} unlabeled rows, teacher predicts "
          f"{before.tolist()} per class -> about {m} per predicted class ({rows} train rows)",
          flush=True)
    return replace(splits, train=new, data_hash=content_hash(
        np.asarray(weights), extra=f"{splits.data_hash}|balanced|{seed}"))
