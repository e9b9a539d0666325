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
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, wait_for_port

RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A 2-CPU Ray head on loopback with token auth; yields (dashboard URL, env)."""
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    ports = {"--node-manager-port": free_port(), "--object-manager-port": free_port(),
             "--dashboard-agent-listen-port": free_port(),
             "--dashboard-agent-grpc-port": free_port(), "--metrics-export-port": free_port(),
             "--runtime-env-agent-port": free_port()}
    temp = tempfile.mkdtemp(prefix="kdray-", dir="/tmp")  # short: Ray's socket paths
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats",
           *[f"{k}={v}" for k, v in ports.items()]]
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while head.poll() is None and time.time() < deadline:
            try:
                wait_for_port(dash, timeout=1)
                break
            except RuntimeError:
                continue
        if head.poll() is not None or time.time() >= deadline:
            pytest.fail("ray start --head did not come up:\n"
                        + (tmp_path / "head.log").read_text()[-2000:])
        yield f"http://127.0.0.1:{dash}", env
    finally:
        # Stop exactly this head: SIGTERM to its process group, SIGKILL what is left.
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()


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
