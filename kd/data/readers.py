"""Per-file block readers, run inside Ray Data read tasks (never in the driver).

Each reader takes one `FileEntry` (or a chunk of image files) and yields `Chunk`s of at
most ``rows`` rows: inputs ``x`` (float32, or int64 token ids), labels ``y`` (int64,
-1 = none), the key column's values (or None: the key is file + row) and the row
offset of the chunk inside its file. Column rules as in docs/data.md. With
``Columns.text`` set, the text column of a parquet / csv / jsonl file (or each line of
a txt file) is tokenized into ``x`` (`kd.data.text`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from kd.data.manifest import FileEntry
from kd.data.text import TextRows, TextSpec, parse_jsonl, table_texts, text_lines
from kd.errors import InputError

UNLABELED = -1


@dataclass
class Columns:
    """Which columns hold inputs, labels and the row key; the reshape, if any."""

    x: str = "x"
    y: str = "y"
    key: str | None = None
    shape: tuple[int, ...] | None = None
    image_size: int | None = None
    y_required: bool = False  # a label column named in the config must exist
    text: TextSpec | None = None  # tokenize this text column into x (kd.data.text)
    defer_text: bool = False  # leave texts in Chunk.pending (x None): the stream tokenizes


@dataclass
class Chunk:
    """Rows ``offset .. offset+len(y)`` of one file; ``rows``, when set, are the rows'
    own positions in the file (a text file's line indices: blank lines are skipped) for
    the file + row key; ``cut`` flags texts cut to ``data.text.max_length``; ``pending``
    holds the texts, and ``x`` is None, when ``Columns.defer_text`` is set."""

    x: np.ndarray | None
    y: np.ndarray
    keys: np.ndarray | None
    offset: int
    rows: np.ndarray | None = None
    cut: np.ndarray | None = None
    pending: TextRows | None = None


def _text_chunk(rows: TextRows, cols: Columns, y: np.ndarray, keys: np.ndarray | None, offset: int,
                lines: np.ndarray | None = None) -> Chunk:
    """A chunk of texts: tokenized now, or pending (``cols.defer_text``)."""
    if cols.defer_text:
        return Chunk(None, y, keys, offset, lines, pending=rows)
    ids, cut = rows.encode()
    return Chunk(ids, y, keys, offset, lines, cut)


def _labels(values: Any, n: int) -> np.ndarray:
    if values is None:
        return np.full(n, UNLABELED, dtype=np.int64)
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(values, pa.ChunkedArray | pa.Array):
        if not pa.types.is_integer(values.type) and not pa.types.is_floating(values.type):
            raise InputError(f"labels must be integers, got {values.type}")
        return pc.fill_null(values, UNLABELED).to_numpy(zero_copy_only=False).astype(np.int64)
    arr = np.asarray(values)
    if not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"labels must be integers, got {arr.dtype}")
    return arr.astype(np.int64)


def _finish(x: np.ndarray, cols: Columns, where: str) -> np.ndarray:
    if cols.shape is not None:
        try:
            x = x.reshape(len(x), *cols.shape)
        except ValueError:
            raise InputError(f"{where}: cannot reshape inputs {tuple(x.shape[1:])} to "
                             f"data.args.shape {list(cols.shape)}") from None
    if np.issubdtype(x.dtype, np.floating) or x.dtype == object:
        return x.astype(np.float32)
    return x.astype(np.int64)


def _list_to_numpy(col: Any, n: int) -> np.ndarray:
    """A (nested) list / fixed-size-list / tensor column -> ``[n, ...]`` array."""
    import pyarrow as pa

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if hasattr(arr, "to_numpy_ndarray"):  # Ray's tensor extension type
        return np.asarray(arr.to_numpy_ndarray())
    if isinstance(arr.type, pa.ExtensionType) and hasattr(arr, "to_numpy"):
        return np.asarray(arr.to_numpy())
    shape: list[int] = []
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or \
            pa.types.is_fixed_size_list(arr.type):
        first = len(arr[0].values) if len(arr) else 0
        shape.append(first)
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=False).reshape(n, *shape)


def _check_label_column(cols: Columns, names: list[str], where: str) -> None:
    """A label column the config names (``y_required``) must exist: a mistyped
    ``data.y_column`` would otherwise make every row unlabeled and, in a table without
    an ``x`` column, turn the real label column into an input feature."""
    if cols.y_required and cols.y not in names:
        raise InputError(f"{where}: no column {cols.y!r} (data.y_column); has "
                         f"{', '.join(names)}")


def _table_chunk(table: Any, cols: Columns, where: str, offset: int) -> Chunk:
    n = table.num_rows
    names = table.column_names
    _check_label_column(cols, names, where)
    y = _labels(table.column(cols.y) if cols.y in names else None, n)
    text = None
    if cols.text is not None:
        text = TextRows(table_texts(table, cols.text, where), np.arange(offset + 1, offset + n + 1),
                        where, "row", cols.text)
    elif cols.x in names:
        x = _list_to_numpy(table.column(cols.x), n)
    else:
        feats = [c for c in names if c not in (cols.y, cols.key)]
        if not feats:
            raise InputError(f"{where}: no feature columns besides {cols.y!r}")
        x = np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in feats], axis=1)
    keys = None
    if cols.key is not None:
        if cols.key not in names:
            raise InputError(f"{where}: no column {cols.key!r} (data.key_column); has "
                             f"{', '.join(names)}")
        keys = table.column(cols.key).to_numpy(zero_copy_only=False)
    if text is not None:
        return _text_chunk(text, cols, y, keys, offset)
    return Chunk(_finish(x, cols, where), y, keys, offset)


def read_parquet(entry: FileEntry, cols: Columns, rows: int, fs: Any) -> Iterator[Chunk]:
    """Row batches of one parquet file, read by pyarrow in ``rows``-row batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(fs.open_input_file(entry.fs_path))
    except Exception as e:
        raise InputError(f"{entry.uri}: not a readable parquet file ({e})") from None
    offset = 0
    for batch in f.iter_batches(batch_size=rows):
        yield _table_chunk(pa.Table.from_batches([batch]), cols, entry.uri, offset)
        offset += batch.num_rows


def read_csv(entry: FileEntry, cols: Columns, rows: int, fs: Any) -> Iterator[Chunk]:
    """One csv file (streamed by pyarrow's reader), ``rows`` at a time."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    offset = 0
    with fs.open_input_stream(entry.fs_path) as stream:
        reader = pcsv.open_csv(stream, read_options=pcsv.ReadOptions(block_size=1 << 22))
        for batch in reader:
            table = pa.Table.from_batches([batch])
            for start in range(0, table.num_rows, rows):
                part = table.slice(start, rows)
                yield _table_chunk(part, cols, entry.uri, offset)
                offset += part.num_rows


def _text_spec(cols: Columns, entry: FileEntry) -> TextSpec:
    if cols.text is None:
        raise InputError(f"{entry.uri}: a text file; set data.text (column, tokenizer, max_length) "
                         "to read it as text")
    return cols.text


def read_txt(entry: FileEntry, cols: Columns, rows: int, fs: Any) -> Iterator[Chunk]:
    """One text per non-blank line (unlabeled; key: file + line), tokenized."""
    spec = _text_spec(cols, entry)
    for lines, texts in text_lines(entry, fs, rows):
        yield _text_chunk(TextRows(texts, lines + 1, entry.uri, "line", spec), cols,
                          np.full(len(texts), UNLABELED, np.int64), None, int(lines[0]), lines)


def read_jsonl(entry: FileEntry, cols: Columns, rows: int, fs: Any) -> Iterator[Chunk]:
    """One JSON object per non-blank line: the text under ``data.text.column``, the
    label under ``data.y_column`` if present, the key under ``data.key_column`` if set
    (else file + line); tokenized."""
    spec = _text_spec(cols, entry)
    for lines, raw in text_lines(entry, fs, rows):
        texts, y, keys = parse_jsonl(raw, lines + 1, entry.uri, spec.column, cols.y,
                                     cols.y_required, cols.key, spec.setting)
        yield _text_chunk(TextRows(texts, lines + 1, entry.uri, "line", spec), cols, y, keys,
                          int(lines[0]), lines)


def _open(entry: FileEntry, fs: Any) -> Any:
    """A local path, or the S3 object's bytes (one shard / one image) in memory."""
    import io

    if not entry.uri.startswith("s3://"):
        return entry.uri
    with fs.open_input_file(entry.fs_path) as f:
        return io.BytesIO(f.read())


def read_npz(entry: FileEntry, cols: Columns, rows: int, fs: Any) -> Iterator[Chunk]:
    """One .npz shard (arrays ``x``, optional ``y`` and key; no pickles) or one .npy
    shard (inputs only, unlabeled; memory-mapped when local)."""
    path = _open(entry, fs)
    if entry.rel.lower().endswith(".npy"):
        x = np.load(path, mmap_mode="r" if isinstance(path, str) else None, allow_pickle=False)
        y, keys = np.full(len(x), UNLABELED, np.int64), None
    else:
        with np.load(path, allow_pickle=False) as z:
            if cols.x not in z:
                raise InputError(f"{entry.uri}: no array {cols.x!r} (has: {', '.join(z.files)})")
            if cols.key is not None and cols.key not in z:
                raise InputError(f"{entry.uri}: no array {cols.key!r} (data.key_column)")
            _check_label_column(cols, z.files, entry.uri)
            x = z[cols.x]
            y = _labels(z[cols.y] if cols.y in z else None, len(x))
            keys = z[cols.key] if cols.key is not None else None
    if len(y) != len(x):
        raise InputError(f"{entry.uri}: {len(x)} inputs but {len(y)} labels")
    for s in range(0, len(x), rows):
        yield Chunk(_finish(np.asarray(x[s:s + rows]), cols, entry.uri), y[s:s + rows],
                    None if keys is None else keys[s:s + rows], s)


def read_images(entries: list[FileEntry], classes: list[str], cols: Columns,
                fs: Any) -> Iterator[Chunk]:
    """A chunk of ``root/<class>/<image>`` files: RGB, channels first, pixels in [0, 1],
    resized to ``image_size`` when set; label = the class folder's sorted position."""
    from PIL import Image

    xs, ys = [], []
    for e in entries:
        img = Image.open(_open(e, fs)).convert("RGB")
        if cols.image_size:
            img = img.resize((cols.image_size, cols.image_size))
        xs.append(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0)
        ys.append(classes.index(e.rel.split("/")[-2]))
    if len({x.shape for x in xs}) > 1:
        raise InputError(f"{entries[0].uri}: images differ in size "
                         f"{sorted({x.shape for x in xs})}; set data.args.size")
    keys = np.asarray([e.rel for e in entries], dtype=object)
    yield Chunk(_finish(np.stack(xs), cols, entries[0].uri), np.asarray(ys, np.int64), keys, 0)


def read_local_file(path: str, cols: Columns | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All rows of one local .npz / .npy / .parquet / .csv file, in file order, read in
    this process: for `kd predict`'s input file, whose predictions are kept in memory
    and written in the same order anyway. Training data never comes through here."""
    import os

    import pyarrow.fs as pafs

    from kd.data.manifest import SUFFIX_FORMATS

    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    fmt = SUFFIX_FORMATS.get(os.path.splitext(path)[1].lower())
    reader = TABLE_READERS.get(fmt or "")
    if reader is None:
        raise InputError(f"{path}: expected one of {', '.join(SUFFIX_FORMATS)}")
    st = os.stat(path)
    entry = FileEntry(os.path.abspath(path), os.path.basename(path), st.st_size, str(st.st_mtime_ns))
    chunks = list(reader(entry, cols or Columns(), 65_536, pafs.LocalFileSystem()))
    if not chunks:
        raise InputError(f"{path}: no rows")
    return np.concatenate([c.x for c in chunks]), np.concatenate([c.y for c in chunks])


TABLE_READERS = {"parquet": read_parquet, "csv": read_csv, "npz": read_npz, "npy": read_npz,
                 "jsonl": read_jsonl, "txt": read_txt}
"""The reader of each tabular format (manifest ``fmt``; images have `read_images`)."""
