"""`kd submit CONFIG --k8s`: render a RayJob (and the experiment's ConfigMap), create
them with the kubernetes Python client, follow the RayJob to its end, print the
job's logs.

Order: the RayJob first (so a missing CRD, RBAC or a name clash fails before
anything else exists), then the ConfigMap owned by it (deleted with it); the head
pod waits for its ConfigMap volume. API errors become one clear line: 403 names the
missing RBAC verb, 409 says the object already exists, 404 on the RayJob resource
means the KubeRay operator (its CRDs) is not installed.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import yaml

from kd.deploy.names import default_job_name
from kd.deploy.render import ClusterOptions, configmap, rayjob
from kd.deploy.submit import experiment_doc
from kd.errors import InputError

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
DONE = ("Complete", "Failed", "ValidationFailed")


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the experiment file) as literal blocks."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def manifests(config: str, overrides: list[str], workflow: str, name: str | None,
              namespace: str, opts: ClusterOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ConfigMap, RayJob) for ``kd WORKFLOW CONFIG overrides`` on the cluster."""
    exp_name, text = experiment_doc(config, overrides)
    name = name or default_job_name(exp_name, workflow)
    job = rayjob(name, namespace, workflow, f"{name}-experiment", opts)
    return configmap(f"{name}-experiment", namespace, text, opts.labels), job


def api_error(e: Any, verb: str, resource: str, namespace: str, name: str) -> Exception:
    """One clear error for a kubernetes ``ApiException`` (see the module docstring)."""
    status = getattr(e, "status", None)
    body = str(getattr(e, "body", "") or getattr(e, "reason", ""))
    where = f"{resource} {namespace}/{name}"
    if status == 403:
        return InputError(f"kubernetes: forbidden: RBAC verb {verb!r} on {resource} in namespace "
                          f"{namespace!r} is missing for this account (see the chart's Role, "
                          "helm/kdflow/templates/rbac.yaml)")
    if status == 409:
        return InputError(f"kubernetes: {where} already exists (pick another --name, or "
                          f"delete it: kubectl -n {namespace} delete {resource} {name})")
    if status == 404 and resource == PLURAL and "namespaces" not in body:
        return InputError("kubernetes: KubeRay operator not installed: the cluster has no "
                          "rayjobs.ray.io resource (install the kuberay-operator chart, "
                          "docs/deploy.md step 1)")
    if status == 404:
        return InputError(f"kubernetes: namespace {namespace!r} not found ({verb} {resource})")
    return RuntimeError(f"kubernetes: {verb} {where} failed: {status} {getattr(e, 'reason', '')}")


def clients() -> tuple[Any, Any]:
    """(CustomObjectsApi, CoreV1Api) from in-cluster config or KUBECONFIG."""
    from kubernetes import client, config

    try:
        config.load_config()
    except Exception as e:
        raise InputError(f"--k8s: no Kubernetes configuration (KUBECONFIG or in-cluster): "
                         f"{str(e).splitlines()[0]}") from None
    return client.CustomObjectsApi(), client.CoreV1Api()


def create(custom: Any, core: Any, cm: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """Create the RayJob, then its ConfigMap owned by it; return the created RayJob."""
    from kubernetes.client.exceptions import ApiException

    ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
    try:
        created = custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job)
    except ApiException as e:
        raise api_error(e, "create", PLURAL, ns, name) from None
    uid = (created.get("metadata") or {}).get("uid")
    if uid:
        cm["metadata"]["ownerReferences"] = [{"apiVersion": f"{GROUP}/{VERSION}",
                                              "kind": "RayJob", "name": name, "uid": uid}]
    try:
        core.create_namespaced_config_map(ns, cm)
    except ApiException as e:
        raise api_error(e, "create", "configmaps", ns, cm["metadata"]["name"]) from None
    return created


def watch(custom: Any, namespace: str, name: str, timeout_s: float, poll_s: float,
          out: TextIO) -> dict[str, Any]:
    """Poll the RayJob's status until it is done; print each change. Raises on timeout."""
    from kubernetes.client.exceptions import ApiException

    deadline, last = time.monotonic() + timeout_s, None
    while True:
        try:
            obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as e:
            raise api_error(e, "get", PLURAL, namespace, name) from None
        status = obj.get("status") or {}
        now = (status.get("jobDeploymentStatus"), status.get("jobStatus"))
        if now != last:
            print(f"[kd] RayJob {name}: deployment {now[0] or '-'}, job {now[1] or '-'}",
                  file=out, flush=True)
            last = now
        if now[0] in DONE:
            return status
        if time.monotonic() > deadline:
            raise RuntimeError(f"RayJob {namespace}/{name} not finished after {timeout_s:.0f} s "
                               f"(deployment {now[0]}, job {now[1]}); it keeps running: "
                               f"kubectl -n {namespace} get rayjob {name}")
        time.sleep(poll_s)


def print_logs(core: Any, namespace: str, name: str, out: TextIO) -> None:
    """Print the logs of the RayJob's submitter pod (``ray job submit`` tails the job)."""
    from kubernetes.client.exceptions import ApiException

    try:
        pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items
        for pod in pods[-1:]:
            out.write(core.read_namespaced_pod_log(pod.metadata.name, namespace))
    except ApiException as e:
        print(f"[kd] no job logs: {api_error(e, 'get', 'pods/log', namespace, name)}",
              file=out, flush=True)


def submit_k8s(config: str, overrides: list[str], workflow: str, namespace: str,
               opts: ClusterOptions, name: str | None = None, dry_run: bool = False,
               timeout_s: float | None = None, poll_s: float = 10.0,
               api: tuple[Any, Any] | None = None, out: TextIO | None = None) -> int:
    """`kd submit --k8s`; ``api`` = (CustomObjectsApi, CoreV1Api) to use instead of the
    configured cluster's. Returns 0 when the job succeeded, 1 otherwise."""
    out = out or sys.stdout
    cm, job = manifests(config, overrides, workflow, name, namespace, opts)
    if dry_run:
        out.write(yaml.dump_all([cm, job], Dumper=_Dumper, sort_keys=False))
        return 0
    custom, core = api or clients()
    create(custom, core, cm, job)
    name = job["metadata"]["name"]
    print(f"[kd] created RayJob {namespace}/{name}: {job['spec']['entrypoint']}", file=out,
          flush=True)
    if timeout_s is None:
        timeout_s = opts.active_deadline_s + opts.pre_running_deadline_s + 300
    status = watch(custom, namespace, name, timeout_s, poll_s, out)
    print_logs(core, namespace, name, out)
    code = 0 if status.get("jobStatus") == "SUCCEEDED" else 1
    print(f"[kd] RayJob {name}: {status.get('jobStatus')} ({status.get('reason') or 'ok'})",
          file=out, flush=True)
    return code
