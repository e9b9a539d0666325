"""One readable line when a worker dies: which rank, the attempt out of
``trainer.max_failures``, and the epoch the restarted workers resume from.

`FailureNotice` is a Ray Train ``UserCallback``: it runs in Train's controller process
(Ray forwards its print to the driver), which sees every worker-group failure via
``after_exception(run_context, {rank: error})``. The resume epoch comes from the same
folder listing the restarted rank 0 chooses from (`checkpoint_candidates`): the newest
``epoch_*`` checkpoint of the run. (If that one proves unreadable, rank 0 falls back to
the previous one and says so.)
"""

from __future__ import annotations

import logging
from typing import Any

import ray.train

# Logs "Graceful shutdown of backend failed ..." with the dead actor's whole traceback
# while the group is torn down after a worker death; the notice says what happened.
BACKEND_SHUTDOWN_LOGGER = "ray.train.v2._internal.callbacks.backend_setup"


def describe(error: Exception) -> str:
    """A short name for a worker's failure: the exception class and its first line."""
    first = (str(error).strip().splitlines() or [""])[0]
    if len(first) > 120:
        first = first[:117] + "..."
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def resume_epoch(fs: Any, run_path: str) -> int:
    """The 1-based epoch a restart begins with: one after the newest complete
    checkpoint (its manifest and every file it lists present; sizes and hashes are
    verified by the restarted rank 0, which says so if it must fall back further)."""
    import json

    import pyarrow.fs as pafs

    from kd.train.checkpoint import CKPT_MANIFEST, checkpoint_candidates

    for c in checkpoint_candidates(fs, run_path):
        name = c.path.rstrip("/").rsplit("/", 1)[-1]
        if not (name.startswith("epoch_") and name[6:].isdigit()):
            continue
        try:
            with fs.open_input_stream(f"{c.path}/{CKPT_MANIFEST}") as f:
                files = json.loads(f.read())["files"]
        except (OSError, ValueError, KeyError):
            continue
        infos = fs.get_file_info([f"{c.path}/{n}" for n in files])
        if all(i.type == pafs.FileType.File for i in infos):
            return int(name[6:]) + 1
    return 1


class FailureNotice(ray.train.UserCallback):
    """Prints ``[kd] worker rank R died (...): restart k of trainer.max_failures N,
    resuming from epoch E`` (or that no restarts are left) once per failure."""

    def __init__(self, max_failures: int, fs: Any, run_path: str, epochs: int) -> None:
        self.max_failures, self.fs, self.run_path, self.epochs = max_failures, fs, run_path, epochs
        self.failures = 0

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        # Runs in the controller before it shuts the failed group down; Ray Train sets up
        # the controller's logging itself, so the level is lowered here, not in a setup hook.
        logging.getLogger(BACKEND_SHUTDOWN_LOGGER).setLevel(logging.ERROR)
        self.failures += 1
        ranks = sorted(worker_exceptions)
        who = ", ".join(f"rank {r} ({describe(worker_exceptions[r])})" for r in ranks)
        print(f"[kd] {self.line(ranks, who)}", flush=True)

    def line(self, ranks: list[int], who: str) -> str:
        """The message for the current failure count."""
        noun = "worker" if len(ranks) == 1 else "workers"
        if self.failures > self.max_failures:
            return (f"{noun} {who} failed; no restarts left (trainer.max_failures "
                    f"{self.max_failures}): the run stops")
        try:
            epoch = f"epoch {resume_epoch(self.fs, self.run_path)}/{self.epochs}"
        except Exception as e:  # storage unreachable: say so, the restart decides
            epoch = f"the newest good checkpoint (listing failed: {describe(e)})"
        return (f"{noun} {who} failed: restart {self.failures} of trainer.max_failures "
                f"{self.max_failures}, resuming from {epoch}")
