"""Text rows: UTF-8 lines of ``.txt`` / ``.jsonl`` files, and tokenization into ids.

Runs inside the Ray Data read tasks (`kd.data.readers.read_txt` / ``read_jsonl`` and the
text column of parquet / csv); the driver only builds the `TextSpec` (`text_spec`),
which loads the tokenizer once so that a bad reference fails before any task.

A text becomes int64 ids ``[max_length]`` (special tokens included) right-padded with
the tokenizer's pad id (`kd.models.tokens.TextTokenizer.encode`). A longer text is cut
(``truncation: warn``; the rows are flagged and counted by the profile) or refused
(``truncation: error``: `InputError` naming the file and line / row). Line and row
numbers in messages are 1-based; a row key (file + line) uses the 0-based line index.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from kd.data.manifest import FileEntry
from kd.errors import InputError

READ_BYTES = 1 << 22  # bytes read from the file (or S3 object) per step
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class TextSpec:
    """What the read tasks need to tokenize: the text column (jsonl key, parquet / csv
    column), the tokenizer reference and its fingerprint (checked in each worker: the
    same ids on every node), ``max_length`` and ``truncation`` (``warn`` / ``error``)."""

    column: str
    tokenizer: str
    fingerprint: str
    max_length: int
    truncation: str = "warn"
    setting: str = "data.text.column"  # what messages name as the column's setting

    def digest_part(self) -> str:
        """The text settings in the data hash: a different tokenizer (by fingerprint, not
        path), column, length or truncation policy is different data."""
        return f"text={self.column}|{self.max_length}|{self.truncation}|{self.fingerprint}"


def text_spec(cfg: Any) -> TextSpec:
    """The `TextSpec` of ``data.text`` (a `kd.config.TextConfig`); loads the tokenizer
    here, in the driver, so a missing or unreadable one is one `InputError` before Ray."""
    from kd.models.tokens import load_tokenizer

    if not cfg.tokenizer:
        raise InputError("data.text.tokenizer: required (a model directory or installed package "
                         "with tokenizer.json; default: the teacher's args.path)")
    tok = load_tokenizer(cfg.tokenizer)
    return TextSpec(cfg.column, cfg.tokenizer, tok.fingerprint, cfg.max_length, cfg.truncation)


def tokenizer_for(spec: TextSpec) -> Any:
    """The spec's `TextTokenizer` in this process (cached by `load_tokenizer`); one whose
    fingerprint differs from the driver's is an `InputError`."""
    from kd.models.tokens import load_tokenizer

    tok = load_tokenizer(spec.tokenizer)
    if tok.fingerprint != spec.fingerprint:
        raise InputError(f"data.text.tokenizer {spec.tokenizer}: the tokenizer on this node "
                         f"(fingerprint {tok.fingerprint}) differs from the driver's ({spec.fingerprint})")
    return tok


def check_texts(texts: list[Any], spec: TextSpec, where: str, unit: str,
                numbers: np.ndarray) -> None:
    """Every text is a non-blank string; else an `InputError` naming ``where``, the 1-based
    ``unit`` ("line" / "row") number and the column's setting (``spec.setting``)."""
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            kind = type(t).__name__
            what = "empty text" if isinstance(t, str) else "null text" if t is None else \
                f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}, not text,"
            raise InputError(f"{where}: {unit} {int(numbers[i])}: {what} in {spec.column!r} "
                             f"({spec.setting}); expected a non-empty string")


def encode(texts: list[Any], spec: TextSpec, where: str, unit: str,
           numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int64 [N, max_length], cut bool [N])`` of ``texts``. ``numbers`` are the
    rows' 1-based line / row numbers (``unit``: "line" or "row") for the messages: an
    empty text (None, or blank after strip) is an `InputError`, and so is a cut text
    under ``truncation: error``."""
    check_texts(texts, spec, where, unit, numbers)
    ids, cut = tokenizer_for(spec).encode(texts, spec.max_length)
    if spec.truncation == "error" and cut.any():
        n = int(numbers[int(np.flatnonzero(cut)[0])])
        raise InputError(f"{where}: {unit} {n}: the text is longer than data.text.max_length "
                         f"{spec.max_length} tokens (data.text.truncation: error); raise "
                         "data.text.max_length or set data.text.truncation: warn to cut it")
    return ids, cut


@dataclass
class TextRows:
    """Texts read but not yet tokenized: the stream tokenizes only the rows of the split
    it reads (`kd.data.stream.to_block`); ``numbers`` (1-based ``unit`` "line" / "row"
    numbers) and ``where`` (the file) name a bad row."""

    texts: list[Any]
    numbers: np.ndarray
    where: str
    unit: str
    spec: TextSpec

    def check(self) -> None:
        """`check_texts` of all rows (the texts stay untokenized)."""
        check_texts(self.texts, self.spec, self.where, self.unit, self.numbers)

    def encode(self, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`encode` of all rows, or of the rows where ``keep`` (bool) is True."""
        if keep is None:
            return encode(self.texts, self.spec, self.where, self.unit, self.numbers)
        sel = np.flatnonzero(keep)
        return encode([self.texts[i] for i in sel], self.spec, self.where, self.unit, self.numbers[sel])


