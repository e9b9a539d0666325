"""Silent failures in promotion and the registry (issue 15): an empty gate is refused
(or says allow_any), a rollback stops on any error but "version does not exist", and
registration.json goes to the real s3:// URI."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from kd import cli
from kd.config import GateConfig, load_experiment
from kd.errors import InputError
from kd.registry.promote import HISTORY_TAG, LOCK_SUFFIX, gate_check, rollback
from kd.registry.register import register_outcome
from kd.storage import join
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
KD = REPO / "configs" / "digits-kd.yaml"
METRICS = {"accuracy": 0.9, "teacher_agreement": 0.9, "params": 100.0, "latency_ms": 1.0}

# ---------------------------------------------------------------- the gate


def test_empty_gate_is_refused_when_the_config_loads(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Before the fix an empty gate loaded and later promoted anything."""
    with pytest.raises(InputError, match=r"digits-kd\.yaml: registry: .*registry\.gate names no "
                                         r"criterion: set at least one of min_accuracy.*allow_any"):
        load_experiment(KD, ["registry.gate={}"])
    assert cli.run(["distill", str(KD), "registry.gate={}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "registry.gate names no criterion" in err[0]
    assert load_experiment(KD, ["registry.gate={allow_any: true}"]).registry.gate.allow_any
    with pytest.raises(InputError, match=r"allow_any: true contradicts the thresholds set "
                                         r"\(min_accuracy\)"):
        load_experiment(KD, ["registry.gate={allow_any: true, min_accuracy: 0.5}"])
    # no registered model, no gate needed (a plain distillation)
    assert not load_experiment(KD, ["registry.model_name=null", "registry.gate={}"]).registry.gate.criteria()


def test_gate_check_refuses_an_empty_gate_and_honours_allow_any() -> None:
    """Before the fix gate_check(GateConfig()) returned (True, 'no gate thresholds ...')."""
    with pytest.raises(InputError, match=r"registry\.gate names no criterion"):
        gate_check(GateConfig(), METRICS, None)
    ok, why = gate_check(GateConfig(allow_any=True), METRICS, {"accuracy": 0.99})
    assert ok and why == ["the gate allows any model (registry.gate.allow_any: true)"]
    ok, why = gate_check(GateConfig(max_accuracy_drop=0.01), METRICS, None)
    assert ok and "first champion" in why[0]


def _shipped_configs() -> list[tuple[str, dict[str, Any]]]:
    out = [(str(p.relative_to(REPO)), yaml.safe_load(p.read_text()))
           for p in sorted([*(REPO / "configs").glob("*.yaml"), *(REPO / "kd/configs").glob("*.yaml")])]
    cm = yaml.safe_load((REPO / "k8s/base/experiment.yaml").read_text())
    out.append(("k8s/base/experiment.yaml", yaml.safe_load(cm["data"]["experiment.yaml"])))
    values = yaml.safe_load((REPO / "helm/kdflow/values.yaml").read_text())
    out.append(("helm/kdflow/values.yaml", yaml.safe_load(values["experiment"]["config"])))
    return out


@pytest.mark.parametrize("where, doc", _shipped_configs(), ids=lambda v: v if isinstance(v, str) else "")
def test_shipped_configs_name_a_gate(where: str, doc: dict[str, Any]) -> None:
    """Every shipped experiment that registers a model names its gate and loads."""
    from kd.config import experiment_from_dict

    exp = experiment_from_dict(doc, where)
    if exp.registry.model_name:
        assert exp.registry.gate.criteria() or exp.registry.gate.allow_any

# ---------------------------------------------------------------- rollback


def _model_with_history(c: Any, versions: int = 3) -> str:
    """A registered model with ``versions`` versions, history [1..n], champion = n."""
    name = f"kd-rb-{uuid.uuid4().hex[:8]}"
    exp = c.get_experiment_by_name("kd-rollback")
    eid = exp.experiment_id if exp else c.create_experiment("kd-rollback")
    run = c.create_run(eid)
    c.create_registered_model(name)
    for i in range(versions):
        c.create_model_version(name, source=f"{run.info.artifact_uri}/m{i}",
                               run_id=run.info.run_id)
    c.set_registered_model_tag(name, HISTORY_TAG, json.dumps([str(i + 1) for i in range(versions)]))
    c.set_registered_model_alias(name, "champion", str(versions))
    return name


class _FailingReads:
    """The real client, except that reading version ``bad`` goes through ``failing``."""

    def __init__(self, real: Any, failing: Any, bad: str) -> None:
        self._real, self._failing, self._bad = real, failing, bad

    def get_model_version(self, name: str, version: str) -> Any:
        target = self._failing if str(version) == self._bad else self._real
        return target.get_model_version(name, version)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._real, attr)


class _Denied:
    def get_model_version(self, name: str, version: str) -> Any:
        from mlflow.exceptions import MlflowException

        raise MlflowException("Permission denied for user 'ci'", error_code="PERMISSION_DENIED")


def test_rollback_skips_only_deleted_versions(mlflow_server: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    c = MlflowClient(mlflow_server)
    name = _model_with_history(c)
    c.delete_model_version(name, "2")
    assert rollback(name) == "1"
    assert c.get_model_version_by_alias(name, "champion").version == "1"
    assert json.loads(c.get_registered_model(name).tags[HISTORY_TAG]) == ["1"]


@pytest.mark.parametrize("failure", ["network", "auth"])
def test_rollback_stops_on_other_errors_and_leaves_the_alias(
        mlflow_server: str, monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    """Reading v2 fails (a server that refuses connections, or a permission error).
    Before the fix v2 was taken for deleted and champion moved to v1."""
    from mlflow.tracking import MlflowClient

    import kd.registry.promote as promote

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    real = MlflowClient(mlflow_server)
    name = _model_with_history(real)
    # port 1 (tcpmux): nothing listens there; a port free_port() found free can be taken by a
    # Ray or mlflow process of the same suite before the read (a CI flake, seen once)
    dead = "http://127.0.0.1:1"
    failing = MlflowClient(dead, registry_uri=dead) if failure == "network" else _Denied()
    monkeypatch.setattr(promote, "registry_client", lambda: _FailingReads(real, failing, "2"))
    match = "unreachable" if failure == "network" else "PERMISSION_DENIED|Permission denied"
    with pytest.raises(InputError, match=rf"{name}: rollback stopped, champion left where it "
                                         rf"was; reading v2: .*({match})"):
        rollback(name)
    assert real.get_model_version_by_alias(name, "champion").version == "3"
    tags = real.get_registered_model(name).tags
    assert json.loads(tags[HISTORY_TAG]) == ["1", "2", "3"]
    assert not real.search_registered_models(f"name = '{name}{LOCK_SUFFIX}'")  # lock released

# ---------------------------------------------------------------- registration record


def test_registration_record_goes_to_s3(bucket: str, workdir: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """storage.path on s3://: the record is an object in the bucket, and no local folder
    named ``s3:`` appears (before the fix it was written to ./s3:/BUCKET/...)."""
    import boto3

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # down
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    exp = load_experiment(KD, [f"storage.path=s3://{bucket}/runs"])
    record_dir = join(exp.storage.path, exp.name)
    with pytest.raises(InputError, match=rf"run recorded in s3://{bucket}/runs/digits-kd/"
                                         r"registration\.json; retry with: kd register run-1"):
        register_outcome("run-1", f"s3://{bucket}/runs/digits-kd/model.safetensors", "0" * 64,
                         exp, record_dir)
    s3 = boto3.client("s3")
    body = s3.get_object(Bucket=bucket, Key="runs/digits-kd/registration.json")["Body"].read()
    doc = json.loads(body)
    assert doc["run_id"] == "run-1" and doc["status"] == "pending"
    assert not (workdir / "s3:").exists() and not list(workdir.glob("s3*"))


def test_registration_record_unwritable_bucket_is_one_clear_line(
        s3_server: str, workdir: Path) -> None:
    exp = load_experiment(KD, ["storage.path=s3://no-such-bucket-kd/runs"])
    with pytest.raises(InputError, match=r"s3://no-such-bucket-kd/runs/digits-kd/registration"
                                         r"\.json: .*retry with: kd register run-2"):
        register_outcome("run-2", "w", "0" * 64, exp, join(exp.storage.path, exp.name))
    assert not (workdir / "s3:").exists()
