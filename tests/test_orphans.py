"""kd.tune.orphans: a placement group whose creator actor died is removed (its CPUs come
back); one made by the driver, or by a live actor, is left alone. A real Ray session."""

from __future__ import annotations

import pytest

from kd.tune.orphans import orphan_groups, reap
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
