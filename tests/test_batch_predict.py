"""Batch `kd predict` as a Ray Data job, against a real ``mlflow server`` (artifacts on
moto's S3 server), the moto S3 server for inputs and outputs, and the session's local Ray.

One tiny MLP student is trained once (1 epoch), registered and aliased ``champion``; every
prediction is checked against ``mlflow.pyfunc.load_model`` on the same rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_registry import client, train_pair

from kd.cli import run as kd_run

pytestmark = pytest.mark.slow

NAME = "kd-batch"
WIDTH = 64


@pytest.fixture(scope="module")
def champion(tracking: str, ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``models:/kd-batch@champion``: a 1-epoch MLP student, registered and aliased."""
    from kd.registry.register import register_run

    trained = train_pair(tmp_path_factory.mktemp("batch"), epochs=1)
    name, version = register_run(trained.run_id, NAME)
    client().set_registered_model_alias(name, "champion", version)
    return f"models:/{name}@champion"


def reference(uri: str, x: np.ndarray) -> np.ndarray:
    """The pyfunc's probabilities for ``x`` (what a consumer's own code gets)."""
    import mlflow

    return mlflow.pyfunc.load_model(uri).predict(x.astype(np.float32))


def read_output(uri: str) -> object:
    """Every parquet file under ``uri`` (local folder or s3://) as one pandas DataFrame."""
    import pyarrow.dataset as pads

    from kd import storage

    fs, path = storage.arrow_fs(uri)
    return pads.dataset(path, filesystem=fs, format="parquet").to_table().to_pandas()


def put_parquet(df: object, uri: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kd import storage

    fs, path = storage.arrow_fs(uri)
    with fs.open_output_stream(path) as f:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), f)


def test_s3_many_files_keyed_by_id(champion: str, bucket: str) -> None:
    """Seven parquet files on S3 (one bigger than a read block) with an ``id`` column and
    a list column ``x``: out come parquet files on S3 with every id once and the
    pyfunc's predictions for that id's row."""
    import pandas as pd

    rng = np.random.default_rng(0)
    sizes = [3, 50, 120, 1, 77, 4500, 30]
    frames, start = [], 0
    for i, n in enumerate(sizes):
        x = rng.random((n, WIDTH), dtype=np.float32) * 16
        df = pd.DataFrame({"id": [f"r{start + j}" for j in range(n)], "x": list(x)})
        put_parquet(df, f"s3://{bucket}/in/part-{i}.parquet")
        frames.append(df)
        start += n
    put_parquet(frames[0], f"s3://{bucket}/in/other.csv.parquet.bak")  # not matched by the glob
    assert kd_run(["predict", champion, "--input", f"s3://{bucket}/in/part-*.parquet",
                   "--output", f"s3://{bucket}/out/", "--batch-size", "256"]) == 0
    out = read_output(f"s3://{bucket}/out/")
    inp = pd.concat(frames, ignore_index=True)
    assert len(out) == len(inp) == sum(sizes)
    assert sorted(out["id"]) == sorted(inp["id"])
    out = out.set_index("id").loc[inp["id"]]
    want = reference(champion, np.stack(inp["x"].to_numpy()))
    got = out[[f"p{i}" for i in range(want.shape[1])]].to_numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert (out["pred"].to_numpy() == want.argmax(1)).all()
    # file + row are kept beside the id: row r of file f is the id written there
    big = out[out["file"] == f"s3://{bucket}/in/part-5.parquet"].sort_values("row")
    assert list(big["row"]) == list(range(4500))


