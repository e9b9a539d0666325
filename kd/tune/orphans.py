"""Freeing what a stopped trial's Ray Train run leaves behind.

Under Ray Train V2 each trial's `TorchTrainer` runs a controller actor that creates the
worker group's placement group. When Tune stops a trial (ASHA, a failure), the trial's
actor is killed and the controller dies with it, ungracefully: its placement group is
not removed. Ray keeps a placement group until its creator's *job* ends, so in a sweep
(one job) the stopped trials' CPUs stay reserved, and later trials can wait for CPUs
that never come back (ray-project/ray#54305). Ray's answer, a detached
``PlacementGroupCleaner`` per run, asks the state API whether the controller lives; the
state API is served by the dashboard, which kdflow's local Ray does not start, so there
the cleaner never acts (and polls forever).

`ReapOrphans` (a Tune callback in the sweep's driver) does the cleaner's job from the
GCS tables instead, at most every ``every_s`` seconds and after every trial: a placement
group of this job (the sweep's; on a shared cluster other jobs' groups are never
touched) that is not detached, not removed, and whose creator is an actor that is dead
is removed. A group made by the driver (Tune's own per-trial groups) has no creator actor and
is never touched.

A stopped trial's controller should die with the trial (its owner), but in CI a sweep
twice ended with one controller alive, its owner dead, holding its worker group's 0.25-CPU
placement group (cause in Ray not found; not reproduced outside the full test session).
The same pass ends such a controller like a cleaner (below), and its group is then an
orphan.

Each stopped run's ``PlacementGroupCleaner`` is detached, so it outlives the job too, and
it polls the absent state API once a second forever: on this 2-core machine each took
1.3-2.6% of a core and holds a Python process, on a long-lived cluster for good. The
same pass stops it: a ``PlacementGroupCleaner`` (or ``TrainController``) of this job whose
owner (the Train controller; the trial) is dead and which runs on the driver's node is sent
SIGKILL by its pid, after the pid's command line is checked to still be that actor's
(``ray::PlacementGroupCleaner``, ``ray::TrainController``).
The driver holds no handle to it, and Ray 2.60 has no kill by actor id without one (asking
the core worker for a handle by id aborted the process). A cleaner on another node (the
driver not on the head) is left running.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ray.tune import Callback


def _group_data(pg_hex: str) -> Any:
    """The GCS row (``PlacementGroupTableData``) of one placement group."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    raw = state._global_state_accessor.get_placement_group_info(
        ray.PlacementGroupID(bytes.fromhex(pg_hex)))
    return gcs_pb2.PlacementGroupTableData.FromString(raw) if raw else None


def orphan_groups() -> list[str]:
    """Ids of this job's placement groups whose creator actor is dead (module docstring)."""
    import ray
    from ray.util import placement_group_table

    job = ray.get_runtime_context().get_job_id()
    out = []
    for pg_hex, row in placement_group_table().items():
        if row.get("state") == "REMOVED":
            continue
        data = _group_data(pg_hex)
        if data is None or data.is_detached or not data.creator_actor_dead:
            continue
        if data.creator_job_id.hex() != job:  # another job's group
            continue
        if ray.ActorID(data.creator_actor_id).is_nil():  # made by a driver, not an actor
            continue
        out.append(pg_hex)
    return out


CLEANER = "PlacementGroupCleaner"
CONTROLLER = "TrainController"
ORPHAN_CLASSES = (CLEANER, CONTROLLER)


def _actor_rows() -> list[Any]:
    """This job's rows of the GCS actor table (``ActorTableData``)."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    job = ray.JobID(bytes.fromhex(ray.get_runtime_context().get_job_id()))
    return [gcs_pb2.ActorTableData.FromString(raw)
            for raw in state._global_state_accessor.get_actor_table(job, None)]


def orphan_actors() -> list[tuple[int, bool]]:
    """``(pid, on this node)`` of this job's live ``PlacementGroupCleaner`` actors whose
    owner (the run's Train controller) is dead, and of live Train controllers whose owner
    (the stopped trial) is dead."""
    import ray
    from ray.core.generated import gcs_pb2

    rows = _actor_rows()
    dead = {r.address.worker_id for r in rows if r.state == gcs_pb2.ActorTableData.DEAD}
    node = bytes.fromhex(ray.get_runtime_context().get_node_id())
    return [(r.pid, r.address.node_id == node) for r in rows
            if r.class_name.rsplit(".", 1)[-1] in ORPHAN_CLASSES
            and r.state == gcs_pb2.ActorTableData.ALIVE and r.owner_address.worker_id in dead]


def _kill_orphan(pid: int) -> bool:
    """SIGKILL ``pid`` if it is still a ``ray::`` process of one of `ORPHAN_CLASSES`."""
    import os
    import signal
    from pathlib import Path

    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].split(b" ")[0]
        if not (title.startswith(b"ray::") and any(c.encode() in title for c in ORPHAN_CLASSES)):
            return False
        os.kill(pid, signal.SIGKILL)
    except OSError:  # gone already, or not ours to signal
        return False
    return True


def _until_dead(pids: set[int], seconds: float = 5.0) -> None:
    """Wait (at most ``seconds``) until the GCS lists none of ``pids`` as a live actor."""
    from ray.core.generated import gcs_pb2

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(
            r.pid in pids and r.state == gcs_pb2.ActorTableData.ALIVE for r in _actor_rows()):
        time.sleep(0.1)


def reap() -> int:
    """Stop the orphaned cleaners and controllers on this node, then remove the orphaned
    placement groups (a killed controller's among them); how many groups were removed."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for _ in range(3):  # a killed controller's cleaner is an orphan on the next round
        killed = {pid for pid, here in orphan_actors() if here and _kill_orphan(pid)}
        if not killed:
            break
        _until_dead(killed)  # their groups and cleaners are orphans once the GCS saw them die
    groups = orphan_groups()
    for pg_hex in groups:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_hex))))
    return len(groups)


class ReapOrphans(Callback):
    """Runs `reap` after every trial and at most every ``every_s`` s while trials run."""

    def __init__(self, every_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every, self.clock, self.last = every_s, clock, clock()

    def _reap(self, force: bool) -> None:
        now = self.clock()
        if force or now - self.last >= self.every:
            self.last = now
            reap()

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        self._reap(force=False)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._reap(force=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._reap(force=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._reap(force=True)
