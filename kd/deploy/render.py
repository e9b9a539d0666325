"""Render KubeRay RayJob / RayCronJob manifests (and the experiment's ConfigMap).

The Helm chart's templates (helm/kdflow/templates/rayjob.yaml, raycronjob.yaml)
mirror these functions; tests/test_k8s.py renders both from the same inputs and
requires equal specs. Shape of every RayJob (facts: KubeRay v1.7.0):

- a head with ``num-cpus: "0"`` (no training on the head) and a GPU worker group
  (``nvidia.com/gpu`` in requests and limits, the ``nvidia.com/gpu`` NoSchedule
  toleration, ``replicas = minReplicas = maxReplicas``);
- ``rayVersion`` = the image's Ray; ``shutdownAfterJobFinishes: true`` with a TTL
  (KubeRay rejects a TTL without it); ``activeDeadlineSeconds`` and
  ``preRunningDeadlineSeconds`` (an image-pull failure ends the job instead of
  hanging); ``backoffLimit`` (RayJob retries, each one a new RayCluster) and
  ``submitterConfig.backoffLimit``;
- the entrypoint ``kd <workflow> /etc/kdflow/experiment.yaml``: kdflow is installed
  in the image, the experiment comes from a ConfigMap mounted into the head (where
  the driver runs). The run name is derived from ``OWNER_NAME`` (= the RayJob's
  name, stable across retries; `kd.runtime.run_name_from_env`), so a retry resumes
  from the S3 checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kd.deploy.names import check_name
from kd.errors import InputError

API_VERSION = "ray.io/v1"
CONFIG_DIR = "/etc/kdflow"
CONFIG_FILE = "experiment.yaml"
WORKFLOWS = ("teacher", "distill", "tune", "retrain")
GPU = "nvidia.com/gpu"


@dataclass
class ClusterOptions:
    """What a RayJob runs on; the defaults equal helm/kdflow/values.yaml's."""

    image: str = "kdflow/train:0.1.0"
    pull_policy: str = "IfNotPresent"
    ray_version: str = "2.60.0"
    workers: int = 1
    gpus_per_worker: int = 1
    gpu_type: str = ""  # node label nvidia.com/gpu.product; "" = any GPU node
    worker_cpu: str = "8"
    worker_memory: str = "32Gi"
    head_cpu: str = "2"
    head_memory: str = "8Gi"
    service_account: str = "kdflow"
    mlflow_uri: str = "http://kdflow-mlflow:5000"
    s3_endpoint: str = ""
    s3_secret: str = "kdflow-s3"  # Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    active_deadline_s: int = 86400
    pre_running_deadline_s: int = 900
    ttl_s: int = 3600
    backoff_limit: int = 2
    submitter_backoff_limit: int = 2
    labels: dict[str, str] = field(default_factory=dict)


def entrypoint(workflow: str) -> str:
    """The RayJob's entrypoint for ``workflow``."""
    return f"kd {workflow} {CONFIG_DIR}/{CONFIG_FILE}"


def security_context() -> dict[str, Any]:
    """Container securityContext. The root filesystem stays writable: Ray writes its
    session files, logs and caches under /tmp and the home directory."""
    return {"allowPrivilegeEscalation": False, "privileged": False,
            "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": False,
            "runAsNonRoot": True}


def pod_security_context() -> dict[str, Any]:
    """Pod securityContext: the image's non-root ``ray`` user (uid 1000)."""
    return {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100,
            "seccompProfile": {"type": "RuntimeDefault"}}


