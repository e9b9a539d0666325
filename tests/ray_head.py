"""A Ray head node of our own with token authentication, for end-to-end job tests
(`tests/test_ray_job.py`, `tests/test_submit.py`).

The head runs with a fresh random token, ``RAY_AUTH_MODE=token`` and
``RAY_AUTH_TOKEN``. Extra environment for the head (and so for every job driver it
starts) comes from ``request.param`` when the fixture is parametrized indirectly, e.g.
``OWNER_NAME`` as KubeRay sets it. Teardown stops only this head: ``ray start --block``
runs in its own process group and that group is terminated.
"""

from __future__ import annotations

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
def ray_head(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, str]]]:
    """A 2-CPU Ray head on loopback with token auth; yields (dashboard URL, env); env's
    ``KD_TEST_RAY_GCS`` is the head's GCS address (host:port)."""
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PYTHONPATH": str(REPO), **getattr(request, "param", {})}
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
        # the GCS address, for a driver that joins this head directly (RAY_ADDRESS)
        yield f"http://127.0.0.1:{dash}", {**env, "KD_TEST_RAY_GCS": f"127.0.0.1:{gcs}"}
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
