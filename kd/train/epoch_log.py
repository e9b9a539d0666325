"""Epoch metrics from the workers to MLflow, logged by the process that runs `fit`.

The loop's rank 0 does not talk to MLflow. `publish` writes each epoch's metrics as one
small JSON file into the run's folder, ``<run>/metrics/<step>-<ns>.json``, on the
filesystem the run's checkpoints use (local or S3; written under a temporary name and
moved, so a reader never sees half a file). `EpochRelay` is a thread of the process
that called `fit`, which holds MLflow already (it started the run): every ``POLL_S``
seconds it lists that folder, logs the files in name order (step, then time) through
`kd.tracking_spool.log_metrics` (bounded retries; the outage spool) and deletes each
once MLflow has it or the spool holds it. On leaving it collects what is left and,
after a `fit` that returned, waits for the spool (`kd.tracking_spool.flush`).

Why not in the worker: MLflow's import with its SQLAlchemy store cost a worker ~2 s at
its first report (bench/RESULTS.md, fixed cost), paid per run, per restart and per Tune
trial; and workers now need neither MLflow's address nor its credentials.

Restarts: a restarted worker repeats the epochs after its checkpoint and publishes them
again; they are logged at the same steps (MLflow keeps both values), as when the worker
logged them itself. A driver killed mid-run leaves the files it had not logged; the next
`fit` of the same run name (a resume) logs them first. A Tune trial is stopped by killing
its process, often before its relay took the last epoch's file: the sweep's driver logs
what such a run left (`log_left`) before it reads the run's epochs back.
"""

from __future__ import annotations

import json
import threading
import time
from types import TracebackType
from typing import Any

from kd import tracking_spool

METRICS_DIR = "metrics"
POLL_S = 1.0


def metrics_dir(run_path: str) -> str:
    """The folder of a run's not-yet-logged epoch metrics."""
    return f"{run_path}/{METRICS_DIR}"


def publish(fs: Any, run_path: str, metrics: dict[str, float], step: int) -> str:
    """Write ``metrics`` of epoch ``step`` (numeric values only) for the relay to log;
    returns the file's path. The timestamp MLflow records is the time of this call."""
    doc = {"step": int(step), "ts": int(time.time() * 1000),
           "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}}
    folder = metrics_dir(run_path)
    fs.create_dir(folder, recursive=True)
    name = f"{folder}/{int(step):06d}-{time.time_ns()}"
    with fs.open_output_stream(f"{name}.part") as f:
        f.write(json.dumps(doc).encode())
    fs.move(f"{name}.part", f"{name}.json")
    return f"{name}.json"


class EpochRelay:
    """``with EpochRelay(fs, run_path, uri, run_id): trainer.fit()``: logs the epochs'
    metrics the loop publishes while ``fit`` runs (see the module docstring)."""

    def __init__(self, fs: Any, run_path: str, uri: str, run_id: str,
                 poll_s: float = POLL_S) -> None:
        self.fs, self.folder, self.uri, self.run_id = fs, metrics_dir(run_path), uri, run_id
        self.poll_s = poll_s
        self.logged = 0  # epoch files taken (into MLflow or the spool)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kd-epoch-relay", daemon=True)
        self._warned = False

    def __enter__(self) -> EpochRelay:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        if exc_type is not None:  # log what arrived; the error is what the caller sees
            try:
                self.collect()
            except Exception as e:
                print(f"[kd] epoch metrics left in {self.folder}: {type(e).__name__}: {e}",
                      flush=True)
            return
        self.collect()
        tracking_spool.flush(self.uri, self.run_id)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.collect()
            except Exception as e:  # storage hiccup: said once, tried again next poll
                if not self._warned:
                    print(f"[kd] reading epoch metrics from {self.folder} failed "
                          f"({type(e).__name__}: {e}); retrying", flush=True)
                    self._warned = True

    def collect(self) -> int:
        """Log every published file now in the folder, in name order, deleting each
        once taken; returns how many were taken."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.folder, allow_not_found=True))
        names = sorted(i.path for i in infos
                       if i.type == pafs.FileType.File and i.path.endswith(".json"))
        for path in names:
            with self.fs.open_input_stream(path) as f:
                doc = json.loads(f.read())
            tracking_spool.log_metrics(self.uri, self.run_id, doc["metrics"], doc["step"],
                                       ts=doc["ts"])
            self.fs.delete_file(path)
            self.logged += 1
        return len(names)


def log_left(fs: Any, run_path: str, uri: str, run_id: str) -> int:
    """Log the epoch files a run whose process is gone left in ``run_path`` (e.g. a Tune
    trial stopped before its relay took its last epoch) and wait for the spool; returns
    how many were logged. Nothing to log costs one listing of the folder."""
    taken = EpochRelay(fs, run_path, uri, run_id).collect()
    if taken:
        tracking_spool.flush(uri, run_id)
    return taken
