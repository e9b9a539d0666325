"""Per-epoch metrics that survive an MLflow server outage.

The epoch relay (`kd.train.epoch_log`, a thread of the process that runs ``fit``) logs
each epoch's metrics through `log_metrics`:

- a batch is sent with bounded retries and exponential backoff (``ATTEMPTS`` tries,
  ``BACKOFF_S`` doubling); MLflow's own HTTP retries are switched off for that call
  (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` unless the user set it), so a down server costs
  seconds, not MLflow's default minutes of urllib3 backoff;
- a batch that still fails is appended to a local spool file (`spool_path`: one JSON
  line per batch, ``$KD_SPOOL_DIR`` or ``<tmp>/kdflow-mlflow-spool/<run id>.jsonl``) and
  training continues with one ``[kd]`` line saying so;
- the spool is uploaded first on the next successful log, and `flush` at the end of the
  loop waits for the server (up to ``KD_TRACKING_WAIT_S``, default 300 s) before the run
  ends. If the server never returns, `TrackingUnavailable` names the spool file, which
  still holds every batch (nothing is lost; re-send it with `flush`).

Only per-epoch metrics are spooled: the calls at the start and end of a run (create
the run, artifacts, tags) need the server and fail the run if it is down then.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ATTEMPTS = 3
BACKOFF_S = 0.5
WAIT_ENV = "KD_TRACKING_WAIT_S"
SPOOL_ENV = "KD_SPOOL_DIR"
_MLFLOW_RETRIES = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
_ENV_LOCK = threading.Lock()


class TrackingUnavailable(RuntimeError):
    """The MLflow server did not come back before the end of the run; the message names
    the spool file that holds the metrics it did not receive."""


def spool_path(run_id: str) -> Path:
    """The spool file of MLflow run ``run_id`` (it may not exist)."""
    base = os.environ.get(SPOOL_ENV) or str(Path(tempfile.gettempdir()) / "kdflow-mlflow-spool")
    return Path(base) / f"{run_id}.jsonl"


@contextmanager
def _no_mlflow_retries() -> Iterator[None]:
    """MLflow's HTTP layer without its own retries, for one call (the caller retries);
    left alone when the user set ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``."""
    if _MLFLOW_RETRIES in os.environ:
        yield
        return
    with _ENV_LOCK:
        os.environ[_MLFLOW_RETRIES] = "0"
        try:
            yield
        finally:
            os.environ.pop(_MLFLOW_RETRIES, None)


def _send(uri: str, run_id: str, batches: list[dict[str, Any]]) -> None:
    """One ``log_batch`` per spooled batch (metrics keep their own step and timestamp)."""
    from mlflow.entities import Metric

    from kd.tracking import client

    c = client(uri)
    with _no_mlflow_retries():
        for b in batches:
            c.log_batch(run_id, metrics=[Metric(k, v, b["ts"], b["step"])
                                         for k, v in b["metrics"].items()])


def _retry(fn: Callable[[], None], attempts: int, backoff: float) -> Exception | None:
    """Call ``fn`` up to ``attempts`` times, sleeping ``backoff``, 2x, 4x... between;
    None on success, else the last exception."""
    last: Exception | None = None
    for i in range(attempts):
        try:
            fn()
            return None
        except Exception as e:  # the MLflow client raises many types for a dead server
            last = e
            if i + 1 < attempts:
                time.sleep(backoff * 2 ** i)
    return last


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int,
                attempts: int = ATTEMPTS, backoff: float = BACKOFF_S,
                ts: int | None = None) -> bool:
    """Log numeric ``metrics`` at ``step`` with timestamp ``ts`` (ms since the epoch;
    default now), uploading any spooled batches first. Returns True when MLflow has them
    all; False when they were spooled (see the module)."""
    batch = {"step": int(step), "ts": int(time.time() * 1000) if ts is None else int(ts),
             "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}}
    path = spool_path(run_id)
    pending = _read(path) if path.exists() else []
    err = _retry(lambda: _send(uri, run_id, [*pending, batch]), attempts, backoff)
    if err is None:
        path.unlink(missing_ok=True)
        return True
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(batch) + "\n")
    print(f"[kd] MLflow at {uri} unreachable ({type(err).__name__}): step {step} metrics "
          f"spooled to {path}; sent when it answers again", flush=True)
    return False


def flush(uri: str, run_id: str, wait_s: float | None = None, backoff: float = BACKOFF_S) -> None:
    """Upload the spool of ``run_id`` (no-op without one), retrying with backoff (capped
    at 10 s) for up to ``wait_s`` seconds (default ``$KD_TRACKING_WAIT_S`` or 300);
    `TrackingUnavailable` naming the spool file if the server does not answer in time."""
    path = spool_path(run_id)
    if not path.exists():
        return
    wait = float(os.environ.get(WAIT_ENV, "300")) if wait_s is None else wait_s
    batches = _read(path)
    deadline, delay = time.monotonic() + wait, backoff
    while True:
        err = _retry(lambda: _send(uri, run_id, batches), 1, 0)
        if err is None:
            path.unlink(missing_ok=True)
            print(f"[kd] MLflow at {uri} answers again: {len(batches)} spooled metric "
                  "batch(es) uploaded", flush=True)
            return
        if time.monotonic() + delay > deadline:
            raise TrackingUnavailable(
                f"MLflow at {uri} did not answer within {wait:g}s ({type(err).__name__}): "
                f"{len(batches)} epoch metric batch(es) of run {run_id} are kept in {path}")
        time.sleep(delay)
        delay = min(delay * 2, 10.0)
