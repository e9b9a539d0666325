"""The read side of batch `kd predict`: which files, which key, one Ray Data read task per file.

Inputs are listed by `kd.data.manifest.build_manifest` (local file / folder / glob or
``s3://`` object / prefix / glob; several ``--input`` values join), so S3 goes through the
same endpoint settings and refreshing credentials as training data
(`kd.storage.arrow_fs`). Each read task opens one file with kdflow's own readers
(`kd.data.readers`: parquet / csv / npz / npy), checks that the file is still the one
listed (`kd.data.manifest.check_unchanged`) and that its rows have the model's width,
and emits blocks of at most ``BLOCK_ROWS`` rows with the row keys:

- ``file`` (the file's URI) and ``row`` (its row number in the file; in a .txt / .jsonl
  file the 0-based line index, blank lines skipped), always;
- the ``--key`` column's values under their own name, when there is a key column
  (``--key``, else a column named ``id`` when the parquet schema has one);
- ``idx``: kdflow's 63-bit row key (`kd.data.stream.key_idx`: of the key value, else of
  file + row), the same number training's split and teacher cache use for that row;
- ``x``: the flattened inputs (float32, or int64 token ids); for a text embedding model
  (``cols.text`` set, deferred) ``text`` instead: the texts, checked non-blank here and
  tokenized by the model's own tokenizer in the predictor actor.

Nothing is read in the driver except `check_head`'s first few rows of the first file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from kd.data.manifest import FileEntry, Manifest, build_manifest, check_unchanged
from kd.data.readers import TABLE_READERS as READERS
from kd.data.readers import Columns
from kd.data.stream import BLOCK_ROWS, data_task_cpus, key_idx
from kd.errors import InputError

AUTO_KEY = "id"  # a parquet column of this name is the row key when --key is not given
KEY_COLUMNS = ("file", "row", "idx")
OUTPUT_COLUMNS = ("pred", "label", "text", "embedding")  # besides p0..p{C-1}


@dataclass(frozen=True)
class FileTask:
    """One input file: its manifest entry, format, and the pyarrow filesystem to open it."""

    entry: FileEntry
    fmt: str
    fs: Any


@dataclass(frozen=True)
class ReadPlan:
    """Everything a read task needs (plain, picklable data): the files, the columns
    (``cols.key`` = the key column or None; ``cols.text``: texts, not numbers) and the
    model's flat input width (0 for texts)."""

    files: list[FileTask]
    cols: Columns
    width: int

    @property
    def total_bytes(self) -> int:
        """Sum of the input files' sizes."""
        return sum(t.entry.size for t in self.files)


def list_inputs(inputs: list[str], endpoint: str | None = None) -> list[FileTask]:
    """The files behind every ``--input`` value, in order; an input that matches no
    file, or images, is an `InputError` naming it."""
    from kd import storage

    tasks: list[FileTask] = []
    for source in inputs:
        try:
            m: Manifest = build_manifest(source, "auto", endpoint)
        except InputError as e:
            raise InputError(f"--input {e}") from None
        if m.fmt not in READERS:
            raise InputError(f"--input {source}: {m.fmt} is not supported by batch predict "
                             f"(expected {', '.join(sorted(READERS))} files)")
        fs = storage.arrow_fs(source, endpoint)[0]
        tasks += [FileTask(e, m.fmt, fs) for e in m.files]
    return tasks


def key_column(first: FileTask, key: str | None) -> str | None:
    """The row-key column: ``key`` when given, else ``id`` when the first parquet file's
    schema has it, else None (the key is file + row). A given ``key`` must not clash with
    an output column, and must be in the first parquet file (npz / csv: the read checks)."""
    if key is not None and (key in (*KEY_COLUMNS, *OUTPUT_COLUMNS)
                            or (key.startswith("p") and key[1:].isdigit())):
        raise InputError(f"--key {key}: clashes with an output column "
                         f"({', '.join(KEY_COLUMNS + OUTPUT_COLUMNS)}, p0..)")
    if key is not None and first.fmt == "txt":
        raise InputError(f"--key {key}: a .txt file has no columns (its rows are keyed by "
                         "file + line); give .jsonl / .parquet / .csv to key by a column")
    if first.fmt != "parquet":
        return key
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(first.entry.fs_path, filesystem=first.fs).names
    except Exception as e:
        raise InputError(f"{first.entry.uri}: not a readable parquet file ({e})") from None
    if key is not None and key not in names:
        raise InputError(f"--key {key}: no such column in {first.entry.uri} (has "
                         f"{', '.join(names)})")
    return key if key is not None else (AUTO_KEY if AUTO_KEY in names else None)


def _flat(x: np.ndarray, width: int, where: str) -> np.ndarray:
    flat = x.reshape(len(x), -1)
    if flat.shape[1] != width:
        raise InputError(f"{where}: rows have {flat.shape[1]} values but the model takes "
                         f"{width}")
    return flat


def check_head(plan: ReadPlan, rows: int = 8) -> None:
    """Read the first ``rows`` rows of the first file in this process: a missing key
    column or a wrong row width fails here, in seconds, before any Ray task starts."""
    first = plan.files[0]
    for chunk in READERS[first.fmt](first.entry, plan.cols, rows, first.fs):
        if chunk.pending is not None:
            chunk.pending.check()
        else:
            _flat(chunk.x, plan.width, first.entry.uri)
        return
    raise InputError(f"{first.entry.uri}: no rows")


def _blocks(plan: ReadPlan, task: FileTask) -> Iterator[Any]:
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    check_unchanged(task.entry, task.fs)
    e = task.entry
    for c in READERS[task.fmt](e, plan.cols, BLOCK_ROWS, task.fs):
        n = len(c.y)
        if not n:
            continue
        out: dict[str, Any] = {}
        if plan.cols.key is not None:
            out[plan.cols.key] = pa.array(c.keys)
        out["file"] = pa.array([e.uri] * n, pa.string())
        rows = c.rows if c.rows is not None else np.arange(c.offset, c.offset + n, dtype=np.int64)
        out["row"] = pa.array(rows)
        out["idx"] = pa.array(key_idx(c.keys, e.rel, c.offset, n, rows=c.rows))
        if c.pending is not None:  # texts: the predictor tokenizes them
            c.pending.check()
            out["text"] = pa.array(c.pending.texts, pa.string())
        else:
            out["x"] = ArrowTensorArray.from_numpy(np.ascontiguousarray(_flat(c.x, plan.width, e.uri)))
        yield pa.table(out)


def dataset(plan: ReadPlan) -> Any:
    """The lazy Ray Dataset of ``plan``: one read task per file (`kd.data.stream`'s
    pattern), each reserving `data_task_cpus`."""
    import ray.data
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class _PredictFiles(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return plan.total_bytes

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            return [ReadTask(lambda t=t: _blocks(plan, t),
                             BlockMetadata(num_rows=None, size_bytes=t.entry.size,
                                           input_files=[t.entry.uri], exec_stats=None))
                    for t in plan.files]

    return ray.data.read_datasource(_PredictFiles(), override_num_blocks=len(plan.files),
                                    num_cpus=data_task_cpus())
