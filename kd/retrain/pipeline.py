"""`run_pipeline`: one `kd retrain`, from a snapshot to a promoted champion.

Order: take the pipeline lock of the registered model -> load the snapshot (the
config's ``data``) -> derive the pipeline id -> "nothing to do" when the champion was
trained on this very snapshot -> open (or find) the MLflow parent run and the state
file -> run the stages in `ORDER`, skipping those already done -> report. The outcome
is a `Result` (promoted, nothing_to_do, skipped) or an exception the CLI maps to its
exit code: `BadSnapshot` / `InputError` 2, `GateRejected` 3, anything else 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kd import sse, storage, tracking
from kd.config import Experiment, RetrainConfig
from kd.errors import GateRejected, InputError, one_line
from kd.retrain import lock, report, snapshot, stages
from kd.retrain.state import PIPELINE_TAG, State, find_parent, from_tags, stage_tags

ORDER = ("validate", "teacher", "teacher_cache", "tune", "distill", "evaluate", "register",
         "gate", "promote")
STAGES: dict[str, Callable[[stages.Context], dict[str, Any]]] = {
    n: getattr(stages, n) for n in ORDER}
OPERATIONAL = ("on_busy", "wait_s", "lock_ttl_s")  # how to run, not what: not in the id


@dataclass
class Result:
    """How a pipeline that did not fail ended: ``promoted``, ``nothing_to_do`` or
    ``skipped`` (another pipeline holds the lock and ``retrain.on_busy: exit``)."""

    status: str
    message: str
    pipeline_id: str = ""
    report: str = ""


def pipeline_id(exp: Experiment, snapshot_hash: str, teacher_hash: str) -> str:
    """sha256 (16 hex) of the config (less the operational retrain fields), the
    snapshot's content hash and the teacher's weights hash: same inputs, same id."""
    doc = exp.model_dump(mode="json")
    for key in OPERATIONAL:
        (doc.get("retrain") or {}).pop(key, None)
    blob = json.dumps([doc, snapshot_hash, teacher_hash], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def champion_version(c: Any, model: str) -> Any | None:
    """The version holding alias ``champion``, or None (no model, no alias)."""
    from kd.registry.register import CHAMPION
    from kd.registry.store import explain

    try:
        return c.get_model_version_by_alias(model, CHAMPION)
    except Exception as e:
        if getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise explain(e, f"{model}@{CHAMPION}") from None


@contextmanager
def tracking_env(uri: str) -> Iterator[None]:
    """``MLFLOW_TRACKING_URI`` = ``uri`` for the body, so the registry functions (which
    read the environment) use the config's store."""
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


def run_pipeline(exp: Experiment) -> Result:
    """`kd retrain` (see the module docstring)."""
    from kd.registry.store import registry_client

    model = exp.registry.model_name
    if not model:
        raise InputError("registry.model_name: required by `kd retrain`")
    r = exp.retrain or RetrainConfig()
    uri = tracking.tracking_uri(exp)
    with tracking_env(uri):
        c = registry_client(uri)
        try:
            token = lock.acquire(c, model, 0 if r.on_busy == "exit" else r.wait_s, r.lock_ttl_s)
        except lock.LockBusy as e:
            if r.on_busy == "exit":
                msg = f"skipped: {e} (retrain.on_busy: exit)"
                print(f"[kd] {msg}", flush=True)
                return Result("skipped", msg)
            raise RuntimeError(f"{e} after waiting retrain.wait_s={r.wait_s:g}s") from None
        with lock.heartbeat(c, model, token, r.lock_ttl_s):
            return _locked(exp, model, uri, c)


def _locked(exp: Experiment, model: str, uri: str, c: Any) -> Result:
    from kd.registry.register import teacher_sha
    from kd.train.text import run_splits

    splits = run_splits(exp)
    prof = snapshot.profile(splits, exp.data.source)
    pid = pipeline_id(exp, prof["hash"], teacher_sha(exp))
    champ = champion_version(c, model)
    if champ is not None and prof["hash"] in (champ.tags.get(stages.SNAPSHOT_TAG),
                                              champ.tags.get("kd.data_hash")):
        msg = (f"nothing to do: snapshot {prof['hash']} ({exp.data.source}) is the one "
               f"champion {model} v{champ.version} was trained on")
        print(f"[kd] {msg}", flush=True)
        return Result("nothing_to_do", msg, pid)
    ctx = _open(exp, model, pid, splits, prof, uri, champ)
    print(f"[kd] retrain {model}: pipeline {pid}, MLflow parent run {ctx.parent} at {uri}; "
          f"state {ctx.state.uri}", flush=True)
    try:
        status, msg = _run_stages(ctx)
    except BaseException as e:
        status = "bad_snapshot" if isinstance(e, stages.BadSnapshot) else \
            "bad_input" if isinstance(e, InputError) else "failed"
        _finish(ctx, status, one_line(e) if status == "failed" else str(e))
        raise
    where = _finish(ctx, status, msg)
    if status == "rejected":
        raise GateRejected(f"{msg} (report {where})")
    return Result(status, msg, pid, where)


