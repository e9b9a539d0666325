"""`kd tune`: Ray Tune over the one training loop, with MLflow parent/child runs.

The Ray Train V2 pattern: `Tuner` runs the function trainable `trial`, which
applies the trial's sampled values (dotted config paths, `kd.tune.space`) to the
base config and calls `kd.train.run.train_run` - the same TorchTrainer as
`kd distill` - as a child MLflow run of the sweep's parent run. Per-epoch metrics
reach Tune through `ray.tune.integration.ray_train.TuneReportCallback` (Ray Train
workers) or, for ``num_workers: 0`` trials, straight from the loop, so ASHA
(``time_attr = epoch``) can stop a weak trial after any epoch.

The teacher pays once: with ``teacher.cache`` the driver builds the
teacher-output cache before the first trial and every trial reads it. The
driver owns the parent run: it ends pruned / interrupted children as KILLED,
records failed trials as FAILED children with their error, logs the best
trial's params and metrics, ``trials.csv`` and plots, and picks the best trial
meeting ``tune.constraints`` (`kd.tune.report.choose`).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd import storage, tracking
from kd.config import Experiment, experiment_from_dict
from kd.dotted import flatten
from kd.errors import InputError, one_line
from kd.tune.report import choose, plots, rank, table, write_csv
from kd.tune.space import Dist, apply_values, parse_space

STATE_SUFFIX = ".latest.json"
TRIAL_CPU = 0.01


@dataclass
class SweepOutcome:
    """A finished sweep: parent run, all trial rows, the chosen one (None if no trial
    met the constraints) and the closest ones in that case."""

    parent_run_id: str
    path: str
    rows: list[dict[str, Any]]
    chosen: dict[str, Any] | None
    closest: list[dict[str, Any]] = field(default_factory=list)
    teacher_mode: str = ""


def trial_resources(exp: Experiment) -> tuple[int, dict[str, float], float]:
    """(workers per trial, the trial function's resources, CPUs one trial takes).

    A trial has at least one Ray Train worker: Train's local mode (``num_workers: 0``)
    refuses to run inside a Tune trial (its report / context calls raise there).

    The trial function itself reserves almost no CPU (`TRIAL_CPU`; Ray refuses 0):
    Ray Data tasks that feed the loop need free CPUs (a trial holding them would
    deadlock its own data), Ray Train workers reserve theirs, and
    ``max_concurrent_trials`` bounds how many trials run."""
    r = exp.tune.resources
    workers = max(1, exp.scaling.num_workers if r.workers is None else r.workers)
    return workers, {"cpu": TRIAL_CPU}, r.cpus_per_worker * workers


def trial_doc(base: dict[str, Any], values: dict[str, Any], trial_id: str) -> dict[str, Any]:
    """The config of one trial: base + sampled values; its own name (so weights of
    concurrent trials never collide)."""
    doc = apply_values(base, values)
    doc["name"] = f"{base['name']}-{trial_id}"[:100]
    doc["tracking"]["run_name"] = f"{base['name']}-trial-{trial_id}"
    return doc


def trial(config: dict[str, Any], base: dict[str, Any], parent_run_id: str, sweep: str) -> None:
    """The function trainable: one trial = one `train_run` (child MLflow run)."""
    from ray import tune

    from kd.registry.store import install_resolver
    from kd.train.run import train_run

    install_resolver()  # a trial runs in its own process: models:/ teachers read verified

    trial_id = tune.get_context().get_trial_id()
    exp = experiment_from_dict(trial_doc(base, config, trial_id), f"trial {trial_id}")
    from ray.tune.integration.ray_train import TuneReportCallback

    train_run(exp, "student", run_name=f"{sweep}-{trial_id}", parent_run_id=parent_run_id,
              extra_tags={"kd.trial_id": trial_id, "kd.sweep": sweep},
              callbacks=[TuneReportCallback()])


def _base_doc(exp: Experiment, uri: str) -> dict[str, Any]:
    doc = exp.model_dump(mode="json")
    workers, _, _ = trial_resources(exp)
    r = exp.tune.resources
    doc["scaling"]["num_workers"] = workers
    doc["scaling"]["resources_per_worker"] = {"CPU": r.cpus_per_worker,
                                              **({"GPU": r.gpus_per_worker}
                                                 if r.gpus_per_worker else {})}
    doc["scaling"]["use_gpu"] = doc["scaling"]["use_gpu"] or r.gpus_per_worker > 0
    doc["tracking"]["uri"] = uri  # trials run in other folders: pin the store
    return doc


def check_capacity(exp: Experiment) -> str | None:
    """A warning (with the numbers) when ``max_concurrent_trials`` cannot all be placed."""
    import ray

    _, _, per_trial = trial_resources(exp)
    have = float(ray.cluster_resources().get("CPU", 0))
    want = exp.tune.max_concurrent_trials * per_trial
    if per_trial > 0 and want > have:
        fit = int(have // per_trial)
        return (f"tune.max_concurrent_trials={exp.tune.max_concurrent_trials} x {per_trial:g} "
                f"CPU per trial = {want:g} CPUs, but the cluster has {have:g}: at most {fit} "
                "trial(s) will run at a time")
    return None


def teacher_mode(exp: Experiment, splits: Any) -> tuple[str, dict[str, str]]:
    """Build the cache once (``teacher.cache``) or say why every trial runs the teacher."""
    if exp.teacher is None or not exp.distill.losses:
        return "none", {"kd.teacher_mode": "none"}
    if exp.teacher.cache:
        from kd.train.cache import ensure_cache

        cache = ensure_cache(exp, splits)
        print(f"[kd] sweep: teacher outputs cached once at {cache.uri} "
              f"({'computed now' if cache.computed else 'reused'}); every trial reads them",
              flush=True)
        return "cache", {"kd.teacher_mode": "cache", "kd.teacher_cache": cache.uri,
                         "kd.teacher_cache.key": cache.key,
                         "kd.teacher_cache.computed": str(cache.computed).lower()}
    random = list(exp.data.transforms)  # every kdflow transform is a random augmentation
    reason = (f"random augmentation {random} needs a fresh teacher forward per view" if random
              else "teacher.cache is false")
    print(f"[kd] sweep: online teacher, a teacher forward in every trial step ({reason})",
          flush=True)
    return "online", {"kd.teacher_mode": "online", "kd.teacher_online_reason": reason}


def _tuner(exp: Experiment, space: dict[str, Dist], base: dict[str, Any], parent: str,
           sweep: str, root: str, restore: str | None) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    t = exp.tune
    _, own, _ = trial_resources(exp)
    trainable = tune.with_resources(
        tune.with_parameters(trial, base=base, parent_run_id=parent, sweep=sweep), own)
    if restore:
        return tune.Tuner.restore(restore, trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False)
    if t.scheduler.name == "asha":
        # max_t one past the last epoch: ASHA stops a trial that reaches max_t, which
        # would kill a finishing trial before it saves its weights and holdout metrics
        scheduler: Any = ASHAScheduler(time_attr="epoch", max_t=exp.trainer.epochs + 1,
                                       grace_period=min(t.scheduler.grace_period,
                                                        exp.trainer.epochs),
                                       reduction_factor=t.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    if t.search.name == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search: Any = OptunaSearch(seed=t.seed)
    else:
        search = BasicVariantGenerator(random_state=t.seed,
                                       max_concurrent=t.max_concurrent_trials)
    return tune.Tuner(
        trainable,
        param_space={p: d.to_tune() for p, d in space.items()},
        tune_config=tune.TuneConfig(metric=t.metric, mode=t.mode, num_samples=t.num_samples,
                                    max_concurrent_trials=t.max_concurrent_trials,
                                    scheduler=scheduler, search_alg=search),
        run_config=tune.RunConfig(name=sweep, storage_path=root, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=t.max_failures)),
    )


def _state_uri(exp: Experiment) -> str:
    return storage.join(exp.storage.path, "tune", exp.name + STATE_SUFFIX)


def _save_state(exp: Experiment, state: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "state.json"
        p.write_text(json.dumps(state))
        storage.put(p, _state_uri(exp), exp.storage.endpoint_url)


def _load_state(exp: Experiment) -> dict[str, Any]:
    uri = _state_uri(exp)
    try:
        return json.loads(storage.fetch(uri, exp.storage.endpoint_url).read_text())
    except InputError:
        raise InputError(f"kd tune --resume: no sweep of {exp.name!r} to resume ({uri} "
                         "not found); run `kd tune CONFIG` first") from None


_model_cache: dict[str, tuple[float, float]] = {}


def model_cost(doc: dict[str, Any], input_shape: tuple[int, ...], num_classes: int,
               sample: Any) -> tuple[float, float]:
    """(parameters, latency ms of one batch) of a trial's student, measured in the driver
    so every trial is timed on the same quiet process."""
    from kd.config import StudentConfig
    from kd.models import count_params
    from kd.train.assemble import build_spec
    from kd.train.evaluate import latency_ms

    spec = StudentConfig.model_validate(doc["student"])
    key = json.dumps([spec.model, spec.args, spec.width], sort_keys=True)
    if key not in _model_cache:
        model = build_spec(spec, "student", input_shape, num_classes, False)
        _model_cache[key] = (float(count_params(model)), latency_ms(model, sample, repeats=10))
    return _model_cache[key]


def _child_runs(uri: str, exp: Experiment, parent: str) -> dict[str, Any]:
    c = tracking.client(uri)
    eid = tracking.experiment_id(c, exp.tracking.experiment)
    runs = c.search_runs([eid], filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                         max_results=5000)
    out: dict[str, Any] = {}
    for r in sorted(runs, key=lambda r: r.info.start_time):
        tid = r.data.tags.get("kd.trial_id")
        if tid:
            out[tid] = r  # the latest run of a trial wins (a resumed trial runs again)
    return out


def saved_statuses(results: Any) -> dict[str, str]:
    """Trial id -> status as Tune saved it in the experiment state. After Ctrl-C Tune
    saves the state and then terminates the running trials, so in memory an interrupted
    trial reads TERMINATED like a finished one; the saved state still says RUNNING."""
    from ray.tune import ExperimentAnalysis

    try:
        saved = ExperimentAnalysis(results.experiment_path,
                                   storage_filesystem=results.filesystem)
    except Exception:  # no state written (nothing ran): nothing was interrupted either
        return {}
    return {t.trial_id: t.status for t in saved.trials}


def collect(results: Any, exp: Experiment, space: dict[str, Dist], base: dict[str, Any],
            splits: Any) -> list[dict[str, Any]]:
    """One row per trial: status (DONE, PRUNED, ERROR, or INTERRUPTED for a trial Tune
    had not ended when the sweep was stopped), epochs run, last metrics, cost, values."""
    import numpy as np
    import torch

    x = splits.val.x[:128]
    sample = torch.as_tensor(x, dtype=torch.int64 if np.issubdtype(x.dtype, np.integer)
                             else torch.float32)
    rows = []
    trials = getattr(getattr(results, "_experiment_analysis", None), "trials", None) or []
    saved = saved_statuses(results)
    for i, res in enumerate(results):
        m = dict(res.metrics or {})
        cfg = dict(res.config or {})
        tid = m.get("trial_id") or (trials[i].trial_id if i < len(trials)
                                    else Path(res.path).name)
        doc = apply_values(base, cfg)
        flat = flatten(doc)
        epochs = int(m.get("epoch", 0) or 0)
        tune_status = saved.get(tid) or (trials[i].status if i < len(trials) else "TERMINATED")
        status = ("ERROR" if res.error is not None else
                  "INTERRUPTED" if tune_status not in ("TERMINATED", "ERROR") else
                  "PRUNED" if epochs < exp.trainer.epochs else "DONE")
        params, lat = model_cost(doc, splits.input_shape, splits.num_classes, sample)
        hist = res.metrics_dataframe.to_dict("records") if res.metrics_dataframe is not None else []
        row: dict[str, Any] = {
            "trial_id": tid, "status": status, "epochs": epochs, "epochs_trained": epochs,
            "metric": float(m.get(exp.tune.metric, math.nan)),
            "val/accuracy": float(m.get("val/accuracy", math.nan)),
            "val/teacher_agreement": float(m.get("val/teacher_agreement", math.nan)),
            "params": params, "latency_ms": lat,
            "distill.temperature": float(flat.get("distill.temperature", "nan")),
            **{p: cfg.get(p) for p in space},
            "error": "" if res.error is None else one_line(res.error)[:500],
            "history": hist,
        }
        rows.append(row)
    return rows


def _finish_children(uri: str, exp: Experiment, parent: str, rows: list[dict[str, Any]],
                     base: dict[str, Any], sweep: str) -> None:
    """Child runs left RUNNING (ASHA-stopped or interrupted) end KILLED; a failed trial
    without a child run (it failed before training) gets one, FAILED, with its error.

    ``row["epochs"]`` is what Tune saw when it decided; ``row["epochs_trained"]`` is read
    back from the child run's ``epoch`` metric, because a stop reaches the workers
    asynchronously (Ray Train's controller drains one report per poll from a one-slot queue,
    and Tune then kills the trial), so on short epochs workers train past the decision."""
    children = _child_runs(uri, exp, parent)
    c = tracking.client(uri)
    for row in rows:
        run = children.get(row["trial_id"])
        if run is not None:
            logged = [m.value for m in c.get_metric_history(run.info.run_id, "epoch")]
            row["epochs_trained"] = int(max(logged, default=row["epochs"]))
        if run is None and row["status"] == "ERROR":
            values = {p: row[p] for p in exp.tune.space}
            try:
                texp = experiment_from_dict(trial_doc(base, values, row["trial_id"]))
            except InputError:
                texp = experiment_from_dict(base)
            rid = tracking.start_run(texp, "student", {"kd.trial_id": row["trial_id"],
                                                       "kd.sweep": sweep}, parent_run_id=parent)
            tracking.set_tags(uri, rid, {"kd.error": row["error"]})
            tracking.end_run(uri, rid, ok=False)
            row["run_id"] = rid
            continue
        if run is None:
            continue
        row["run_id"] = run.info.run_id
        if row["status"] == "PRUNED" and run.info.status != "KILLED":
            # Tune stops a trial by raising inside it: train_run saw that as a failure
            if "kd.error" in run.data.tags:
                c.delete_tag(run.info.run_id, "kd.error")
            late = (f"; its workers had trained {row['epochs_trained']} epochs when the stop "
                    "reached them" if row["epochs_trained"] > row["epochs"] else "")
            c.set_tag(run.info.run_id, "kd.stopped",
                      f"stopped by ASHA after epoch {row['epochs']}{late}")
            c.set_terminated(run.info.run_id, status="KILLED")
        elif run.info.status == "RUNNING":
            c.set_tag(run.info.run_id, "kd.stopped", "interrupted")
            c.set_terminated(run.info.run_id, status="KILLED")
        if row["status"] == "DONE":  # an earlier, interrupted or failed attempt's marks
            if run.data.tags.get("kd.stopped") == "interrupted":
                c.delete_tag(run.info.run_id, "kd.stopped")
            if "kd.error" in run.data.tags:
                c.delete_tag(run.info.run_id, "kd.error")
        if row["status"] == "ERROR" and run.info.status != "FAILED":
            c.set_tag(run.info.run_id, "kd.error", row["error"])
            c.set_terminated(run.info.run_id, status="FAILED")


def _log_parent(uri: str, parent: str, exp: Experiment, rows: list[dict[str, Any]],
                chosen: dict[str, Any] | None) -> None:
    from mlflow.entities import Param

    c = tracking.client(uri)
    with tempfile.TemporaryDirectory() as d:
        csv_path = Path(d) / "trials.csv"
        write_csv(rows, csv_path)
        c.log_artifact(parent, str(csv_path))
        for png in plots(rows, exp.tune.metric, exp.tune.mode, Path(d) / "plots"):
            c.log_artifact(parent, str(png), "plots")
    done = sum(r["status"] == "DONE" for r in rows)
    tracking.log_metrics(uri, parent, {
        "sweep/trials": len(rows), "sweep/done": done,
        "sweep/pruned": sum(r["status"] == "PRUNED" for r in rows),
        "sweep/errors": sum(r["status"] == "ERROR" for r in rows),
        "sweep/epochs_trained": sum(r["epochs_trained"] for r in rows)}, step=0)
    if chosen is None:
        tracking.set_tags(uri, parent, {"kd.best": "no trial met tune.constraints"})
        return
    existing = c.get_run(parent).data.params
    params = [Param(f"best.{p}", str(chosen[p])) for p in exp.tune.space
              if f"best.{p}" not in existing]
    if params:
        c.log_batch(parent, params=params)
    best = {f"best/{k}": chosen[k] for k in ("metric", "val/accuracy", "val/teacher_agreement",
                                              "params", "latency_ms")
            if not math.isnan(float(chosen[k]))}
    tracking.log_metrics(uri, parent, best, step=0)
    tracking.set_tags(uri, parent, {"kd.best_trial_id": str(chosen["trial_id"]),
                                    "kd.best_run_id": str(chosen.get("run_id", ""))})


def _clear_tag(uri: str, run_id: str, key: str) -> None:
    c = tracking.client(uri)
    if key in c.get_run(run_id).data.tags:
        c.delete_tag(run_id, key)


def _interrupted(uri: str, parent: str, exp: Experiment, sweep: str, ended: int) -> None:
    """An interrupted sweep (Ctrl-C, SIGINT) is not a result: its parent run ends KILLED
    with the reason, nothing is chosen, and `KeyboardInterrupt` reaches the CLI."""
    msg = (f"sweep {sweep} interrupted with {ended} of {exp.tune.num_samples} trials ended; "
           "continue it with `kd tune CONFIG --resume`")
    tracking.set_tags(uri, parent, {"kd.stopped": msg})
    tracking.client(uri).set_terminated(parent, status="KILLED")
    print(f"[kd] {msg}", flush=True)
    raise KeyboardInterrupt(msg)


def run_sweep(exp: Experiment, resume: bool = False, quiet: bool = False) -> SweepOutcome:
    """`kd tune` (see the module docstring); prints the top trials and the choice."""
    from kd.data import load_splits
    from kd.runtime import ensure_ray
    from kd.train.driver import preflight

    if exp.student is None:
        raise InputError("student: section is required for `kd tune`")
    space = parse_space(exp)
    splits = load_splits(exp.data, exp.storage.endpoint_url)
    preflight(exp, "student", splits)
    ensure_ray()
    warning = check_capacity(exp)
    if warning:
        print(f"[kd] warning: {warning}", flush=True)
    uri = tracking.tracking_uri(exp)
    root = storage.join(exp.storage.path, "tune")
    if resume:
        state = _load_state(exp)
        sweep, parent = state["sweep"], state["parent_run_id"]
        base = state["base"]
        mode = state.get("teacher_mode", "")
        print(f"[kd] resuming sweep {sweep} (MLflow parent run {parent})", flush=True)
        if mode == "cache":
            teacher_mode(exp, splits)  # recomputes if the teacher or data changed meanwhile
    else:
        mode, tags = teacher_mode(exp, splits)
        sweep = f"{exp.name}-sweep-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        base = _base_doc(exp, uri)
        parent = tracking.start_run(exp, "sweep", {**tags, "kd.sweep": sweep,
                                                   "kd.data_hash": splits.data_hash})
        if warning:
            tracking.set_tags(uri, parent, {"kd.warning": warning})
        _save_state(exp, {"sweep": sweep, "parent_run_id": parent, "base": base,
                          "teacher_mode": mode})
        print(f"[kd] sweep {sweep}: {exp.tune.num_samples} trials, "
              f"{exp.tune.max_concurrent_trials} at a time; MLflow parent run {parent} at {uri}",
              flush=True)
    path = storage.join(root, sweep)
    ok = interrupted = False
    try:
        tuner = _tuner(exp, space, base, parent, sweep, root, path if resume else None)
        results = tuner.fit()  # Ctrl-C: Tune saves its state and returns early
        rows = collect(results, exp, space, base, splits)
        _finish_children(uri, exp, parent, rows, base, sweep)
        ended = sum(r["status"] != "INTERRUPTED" for r in rows)
        if ended < exp.tune.num_samples:
            interrupted = True
            _interrupted(uri, parent, exp, sweep, ended)
        chosen, closest = choose(rows, exp.tune.constraints, exp.tune.mode)
        _log_parent(uri, parent, exp, rows, chosen)
        if resume:
            _clear_tag(uri, parent, "kd.stopped")
        ok = True
    finally:
        if not interrupted:
            tracking.end_run(uri, parent, ok)
    if not quiet:
        paths = list(space)
        print("\ntop trials by " + exp.tune.metric)
        print(table(rank(rows, exp.tune.mode), paths))
        if chosen is not None:
            print(f"\nchosen: trial {chosen['trial_id']}  {exp.tune.metric} "
                  f"{chosen['metric']:.4f}  params {int(chosen['params'])}  "
                  f"latency {chosen['latency_ms']:.3f} ms  "
                  + "  ".join(f"{p}={chosen[p]}" for p in paths))
        else:
            cons = exp.tune.constraints.model_dump(exclude_none=True)
            print(f"\nno trial meets tune.constraints {cons}; the closest:")
            print(table(closest, paths))
        failed = [r for r in rows if r["status"] == "ERROR"]
        for r in failed:
            print(f"[kd] trial {r['trial_id']} failed: {r['error'].splitlines()[0][:200]}")
        print(f"MLflow parent run {parent} at {uri}")
    return SweepOutcome(parent, path, rows, chosen, closest, mode)