def _decode(data: bytes, entry: FileEntry, line: int, pos: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = line + data.count(b"\n", 0, e.start) + 1
        raise InputError(f"{entry.uri}: line {at} (byte {pos + e.start}): not UTF-8 ({e.reason}); "
                         "expected a UTF-8 text file") from None


def line_blocks(entry: FileEntry, fs: Any) -> Iterator[tuple[int, list[str]]]:
    """``(first line index, lines)`` of one file, read ``READ_BYTES`` at a time through
    the pyarrow filesystem ``fs`` and decoded as UTF-8 (a leading BOM and ``\\r`` line
    ends are dropped); non-UTF-8 bytes are an `InputError` naming the line and byte."""
    line, pos, rest = 0, 0, b""
    with fs.open_input_stream(entry.fs_path) as f:
        while True:
            buf = f.read(READ_BYTES)
            data = rest + buf
            if pos == 0 and data.startswith(BOM):
                data, pos = data[len(BOM):], len(BOM)
            cut = data.rfind(b"\n") + 1 if buf else len(data)
            whole, rest = data[:cut], data[cut:]
            if whole:
                lines = _decode(whole, entry, line, pos).split("\n")
                if lines and lines[-1] == "":
                    lines.pop()
                yield line, [s[:-1] if s.endswith("\r") else s for s in lines]
                line += len(lines)
                pos += len(whole)
            if not buf:
                return


def text_lines(entry: FileEntry, fs: Any, rows: int) -> Iterator[tuple[np.ndarray, list[str]]]:
    """``(line indices, lines)`` of the non-blank lines of one file, ``rows`` at a time.
    A file without a non-blank line is an `InputError`."""
    idx: list[int] = []
    got: list[str] = []
    seen = False
    for first, lines in line_blocks(entry, fs):
        for i, s in enumerate(lines):
            if s.strip():
                idx.append(first + i)
                got.append(s)
                if len(got) == rows:
                    seen = True
                    yield np.asarray(idx, np.int64), got
                    idx, got = [], []
    if got:
        yield np.asarray(idx, np.int64), got
    elif not seen:
        raise InputError(f"{entry.uri}: no text (the file is empty or only blank lines)")


def _field(obj: dict[str, Any], name: str, setting: str, where: str) -> Any:
    if name not in obj:
        raise InputError(f"{where}: no key {name!r} ({setting}); has {', '.join(map(str, obj)) or 'none'}")
    return obj[name]


def parse_jsonl(lines: list[str], numbers: np.ndarray, uri: str, column: str, y: str,
                y_required: bool, key: str | None, setting: str = "data.text.column",
                ) -> tuple[list[Any], np.ndarray, np.ndarray | None]:
    """``(texts, labels, keys)`` of jsonl ``lines`` (one JSON object each; ``numbers``:
    their 1-based line numbers). A line that is not a JSON object, lacks the text key
    (or the key column, or a label key the config names) is an `InputError` naming the
    file and line; a missing or null label is -1, a non-integer one an error."""
    texts: list[Any] = []
    labels = np.full(len(lines), -1, np.int64)
    keys: list[Any] = []
    for i, s in enumerate(lines):
        where = f"{uri}: line {int(numbers[i])}"
        try:
            obj = json.loads(s)
        except ValueError as e:
            raise InputError(f"{where}: not JSON ({getattr(e, 'msg', e)}); expected one JSON object "
                             "per line") from None
        if not isinstance(obj, dict):
            raise InputError(f"{where}: a JSON {type(obj).__name__}, expected an object with key {column!r}")
        texts.append(_field(obj, column, setting, where))
        label = _field(obj, y, "data.y_column", where) if y_required else obj.get(y)
        if label is not None:
            if isinstance(label, bool) or not isinstance(label, int):
                raise InputError(f"{where}: label {label!r} in {y!r} (data.y_column); expected an integer")
            labels[i] = label
        if key is not None:
            keys.append(_field(obj, key, "data.key_column", where))
    return texts, labels, (np.asarray(keys) if key is not None else None)


def table_texts(table: Any, spec: TextSpec, where: str) -> list[Any]:
    """The text column of an arrow table (parquet / csv) as Python strings; a missing
    or non-string column is an `InputError` naming the file and the setting (``spec.setting``)."""
    import pyarrow as pa

    names = table.column_names
    if spec.column not in names:
        raise InputError(f"{where}: no column {spec.column!r} ({spec.setting}); has {', '.join(names)}")
    col = table.column(spec.column)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise InputError(f"{where}: column {spec.column!r} ({spec.setting}) is {col.type}, "
                         "expected strings")
    return col.to_pylist()
