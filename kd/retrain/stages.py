"""The stages of `kd retrain`, each ``fn(ctx) -> outputs`` (plain JSON).

A stage reads what earlier stages produced from ``ctx.state.out(name)`` and returns
its own outputs; `kd.retrain.pipeline.run_stage` records them. An optional stage that
is switched off returns ``{"skipped": reason}``. Ray Train run names derive from the
pipeline id (``<name>-retrain-<id>-<stage>``), so a re-run resumes an interrupted
training from its last checkpoint and continues its MLflow run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kd import sse, storage, tracking
from kd.config import Experiment, RetrainConfig, experiment_from_dict
from kd.data import Splits
from kd.errors import GateRejected, InputError
from kd.retrain import snapshot
from kd.retrain.state import PIPELINE_TAG, State

SNAPSHOT_TAG = "kd.retrain.snapshot_hash"


class BadSnapshot(InputError):
    """The snapshot failed validation (exit 2); nothing was trained or registered."""


class StageFailed(RuntimeError):
    """A stage could not produce its result (exit 1)."""


@dataclass
class Context:
    """What every stage needs: the experiment (the snapshot is ``exp.data``), the
    registered model, the pipeline id, the loaded splits, MLflow and storage places."""

    exp: Experiment
    model: str
    pipeline_id: str
    splits: Splits
    profile: dict[str, Any]
    uri: str
    parent: str
    folder: str
    state: State
    champion: Any | None

    @property
    def retrain(self) -> RetrainConfig:
        """The ``retrain:`` section (defaults when the config has none)."""
        return self.exp.retrain or RetrainConfig()

    @property
    def endpoint(self) -> str | None:
        """The S3 endpoint of ``storage``."""
        return self.exp.storage.endpoint_url

    @property
    def model_folder(self) -> str:
        """``<storage.path>/retrain/<model>``: every pipeline of the model, the profiles."""
        return storage.join(self.exp.storage.path, "retrain", self.model)

    def ray_name(self, stage: str) -> str:
        """The Ray Train run name of ``stage`` in this pipeline."""
        return f"{self.exp.name}-retrain-{self.pipeline_id}-{stage}"

    def derived(self, suffix: str, doc: dict[str, Any] | None = None) -> Experiment:
        """The experiment renamed for one stage (its own weights / tune folders)."""
        doc = doc or self.exp.model_dump(mode="json")
        doc["name"] = f"{self.exp.name}-rt-{self.pipeline_id[:8]}{suffix}"[:100]
        doc["tracking"]["run_name"] = None
        return experiment_from_dict(doc, f"retrain {suffix or 'distill'}")


def validate(ctx: Context) -> dict[str, Any]:
    """Snapshot checks against the champion's snapshot; writes the profile (storage
    only); raises `BadSnapshot` naming every failed check."""
    prev_hash = ctx.champion.tags.get(SNAPSHOT_TAG) if ctx.champion is not None else None
    prev = snapshot.load_profile(ctx.model_folder, prev_hash, ctx.endpoint) if prev_hash else None
    checks = snapshot.check(ctx.profile, prev, ctx.retrain.checks)
    ctx.state.doc["checks"] = [{"check": n, "ok": ok, "finding": f} for n, ok, f in checks]
    failed = [f"{n}: {f}" for n, ok, f in checks if not ok]
    if failed:
        raise BadSnapshot(f"snapshot {ctx.exp.data.source} rejected: " + "; ".join(failed))
    uri = snapshot.save_profile(ctx.model_folder, ctx.profile, ctx.endpoint,
                                sse.of(ctx.exp.storage))
    return {"hash": ctx.profile["hash"], "samples": ctx.profile["samples"], "profile": uri,
            "previous": prev_hash or ""}


def teacher(ctx: Context) -> dict[str, Any]:
    """Optional (``retrain.teacher``): retrain the teacher on the snapshot."""
    if not ctx.retrain.teacher:
        return {"skipped": "retrain.teacher is false"}
    from kd.train.run import train_run

    doc = ctx.exp.model_dump(mode="json")
    if ctx.retrain.teacher_epochs:
        doc["trainer"]["epochs"] = ctx.retrain.teacher_epochs
    texp = ctx.derived("-teacher", doc)
    out = train_run(texp, "teacher", run_name=ctx.ray_name("teacher"), parent_run_id=ctx.parent,
                    extra_tags={PIPELINE_TAG: ctx.pipeline_id})
    return {"run_id": out.run_id, "weights": out.weights, "holdout": out.holdout}


def teacher_cache(ctx: Context) -> dict[str, Any]:
    """Build (or find) the teacher-output cache the later stages read."""
    from kd.train.run import uses_cache

    if not uses_cache(ctx.exp, "student"):
        return {"skipped": "teacher.cache is off (or no loss term needs the teacher)"}
    from kd.train.cache import ensure_cache

    cache = ensure_cache(ctx.exp, ctx.splits)
    return {"uri": cache.uri, "key": cache.key, "computed": cache.computed}


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def tune(ctx: Context) -> dict[str, Any]:
    """Optional (``retrain.tune``): `kd.tune.run_sweep` over ``tune.space``; its chosen
    trial's values are what the final distillation uses. A sweep interrupted in an
    earlier attempt is resumed."""
    if not ctx.retrain.tune:
        return {"skipped": "retrain.tune is false"}
    from kd.tune.sweep import STATE_SUFFIX, run_sweep

    texp = ctx.derived("-tune")
    resume = False
    if ctx.state.attempts("tune") > 1:
        try:
            storage.fetch(storage.join(texp.storage.path, "tune", texp.name + STATE_SUFFIX),
                          ctx.endpoint)
            resume = True
        except InputError:
            pass
    outcome = run_sweep(texp, resume=resume, quiet=True)
    tracking.set_tags(ctx.uri, outcome.parent_run_id, {"mlflow.parentRunId": ctx.parent,
                                                       PIPELINE_TAG: ctx.pipeline_id})
    if outcome.chosen is None:
        raise StageFailed(f"tune: no trial met tune.constraints "
                          f"{texp.tune.constraints.model_dump(exclude_none=True)}")
    params = {p: _plain(outcome.chosen[p]) for p in texp.tune.space}
    return {"params": params, "trial_id": str(outcome.chosen["trial_id"]),
            "metric": float(outcome.chosen["metric"]), "sweep_run_id": outcome.parent_run_id,
            "trials": len(outcome.rows)}


def distill_experiment(ctx: Context) -> Experiment:
    """The final distillation's config: the tune stage's values, ``retrain.epochs`` and
    ``retrain.workers`` over the pipeline's config."""
    from kd.tune.space import apply_values

    doc = apply_values(ctx.exp.model_dump(mode="json"), ctx.state.out("tune").get("params", {}))
    if ctx.retrain.epochs:
        doc["trainer"]["epochs"] = ctx.retrain.epochs
    if ctx.retrain.workers is not None:
        doc["scaling"]["num_workers"] = ctx.retrain.workers
    return ctx.derived("", doc)


