"""Validate kdflow's Kubernetes manifests offline, against the real schemas.

- Kubernetes objects: kubernetes-validate, Kubernetes 1.33 schemas, strict (unknown
  fields fail). The pod templates inside Ray objects are checked the same way, as Pods.
- KubeRay RayJob / RayCluster / RayCronJob / RayService: the v1.7.0 CRDs' openAPIV3Schema
  from ../shared/schemas/kuberay-v1.7.0, with every object schema closed
  (``additionalProperties: false``) so a misspelled field fails.
- KubeRay's cross-field rules (validation.go): a TTL needs shutdownAfterJobFinishes,
  deletionStrategy excludes it, clusterSelector excludes backoffLimit > 0 and suspend,
  RayJob names <= 47 and RayCronJob names <= 36 characters (DNS-1035).

Run: ``python scripts/validate_k8s.py`` renders the chart (default values and every
helm/kdflow/ci/*-values.yaml) and every k8s/overlays/* with the binaries in .tools/bin
(scripts/fetch-k8s-tools.sh) and validates all of it; exit 1 on any error.
"""

from __future__ import annotations

import copy
import functools
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / ".tools" / "bin"
K8S_VERSION = "1.33.0"
RAY_KINDS = {"RayJob": "rayjobs", "RayCluster": "rayclusters", "RayCronJob": "raycronjobs",
             "RayService": "rayservices"}
NAME_LIMITS = {"RayJob": 47, "RayCronJob": 36}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def schema_dir() -> Path:
    """../shared/schemas/kuberay-v1.7.0, beside the repository (CI's clone too)."""
    for base in (REPO.parent / "shared", REPO / "shared", REPO.parent.parent / "shared"):
        d = base / "schemas" / "kuberay-v1.7.0"
        if d.is_dir():
            return d
    raise FileNotFoundError("KubeRay v1.7.0 CRDs not found in ../shared/schemas/kuberay-v1.7.0")


