"""Silent failures in sweeps (issue 15): the best trial must have finished with weights,
a NaN constrained value fails its constraint, and the search-space probe uses the data's
real shape and class count and reports (never swallows) a failing student."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kd import cli
from kd.config import TuneConstraints, load_experiment
from kd.errors import InputError
from kd.tune.report import choose, ineligible_reason, violation
from kd.tune.space import parse_space, probe_students

TUNE = Path(__file__).resolve().parents[1] / "configs" / "digits-tune.yaml"
DIGITS = ((1, 8, 8), 10)


def _row(tid: str, metric: float, status: str = "DONE", weights: str = "w.safetensors",
         **kw: float) -> dict:
    return {"trial_id": tid, "status": status, "weights": weights, "metric": metric,
            "params": 1000.0, "latency_ms": 1.0, "val/teacher_agreement": 0.95, **kw}


def test_best_trial_is_a_finished_trial_with_weights() -> None:
    """Before the fix the ERROR trial (best metric, no weights) was chosen."""
    rows = [_row("err", 0.99, "ERROR", ""), _row("pruned", 0.98, "PRUNED", ""),
            _row("nowts", 0.97, "DONE", ""), _row("int", 0.96, "INTERRUPTED"),
            _row("ok", 0.90)]
    best, closest = choose(rows, TuneConstraints(), "max")
    assert best is not None and best["trial_id"] == "ok" and not closest
    best, closest = choose(rows, TuneConstraints(max_params=10), "max")
    assert best is None and [r["trial_id"] for r in closest] == ["ok"]  # closest: eligible only
    assert ineligible_reason(rows) is None


def test_no_eligible_trial_is_a_clear_error() -> None:
    rows = [_row("a", 0.9, "ERROR", ""), _row("b", 0.8, "PRUNED", ""), _row("c", 0.7, "DONE", "")]
    assert choose(rows, TuneConstraints(), "max") == (None, [])
    assert ineligible_reason(rows) == ("no trial finished with weights to choose from "
                                       "(1 DONE without weights, 1 ERROR, 1 PRUNED)")


@pytest.mark.parametrize("field, limit", [("params", {"max_params": 5000}),
                                          ("latency_ms", {"max_latency_ms": 2.0}),
                                          ("val/teacher_agreement",
                                           {"min_teacher_agreement": 0.8})])
def test_nan_constraint_value_fails_the_constraint(field: str, limit: dict) -> None:
    """Before the fix max(0.0, nan) made a NaN params / latency count as met."""
    c = TuneConstraints(**limit)
    nan_row = _row("nan", 0.99, **{field: math.nan})
    assert violation(nan_row, c) == math.inf
    best, _ = choose([nan_row, _row("ok", 0.5)], c, "max")
    assert best is not None and best["trial_id"] == "ok"


def test_finish_children_records_each_trials_weights(workdir: Path) -> None:
    """The weights come from the child run's kd.weights_uri tag (real MLflow, SQLite)."""
    from kd import tracking
    from kd.tune.runs import finish_children

    exp = load_experiment(TUNE)
    uri = tracking.tracking_uri(exp)
    parent = tracking.start_run(exp, "sweep")
    with_w = tracking.start_run(exp, "student", {"kd.trial_id": "t1"}, parent_run_id=parent)
    tracking.set_tags(uri, with_w, {"kd.weights_uri": "/runs/t1/model.safetensors"})
    tracking.end_run(uri, with_w, ok=True)
    without = tracking.start_run(exp, "student", {"kd.trial_id": "t2"}, parent_run_id=parent)
    tracking.end_run(uri, without, ok=True)
    rows = [{**_row("t1", 0.5), "weights": "", "epochs": 12, "error": ""},
            {**_row("t2", 0.9), "weights": "", "epochs": 12, "error": ""}]
    finish_children(uri, exp, parent, rows, exp.model_dump(mode="json"), "sweep-x")
    assert [r["weights"] for r in rows] == ["/runs/t1/model.safetensors", ""]
    assert choose(rows, TuneConstraints(), "max")[0]["trial_id"] == "t1"


def _exp(space: str) -> object:
    return load_experiment(TUNE, ["student.model=tests.silent_models:TopK", "student.args={}",
                                  f"tune.space={{{space}}}"])


def _probe(space: str) -> None:
    exp = _exp(space)
    probe_students(exp, parse_space(exp), *DIGITS, torch.zeros(2, 1, 8, 8))


def test_probe_uses_the_real_class_count() -> None:
    """k=5 is valid for 10-class digits; the old probe's 2 classes refused it."""
    _probe("student.args.k: 'choice([1, 5])'")
    with pytest.raises(InputError, match=r"^tune\.space\.student\.args\.k: value 12: .*"
                                         r"\[1, 8, 8\], 10 classes\).*k=12 > num_classes=10"):
        _probe("student.args.k: 'choice([1, 12])'")


def test_probe_failures_are_reported_not_swallowed() -> None:
    """The old probe swallowed any non-InputError and ran no batch: both passed silently."""
    with pytest.raises(InputError, match=r"^tune\.space\.student\.args\.hidden: value 200: .*"
                                         r"RuntimeError: out of memory"):
        _probe("student.args.hidden: 'randint(4, 201)'")
    with pytest.raises(InputError, match=r"^tune\.space\.student\.args\.in_features: value 32: "
                                         r".*input shape \[1, 8, 8\]"):
        _probe("student.args.in_features: 'choice([64, 32])'")


def test_kd_tune_reports_a_failing_probe_as_bad_input(workdir: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Through `kd tune`: exit 2 and one line, before any trial starts."""
    code = cli.run(["tune", str(TUNE), "teacher=null", "distill.losses=[]",
                    "distill.ce_weight=1.0", "student.model=tests.silent_models:TopK",
                    "student.args={}", "tune.space={student.args.in_features: 'choice([64, 32])'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip().splitlines()[-1].startswith(
        "kd: error: tune.space.student.args.in_features: value 32:")


@pytest.mark.slow
def test_a_sweep_whose_trials_all_fail_is_a_clear_failure(
        workdir: Path, ray_session: None, capsys: pytest.CaptureFixture[str]) -> None:
    """One trial, lr 1e9: it diverges (ERROR, no weights). Before the fix the sweep said
    "no trial met tune.constraints" (there are none) and its parent run ended FINISHED;
    now `kd tune` exits 1 with one line naming the cause, and the parent ends FAILED."""
    from mlflow.tracking import MlflowClient

    code = cli.run(["tune", str(TUNE), "teacher=null", "distill.losses=[]",
                    "distill.ce_weight=1.0", f"storage.path={workdir / 'runs'}",
                    "tune.num_samples=1", "tune.max_concurrent_trials=1", "trainer.epochs=1",
                    "tune.search.name=random", "tune.scheduler={name: none}",
                    "tune.max_failures=0", "tune.space={optim.lr: 'choice([1.0e9])'}",
                    "tune.constraints={}", "tune.resources.cpus_per_worker=0.25"])
    out = capsys.readouterr()
    assert code == 1, out.err
    assert ("kd: run failed: NoEligibleTrial: sweep digits-tune-sweep-" in out.err
            and "no trial finished with weights to choose from (1 ERROR)" in out.err), out.err
    c = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    eid = c.get_experiment_by_name("kdflow-digits").experiment_id
    parents = [r for r in c.search_runs([eid]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    assert parents[0].data.tags["kd.best"].startswith("no trial finished with weights")