def distill(ctx: Context) -> dict[str, Any]:
    """The final distillation (`distill_experiment`), a child run of the parent run."""
    from kd.train.run import train_run

    dexp = distill_experiment(ctx)
    out = train_run(dexp, "student", run_name=ctx.ray_name("distill"), parent_run_id=ctx.parent,
                    extra_tags={PIPELINE_TAG: ctx.pipeline_id})
    return {"run_id": out.run_id, "weights": out.weights, "weights_sha256": out.weights_sha256,
            "holdout": out.holdout, "epochs": dexp.trainer.epochs,
            "workers": dexp.scaling.num_workers}


DRIFT_METRIC = {"classify": "accuracy", "embed": "cosine"}  # what retrain.drift_floor bounds


def _scored_pair(ctx: Context) -> tuple[dict[str, float], dict[str, float] | None]:
    """The new student and the champion, both on the new holdout against the same teacher
    in one pass (the teacher sees the holdout once: `kd.train.evaluate.evaluate_split_many`,
    an embedding model `kd.train.embed_eval.evaluate_embed_many`); the champion rebuilt from
    its registered, sha256-verified files."""
    from kd.registry.loader import build_module
    from kd.registry.promote import fetch_version
    from kd.registry.store import registry_client
    from kd.train.assemble import primary_teacher
    from kd.train.run import model_from_weights

    teacher = primary_teacher(ctx.exp, ctx.splits)
    models = {"new": model_from_weights(ctx.state.out("distill")["weights"])[0]}
    if ctx.champion is not None:
        data, _ = fetch_version(registry_client(ctx.uri), ctx.champion)
        models["champion"] = build_module(data, verify=False)[0].eval()  # files verified
    if ctx.exp.task == "embed":
        from kd.train.embed_eval import evaluate_embed_many

        got = evaluate_embed_many(ctx.exp, models, ctx.splits.holdout, teacher)
    else:
        from kd.train.evaluate import evaluate_split_many

        got = {k: m for k, (m, _) in evaluate_split_many(models, ctx.splits.holdout,
                                                          teacher).items()}
    return got["new"], got.get("champion")


