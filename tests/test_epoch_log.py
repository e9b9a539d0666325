"""Epoch metrics published by the loop and logged to MLflow by the driver's relay
(`kd.train.epoch_log`): live while ``fit`` runs, in step order, each file once."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from kd.train.epoch_log import EpochRelay, metrics_dir, publish


def _run(tmp_path: Path) -> tuple[str, str]:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    run = c.create_run(c.create_experiment("relay"))
    return uri, run.info.run_id


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float, int]]:
    from mlflow.tracking import MlflowClient

    hist = MlflowClient(uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value, m.timestamp) for m in hist)


def _pending(run_path: str) -> list[str]:
    infos = pafs.LocalFileSystem().get_file_info(
        pafs.FileSelector(metrics_dir(run_path), allow_not_found=True))
    return [i.base_name for i in infos]


def test_relay_logs_while_fit_runs_and_leaves_nothing(tmp_path: Path) -> None:
    """A file published mid-run is in MLflow before the run ends (a person watching the
    run sees each epoch), with the worker's timestamp; the folder is empty afterwards and
    non-numeric values are dropped."""
    uri, run_id = _run(tmp_path)
    fs, run_path = pafs.LocalFileSystem(), str(tmp_path / "runs" / "r1")
    with EpochRelay(fs, run_path, uri, run_id, poll_s=0.05) as relay:
        publish(fs, run_path, {"train/loss": 0.5, "note": "x"}, step=1)  # type: ignore[dict-item]
        deadline = time.time() + 30
        while not _history(uri, run_id, "train/loss") and time.time() < deadline:
            time.sleep(0.05)
        live = _history(uri, run_id, "train/loss")
        publish(fs, run_path, {"train/loss": 0.25}, step=2)
    assert [(s, v) for s, v, _ in live] == [(1, 0.5)]
    assert abs(live[0][2] / 1000 - time.time()) < 60  # the publish time, in ms
    assert [(s, v) for s, v, _ in _history(uri, run_id, "train/loss")] == [(1, 0.5), (2, 0.25)]
    assert _history(uri, run_id, "note") == []
    assert relay.logged == 2 and _pending(run_path) == []


def test_files_left_by_a_dead_driver_are_logged_once(tmp_path: Path) -> None:
    """Files a killed driver never logged (and a restarted worker's repeat of an epoch) are
    logged by the next relay of the same run folder, each exactly once."""
    uri, run_id = _run(tmp_path)
    fs, run_path = pafs.LocalFileSystem(), str(tmp_path / "runs" / "r2")
    for step, loss in [(2, 0.4), (1, 0.6), (2, 0.3)]:  # epoch 2 again after a restart
        publish(fs, run_path, {"train/loss": loss}, step=step)
    with EpochRelay(fs, run_path, uri, run_id, poll_s=3600):  # only the closing collect
        pass
    assert [(s, v) for s, v, _ in _history(uri, run_id, "train/loss")] == \
        [(1, 0.6), (2, 0.3), (2, 0.4)]
    with EpochRelay(fs, run_path, uri, run_id, poll_s=3600) as again:
        pass
    assert again.logged == 0 and len(_history(uri, run_id, "train/loss")) == 3


def test_a_failed_fit_still_logs_what_arrived(tmp_path: Path) -> None:
    """When ``fit`` raises, the epochs published before the failure are in MLflow and the
    caller sees the original error."""
    uri, run_id = _run(tmp_path)
    fs, run_path = pafs.LocalFileSystem(), str(tmp_path / "runs" / "r3")
    with pytest.raises(RuntimeError, match="worker died"):
        with EpochRelay(fs, run_path, uri, run_id, poll_s=3600):
            publish(fs, run_path, {"val/accuracy": 0.9}, step=1)
            raise RuntimeError("worker died")
    assert [(s, v) for s, v, _ in _history(uri, run_id, "val/accuracy")] == [(1, 0.9)]


def test_a_killed_trials_last_epoch_is_logged_by_the_sweep_driver(tmp_path: Path) -> None:
    """A Tune trial killed right after its last report leaves that epoch's file unlogged;
    `log_left` (run by the sweep's driver before it reads a trial's epochs back) logs it
    once and leaves the folder empty."""
    from kd.train.epoch_log import log_left

    uri, run_id = _run(tmp_path)
    fs, run_path = pafs.LocalFileSystem(), str(tmp_path / "runs" / "trial")
    publish(fs, run_path, {"epoch": 1, "val/accuracy": 0.8}, step=1)
    assert log_left(fs, run_path, uri, run_id) == 1
    assert log_left(fs, run_path, uri, run_id) == 0
    assert [(s, v) for s, v, _ in _history(uri, run_id, "epoch")] == [(1, 1.0)]
    assert _pending(run_path) == []
    assert log_left(fs, str(tmp_path / "runs" / "never"), uri, run_id) == 0  # no folder at all
