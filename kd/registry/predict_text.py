"""`kd predict` for a text embedding model (``task: embed``): texts of a file in,
embeddings out.

Input: ``.jsonl`` (the ``text`` key of each line's object), ``.txt`` (one text per line;
blank lines are skipped, as the txt data format does), ``.parquet`` / ``.csv`` (a ``text``
column, or the single string column). Output: ``.npz`` (array ``embeddings``), ``.npy``,
``.parquet`` (column ``embedding``, one float32 list per row), or a short table on stdout.
Rows keep the input's order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kd.errors import InputError

TEXT_INPUTS = (".jsonl", ".txt", ".parquet", ".csv")
TEXT_OUTPUTS = (".npz", ".npy", ".parquet")


def _jsonl(path: str) -> list[Any]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(f"--input {path}: line {n} is not JSON") from None
            if not isinstance(doc, dict) or "text" not in doc:
                raise InputError(f"--input {path}: line {n} has no \"text\" key")
            out.append(doc["text"])
    return out


def _table(path: str, suffix: str) -> list[Any]:
    import pandas as pd

    df = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path, keep_default_na=False)
    if "text" in df.columns:
        return df["text"].tolist()
    strings = [c for c in df.columns if df[c].map(lambda v: isinstance(v, str)).all()]
    if len(strings) != 1:
        raise InputError(f"--input {path}: expected a 'text' column or exactly one string "
                         f"column, got columns {[str(c) for c in df.columns][:8]}")
    return df[strings[0]].tolist()


def read_texts(path: str) -> list[Any]:
    """The texts of ``path`` (see the module docstring); undecodable bytes, a bad jsonl
    line or a file without texts is an `InputError` naming the file."""
    suffix = Path(path).suffix.lower()
    if suffix not in TEXT_INPUTS:
        raise InputError(f"--input {path}: an embedding model takes a {', '.join(TEXT_INPUTS)} file")
    if not Path(path).is_file():
        raise InputError(f"--input {path}: no such file")
    try:
        if suffix == ".jsonl":
            texts = _jsonl(path)
        elif suffix == ".txt":
            texts = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
        else:
            texts = _table(path, suffix)
    except UnicodeDecodeError as e:
        raise InputError(f"--input {path}: not UTF-8 text (byte {e.start})") from None
    if not texts:
        raise InputError(f"--input {path}: holds no texts")
    return texts


def embedding_column(emb: np.ndarray) -> Any:
    """``emb`` [N, D] as an arrow ``fixed_size_list<float32>[D]`` column (one list per row)."""
    import pyarrow as pa

    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])


def write_embeddings(emb: np.ndarray, output: str | None) -> None:
    """Write ``emb`` [N, D] to ``output`` (.npz ``embeddings`` / .npy / .parquet
    ``embedding``), or print row, norm and the first values."""
    if output is None:
        print("row\tnorm\tfirst values")
        for i, row in enumerate(emb):
            print(f"{i}\t{float(np.linalg.norm(row)):.4f}\t" + " ".join(f"{v:.4f}" for v in row[:4]))
        return
    suffix = Path(output).suffix.lower()
    if suffix == ".npz":
        np.savez(output, embeddings=emb)
    elif suffix == ".npy":
        np.save(output, emb)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"embedding": embedding_column(emb)}), output)
    else:
        raise InputError(f"--output {output}: an embedding model writes {', '.join(TEXT_OUTPUTS)}")
    print(f"[kd] wrote {len(emb)} embeddings of width {emb.shape[1]} to {output}", flush=True)


def predict_texts(model: Any, input_path: str, output: str | None = None) -> np.ndarray:
    """Embeddings ``[N, D]`` of the texts of ``input_path`` by an embed `StudentModel`;
    written to ``output`` or printed. An empty text or a non-string row is an
    `InputError` naming the file and row."""
    if output is not None and Path(output).suffix.lower() not in TEXT_OUTPUTS:
        raise InputError(f"--output {output}: an embedding model writes {', '.join(TEXT_OUTPUTS)}")
    texts = read_texts(input_path)
    try:
        emb = model.predict(texts)
    except ValueError as e:  # loader.to_texts: "predict: row 3 is an empty text; ..."
        raise InputError(f"--input {input_path}: {str(e).removeprefix('predict: ')}") from None
    write_embeddings(emb, output)
    return emb
