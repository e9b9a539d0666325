"""User data from files: parquet, npz, csv or an image folder, local or s3://.

Each reader returns ``(x, y)`` with ``y = -1`` where a label is missing (a null in
the label column, or no label column at all).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from kd import storage
from kd.data.base import UNLABELED
from kd.errors import InputError

SUFFIX_FORMATS = {".npz": "npz", ".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}


def localize(uri: str, endpoint: str | None = None) -> Path:
    """A local path for ``uri``: s3:// objects (or every object under an s3 prefix
    ending in '/') are downloaded into a temporary folder."""
    if not storage.is_s3(uri):
        return storage.fetch(uri)
    if not uri.endswith("/"):
        return storage.fetch(uri, endpoint)
    bucket, prefix = storage.split_s3(uri)
    root = Path(tempfile.mkdtemp(prefix="kd-s3-dir-"))
    client = storage.s3_client(endpoint)
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    except Exception as e:
        raise storage._s3_error(uri, e) from None
    if not keys:
        raise InputError(f"{uri}: no objects under this prefix")
    for key in keys:
        dest = root / key[len(prefix):]
        dest.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(dest))
    return root


def detect_format(path: Path) -> str:
    """npz / parquet / csv by suffix; a folder of parquet files, or of class folders."""
    if path.is_file():
        fmt = SUFFIX_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise InputError(f"{path}: cannot tell the data format from the suffix "
                             f"(expected one of {', '.join(SUFFIX_FORMATS)}); set data.format")
        return fmt
    if any(path.glob("*.parquet")):
        return "parquet"
    if any(p.is_dir() for p in path.iterdir()):
        return "imagefolder"
    raise InputError(f"{path}: folder holds neither parquet files nor class sub-folders")


def _labels(values: Any, n: int) -> np.ndarray:
    if values is None:
        return np.full(n, UNLABELED, dtype=np.int64)
    import pandas as pd

    s = pd.Series(values)
    return s.fillna(UNLABELED).astype(np.int64).to_numpy()


def read_npz(path: Path, x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
    """``x`` array and optional ``y`` array from an .npz (no pickles allowed)."""
    with np.load(path, allow_pickle=False) as z:
        if x_key not in z:
            raise InputError(f"{path}: no array {x_key!r} (has: {', '.join(z.files)})")
        x = z[x_key]
        y = z[y_key] if y_key in z else None
    return x, _labels(y, len(x))


def _table_to_xy(df: Any, x_col: str, y_col: str, source: Path) -> tuple[np.ndarray, np.ndarray]:
    y = df[y_col].to_numpy() if y_col in df.columns else None
    if x_col in df.columns:
        x = np.stack([np.asarray(v) for v in df[x_col].to_numpy()])
    else:
        feats = [c for c in df.columns if c != y_col]
        if not feats:
            raise InputError(f"{source}: no feature columns besides {y_col!r}")
        x = df[feats].to_numpy()
    return x, _labels(y, len(x))


def read_parquet(path: Path, x_col: str, y_col: str) -> tuple[np.ndarray, np.ndarray]:
    """A parquet file or folder: ``x_col`` holds one (nested) list per row, or every
    non-label column is a feature; nulls in ``y_col`` mean unlabeled."""
    import pyarrow.parquet as pq

    try:
        df = pq.read_table(path).to_pandas()
    except Exception as e:
        raise InputError(f"{path}: not a readable parquet file ({e})") from None
    return _table_to_xy(df, x_col, y_col, path)


def read_csv(path: Path, x_col: str, y_col: str) -> tuple[np.ndarray, np.ndarray]:
    """A CSV with one label column ``y_col`` (empty = unlabeled) and feature columns."""
    import pandas as pd

    return _table_to_xy(pd.read_csv(path), x_col, y_col, path)


def read_imagefolder(path: Path, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``root/<class>/<image>``: classes are the sorted folder names; pixels in [0, 1],
    channels first; images resized to ``size`` x ``size`` when given."""
    from PIL import Image

    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    xs, ys = [], []
    for label, cls in enumerate(classes):
        for f in sorted((path / cls).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            img = Image.open(f).convert("RGB")
            if size:
                img = img.resize((size, size))
            xs.append(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0)
            ys.append(label)
    if not xs:
        raise InputError(f"{path}: no images found in class folders")
    shapes = {x.shape for x in xs}
    if len(shapes) > 1:
        raise InputError(f"{path}: images differ in size {sorted(shapes)}; set data.args.size")
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def read_source(uri: str, fmt: str, x_col: str, y_col: str, args: dict[str, Any],
                endpoint: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(x, y)`` from a file or folder URI in the given (or detected) format."""
    path = localize(uri, endpoint)
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "npz":
        x, y = read_npz(path, x_col, y_col)
    elif fmt == "parquet":
        x, y = read_parquet(path, x_col, y_col)
    elif fmt == "csv":
        x, y = read_csv(path, x_col, y_col)
    else:
        x, y = read_imagefolder(path, args.get("size"))
    if "shape" in args:
        try:
            x = x.reshape(len(x), *args["shape"])
        except ValueError:
            raise InputError(f"{uri}: cannot reshape inputs {x.shape[1:]} to data.args.shape "
                             f"{args['shape']}") from None
    if np.issubdtype(x.dtype, np.floating) or x.dtype == object:
        x = x.astype(np.float32)
    return x, y
