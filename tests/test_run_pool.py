"""`kd.data.stream.run_pool`: a Ray Data actor pool that fails on bad input gives its
CPUs back before the one-line error is raised, in the session's 2-CPU Ray."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest

from kd.data.stream import run_pool
from kd.errors import InputError
from tests.conftest import free_cpus_after


def test_failed_pool_frees_its_cpus_before_the_error(ray_session: None, tmp_path: Path) -> None:
    """The actor has run batches when its pool fails (its handle sits in the failure's
    frames). Python's cyclic collector is off, as it may be for a long while in a real
    process: the CPUs come back only because `run_pool` released the pool. Without
    that, the next pool whose actor takes the last CPU waits forever for a read task."""
    import ray.data

    class FailsAtRow:
        """Passes batches through until it meets row ``bad`` (defined in the test: Ray
        pickles it by value)."""

        def __init__(self, bad: int) -> None:
            self.bad = bad

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if (batch["id"] >= self.bad).any():
                raise InputError(f"row {self.bad}: bad value")
            return batch

    ds = ray.data.range(2000, override_num_blocks=8).map_batches(
        FailsAtRow, fn_constructor_kwargs={"bad": 1500}, batch_size=100,
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
    gc.collect()
    gc.disable()
    try:
        with pytest.raises(InputError, match="^row 1500: bad value$"):
            run_pool(lambda: ds.write_parquet(str(tmp_path / "out")))
        free, total = free_cpus_after(8)
    finally:
        gc.enable()
    assert free == total, f"{free:g} of {total:g} CPUs free 8 s after the pool failed"


def test_other_failures_pass_through() -> None:
    """A failure that carries no InputError is raised as it came (Ray's own error)."""
    with pytest.raises(ZeroDivisionError):
        run_pool(lambda: 1 / 0)
    assert run_pool(lambda: 7) == 7
