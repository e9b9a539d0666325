"""A folder of parquet shards that kdflow wrote itself (the teacher cache) as a lazy
Ray Dataset: the driver lists the folder once; each read task reads one shard whole,
in batches of ``BATCH_ROWS``, and reserves `data_task_cpus` CPUs.

Why not ``ray.data.read_parquet``: its file-listing step runs as Ray tasks that reserve
a whole CPU and take no ``num_cpus``, so inside Tune trials, whose Train workers hold
the CPUs, the listing never starts and the trial hangs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from kd.data.stream import data_task_cpus
from kd.errors import InputError

BATCH_ROWS = 8192


def _read_shard(fs: Any, path: str) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(fs.open_input_file(path))
    except Exception as e:  # a damaged shard names itself
        raise InputError(f"{path}: not a readable parquet shard ({e})") from None
    for batch in f.iter_batches(batch_size=BATCH_ROWS):
        yield pa.Table.from_batches([batch])


def list_shards(fs: Any, path: str) -> list[tuple[str, int]]:
    """``(path, size)`` of every ``*.parquet`` file directly under ``path``, sorted."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted((i.path, i.size) for i in infos
                  if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def shard_dataset(fs: Any, path: str) -> Any:
    """The rows of every parquet shard under ``path``, one read task per shard."""
    import ray.data
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    shards = list_shards(fs, path)
    if not shards:
        raise InputError(f"{path}: no parquet shards")

    class _Shards(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return sum(size for _, size in shards)

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            return [ReadTask(lambda p=p: _read_shard(fs, p),
                             BlockMetadata(num_rows=None, size_bytes=size, input_files=[p],
                                           exec_stats=None))
                    for p, size in shards]

    return ray.data.read_datasource(_Shards(), override_num_blocks=len(shards),
                                    num_cpus=data_task_cpus())
