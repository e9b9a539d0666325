"""How many torch threads a Ray Train worker uses: the cores it is given.

Ray starts a worker that reserves ``n`` CPUs with ``OMP_NUM_THREADS=n`` (1 by
default), and torch then runs its intra-op pool on one thread: a one-worker run on a
laptop used one core of the machine. `set_worker_threads` runs first in every worker:

- ``scaling.resources_per_worker.CPU`` set: that many threads (the reservation);
- otherwise: the worker's node's CPUs shared by the workers on that node
  (``node CPUs // local world size``, at least the reserved CPUs), so the default
  one-worker run uses every core of the machine, and two workers on one node use half
  each.

The default reservation stays Ray's 1 CPU on purpose: a worker that reserves every CPU
of its node leaves Ray Data's read / map tasks, which each need a CPU, unschedulable,
and streaming ingest then waits forever (tried: an actor holding both CPUs of a 2-core
node never receives a batch of ``ray.data.range(...).map_batches(...)``). The threads
are set from the node's CPUs instead, which is what the work may use on that node.
"""

from __future__ import annotations

from typing import Any

import torch


def worker_threads(user_cpus: float | None, reserved_cpus: float | None,
                   node_cpus: float | None, local_world: int) -> int:
    """The torch thread count for one worker (see the module docstring); at least 1."""
    if user_cpus:
        return max(1, int(user_cpus))
    reserved = int(reserved_cpus or 1)
    if not node_cpus:
        return max(1, reserved)
    return max(1, reserved, int(node_cpus) // max(1, local_world))


def _node_cpus() -> float | None:
    """The CPU total Ray declares for the node this process runs on."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            return float(node.get("Resources", {}).get("CPU", 0.0)) or None
    return None


def actor_threads(actors: int) -> int:
    """Torch threads for one of ``actors`` CPU actors of a pool (the teacher cache's): the
    node's CPUs shared by the pool (`worker_threads` with the actor's reservation)."""
    import ray

    reserved = ray.get_runtime_context().get_assigned_resources().get("CPU")
    return worker_threads(None, reserved, _node_cpus(), actors)


def set_worker_threads(resources_per_worker: dict[str, Any]) -> int:
    """Set torch's intra-op threads inside a Ray Train worker; return the count.
    ``resources_per_worker`` is ``scaling.resources_per_worker`` as configured."""
    import ray
    import ray.train

    reserved = ray.get_runtime_context().get_assigned_resources().get("CPU")
    n = worker_threads(resources_per_worker.get("CPU"), reserved, _node_cpus(),
                       ray.train.get_context().get_local_world_size())
    torch.set_num_threads(n)
    return n