def env(opts: ClusterOptions) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(env, envFrom) of every Ray container: the MLflow URI, the S3 endpoint, and the
    S3 credentials from a Secret (never inline)."""
    values = [{"name": "MLFLOW_TRACKING_URI", "value": opts.mlflow_uri}]
    if opts.s3_endpoint:
        values.append({"name": "AWS_ENDPOINT_URL_S3", "value": opts.s3_endpoint})
    env_from = [{"secretRef": {"name": opts.s3_secret}}] if opts.s3_secret else []
    return values, env_from


def container(opts: ClusterOptions, name: str, cpu: str, memory: str, gpus: int,
              mounts: list[dict[str, Any]]) -> dict[str, Any]:
    """One Ray container with requests = limits (GPUs in both)."""
    res: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        res[GPU] = str(gpus)
    values, env_from = env(opts)
    c: dict[str, Any] = {"name": name, "image": opts.image, "imagePullPolicy": opts.pull_policy,
                         "env": values, "resources": {"requests": dict(res), "limits": dict(res)},
                         "securityContext": security_context()}
    if env_from:
        c["envFrom"] = env_from
    if mounts:
        c["volumeMounts"] = mounts
    return c


def pod_labels(opts: ClusterOptions) -> dict[str, str]:
    """Labels of every Ray pod (the NetworkPolicy selects on them)."""
    return {"app.kubernetes.io/name": "kdflow", "app.kubernetes.io/component": "ray",
            **opts.labels}


def head_group(opts: ClusterOptions, config_map: str) -> dict[str, Any]:
    """The head: no training (``num-cpus: "0"``), the experiment mounted read-only."""
    mount = [{"name": "experiment", "mountPath": CONFIG_DIR, "readOnly": True}]
    pod = {"serviceAccountName": opts.service_account,
           "automountServiceAccountToken": False,
           "securityContext": pod_security_context(),
           "containers": [container(opts, "ray-head", opts.head_cpu, opts.head_memory, 0, mount)],
           "volumes": [{"name": "experiment", "configMap": {"name": config_map}}]}
    return {"rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": {"metadata": {"labels": pod_labels(opts)}, "spec": pod}}


def worker_group(opts: ClusterOptions) -> dict[str, Any]:
    """The GPU worker group: fixed size, GPU requests/limits and toleration."""
    pod: dict[str, Any] = {
        "serviceAccountName": opts.service_account, "automountServiceAccountToken": False,
        "securityContext": pod_security_context(),
        "tolerations": [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}],
        "containers": [container(opts, "ray-worker", opts.worker_cpu, opts.worker_memory,
                                 opts.gpus_per_worker, [])]}
    if opts.gpu_type:
        pod["nodeSelector"] = {"nvidia.com/gpu.product": opts.gpu_type}
    return {"groupName": "gpu", "replicas": opts.workers, "minReplicas": opts.workers,
            "maxReplicas": opts.workers, "rayStartParams": {},
            "template": {"metadata": {"labels": pod_labels(opts)}, "spec": pod}}


def rayjob_spec(workflow: str, config_map: str, opts: ClusterOptions) -> dict[str, Any]:
    """The ``spec`` of a RayJob (also a RayCronJob's ``jobTemplate``)."""
    if workflow not in WORKFLOWS:
        raise InputError(f"workflow: {workflow!r} is not one of {', '.join(WORKFLOWS)}")
    return {
        "entrypoint": entrypoint(workflow),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": opts.ttl_s,
        "activeDeadlineSeconds": opts.active_deadline_s,
        "preRunningDeadlineSeconds": opts.pre_running_deadline_s,
        "backoffLimit": opts.backoff_limit,
        "submitterConfig": {"backoffLimit": opts.submitter_backoff_limit},
        "rayClusterSpec": {"rayVersion": opts.ray_version,
                           "headGroupSpec": head_group(opts, config_map),
                           "workerGroupSpecs": [worker_group(opts)]},
    }


def metadata(name: str, namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    """ObjectMeta with kdflow's labels."""
    return {"name": name, "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "kdflow", **labels}}


def rayjob(name: str, namespace: str, workflow: str, config_map: str,
           opts: ClusterOptions) -> dict[str, Any]:
    """A RayJob; its name is checked against KubeRay's limit (47, DNS-1035)."""
    check_name(name, "RayJob")
    return {"apiVersion": API_VERSION, "kind": "RayJob",
            "metadata": metadata(name, namespace, opts.labels),
            "spec": rayjob_spec(workflow, config_map, opts)}


def raycronjob(name: str, namespace: str, workflow: str, config_map: str, schedule: str,
               time_zone: str, opts: ClusterOptions) -> dict[str, Any]:
    """A RayCronJob (Alpha feature gate ``RayCronJob`` in KubeRay 1.7); name limit 36.
    Overlapping runs are not prevented by KubeRay: the workflow locks itself."""
    check_name(name, "RayCronJob")
    return {"apiVersion": API_VERSION, "kind": "RayCronJob",
            "metadata": metadata(name, namespace, opts.labels),
            "spec": {"schedule": schedule, "timeZone": time_zone,
                     "jobTemplate": rayjob_spec(workflow, config_map, opts)}}


def configmap(name: str, namespace: str, experiment_yaml: str,
              labels: dict[str, str] | None = None) -> dict[str, Any]:
    """The ConfigMap that carries the experiment file to the head."""
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": metadata(name, namespace, labels or {}),
            "data": {CONFIG_FILE: experiment_yaml}}
