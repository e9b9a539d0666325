"""Ray Train at cluster scale: 2 DDP workers, S3 storage, a killed worker, resume.

One real S3 API server (moto_server), one local Ray. The fits share one run name, so
together they prove: metrics over the whole val set with 2 workers, a worker killed
from outside (``kill -9`` on the PID Ray's actor table gives, once the first
checkpoint is on S3, so mid-way through a later epoch) and the run finishing from the
last checkpoint with one MLflow run and kdflow's one-line failure notice,
re-submission resuming (only the new epochs train), and a truncated latest checkpoint
on S3 making the loader fall back to the previous good one.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import boto3
import pytest

from kd import storage
from kd.cli import run as kd_run
from kd.config import experiment_from_dict, resolve_paths
from kd.errors import InputError
from kd.train.checkpoint import CKPT_MANIFEST, checkpoint_candidates, load_latest_good
from tests.conftest import CONFIGS, free_port


def _exp(tmp: Path, bucket: str, **trainer: object):
    doc = {
        "name": "cluster", "seed": 0, "data": {"source": "digits"},
        "teacher": {"model": "mlp", "args": {"hidden": [32]}},
        "optim": {"name": "sgd", "lr": 0.1, "schedule": {"name": "none"}},
        "trainer": {"epochs": 2, "batch_size": 64, "grad_accum": 2, **trainer},
        "checkpoint": {"every_epochs": 1, "keep": 2},
        "scaling": {"num_workers": 2},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "cluster"},
        "storage": {"path": f"s3://{bucket}/runs"},
    }
    return resolve_paths(experiment_from_dict(doc))


def _epochs_logged(exp, run_id: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    hist = MlflowClient(exp.tracking.uri).get_metric_history(run_id, "epoch")
    return [int(m.value) for m in sorted(hist, key=lambda m: m.timestamp)]


def _mlflow_runs(exp):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(exp.tracking.uri)
    e = c.get_experiment_by_name(exp.tracking.experiment)
    return c.search_runs([e.experiment_id])


def _kill_after_first_checkpoint(s3, bucket: str, killed: list[int]) -> threading.Thread:
    """A thread that waits for ``runs/r1/epoch_00001`` to be complete on S3 (its
    ``manifest.json`` and every file it lists, at the listed size: Ray uploads a
    checkpoint's files in no fixed order, so a count of keys can be reached while the
    manifest is still missing), then ``kill -9``s one live Ray Train worker, from outside
    its process."""
    from tests.rank_probe import train_worker_pids

    prefix = "runs/r1/epoch_00001/"

    def complete() -> bool:
        listed = {o["Key"]: o["Size"] for o in
                  s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])}
        if prefix + CKPT_MANIFEST not in listed:
            return False
        body = s3.get_object(Bucket=bucket, Key=prefix + CKPT_MANIFEST)["Body"].read()
        files = json.loads(body)["files"]
        return all(listed.get(prefix + name) == f["size"] for name, f in files.items())

    def run() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            if complete():
                pids = train_worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])
                    return
            time.sleep(0.05)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.slow
def test_two_workers_s3_fault_resume_fallback(ray_session: None, s3_server: str, bucket: str,
                                              workdir: Path,
                                              capfd: pytest.CaptureFixture[str]) -> None:
    from kd.train.run import train_run

    s3 = boto3.client("s3", endpoint_url=s3_server)
    # Fit 1: 2 DDP workers, grad_accum 2, batch 16: one worker killed (kill -9) in epoch 2.
    from kd.data import load_splits

    exp = _exp(workdir, bucket, batch_size=16, max_failures=1)
    splits = load_splits(exp.data)
    killed: list[int] = []
    killer = _kill_after_first_checkpoint(s3, bucket, killed)
    out = train_run(exp, "teacher", run_name="r1")
    killer.join(1)
    assert killed, "no Ray Train worker was found to kill"
    assert out.metrics["epoch"] == 2
    assert out.metrics["val/samples"] == len(splits.val)  # every val row, across both workers
    assert out.metrics["val/accuracy"] > 0.5
    runs = _mlflow_runs(exp)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert _epochs_logged(exp, out.run_id) == [1, 2]  # epoch 1 not retrained after the kill
    time.sleep(2)  # Ray forwards the workers' and the controller's lines asynchronously
    logged = "".join(capfd.readouterr())
    notice = [ln for ln in logged.splitlines() if "restart 1 of trainer.max_failures 1" in ln]
    assert len(notice) == 1, logged[-3000:]
    assert "resuming from epoch 2/2" in notice[0] and "rank " in notice[0], notice
    kd_lines = "\n".join(ln for ln in logged.splitlines() if "[kd]" in ln)
    assert "[kd] resumed from the epoch 1 checkpoint: continuing with epoch 2/2" in logged, kd_lines
    assert out.weights == f"s3://{bucket}/runs/cluster/runs/r1/model.safetensors"  # the run's own file
    for key in ("runs/cluster/runs/r1/model.safetensors", "runs/cluster/model.safetensors"):  # + latest
        assert s3.head_object(Bucket=bucket, Key=key)["ContentLength"] > 0

    # Fit 2: same run name, epochs 4 -> resumes after epoch 2: only epochs 3..4 train.
    exp2 = _exp(workdir, bucket, epochs=4)
    exp2.scaling.num_workers = 1
    out2 = train_run(exp2, "teacher", run_name="r1")
    assert out2.run_id == out.run_id and len(_mlflow_runs(exp)) == 1
    assert _epochs_logged(exp, out.run_id) == [1, 2, 3, 4]
    keys = {o["Key"].split("/")[2] for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/r1/")
            ["Contents"] if o["Key"].count("/") >= 3}
    assert {k for k in keys if k.startswith("epoch_")} == {"epoch_00003", "epoch_00004"}

    # Fit 3: the finished run resubmitted unchanged trains nothing and ends the same.
    out3 = train_run(exp2, "teacher", run_name="r1")
    assert out3.run_id == out.run_id and len(_mlflow_runs(exp)) == 1
    assert _epochs_logged(exp, out.run_id) == [1, 2, 3, 4]
    assert out3.holdout["accuracy"] == out2.holdout["accuracy"] and out3.metrics["epoch"] == 4
    assert _mlflow_runs(exp)[0].info.status == "FINISHED"

    # Truncate the latest checkpoint: the loop's loader skips it (logged) and takes
    # epoch 3, the previous good one. (Same loader the workers ran above.)
    key = "runs/r1/epoch_00004/model.safetensors"
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=bucket, Key=key, Body=body[: len(body) // 2])
    fs, root = storage.arrow_fs(exp.storage.path)
    state = load_latest_good(checkpoint_candidates(fs, f"{root}/r1"), verbose=True)
    assert state is not None and state["state"]["epoch"] + 1 == 3
    logged = capfd.readouterr().out
    assert "epoch_00004 unreadable (" in logged
    assert "epoch_00004/model.safetensors: size mismatch" in logged
    assert "fell back to checkpoint" in logged and "epoch_00003" in logged


def test_storage_preflight_errors(s3_server: str, bucket: str, monkeypatch: pytest.MonkeyPatch,
                                  workdir: Path) -> None:
    storage.check_writable(f"s3://{bucket}/runs")  # the good case passes
    with pytest.raises(InputError, match="bucket 'no-such-bucket' does not exist"):
        storage.check_writable("s3://no-such-bucket/runs")
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(InputError, match="unreachable"):
        storage.check_writable(f"s3://{bucket}/runs", endpoint=dead)
    # The CLI turns it into exit code 2 before any Ray worker starts.
    cfg = str(CONFIGS / "digits-teacher.yaml")
    assert kd_run(["teacher", cfg, "storage.path=s3://no-such-bucket/x"]) == 2
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(InputError, match="no AWS credentials"):
        storage.check_writable(f"s3://{bucket}/runs")


def test_arrow_fs_carries_endpoint_and_credentials(s3_server: str, bucket: str) -> None:
    fs, path = storage.arrow_fs(f"s3://{bucket}/a/b")
    assert path == f"{bucket}/a/b"
    with fs.open_output_stream(f"{path}/x.txt") as f:
        f.write(b"hi")
    s3 = boto3.client("s3", endpoint_url=s3_server)
    assert s3.get_object(Bucket=bucket, Key="a/b/x.txt")["Body"].read() == b"hi"


def test_prune_keeps_the_newest_checkpoints(tmp_path: Path) -> None:
    """checkpoint.keep holds even for a checkpoint Ray never registered (saved just
    before a worker died): the finished run's folder keeps only the newest `keep`."""
    from kd.train.checkpoint import prune_checkpoints

    for e in range(1, 6):
        (tmp_path / "run" / f"epoch_{e:05d}").mkdir(parents=True)
    (tmp_path / "run" / "other").mkdir()
    fs, root = storage.arrow_fs(str(tmp_path))
    final = f"{root}/run/epoch_00005"
    removed = prune_checkpoints(fs, f"{root}/run", 2, final)
    assert sorted(p.rsplit("/", 1)[1] for p in removed) == ["epoch_00001", "epoch_00002", "epoch_00003"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["epoch_00004", "epoch_00005", "other"]


def test_ray_processes_poll_reports_quickly(ray_session: None) -> None:
    """Every Ray process of the job (where Train's controller runs) gets kdflow's report
    poll interval through the job's runtime env, not Ray's 2 s default that made every
    short epoch wait ~2 s (bench/report_poll.py)."""
    import ray

    from kd.runtime import POLL_ENV

    @ray.remote(num_cpus=0)
    def poll_interval() -> str | None:
        return os.environ.get(POLL_ENV)

    expected = os.environ[POLL_ENV]
    assert float(expected) < 2.0
    assert ray.get(poll_interval.remote()) == expected
