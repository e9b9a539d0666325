"""`kd submit`: --k8s up to the API call (a fake CustomObjectsApi / CoreV1Api gets the
exact objects; real `ApiException`s for 403 / 409 / 404), the KubeRay name rules, the
OWNER_NAME run name, and the Ray Jobs path for real against a token-auth head."""

from __future__ import annotations

import io
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from kd.cli import run
from kd.deploy import k8s
from kd.deploy.names import RAYCRONJOB_MAX, RAYJOB_MAX, check_name, default_job_name
from kd.deploy.render import ClusterOptions, raycronjob, rayjob
from kd.errors import InputError
from kd.runtime import run_name_from_env
from tests.conftest import CONFIGS

CONFIG = str(CONFIGS / "digits-teacher.yaml")


class FakeCustom:
    """Records create calls; answers get with the given statuses, or raises ``error``."""

    def __init__(self, statuses: list[dict[str, Any]] | None = None,
                 error: ApiException | None = None) -> None:
        self.created: list[tuple] = []
        self.statuses = list(statuses or [{"jobDeploymentStatus": "Complete",
                                            "jobStatus": "SUCCEEDED"}])
        self.error = error

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):  # noqa: ANN001, ANN201
        if self.error is not None:
            raise self.error
        self.created.append((group, version, namespace, plural, body))
        return {**body, "metadata": {**body["metadata"], "uid": "uid-123"}}

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):  # noqa: ANN001, ANN201
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return {"metadata": {"name": name}, "status": status}


class FakeCore:
    def __init__(self, error: ApiException | None = None) -> None:
        self.configmaps: list[tuple[str, dict]] = []
        self.error = error

    def create_namespaced_config_map(self, namespace, body):  # noqa: ANN001, ANN201
        if self.error is not None:
            raise self.error
        self.configmaps.append((namespace, body))

    def list_namespaced_pod(self, namespace, label_selector):  # noqa: ANN001, ANN201
        assert label_selector == "job-name=digits-job"
        return SimpleNamespace(items=[SimpleNamespace(metadata=SimpleNamespace(name="digits-job-x"))])

    def read_namespaced_pod_log(self, name, namespace):  # noqa: ANN001, ANN201
        return f"log of {name}\n"


def _submit(custom: FakeCustom, core: FakeCore, **kw: Any) -> tuple[int, str]:
    out = io.StringIO()
    code = k8s.submit_k8s(CONFIG, ["trainer.epochs=1"], "teacher", "ml", ClusterOptions(),
                          name="digits-job", poll_s=0.0, api=(custom, core), out=out, **kw)
    return code, out.getvalue()


def test_submit_k8s_sends_the_rendered_rayjob_then_its_configmap() -> None:
    custom, core = FakeCustom(), FakeCore()
    code, out = _submit(custom, core)
    assert code == 0
    expected_cm, expected_job = k8s.manifests(CONFIG, ["trainer.epochs=1"], "teacher",
                                              "digits-job", "ml", ClusterOptions())
    assert custom.created == [("ray.io", "v1", "ml", "rayjobs", expected_job)]
    job = custom.created[0][4]
    assert job["spec"]["entrypoint"] == "kd teacher /etc/kdflow/experiment.yaml"
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["volumes"][0]["configMap"]["name"] == "digits-job-experiment"
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                      "effect": "NoSchedule"}]
    ns, cm = core.configmaps[0]
    assert ns == "ml" and cm["metadata"]["ownerReferences"] == [
        {"apiVersion": "ray.io/v1", "kind": "RayJob", "name": "digits-job", "uid": "uid-123"}]
    sent = yaml.safe_load(cm["data"]["experiment.yaml"])
    assert sent["name"] == "digits-teacher" and sent["trainer"]["epochs"] == 1
    assert cm["data"] == expected_cm["data"]
    assert "log of digits-job-x" in out and "SUCCEEDED" in out


