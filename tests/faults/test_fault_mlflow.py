"""Fault: the MLflow server stops during training and comes back (docs/reliability.md)."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, free_port, launch_mlflow_server

DOWN_S = 8  # the server is down at least this long (then its restart begins)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_mlflow_outage_metrics_spooled_and_uploaded(ray_session: None, workdir: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    """Injected: a real ``mlflow server`` is stopped (SIGTERM) right after the loop reports
    epoch 1 and restarted on the same port and SQLite backend 8 s later, while epochs 2-3
    are reported (the driver's relay logs them: `kd.train.epoch_log`).
    Survives: training goes on while it is down (epoch 3 ends before the restart even
    begins: no epoch blocks on the dead server) and to the end; the epochs logged while it was down are spooled
    locally and uploaded when it answers again, so the run holds every epoch's metrics
    (steps 1, 2, 3) and ends FINISHED; the spool file is gone."""
    from mlflow.tracking import MlflowClient

    import kd.train.loop as loop
    from kd.config import load_experiment
    from kd.tracking_spool import spool_path
    from kd.train.run import train_run

    port, db = free_port(), workdir / "mlflow.db"
    arts = workdir / "mlartifacts"
    proc, url = launch_mlflow_server(f"sqlite:///{db}", str(arts), workdir / "s1.log", port=port)
    servers = [proc]
    monkeypatch.setenv("KD_SPOOL_DIR", str(workdir / "spool"))
    real_check = loop.check_finite
    downtime: dict[str, float] = {}
    done: dict[int, float] = {}

    def restart_later() -> None:
        time.sleep(DOWN_S)
        servers.append(launch_mlflow_server(f"sqlite:///{db}", str(arts), workdir / "s2.log",
                                            port=port)[0])
        downtime["back"] = time.time()

    def check_and_stop(metrics: dict[str, float], epoch: int, exp: object) -> None:
        real_check(metrics, epoch, exp)
        done[epoch] = time.time()
        if epoch == 1:  # epoch 1 is published (the relay may not have sent it): stop it now
            _stop(servers[0])
            downtime["stopped"] = time.time()
            threading.Thread(target=restart_later, daemon=True).start()

    monkeypatch.setattr(loop, "check_finite", check_and_stop)
    exp = load_experiment(CONFIGS / "digits-teacher.yaml", [
        "scaling.num_workers=0", "trainer.epochs=3", f"storage.path={workdir / 'runs'}",
        f"tracking.uri={url}"])
    try:
        out = train_run(exp, "teacher")
        c = MlflowClient(tracking_uri=url)
        for key in ("train/loss", "val/accuracy", "samples_per_s"):
            steps = sorted(m.step for m in c.get_metric_history(out.run_id, key))
            assert steps == [1, 2, 3], (key, steps)
        assert c.get_run(out.run_id).info.status == "FINISHED"
        assert done[3] < downtime["stopped"] + DOWN_S, (done, downtime)  # did not wait for it
    finally:
        for p in servers:
            _stop(p)
    logged = capfd.readouterr().out
    assert "stopped" in downtime and "back" in downtime
    assert "spooled to" in logged and "unreachable" in logged, logged[-3000:]
    assert "spooled metric batch(es) uploaded" in logged, logged[-3000:]
    assert not spool_path(out.run_id).exists()


def test_mlflow_never_back_keeps_the_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Injected: nothing listens at the tracking URI for the whole run. Survives: each
    epoch's metrics are in the spool file, and the end-of-run flush fails with one line
    naming that file (bounded: it gives up after its wait, here 1 s)."""
    import json

    from kd.tracking_spool import TrackingUnavailable, flush, log_metrics, spool_path

    monkeypatch.setenv("KD_SPOOL_DIR", str(tmp_path))
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    for step in (1, 2):
        assert log_metrics(uri, "run123", {"train/loss": 0.5 / step, "note": "x"}, step,
                           attempts=2, backoff=0.05) is False
    with pytest.raises(TrackingUnavailable) as e:
        flush(uri, "run123", wait_s=1, backoff=0.1)
    assert time.monotonic() - t0 < 30  # bounded retries, not MLflow's minutes of backoff
    path = spool_path("run123")
    assert str(path) in str(e.value) and "2 epoch metric batch(es)" in str(e.value)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(b["step"], b["metrics"]) for b in kept] == [(1, {"train/loss": 0.5}),
                                                          (2, {"train/loss": 0.25})]
