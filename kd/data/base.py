"""In-memory data splits: arrays, the stratified split, label masking, content hash.

Labels are int64 with -1 meaning "no label": the whole pipeline carries that
mask, so unlabeled and partly labeled data need no special path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from kd.errors import InputError

UNLABELED = -1


@dataclass
class ArraySplit:
    """One split: inputs ``x`` (float32 or int64 token ids) and labels ``y`` (-1 = none)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    @property
    def labeled(self) -> int:
        """How many samples carry a label."""
        return int((self.y >= 0).sum())


@dataclass
class Splits:
    """train / val / holdout plus what models need to know about the data."""

    train: ArraySplit
    val: ArraySplit
    holdout: ArraySplit
    num_classes: int
    input_shape: tuple[int, ...]
    data_hash: str


def content_hash(*arrays: np.ndarray, extra: str = "") -> str:
    """sha256 (16 hex) over the arrays' dtype, shape and bytes, plus ``extra``."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    h.update(extra.encode())
    return h.hexdigest()[:16]


def check_labels(y: np.ndarray, num_classes: int | None, source: str) -> int:
    """Validate labels (ints, -1 for none, else in [0, C)); return the class count."""
    if not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"{source}: labels must be integers, got {y.dtype}")
    labeled = y[y >= 0]
    if (y < UNLABELED).any():
        raise InputError(f"{source}: labels must be >= 0 (or -1 for unlabeled), found {y.min()}")
    inferred = int(labeled.max()) + 1 if labeled.size else 0
    if num_classes is None:
        if inferred == 0:
            raise InputError(f"{source}: no labels at all; set data.args.num_classes")
        return inferred
    if inferred > num_classes:
        raise InputError(f"{source}: label {inferred - 1} is outside the class range "
                         f"[0, {num_classes})")
    return num_classes


def three_way_split(
    x: np.ndarray, y: np.ndarray, fractions: tuple[float, float, float], stratify: bool, seed: int
) -> tuple[ArraySplit, ArraySplit, ArraySplit]:
    """Split into train/val/holdout by fractions, stratified on labels where possible."""
    from sklearn.model_selection import train_test_split

    n = len(y)
    idx = np.arange(n)
    f_train, f_val, f_hold = fractions
    strat = y if stratify and (y >= 0).all() and len(np.unique(y)) > 1 else None
    rest_frac = f_val + f_hold
    try:
        train_idx, rest_idx = train_test_split(idx, test_size=rest_frac, random_state=seed,
                                               stratify=strat)
        if f_hold == 0:
            val_idx, hold_idx = rest_idx, np.array([], dtype=int)
        else:
            strat_rest = strat[rest_idx] if strat is not None else None
            val_idx, hold_idx = train_test_split(rest_idx, test_size=f_hold / rest_frac,
                                                 random_state=seed, stratify=strat_rest)
    except ValueError as e:  # too few samples (of a class) for these fractions
        hint = "; set data.split.stratify: false" if strat is not None else ""
        raise InputError(f"data.split: cannot split {n} samples: {e}{hint}") from None
    return tuple(ArraySplit(x[i], y[i]) for i in (train_idx, val_idx, hold_idx))  # type: ignore[return-value]


def mask_labels(split: ArraySplit, fraction: float, seed: int) -> ArraySplit:
    """Keep labels on a stratified ``fraction`` of samples (fixed seed); the rest get -1."""
    rng = np.random.default_rng(seed)
    y = split.y.copy()
    keep = np.zeros(len(y), dtype=bool)
    for c in np.unique(y[y >= 0]):
        members = np.flatnonzero(y == c)
        k = max(1, int(round(fraction * len(members))))
        keep[rng.choice(members, size=k, replace=False)] = True
    y[~keep] = UNLABELED
    return ArraySplit(split.x, y)
