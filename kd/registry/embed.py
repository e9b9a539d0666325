"""Registration of text embedding students (``task: embed``), beside `kd.registry.register`.

An embed run's weights carry ``kd.task: embed`` and ``kd.text`` (JSON ``{max_length,
pad_id, tokenizer, fingerprint}``). Registration then

* stages the tokenizer (``load_tokenizer(ref).source``, a ``tokenizer.json``) as
  ``data/student/tokenizer.json``, after checking that its fingerprint and pad id are the
  ones the run trained with, and records ``task`` and ``text`` (plus the file's sha256)
  in ``kd_model.json`` (`stage_tokenizer`);
* takes the version's holdout metrics from the run's own logged ``holdout/*`` metrics
  (`logged_holdout`; the run's ``kd.weights_sha256`` must be the version's, so the
  metrics belong to exactly these weights). The embed evaluation (cosine to the teacher,
  neighbour agreement, retrieval recall) runs once, in the training run;
* signs the pyfunc as texts in (one string column) and float32 ``[N, D]`` out,
  with ``tokenizers`` (and ``transformers`` for ``hf_encoder`` / ``bert_student``) in the
  pip requirements.
"""

from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from kd.errors import InputError
from kd.registry.loader import TOKENIZER
from kd.registry.store import SHA_TAG, explain
from kd.storage import sha256_file

EMBED = "embed"
HF_MODELS = ("hf_encoder", "bert_student")  # families that import transformers
TEXT_KEYS = {"max_length": int, "pad_id": int, "tokenizer": str, "fingerprint": str}
EXAMPLE_TEXTS = ("A student model learns to imitate its teacher.",
                 "Knowledge distillation makes sentence encoders smaller and faster.",
                 "The registry keeps every version with its lineage.",
                 "Embeddings of similar sentences lie close together.")
PREFIX = "holdout/"
TEACHER_PREFIX = "teacher_"  # holdout/teacher_recall_at_10 is the teacher's recall_at_10


def text_config(meta: dict[str, str], what: str) -> dict[str, Any]:
    """The ``kd.text`` metadata of an embed model's weights, checked: one `InputError`
    line naming ``what`` and the key when it is missing or mistyped."""
    raw = meta.get("kd.text")
    if not raw:
        raise InputError(f"{what}: weights metadata kd.task is embed but kd.text is missing "
                         "(max_length, pad_id, tokenizer, fingerprint)")
    try:
        text = json.loads(raw)
    except json.JSONDecodeError:
        raise InputError(f"{what}: weights metadata kd.text is not JSON") from None
    for key, kind in TEXT_KEYS.items():
        v = text.get(key) if isinstance(text, dict) else None
        if not isinstance(v, kind) or isinstance(v, bool):
            raise InputError(f"{what}: weights metadata kd.text.{key}: expected "
                             f"{kind.__name__}, got {v!r}")
    if text["max_length"] < 2:
        raise InputError(f"{what}: weights metadata kd.text.max_length: expected >= 2, "
                         f"got {text['max_length']}")
    return {k: text[k] for k in TEXT_KEYS}


def stage_tokenizer(data: Path, text: dict[str, Any]) -> dict[str, Any]:
    """Copy the tokenizer ``text["tokenizer"]`` names to ``data/tokenizer.json``; return
    ``text`` plus ``tokenizer_sha256``. A tokenizer whose fingerprint or pad id is not the
    recorded one is an `InputError`: it would map texts to other ids than training."""
    from kd.models.tokens import load_tokenizer

    ref = text["tokenizer"]
    tok = load_tokenizer(ref)
    if tok.fingerprint != text["fingerprint"]:
        raise InputError(f"kd.text.tokenizer {ref}: fingerprint {tok.fingerprint} is not the "
                         f"{text['fingerprint']} the run trained with (another vocabulary "
                         "or normaliser); refusing to register")
    if tok.pad_id != text["pad_id"]:
        raise InputError(f"kd.text.tokenizer {ref}: pad id {tok.pad_id} is not the "
                         f"{text['pad_id']} the run trained with; refusing to register")
    shutil.copy2(tok.source, data / TOKENIZER)
    return {**text, "tokenizer_sha256": sha256_file(data / TOKENIZER)}


def requirements(model: str) -> list[str]:
    """Extra pip requirements of an embed model: ``tokenizers`` always, ``transformers``
    for the families that build on it (lower bounds = the installed major.minor)."""
    names = ["tokenizers"] + (["transformers"] if model in HF_MODELS else [])
    out = []
    for name in names:
        try:
            out.append(f"{name}>={'.'.join(metadata.version(name).split('.')[:2])}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def signature(dim: int) -> Any:
    """Texts in (one string column, unnamed: MLflow then takes a list of strings, a
    numpy array of strings or a one-column DataFrame), float32 ``[-1, dim]`` out."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, Schema, TensorSpec

    return ModelSignature(Schema([ColSpec(DataType.string)]),
                          Schema([TensorSpec(np.dtype(np.float32), (-1, dim))]))


def input_example() -> Any:
    """The pyfunc input example: a DataFrame of `EXAMPLE_TEXTS` in a ``text`` column."""
    import pandas as pd

    return pd.DataFrame({"text": list(EXAMPLE_TEXTS)})


def example_ids(data: Path, text: dict[str, Any]) -> np.ndarray:
    """int64 ``[4, max_length]`` token ids of `EXAMPLE_TEXTS` (the torch.export example)."""
    from kd.models.tokens import load_tokenizer

    ids, _ = load_tokenizer(str(data / TOKENIZER)).encode(list(EXAMPLE_TEXTS), text["max_length"])
    return ids


def logged_holdout(c: Any, run_id: str, sha: str) -> tuple[dict[str, float], dict[str, float]]:
    """(student, teacher) holdout metrics an embed run logged: ``holdout/K`` as ``K``
    for the student, ``holdout/teacher_K`` as ``K`` for the teacher. The run's
    ``kd.weights_sha256`` must be ``sha`` (the metrics belong to these weights)."""
    try:
        run = c.get_run(run_id)
    except Exception as e:
        raise explain(e, f"run {run_id}") from None
    got = run.data.tags.get(SHA_TAG)
    if got != sha:
        raise InputError(f"run {run_id}: its {SHA_TAG} {str(got)[:16]}... is not the version's "
                         f"{sha[:16]}...; its holdout metrics belong to other weights")
    student, teacher = {}, {}
    for k, v in run.data.metrics.items():
        if not k.startswith(PREFIX):
            continue
        key = k[len(PREFIX):]
        if key.startswith(TEACHER_PREFIX):
            teacher[key[len(TEACHER_PREFIX):]] = float(v)
        else:
            student[key] = float(v)
    return student, teacher
