"""Fault: the driver is killed (SIGKILL to its process group) and the job re-submitted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, REPO

EPOCHS = 5


def _kd_teacher(tmp_path: Path, env: dict[str, str]) -> list[str]:
    return [sys.executable, "-m", "kd.cli", "teacher", str(CONFIGS / "digits-teacher.yaml"),
            "--run-name", "nightly", f"trainer.epochs={EPOCHS}", "trainer.batch_size=16",
            "checkpoint.every_epochs=1", "scaling.num_workers=1",
            f"storage.path={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]


def _first_complete_checkpoint(run_dir: Path) -> Path | None:
    """The first ``epoch_*`` folder whose manifest verifies (every file, size, sha256)."""
    from kd.train.checkpoint import read_checkpoint

    for d in sorted(run_dir.glob("epoch_*")):
        try:
            read_checkpoint(d)
            return d
        except Exception:  # not (yet) complete: still being copied in
            continue
    return None


@pytest.mark.slow
def test_driver_killed_job_resubmitted_resumes(ray_head: tuple[str, dict[str, str]],
                                               tmp_path: Path) -> None:
    """Injected: ``kd teacher --run-name nightly`` (one Ray Train worker, a checkpoint every
    epoch, joined to a running Ray head through RAY_ADDRESS) has its driver process group
    SIGKILLed as soon as its first complete checkpoint is in storage.path; then the same
    command is run again. Survives: the second driver resumes from the newest complete
    checkpoint (its "[kd] resumed from the epoch K checkpoint" line), the epochs up to K
    are not retrained (each is logged once in the one MLflow run), every epoch 1..5 is
    logged, the run ends FINISHED and the final weights are written."""
    from mlflow.tracking import MlflowClient

    _, head_env = ray_head
    env = {**head_env, "RAY_ADDRESS": head_env["KD_TEST_RAY_GCS"], "PYTHONPATH": str(REPO),
           "KD_PROGRESS_S": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = _kd_teacher(tmp_path, env)
    t0 = time.time()
    log1 = open(tmp_path / "driver1.log", "w")
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log1, stderr=subprocess.STDOUT,
                             start_new_session=True)
    deadline, ckpt = time.time() + 240, None
    while first.poll() is None and time.time() < deadline and ckpt is None:
        ckpt = _first_complete_checkpoint(tmp_path / "runs" / "nightly")
        time.sleep(0.05)
    if ckpt is not None:
        os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    print(f"[fault] first driver killed after {time.time() - t0:.0f}s at {ckpt}", flush=True)
    log1.close()
    text1 = (tmp_path / "driver1.log").read_text()
    assert ckpt is not None and first.returncode == -signal.SIGKILL, text1[-3000:]
    weights = tmp_path / "runs" / "digits-teacher" / "model.safetensors"
    assert not weights.exists(), "the first driver finished before it was killed"

    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=400)
    out = second.stdout + second.stderr
    print(f"[fault] second driver done after {time.time() - t0:.0f}s", flush=True)
    assert second.returncode == 0, out[-4000:]
    resumed = [ln for ln in out.splitlines() if "[kd] resumed from the epoch" in ln]
    assert resumed, out[-3000:]
    k = int(resumed[0].split("[kd] resumed from the epoch ")[1].split()[0])
    assert 1 <= k < EPOCHS, resumed
    assert weights.exists()

    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()],
                         filter_string="tags.`kd.ray_run_name` = 'nightly'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [r.info for r in runs]
    steps = [m.step for m in c.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert sorted(set(steps)) == list(range(1, EPOCHS + 1)), steps
    assert all(steps.count(e) == 1 for e in range(1, k + 1)), (k, sorted(steps))
