"""Streaming splits: a Ray Data datasource over a `Manifest` that adds the row key.

Every row gets ``idx``, a stable 63-bit hash of its key: the ``data.key_column`` value
when set, else (file path relative to the source root, row number in the file). The
split is a second hash, of ``idx`` and ``split.seed``, mapped into [0, 1) and compared
with the train / val / holdout fractions: fixed and deterministic, with no pass over
the data, and the same on every node. The loop's val filter (``idx % world == rank``)
and the teacher cache key on ``idx``.

A `Source` (manifest + split + label policy) is plain picklable data; `dataset` turns
it into a lazy Ray Dataset whose read tasks open one file each (a chunk of images)
and emit blocks of at most ``BLOCK_ROWS`` rows with columns ``x`` (tensor), ``y``
(int64, -1 = no label) and ``idx`` (int64); text is tokenized there too (int64 ids).
The read tasks do the reading; `read_blocks` reads one split in the calling
process, one block at a time, for what is small (a sample, a small holdout).
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np

from kd.data.manifest import Manifest, check_unchanged
from kd.data.readers import TABLE_READERS, Chunk, Columns, read_images
from kd.errors import InputError

SPLITS = ("train", "val", "holdout")
T = TypeVar("T")
BLOCK_ROWS = 4096
IMAGES_PER_TASK = 256
MASK63 = np.uint64((1 << 63) - 1)

DATA_TASK_CPUS_ENV = "KD_DATA_TASK_CPUS"


def data_task_cpus() -> float:
    """The CPU each Ray Data read / map task kdflow builds reserves: 0.25, or the
    ``KD_DATA_TASK_CPUS`` environment variable (read when the dataset is built).

    Reads and decoding are mostly I/O and copies, so a fraction lets them run beside
    Train workers that hold whole CPUs. A Tune trial sets 0 in its own process: there
    the trials' Train workers hold the CPUs by design, and Ray Data's autoscaling
    coordinator splits the leftover between concurrent datasets by integer division
    (two trials x 0.5-CPU workers on 2 cores left each dataset 0 CPUs: "Cluster
    resources are not enough to run any task", a hang). 0-CPU tasks are bounded by Ray
    Data's object-store backpressure instead."""
    import os

    return float(os.environ.get(DATA_TASK_CPUS_ENV, "0.25"))


def splitmix64(v: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    z = v.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def key_idx(keys: np.ndarray | None, file_rel: str, offset: int, n: int, salt: str = "",
            rows: np.ndarray | None = None) -> np.ndarray:
    """``idx`` (int64 >= 0) of ``n`` rows: from their key values, or from file + row
    (the row numbers ``offset .. offset+n``, or ``rows`` when given: a text file's line
    indices)."""
    with np.errstate(over="ignore"):
        if keys is None:
            rows = (np.arange(offset, offset + n, dtype=np.uint64) if rows is None
                    else np.asarray(rows).astype(np.uint64))
            h = splitmix64(rows + np.uint64(_hash64(f"{salt}{file_rel}")))
        elif np.issubdtype(np.asarray(keys).dtype, np.integer):
            h = splitmix64(np.asarray(keys).astype(np.int64).view(np.uint64)
                           ^ np.uint64(_hash64(salt)))
        else:
            h = np.fromiter((_hash64(f"{salt}{k}") for k in keys), np.uint64, count=n)
    return (h & MASK63).astype(np.int64)


def unit(idx: np.ndarray, seed: int, stream: int = 0) -> np.ndarray:
    """A uniform number in [0, 1) per row, fixed by ``idx``, ``seed`` and ``stream``."""
    with np.errstate(over="ignore"):
        h = splitmix64(idx.astype(np.uint64) ^ np.uint64(_hash64(f"{seed}/{stream}")))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass(frozen=True)
class Source:
    """A manifest and how its rows become one split's rows.

    ``split`` is ``train``/``val``/``holdout``, or ``all`` (every row, with a ``split``
    column 0/1/2: the profile reads this); ``fractions`` and ``seed`` from
    ``data.split``; ``labels`` ``all``/``none`` and ``labeled_fraction`` mask train
    labels; ``salt`` keeps a transfer set's keys apart from the main set's."""

    manifest: Manifest
    cols: Columns
    split: str = "all"
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    seed: int = 0
    labels: str = "all"
    labeled_fraction: float | None = None
    unlabeled: bool = False
    salt: str = ""
    fs: Any = None  # the pyarrow filesystem the read tasks use (built in the driver)

    def with_split(self, split: str) -> Source:
        """The same source, one split of it."""
        return replace(self, split=split)


def split_of(idx: np.ndarray, fractions: tuple[float, float, float], seed: int) -> np.ndarray:
    """0 (train), 1 (val) or 2 (holdout) per row, by `unit` against the fractions."""
    u = unit(idx, seed)
    return (u >= fractions[0]).astype(np.int8) + (u >= fractions[0] + fractions[1]).astype(np.int8)


def to_block(src: Source, chunk: Chunk, file_rel: str) -> Any:
    """One chunk -> the arrow block of this source's split (labels masked as set).
    Pending texts are tokenized here, only the split's rows (the split is known from
    the key before any token is made); split ``all`` adds ``cut`` (texts cut to
    ``max_length``) for the profile."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    n = len(chunk.y)
    idx = key_idx(chunk.keys, file_rel, chunk.offset, n, src.salt, chunk.rows)
    y = np.full(n, -1, np.int64) if src.unlabeled else chunk.y
    part = split_of(idx, src.fractions, src.seed)
    train = part == 0
    if src.labels == "none":
        y = np.where(train, -1, y)
    elif src.labeled_fraction is not None and src.labeled_fraction < 1:
        y = np.where(train & (unit(idx, src.seed, 1) >= src.labeled_fraction), -1, y)
    cols: dict[str, Any] = {"y": y, "idx": idx}
    keep = None
    if src.split == "all":
        cols["split"] = part
    elif src.split != "train" or not src.unlabeled:
        keep = part == SPLITS.index(src.split)
        cols = {k: v[keep] for k, v in cols.items()}
    cut = chunk.cut
    if chunk.pending is not None:
        x, cut = chunk.pending.encode(keep)
    else:
        assert chunk.x is not None
        x = chunk.x if keep is None else chunk.x[keep]
    if src.split == "all" and cut is not None:  # texts cut to max_length: counted by the profile
        cols["cut"] = cut
    x = np.ascontiguousarray(x)
    out = {"x": ArrowTensorArray.from_numpy(x) if len(x) else pa.array([], pa.null())}
    out.update({k: pa.array(v) for k, v in cols.items()})
    return pa.table(out)


def _read_file(src: Source, files: list[Any]) -> Iterator[Any]:
    m = src.manifest
    fs = src.fs
    if fs is None:
        import pyarrow.fs as pafs

        fs = pafs.LocalFileSystem()
    for f in files:
        check_unchanged(f, fs)
    if m.fmt == "imagefolder":
        for c in read_images(files, m.classes, src.cols, fs):
            yield to_block(src, c, "")  # an image's key is its path under the root
        return
    reader = TABLE_READERS[m.fmt]
    cols = replace(src.cols, defer_text=True) if src.cols.text is not None else src.cols
    for c in reader(files[0], cols, BLOCK_ROWS, fs):
        block = to_block(src, c, files[0].rel)
        if block.num_rows:
            yield block


def _tasks(src: Source) -> list[list[Any]]:
    files = src.manifest.files
    if src.manifest.fmt == "imagefolder":
        return [files[i:i + IMAGES_PER_TASK] for i in range(0, len(files), IMAGES_PER_TASK)]
    return [[f] for f in files]


def read_blocks(src: Source) -> Iterator[Any]:
    """Every non-empty block of ``src``'s split, read in this process file by file in
    manifest order: one block (at most ``BLOCK_ROWS`` rows) in memory at a time, no Ray
    Data execution and no object-store pages."""
    for files in _tasks(src):
        for block in _read_file(src, files):
            if block.num_rows:
                yield block


def block_arrays(block: Any) -> dict[str, np.ndarray]:
    """An arrow block's ``x``, ``y`` and ``idx`` as numpy arrays."""
    return {"x": np.asarray(block.column("x").combine_chunks().to_numpy_ndarray()),
            "y": block.column("y").to_numpy(), "idx": block.column("idx").to_numpy()}


def read_head(src: Source, n: int) -> Iterator[dict[str, np.ndarray]]:
    """The first ``n`` rows of ``src``'s split as numpy columns (`read_blocks`); it stops
    once ``n`` rows are read (bounded memory, no Ray Data execution: a sample for a shape
    or a latency probe costs a file read, not a task start)."""
    got = 0
    for block in read_blocks(src):
        part = block.slice(0, n - got)
        got += part.num_rows
        yield block_arrays(part)
        if got >= n:
            return


def dataset(src: Source) -> Any:
    """The lazy Ray Dataset of ``src`` (one read task per file / image chunk)."""
    import ray.data
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class _KeyedFiles(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return src.manifest.total_bytes

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            return [ReadTask(lambda files=files: _read_file(src, files),
                             BlockMetadata(num_rows=None, size_bytes=sum(f.size for f in files),
                                           input_files=[f.uri for f in files], exec_stats=None))
                    for files in _tasks(src)]

    return ray.data.read_datasource(_KeyedFiles(), override_num_blocks=len(_tasks(src)),
                                    num_cpus=data_task_cpus())


def find_input_error(err: BaseException) -> InputError | None:
    """The `InputError` a Ray task raised, found in the chain Ray wraps it in (task
    errors), or in the worker traceback text Ray Data's ``UserCodeException`` carries;
    None when there is none."""
    import re

    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, InputError) and "\n" not in str(e):
            return InputError(str(e))
        found = re.findall(r"InputError: (.+)", str(e))
        if found:
            return InputError(found[-1].strip())
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None


def input_errors(it: Iterator[Any]) -> Iterator[Any]:
    """Iterate ``it``; a failure that carries an `InputError` is re-raised as that one
    line (exit 2), anything else as it came."""
    try:
        yield from it
    except Exception as e:
        found = find_input_error(e)
        if found is None:
            raise
        raise found from None


def run_pool(execute: Callable[[], T]) -> T:
    """Run ``execute``, a Ray Data execution that uses an actor pool (``map_batches``
    with ``ActorPoolStrategy``), and return its result. A failure that carries an
    `InputError` is raised as that one line *after* the pool's actors are released;
    any other failure is raised as it came.

    Why: Ray Data ends a finished pool by dropping its references to the actors, and Ray
    ends an actor once no handle to it is left. After a failure, frames kept alive by
    the exception's reference cycles still hold the handles, so the actors, and the
    CPUs they reserve, live on until Python's cyclic collector runs. In a long-lived
    process (a sweep driver, a notebook, a test session) the next dataset whose actor
    takes the last CPU then never gets a CPU for its read tasks, and waits forever
    (tests/test_run_pool.py: 1 of 2 CPUs stays reserved without the collection). So the
    exception is dropped and ``gc.collect()`` runs before the one-line error is raised.
    """
    found: InputError | None = None
    try:
        return execute()
    except Exception as e:
        found = find_input_error(e)
        if found is None:
            raise
    gc.collect()  # the failure's cycles, and with them the pool's actor handles
    raise found
