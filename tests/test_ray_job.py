"""End to end: a Ray head node of our own, `ray job submit`, the MLflow run it made.

The head runs with token authentication (Ray 2.60's default for local clusters),
set up on purpose: a fresh random token, ``RAY_AUTH_MODE=token`` and
``RAY_AUTH_TOKEN`` for both ``ray start --head`` and ``ray job submit``; a submit
without the token is refused. Teardown stops only this head: ``ray start
--block`` runs in its own process group and that group is terminated (``ray
stop`` would kill every Ray on the machine, including the test session's).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.ray_head import RAY


def _job(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, "job", *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
@pytest.mark.e2e
def test_ray_job_submit_teacher(ray_head: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    address, env = ray_head
    noauth = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    refused = _job(noauth, "list", "--address", address, timeout=60)
    assert refused.returncode != 0, "the head must refuse a client without the token"

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": uri}}
    started = time.time()
    res = _job(env, "submit", "--address", address, "--working-dir", ".",
               "--runtime-env-json", json.dumps(runtime_env), "--",
               "python", "workflows/teacher.py", "--config", "configs/digits-teacher.yaml",
               "--run-name", "job-e2e", "trainer.epochs=1", "scaling.num_workers=1",
               "teacher.model=mlp", "teacher.args={hidden: [16]}",
               f"storage.path={tmp_path / 'runs'}", "tracking.experiment=e2e")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "succeeded" in (res.stdout + res.stderr).lower()
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("e2e").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.start_time / 1000 >= started - 5
    assert run.data.tags["kd.ray_run_name"] == "job-e2e"
    assert run.data.metrics["epoch"] == 1 and "holdout/accuracy" in run.data.metrics
    assert (tmp_path / "runs" / "digits-teacher" / "model.safetensors").exists()
