"""`Splits`: the three streamed splits of one experiment's data, plus its facts.

A `StreamSplit` is a `Source` (plain data) and its counts; ``dataset()`` gives the
lazy Ray Dataset, ``sample(n)`` reads at most ``n`` rows (a bounded `ArraySplit`) for
what needs a few real rows in the driver (the preflight batch, a latency probe), and
``batches(n)`` every row in batches: read in the calling process when the source is small
(`LOCAL_READ_BYTES`), else streamed by Ray Data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kd.data.base import ArraySplit
from kd.data.profile import SplitCounts
from kd.data.stream import Source, block_arrays, data_task_cpus, dataset, read_blocks, read_head

LOCAL_READ_BYTES = 32 << 20  # sources up to this size are read in the calling process


@dataclass
class StreamSplit:
    """One split of a source (and, for train, the transfer set's rows)."""

    sources: list[Source]
    counts: SplitCounts
    name: str = "train"
    maps: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)  # (callable class, kwargs)

    def __len__(self) -> int:
        return self.counts.rows

    @property
    def labeled(self) -> int:
        """How many rows carry a label."""
        return self.counts.labeled

    @property
    def top_label(self) -> int:
        """The largest label in the split, -1 when none."""
        return self.counts.top_label

    def dataset(self) -> Any:
        """The lazy Ray Dataset: columns ``x``, ``y``, ``idx`` (the union of the sources,
        then ``maps`` applied with ``map_batches`` in order)."""
        parts = [dataset(s) for s in self.sources]
        ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
        for fn, kwargs in self.maps:  # e.g. the teacher-balanced resampling (kd.train.semisup)
            ds = ds.map_batches(fn, fn_constructor_kwargs=kwargs, batch_size=1024,
                                batch_format="numpy", concurrency=1, num_cpus=data_task_cpus())
        return ds

    @property
    def source_bytes(self) -> int:
        """The bytes of the files this split is read from (all splits share them)."""
        return sum(s.manifest.total_bytes for s in self.sources)

    @property
    def read_here(self) -> bool:
        """True when `batches` reads in the calling process: no ``maps``, and the source
        files total at most `LOCAL_READ_BYTES`."""
        return not self.maps and self.source_bytes <= LOCAL_READ_BYTES

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Every row as numpy batches of at most ``batch_size`` rows (``x``, ``y``,
        ``idx``). When `read_here`, read in this process file by file
        (`kd.data.stream.read_blocks`: one block in memory, no Ray Data execution, no
        object-store pages mapped here); else streamed by Ray Data's read tasks."""
        if not self.read_here:
            yield from self.dataset().iter_batches(batch_size=batch_size, batch_format="numpy")
            return
        for block in self.local_blocks():
            cols = block_arrays(block)
            for i in range(0, block.num_rows, batch_size):
                yield {k: v[i:i + batch_size] for k, v in cols.items()}

    def local_blocks(self) -> Iterator[Any]:
        """The split's non-empty arrow blocks, read in this process source by source
        (`kd.data.stream.read_blocks`): the blocks Ray Data's read tasks would make."""
        for src in self.sources:
            yield from read_blocks(src)

    def sample(self, n: int) -> ArraySplit:
        """The first ``n`` rows (fewer if the split is smaller): read in this process
        (`kd.data.stream.read_head`), or through Ray Data when ``maps`` apply."""
        if n <= 0 or not len(self):
            return ArraySplit(np.zeros((0,)), np.zeros(0, np.int64))
        if not self.maps:
            parts = [b for s in self.sources for b in read_head(s, n)]
            batch = {k: np.concatenate([b[k] for b in parts])[:n] for k in ("x", "y", "idx")}
        else:
            batch = self.dataset().limit(n).take_batch(n, batch_format="numpy")
        return ArraySplit(np.array(batch["x"]), np.array(batch["y"], np.int64),
                          np.asarray(batch["idx"], np.int64))


STORE_SHARE = 0.2  # of the cluster's object store memory
STORE_CAP = 2 << 30  # bytes


def held_for_epochs(data: StreamSplit | Any, rows: int, row_bytes: int) -> Any:
    """``data`` (a `StreamSplit`, or a Ray Dataset such as the teacher cache's rows) held
    once in Ray's object store when its ``rows x row_bytes`` fit in `STORE_SHARE` of the
    cluster's object store memory (and `STORE_CAP`); else its lazy dataset, read from its
    files every epoch. The blocks live in the object store (spilled to disk under
    pressure); the driver keeps only their references.

    A split that is `StreamSplit.read_here` (no maps, files <= `LOCAL_READ_BYTES`) is read
    here block by block and its arrow blocks put in the store (``ray.data.from_blocks``,
    schema and row counts taken here): the blocks Ray Data's read tasks would make, without
    a task, so no Ray worker process has to start before the Train controller can.
    Measured (bench/fixed_cost.py): ``materialize()`` of digits' train and val took 1.8 s
    on a quiet day and 2.7 s on a slow one against a running head, most of it starting
    the read tasks' worker processes. Anything else is ``materialize()``d by Ray Data's
    tasks. Measured (bench/overhead.py, 2 cores): re-reading and re-splitting 3,000 32x32x3
    rows every epoch made kdflow's CE loop 0.73x a plain loop; the teacher cache's rows,
    read the same way but without the split, ran at 0.98x."""
    import ray
    import ray.data

    split = data if isinstance(data, StreamSplit) else None
    budget = min(STORE_SHARE * float(ray.cluster_resources().get("object_store_memory", 0)),
                 STORE_CAP)
    if rows * row_bytes <= budget and split is not None and split.read_here:
        blocks = list(split.local_blocks())
        if blocks:
            return ray.data.from_blocks(blocks)
    ds = data if split is None else split.dataset()
    return ds.materialize() if rows * row_bytes <= budget else ds


@dataclass
class Splits:
    """train / val / holdout streams plus what models need to know about the data.

    ``data_hash`` is the manifest's digest (files, sizes, versions, schema) with the
    split and label settings (and for text the text settings and tokenizer fingerprint);
    ``manifest`` is the JSON-able manifest (lineage). ``num_classes`` is 0 for unlabeled
    text (the caller sets the embedding width for ``task: embed``)."""

    train: StreamSplit
    val: StreamSplit
    holdout: StreamSplit
    num_classes: int
    input_shape: tuple[int, ...]
    data_hash: str
    input_dtype: str = "float32"
    manifest: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)  # by label; empty when unknown
    truncated: int = 0  # texts cut to data.text.max_length (data.text.truncation: warn)

    @property
    def integer_inputs(self) -> bool:
        """True for int64 inputs (token ids)."""
        return self.input_dtype == "int64"
