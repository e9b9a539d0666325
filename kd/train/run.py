"""The stages a `kd` command runs, composed from the modules below it.

`train_run` is one teacher or distillation run end to end: data -> preflight ->
MLflow run -> TorchTrainer -> final weights (safetensors with the architecture in
its metadata) -> holdout evaluation -> artifacts. `evaluate_weights` rebuilds a
model from such a file (or a ``runs:/`` / ``models:/`` / s3:// URI) and scores it.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd import tracking
from kd.config import Experiment, ModelSpec
from kd.data import Splits
from kd.errors import InputError
from kd.models import build_model
from kd.models.weights import WEIGHTS_FILE, freeze, load_into, load_state_dict, save_weights
from kd.names import check_name
from kd.runtime import ensure_ray, run_name_from_env
from kd.train.assemble import Role, build_spec, primary_teacher, trainee_spec
from kd.train.driver import fit, preflight
from kd.train.evaluate import evaluate, evaluate_with_confusion
from kd.train.figures import log_run_figures
from kd.train.lineage import log_lineage
from kd.train.output import OWNER_KEY, publish_weights
from kd.train.semisup import balance_by_teacher
from kd.train.text import run_splits, text_metadata, weights_ref


@dataclass
class RunOutcome:
    """A finished run: MLflow id, where the weights are, validation and holdout metrics."""

    run_id: str
    weights: str
    weights_sha256: str
    metrics: dict[str, float]
    holdout: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)


def default_run_name(exp: Experiment, role: Role) -> str:
    """``<name>-<role>-<UTC time>-<4 hex>``: unique, so a fresh run never resumes an old one."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{exp.name}-{role}-{stamp}-{uuid.uuid4().hex[:4]}"


def weights_metadata(spec: ModelSpec, splits: Splits, exp: Experiment, role: Role,
                     run_id: str, ray_run_name: str = "") -> dict[str, str]:
    """What a weights file needs to rebuild its model and trace where it came from."""
    return {
        "kd.model": spec.model, "kd.args": json.dumps(spec.args), "kd.width": str(spec.width),
        "kd.num_classes": str(splits.num_classes),
        "kd.input_shape": json.dumps(list(splits.input_shape)),
        "kd.input_dtype": splits.input_dtype, "kd.role": role,
        "kd.class_names": json.dumps(list(splits.class_names)),
        "kd.data_hash": splits.data_hash, "kd.config_hash": exp.hash(), "kd.run_id": run_id,
        OWNER_KEY: ray_run_name,  # whose file it is (kd.train.output)
        **text_metadata(exp),  # task: embed: the tokenizer and max_length (kd.train.text)
    }


def model_from_weights(uri: str) -> tuple[Any, dict[str, str]]:
    """Rebuild the model a kdflow weights file describes and load its weights."""
    state, meta = load_state_dict(uri)
    if "kd.model" not in meta:
        raise InputError(f"{uri}: not a kdflow weights file (no kd.model metadata); "
                         "pass a config to say which architecture it is")
    model = build_model(meta["kd.model"], json.loads(meta["kd.args"]),
                        tuple(json.loads(meta["kd.input_shape"])), int(meta["kd.num_classes"]),
                        float(meta["kd.width"]))
    load_into(model, state, what=uri)
    return freeze(model), meta


def uses_cache(exp: Experiment, role: Role) -> bool:
    """True when this run reads teacher outputs from the cache (``teacher.cache`` on,
    a student run with loss terms that need the teacher)."""
    return (role == "student" and exp.teacher is not None and exp.teacher.cache
            and bool(exp.distill.losses))


def _cached_train(exp: Experiment, role: Role, splits: Splits,
                  tags: dict[str, str]) -> Any | None:
    """The teacher cache's rows (inputs, labels, idx, teacher outputs) as a streamed
    train dataset (None without the cache); adds the cache's tags to ``tags``."""
    if not uses_cache(exp, role):
        return None
    from kd.train.cache import cache_dataset, ensure_cache

    cache = ensure_cache(exp, splits)
    tags.update({"kd.teacher_cache": cache.uri, "kd.teacher_cache.key": cache.key,
                 "kd.teacher_cache.computed": str(cache.computed).lower()})
    return cache_dataset(cache)


