"""Two runs that share a ``name`` each keep their own weights file; the name's latest copy
(``<storage.path>/<name>/model.safetensors``) follows the newest run, and replacing
another run's copy is announced, never silent, and loses nothing."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
from mlflow.tracking import MlflowClient

from kd.config import experiment_from_dict, load_experiment
from kd.models import build_model
from kd.models.weights import read_metadata, save_weights
from kd.storage import sha256_file
from kd.train.output import OWNER_KEY, UNKNOWN, publish_weights, run_weights_uri, weights_owner

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _weights(path: Path, owner: str | None, seed: int) -> Path:
    import torch

    torch.manual_seed(seed)
    meta = {"kd.num_classes": "10"} | ({OWNER_KEY: owner} if owner is not None else {})
    save_weights(build_model("mlp", {"hidden": [8]}, (1, 8, 8), 10), path, meta)
    return path


def test_two_runs_of_one_name_keep_their_own_weights(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    exp = experiment_from_dict({"name": "same", "storage": {"path": str(tmp_path / "runs")}})
    a = _weights(tmp_path / "a.safetensors", "run-a", 0)
    b = _weights(tmp_path / "b.safetensors", "run-b", 1)
    uri_a = publish_weights(a, exp, "run-a")
    assert capsys.readouterr().out == ""  # the first run of a name replaces nothing
    uri_b = publish_weights(b, exp, "run-b")
    latest = tmp_path / "runs" / "same" / "model.safetensors"
    assert uri_a == run_weights_uri(exp, "run-a") != uri_b
    assert sha256_file(uri_a) == sha256_file(a) and sha256_file(uri_b) == sha256_file(b)
    assert sha256_file(latest) == sha256_file(b)
    out = capsys.readouterr().out
    assert f"{latest} (the latest of name 'same') now holds run run-b's weights" in out
    assert f"it held run run-a's, which stay at {uri_a}" in out
    publish_weights(b, exp, "run-b")  # the same run again (a resumed run): nothing to announce
    assert capsys.readouterr().out == ""


def test_a_latest_copy_that_names_no_run_is_kept(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A file written before kdflow recorded run names exists nowhere else: it is kept."""
    exp = experiment_from_dict({"name": "old", "storage": {"path": str(tmp_path)}})
    latest = tmp_path / "old" / "model.safetensors"
    latest.parent.mkdir()
    legacy = _weights(latest, None, 0)
    legacy_sha = sha256_file(legacy)
    assert weights_owner(str(latest)) == UNKNOWN
    publish_weights(_weights(tmp_path / "new.safetensors", "run-new", 1), exp, "run-new")
    kept = run_weights_uri(exp, f"unrecorded-{legacy_sha[:12]}")
    assert sha256_file(kept) == legacy_sha
    assert f"it held weights that named no run, kept at {kept}" in capsys.readouterr().out
    assert weights_owner(str(latest)) == "run-new"


def test_owner_of_weights_on_s3(s3_server: str, bucket: str, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """On S3 the owner is read from the safetensors header with ranged GETs."""
    exp = experiment_from_dict({"name": "s3run", "storage": {"path": f"s3://{bucket}/runs",
                                                             "endpoint_url": s3_server}})
    latest = f"s3://{bucket}/runs/s3run/model.safetensors"
    assert weights_owner(latest, s3_server) is None
    a = _weights(tmp_path / "a.safetensors", "run-a", 0)
    b = _weights(tmp_path / "b.safetensors", "run-b", 1)
    uri_a = publish_weights(a, exp, "run-a")
    assert weights_owner(latest, s3_server) == "run-a"
    publish_weights(b, exp, "run-b")
    assert weights_owner(latest, s3_server) == "run-b"
    s3 = boto3.client("s3", endpoint_url=s3_server)
    body = s3.get_object(Bucket=bucket, Key="runs/s3run/runs/run-a/model.safetensors")["Body"].read()
    assert body == a.read_bytes() and uri_a.endswith("/runs/s3run/runs/run-a/model.safetensors")
    assert "it held run run-a's" in capsys.readouterr().out
    s3.put_object(Bucket=bucket, Key="runs/junk/model.safetensors", Body=b"not safetensors")
    assert weights_owner(f"s3://{bucket}/runs/junk/model.safetensors", s3_server) == UNKNOWN


@pytest.mark.slow
def test_second_run_of_a_name_does_not_replace_the_first_runs_weights(
        ray_session: None, workdir: Path) -> None:
    """The bug: both runs wrote ``<storage.path>/<name>/model.safetensors``; the first
    run's weights URI (its tag ``kd.weights_uri``) then held the second run's weights."""
    from kd.train.run import train_run

    exp = load_experiment(CONFIGS / "digits-teacher.yaml",
                          ["scaling.num_workers=0", "trainer.epochs=1", "teacher.args.channels=[4, 8]",
                           f"storage.path={workdir / 'runs'}"])
    first = train_run(exp, "teacher")
    second = train_run(exp.model_copy(update={"seed": 1}), "teacher")
    assert first.weights != second.weights
    assert sha256_file(first.weights) == first.weights_sha256  # still the first run's file
    assert sha256_file(second.weights) == second.weights_sha256 != first.weights_sha256
    latest = workdir / "runs" / exp.name / "model.safetensors"
    assert sha256_file(latest) == second.weights_sha256
    tags = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_run(first.run_id).data.tags
    assert tags["kd.weights_uri"] == first.weights
    assert read_metadata(first.weights)[OWNER_KEY] == tags["kd.ray_run_name"]


def test_a_resumed_run_gets_the_config_its_killed_first_attempt_never_logged(
        ray_session: None, workdir: Path) -> None:
    """The bug: an attempt killed between creating its MLflow run (tagged with the Ray run
    name) and logging its params left a run without params or config.yaml; the resumed
    attempt reused that run as it was, so `kd register` and `kd distill --from-run` could
    not read its config. The resumed attempt now logs what the run lacks."""
    from kd import tracking
    from kd.train.run import train_run

    exp = load_experiment(CONFIGS / "digits-teacher.yaml",
                          ["scaling.num_workers=0", "trainer.epochs=1", "teacher.args.channels=[4, 8]",
                           f"storage.path={workdir / 'runs'}"])
    c = MlflowClient(tracking.tracking_uri(exp))
    killed = c.create_run(tracking.experiment_id(c, exp.tracking.experiment),
                          tags={"kd.ray_run_name": "resumed-run"}).info.run_id
    c.log_param(killed, "trainer.epochs", "7")  # a param the first attempt got to log
    out = train_run(exp, "teacher", run_name="resumed-run")
    assert out.run_id == killed
    params = c.get_run(killed).data.params
    assert params["trainer.epochs"] == "7"  # kept: the first value stays
    assert params["teacher.model"] == exp.teacher.model and params["seed"] == str(exp.seed)
    assert {"config.yaml"} <= {a.path for a in c.list_artifacts(killed)}
    assert load_experiment(tracking.config_from_run(killed)).hash() == exp.hash()
