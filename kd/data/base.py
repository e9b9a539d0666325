"""A bounded in-memory sample of a split, and content hashing of small arrays.

Labels are int64 with -1 meaning "no label": the whole pipeline carries that
mask, so unlabeled and partly labeled data need no special path. The splits
themselves stream (`kd.data.splits`); an `ArraySplit` only ever holds a bounded
sample (``StreamSplit.sample``) or a built-in set's arrays before they are written.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

UNLABELED = -1


def data_cache_root() -> Path:
    """``$KD_DATA_CACHE``, default ``~/.cache/kdflow/datasets``: built-in sets written
    to parquet and the profiles of sources already counted."""
    return Path(os.environ.get("KD_DATA_CACHE") or Path.home() / ".cache" / "kdflow" / "datasets")


@dataclass
class ArraySplit:
    """Inputs ``x`` (float32 or int64 token ids), labels ``y`` (-1 = none), row keys ``idx``."""

    x: np.ndarray
    y: np.ndarray
    idx: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.y)

    @property
    def labeled(self) -> int:
        """How many samples carry a label."""
        return int((self.y >= 0).sum())


def content_hash(*arrays: np.ndarray, extra: str = "") -> str:
    """sha256 (16 hex) over the arrays' dtype, shape and bytes, plus ``extra``."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    h.update(extra.encode())
    return h.hexdigest()[:16]