def _log_json(uri: str, run_id: str, folder: str, name: str, doc: Any) -> None:
    """Log ``doc`` as the MLflow artifact ``<folder>/<name>``."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_text(json.dumps(doc))
        tracking.log_artifact(uri, run_id, path, folder)


def _holdout(exp: Experiment, model: Any, splits: Splits, teacher: Any, uri: str,
             run_id: str) -> dict[str, float]:
    """Score the holdout split and log it: ``holdout/*`` metrics, and for classifiers the
    confusion matrix (artifact and figure); embeddings by `kd.train.embed_eval`."""
    if exp.task == "embed":
        from kd.train.embed_eval import evaluate_embed

        holdout = evaluate_embed(exp, model, splits.holdout, teacher)
    else:
        holdout, confusion = evaluate_with_confusion(model, splits.holdout, teacher)
        _log_json(uri, run_id, "holdout", "confusion.json", confusion.tolist())
        log_run_figures(uri, run_id, confusion)
    tracking.log_metrics(uri, run_id, {f"holdout/{k}": v for k, v in holdout.items()},
                         step=exp.trainer.epochs)
    return holdout


def given_run_name(run_name: str | None, role: Role) -> str | None:
    """``run_name``, else under a KubeRay RayJob `run_name_from_env` (stable across
    retries), else None; held to the rule of ``name:`` (`kd.names.check_name`, without
    the length cap): one folder under storage.path, never a path out of it."""
    name = run_name or run_name_from_env(role)
    return None if name is None else check_name(name, "run name", max_len=None)


def train_run(exp: Experiment, role: Role, run_name: str | None = None,
              extra_tags: dict[str, str] | None = None, parent_run_id: str | None = None,
              callbacks: list[Any] | None = None) -> RunOutcome:
    """One `kd teacher` / `kd distill` run, end to end (see the module docstring).
    With ``teacher.cache`` the teacher outputs come from `kd.train.cache.ensure_cache`
    (computed once, then reused); ``parent_run_id`` makes the MLflow run a child.
    Without ``run_name``, under a KubeRay RayJob the name is `run_name_from_env` (so a
    retry resumes), else a fresh `default_run_name`. The weights go to this run's own
    file, then to the name's latest copy (`kd.train.output.publish_weights`)."""
    run_name = given_run_name(run_name, role)
    splits = run_splits(exp)  # joins Ray: the profile streams
    preflight(exp, role, splits)
    splits = balance_by_teacher(exp, role, splits)
    ensure_ray()
    uri = tracking.tracking_uri(exp)
    tags = {"kd.data_hash": splits.data_hash, **(extra_tags or {})}
    if role == "student" and weights_ref(exp.teacher) is not None:
        tags["kd.teacher_uri"] = str(weights_ref(exp.teacher))
    train_ds = _cached_train(exp, role, splits, tags)
    name = run_name or default_run_name(exp, role)
    tags["kd.ray_run_name"] = name
    # A given run name that already ran resumes its Ray checkpoints and its MLflow run.
    run_id = (tracking.resume_run(exp, name) if run_name else None) or \
        tracking.start_run(exp, role, tags, parent_run_id=parent_run_id)
    print(f"[kd] {role} run {name}: MLflow run {run_id} at {uri}", flush=True)
    ok = False
    try:
        log_lineage(uri, run_id, exp, role, splits)
        result = fit(exp, role, splits, run_id, uri, name, train_dataset=train_ds,
                     callbacks=callbacks)
        spec = trainee_spec(exp, role)
        with tempfile.TemporaryDirectory() as d:
            import ray.train

            ckpt = result.checkpoint or ray.train.Checkpoint(result.checkpoint_dir)
            local = Path(ckpt.to_directory(d)) / WEIGHTS_FILE
            state, _ = load_state_dict(str(local))
            model = build_spec(spec, role, splits.input_shape, splits.num_classes, False)
            load_into(model, state, what=f"{role} checkpoint")
            out = Path(d) / WEIGHTS_FILE
            sha = save_weights(model, out, weights_metadata(spec, splits, exp, role, run_id, name))
            weights_uri = publish_weights(out, exp, name)  # this run's own file (+ latest copy)
            tracking.log_artifact(uri, run_id, out, "weights")
        teacher = primary_teacher(exp, splits) if role == "student" else None
        holdout = _holdout(exp, freeze(model), splits, teacher, uri, run_id)
        tracking.set_tags(uri, run_id, {"kd.weights_sha256": sha, "kd.weights_uri": weights_uri,
                                        "kd.ray_run_name": name})
        ok = True
        key = "cosine" if exp.task == "embed" else "accuracy"
        print(f"[kd] weights: {weights_uri}  holdout {key} {holdout.get(key, float('nan')):.4f}",
              flush=True)
        return RunOutcome(run_id, weights_uri, sha, result.metrics, holdout, result.history)
    except BaseException as e:
        tracking.set_tags(uri, run_id, {"kd.error": f"{type(e).__name__}: {e}"[:5000]})
        raise
    finally:
        tracking.end_run(uri, run_id, ok)


def evaluate_weights(exp: Experiment | None, weights: str) -> dict[str, float]:
    """Score a weights URI on the holdout split of the config's data (digits when no
    config); teacher agreement when the config names a teacher with weights."""
    model, meta = model_from_weights(weights)
    if exp is None:
        from kd.config import Experiment as E

        exp = E(name="evaluate")
    splits = run_splits(exp)
    if exp.task == "embed":
        from kd.train.embed_eval import evaluate_embed

        return evaluate_embed(exp, model, splits.holdout, primary_teacher(exp, splits))
    if meta.get("kd.num_classes") != str(splits.num_classes):
        raise InputError(f"{weights}: model has {meta.get('kd.num_classes')} classes but the "
                         f"data has {splits.num_classes}")
    return evaluate(model, splits.holdout, teacher=primary_teacher(exp, splits))