def _open(exp: Experiment, model: str, pid: str, splits: Any, prof: dict[str, Any], uri: str,
          champ: Any | None) -> stages.Context:
    """Find or create the parent run and the state of pipeline ``pid``."""
    folder = storage.join(exp.storage.path, "retrain", model, pid)  # = Context.model_folder/pid
    run = find_parent(uri, exp.tracking.experiment, pid)
    if run is None:
        named = exp.model_copy(deep=True)
        named.tracking.run_name = f"{exp.name}-retrain-{pid[:8]}"
        parent = tracking.start_run(named, "retrain", {
            PIPELINE_TAG: pid, "kd.retrain.model": model, "kd.data_hash": prof["hash"],
            stages.SNAPSHOT_TAG: prof["hash"], "kd.retrain.state": storage.join(folder,
                                                                               "state.json")})
    else:
        parent = run.info.run_id
        tracking.client(uri).update_run(parent, status="RUNNING")
    fresh = {"pipeline_id": pid, "model": model, "order": list(ORDER), "parent_run_id": parent,
             "snapshot": {k: prof[k] for k in ("source", "hash", "samples")},
             "stages": from_tags(run.data.tags) if run is not None else {}}
    state = State.load(folder, exp.storage.endpoint_url, fresh, sse.of(exp.storage))
    state.save()
    return stages.Context(exp, model, pid, splits, prof, uri, parent, folder, state, champ)


def run_stage(ctx: stages.Context, name: str) -> dict[str, Any]:
    """Run stage ``name`` unless it is done; record running / done / failed in the state
    file and the parent run's tags; returns the stage's outputs. The state file is written
    first, so a process killed between the two writes leaves a done stage tagged
    ``running``: a skipped stage's tags are therefore written again from the state file."""
    if ctx.state.done(name):
        print(f"[kd] retrain {ctx.pipeline_id}: {name} already done, skipped", flush=True)
        tracking.set_tags(ctx.uri, ctx.parent, stage_tags(name, ctx.state.stages[name]))
        return ctx.state.out(name)
    print(f"[kd] retrain {ctx.pipeline_id}: {name} ...", flush=True)
    ctx.state.mark(name, "running")
    tracking.set_tags(ctx.uri, ctx.parent, stage_tags(name, ctx.state.stages[name]))
    t0 = time.time()
    try:
        out = STAGES[name](ctx)
    except BaseException as e:
        ctx.state.mark(name, "failed", seconds=time.time() - t0, error=one_line(e))
        tracking.set_tags(ctx.uri, ctx.parent, stage_tags(name, ctx.state.stages[name]))
        raise
    ctx.state.mark(name, "done", seconds=time.time() - t0, out=out)
    tracking.set_tags(ctx.uri, ctx.parent, stage_tags(name, ctx.state.stages[name]))
    print(f"[kd] retrain {ctx.pipeline_id}: {name} done in {time.time() - t0:.1f}s", flush=True)
    return out


def _run_stages(ctx: stages.Context) -> tuple[str, str]:
    """Every stage in `ORDER`; (status, message) of a pipeline that ran to its end."""
    for name in ORDER[:2]:
        run_stage(ctx, name)
    new_teacher = ctx.state.out("teacher").get("weights")
    if new_teacher:
        assert ctx.exp.teacher is not None
        ctx.exp = ctx.exp.model_copy(deep=True)
        ctx.exp.teacher.weights = new_teacher
    for name in ORDER[2:8]:
        run_stage(ctx, name)
    g = ctx.state.out("gate")
    if g["decision"] != "promoted":
        return "rejected", f"{ctx.model} v{g['version']} rejected by the gate: {g['reason']}"
    run_stage(ctx, "promote")
    return "promoted", f"{ctx.model} v{g['version']} promoted to champion: {g['reason']}"


def _finish(ctx: stages.Context, status: str, message: str) -> str:
    """Write the report (storage + parent run), end the parent run, print a summary."""
    doc = report.build(ctx.state.doc, status, message, ctx.parent, ctx.uri)
    where = report.write(doc, ctx.folder, ctx.endpoint, ctx.uri, ctx.parent,
                         sse.of(ctx.exp.storage))
    drift = doc.get("drift") or {}
    tags = {"kd.retrain.status": status, "kd.retrain.exit_code": str(doc["exit_code"]),
            "kd.retrain.drift": str(bool(drift.get("drifted"))).lower()}
    try:
        tracking.set_tags(ctx.uri, ctx.parent, tags)
        tracking.end_run(ctx.uri, ctx.parent, status in ("promoted", "rejected"))
    except Exception as e:  # the storage report is written; MLflow may be what failed
        print(f"[kd] warning: could not close MLflow run {ctx.parent}: {e}", flush=True)
    if report.drift_line(drift):
        print(f"[kd] DRIFT: {report.drift_line(drift)}", flush=True)
    print(f"[kd] retrain {ctx.model}: {status.upper()}: {message}\n[kd] report: {where}",
          flush=True)
    return where
