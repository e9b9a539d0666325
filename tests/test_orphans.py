"""kd.tune.orphans: a placement group whose creator actor died is removed (its CPUs come
back); one made by the driver, or by a live actor, is left alone; a cleaner or a Train
controller whose owner died is stopped. A real Ray session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from kd.tune.orphans import orphan_actors, orphan_groups, reap
from tests.conftest import free_cpus_after


@pytest.mark.usefixtures("ray_session")
def test_a_dead_actors_placement_group_is_removed_others_are_kept() -> None:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    @ray.remote(num_cpus=0)
    class Maker:
        def make(self) -> str:
            pg = placement_group([{"CPU": 0.25}])
            ray.get(pg.ready())
            return pg.id.hex()

    total = ray.cluster_resources()["CPU"]
    mine = placement_group([{"CPU": 0.25}])  # the driver's own: never an orphan
    ray.get(mine.ready())
    doomed, alive = Maker.remote(), Maker.remote()
    dead_pg, live_pg = ray.get(doomed.make.remote()), ray.get(alive.make.remote())
    try:
        assert orphan_groups() == []
        ray.kill(doomed)
        free, _ = free_cpus_after(3)
        assert free == total - 0.75  # Ray itself keeps the dead actor's group reserved
        assert orphan_groups() == [dead_pg]
        assert reap() == 1
        free, _ = free_cpus_after(10)
        assert free == total - 0.5, "the dead actor's 0.25 CPU came back, the others' did not"
        table = ray.util.placement_group_table()
        assert table[dead_pg]["state"] == "REMOVED"
        assert table[live_pg]["state"] == "CREATED" and table[mine.id.hex()]["state"] == "CREATED"
    finally:
        ray.kill(alive)
        remove_placement_group(mine)
        reap()


def _until(cond: Callable[[], bool], seconds: float = 10) -> bool:
    """Polls ``cond`` until it holds or ``seconds`` pass; its last value."""
    import time

    deadline = time.time() + seconds
    while not cond() and time.time() < deadline:
        time.sleep(0.2)
    return cond()


@pytest.mark.usefixtures("ray_session")
def test_a_dead_controllers_cleaner_is_stopped_a_live_ones_is_kept() -> None:
    """Ray Train's detached cleaner of a run whose controller died would poll forever;
    `reap` ends its process. A live controller's cleaner keeps running."""

    import ray

    @ray.remote(num_cpus=0)
    class PlacementGroupCleaner:  # named as Ray Train's, detached as Ray Train makes it
        def pid(self) -> int:
            import os

            return os.getpid()

    @ray.remote(num_cpus=0)
    class Controller:
        def start(self) -> int:
            self.cleaner = PlacementGroupCleaner.options(lifetime="detached").remote()
            return ray.get(self.cleaner.pid.remote())

    doomed, alive = Controller.remote(), Controller.remote()
    dead_pid, live_pid = ray.get(doomed.start.remote()), ray.get(alive.start.remote())
    try:
        assert orphan_actors() == []
        ray.kill(doomed)
        assert _until(lambda: orphan_actors() == [(dead_pid, True)]), orphan_actors()
        reap()
        assert _until(lambda: not Path(f"/proc/{dead_pid}").exists()), "the orphan lives"
        assert Path(f"/proc/{live_pid}").exists(), "a live controller's cleaner was stopped"
        assert _until(lambda: orphan_actors() == []), "Ray still lists it alive"
    finally:
        ray.kill(alive)
        _until(lambda: bool(orphan_actors()))
        reap()


@pytest.mark.usefixtures("ray_session")
def test_a_controller_that_outlived_its_trial_is_stopped_and_its_group_removed() -> None:
    """A Train controller alive after its owner (the stopped trial) died, holding its worker
    group's placement group (seen in CI): `reap` ends it and the group's CPUs come back.
    Detached here so that it outlives its owner, as the one in CI did."""
    import ray
    from ray.util.placement_group import placement_group

    @ray.remote(num_cpus=0)
    class TrainController:  # named as Ray Train's
        def start(self) -> tuple[int, str]:
            import os

            self.pg = placement_group([{"CPU": 0.25}])
            ray.get(self.pg.ready())
            return os.getpid(), self.pg.id.hex()

    @ray.remote(num_cpus=0)
    class Trial:
        def run(self) -> tuple[int, str]:
            self.controller = TrainController.options(lifetime="detached").remote()
            return ray.get(self.controller.start.remote())

    total = ray.cluster_resources()["CPU"]
    trial = Trial.remote()
    pid, pg = ray.get(trial.run.remote())
    try:
        assert orphan_actors() == [] and orphan_groups() == []
        ray.kill(trial)
        assert _until(lambda: orphan_actors() == [(pid, True)]), orphan_actors()
        assert orphan_groups() == []  # its creator, the controller, still lives
        reap()  # the group goes with it: by `reap` or, for a detached creator as here, by Ray
        assert _until(lambda: not Path(f"/proc/{pid}").exists()), "the orphan lives"
        assert _until(lambda: ray.util.placement_group_table()[pg]["state"] == "REMOVED")
        free, _ = free_cpus_after(10)
        assert free == total
    finally:
        reap()
