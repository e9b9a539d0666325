"""Data: built-in sets and user files -> fixed train/val/holdout splits -> Ray Datasets.

`load_splits` is the one entry: it reads the source, splits it once with a fixed
seed (stratified), applies label masking (``labeled_fraction``, ``labels: none``),
appends an unlabeled transfer set to train, and hashes the content for lineage.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kd.config import DataConfig
from kd.data import builtin  # noqa: F401  (registers the built-in sets)
from kd.data.base import (
    UNLABELED,
    ArraySplit,
    Splits,
    check_labels,
    content_hash,
    mask_labels,
    three_way_split,
)
from kd.data.files import read_source
from kd.data.registry import DATASETS
from kd.errors import InputError

__all__ = ["DATASETS", "ArraySplit", "Splits", "load_splits", "to_ray", "UNLABELED"]


def _read(cfg: DataConfig, source: str, endpoint: str | None) -> tuple[np.ndarray, np.ndarray]:
    if source in DATASETS and ":" not in source:
        try:
            return DATASETS.get(source)(**cfg.args)
        except TypeError as e:
            raise InputError(f"data.args: {e}") from None
    if ":" in source and "://" not in source:
        return DATASETS.get(source)(**cfg.args)
    if "/" not in source and "." not in source:
        DATASETS.get(source)  # raises "unknown dataset ... did you mean"
    return read_source(source, cfg.format, cfg.x_column, cfg.y_column, cfg.args, endpoint)


def load_splits(cfg: DataConfig, endpoint: str | None = None) -> Splits:
    """Read, split, mask and hash the experiment's data (see module docstring)."""
    x, y = _read(cfg, cfg.source, endpoint)
    if len(x) != len(y):
        raise InputError(f"{cfg.source}: {len(x)} inputs but {len(y)} labels")
    num_classes = check_labels(y, cfg.args.get("num_classes"), cfg.source)
    s = cfg.split
    train, val, holdout = three_way_split(x, y, (s.train, s.val, s.holdout), s.stratify, s.seed)
    if cfg.labels == "none":
        train = ArraySplit(train.x, np.full(len(train), UNLABELED, dtype=np.int64))
    elif cfg.labeled_fraction is not None and cfg.labeled_fraction < 1:
        train = mask_labels(train, cfg.labeled_fraction, s.seed)
    extra = f"{s.model_dump_json()}|{cfg.labels}|{cfg.labeled_fraction}|{cfg.transforms}"
    if cfg.transfer:
        tx, _ = read_source(cfg.transfer, "auto", cfg.x_column, cfg.y_column, cfg.args, endpoint)
        if tx.shape[1:] != train.x.shape[1:]:
            raise InputError(f"data.transfer {cfg.transfer}: input shape {tuple(tx.shape[1:])} "
                             f"differs from the labeled set's {tuple(train.x.shape[1:])}")
        train = ArraySplit(np.concatenate([train.x, tx.astype(train.x.dtype)]),
                           np.concatenate([train.y, np.full(len(tx), UNLABELED, np.int64)]))
        extra += f"|transfer={content_hash(tx)}"
    return Splits(train, val, holdout, num_classes, tuple(int(d) for d in x.shape[1:]),
                  content_hash(x, y, extra=extra))


def to_ray(split: ArraySplit, extra_columns: dict[str, np.ndarray] | None = None) -> Any:
    """A Ray Dataset with columns ``x`` (tensor), ``y`` (int64, -1 = unlabeled), ``idx``
    (row index, the join key for cached teacher outputs) and any ``extra_columns``."""
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    cols: dict[str, Any] = {
        "x": ArrowTensorArray.from_numpy(np.ascontiguousarray(split.x)),
        "y": pa.array(split.y.astype(np.int64)),
        "idx": pa.array(np.arange(len(split), dtype=np.int64)),
    }
    for name, arr in (extra_columns or {}).items():
        cols[name] = ArrowTensorArray.from_numpy(np.ascontiguousarray(arr))
    return ray.data.from_arrow(pa.table(cols))
