"""Test code that runs inside Ray Train workers (imported by name, so it must be a
module, not a test function).

`probe_loop` wraps kdflow's loop: after the run it all-gathers every rank's actual
trainee and loss-adapter tensors and rank 0 writes them to ``<run_dir>/rank_states.pt``,
so a test compares the ranks' weights themselves, not only the loop's own checksum.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def probe_loop(spec: dict[str, Any]) -> None:
    from kd.train.loop import run_loop
    from kd.train.parallel import unwrap

    w = run_loop(spec)
    mine = {"trainee": {k: v.detach().cpu() for k, v in unwrap(w.trainee).state_dict().items()},
            "loss": {k: v.detach().cpu() for k, v in w.asm.loss.state_dict().items()}}
    every: list[Any] = [None] * w.world
    torch.distributed.all_gather_object(every, mine)
    if w.rank == 0:
        torch.save(every, Path(spec["run_dir"]) / "rank_states.pt")


def train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train worker actors, from the GCS actor table.

    ``ray.util.state.list_actors`` needs the dashboard, which kdflow's local Ray runs
    without (``include_dashboard=False``); the GCS actor table behind it is read here
    directly and carries each actor's class, state and PID."""
    from ray._private import state

    return sorted(int(a["Pid"]) for a in state.actors().values()
                  if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"
                  and a["Pid"])
