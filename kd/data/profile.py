"""One streaming aggregate over a source: rows, labels and classes per split.

`profile` runs ``map_batches`` over every row of the source (split ``all``); each
batch becomes one small row of counts, and the driver sums those rows. The driver
holds ``3 x (C + 4)`` numbers per batch, never the data. It yields what used to need
the arrays: split sizes (steps per epoch), labeled counts, per-class counts (the
class count when the config and the parquet metadata give none, the checks that
every class reaches val and holdout), the input shape and dtype.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from kd.data.base import data_cache_root
from kd.data.stream import SPLITS, Source, dataset, input_errors
from kd.errors import InputError

MAX_CLASSES = 1 << 20


@dataclass
class SplitCounts:
    """Rows, labeled rows and labeled rows per class of one split."""

    rows: int = 0
    labeled: int = 0
    per_class: list[int] = field(default_factory=list)

    @property
    def top_label(self) -> int:
        """The largest label present, or -1."""
        nz = np.flatnonzero(self.per_class)
        return int(nz[-1]) if nz.size else -1


@dataclass
class Profile:
    """Counts per split plus the rows' input shape and dtype; ``truncated``: texts cut
    to ``data.text.max_length`` (0 for other data)."""

    splits: dict[str, SplitCounts]
    input_shape: tuple[int, ...]
    input_dtype: str
    truncated: int = 0


def _batch_counts(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    y, part, x = batch["y"], batch["split"], batch["x"]
    if (y < -1).any():
        raise InputError(f"labels must be >= 0 (or -1 / null for unlabeled), found {y.min()}")
    if y.size and y.max() >= MAX_CLASSES:
        raise InputError(f"label {y.max()} is not a plausible class index")
    counts = []
    for s in range(3):
        ys = y[part == s]
        counts.append(json.dumps([int(len(ys)), np.bincount(ys[ys >= 0]).tolist()]))
    cut = int(batch["cut"].sum()) if "cut" in batch else 0
    return {"counts": np.asarray([json.dumps(counts)]),
            "shape": np.asarray([json.dumps(list(x.shape[1:]))]),
            "dtype": np.asarray([str(x.dtype)]), "cut": np.asarray([cut], np.int64)}


def profile(src: Source) -> Profile:
    """Sum `_batch_counts` over all of ``src`` (one streaming pass); see module doc."""
    out = {s: SplitCounts() for s in SPLITS}
    shapes: set[str] = set()
    dtypes: set[str] = set()
    cut = 0
    counted = dataset(src.with_split("all")).map_batches(_batch_counts, batch_format="numpy",
                                                         batch_size=None)
    for row in input_errors(counted.iter_rows()):
        shapes.add(str(row["shape"]))
        dtypes.add(str(row["dtype"]))
        cut += int(row["cut"])
        for name, text in zip(SPLITS, json.loads(str(row["counts"])), strict=True):
            n, per_class = json.loads(text)
            c = out[name]
            c.rows += n
            c.labeled += sum(per_class)
            if len(per_class) > len(c.per_class):
                c.per_class += [0] * (len(per_class) - len(c.per_class))
            for i, k in enumerate(per_class):
                c.per_class[i] += k
    if not shapes:
        raise InputError(f"{src.manifest.source}: no rows")
    if len(shapes) > 1:
        raise InputError(f"{src.manifest.source}: rows differ in input shape "
                         f"({', '.join(sorted(shapes))}); set data.args.shape or data.args.size")
    dtype = "int64" if dtypes == {"int64"} else "float32"
    return Profile(out, tuple(json.loads(shapes.pop())), dtype, cut)


def cached_profile(src: Source, key: str) -> Profile:
    """`profile`, remembered under ``$KD_DATA_CACHE/profiles/<key>.json``. ``key`` is the
    data hash: the manifest digest (every file's path, size and mtime or ETag, the
    schema) plus the split and column settings, so a changed file or setting counts
    again. A run of many small experiments on the same data then pays the counting pass
    once (about 3 s on digits against a running head). An unreadable entry is counted
    again; only a pass that succeeded is remembered."""
    path = data_cache_root() / "profiles" / f"{key}.json"
    try:
        d = json.loads(path.read_text())
        return Profile({k: SplitCounts(**v) for k, v in d["splits"].items()},
                       tuple(d["input_shape"]), d["input_dtype"], int(d.get("truncated", 0)))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    p = profile(src)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({**asdict(p), "input_shape": list(p.input_shape)}))
    os.replace(tmp, path)  # atomic: a reader sees a whole entry or none
    return p


def resolve_classes(p: Profile, declared: int | None, metadata: dict[str, str], source: str) -> int:
    """The class count: ``data.args.num_classes``, else the parquet metadata's
    ``kd.num_classes``, else the largest label + 1; a declared count that the labels
    exceed is an error naming where it came from."""
    top = max(c.top_label for c in p.splits.values())
    given, where = declared, "data.args.num_classes"
    if given is None and "kd.num_classes" in metadata:
        given, where = int(metadata["kd.num_classes"]), "parquet metadata kd.num_classes"
    if given is None:
        if top < 0:
            raise InputError(f"{source}: no labels at all; set data.args.num_classes")
        return top + 1
    if top >= given:
        raise InputError(f"{source}: {where} is {given}, but the labels reach {top} (label {top} is "
                         f"outside the class range [0, {given}))")
    return given


def check_split_classes(p: Profile, num_classes: int, source: str) -> None:
    """Every class with a label anywhere must also occur in val and in a non-empty
    holdout; otherwise one line naming the split, the classes and ``data.split``."""
    seen = {i for c in p.splits.values() for i, k in enumerate(c.per_class) if k}
    for name in ("val", "holdout"):
        c = p.splits[name]
        if name == "holdout" and c.rows == 0:
            continue
        missing = sorted(k for k in seen if k >= len(c.per_class) or c.per_class[k] == 0)
        if missing and c.labeled:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise InputError(f"data.split: the {name} split has no row of class(es) {shown} "
                             f"of {source}; use more data, a larger data.split.{name} or "
                             "another data.split.seed")
