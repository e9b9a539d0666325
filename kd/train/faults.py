"""Fault injection for tests (``trainer.fail_at_step``)."""

from __future__ import annotations

import os
from typing import Any

from kd.train.checkpoint import run_location


def maybe_inject_fault(spec: dict[str, Any], global_step: int, rank: int, world: int) -> None:
    """Fault injection for tests: kill the last worker at ``trainer.fail_at_step``,
    once (a marker file in the run folder, local or S3, stops it on the retry)."""
    import pyarrow.fs as pafs

    at = spec["exp"]["trainer"]["fail_at_step"]
    if at is None or global_step != at or rank != world - 1:
        return
    fs, run_path = run_location(spec)
    marker = run_path + "/.fault-injected"
    if fs.get_file_info(marker).type != pafs.FileType.NotFound:
        return
    fs.create_dir(run_path, recursive=True)
    with fs.open_output_stream(marker) as f:
        f.write(str(global_step).encode())
    print(f"[kd] fault injection: killing worker rank {rank} at step {global_step}", flush=True)
    os._exit(1)

