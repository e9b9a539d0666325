"""`kd tune`: the search-space language, the constrained choice, teacher-pruned init,
and one real CPU sweep on digits (4 trials, 2 at a time, ASHA, shared teacher cache)
checked through its MLflow run tree."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest
import torch

from kd import cli
from kd.config import TuneConstraints, load_experiment
from kd.errors import InputError
from kd.tune.report import choose, pareto_front
from kd.tune.space import parse_dist, parse_space
from tests.conftest import free_cpus_after, holders

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TUNE = CONFIGS / "digits-tune.yaml"


@pytest.mark.parametrize("text, message", [
    ("uniform(2, 1)", "low must be < high"),
    ("loguniform(0, 1)", "bounds must be > 0"),
    ("randint(1.5, 3)", "integers"),
    ("choice([])", "non-empty list"),
    ("normal(0, 1)", "is not one of"),
    ("uniform(__import__('os'), 1)", "must be literals"),
])
def test_bad_distributions(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_dist("distill.temperature", text)


def test_space_paths_and_values_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InputError, match=r"distill\.temprature: no such config field "
                                         r"\(did you mean distill\.temperature"):
        parse_space(load_experiment(TUNE, ["tune.space={distill.temprature: 'uniform(1, 2)'}"]))
    with pytest.raises(InputError, match=r"distill.losses.3.weight: .*not an index"):
        parse_space(load_experiment(
            TUNE, ["tune.space={distill.losses.3.weight: 'uniform(0, 1)'}"]))
    with pytest.raises(InputError, match=r"value -1.0 is not valid here .*temperature"):
        parse_space(load_experiment(TUNE, ["tune.space={distill.temperature: 'uniform(-1.0, 2)'}"]))
    space = parse_space(load_experiment(TUNE))
    assert space["student.width"].args == ([0.25, 0.5, 1.0],)
    assert cli.run(["tune", str(TUNE), "tune.space={student.widht: 'choice([0.5])'}"]) == 2
    assert "student.widht: no such config field" in capsys.readouterr().err


def test_choose_respects_constraints() -> None:
    rows = [
        {"trial_id": "a", "metric": 0.95, "params": 9000.0, "latency_ms": 1.0,
         "val/teacher_agreement": 0.97},
        {"trial_id": "b", "metric": 0.90, "params": 3000.0, "latency_ms": 1.0,
         "val/teacher_agreement": 0.93},
        {"trial_id": "c", "metric": 0.80, "params": 1000.0, "latency_ms": 1.0,
         "val/teacher_agreement": 0.85},
        {"trial_id": "d", "metric": math.nan, "params": 500.0, "latency_ms": 1.0},
    ]
    for r in rows:
        r.update(status="DONE", weights=f"{r['trial_id']}.safetensors")
    best, closest = choose(rows, TuneConstraints(), "max")
    assert best["trial_id"] == "a" and not closest
    best, _ = choose(rows, TuneConstraints(max_params=5000, min_teacher_agreement=0.9), "max")
    assert best["trial_id"] == "b"
    best, closest = choose(rows, TuneConstraints(max_params=100), "max")
    assert best is None and closest[0]["trial_id"] == "c"  # smallest excess first
    assert [r["trial_id"] for r in pareto_front(rows, "max")] == ["c", "b", "a"]


def test_teacher_pruned_init_keeps_important_channels(digits_teacher: str) -> None:
    from kd.train.assemble import assemble
    from kd.train.run import primary_teacher

    exp = load_experiment(CONFIGS / "digits-kd.yaml", [
        f"teacher.weights={digits_teacher}", "student.model=cnn_small",
        "student.args={channels: [32, 64]}", "student.width=0.5", "student.init=teacher_pruned"])
    from kd.data import load_splits

    splits = load_splits(exp.data)
    x = torch.as_tensor(splits.val.sample(256).x)
    asm = assemble(exp, "student", splits.input_shape, splits.num_classes, x[:4])
    teacher = primary_teacher(exp, splits)
    s, t = asm.trainee, teacher
    keep = t.block1.bn.weight.abs().topk(16).indices.sort().values
    assert torch.equal(s.block1.conv.weight, t.block1.conv.weight[keep])
    assert torch.equal(s.block1.bn.running_mean, t.block1.bn.running_mean[keep])
    keep2 = t.block2.bn.weight.abs().topk(32).indices.sort().values
    assert torch.equal(s.block2.conv.weight, t.block2.conv.weight[keep2][:, keep])
    assert torch.equal(s.fc.weight, t.fc.weight[:, keep2])
    with pytest.raises(InputError, match="teacher's model and args"):
        assemble(exp.model_copy(update={"student": exp.student.model_copy(
            update={"model": "mlp", "args": {}})}), "student", splits.input_shape,
            splits.num_classes, x[:4])


@pytest.mark.slow
def test_sweep_mlflow_tree_asha_and_one_teacher_pass(workdir: Path, digits_teacher: str) -> None:
    from mlflow.tracking import MlflowClient

    from kd.tune.sweep import run_sweep

    exp = load_experiment(TUNE, [
        f"teacher.weights={digits_teacher}", f"storage.path={workdir / 'runs'}",
        "tune.num_samples=4", "tune.max_concurrent_trials=2", "trainer.epochs=6",
        # batch 16: epochs of ~1 s, long next to the ~1 s a stop takes to reach a worker
        "trainer.batch_size=16",
        # tune.seed 0 samples lr 0.1, 0.1, 0.0005, 0.0005: the two weak trials start after
        # two strong ones passed ASHA's first rung, so ASHA stops them there (2 at a time
        # with a weak trial first, ASHA has nothing to compare it with and lets it run)
        "tune.search.name=random", "tune.seed=0",
        "tune.scheduler={name: asha, grace_period: 1, reduction_factor: 2}",
        "tune.space={optim.lr: 'choice([0.0005, 0.1])', distill.temperature: 'uniform(2, 6)'}",
        "tune.constraints={}", "tune.resources.cpus_per_worker=0.25"])
    before = signal.getsignal(signal.SIGINT)
    before_usr1 = signal.getsignal(signal.SIGUSR1)
    out = run_sweep(exp)
    # Tune's SIGINT handler is not left behind to swallow a Ctrl-C after the sweep,
    # nor its SIGUSR1 handler (SIGUSR1's default action ends the process)
    assert signal.getsignal(signal.SIGINT) is before
    assert signal.getsignal(signal.SIGUSR1) is before_usr1
    seen = [{k: r.get(k) for k in ("trial_id", "status", "epochs", "epochs_trained", "optim.lr")}
            for r in out.rows]
    assert len(out.rows) == 4 and out.chosen is not None, seen
    c = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    eid = c.get_experiment_by_name(exp.tracking.experiment).experiment_id
    runs = c.search_runs([eid], max_results=100)
    parents = [r for r in runs if r.data.tags.get("kd.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.run_id == out.parent_run_id
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == out.parent_run_id]
    assert len(children) == 4
    by_trial = {r.data.tags["kd.trial_id"]: r for r in children}
    assert set(by_trial) == {r["trial_id"] for r in out.rows}
    for row in out.rows:
        child = by_trial[row["trial_id"]]
        assert float(child.data.params["optim.lr"]) == row["optim.lr"]
        assert float(child.data.params["distill.temperature"]) == row["distill.temperature"]
        assert child.info.status == ("FINISHED" if row["status"] == "DONE" else "KILLED")
        assert ("kd.stopped" in child.data.tags) == (row["status"] == "PRUNED")
        epochs = c.get_metric_history(child.info.run_id, "epoch")
        # workers may train past the epoch ASHA decided on before the stop reaches them;
        # the row says both, and the tag says it when they differ
        assert row["epochs_trained"] == max(m.value for m in epochs) >= row["epochs"], seen
        if row["status"] == "PRUNED":
            assert child.data.tags["kd.stopped"].startswith(f"stopped by ASHA after epoch {row['epochs']}")
            assert ("had trained" in child.data.tags["kd.stopped"]) == (row["epochs_trained"] > row["epochs"])
        # the teacher paid once: the sweep built (or found) the cache, trials only read it
        assert child.data.tags["kd.teacher_cache.computed"] == "false"
        forwards = c.get_metric_history(child.info.run_id, "train/teacher_forward_batches")
        assert forwards and all(m.value == 0 for m in forwards)
    assert parent.data.tags["kd.teacher_mode"] == "cache"
    assert parent.data.tags["kd.teacher_cache.computed"] == "true"
    cache_dirs = list((workdir / "runs" / "teacher-cache").iterdir())
    assert len(cache_dirs) == 1 and len([p for p in cache_dirs[0].iterdir() if p.is_dir()]) == 1
    pruned = [r for r in out.rows if r["status"] == "PRUNED"]
    assert len(pruned) >= 2, seen  # the two trials with a 200x smaller lr, at least
    assert all(r["epochs"] < exp.trainer.epochs for r in pruned), seen
    # and pruning saved compute: a trial stopped at the first rung trained fewer epochs
    assert min(r["epochs_trained"] for r in pruned) < exp.trainer.epochs, seen
    # the stopped trials' Train runs gave their CPUs back (kd.tune.orphans; without it their
    # placement groups stayed reserved, 0.5 of 2 CPUs, for the rest of the Ray session)
    free, total = free_cpus_after(10)
    assert free == total, f"{free:g} of {total:g} CPUs free 10 s after the sweep: {holders()}"
    # and their Ray Train placement-group cleaners (detached, polling forever) are stopped
    assert "PlacementGroupCleaner" not in holders(), holders()
    assert parent.data.tags["kd.best_trial_id"] == out.chosen["trial_id"]
    assert float(parent.data.params["best.optim.lr"]) == out.chosen["optim.lr"]
    arts = {a.path for a in c.list_artifacts(out.parent_run_id)}
    plots = {a.path for a in c.list_artifacts(out.parent_run_id, "plots")}
    assert "trials.csv" in arts
    assert {"plots/accuracy_vs_params.png", "plots/accuracy_vs_temperature.png",
            "plots/learning_curves.png"} <= plots
    # --resume continues the same sweep: same parent run, same trials, none trained again
    again = run_sweep(exp, resume=True, quiet=True)
    assert again.parent_run_id == out.parent_run_id
    assert {r["trial_id"] for r in again.rows} == {r["trial_id"] for r in out.rows}
    runs = c.search_runs([eid], max_results=100)
    assert len([r for r in runs if r.data.tags.get("mlflow.parentRunId") == out.parent_run_id]) == 4
    for row in out.rows:
        epochs = c.get_metric_history(by_trial[row["trial_id"]].info.run_id, "epoch")
        assert max(m.value for m in epochs) == row["epochs_trained"]  # nothing trained again


@pytest.mark.slow
def test_a_diverging_trial_fails_alone_and_is_retried(workdir: Path, digits_teacher: str) -> None:
    """A trial whose loss goes nan (lr 1e9) raises TrainingDiverged in its worker: Tune
    retries it (tune.max_failures=1), it ends ERROR with the reason and a FAILED child
    run, and the sweep goes on to finish and choose among the healthy trials."""
    from mlflow.tracking import MlflowClient

    from kd.tune.sweep import run_sweep

    exp = load_experiment(TUNE, [
        f"teacher.weights={digits_teacher}", f"storage.path={workdir / 'runs'}",
        "tune.num_samples=2", "tune.max_concurrent_trials=2", "trainer.epochs=2",
        "tune.search.name=random", "tune.seed=1", "tune.scheduler={name: none}",
        "tune.max_failures=1", "tune.space={optim.lr: 'choice([0.05, 1.0e9])'}",
        "tune.constraints={}", "tune.resources.cpus_per_worker=0.25"])
    out = run_sweep(exp, quiet=True)
    bad = [r for r in out.rows if r["optim.lr"] == 1e9]
    good = [r for r in out.rows if r["optim.lr"] == 0.05]
    assert len(bad) == len(good) == 1, "tune.seed 1 samples each learning rate once"
    assert all(r["status"] == "DONE" for r in good)
    assert out.chosen is not None and out.chosen["optim.lr"] == 0.05
    c = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    for row in bad:
        assert row["status"] == "ERROR" and "after epoch 1 (optim.lr 1e+09): training diverged" in row["error"]
        child = c.get_run(row["run_id"])
        assert child.info.status == "FAILED" and "diverged" in child.data.tags["kd.error"]
        # two attempts, one MLflow run: epoch 1 was logged by each before it raised
        assert [m.step for m in c.get_metric_history(row["run_id"], "epoch")] == [1, 1]


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(
        workdir: Path, digits_teacher: str) -> None:
    """Ctrl-C (SIGINT) to `kd tune` after its first trial finished: exit 1, the parent
    run ends KILLED saying how to continue, nothing is chosen. `--resume` then runs the
    interrupted and the unstarted trials into the same parent run and leaves the
    finished trial's run untouched (not one more epoch)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    from kd.tune.sweep import run_sweep
    from tests.conftest import REPO

    overrides = [
        f"teacher.weights={digits_teacher}", f"storage.path={workdir / 'runs'}",
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}", "tune.num_samples=3",
        "tune.max_concurrent_trials=1", "trainer.epochs=2", "tune.search.name=random",
        "tune.scheduler={name: none}", "tune.constraints={}", "tune.resources.cpus_per_worker=0.5"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)  # its own local Ray, like a user's terminal
    proc = subprocess.Popen([sys.executable, "-m", "kd.cli", "tune", str(TUNE), *overrides],
                            cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    c = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")

    def children(status: str | None = None) -> list:
        e = c.get_experiment_by_name("kdflow-digits")
        runs = c.search_runs([e.experiment_id], "tags.`kd.kind` = 'student'") if e else []
        return [r for r in runs if status is None or r.info.status == status]

    deadline = time.time() + 300
    try:
        while proc.poll() is None and time.time() < deadline and not children("FINISHED"):
            time.sleep(1)
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    said = "\n".join(line for line in out.splitlines() if "[kd]" in line or "kd:" in line)
    assert proc.returncode == 1, said
    finished = children("FINISHED")  # the first, or also the second if it ended meanwhile
    assert len(finished) in (1, 2), said
    assert (f"interrupted with {len(finished)} of 3 trials ended; continue it with "
            "`kd tune CONFIG --resume`") in out, said
    assert "kd: interrupted" in out
    first = finished[0]
    history = [(m.step, m.timestamp) for m in c.get_metric_history(first.info.run_id, "epoch")]
    assert [h[0] for h in history] == [1, 2]
    parent = c.search_runs([first.info.experiment_id], "tags.`kd.kind` = 'sweep'")[0]
    assert parent.info.status == "KILLED" and "--resume" in parent.data.tags["kd.stopped"]
    assert "kd.best_trial_id" not in parent.data.tags

    exp = load_experiment(TUNE, overrides)
    again = run_sweep(exp, resume=True, quiet=True)
    assert again.parent_run_id == parent.info.run_id
    assert [r["status"] for r in again.rows] == ["DONE"] * 3 and again.chosen is not None
    assert [(m.step, m.timestamp) for m in c.get_metric_history(first.info.run_id, "epoch")] \
        == history  # the finished trial trained nothing more
    runs = children()
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    assert not any({"kd.stopped", "kd.error"} & set(r.data.tags) for r in runs)
    parent = c.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and "kd.stopped" not in parent.data.tags
    assert parent.data.tags["kd.best_trial_id"] == again.chosen["trial_id"]


def test_failed_and_pruned_trials_in_the_run_tree(workdir: Path) -> None:
    """A trial that raised before its run started gets a FAILED child with the error;
    a child left RUNNING by an ASHA stop ends KILLED with the reason."""
    from mlflow.tracking import MlflowClient

    from kd import tracking
    from kd.tune.runs import finish_children

    exp = load_experiment(TUNE)
    uri = tracking.tracking_uri(exp)
    base = exp.model_dump(mode="json")
    parent = tracking.start_run(exp, "sweep")
    pruned_run = tracking.start_run(exp, "student", {"kd.trial_id": "t2"}, parent_run_id=parent)
    rows = [
        {"trial_id": "t1", "status": "ERROR", "epochs": 0, "error": "ValueError: boom",
         **{p: None for p in exp.tune.space}, "student.width": 0.5, "optim.lr": 0.01,
         "distill.temperature": 3.0, "distill.losses.0.weight": 0.5},
        {"trial_id": "t2", "status": "PRUNED", "epochs": 1, "error": ""},
    ]
    finish_children(uri, exp, parent, rows, base, "sweep-x")
    c = MlflowClient(uri)
    failed = c.get_run(rows[0]["run_id"])
    assert failed.info.status == "FAILED" and failed.data.tags["kd.error"] == "ValueError: boom"
    assert failed.data.tags["mlflow.parentRunId"] == parent
    assert failed.data.params["optim.lr"] == "0.01"
    killed = c.get_run(pruned_run)
    assert killed.info.status == "KILLED"
    assert killed.data.tags["kd.stopped"] == "stopped by ASHA after epoch 1"


def test_a_trial_that_ended_before_tune_saw_it_counts_as_done_and_is_not_rerun(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C between a trial's MLflow run ending FINISHED and Tune marking the trial
    TERMINATED: the sweep counts the trial as ended (its run has every epoch and its
    weights), and on `--resume` the trial reports that run's metrics instead of training.
    A trial interrupted mid-training stays interrupted and its run ends KILLED."""
    import ray.tune
    from mlflow.tracking import MlflowClient

    import kd.train.run
    from kd import tracking
    from kd.tune.runs import finish_children, finished_trial
    from kd.tune.sweep import trial

    exp = load_experiment(TUNE)
    uri, epochs, metric = tracking.tracking_uri(exp), exp.trainer.epochs, exp.tune.metric
    base = exp.model_dump(mode="json")
    parent = tracking.start_run(exp, "sweep")
    runs = {}
    for tid, last, ok in (("t1", epochs, True), ("t2", 1, None)):
        runs[tid] = tracking.start_run(exp, "student", {"kd.trial_id": tid,
                                                        "kd.ray_run_name": f"sweep-x-{tid}"},
                                       parent_run_id=parent)
        for step in range(1, last + 1):
            tracking.log_metrics(uri, runs[tid], {"epoch": step, metric: step / 100,
                                                  "val/accuracy": step / 100}, step=step)
        if ok:
            tracking.set_tags(uri, runs[tid], {"kd.weights_uri": "file:///w.safetensors"})
            tracking.end_run(uri, runs[tid], ok)
    nan = math.nan
    rows = [{"trial_id": tid, "status": "INTERRUPTED", "epochs": 1, "error": "", "metric": nan,
             "val/accuracy": nan, "val/teacher_agreement": nan} for tid in ("t1", "t2")]
    finish_children(uri, exp, parent, rows, base, "sweep-x")
    assert rows[0]["status"] == "DONE" and rows[0]["epochs"] == epochs
    assert rows[0]["metric"] == pytest.approx(epochs / 100)
    assert rows[0]["weights"] == "file:///w.safetensors"
    assert rows[1]["status"] == "INTERRUPTED" and rows[1]["epochs_trained"] == 1
    c = MlflowClient(uri)
    assert c.get_run(runs["t1"]).info.status == "FINISHED"
    assert "kd.stopped" not in c.get_run(runs["t1"]).data.tags
    assert c.get_run(runs["t2"]).info.status == "KILLED"
    assert finished_trial(exp, "sweep-x-t2") is None

    reported: list[dict] = []
    monkeypatch.setattr(ray.tune, "get_context",
                        lambda: type("Ctx", (), {"get_trial_id": lambda self: "t1"})())
    monkeypatch.setattr(ray.tune, "report", reported.append)
    monkeypatch.setattr(kd.train.run, "train_run", lambda *a, **k: pytest.fail("trained again"))
    trial({}, base, parent, "sweep-x")
    assert len(reported) == 1 and reported[0]["epoch"] == epochs
    assert reported[0][metric] == pytest.approx(epochs / 100)
    assert [m.step for m in c.get_metric_history(runs["t1"], "epoch")] == list(range(1, epochs + 1))