def test_submit_k8s_failed_job_exits_1_and_timeout_is_an_error() -> None:
    failed = FakeCustom([{"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
                         {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED",
                          "reason": "AppFailed"}])
    code, out = _submit(failed, FakeCore())
    assert code == 1 and "deployment Running" in out and "AppFailed" in out
    stuck = FakeCustom([{"jobDeploymentStatus": "Initializing"}])
    with pytest.raises(RuntimeError, match="not finished after 0 s"):
        _submit(stuck, FakeCore(), timeout_s=0.0)


def _api(status: int, reason: str, body: str = "") -> ApiException:
    e = ApiException(status=status, reason=reason)
    e.body = body
    return e


@pytest.mark.parametrize(("err", "message"), [
    (_api(403, "Forbidden", '{"message": "rayjobs.ray.io is forbidden"}'),
     "RBAC verb 'create' on rayjobs in namespace 'ml' is missing"),
    (_api(409, "Conflict", '{"reason": "AlreadyExists"}'), "rayjobs ml/digits-job already exists"),
    (_api(404, "Not Found", "404 page not found"), "KubeRay operator not installed"),
    (_api(404, "Not Found", '{"message": "namespaces \\"ml\\" not found"}'),
     "namespace 'ml' not found"),
])
def test_submit_k8s_api_errors_are_one_clear_line(err: ApiException, message: str) -> None:
    with pytest.raises(InputError, match=message):
        _submit(FakeCustom(error=err), FakeCore())


def test_submit_k8s_configmap_forbidden_names_its_verb() -> None:
    with pytest.raises(InputError, match="RBAC verb 'create' on configmaps"):
        _submit(FakeCustom(), FakeCore(error=_api(403, "Forbidden")))


def test_kd_submit_dry_run_prints_the_manifests(capsys: pytest.CaptureFixture[str]) -> None:
    code = run(["submit", CONFIG, "--k8s", "--namespace", "ml", "--name", "digits-job",
                "--dry-run", "--gpus-per-worker", "4", "--gpu-type", "NVIDIA-H100-80GB-HBM3"])
    assert code == 0
    cm, job = list(yaml.safe_load_all(capsys.readouterr().out))
    assert cm["kind"] == "ConfigMap" and job["kind"] == "RayJob"
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert worker["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == "4"


def test_kd_submit_bad_input_exits_2_naming_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["submit", CONFIG, "--k8s", "--dry-run", "--name", "x" * 48]) == 2
    assert "metadata.name: RayJob name" in capsys.readouterr().err
    assert run(["submit", CONFIG, "trainer.epochs=-1", "--k8s", "--dry-run"]) == 2
    assert "trainer.epochs" in capsys.readouterr().err
    assert run(["submit", CONFIG]) == 2
    assert "exactly one of --address URL" in capsys.readouterr().err


def test_name_rules() -> None:
    assert check_name("a" * RAYJOB_MAX, "RayJob")
    with pytest.raises(InputError, match="48 characters; KubeRay allows at most 47"):
        check_name("a" * (RAYJOB_MAX + 1), "RayJob")
    with pytest.raises(InputError, match="at most 36"):
        raycronjob("a" * (RAYCRONJOB_MAX + 1), "ml", "retrain", "cm", "0 3 * * 1", "Etc/UTC",
                   ClusterOptions())
    for bad in ("1abc", "abc-", "a_b", "Abc"):
        with pytest.raises(InputError, match="DNS-1035"):
            rayjob(bad, "ml", "distill", "cm", ClusterOptions())
    with pytest.raises(InputError, match="workflow: 'serve'"):
        rayjob("ok", "ml", "serve", "cm", ClusterOptions())
    long = default_job_name("A_Very.Long_Experiment_Name_That_Goes_On_And_On", "retrain", 0)
    assert len(long) <= RAYJOB_MAX and long.endswith("-retrain-700101000000")
    assert default_job_name("123", "tune", 0).startswith("kd-123-tune-")


def test_run_name_from_owner_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OWNER_NAME", raising=False)
    assert run_name_from_env("student") is None
    monkeypatch.setenv("OWNER_NAME", "digits-kd-distill-2411")
    # the same RayJob name on every retry -> the same Ray Train run name -> resume
    assert run_name_from_env("student") == "digits-kd-distill-2411-student"
    assert run_name_from_env("teacher") == "digits-kd-distill-2411-teacher"


# --- the Ray Jobs API path, for real ------------------------------------------------


def _ray_submit(address: str, env: dict[str, str], tmp_path: Path, *extra: str
                ) -> tuple[int, str]:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "kd.cli", "submit", CONFIG, "trainer.epochs=1",
           "scaling.num_workers=1", "teacher.model=mlp", "teacher.args={hidden: [16]}",
           f"storage.path={tmp_path / 'runs'}", "tracking.experiment=submit",
           f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *extra,
           "--workflow", "teacher", "--address", address]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    return res.returncode, res.stdout + res.stderr


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("ray_head", [{"OWNER_NAME": "digits-teacher-rj"}], indirect=True)
def test_kd_submit_ray_jobs_api(ray_head: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    address, env = ray_head
    started = time.time()
    code, out = _ray_submit(address, env, tmp_path)
    assert code == 0, out[-4000:]
    assert "[kd] teacher run digits-teacher-rj-teacher" in out  # the job's logs, streamed
    assert "SUCCEEDED: exit code 0" in out
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (r,) = c.search_runs([c.get_experiment_by_name("submit").experiment_id])
    assert r.info.status == "FINISHED" and r.info.start_time / 1000 >= started - 5
    # OWNER_NAME (KubeRay's RayJob name) reached the driver and named the Ray Train run
    assert r.data.tags["kd.ray_run_name"] == "digits-teacher-rj-teacher"

    # a config that validates here but fails in the job: the job's exit code (2) comes back
    code, out = _ray_submit(address, env, tmp_path, f"data.source={tmp_path / 'missing.npz'}")
    assert code == 2, out[-4000:]
    assert "FAILED: exit code 2" in out and "missing.npz" in out

    # without the token the head refuses: one clear line, exit 2
    noauth = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    code, out = _ray_submit(address, noauth, tmp_path)
    assert code == 2 and "kd: error: --address" in out, out[-2000:]


def test_tune_sweep_name_is_stable_under_a_rayjob(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    from kd.config import load_experiment
    from kd.tune.sweep import _save_state, owner_sweep

    exp = load_experiment(CONFIGS / "digits-kd.yaml", [f"storage.path={tmp_path}"])
    monkeypatch.delenv("OWNER_NAME", raising=False)
    assert owner_sweep(exp) == (None, False)
    monkeypatch.setenv("OWNER_NAME", "digits-kd-tune-2411")
    assert owner_sweep(exp) == ("digits-kd-tune-2411-sweep", False)  # first attempt: new sweep
    _save_state(exp, {"sweep": "digits-kd-tune-2411-sweep", "parent_run_id": "p", "base": {}})
    assert owner_sweep(exp) == ("digits-kd-tune-2411-sweep", True)  # a retry: resume it
    monkeypatch.setenv("OWNER_NAME", "digits-kd-tune-2412")  # next week's job: a new sweep
    assert owner_sweep(exp) == ("digits-kd-tune-2412-sweep", False)
