"""Starting or joining Ray once per process.

Inside `ray job submit` (or with ``RAY_ADDRESS`` set) this joins that cluster;
otherwise it starts a local one. Ray Data progress bars are switched off: the
loop prints one line per epoch instead.
"""

from __future__ import annotations

import os


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
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, num_cpus=num_cpus,
             include_dashboard=False, log_to_driver=True, logging_level="WARNING",
             runtime_env={"env_vars": env})
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
