"""Where a finished run's weights go: a file of its own, and the name's latest copy.

Two runs that share a ``name`` used to write one file,
``<storage.path>/<name>/model.safetensors``: the second silently replaced the first
one's weights, so the first run's ``kd.weights_uri`` tag, its `RunOutcome.weights` and a
registration made from them pointed at another run's weights. Now:

- every run writes its own file, ``<storage.path>/<name>/runs/<ray run name>/model.safetensors``
  (`run_weights_uri`; the Ray run name is unique per run, and the same when a run resumes).
  That URI is the run's weights of record: `RunOutcome.weights`, the MLflow tag
  ``kd.weights_uri``, ``--register`` and the retrain pipeline use it;
- then it copies them to ``<storage.path>/<name>/model.safetensors``
  (`kd.train.driver.final_weights_uri`), the name's latest copy, the stable path that
  configs name as a teacher and the README evaluates. Replacing another run's copy is
  printed with both runs' names, and nothing is lost: that run's weights stay at its own
  file. A latest copy that names no run (written before kdflow recorded run names) is
  first kept under ``runs/unrecorded-<sha256 prefix>/``.

The weights' metadata ``kd.ray_run_name`` (`OWNER_KEY`) records which run wrote a file.
"""

from __future__ import annotations

import json
from pathlib import Path

from kd import sse, storage
from kd.config import Experiment
from kd.errors import InputError
from kd.models.weights import WEIGHTS_FILE, read_metadata
from kd.train.driver import final_weights_uri

OWNER_KEY = "kd.ray_run_name"  # weights metadata: the Ray run that wrote the file
RUNS_DIR = "runs"  # <storage.path>/<name>/runs/<ray run name>/model.safetensors
UNKNOWN = ""  # `weights_owner` of a file that records no run
MAX_HEADER = 100_000_000  # safetensors' own limit on its JSON header


def run_weights_uri(exp: Experiment, ray_run_name: str) -> str:
    """The weights file of one run: ``<storage.path>/<name>/runs/<ray_run_name>/model.safetensors``."""
    return storage.join(exp.storage.path, exp.name, RUNS_DIR, ray_run_name, WEIGHTS_FILE)


def weights_owner(uri: str, endpoint: str | None = None) -> str | None:
    """The Ray run name recorded in the weights file at ``uri``: None when there is no
    file, `UNKNOWN` when it records none (or is not a readable safetensors file)."""
    if not storage.is_s3(uri):
        path = Path(uri)
        if not path.is_file():
            return None
        try:
            return str(read_metadata(path).get(OWNER_KEY) or UNKNOWN)
        except InputError:
            return UNKNOWN
    header = _s3_header(uri, endpoint)
    if header is None:
        return None
    try:
        meta = json.loads(header).get("__metadata__") or {}
        return str(meta.get(OWNER_KEY) or UNKNOWN)
    except (ValueError, AttributeError):
        return UNKNOWN


def _s3_header(uri: str, endpoint: str | None) -> bytes | None:
    """The JSON header of the safetensors object at ``uri`` (two ranged GETs: its 8-byte
    length, then the header); b"" for an object too short to be one; None for no object."""
    bucket, key = storage.split_s3(uri)
    client = storage.s3_client(endpoint)

    def get(first: int, last: int) -> bytes:
        return client.get_object(Bucket=bucket, Key=key, Range=f"bytes={first}-{last}")["Body"].read()

    try:
        head = get(0, 7)
        size = int.from_bytes(head, "little") if len(head) == 8 else 0
        return get(8, 8 + size - 1) if 0 < size <= MAX_HEADER else b""
    except Exception as e:  # botocore's ClientError: 404 -> no file; else a storage error
        code = str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            return None
        raise InputError(f"{uri}: cannot read the weights file's header ({e})") from None


def _keep_unrecorded(latest: str, exp: Experiment) -> str:
    """Copy a latest file that names no run to ``runs/unrecorded-<sha12>/``; its URI."""
    endpoint = exp.storage.endpoint_url
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        local = storage.fetch(latest, endpoint, cache_dir=d)
        kept = run_weights_uri(exp, f"unrecorded-{storage.sha256_file(local)[:12]}")
        storage.put(local, kept, endpoint, sse.of(exp.storage))
    return kept


def publish_weights(local: Path, exp: Experiment, ray_run_name: str) -> str:
    """Write a finished run's weights file ``local`` to `run_weights_uri`, then copy it to
    the name's latest copy (`final_weights_uri`); returns the run's own URI."""
    endpoint = exp.storage.endpoint_url
    own = run_weights_uri(exp, ray_run_name)
    storage.put(local, own, endpoint, sse.of(exp.storage))
    latest = final_weights_uri(exp)
    owner = weights_owner(latest, endpoint)
    kept = _keep_unrecorded(latest, exp) if owner == UNKNOWN else None
    storage.put(local, latest, endpoint, sse.of(exp.storage))
    if owner is not None and owner != ray_run_name:
        before = (f"run {owner}'s, which stay at {run_weights_uri(exp, owner)}" if kept is None
                  else f"weights that named no run, kept at {kept}")
        print(f"[kd] {latest} (the latest of name {exp.name!r}) now holds run {ray_run_name}'s "
              f"weights; it held {before}", flush=True)
    return own