def test_local_folder_keyed_by_file_and_row(champion: str, tmp_path: Path) -> None:
    """Local folder of parquet files with one column per feature and a label column, no
    id: the key is file + row (and kdflow's idx of them); predictions equal the pyfunc's."""
    import pandas as pd

    from kd.data.stream import key_idx

    rng = np.random.default_rng(1)
    xs = {}
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for rel, n in [("a.parquet", 40), ("sub/b.parquet", 25)]:
        x = rng.random((n, WIDTH), dtype=np.float32)
        df = pd.DataFrame(x, columns=[f"f{i}" for i in range(WIDTH)])
        df["y"] = rng.integers(0, 10, n)
        df.to_parquet(tmp_path / "in" / rel, index=False)
        xs[rel] = x
    assert kd_run(["predict", champion, "--input", str(tmp_path / "in"),
                   "--output", str(tmp_path / "out"), "--batch-size", "16"]) == 0
    out = read_output(str(tmp_path / "out"))
    assert len(out) == 65 and "y" not in out.columns and "x" not in out.columns
    for rel, x in xs.items():
        part = out[out["file"] == str(tmp_path / "in" / rel)].sort_values("row")
        assert list(part["row"]) == list(range(len(x)))
        assert (part["idx"].to_numpy() == key_idx(None, rel, 0, len(x))).all()
        want = reference(champion, x)
        np.testing.assert_allclose(part[[f"p{i}" for i in range(10)]].to_numpy(), want, atol=1e-5)
    # --precision bf16: the actors run bf16 weights under autocast; float32 probabilities
    assert kd_run(["predict", champion, "--input", str(tmp_path / "in"), "--precision", "bf16",
                   "--output", str(tmp_path / "bf16"), "--batch-size", "16"]) == 0
    out16 = read_output(str(tmp_path / "bf16")).sort_values(["file", "row"])
    fp32 = out.sort_values(["file", "row"])
    p16, p32 = (o[[f"p{i}" for i in range(10)]].to_numpy() for o in (out16, fp32))
    assert p16.dtype == np.float32 and np.abs(p16 - p32).max() < 0.02
    assert not np.allclose(p16, p32, atol=1e-6)  # bf16 really ran
    assert (out16["pred"].to_numpy() == fp32["pred"].to_numpy()).mean() >= 0.95


