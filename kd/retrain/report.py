"""The pipeline's report: ``report.json`` and ``report.md`` beside the state file and
as artifacts (``retrain/``) of the MLflow parent run.

Both hold the stages (status, attempts, seconds, outputs), the snapshot checks, the
challenger's and the champion's metrics on the new holdout side by side (the numbers
the gate decided on, both scored from their registered files by `kd.promote`; the
evaluate stage's own scores, taken before registration, when the gate did not run),
the gate's decision and reason, drift, and the exit code the command returns.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from kd import storage, tracking

EXIT_CODES = {"promoted": 0, "nothing_to_do": 0, "skipped": 0, "rejected": 3, "failed": 1,
              "bad_snapshot": 2, "bad_input": 2}
SHOWN = {"classify": ("accuracy", "teacher_agreement", "ece", "params", "latency_ms"),
         "embed": ("cosine", "nn_top1", "recall_at_10", "teacher_recall_at_10", "params",
                   "latency_ms")}


def drift_line(drift: dict[str, Any] | None) -> str | None:
    """One sentence when the champion drifted below ``retrain.drift_floor``, else None."""
    if not drift or not drift.get("drifted"):
        return None
    metric = drift.get("metric", "accuracy")  # reports of pipelines evaluated before embed
    value = drift.get("champion", drift.get("champion_accuracy"))
    return (f"the champion's {metric} on the new holdout is {value:.4f}, below "
            f"retrain.drift_floor {drift['floor']:g}")


def _stage(name: str, rec: dict[str, Any]) -> dict[str, Any]:
    out = rec.get("out", {})
    status = "skipped" if rec.get("status") == "done" and "skipped" in out else rec.get("status")
    return {"name": name, **{k: v for k, v in rec.items() if k != "out"}, "status": status,
            "out": out}


def build(state: dict[str, Any], status: str, message: str, parent: str,
          uri: str) -> dict[str, Any]:
    """The JSON report of one pipeline attempt from its state document."""
    stages = state.get("stages", {})
    ev = stages.get("evaluate", {}).get("out", {})
    gate = stages.get("gate", {}).get("out", {})
    return {
        "pipeline_id": state.get("pipeline_id"), "model": state.get("model"),
        "status": status, "exit_code": EXIT_CODES[status], "message": message,
        "snapshot": {**state.get("snapshot", {}), "checks": state.get("checks", [])},
        "stages": [_stage(n, stages[n]) for n in state.get("order", []) if n in stages],
        "task": ev.get("task", "classify"),
        "challenger": gate.get("challenger_metrics") or ev.get("challenger"),
        "champion": gate.get("champion_metrics") or ev.get("champion"),
        "evaluation": {k: ev.get(k) for k in ("challenger", "champion")} if ev else None,
        "champion_version": ev.get("champion_version"),
        "gate": {k: gate.get(k) for k in ("decision", "reason", "version")} if gate else None,
        "drift": ev.get("drift"), "mlflow": {"tracking_uri": uri, "parent_run_id": parent},
    }


def _fmt(m: dict[str, float] | None, k: str) -> str:
    return "-" if not m or k not in m else f"{m[k]:.4g}"


def markdown(doc: dict[str, Any]) -> str:
    """The report as markdown, for people."""
    snap = doc["snapshot"]
    lines = [f"# kd retrain {doc['model']}: {doc['status'].upper()} (exit {doc['exit_code']})",
             "", doc["message"], "",
             f"- pipeline id: `{doc['pipeline_id']}`",
             f"- snapshot: `{snap.get('source')}` hash `{snap.get('hash')}`, "
             f"{snap.get('samples')} samples",
             f"- MLflow parent run: `{doc['mlflow']['parent_run_id']}` at "
             f"`{doc['mlflow']['tracking_uri']}`"]
    drift = drift_line(doc.get("drift"))
    if drift:
        lines += ["", f"**DRIFT**: {drift}."]
    lines += ["", "## Snapshot checks", "", "| check | ok | finding |", "|---|---|---|"]
    lines += [f"| {c['check']} | {'yes' if c['ok'] else 'NO'} | {c['finding']} |"
              for c in snap.get("checks", [])]
    lines += ["", "## Stages", "", "| stage | status | attempts | seconds | note |",
              "|---|---|---|---|---|"]
    for s in doc["stages"]:
        note = s["out"].get("skipped") or s.get("error") or ""
        lines.append(f"| {s['name']} | {s.get('status')} | {s.get('attempts', '')} | "
                     f"{s.get('seconds', 0):.1f} | {str(note)[:200]} |")
    if doc.get("challenger"):
        champ = doc.get("champion_version")
        lines += ["", "## Challenger vs champion on the new holdout", "",
                  f"| metric | challenger | champion{' v' + champ if champ else ' (none)'} |",
                  "|---|---|---|"]
        lines += [f"| {k} | {_fmt(doc['challenger'], k)} | {_fmt(doc.get('champion'), k)} |"
                  for k in SHOWN[doc.get("task", "classify")]]
    if doc.get("gate"):
        g = doc["gate"]
        lines += ["", "## Gate", "", f"v{g.get('version')}: **{g.get('decision')}**: "
                  f"{g.get('reason')}"]
    return "\n".join(lines) + "\n"


def write(doc: dict[str, Any], folder: str, endpoint: str | None, uri: str,
          parent: str, sse: dict[str, str] | None = None) -> str:
    """Write both files to ``folder`` (storage; S3 writes encrypted per ``sse``) and the
    parent run; returns the JSON's URI.
    A failure to reach MLflow only prints: the storage copy is the record."""
    with tempfile.TemporaryDirectory() as d:
        js, md = Path(d) / "report.json", Path(d) / "report.md"
        js.write_text(json.dumps(doc, indent=1, sort_keys=True, default=str))
        md.write_text(markdown(doc))
        for p in (js, md):
            storage.put(p, storage.join(folder, p.name), endpoint, sse)
        try:
            tracking.log_artifact(uri, parent, js, "retrain")
            tracking.log_artifact(uri, parent, md, "retrain")
        except Exception as e:
            print(f"[kd] warning: report not logged to MLflow run {parent}: {e}", flush=True)
    return storage.join(folder, "report.json")
