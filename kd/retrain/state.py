"""Pipeline state: which stages finished and what they produced.

Two records, written after every stage: a JSON file
``<storage.path>/retrain/<model>/<pipeline-id>/state.json`` (replaced atomically: a
rename on disk, a single PUT on S3) and tags on the pipeline's MLflow parent run
(``kd.stage.<name>`` = running / done / failed, ``kd.stage.<name>.seconds``,
``kd.stage.<name>.out`` = the stage's outputs as JSON). Resume reads the file; when it
is missing (storage wiped) the parent run's tags rebuild it.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from kd import storage, tracking
from kd.errors import InputError

TAG_MAX = 5000
PIPELINE_TAG = "kd.retrain.pipeline_id"


class State:
    """The state document of one pipeline and where it lives."""

    def __init__(self, uri: str, endpoint: str | None, doc: dict[str, Any],
                 sse: dict[str, str] | None = None) -> None:
        self.uri, self.endpoint, self.doc, self.sse = uri, endpoint, doc, sse

    @classmethod
    def load(cls, folder: str, endpoint: str | None, fresh: dict[str, Any],
             sse: dict[str, str] | None = None) -> State:
        """The stored state of the pipeline in ``folder``, else ``fresh`` when there is
        none. A state file that exists but is corrupt or truncated (its recorded sha256
        differs, or it is not a JSON object) is an `InputError` naming it: starting over
        silently would repeat stages that finished."""
        uri = storage.join(folder, "state.json")
        if not exists(uri, endpoint):
            return cls(uri, endpoint, fresh, sse)
        try:
            doc = json.loads(storage.fetch(uri, endpoint).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{uri}: not a readable retrain state file ({type(e).__name__}); "
                             "corrupt or truncated") from None
        if not isinstance(doc, dict):
            raise InputError(f"{uri}: not a retrain state file (a JSON object expected)")
        return cls(uri, endpoint, doc, sse)

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        """Stage name -> record (status, attempts, seconds, out, error)."""
        return self.doc.setdefault("stages", {})

    def done(self, name: str) -> bool:
        """True when stage ``name`` finished in this or an earlier attempt."""
        return self.stages.get(name, {}).get("status") == "done"

    def out(self, name: str) -> dict[str, Any]:
        """The outputs stage ``name`` recorded ({} when it has not finished)."""
        return dict(self.stages.get(name, {}).get("out", {}))

    def attempts(self, name: str) -> int:
        """How many times stage ``name`` has started."""
        return int(self.stages.get(name, {}).get("attempts", 0))

    def mark(self, name: str, status: str, **fields: Any) -> None:
        """Record a stage's status (and fields) and write the file."""
        rec = self.stages.setdefault(name, {"attempts": 0})
        if status == "running":
            rec["attempts"] = rec.get("attempts", 0) + 1
            rec.pop("error", None)
        rec.update(status=status, at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   **fields)
        self.save()

    def save(self) -> None:
        """Write the state file atomically."""
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "state.json"
            p.write_text(json.dumps(self.doc, indent=1, sort_keys=True, default=str))
            storage.put(p, self.uri, self.endpoint, self.sse)


def exists(uri: str, endpoint: str | None) -> bool:
    """True when the file at ``uri`` (local or s3://) exists."""
    import pyarrow.fs as pafs

    fs, path = storage.arrow_fs(uri, endpoint)
    try:
        return fs.get_file_info(path).type == pafs.FileType.File
    except OSError as e:
        raise InputError(f"{uri}: cannot read ({e})") from None


def stage_tags(name: str, rec: dict[str, Any]) -> dict[str, str]:
    """The MLflow tags that mirror one stage record."""
    tags = {f"kd.stage.{name}": str(rec.get("status", ""))}
    if "seconds" in rec:
        tags[f"kd.stage.{name}.seconds"] = f"{rec['seconds']:.1f}"
    if "out" in rec:
        tags[f"kd.stage.{name}.out"] = json.dumps(rec["out"], sort_keys=True, default=str)[:TAG_MAX]
    if rec.get("error"):
        tags[f"kd.stage.{name}.error"] = str(rec["error"])[:TAG_MAX]
    return tags


def from_tags(tags: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Stage records rebuilt from a parent run's ``kd.stage.*`` tags (done stages only)."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in tags.items():
        if not key.startswith("kd.stage.") or key.count(".") != 2 or value != "done":
            continue
        name = key.split(".")[2]
        try:
            produced = json.loads(tags.get(f"{key}.out", "{}"))
        except json.JSONDecodeError:  # truncated: the stage runs again
            continue
        out[name] = {"status": "done", "attempts": 1, "out": produced,
                     "seconds": float(tags.get(f"{key}.seconds", "0"))}
    return out


def find_parent(uri: str, experiment: str, pipeline_id: str) -> Any | None:
    """The MLflow parent run of ``pipeline_id`` (tag `PIPELINE_TAG`), or None."""
    c = tracking.client(uri)
    e = c.get_experiment_by_name(experiment)
    if e is None:
        return None
    runs = c.search_runs([e.experiment_id],
                         filter_string=f"tags.`{PIPELINE_TAG}` = '{pipeline_id}'",
                         order_by=["attributes.start_time ASC"], max_results=1)
    return runs[0] if runs else None
