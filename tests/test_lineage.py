"""Lineage in MLflow's own terms: a real teacher + student pair (``num_workers=0``, digits,
1 epoch) against the local SQLite store records its data as a dataset input, its code and
teacher as tags, and its learning curves and holdout confusion matrix as PNG artifacts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIGS

from kd.config import load_experiment
from kd.storage import sha256_file
from kd.train.evaluate import confusion_counts
from kd.train.lineage import data_source, git_commit


def test_confusion_counts_rows_true_cols_predicted() -> None:
    y = torch.tensor([0, 0, 1, 2, 2, 2, -1])
    pred = torch.tensor([0, 1, 1, 2, 0, 2, 1])
    got = confusion_counts(pred, y, 3)
    assert got.dtype == np.int64 and got.shape == (3, 3)
    assert got.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    # counts of disjoint batches add up to the whole (what a streaming evaluation does)
    parts = confusion_counts(pred[:3], y[:3], 3) + confusion_counts(pred[3:], y[3:], 3)
    assert (parts == got).all()
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        confusion_counts(pred[:3], y[:2], 3)


def test_data_source_kinds(tmp_path: Path) -> None:
    assert data_source("digits") == ("kdflow-builtin", "kdflow-builtin:digits", "digits")
    assert data_source("s3://b/data/train.parquet") == ("s3", "s3://b/data/train.parquet",
                                                        "train.parquet")
    assert data_source(str(tmp_path / "x.npz")) == ("local", str(tmp_path / "x.npz"), "x.npz")
    assert data_source("pkg.mod:make")[0] == "kdflow-plugin"


def test_git_commit_is_the_source_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    import kd

    monkeypatch.delenv("KD_GIT_COMMIT", raising=False)
    src = Path(kd.__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    assert git_commit() == (head.stdout.strip() if head.returncode == 0 else "unknown")
    monkeypatch.setenv("KD_GIT_COMMIT", "abc123")
    assert git_commit() == "abc123"


@pytest.mark.slow
def test_run_records_dataset_tags_and_figures(workdir: Path, ray_session: None) -> None:
    from mlflow.tracking import MlflowClient

    from kd.tracking import tracking_uri
    from kd.train.run import train_run

    common = ["scaling.num_workers=0", "trainer.epochs=1", "checkpoint.every_epochs=1",
              f"storage.path={workdir / 'runs'}", "teacher.model=mlp", "teacher.args={hidden: [32]}"]
    t = train_run(load_experiment(CONFIGS / "digits-teacher.yaml", common), "teacher")
    exp = load_experiment(CONFIGS / "digits-kd.yaml", [*common, f"teacher.weights={t.weights}"])
    s = train_run(exp, "student")
    c = MlflowClient(tracking_uri())
    for out, role in ((t, "teacher"), (s, "student")):
        run = c.get_run(out.run_id)
        inputs = run.inputs.dataset_inputs
        assert len(inputs) == 1, role
        ds = inputs[0].dataset
        tags = run.data.tags
        assert (ds.name, ds.source_type) == ("digits", "kdflow-builtin")
        assert json.loads(ds.source) == {"uri": "kdflow-builtin:digits"}
        assert ds.digest == tags["kd.data_hash"] and len(ds.digest) >= 16
        assert json.loads(ds.profile)["num_classes"] == 10
        assert {t.key: t.value for t in inputs[0].tags} == {"mlflow.data.context": "train"}
        assert tags["kd.git_commit"] == tags["mlflow.source.git.commit"] == git_commit()
        assert tags["kd.kdflow_version"]
        plots = {a.path: a.file_size for a in c.list_artifacts(out.run_id, "plots")}
        assert set(plots) == {"plots/curves.png", "plots/confusion.png"}, role
        local = Path(c.download_artifacts(out.run_id, "plots", str(workdir / role)))
        for png in local.iterdir():
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert "kd.teacher_sha256" not in c.get_run(t.run_id).data.tags
    assert c.get_run(s.run_id).data.tags["kd.teacher_sha256"] == sha256_file(t.weights)
    # one dataset for both runs: same data, same digest
    assert (c.get_run(t.run_id).inputs.dataset_inputs[0].dataset.digest
            == c.get_run(s.run_id).inputs.dataset_inputs[0].dataset.digest)


def test_concurrent_runs_log_the_same_dataset(tmp_path: Path) -> None:
    """A sweep's trials log the same data set at the same moment: each run gets its input
    (without `log_dataset`'s second try, 11 of 15 such pairs failed one run with the
    store's unique-key error)."""
    import threading

    from mlflow.entities import Dataset, DatasetInput, InputTag

    from kd import tracking
    from kd.train.lineage import log_dataset

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    eid = c.create_experiment("race")
    errors: list[BaseException] = []
    runs_by_digest = {}
    for k in range(15):
        ds = DatasetInput(Dataset(name="digits", digest=f"d{k}", source_type="local", source="{}"),
                          tags=[InputTag("mlflow.data.context", "train")])
        runs = [c.create_run(eid).info.run_id for _ in range(2)]
        runs_by_digest[f"d{k}"] = runs
        barrier = threading.Barrier(2)

        def log(run_id: str, ds: DatasetInput = ds, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                log_dataset(uri, run_id, ds)
            except BaseException as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

        threads = [threading.Thread(target=log, args=(r,)) for r in runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    for digest, runs in runs_by_digest.items():
        for run_id in runs:
            assert [d.dataset.digest for d in c.get_run(run_id).inputs.dataset_inputs] == [digest]
