"""A run's lineage in MLflow's own terms: its data as a dataset input, its code and its
teacher as tags.

- The data: one MLflow dataset input (``MlflowClient.log_inputs``) with context
  ``train``; source = the data source (``local`` path, ``s3`` URI, or a kdflow
  ``builtin`` / ``plugin`` name), digest = the run's data hash (MLflow keeps at most 36
  characters of a digest; the full hash is in the profile and the ``kd.data_hash`` tag).
- The code: ``mlflow.source.git.commit`` and ``kd.git_commit`` when kdflow runs from a
  git checkout, ``kd.kdflow_version`` always.
- A student's teacher: ``kd.teacher_sha256``, the sha256 of its weights file.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import kd
from kd import storage, tracking
from kd.config import Experiment
from kd.data import DATASETS, Splits

DIGEST_MAX = 36  # MLflow's datasets.digest column


def git_commit() -> str:
    """``$KD_GIT_COMMIT``, else HEAD of the git checkout kdflow's source lives in (only when
    that checkout's top is kdflow's own tree, not a repo an installed copy happens to sit
    in), else 'unknown'."""
    if os.environ.get("KD_GIT_COMMIT"):
        return os.environ["KD_GIT_COMMIT"]
    src = Path(kd.__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "--show-toplevel", "HEAD"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != src.parent:
        return "unknown"
    return lines[1]


def code_tags() -> dict[str, str]:
    """The code's identity: git commit tags when known, the package version always."""
    tags = {"kd.kdflow_version": kd.__version__}
    commit = git_commit()
    if commit != "unknown":
        tags.update({"kd.git_commit": commit, "mlflow.source.git.commit": commit})
    return tags


def teacher_sha(exp: Experiment) -> str:
    """sha256 of the primary teacher's weights file, resolved (downloaded) first for URIs;
    '' without a teacher with weights."""
    from kd.train.text import weights_ref

    ref = weights_ref(exp.teacher)  # a pretrained teacher's own file counts
    if ref is None:
        return ""
    from kd.models.weights import resolve

    return storage.sha256_file(resolve(ref))


def data_source(source: str) -> tuple[str, str, str]:
    """``(source_type, uri, name)`` of a ``data.source`` in MLflow's dataset terms."""
    if storage.is_s3(source):
        return "s3", source, source.rstrip("/").rsplit("/", 1)[-1]
    if "://" in source:
        return source.split("://", 1)[0], source, source.rstrip("/").rsplit("/", 1)[-1]
    if ":" in source or (source in DATASETS and "/" not in source):
        kind = "plugin" if ":" in source else "builtin"
        return f"kdflow-{kind}", f"kdflow-{kind}:{source}", source.rsplit(":", 1)[-1]
    path = Path(source).expanduser().resolve()
    return "local", str(path), path.name


def dataset_input(exp: Experiment, splits: Splits) -> Any:
    """The run's data as an MLflow `DatasetInput` (context ``train``)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    kind, uri, name = data_source(exp.data.source)
    profile = {"data_hash": splits.data_hash, "num_classes": splits.num_classes,
               "input_shape": list(splits.input_shape), "format": exp.data.format,
               "split": exp.data.split.model_dump(mode="json"), "labels": exp.data.labels,
               "labeled_fraction": exp.data.labeled_fraction, "transfer": exp.data.transfer}
    ds = Dataset(name=name, digest=splits.data_hash[:DIGEST_MAX], source_type=kind,
                 source=json.dumps({"uri": uri}), profile=json.dumps(profile))
    return DatasetInput(ds, tags=[InputTag("mlflow.data.context", "train")])


DUPLICATE = ("UNIQUE constraint failed", "Duplicate entry", "duplicate key value")  # SQLite, MySQL, PostgreSQL


def log_dataset(uri: str, run_id: str, dataset: Any) -> None:
    """``log_inputs`` of one dataset input. Two runs that log the same data set into one
    experiment at the same moment (a sweep's concurrent trials) both try to insert its
    row, and the store's unique key refuses the second (seen as ``sqlite3.IntegrityError``
    failing a trial's first attempt); that insert was rolled back, so it is sent once
    more and then finds the row the other run wrote."""
    from mlflow.exceptions import MlflowException

    c = tracking.client(uri)
    try:
        c.log_inputs(run_id, datasets=[dataset])
    except MlflowException as e:
        if not any(m in str(e) for m in DUPLICATE):
            raise
        c.log_inputs(run_id, datasets=[dataset])


def log_lineage(uri: str, run_id: str, exp: Experiment, role: str, splits: Splits) -> None:
    """Record the run's dataset input, code tags and, for a student, its teacher's
    weights sha256 (see the module docstring)."""
    log_dataset(uri, run_id, dataset_input(exp, splits))
    tags = code_tags()
    if role == "student":
        sha = teacher_sha(exp)
        if sha:
            tags["kd.teacher_sha256"] = sha
    tracking.set_tags(uri, run_id, tags)
