"""Starting or joining Ray once per process.

Inside `ray job submit` (or with ``RAY_ADDRESS`` set) this joins that cluster;
otherwise it starts a local one. Ray Data progress bars are switched off: the
loop prints one line per epoch instead.

Ray Train V2's controller takes one ``train.report`` per poll from each worker's
one-slot result queue and polls every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (Ray's
default 2 s), so a worker that reports every epoch waits up to that long per epoch.
kdflow reports every epoch, so it sets the poll to ``POLL_INTERVAL_S`` unless the
variable is already set (measured in ``bench/report_poll.py``: a 20-epoch digits run
takes about half the wall time). A slow poll is not a failure: Ray marks a worker dead
only after ``RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S`` (10 min).
"""

from __future__ import annotations

import logging
import os

POLL_INTERVAL_S = "0.25"
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
OWNER_ENV = "OWNER_NAME"  # KubeRay sets it in every Ray container: the RayJob's name


def run_name_from_env(role: str) -> str | None:
    """``<RayJob name>-<role>`` when running under a KubeRay RayJob, else None.

    Each RayJob retry builds a new RayCluster (and a new Ray job id), but KubeRay gives
    every Ray container ``OWNER_NAME`` = the RayJob's name, which stays the same across
    retries. A run named from it therefore resumes its checkpoints (and its MLflow run)
    on the retry. The role keeps a teacher and a student run of one job apart."""
    owner = os.environ.get(OWNER_ENV, "").strip()
    return f"{owner}-{role}" if owner else None


def ensure_ray(num_cpus: int | None = None) -> None:
    """``ray.init`` unless Ray is already initialised in this process."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Train V2 patches print() into its logger, which doubles every line that Ray
    # already forwards from the worker; the epoch lines are plain prints.
    env = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
           "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    env[POLL_ENV] = os.environ.setdefault(POLL_ENV, POLL_INTERVAL_S)
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, num_cpus=num_cpus,
             include_dashboard=False, log_to_driver=True, logging_level="WARNING",
             runtime_env={"env_vars": env, "worker_process_setup_hook": "kd.runtime.quiet_logs"})
    quiet_logs()


QUIET = {
    "ray.data": logging.WARNING,  # "Starting execution of Dataset ..." for every epoch
    # Without the dashboard the state API is absent, and the cleaner warns every second.
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
}


def quiet_logs() -> None:
    """Runs in every Ray worker process (``worker_process_setup_hook``): lowers Ray
    Train / Ray Data per-epoch chatter so the ``[kd] epoch`` lines stay readable."""
    for name, level in QUIET.items():
        logging.getLogger(name).setLevel(level)
    try:  # Train V2 logs "Reporting training result ..." under its file path
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
