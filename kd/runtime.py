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

The one ERROR line a normal run used to print, ``core_worker.cc: Actor with class name:
'PreemptionWatcher' ... has constructor arguments in the object store and max_restarts >
0`` (ray-project/ray#53727), comes from Ray Train V2's controller: it starts a
``PreemptionWatcher`` actor (``ray/train/v2/_internal/callbacks/preemption_callback.py``)
with ``max_restarts=-1`` and the worker actor handles as constructor arguments, and Ray's
C++ core logs that combination at ERROR. The watcher polls for node drains (spot / preempted
nodes); a local Ray that kdflow starts itself is one node that is never drained, so there
kdflow sets ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0`` (unless the variable is set) and the
watcher, and its line, are gone. On a cluster (``RAY_ADDRESS`` / ``ray job submit``) the
watcher stays; its line there is that warning, not a failure (docs/cluster.md).

Ray starts every worker process at niceness 15 (``RAY_worker_niceness``, Ray's
``worker_niceness`` default, "so that the OS prioritizes CPU for other processes over
worker"): the Train worker that runs the loop then yields the cores to Ray's own
processes, the driver and anything else on the machine. For a local Ray that kdflow
starts, the worker *is* the user's work, so kdflow sets ``RAY_worker_niceness=0``
(unless the variable is set): workers run at the driver's niceness. Measured in
``bench/overhead.py`` (worker ``worker/niceness`` metric). A cluster started with ``ray
start`` keeps its own setting (docs/cluster.md: start it with ``RAY_worker_niceness=0``).
"""

from __future__ import annotations

import logging
import os

POLL_INTERVAL_S = "0.25"
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
PREEMPTION_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
NICENESS_ENV = "RAY_worker_niceness"  # read by the raylet kdflow starts (Ray's default 15)
# Ray 2.60 turns token auth on for a new local Ray and logs so at WARNING on every start
AUTH_LOG = "ray._private.authentication.authentication_token_setup"
PROGRESS_ENV = "KD_PROGRESS_S"  # kd.train.progress: seconds between step lines, 0 = off
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
    # Ray Data hands a worker its batches as read-only numpy views of the object store,
    # and torch.as_tensor warns about that once per worker; kdflow's transforms copy
    # (kd.data.transforms states the rule for plugins), so the line is noise.
    env = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
           "PYTHONWARNINGS": "ignore::DeprecationWarning,"
                             "ignore:The given NumPy array is not writable:UserWarning"}
    env[DATA_LOG_ENV] = os.environ.setdefault(DATA_LOG_ENV, "WARNING")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    env[POLL_ENV] = os.environ.setdefault(POLL_ENV, POLL_INTERVAL_S)
    address = os.environ.get("RAY_ADDRESS") or None
    if address is None:  # a local one-node Ray is never drained: no preemption watcher
        env[PREEMPTION_ENV] = os.environ.setdefault(PREEMPTION_ENV, "0")
        os.environ.setdefault(NICENESS_ENV, "0")  # the raylet's workers: the driver's niceness
        # Ray's default (token auth on) is kept on purpose, without its line saying so.
        # (Setting RAY_AUTH_MODE=token here would not do: the driver's Ray config is read
        # when Ray is imported, so its GCS client then stays without the token.)
        logging.getLogger(AUTH_LOG).setLevel(logging.ERROR)
    for name in (PREEMPTION_ENV, PROGRESS_ENV):  # the user's choice reaches every worker
        if name in os.environ:
            env[name] = os.environ[name]
    ray.init(address=address, num_cpus=num_cpus,
             include_dashboard=False, log_to_driver=True, logging_level="WARNING",
             runtime_env={"env_vars": env, "worker_process_setup_hook": "kd.runtime.quiet_logs"})
    quiet_logs()


QUIET = {
    # "Progress bars disabled. To enable, ...", once per process: kdflow disabled them
    "ray.data._internal.progress": logging.ERROR,
    # Without the dashboard the state API is absent, and the cleaner warns every second.
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
}
DATA_LOG_ENV = "RAY_DATA_LOG_LEVEL"  # read by Ray Data when it is imported (its logging setup)


def quiet_logs() -> None:
    """Runs in every Ray worker process (``worker_process_setup_hook``) and in the driver:
    lowers Ray Train / Ray Data per-epoch chatter so the ``[kd] epoch`` lines stay readable.

    It imports neither Ray Data nor Ray Train. Importing Ray Data resets its ``ray.data``
    logger from its own logging config, so its level comes from ``RAY_DATA_LOG_LEVEL``
    (`ensure_ray` sets WARNING unless the variable is set: "Starting execution of Dataset
    ..." every epoch is INFO) and progress bars from ``RAY_DATA_DISABLE_PROGRESS_BARS``;
    only where Ray Data is already imported (the driver) are both set here too. Importing
    them here cost each of a job's helper processes (Train controller, placement-group
    cleaner, synchronization actor, dataset manager, read tasks) about 1 s of CPU at start,
    with the Train worker starting beside them on a 2-core machine."""
    import sys

    import ray

    for name, level in QUIET.items():
        logging.getLogger(name).setLevel(level)
    # Train V2 logs "Reporting training result ..." under its module's file path
    context = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal",
                           "execution", "context.py")
    logging.getLogger(context).setLevel(logging.WARNING)
    if "ray.data" in sys.modules:
        import ray.data

        logging.getLogger("ray.data").setLevel(os.environ.get(DATA_LOG_ENV, "WARNING"))
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False


def end_process(code: int) -> None:
    """End the ``kd`` process with ``code`` now: flush logging and the standard streams,
    disconnect from Ray (which stops a local Ray this process started), then
    ``os._exit``. Measured on a small ``kd distill`` against a running head: Ray's own
    exit hook sleeps 0.5 s and the interpreter's teardown of Ray's core worker, torch and
    pyarrow took another ~2 s after all work was done. Everything kdflow writes (MLflow
    calls, weights, checkpoints, S3 puts) is synchronous and finished before this point."""
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to say
            pass
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    os._exit(code)