def evaluate(ctx: Context) -> dict[str, Any]:
    """The new student and the current champion on the same new holdout (`_scored_pair`);
    drift when the champion's `DRIFT_METRIC` there (accuracy; an embedding model: cosine
    to the teacher) is below ``retrain.drift_floor``."""
    new, old = _scored_pair(ctx)
    version = str(ctx.champion.version) if ctx.champion is not None else None
    floor, metric = ctx.retrain.drift_floor, DRIFT_METRIC[ctx.exp.task]
    drift = None
    if floor is not None and old is not None and metric in old:
        drift = {"floor": floor, "metric": metric, "champion": old[metric],
                 "drifted": old[metric] < floor}
    return {"challenger": new, "champion": old, "champion_version": version, "drift": drift,
            "task": ctx.exp.task}


def register(ctx: Context) -> dict[str, Any]:
    """Register the student (alias challenger) once: a version already made from the
    same run (an earlier attempt that crashed before recording) is reused."""
    from kd.registry.register import CHALLENGER, register_run
    from kd.registry.store import registry_client

    run_id = ctx.state.out("distill")["run_id"]
    c = registry_client(ctx.uri)
    try:
        found = [v for v in c.search_model_versions(f"name = '{ctx.model}'")
                 if v.tags.get("kd.source_run_id") == run_id]
    except Exception:  # no such model yet
        found = []
    if found:
        version = str(found[0].version)
        c.set_registered_model_alias(ctx.model, CHALLENGER, version)
    else:
        _, version = register_run(run_id, ctx.model, distill_experiment(ctx))  # its recipe
    c.set_model_version_tag(ctx.model, version, PIPELINE_TAG, ctx.pipeline_id)
    c.set_model_version_tag(ctx.model, version, SNAPSHOT_TAG, ctx.profile["hash"])
    return {"version": version, "run_id": run_id}


def gate(ctx: Context) -> dict[str, Any]:
    """`kd.promote.promote` of the registered version (gate + alias move under the
    promotion lock); the decision as the gate tagged it on the version."""
    from kd.registry.promote import promote
    from kd.registry.store import registry_client

    version = ctx.state.out("register")["version"]
    try:
        promote(ctx.model, ctx.exp, version)
    except GateRejected:
        pass
    tags = registry_client(ctx.uri).get_model_version(ctx.model, version).tags
    return {"version": version, "decision": tags.get("kd.gate.decision", "unknown"),
            "reason": tags.get("kd.gate.reason", ""),
            "challenger_metrics": json.loads(tags.get("kd.gate.challenger_metrics", "null")),
            "champion_metrics": json.loads(tags.get("kd.gate.champion_metrics", "null")),
            "champion_version": tags.get("kd.gate.champion", "")}


def promote(ctx: Context) -> dict[str, Any]:
    """After a pass: confirm the champion alias and mark it with this snapshot, so the
    next run compares against it and an unchanged snapshot is "nothing to do"."""
    from kd.registry.register import CHAMPION
    from kd.registry.store import registry_client

    c = registry_client(ctx.uri)
    version = ctx.state.out("gate")["version"]
    now = c.get_model_version_by_alias(ctx.model, CHAMPION)
    if str(now.version) != version:
        raise StageFailed(f"{ctx.model}: champion is v{now.version}, not the promoted "
                          f"v{version} (moved by someone else meanwhile?)")
    c.set_model_version_tag(ctx.model, version, SNAPSHOT_TAG, ctx.profile["hash"])
    return {"champion": version}
