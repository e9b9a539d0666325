"""Data: built-in sets, user files (npz, parquet, csv, image folder; local and S3),
fixed splits, content hashes, Ray Datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kd.config import DataConfig
from kd.data import load_splits, to_ray
from kd.errors import InputError


def test_digits_split_is_fixed_stratified_and_disjoint() -> None:
    a = load_splits(DataConfig(source="digits"))
    b = load_splits(DataConfig(source="digits"))
    assert (len(a.train), len(a.val), len(a.holdout)) == (1078, 359, 360)
    assert a.num_classes == 10 and a.input_shape == (1, 8, 8)
    assert np.array_equal(a.holdout.y, b.holdout.y) and a.data_hash == b.data_hash
    # stratified: every class keeps its share (within one sample) in each split
    for split in (a.train, a.val, a.holdout):
        shares = np.bincount(split.y, minlength=10) / len(split)
        assert np.all(np.abs(shares - 0.1) < 0.02)
    assert 0.0 <= a.train.x.min() and a.train.x.max() <= 1.0
    # the splits do not share samples
    rows = {r.tobytes() for r in a.holdout.x}
    assert sum(r.tobytes() in rows for r in a.train.x) < 5  # digits has a few exact duplicates


def test_hash_changes_with_split_and_labels() -> None:
    base = load_splits(DataConfig()).data_hash
    assert load_splits(DataConfig(split={"train": 0.5, "val": 0.3, "holdout": 0.2})).data_hash != base
    assert load_splits(DataConfig(labeled_fraction=0.1)).data_hash != base


def test_synthetic_args() -> None:
    s = load_splits(DataConfig(source="synthetic", args={"n": 200, "num_classes": 3, "shape": [4]}))
    assert s.num_classes == 3 and s.input_shape == (4,)
    assert len(s.train) + len(s.val) + len(s.holdout) == 200


def _arrays(n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((n, 1, 4, 4), dtype=np.float32), np.arange(n) % 3


def test_npz_parquet_csv_read_the_same_data(tmp_path: Path) -> None:
    x, y = _arrays()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    pq.write_table(pa.table({"x": [row.ravel().tolist() for row in x], "y": y}), tmp_path / "d.parquet")
    import pandas as pd

    df = pd.DataFrame(x.reshape(len(x), -1), columns=[f"f{i}" for i in range(16)])
    df["y"] = y
    df.to_csv(tmp_path / "d.csv", index=False)
    hashes = set()
    for name in ("d.npz", "d.parquet", "d.csv"):
        s = load_splits(DataConfig(source=str(tmp_path / name), args={"shape": [1, 4, 4]}))
        assert s.input_shape == (1, 4, 4) and s.num_classes == 3
        hashes.add(s.data_hash)
    assert len(hashes) == 1  # same content -> same lineage hash, whatever the format


def test_parquet_nulls_are_unlabeled(tmp_path: Path) -> None:
    x, y = _arrays()
    labels = [None if i % 2 else int(v) for i, v in enumerate(y)]
    pq.write_table(pa.table({"x": [r.ravel().tolist() for r in x], "y": pa.array(labels, pa.int64())}),
                   tmp_path / "p.parquet")
    s = load_splits(DataConfig(source=str(tmp_path / "p.parquet"), args={"num_classes": 3},
                               split={"stratify": False}))
    all_y = np.concatenate([s.train.y, s.val.y, s.holdout.y])
    assert (all_y == -1).sum() == 30


def test_imagefolder(tmp_path: Path) -> None:
    from PIL import Image

    for c, color in (("cat", 0), ("dog", 255)):
        (tmp_path / c).mkdir()
        for i in range(10):
            Image.new("RGB", (6, 6), (color, i, 0)).save(tmp_path / c / f"{i}.png")
    s = load_splits(DataConfig(source=str(tmp_path)))
    assert s.input_shape == (3, 6, 6) and s.num_classes == 2


def test_s3_npz(s3_server: str, bucket: str, tmp_path: Path) -> None:
    import boto3

    x, y = _arrays()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    boto3.client("s3", endpoint_url=s3_server).upload_file(str(tmp_path / "d.npz"), bucket, "data/d.npz")
    s = load_splits(DataConfig(source=f"s3://{bucket}/data/d.npz"))
    local = load_splits(DataConfig(source=str(tmp_path / "d.npz")))
    assert s.data_hash == local.data_hash
    with pytest.raises(InputError, match="no such object"):
        load_splits(DataConfig(source=f"s3://{bucket}/data/missing.npz"))


@pytest.mark.parametrize(("cfg", "message"), [
    (DataConfig(source="/nonexistent/data.npz"), "no such file or directory"),
    (DataConfig(source="digitz"), "unknown dataset 'digitz'; did you mean digits"),
    (DataConfig(source="synthetic", args={"colour": 1}), "data.args"),
])
def test_bad_sources(cfg: DataConfig, message: str) -> None:
    with pytest.raises(InputError, match=message):
        load_splits(cfg)


def test_labels_outside_class_range(tmp_path: Path) -> None:
    x, _ = _arrays()
    np.savez(tmp_path / "d.npz", x=x, y=np.full(len(x), 7))
    with pytest.raises(InputError, match="outside the class range"):
        load_splits(DataConfig(source=str(tmp_path / "d.npz"), args={"num_classes": 3}))


def test_ray_dataset_columns(ray_session: None) -> None:
    s = load_splits(DataConfig(source="synthetic", args={"n": 50}))
    ds = to_ray(s.train)
    batch = next(iter(ds.iter_torch_batches(batch_size=100)))
    assert set(batch) == {"x", "y", "idx"}
    assert tuple(batch["x"].shape[1:]) == s.input_shape
    assert sorted(batch["idx"].tolist()) == list(range(len(s.train)))
