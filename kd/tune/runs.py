"""The sweep's results and its MLflow runs: one row per trial (metric, params, latency),
the children the trials could not end themselves (pruned, interrupted, failed), the
parent run's summary (best trial, ``trials.csv``, plots)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from kd import tracking
from kd.config import Experiment, experiment_from_dict
from kd.dotted import flatten
from kd.errors import InputError, one_line
from kd.tune.report import ineligible_reason, plots, write_csv
from kd.tune.space import Dist, apply_values, trial_doc

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


def child_runs(uri: str, exp: Experiment, parent: str) -> dict[str, Any]:
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


def completed(run: Any, epochs: int) -> bool:
    """Whether a trial's child run ended the whole trial: FINISHED, its last ``epoch``
    metric the config's ``trainer.epochs``, its weights written (``kd.weights_uri``)."""
    return (run.info.status == "FINISHED" and "kd.weights_uri" in run.data.tags
            and int(run.data.metrics.get("epoch", 0)) >= epochs)


def finished_trial(exp: Experiment, ray_run_name: str) -> dict[str, float] | None:
    """The last metrics of the trial run named ``ray_run_name`` if it already completed
    (`completed`), else None. Tune marks a trial TERMINATED only after the trial's
    function returns, a moment after its MLflow run ended FINISHED; a sweep interrupted
    in between saves the trial as RUNNING, and ``--resume`` starts it again: it then
    reports these metrics instead of opening the run once more."""
    run = tracking.run_by_name(exp, ray_run_name)
    if run is None or not completed(run, exp.trainer.epochs):
        return None
    return dict(run.data.metrics)


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

    x = splits.val.sample(128).x  # a bounded sample for the latency probe
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
            "weights": "",  # the child run's kd.weights_uri, filled by finish_children
            "history": hist,
        }
        rows.append(row)
    return rows


def _epochs_trained(exp: Experiment, uri: str, run: Any, default: int) -> int:
    """The last ``epoch`` a trial's child run logged (``default`` when none). A stopped
    trial's process was killed, often before its epoch relay logged the last epoch's
    metrics: what its run folder still holds is logged first (`kd.train.epoch_log.log_left`)."""
    from kd import sse, storage
    from kd.train.epoch_log import log_left

    name = run.data.tags.get("kd.ray_run_name")
    if name:
        fs, root = storage.arrow_fs(exp.storage.path, exp.storage.endpoint_url, sse.of(exp.storage))
        log_left(fs, f"{root}/{name}", uri, run.info.run_id)
    logged = [m.value for m in tracking.client(uri).get_metric_history(run.info.run_id, "epoch")]
    return int(max(logged, default=default))


def finish_children(uri: str, exp: Experiment, parent: str, rows: list[dict[str, Any]],
                     base: dict[str, Any], sweep: str) -> None:
    """Child runs left RUNNING (ASHA-stopped or interrupted) end KILLED; a failed trial
    without a child run (it failed before training) gets one, FAILED, with its error.
    Each row gets ``run_id`` and ``weights`` (its run's ``kd.weights_uri`` tag, "" when the
    run wrote none), which `kd.tune.report.choose` requires of the chosen trial.

    ``row["epochs"]`` is what Tune saw when it decided; ``row["epochs_trained"]`` is read
    back from the child run's ``epoch`` metric (`_epochs_trained`), because a stop reaches the workers
    asynchronously (Ray Train's controller drains one report per poll from a one-slot queue,
    and Tune then kills the trial), so on short epochs workers train past the decision."""
    children = child_runs(uri, exp, parent)
    c = tracking.client(uri)
    for row in rows:
        run = children.get(row["trial_id"])
        if run is not None:
            row["epochs_trained"] = _epochs_trained(exp, uri, run, row["epochs"])
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
        if row["status"] == "INTERRUPTED" and completed(run, exp.trainer.epochs):
            # interrupted between the run's end and Tune's: the trial is done (`finished_trial`)
            row["status"], row["epochs"] = "DONE", row["epochs_trained"]
            for k in ("metric", "val/accuracy", "val/teacher_agreement"):
                key = exp.tune.metric if k == "metric" else k
                row[k] = float(run.data.metrics.get(key, row[k]))
        row["run_id"] = run.info.run_id
        row["weights"] = run.data.tags.get("kd.weights_uri", "")  # set once weights are saved
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


def log_parent(uri: str, parent: str, exp: Experiment, rows: list[dict[str, Any]],
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
        tracking.set_tags(uri, parent, {"kd.best": ineligible_reason(rows)
                                        or "no trial met tune.constraints"})
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


def clear_tag(uri: str, run_id: str, key: str) -> None:
    c = tracking.client(uri)
    if key in c.get_run(run_id).data.tags:
        c.delete_tag(run_id, key)


def mark_interrupted(uri: str, parent: str, exp: Experiment, sweep: str, ended: int) -> None:
    """An interrupted sweep (Ctrl-C, SIGINT) is not a result: its parent run ends KILLED
    with the reason, nothing is chosen, and `KeyboardInterrupt` reaches the CLI."""
    msg = (f"sweep {sweep} interrupted with {ended} of {exp.tune.num_samples} trials ended; "
           "continue it with `kd tune CONFIG --resume`")
    tracking.set_tags(uri, parent, {"kd.stopped": msg})
    tracking.client(uri).set_terminated(parent, status="KILLED")
    print(f"[kd] {msg}", flush=True)
    raise KeyboardInterrupt(msg)
