"""Where batch `kd predict` writes: one job's parquet files and its ``_SUCCESS.json``.

Contract of an output folder / ``s3://`` prefix:

- A job writes ``part-<job>-<write uuid>-<task>.parquet`` files, then, only once all of
  them are written, ``_SUCCESS.json`` naming the model version, the row count and the
  files. Downstream readers wait for (or check) ``_SUCCESS.json``: without it the
  folder holds an interrupted job's partial output.
- A job refuses a prefix that already holds an earlier job's files (`check_fresh`), so
  two jobs never mix their rows. ``--overwrite`` first deletes those files, and only
  those (``part-*.parquet`` and ``_SUCCESS.json``; anything else is left alone): that is
  what makes a retried RayJob replace its failed attempt's rows instead of adding to
  them.
"""

from __future__ import annotations

import json
from typing import Any

from kd import storage
from kd.errors import InputError

SUCCESS = "_SUCCESS.json"


def _ours(base_name: str) -> bool:
    return base_name == SUCCESS or (base_name.startswith("part-")
                                    and base_name.endswith(".parquet"))


def _listing(output: str, endpoint: str | None) -> tuple[Any, list[Any]]:
    import pyarrow.fs as pafs

    fs, path = storage.arrow_fs(output, endpoint)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return fs, [i for i in infos if i.type == pafs.FileType.File]


def check_fresh(output: str, endpoint: str | None, overwrite: bool) -> int:
    """Make ``output`` ready for a new job. Returns how many earlier files were deleted
    (``overwrite``); without ``overwrite``, earlier output is a one-line `InputError`."""
    fs, infos = _listing(output, endpoint)
    earlier = [i for i in infos if _ours(i.base_name)]
    if not earlier:
        return 0
    if not overwrite:
        raise InputError(f"--output {output}: already holds {len(earlier)} files of an earlier "
                         f"kd predict (e.g. {earlier[0].base_name}); pass --overwrite to "
                         "replace them, or choose an empty prefix")
    for info in earlier:
        fs.delete_file(info.path)
    return len(earlier)


def filenames(job: str) -> Any:
    """Ray Data's filename provider for ``job``'s parts (Ray wants its write uuid in them)."""
    from ray.data.datasource import FilenameProvider

    class _Parts(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{job}-{write_uuid}-{task_index:06d}.parquet"

    return _Parts(file_format="parquet")


def written(output: str, job: str, endpoint: str | None) -> tuple[list[str], int]:
    """``job``'s output files and their row count (parquet footers only)."""
    import pyarrow.parquet as pq

    fs, infos = _listing(output, endpoint)
    mine = sorted(i.path for i in infos if i.base_name.startswith(f"part-{job}-"))
    rows = sum(pq.read_metadata(fs.open_input_file(p)).num_rows for p in mine)
    prefix = "s3://" if storage.is_s3(output) else ""
    return [prefix + p for p in mine], rows


def mark_done(output: str, endpoint: str | None, record: dict[str, Any]) -> None:
    """Write ``_SUCCESS.json`` (``record``: model, rows, inputs, files, job) last."""
    fs, path = storage.arrow_fs(output, endpoint)
    with fs.open_output_stream(f"{path}/{SUCCESS}") as f:
        f.write(json.dumps(record, indent=2).encode())
