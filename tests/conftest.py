"""Shared test fixtures: one local Ray per test session, a real S3 API server
(moto's ``moto_server`` process on loopback), and a scratch working directory.

Keep expensive things session-scoped: a Ray start costs seconds, a multi-worker
``fit()`` tens of seconds on 2 cores.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ["tests.ray_head", "tests.watchdog"]  # a token-auth Ray head; the hang report

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def counting(net: object) -> object:
    """``net`` wrapped in a module that counts the rows it is asked to forward (``.rows``):
    how the tests see how often a teacher ran."""
    import torch

    class Counting(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.rows = net, 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.rows += len(x)
            return self.net(x)

    return Counting()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    """Block until something accepts connections on 127.0.0.1:port."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


@pytest.fixture(scope="session")
def ray_session(s3_server: str) -> Iterator[None]:
    """One local Ray runtime for the whole test session (2 CPUs). Started after the S3
    test server has set the AWS environment: Ray's workers inherit the environment of
    the process that starts Ray, so a worker that reads s3:// (a teacher loaded in a
    Ray Data actor) has the test credentials whichever test starts Ray first."""
    import ray

    from kd.runtime import ensure_ray

    os.environ.pop("RAY_ADDRESS", None)
    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


def free_cpus_after(seconds: float) -> tuple[float, float]:
    """``(free, total)`` CPUs of this process's Ray, once all are free or ``seconds`` have passed."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    deadline = time.time() + seconds
    while ray.available_resources().get("CPU", 0) < total and time.time() < deadline:
        time.sleep(0.2)
    return ray.available_resources().get("CPU", 0), total


@pytest.fixture(autouse=True)
def ray_idle_after(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test, the session's Ray is idle again before the next test starts:
    when a CPU is still reserved, Python's cyclic collector runs (a failure's reference
    cycles can hold a Ray Data actor pool's handles, `kd.data.stream.run_pool`) and the
    CPUs are waited for, up to 30 s; one line says so if they stay reserved. A test then
    never waits forever on a CPU that an earlier test's actor kept."""
    yield
    if "ray" not in sys.modules:
        return
    import gc

    import ray

    if not ray.is_initialized():
        return
    total = ray.cluster_resources().get("CPU", 0)
    if ray.available_resources().get("CPU", 0) >= total:
        return
    gc.collect()
    free, total = free_cpus_after(30)
    if free < total:
        from tests.watchdog import say

        say(f"\n[conftest] {free:g} of {total:g} CPUs of the session's Ray still reserved 30 s "
            f"after {request.node.nodeid}: {holders()}")


def holders() -> str:
    """What holds Ray resources now: live actors by class, and placement groups not removed."""
    import ray._private.state as state
    from ray.util import placement_group_table

    actors: dict[str, int] = {}
    for a in state.actors().values():
        if a.get("State") in ("ALIVE", "PENDING_CREATION", "RESTARTING"):
            name = a.get("ActorClassName") or "?"
            actors[name] = actors.get(name, 0) + 1
    groups = [f"{g.get('name') or pid[:8]} {g.get('state')} {g.get('bundles')}"
              for pid, g in placement_group_table().items() if g.get("state") != "REMOVED"]
    return f"actors {actors}; placement groups {groups}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 API server (moto_server) on loopback; sets the AWS environment so
    boto3 and kdflow talk to it. Yields its endpoint URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    exe = Path(sys.executable).with_name("moto_server")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    with open(log, "w") as out:
        proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in
             ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
              "AWS_ENDPOINT_URL_S3")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint})
    try:
        wait_for_port(port)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(s3_server: str, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket on the test S3 server; yields its name."""
    import boto3

    name = f"kd-{request.node.name.lower().replace('_', '-')[:40]}-{os.getpid()}"
    name = "".join(c for c in name if c.isalnum() or c == "-").strip("-")
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test inside an empty directory (MLflow SQLite and runs land here)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def launch_mlflow_server(backend_uri: str, artifacts: str, log: Path,
                         s3_endpoint: str | None = None,
                         port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``mlflow server`` on ``port`` (default: a free loopback port) with proxied
    artifacts (``--serve-artifacts``) and wait until it answers /health; returns (process, URL)."""
    import urllib.request

    port = port or free_port()
    # MLflow 3.x servers start ~6 huey job-consumer processes (GenAI jobs kdflow does
    # not use) that cost ~40% of a core on a 2-core CI machine: off in tests.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if s3_endpoint:
        env["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint
    exe = Path(sys.executable).with_name("mlflow")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*cmd, "server", "--backend-store-uri", backend_uri, "--artifacts-destination",
             artifacts, "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.3)
    proc.terminate()
    raise RuntimeError(f"mlflow server not healthy after 90s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def mlflow_server(s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` (SQLite backend store) whose artifacts it proxies to the
    bucket ``mlflow-artifacts`` on the moto S3 server; yields its tracking URL."""
    import boto3

    d = tmp_path_factory.mktemp("mlflow-server")
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="mlflow-artifacts")
    proc, url = launch_mlflow_server(f"sqlite:///{d / 'mlflow.db'}", "s3://mlflow-artifacts/root",
                                     d / "server.log", s3_server)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def tracking(mlflow_server: str) -> Iterator[str]:
    """The session's `mlflow_server` as ``MLFLOW_TRACKING_URI`` for one test module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        yield mlflow_server


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> str:
    """Weights of a cnn_small teacher trained 3 epochs on digits (in-process loop);
    returns the safetensors path."""
    from kd.config import load_experiment
    from kd.train.run import train_run

    d = tmp_path_factory.mktemp("teacher")
    old = Path.cwd()
    os.chdir(d)
    try:
        exp = load_experiment(CONFIGS / "digits-teacher.yaml",
                              ["scaling.num_workers=0", "trainer.epochs=3",
                               f"storage.path={d / 'runs'}", f"tracking.uri=sqlite:///{d}/mlflow.db"])
        return train_run(exp, "teacher").weights
    finally:
        os.chdir(old)
