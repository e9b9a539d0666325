"""`kd predict URI --input FILE`: class probabilities of a registered model for a file.

``URI`` is ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (downloaded and
sha256-verified) or a local folder of a downloaded model. ``FILE`` is .npz (array
``x``), .parquet or .csv (column ``x`` holding one list per row, or every column but
``y`` as features). Output: .npz (``probs``, ``pred``), .csv or .parquet (``pred`` and
``p0..p{C-1}``), or a table on stdout. A text embedding model takes a file of texts and
writes embeddings (`kd.registry.predict_text`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kd.errors import InputError
from kd.registry.loader import DATA_DIR, StudentModel, load_student

OUT_FORMATS = (".npz", ".csv", ".parquet")


def load_registered(uri: str, precision: str = "fp32") -> StudentModel:
    """The registered student behind ``uri`` (verified), wrapped for prediction in
    ``precision`` (`kd.registry.loader.PRECISIONS`)."""
    if uri.startswith("models:/"):
        from kd.registry.store import fetch_verified

        folder = fetch_verified(uri)
    else:
        folder = Path(uri)
        if not (folder / DATA_DIR).is_dir():
            raise InputError(f"{uri}: not a models:/ URI or a downloaded kdflow model folder")
    try:
        return load_student(folder / DATA_DIR, precision=precision)
    except ValueError as e:  # ChecksumError for a local folder
        raise InputError(f"{uri}: {e}") from None


def read_inputs(path: str) -> np.ndarray:
    """Features of an .npz / .parquet / .csv file (see the module docstring)."""
    from kd.data.readers import read_local_file

    suffix = Path(path).suffix.lower()
    if suffix not in (".npz", ".parquet", ".csv"):
        raise InputError(f"--input {path}: expected a .npz, .parquet or .csv file")
    x, _ = read_local_file(path)
    return x


def predict_file(uri: str, input_path: str, output: str | None = None,
                 precision: str = "fp32") -> np.ndarray:
    """Probabilities ``[N, C]`` for ``input_path``; written to ``output`` or printed
    (an embedding model: embeddings ``[N, D]``, `kd.registry.predict_text.predict_texts`);
    the model runs in ``precision``."""
    model = load_registered(uri, precision)
    if model.task == "embed":
        from kd.registry.predict_text import predict_texts

        return predict_texts(model, input_path, output)
    x = read_inputs(input_path)
    expect = int(np.prod(model.input_shape))
    if x.reshape(len(x), -1).shape[1] != expect:
        raise InputError(f"--input {input_path}: rows have {x.reshape(len(x), -1).shape[1]} "
                         f"values but the model takes {expect} (shape {model.input_shape})")
    probs = model.predict(x)
    pred = probs.argmax(1)
    if output is None:
        print("row\tpred\tprob")
        for i, (p, row) in enumerate(zip(pred, probs, strict=True)):
            print(f"{i}\t{p}\t{row[p]:.4f}")
        return probs
    suffix = Path(output).suffix.lower()
    if suffix == ".npz":
        np.savez(output, probs=probs, pred=pred)
    elif suffix in (".csv", ".parquet"):
        import pandas as pd

        df = pd.DataFrame(probs, columns=[f"p{i}" for i in range(probs.shape[1])])
        df.insert(0, "pred", pred)
        df.to_csv(output, index=False) if suffix == ".csv" else df.to_parquet(output, index=False)
    else:
        raise InputError(f"--output {output}: expected one of {', '.join(OUT_FORMATS)}")
    print(f"[kd] wrote {len(probs)} predictions to {output}", flush=True)
    return probs
