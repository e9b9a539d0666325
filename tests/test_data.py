"""Data: built-in sets and user files (npz/npy, parquet, csv, image folder; local and
S3) streamed by Ray Data; the hashed split; the manifest hash; the bad-input lines."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kd.config import DataConfig
from kd.data import load_splits, to_ray
from kd.data.stream import key_idx, split_of
from kd.errors import InputError

pytestmark = pytest.mark.usefixtures("ray_session")


def _rows(split) -> dict[int, int]:  # noqa: ANN001 - a StreamSplit
    """idx -> label of every row of a streamed split (small test data only)."""
    batch = split.dataset().take_batch(100_000, batch_format="numpy")
    return dict(zip(batch["idx"].tolist(), batch["y"].tolist(), strict=True))


def test_digits_split_is_fixed_disjoint_and_covers_every_class() -> None:
    a = load_splits(DataConfig(source="digits"))
    b = load_splits(DataConfig(source="digits"))
    assert len(a.train) + len(a.val) + len(a.holdout) == 1797
    for split, frac in ((a.train, 0.6), (a.val, 0.2), (a.holdout, 0.2)):
        assert abs(len(split) / 1797 - frac) < 0.04  # a hash split: near, not exact
        assert all(k > 0 for k in split.counts.per_class) and len(split.counts.per_class) == 10
    assert a.num_classes == 10 and a.input_shape == (1, 8, 8) and a.input_dtype == "float32"
    assert _rows(a.holdout) == _rows(b.holdout) and a.data_hash == b.data_hash
    train, val, hold = (set(_rows(s)) for s in (a.train, a.val, a.holdout))
    assert not (train & val or train & hold or val & hold)
    assert len(train) == len(a.train)  # idx is unique per row
    x = a.train.sample(8).x
    assert x.shape == (8, 1, 8, 8) and 0.0 <= x.min() and x.max() <= 1.0


def test_split_is_a_function_of_the_key_and_seed() -> None:
    idx = key_idx(None, "part-0.parquet", 0, 10_000)
    assert np.array_equal(idx, key_idx(None, "part-0.parquet", 0, 10_000)) and (idx >= 0).all()
    assert not np.array_equal(idx, key_idx(None, "part-1.parquet", 0, 10_000))
    part = split_of(idx, (0.6, 0.2, 0.2), seed=0)
    assert np.allclose(np.bincount(part) / len(idx), [0.6, 0.2, 0.2], atol=0.02)
    assert (split_of(idx, (0.6, 0.2, 0.2), seed=1) != part).mean() > 0.3
    ids = key_idx(np.arange(100), "", 0, 100)  # an id column: the file does not matter
    assert np.array_equal(ids, key_idx(np.arange(100), "other.npz", 0, 100))


def test_hash_comes_from_the_manifest(tmp_path: Path) -> None:
    base = load_splits(DataConfig()).data_hash
    assert load_splits(DataConfig(split={"train": 0.5, "val": 0.3, "holdout": 0.2})).data_hash != base
    assert load_splits(DataConfig(labeled_fraction=0.5)).data_hash != base
    x, y = _arrays()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    cfg = DataConfig(source=str(tmp_path / "d.npz"))
    h = load_splits(cfg).data_hash
    assert load_splits(cfg).data_hash == h
    os.utime(tmp_path / "d.npz", ns=(1, 1))  # same bytes, another version: another hash
    assert load_splits(cfg).data_hash != h


def test_synthetic_args() -> None:
    s = load_splits(DataConfig(source="synthetic", args={"n": 400, "num_classes": 3, "shape": [4]}))
    assert s.num_classes == 3 and s.input_shape == (4,)
    assert len(s.train) + len(s.val) + len(s.holdout) == 400


def _arrays(n: int = 120) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((n, 1, 4, 4), dtype=np.float32), np.arange(n) % 3


def test_npz_parquet_csv_with_an_id_column_split_alike(tmp_path: Path) -> None:
    x, y = _arrays()
    ids = np.arange(len(y)) * 7 + 1
    np.savez(tmp_path / "d.npz", x=x, y=y, id=ids)
    pq.write_table(pa.table({"id": ids, "x": [r.ravel().tolist() for r in x], "y": y}),
                   tmp_path / "d.parquet")
    import pandas as pd

    df = pd.DataFrame(x.reshape(len(x), -1), columns=[f"f{i}" for i in range(16)])
    df["y"], df["id"] = y, ids
    df.to_csv(tmp_path / "d.csv", index=False)
    holdouts = []
    for name in ("d.npz", "d.parquet", "d.csv"):
        s = load_splits(DataConfig(source=str(tmp_path / name), key_column="id",
                                   args={"shape": [1, 4, 4]}))
        assert s.input_shape == (1, 4, 4) and s.num_classes == 3
        holdouts.append(_rows(s.holdout))
    assert holdouts[0] == holdouts[1] == holdouts[2]


def test_parquet_folder_and_glob_of_shards(tmp_path: Path) -> None:
    x, y = _arrays(300)
    (tmp_path / "shards").mkdir()
    for i in range(3):
        part = slice(100 * i, 100 * (i + 1))
        pq.write_table(pa.table({"x": [r.ravel().tolist() for r in x[part]], "y": y[part]}),
                       tmp_path / "shards" / f"part-{i}.parquet")
    folder = load_splits(DataConfig(source=str(tmp_path / "shards")))
    globbed = load_splits(DataConfig(source=str(tmp_path / "shards" / "part-*.parquet")))
    assert len(folder.train) + len(folder.val) + len(folder.holdout) == 300
    assert _rows(folder.val) == _rows(globbed.val) and folder.input_shape == (16,)
    assert len(folder.manifest["files"]) == 3


def test_parquet_nulls_are_unlabeled(tmp_path: Path) -> None:
    x, y = _arrays()
    labels = [None if i % 2 else int(v) for i, v in enumerate(y)]
    pq.write_table(pa.table({"x": [r.ravel().tolist() for r in x], "y": pa.array(labels, pa.int64())}),
                   tmp_path / "p.parquet")
    s = load_splits(DataConfig(source=str(tmp_path / "p.parquet"), args={"num_classes": 3}))
    assert sum(len(p) - p.labeled for p in (s.train, s.val, s.holdout)) == 60


def test_class_count_from_parquet_metadata(tmp_path: Path) -> None:
    x, y = _arrays()
    t = pa.table({"x": [r.ravel().tolist() for r in x], "y": y})
    pq.write_table(t.replace_schema_metadata({"kd.num_classes": "5"}), tmp_path / "m.parquet")
    assert load_splits(DataConfig(source=str(tmp_path / "m.parquet"))).num_classes == 5
    pq.write_table(t.replace_schema_metadata({"kd.num_classes": "2"}), tmp_path / "m.parquet")
    with pytest.raises(InputError, match="parquet metadata kd.num_classes is 2, but the labels reach 2"):
        load_splits(DataConfig(source=str(tmp_path / "m.parquet")))


def test_imagefolder_and_npy_shards(tmp_path: Path) -> None:
    from PIL import Image

    for c, color in (("cat", 0), ("dog", 255)):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(40):
            Image.new("RGB", (6, 6), (color, i, 0)).save(tmp_path / "img" / c / f"{i}.png")
    s = load_splits(DataConfig(source=str(tmp_path / "img")))
    assert s.input_shape == (3, 6, 6) and s.num_classes == 2
    assert s.class_names == ["cat", "dog"]  # the class directories, recorded at training
    (tmp_path / "npy").mkdir()
    for i in range(2):
        np.save(tmp_path / "npy" / f"x-{i}.npy", np.random.default_rng(i).random((50, 4)))
    u = load_splits(DataConfig(source=str(tmp_path / "npy"), args={"num_classes": 3}))
    assert u.input_shape == (4,) and u.train.labeled == 0 and len(u.train) + len(u.val) + len(u.holdout) == 100


def test_s3_npz_streams_like_local(s3_server: str, bucket: str, tmp_path: Path) -> None:
    import boto3

    x, y = _arrays()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.upload_file(str(tmp_path / "d.npz"), bucket, "data/d.npz")
    s = load_splits(DataConfig(source=f"s3://{bucket}/data/d.npz"))
    local = load_splits(DataConfig(source=str(tmp_path / "d.npz")))
    assert _rows(s.val) == _rows(local.val)
    with pytest.raises(InputError, match="no such object"):
        load_splits(DataConfig(source=f"s3://{bucket}/data/missing.npz"))


def test_s3_object_changed_after_the_manifest_stops_the_read(s3_server: str, bucket: str,
                                                             tmp_path: Path) -> None:
    import time

    import boto3

    x, y = _arrays()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.upload_file(str(tmp_path / "d.npz"), bucket, "data/d.npz")
    s = load_splits(DataConfig(source=f"s3://{bucket}/data/d.npz"))
    time.sleep(1.1)
    np.savez(tmp_path / "d.npz", x=x[:90], y=y[:90])
    s3.upload_file(str(tmp_path / "d.npz"), bucket, "data/d.npz")
    with pytest.raises(Exception, match=f"s3://{bucket}/data/d.npz: changed since the manifest"):
        s.train.dataset().take_batch(10)


@pytest.mark.parametrize(("cfg", "message"), [
    (DataConfig(source="/nonexistent/data.npz"), "no such file or directory"),
    (DataConfig(source="digitz"), "unknown dataset 'digitz'; did you mean digits"),
    (DataConfig(source="synthetic", args={"colour": 1}), "data.args"),
])
def test_bad_sources(cfg: DataConfig, message: str) -> None:
    with pytest.raises(InputError, match=message):
        load_splits(cfg)


def test_missing_key_or_label_column(tmp_path: Path) -> None:
    x, y = _arrays()
    pq.write_table(pa.table({"x": [r.ravel().tolist() for r in x], "label": y}), tmp_path / "p.parquet")
    with pytest.raises(Exception, match=r"p.parquet: no column 'id' \(data.key_column\)"):
        load_splits(DataConfig(source=str(tmp_path / "p.parquet"), key_column="id"))
    with pytest.raises(InputError, match="p.parquet: no labels at all; set data.args.num_classes"):
        load_splits(DataConfig(source=str(tmp_path / "p.parquet"), x_column="x"))


def test_a_mistyped_label_column_is_an_error_not_unlabeled_rows(tmp_path: Path) -> None:
    """Before: ``y_column: lable`` made every row unlabeled and, with no ``x`` column,
    the real ``label`` column an input feature; the run went on without a word."""
    x, y = _arrays()
    table = {f"f{i}": x.reshape(len(x), -1)[:, i] for i in range(4)}
    pq.write_table(pa.table({**table, "label": y}), tmp_path / "t.parquet")
    np.savez(tmp_path / "d.npz", x=x, label=y)
    for f in ("t.parquet", "d.npz"):
        with pytest.raises(Exception, match=rf"{f}: no (column|array) 'lable' \(data.y_column\); "
                                            r"has .*label"):
            load_splits(DataConfig(source=str(tmp_path / f), y_column="lable",
                                   args={"num_classes": 3}))
    s = load_splits(DataConfig(source=str(tmp_path / "t.parquet"), y_column="label"))
    assert s.input_shape == (4,) and s.train.labeled == len(s.train)  # the right name works


def test_a_class_missing_from_val_is_an_input_error(tmp_path: Path) -> None:
    x, _ = _arrays(200)
    y = np.zeros(200, np.int64)
    y[0] = 1  # one row of class 1: it cannot be in train, val and holdout at once
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(InputError, match=r"data.split: the (val|holdout) split has no row of class\(es\) 1"):
        load_splits(DataConfig(source=str(tmp_path / "d.npz")))


def test_labels_outside_class_range(tmp_path: Path) -> None:
    x, _ = _arrays()
    np.savez(tmp_path / "d.npz", x=x, y=np.full(len(x), 7))
    with pytest.raises(InputError, match=r"data.args.num_classes is 3, but the labels reach 7 "
                                         r"\(label 7 is outside the class range \[0, 3\)\)"):
        load_splits(DataConfig(source=str(tmp_path / "d.npz"), args={"num_classes": 3}))


def test_ray_dataset_columns() -> None:
    s = load_splits(DataConfig(source="synthetic", args={"n": 200}))
    batch = next(iter(to_ray(s.train).iter_torch_batches(batch_size=1000)))
    assert set(batch) == {"x", "y", "idx"}
    assert tuple(batch["x"].shape[1:]) == s.input_shape
    idx = batch["idx"].numpy()
    assert len(set(idx.tolist())) == len(s.train) and (split_of(idx, (0.6, 0.2, 0.2), 0) == 0).all()


def test_stratify_is_refused_with_the_reason() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="stratification was removed: the split hashes each row's key"):
        DataConfig(split={"stratify": True})
    assert DataConfig(split={"stratify": False}).split.stratify is False


def test_the_profile_is_counted_once_per_data_hash(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Many small experiments on the same data pay the counting pass once; a changed
    file (new size / mtime: a new data hash) is counted again."""
    import sys

    prof = sys.modules["kd.data.profile"]  # kd.data.profile the attribute is the function
    monkeypatch.setenv("KD_DATA_CACHE", str(tmp_path / "cache"))
    x, y = _arrays()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    cfg = DataConfig(source=str(tmp_path / "d.npz"))
    first = load_splits(cfg)
    calls: list[int] = []
    real = prof.profile
    monkeypatch.setattr(prof, "profile", lambda src: calls.append(1) or real(src))
    again = load_splits(cfg)
    assert calls == [] and again.data_hash == first.data_hash
    assert (len(again.train), len(again.val), again.num_classes) == \
        (len(first.train), len(first.val), first.num_classes)
    np.savez(tmp_path / "d.npz", x=x[:-3], y=y[:-3])
    changed = load_splits(cfg)
    assert calls == [1] and changed.data_hash != first.data_hash


def test_a_built_in_set_is_found_again_by_its_args_without_generating_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """digits is written once; later runs find its file by name and args and do not
    import scikit-learn or build the arrays again; other args, or a file removed from the
    cache, generate it again; the rows are the same either way."""
    import sklearn.datasets

    from kd.data import builtin

    monkeypatch.setenv("KD_DATA_CACHE", str(tmp_path / "cache"))
    first = builtin.materialise("digits", {})
    calls: list[str] = []
    real = sklearn.datasets.load_digits
    monkeypatch.setattr(sklearn.datasets, "load_digits",
                        lambda *a, **k: calls.append("digits") or real(*a, **k))
    assert builtin.materialise("digits", {}) == first and calls == []
    splits = load_splits(DataConfig(source="digits"))
    assert calls == [] and len(splits.train) + len(splits.val) + len(splits.holdout) == 1797
    Path(first).unlink()
    assert builtin.materialise("digits", {}) == first and calls == ["digits"]
    a = builtin.materialise("synthetic", {"n": 64, "seed": 1})
    b = builtin.materialise("synthetic", {"n": 64, "seed": 2})
    assert a != b and builtin.materialise("synthetic", {"n": 64, "seed": 1}) == a
