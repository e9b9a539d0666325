"""One served model version, and the request rows it accepts (no Ray Serve here).

`load_version` reads ``models:/NAME/VERSION`` through kdflow's verified registry read
(`kd.registry.store.download_version`: sha256 checked against the ``kd.weights_sha256``
tag) and rebuilds it with `kd.registry.loader.load_student` (safetensors, nothing is
unpickled; an embedding model with its tokenizer). `parse_rows` turns a request's ``inputs``
into a batch or a `RequestError` (HTTP status + one-line reason), `parse_texts` does the
same for an embedding model's texts; `answer` turns probabilities (or embeddings) into
the JSON rows.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np

from kd.registry.loader import DATA_DIR, StudentModel, load_student

MAX_ROWS = 4096  # rows per request; more is a 413


class RequestError(ValueError):
    """A bad request: ``status`` (400 / 413 / 422) and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Served:
    """A loaded version: the student, its version string and its class names (may be empty)."""

    name: str
    version: str
    student: StudentModel
    labels: tuple[str, ...]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The model's input shape without the batch dimension."""
        return self.student.input_shape


def load_version(name: str, version: str, tracking_uri: str, precision: str = "fp32") -> Served:
    """Download ``models:/name/version`` (verified), rebuild it in ``precision``
    (`kd.registry.loader.PRECISIONS`); an `InputError` names what failed (unknown
    version, checksum, unreachable registry)."""
    from kd.registry.store import ModelRef, download_version, get_version, registry_client

    c = registry_client(tracking_uri)
    mv = get_version(c, ModelRef(name, version=str(version)))
    folder = download_version(c, mv, weights_only=True)
    try:
        student = load_student(folder / DATA_DIR, precision=precision)  # + an embed model's tokenizer
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    labels = tuple(str(s) for s in student.config.get("class_names") or ())
    return Served(name, mv.version, student, labels)


def check_rows(inputs: Any, max_rows: int, what: str) -> None:
    """A `RequestError` unless ``inputs`` is a non-empty list of at most ``max_rows``."""
    if not isinstance(inputs, list):
        raise RequestError(422, f"inputs: expected a list of {what}")
    if not inputs:
        raise RequestError(422, "inputs: no rows")
    if len(inputs) > max_rows:
        raise RequestError(413, f"inputs: {len(inputs)} rows, more than the limit of "
                                f"{max_rows} per request")


def parse_texts(inputs: Any, max_rows: int = MAX_ROWS) -> np.ndarray:
    """``inputs`` of an embedding model (a list of non-blank strings) as a numpy array of
    strings; a `RequestError` naming the first bad row otherwise."""
    check_rows(inputs, max_rows, "texts")
    for i, v in enumerate(inputs):
        if not isinstance(v, str) or not v.strip():
            what = "an empty text" if isinstance(v, str) else f"a {type(v).__name__}"
            raise RequestError(422, f"inputs: row {i} is {what}; this model embeds non-empty texts")
    return np.asarray(inputs, dtype=object)


def parse_rows(inputs: Any, input_shape: tuple[int, ...], integer: bool,
               max_rows: int = MAX_ROWS) -> np.ndarray:
    """``inputs`` (a list of rows: flat lists of numbers or nested lists in the model's
    input shape) as an array ``[N, *input_shape]``; a `RequestError` otherwise."""
    check_rows(inputs, max_rows, "rows")
    try:
        arr = np.asarray(inputs)
    except (ValueError, TypeError):
        raise RequestError(422, "inputs: every row must be a list of numbers of the same "
                                "shape") from None
    if arr.dtype.kind not in "iuf":
        raise RequestError(422, f"inputs: expected numbers; got values of type "
                                f"{_kind(arr.dtype)}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise RequestError(422, "inputs: values must be finite numbers")
    size = int(np.prod(input_shape))
    if arr.shape[1:] != tuple(input_shape) and arr.shape[1:] != (size,):
        raise RequestError(422, f"inputs: each row must have {size} numbers (or shape "
                                f"{list(input_shape)}); got shape {list(arr.shape[1:])}")
    if integer:
        if (arr != np.round(arr)).any():
            raise RequestError(422, "inputs: this model takes integers (token ids); got "
                                    "fractional values")
        return arr.reshape(len(arr), *input_shape).astype(np.int64)
    return arr.reshape(len(arr), *input_shape).astype(np.float32)


def _kind(dtype: np.dtype) -> str:
    """A reader's name for a numpy dtype kind that is not a number."""
    return {"U": "string", "S": "bytes", "b": "boolean", "O": "mixed/nested object"}.get(
        dtype.kind, str(dtype))


def answer(served: Served, probs: np.ndarray) -> dict[str, Any]:
    """The /predict body for ``probs`` ``[N, C]`` computed by ``served`` (an embedding
    model: its embeddings ``[N, D]``)."""
    if served.student.task == "embed":
        return {"model": served.name, "version": served.version,
                "embeddings": [[float(v) for v in row] for row in probs]}
    pred = probs.argmax(1)
    out: dict[str, Any] = {"model": served.name, "version": served.version,
                           "predictions": [int(p) for p in pred]}
    if served.labels:
        out["labels"] = [served.labels[int(p)] for p in pred]
    out["probabilities"] = [[float(v) for v in row] for row in probs]
    return out
