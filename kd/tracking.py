"""MLflow records: one run per `kd teacher` / `kd distill`, created by the driver.

The driver creates the run and hands its id to the training workers; rank 0 logs
per-epoch metrics into that same run (so a restarted worker never makes a second
run). Default store: ``sqlite:///<cwd>/mlflow.db`` unless ``MLFLOW_TRACKING_URI``
or ``tracking.uri`` names another.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from kd.config import Experiment
from kd.dotted import flatten
from kd.errors import InputError
from kd.redact import redact, redact_map

PARAM_CHUNK = 100


def tracking_uri(exp: Experiment | None = None) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite file in the cwd."""
    if exp is not None and exp.tracking.uri:
        return exp.tracking.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def client(uri: str) -> Any:
    """An `MlflowClient` bound to ``uri`` (also set as the process default)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def experiment_id(c: Any, name: str) -> str:
    """The id of experiment ``name``, created if missing."""
    exp = c.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else c.create_experiment(name)


def start_run(exp: Experiment, kind: str, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None) -> str:
    """Create the run, log the flattened resolved config as params and the config
    YAML as an artifact; returns the run id. Params, tags and the YAML are redacted
    (`kd.redact`): a password in ``tracking.uri`` or a key in the environment is
    logged as ``***``."""

    uri = tracking_uri(exp)
    c = client(uri)
    all_tags = redact_map({"kd.kind": kind, "kd.config_hash": exp.hash(), **(tags or {})})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(experiment_id(c, exp.tracking.experiment),
                       run_name=exp.tracking.run_name or f"{exp.name}-{kind}", tags=all_tags)
    log_config(c, run.info.run_id, exp, fresh=True)
    return run.info.run_id


def log_config(c: Any, run_id: str, exp: Experiment, fresh: bool = False) -> None:
    """Log ``exp``'s flattened config as params and its YAML as the ``config.yaml``
    artifact (both redacted). Unless ``fresh``, only what the run lacks: a resumed run
    whose first attempt died between creating the run and logging these gets them now
    (params it has keep their first values)."""
    from mlflow.entities import Param

    have = {} if fresh else c.get_run(run_id).data.params
    params = [Param(k, v[:6000])
              for k, v in redact_map(flatten(exp.model_dump(mode="json"))).items() if k not in have]
    for i in range(0, len(params), PARAM_CHUNK):
        c.log_batch(run_id, params=params[i:i + PARAM_CHUNK])
    if not fresh and any(a.path == "config.yaml" for a in c.list_artifacts(run_id)):
        return
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.yaml"
        path.write_text(redact(exp.to_yaml()))
        c.log_artifact(run_id, str(path))


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log numeric metrics at ``step`` (the epoch) in one batch."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float))]
    client(uri).log_batch(run_id, metrics=batch)


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Upload one local file or folder into the run's artifacts."""
    c = client(uri)
    if Path(path).is_dir():
        c.log_artifacts(run_id, str(path), artifact_path)
    else:
        c.log_artifact(run_id, str(path), artifact_path)


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    """Set string tags on a run (values redacted, `kd.redact`)."""
    c = client(uri)
    for k, v in redact_map(tags).items():
        c.set_tag(run_id, k, v)


def end_run(uri: str, run_id: str, ok: bool) -> None:
    """Mark the run FINISHED or FAILED."""
    client(uri).set_terminated(run_id, status="FINISHED" if ok else "FAILED")


def run_by_name(exp: Experiment, ray_run_name: str) -> Any | None:
    """The latest MLflow run (an `mlflow.entities.Run`) of the config's experiment tagged
    ``kd.ray_run_name`` = ``ray_run_name``; None if there is none."""
    c = client(tracking_uri(exp))
    e = c.get_experiment_by_name(exp.tracking.experiment)
    if e is None:
        return None
    runs = c.search_runs([e.experiment_id],
                         filter_string=f"tags.`kd.ray_run_name` = '{ray_run_name}'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def resume_run(exp: Experiment, ray_run_name: str) -> str | None:
    """The id of the MLflow run an earlier submission with this Ray run name
    created (tag ``kd.ray_run_name``), set RUNNING again, with the params and config.yaml
    it lacks (`log_config`); None if there is none. Re-submitting a job therefore
    continues one MLflow run instead of opening a second."""
    run = run_by_name(exp, ray_run_name)
    if run is None:
        return None
    c = client(tracking_uri(exp))
    run_id = run.info.run_id
    c.update_run(run_id, status="RUNNING")
    log_config(c, run_id, exp)  # the first attempt may have died before logging them
    return run_id


def config_from_run(run_id: str) -> Path:
    """`kd distill --from-run RUN_ID`: download ``config.yaml`` from the MLflow run ``run_id``
    (tracking URI from the environment, else the local SQLite default); its local path."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="config.yaml", dst_path=tempfile.mkdtemp(prefix="kd-run-"))
    except Exception as e:
        raise InputError(f"--from-run {run_id}: cannot fetch its config.yaml ({e})") from None
    return Path(path)
