"""Credentials never leak: a real run with distinctive test credentials (AWS keys and a
session token in the environment, a password in the MLflow tracking URI, an API token
variable), then a scan of everything it wrote: the MLflow store (params, tags, metric
names, every artifact), every object in the storage bucket (body and metadata), every
file in the working folder, and the captured stdout/stderr. None of the credentials
may appear. Plus the redaction rules themselves and the CLI's error line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import CONFIGS

from kd import cli
from kd.redact import MASK, RedactingStream, redact

ACCESS = "AKIAKDLEAKCANARY0001"
SECRET = "kdLeakCanarySecret+Abc123/xyz"
SESSION = "kdLeakCanarySessionToken0042"
MLFLOW_PW = "kdLeakCanaryPassw0rd"
API_TOKEN = "kdLeakCanaryApiToken77"
CANARIES = (ACCESS, SECRET, SESSION, MLFLOW_PW, API_TOKEN)


def test_redact_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOME_SERVICE_PASSWORD", "hunter2hunter2")
    monkeypatch.setenv("MY_API_TOKEN", "tok-12345678")
    monkeypatch.setenv("SHORT_KEY", "abc1234")  # under 8 characters: left alone
    text = ("uri http://alice:pw%21x@host:5000/api and https://ghp_tok@example.com/x, "
            "postgresql://u:p@db/x, s3://bucket/key, sqlite:///a/b.db, "
            "password hunter2hunter2, token tok-12345678, abc1234")
    out = redact(text)
    assert "pw%21x" not in out and "http://alice:***@host:5000/api" in out
    assert "https://***@example.com/x" in out and "postgresql://u:***@db/x" in out
    assert "s3://bucket/key" in out and "sqlite:///a/b.db" in out
    assert "hunter2hunter2" not in out and "tok-12345678" not in out and out.endswith(", abc1234")
    # a secret split over two writes is still masked (line-buffered)
    import io

    buf = io.StringIO()
    stream = RedactingStream(buf)
    stream.write("key hunter2")
    stream.write("hunter2 end\n")
    assert buf.getvalue() == f"key {MASK} end\n"


def test_cli_error_line_redacted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                 capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    missing = tmp_path / SECRET / "model.safetensors"  # a path that quotes the key
    assert cli.run(["evaluate", str(missing)]) == 2
    err = capfd.readouterr().err
    assert SECRET not in err and err.startswith(f"kd: error: {tmp_path}/{MASK}/"), err


def _mlflow_text(url: str) -> list[str]:
    """Everything the MLflow store holds for every run: params, tags, metric names and the
    bytes of every artifact (downloaded)."""
    import tempfile

    import mlflow
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=url)
    out: list[str] = []
    for e in c.search_experiments():
        out += [e.name, str(e.tags), e.artifact_location]
        for run in c.search_runs([e.experiment_id]):
            out += [str(run.data.params), str(run.data.tags), str(run.data.metrics),
                    str(run.info)]
            with tempfile.TemporaryDirectory() as d:
                mlflow.set_tracking_uri(url)
                local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=d)
                out += [p.read_bytes().decode("latin-1") for p in Path(local).rglob("*")
                        if p.is_file()]
    return out


def _bucket_text(endpoint: str, bucket: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="reader",
                      aws_secret_access_key="reader")
    out = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            obj = s3.get_object(Bucket=bucket, Key=o["Key"])
            out += [o["Key"], str(obj.get("Metadata")), obj["Body"].read().decode("latin-1")]
    return out


def test_a_run_leaks_no_credentials(mlflow_server: str, s3_server: str, bucket: str,
                                    workdir: Path, ray_session: None,
                                    monkeypatch: pytest.MonkeyPatch,
                                    capfd: pytest.CaptureFixture[str]) -> None:
    host = mlflow_server.split("://", 1)[1]
    tracking = f"http://kdleak:{MLFLOW_PW}@{host}"
    for k, v in {"AWS_ACCESS_KEY_ID": ACCESS, "AWS_SECRET_ACCESS_KEY": SECRET,
                 "AWS_SESSION_TOKEN": SESSION, "KDFLOW_CANARY_API_TOKEN": API_TOKEN,
                 "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}.items():
        monkeypatch.setenv(k, v)
    common = [f"storage.path=s3://{bucket}/runs", f"tracking.uri={tracking}",
              "scaling.num_workers=0", "trainer.epochs=1", "checkpoint.every_epochs=1"]
    code = cli.run(["teacher", str(CONFIGS / "digits-teacher.yaml"), *common])
    captured = capfd.readouterr()
    assert code == 0, captured.err[-2000:]
    # a failing command whose error carries the tracking URI: a dead MLflow server
    code = cli.run(["teacher", str(CONFIGS / "digits-teacher.yaml"), *common[:1],
                    f"tracking.uri=http://kdleak:{MLFLOW_PW}@127.0.0.1:9", *common[2:]])
    failed = capfd.readouterr()
    assert code != 0
    texts = {"stdout": captured.out + failed.out, "stderr": captured.err + failed.err}
    texts["mlflow"] = "\n".join(_mlflow_text(mlflow_server))
    texts["bucket"] = "\n".join(_bucket_text(s3_server, bucket))
    texts["workdir"] = "\n".join(p.read_bytes().decode("latin-1")
                                 for p in workdir.rglob("*") if p.is_file())
    assert "kd.config_hash" in texts["mlflow"] and "tracking.uri" in texts["mlflow"]
    assert "model.safetensors" in texts["bucket"]  # the scan saw the run's weights
    names = dict(zip(CANARIES, ("access key", "secret key", "session token",
                                "MLflow password", "API token"), strict=True))
    leaks = [f"{where}: {names[c]}" for where, text in texts.items() for c in CANARIES
             if c in text]
    assert not leaks, leaks
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET  # the run had them all along
