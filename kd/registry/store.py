"""The MLflow model registry as kdflow reads it: bounded retries, one-line errors,
``models:/`` URIs resolved to versions, and sha256-verified downloads.

Every registered version carries the tag ``kd.weights_sha256``; `download_version`
recomputes the sha256 of ``data/model.safetensors`` and refuses a mismatch.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd.errors import InputError
from kd.models.weights import WEIGHTS_FILE
from kd.registry.loader import DATA_DIR
from kd.storage import sha256_file

# MLflow's REST client retries with exponential backoff; its defaults (7 retries,
# factor 2, 120 s timeout) can hang a CLI for minutes. kdflow bounds them unless
# the user set them: 3 retries, backoff factor 1 (about 1 + 2 + 4 s), 30 s per request.
RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
SHA_TAG = "kd.weights_sha256"
WEIGHTS_PATH = f"{DATA_DIR}/{WEIGHTS_FILE}"
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))/?$")


class RegistryUnavailable(InputError):
    """The tracking server could not be reached after the bounded retries."""


class AliasNotSet(InputError):
    """``models:/NAME@ALIAS`` names an alias that is not set (or whose version was deleted)."""


def bound_retries() -> None:
    """Set kdflow's bounded MLflow HTTP retry settings where the user set none."""
    for k, v in RETRY_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def registry_client(uri: str | None = None) -> Any:
    """An `MlflowClient` for ``uri`` (default: kdflow's tracking URI) with bounded retries."""
    bound_retries()
    from kd.tracking import client, tracking_uri

    return client(uri or tracking_uri())


def explain(e: Exception, what: str) -> InputError:
    """One-line `InputError` for an MLflow / connection failure while doing ``what``."""
    text = " ".join(str(e).split())
    low = text.lower()
    if any(s in low for s in ("max retries exceeded", "connection refused", "failed to establish",
                              "read timed out", "connectionerror", "name or service not known")):
        from kd.tracking import tracking_uri

        tries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "?")
        return RegistryUnavailable(f"{what}: tracking server {tracking_uri()} unreachable "
                                   f"after {tries} retries")
    code = getattr(e, "error_code", "")
    if code == "RESOURCE_DOES_NOT_EXIST" or "not found" in low or "does not exist" in low:
        return InputError(f"{what}: {text[:300]}")
    return InputError(f"{what}: {type(e).__name__}: {text[:300]}")


@dataclass(frozen=True)
class ModelRef:
    """A parsed ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``."""

    name: str
    version: str | None = None
    alias: str | None = None


def parse_uri(uri: str) -> ModelRef:
    """Parse a ``models:/`` URI; anything else is an `InputError`."""
    m = _URI.match(uri)
    if not m:
        raise InputError(f"{uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    return ModelRef(m["name"], m["version"], m["alias"])


@dataclass(frozen=True)
class Version:
    """The parts of an MLflow `ModelVersion` kdflow uses (version always a str)."""

    name: str
    version: str
    run_id: str | None
    tags: dict[str, str]


def get_version(c: Any, ref: ModelRef) -> Version:
    """The `ModelVersion` a reference points at; clear errors for an unknown name,
    an unknown alias and an alias whose version was deleted."""
    what = f"models:/{ref.name}" + (f"@{ref.alias}" if ref.alias else f"/{ref.version}")
    try:
        c.get_registered_model(ref.name)
    except Exception as e:
        err = explain(e, what)
        if isinstance(err, RegistryUnavailable):
            raise err from None
        raise InputError(f"{what}: no registered model named {ref.name!r}") from None
    try:
        mv = (c.get_model_version_by_alias(ref.name, ref.alias) if ref.alias
              else c.get_model_version(ref.name, ref.version))
        return Version(mv.name, str(mv.version), mv.run_id, dict(mv.tags or {}))
    except Exception as e:
        err = explain(e, what)
        if isinstance(err, RegistryUnavailable):
            raise err from None
        if ref.alias:
            raise AliasNotSet(f"{what}: alias {ref.alias!r} is not set or points at a deleted "
                             "version") from None
        raise InputError(f"{what}: version {ref.version} does not exist") from None


def verify_weights(local_dir: Path, expected: str | None, what: str) -> Path:
    """``local_dir/data/model.safetensors`` after checking its sha256 against ``expected``."""
    path = Path(local_dir) / WEIGHTS_PATH
    if not path.is_file():
        raise InputError(f"{what}: the model has no {WEIGHTS_PATH} (not a kdflow model)")
    if not expected:
        raise InputError(f"{what}: the version has no {SHA_TAG} tag; refusing an unverifiable "
                         "model")
    got = sha256_file(path)
    if got != expected:
        raise InputError(f"{what}: checksum mismatch: {WEIGHTS_PATH} has sha256 {got[:16]}... but "
                         f"the registry recorded {expected[:16]}...; refusing to load it")
    return path


def download_version(c: Any, mv: Any, dst: str | None = None,
                     weights_only: bool = False) -> Path:
    """Download a model version's files (only ``data/student`` when ``weights_only``) and
    verify its weights; returns the model folder."""
    import mlflow

    what = f"models:/{mv.name}/{mv.version}"
    dst = dst or tempfile.mkdtemp(prefix="kd-model-")
    sub = "/" + WEIGHTS_PATH.rsplit("/", 1)[0] if weights_only else ""
    try:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=what + sub, dst_path=dst))
    except Exception as e:
        raise explain(e, f"{what}: download") from None
    local = Path(dst) if weights_only else got
    if weights_only and not (local / WEIGHTS_PATH).is_file():
        (local / WEIGHTS_PATH).parent.mkdir(parents=True, exist_ok=True)
        for f in got.iterdir():
            f.replace(local / WEIGHTS_PATH.rsplit("/", 1)[0] / f.name)
    verify_weights(local, (mv.tags or {}).get(SHA_TAG), what)
    return local


def fetch_verified(uri: str, allow_foreign: bool = False) -> Path:
    """Resolve a ``models:/`` URI, download it and verify its sha256; the local folder.

    A version kdflow did not register (no ``kd.weights_sha256`` tag) is an error, or with
    ``allow_foreign`` downloaded whole and unverified (a ``[kd]`` line says so)."""
    import mlflow

    c = registry_client()
    mv = get_version(c, parse_uri(uri))
    if SHA_TAG in mv.tags or not allow_foreign:
        return download_version(c, mv, weights_only=True)
    print(f"[kd] {uri}: not registered by kdflow (no {SHA_TAG} tag); loading it unverified",
          flush=True)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as e:
        raise explain(e, f"{uri}: download") from None


def fetch_weights(uri: str) -> Path:
    """The resolver for ``models:/`` weights URIs: verified when kdflow registered the
    version, else downloaded whole (see `fetch_verified`)."""
    return fetch_verified(uri, allow_foreign=True)


def install_resolver() -> None:
    """Let `kd.models.weights.resolve` (teacher and init weights) read ``models:/`` URIs
    through `fetch_weights`. Called by the layers above train/ (cli, tune)."""
    from kd.models.weights import register_resolver

    register_resolver("models:/", fetch_weights)