def close(schema: Any) -> Any:
    """A copy of ``schema`` where every object schema with ``properties`` and no
    ``additionalProperties`` / ``x-kubernetes-preserve-unknown-fields`` is closed."""
    if isinstance(schema, list):
        return [close(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: close(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


META = {"type": "object", "required": ["name"], "additionalProperties": True,
        "properties": {"name": {"type": "string", "minLength": 1},
                       "namespace": {"type": "string"},
                       "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                       "annotations": {"type": "object",
                                       "additionalProperties": {"type": "string"}}}}


@functools.cache
def kuberay_schema(kind: str) -> dict[str, Any]:
    """The closed openAPIV3Schema of ``kind`` (ray.io/v1) from the KubeRay v1.7.0 CRD;
    the top-level ``metadata`` (an open ``object`` in the CRD) becomes ObjectMeta's core."""
    crd = yaml.safe_load((schema_dir() / f"ray.io_{RAY_KINDS[kind]}.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = close(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    schema["properties"]["metadata"] = META
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind",
                                                                   "metadata", "spec"})
    return schema


def _path(err: Any) -> str:
    return ".".join(str(p) for p in err.absolute_path) or "(root)"


def check_kuberay(doc: dict[str, Any]) -> list[str]:
    """Schema errors of a KubeRay object, each ``<kind>/<name>: <field path>: <message>``."""
    import jsonschema

    kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name")
    validator = jsonschema.Draft7Validator(kuberay_schema(kind))
    return [f"{kind}/{name}: {_path(e)}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))]


def _job_rules(spec: dict[str, Any], where: str) -> list[str]:
    errs = []
    if spec.get("ttlSecondsAfterFinished") and not spec.get("shutdownAfterJobFinishes"):
        errs.append(f"{where}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
    if spec.get("deletionStrategy") and spec.get("shutdownAfterJobFinishes"):
        errs.append(f"{where}: deletionStrategy cannot be combined with shutdownAfterJobFinishes")
    if spec.get("clusterSelector") and (spec.get("backoffLimit") or 0) > 0:
        errs.append(f"{where}: clusterSelector cannot be combined with backoffLimit > 0")
    if spec.get("clusterSelector") and spec.get("suspend"):
        errs.append(f"{where}: clusterSelector cannot be combined with suspend")
    return errs


def cross_field(doc: dict[str, Any]) -> list[str]:
    """KubeRay's own rules beyond the schema (see the module docstring)."""
    kind, name = doc.get("kind"), str((doc.get("metadata") or {}).get("name", ""))
    where, errs = f"{kind}/{name}", []
    if kind in NAME_LIMITS:
        if len(name) > NAME_LIMITS[kind]:
            errs.append(f"{where}: metadata.name has {len(name)} characters; "
                        f"KubeRay allows at most {NAME_LIMITS[kind]}")
        if not DNS1035.match(name):
            errs.append(f"{where}: metadata.name is not a DNS-1035 label")
    spec = doc.get("spec") or {}
    if kind == "RayJob":
        errs += _job_rules(spec, where)
    if kind == "RayCronJob":
        errs += _job_rules(spec.get("jobTemplate") or {}, f"{where}: jobTemplate")
    return errs


def pod_templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod template) of every Ray group in a RayJob / RayCronJob / RayCluster /
    RayService."""
    spec = doc.get("spec") or {}
    spec = spec.get("jobTemplate", spec)
    cluster = spec.get("rayClusterSpec", spec.get("rayClusterConfig", spec))
    out = []
    head = (cluster.get("headGroupSpec") or {}).get("template")
    if head:
        out.append(("headGroupSpec", head))
    for i, g in enumerate(cluster.get("workerGroupSpecs") or []):
        if g.get("template"):
            out.append((f"workerGroupSpecs.{i}", g["template"]))
    return out


def check_k8s(doc: dict[str, Any]) -> list[str]:
    """kubernetes-validate (1.33, strict) errors of a core object, or of the Pods a Ray
    object's templates make."""
    import kubernetes_validate

    kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name")
    if kind in RAY_KINDS:
        docs = [(f"{kind}/{name}: {w}", {"apiVersion": "v1", "kind": "Pod",
                                         "metadata": {"name": "x", **(t.get("metadata") or {})},
                                         "spec": t.get("spec")}) for w, t in pod_templates(doc)]
    else:
        docs = [(f"{kind}/{name}", doc)]
    errs = []
    for where, d in docs:
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errs.append(f"{where}: {_path(e)}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            errs.append(f"{where}: no Kubernetes {K8S_VERSION} schema for {d.get('apiVersion')}")
    return errs


def embedded_cluster(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The RayCluster a RayJob / RayCronJob / RayService makes (its rayClusterSpec /
    rayClusterConfig as a RayCluster)."""
    spec = doc.get("spec") or {}
    spec = spec.get("jobTemplate", spec)
    key = "rayClusterConfig" if doc.get("kind") == "RayService" else "rayClusterSpec"
    if doc.get("kind") not in ("RayJob", "RayCronJob", "RayService") or key not in spec:
        return None
    name = f"{(doc.get('metadata') or {}).get('name')}-cluster"
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": name},
            "spec": spec[key]}


def validate(docs: list[dict[str, Any]]) -> list[str]:
    """Every error of every object (empty list: all valid); a RayJob's / RayCronJob's
    cluster is also checked as the RayCluster KubeRay will create from it."""
    errs: list[str] = []
    for doc in docs:
        if doc.get("kind") in RAY_KINDS:
            errs += check_kuberay(doc) + cross_field(doc)
            cluster = embedded_cluster(doc)
            if cluster is not None:
                errs += check_kuberay(cluster)
        errs += check_k8s(doc)
    return errs


def run_tool(tool: str, *args: str) -> str:
    """Run .tools/bin/<tool> (helm / kubectl) and return stdout; raise with its stderr."""
    exe = TOOLS / tool
    if not exe.exists():
        raise FileNotFoundError(f"{exe} missing: run scripts/fetch-k8s-tools.sh")
    res = subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(args)} failed:\n{res.stderr.strip()}")
    return res.stdout


def load_all(text: str) -> list[dict[str, Any]]:
    """The objects of a multi-document YAML stream (empty documents dropped)."""
    return [d for d in yaml.safe_load_all(text) if d]


def helm_template(*values: str, release: str = "kdflow", namespace: str = "kdflow",
                  sets: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """``helm template`` of helm/kdflow with the given values files / --set pairs."""
    args = ["template", release, "helm/kdflow", "--namespace", namespace]
    for v in values:
        args += ["-f", v]
    for s in sets:
        args += ["--set", s]
    return load_all(run_tool("helm", *args))


def targets() -> dict[str, list[dict[str, Any]]]:
    """Everything the project ships, rendered: the chart (default + ci/ value sets) and
    every kustomize overlay."""
    out = {"helm default": helm_template()}
    for f in sorted((REPO / "helm" / "kdflow" / "ci").glob("*-values.yaml")):
        out[f"helm {f.name}"] = helm_template(str(f))
    for d in sorted((REPO / "k8s" / "overlays").iterdir()):
        out[f"kustomize {d.name}"] = load_all(run_tool("kubectl", "kustomize", str(d)))
    return out


def main() -> int:
    """Lint the chart, render everything, validate; print one line per error."""
    run_tool("helm", "lint", "--strict", "helm/kdflow")
    failed = 0
    for label, docs in targets().items():
        errs = validate(docs)
        kinds = sorted({d["kind"] for d in docs})
        print(f"{label}: {len(docs)} objects ({', '.join(kinds)}): "
              f"{'ok' if not errs else f'{len(errs)} errors'}")
        for e in errs:
            print(f"  {e}")
        failed += bool(errs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
