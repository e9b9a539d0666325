"""`kd distill --from-run RUN_ID`: the resolved config logged with a run."""

from __future__ import annotations

import tempfile
from pathlib import Path

from kd.errors import InputError


def config_from_run(run_id: str, fallback: str | None = None) -> Path:
    """Download ``config.yaml`` from the MLflow run ``run_id`` (tracking URI from the
    environment, else the local SQLite default) and return its local path."""
    import mlflow

    from kd.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="config.yaml", dst_path=tempfile.mkdtemp(prefix="kd-run-"))
    except Exception as e:
        raise InputError(f"--from-run {run_id}: cannot fetch its config.yaml ({e})") from None
    return Path(path)