def test_as_many_actors_as_cpus_still_leaves_the_read_tasks_room(champion: str,
                                                                tmp_path: Path) -> None:
    """``--concurrency 2`` on the session's 2-CPU Ray: whole-CPU actors would hold every
    CPU and the read tasks (0.25 CPU) could never run, a hang. The actors take less, say
    so, and the job finishes. A real `kd predict` process on the session's cluster, killed
    if it hangs."""
    import os
    import subprocess
    import sys

    import pandas as pd
    import ray

    x = np.random.default_rng(2).random((300, WIDTH), dtype=np.float32)
    (tmp_path / "in").mkdir()
    for i in range(3):
        pd.DataFrame({"x": list(x[i * 100:(i + 1) * 100])}).to_parquet(tmp_path / "in" / f"{i}.parquet")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.run([sys.executable, "-m", "kd.cli", "predict", champion, "--input",
                           str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                           "--concurrency", "2", "--batch-size", "50"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "--concurrency 2 on 2 CPUs: each actor reserves 0.875 CPU" in proc.stdout + proc.stderr
    out = read_output(str(tmp_path / "out"))
    assert len(out) == 300
    for i in range(3):
        part = out[out["file"] == str(tmp_path / "in" / f"{i}.parquet")].sort_values("row")
        want = reference(champion, x[i * 100:(i + 1) * 100])
        np.testing.assert_allclose(part[[f"p{k}" for k in range(10)]].to_numpy(), want, atol=1e-5)


def test_rerun_refused_then_overwrite_replaces(champion: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A second job into the same output is refused (one line, exit 2, nothing deleted);
    with --overwrite it replaces the first job's parts (a retried RayJob does not double
    the rows), leaves files it did not write alone, and writes _SUCCESS.json last."""
    import json

    import pandas as pd

    x = np.random.default_rng(3).random((30, WIDTH), dtype=np.float32)
    (tmp_path / "in").mkdir()
    pd.DataFrame({"x": list(x)}).to_parquet(tmp_path / "in" / "a.parquet")
    out_dir = tmp_path / "out"
    args = ["predict", champion, "--input", str(tmp_path / "in"), "--output", str(out_dir)]
    assert kd_run(args) == 0
    first = sorted(p.name for p in out_dir.glob("part-*.parquet"))
    done = json.loads((out_dir / "_SUCCESS.json").read_text())
    assert done["rows"] == 30 and done["model"].startswith("models:/kd-batch/")
    assert sorted(Path(f).name for f in done["files"]) == first
    (out_dir / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert kd_run(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err and str(out_dir) in err
    assert sorted(p.name for p in out_dir.glob("part-*.parquet")) == first
    assert kd_run(args + ["--overwrite"]) == 0
    second = sorted(p.name for p in out_dir.glob("part-*.parquet"))
    assert second and not set(second) & set(first)
    assert sum(len(pd.read_parquet(out_dir / f)) for f in second) == 30
    assert (out_dir / "notes.txt").read_text() == "mine"
    assert json.loads((out_dir / "_SUCCESS.json").read_text())["job"] != done["job"]


def test_bad_input_one_line_exit_2(champion: str, tmp_path: Path, bucket: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """No file matches, a missing --key column, rows of the wrong width (in a later file,
    found by a Ray read task), texts for this model of numbers, an unwritable output, and
    no --output: exit 2, one line."""
    import pandas as pd

    good = pd.DataFrame({"x": list(np.ones((4, WIDTH), np.float32))})
    (tmp_path / "in").mkdir()
    good.to_parquet(tmp_path / "in" / "a.parquet")
    narrow = pd.DataFrame({"x": list(np.ones((4, 10), np.float32))})
    narrow.to_parquet(tmp_path / "in" / "b.parquet")
    (tmp_path / "t.txt").write_text("a text for a model of numbers\n")
    cases = [
        (["--input", str(tmp_path / "none-*.parquet"), "--output", str(tmp_path / "o1")],
         f"--input {tmp_path / 'none-*.parquet'}: the pattern matches no file"),
        (["--input", str(tmp_path / "in" / "a.parquet"), "--output", f"{tmp_path}/o2/",
          "--key", "order_id"], "--key order_id: no such column"),
        (["--input", str(tmp_path / "in"), "--output", str(tmp_path / "o3")],
         "b.parquet: rows have 10 values but the model takes 64"),
        (["--input", str(tmp_path / "in" / "a.parquet"), "--output",
          "s3://no-such-bucket-kd/out/"], "--output s3://no-such-bucket-kd/out/: bucket"),
        (["--input", str(tmp_path / "in")], "--output: required"),
        (["--input", str(tmp_path / "in" / "a.parquet"), "--key", "id"],
         "--key, --concurrency, --gpus-per-worker, --overwrite, --text-column: batch predict only"),
        (["--input", str(tmp_path / "t.txt"), "--output", f"{tmp_path}/o6/"],
         "t.txt: a text file, but the model takes rows of 64 numbers"),
        (["--input", str(tmp_path / "in"), "--output", f"{tmp_path}/o5/", "--key", "pred"],
         "--key pred: clashes with an output column"),
    ]
    cases.append((["--input", f"s3://{bucket}/nothing/*.parquet", "--output", str(tmp_path / "o4")],
                  f"--input s3://{bucket}/nothing/*.parquet: no such object"))
    for args, msg in cases:
        capsys.readouterr()
        assert kd_run(["predict", champion, *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err, (args, err)


def test_gpu_actor(champion: str, tmp_path: Path) -> None:
    """--gpus-per-worker 1: the Predictor actor runs the model on CUDA; the predictions
    still equal the pyfunc's (CPU). Needs a GPU that the session's Ray sees."""
    import pandas as pd
    import ray
    import torch

    if not torch.cuda.is_available() or ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("no CUDA GPU visible to torch and Ray")
    x = np.random.default_rng(2).random((300, WIDTH), dtype=np.float32)
    (tmp_path / "in").mkdir()
    pd.DataFrame({"x": list(x)}).to_parquet(tmp_path / "in" / "a.parquet")
    assert kd_run(["predict", champion, "--input", str(tmp_path / "in"), "--output",
                   str(tmp_path / "out"), "--gpus-per-worker", "1"]) == 0
    out = read_output(str(tmp_path / "out")).sort_values("row")
    np.testing.assert_allclose(out[[f"p{i}" for i in range(10)]].to_numpy(),
                               reference(champion, x), atol=1e-4)


def test_class_names_and_batch_path_choice(tmp_path: Path) -> None:
    """The label column comes from kd_model.json's class_names (one per class, else none);
    one local file keeps the in-process path, anything else is a batch job."""
    from kd.registry.batch import class_names, is_batch

    assert class_names({"num_classes": 2, "class_names": ["cat", "dog"]}) == ["cat", "dog"]
    assert class_names({"num_classes": 3, "class_names": ["cat", "dog"]}) is None
    assert class_names({"num_classes": 2, "class_names": []}) is None
    assert class_names({"num_classes": 2}) is None
    f = tmp_path / "a.parquet"
    f.write_bytes(b"")
    assert not is_batch([str(f)], None) and not is_batch([str(f)], str(tmp_path / "o.csv"))
    assert is_batch([str(f), str(f)], None) and is_batch([str(tmp_path)], None)
    assert is_batch(["s3://b/in/"], None) and is_batch([str(tmp_path / "*.parquet")], None)
    assert is_batch([str(f)], "s3://b/out/") and is_batch([str(f)], f"{tmp_path}/new/")
