"""`kd retrain`: the scheduled pipeline on digits against a real ``mlflow server``
(artifacts on moto's S3 server), a real local Ray and real `kd retrain` processes.

The slow cases share one module fixture that runs the expensive part once: a `kd retrain`
process with the tune stage on is SIGKILLed as soon as its state file shows the tune
stage done, then the same command, resumed in this process, finishes the pipeline. The
other cases build on the champion that produced (each says what it needs).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import CONFIGS, REPO

from kd.cli import run as kd_run
from kd.config import SnapshotChecks, load_experiment
from kd.retrain import lock
from kd.retrain.pipeline import pipeline_id
from kd.retrain.snapshot import check

CONFIG = CONFIGS / "digits-retrain.yaml"
MODEL = "kd-retrain-test"
LOOSE_GATE = ["registry.gate.min_accuracy=0.05", "registry.gate.max_accuracy_drop=0.5",
              "registry.gate.min_teacher_agreement=0.05", "registry.gate.max_params=100000",
              "registry.gate.max_latency_ms=1000"]
SMALL = ["trainer.epochs=1", "retrain.epochs=6", "optim.lr=0.2", "optim.schedule.warmup_epochs=0",
         "retrain.workers=0", "tune.num_samples=2", "tune.max_concurrent_trials=2", "tune.scheduler.name=none",
         "tune.space={distill.temperature: 'choice([2.0, 4.0])'}"]


# ---- fast: config lines, checks, ids, the lock -------------------------------------------

@pytest.mark.parametrize("override, field", [
    ("retrain.on_busy=sometimes", "retrain.on_busy"),
    ("retrain.tunes=true", "retrain.tunes: unknown field"),
    ("retrain.checks.max_class_share_change=2", "retrain.checks.max_class_share_change"),
    ("registry.model_name=null", "registry.model_name: required by `kd retrain`"),
])
def test_bad_config_is_one_line_exit_2(override: str, field: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert kd_run(["retrain", str(CONFIG), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0], err


def _prof(counts: list[int], shape: tuple[int, ...] = (1, 8, 8), classes: int = 10) -> dict:
    return {"hash": "h", "samples": sum(counts), "labeled": sum(counts), "input_shape": list(shape),
            "input_dtype": "float32", "num_classes": classes, "class_counts": counts}


def test_snapshot_checks_name_each_failure() -> None:
    old = _prof([100] * 10)
    lim = SnapshotChecks(min_samples=500, max_sample_change=0.2, max_class_share_change=0.05,
                         min_class_share=0.02)
    assert all(ok for _, ok, _ in check(_prof([101] * 10), old, lim))
    failed = {n for n, ok, _ in check(_prof([10] * 5 + [100] * 5), old, lim) if not ok}
    assert failed == {"sample_count", "class_balance", "min_class_share"}  # 550: 45% fewer, 1.8%
    failed = {n for n, ok, _ in check(_prof([100] * 11, classes=11), old, lim) if not ok}
    assert failed == {"label_range"}
    failed = {n for n, ok, _ in check(_prof([100] * 10, shape=(1, 16, 16)), old, lim) if not ok}
    assert failed == {"schema"}
    assert {n for n, ok, _ in check(_prof([1] + [50] * 9), None, lim) if not ok} == \
        {"min_samples", "min_class_share"}


def test_pipeline_id_derives_from_inputs_only() -> None:
    exp = load_experiment(CONFIG)
    a = pipeline_id(exp, "snap1", "teacher1")
    assert a == pipeline_id(load_experiment(CONFIG), "snap1", "teacher1")
    assert a == pipeline_id(load_experiment(CONFIG, ["retrain.on_busy=wait",
                                                     "retrain.wait_s=5"]), "snap1", "teacher1")
    assert len({a, pipeline_id(exp, "snap2", "teacher1"), pipeline_id(exp, "snap1", "teacher2"),
                pipeline_id(load_experiment(CONFIG, ["retrain.epochs=3"]), "snap1",
                            "teacher1")}) == 4


HOLDER = r"""
import sys, time
from kd.registry.store import registry_client
from kd.retrain import lock
c = registry_client(sys.argv[1])
lock.acquire(c, "m", 0, float(sys.argv[2]))
print("held", flush=True)
time.sleep(600)
"""


def test_lock_is_exclusive_and_expires_when_its_holder_dies(tmp_path: Path) -> None:
    """A real second process holds the lock: a try fails naming it; SIGKILL frees it at once
    (same host, pid gone); a holder on another host goes stale when its heartbeat is old."""
    from kd.registry.store import registry_client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, uri, "600"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        c = registry_client(uri)
        with pytest.raises(lock.LockBusy, match=f"pid {proc.pid} on"):
            lock.acquire(c, "m", 0, 600)
        with pytest.raises(lock.LockBusy):
            lock.acquire(c, "m", 1.0, 600)  # waits, then gives up
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    t0 = time.time()
    token = lock.acquire(c, "m", 0, 600)
    assert time.time() - t0 < 10
    lock.release(c, "m", token)
    assert c.search_registered_models(f"name = 'm{lock.LOCK_SUFFIX}'") == []
    tags = {lock.HOST: "elsewhere", lock.PID: "1", lock.TTL: "60", lock.BEAT: str(time.time())}
    assert lock.stale_reason(tags) is None
    assert "heartbeat" in lock.stale_reason({**tags, lock.BEAT: str(time.time() - 61)})


def test_workflow_entrypoint_is_the_same_command(tmp_path: Path) -> None:
    """`python workflows/retrain.py --config CONFIG overrides` runs `kd retrain` (same exit
    code and error line); it takes no --run-name (the pipeline id names the runs)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "workflows" / "retrain.py"), "--config", str(CONFIG)]
    out = subprocess.run([*cmd, "retrain.on_busy=sometimes"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "kd: error:" in out.stderr and "retrain.on_busy" in out.stderr
    out = subprocess.run([*cmd, "--run-name", "x"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "unrecognized arguments: --run-name" in out.stderr


def test_state_round_trips_on_s3_and_from_parent_tags(bucket: str, s3_server: str) -> None:
    from kd.retrain.state import State, from_tags, stage_tags

    folder = f"s3://{bucket}/runs/retrain/m/abc"
    st = State.load(folder, s3_server, {"pipeline_id": "abc", "stages": {}})
    st.mark("tune", "running")
    st.mark("tune", "done", seconds=1.5, out={"params": {"distill.temperature": 2.0}})
    st.mark("distill", "running")
    st.mark("distill", "failed", seconds=0.5, error="RuntimeError: boom")
    again = State.load(folder, s3_server, {"stages": {}})
    assert again.done("tune") and not again.done("distill") and again.attempts("tune") == 1
    assert again.out("tune") == {"params": {"distill.temperature": 2.0}}
    tags = {**stage_tags("tune", again.stages["tune"]),
            **stage_tags("distill", again.stages["distill"])}
    assert tags["kd.stage.distill"] == "failed" and "boom" in tags["kd.stage.distill.error"]
    rebuilt = from_tags(tags)
    assert list(rebuilt) == ["tune"] and rebuilt["tune"]["out"] == again.out("tune")


def test_skipped_stage_rewrites_its_tags_from_the_state_file(mlflow_server: str,
                                                              tmp_path: Path) -> None:
    """A process killed after the state file said ``done`` but before the parent run's tag
    did (the crash the slow fixture makes) must not leave the tag at ``running``."""
    from kd import tracking
    from kd.retrain.pipeline import run_stage
    from kd.retrain.state import State

    c = tracking.client(mlflow_server)
    parent = c.create_run(tracking.experiment_id(c, "kd-retrain-tags")).info.run_id
    st = State.load(str(tmp_path), None, {"pipeline_id": "p", "stages": {}})
    st.mark("tune", "running")
    tracking.set_tags(mlflow_server, parent, {"kd.stage.tune": "running"})
    st.mark("tune", "done", seconds=2.0, out={"sweep_run_id": "s"})  # killed here
    ctx = SimpleNamespace(state=State.load(str(tmp_path), None, {}),
                          pipeline_id="p", uri=mlflow_server, parent=parent)
    assert run_stage(ctx, "tune") == {"sweep_run_id": "s"}  # skipped, not rerun
    tags = c.get_run(parent).data.tags
    assert tags["kd.stage.tune"] == "done" and tags["kd.stage.tune.seconds"] == "2.0"
    assert json.loads(tags["kd.stage.tune.out"]) == {"sweep_run_id": "s"}


# ---- slow: the pipeline end to end -------------------------------------------------------

def write_snapshot(path: Path, keep: np.ndarray | None = None, noise: float = 0.0) -> str:
    """Digits as an .npz snapshot: all rows (or ``keep``), optionally jittered."""
    from kd.data.builtin import digits

    x, y = digits()
    if keep is not None:
        x, y = x[keep], y[keep]
    x = x + noise * np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
    np.savez(path, x=x.astype(np.float32), y=y)
    return str(path)


def states(runs: Path) -> list[Path]:
    return sorted((runs / "retrain" / MODEL).glob("*/state.json"))


def kd_retrain_proc(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`python -m kd.cli retrain ARGS` in its own process group (this worktree first)."""
    out = open(log, "w")  # noqa: SIM115 - closed with the process by the caller
    return subprocess.Popen([sys.executable, "-m", "kd.cli", "retrain", *args], env=env,
                            stdout=out, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def sweep_trial_runs(c, sweep_run_id: str) -> list:  # noqa: ANN001
    exp_ids = [e.experiment_id for e in c.search_experiments()]
    return c.search_runs(exp_ids, filter_string=f"tags.mlflow.parentRunId = '{sweep_run_id}'")


@pytest.fixture(scope="module")
def pipeline(mlflow_server: str, ray_session: None, digits_teacher: str,
             tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Crash after tune (SIGKILL of a real `kd retrain`), then resume here to the end."""
    import ray

    from kd.registry.store import registry_client

    d = tmp_path_factory.mktemp("retrain")
    runs = d / "runs"
    common = [f"teacher.weights={digits_teacher}", f"storage.path={runs}",
              f"tracking.uri={mlflow_server}", f"registry.model_name={MODEL}", *SMALL,
              *LOOSE_GATE]
    snap1 = write_snapshot(d / "snap1.npz")
    args = [str(CONFIG), f"data.source={snap1}", *common]
    env = {**os.environ, "PYTHONPATH": str(REPO), "KD_DEBUG": "",
           "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = kd_retrain_proc(args, env, d / "crashed.log")
    deadline, state = time.time() + 400, {}
    while time.time() < deadline and proc.poll() is None:
        found = states(runs)
        state = json.loads(found[0].read_text()) if found else {}
        if state.get("stages", {}).get("tune", {}).get("status") == "done":
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    log = (d / "crashed.log").read_text()
    assert state.get("stages", {}).get("tune", {}).get("status") == "done", log[-3000:]
    c = registry_client(mlflow_server)
    sweep = state["stages"]["tune"]["out"]["sweep_run_id"]
    trials_before = len(sweep_trial_runs(c, sweep))
    t0 = time.time()
    rc = kd_run(["retrain", *args])
    return SimpleNamespace(d=d, runs=runs, common=common, args=args, env=env, rc=rc, c=c,
                           crashed=state, crash_log=log, sweep=sweep,
                           trials_before=trials_before, resume_s=time.time() - t0)


def _state(runs: Path, pid: str) -> dict:
    return json.loads((runs / "retrain" / MODEL / pid / "state.json").read_text())


@pytest.mark.slow
def test_crash_after_tune_resumes_without_retraining_finished_stages(
        pipeline: SimpleNamespace) -> None:
    assert pipeline.rc == 0, pipeline.crash_log[-2000:]
    pid = pipeline.crashed["pipeline_id"]
    state = _state(pipeline.runs, pid)
    for name in ("validate", "teacher_cache", "tune"):  # finished before the kill: not rerun
        assert state["stages"][name]["attempts"] == 1, (name, state["stages"][name])
        assert state["stages"][name]["at"] == pipeline.crashed["stages"][name]["at"]
    assert state["stages"]["tune"]["out"]["sweep_run_id"] == pipeline.sweep
    assert len(sweep_trial_runs(pipeline.c, pipeline.sweep)) == pipeline.trials_before == 2
    assert all(state["stages"][n]["status"] == "done" for n in state["order"])
    # the final distillation used the tune stage's choice, and the Ray run name of the id
    params = state["stages"]["tune"]["out"]["params"]
    run = pipeline.c.get_run(state["stages"]["distill"]["out"]["run_id"])
    assert float(run.data.params["distill.temperature"]) == params["distill.temperature"]
    assert run.data.tags["kd.ray_run_name"] == f"digits-retrain-retrain-{pid}-distill"
    assert run.data.tags["mlflow.parentRunId"] == state["parent_run_id"]


@pytest.mark.slow
def test_whole_pipeline_promotes_and_reports(pipeline: SimpleNamespace) -> None:
    pid = pipeline.crashed["pipeline_id"]
    state = _state(pipeline.runs, pid)
    version = state["stages"]["register"]["out"]["version"]
    champ = pipeline.c.get_model_version_by_alias(MODEL, "champion")
    assert str(champ.version) == version
    assert champ.tags["kd.retrain.snapshot_hash"] == state["snapshot"]["hash"]
    folder = pipeline.runs / "retrain" / MODEL / pid
    rep = json.loads((folder / "report.json").read_text())
    assert rep["status"] == "promoted" and rep["exit_code"] == 0
    assert [s["name"] for s in rep["stages"]] == state["order"]
    assert {s["name"]: s["status"] for s in rep["stages"]}["teacher"] == "skipped"
    assert rep["challenger"]["accuracy"] > 0.5 and rep["champion"] is None  # first champion
    assert rep["gate"]["decision"] == "promoted" and "accuracy" in rep["gate"]["reason"]
    assert {c["check"] for c in rep["snapshot"]["checks"]} >= {"min_samples", "min_class_share"}
    assert "PROMOTED (exit 0)" in (folder / "report.md").read_text()
    parent = pipeline.c.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED"
    stage_tags = {n: parent.data.tags.get(f"kd.stage.{n}") for n in state["order"]}
    assert all(v == "done" for v in stage_tags.values()), stage_tags
    arts = {a.path for a in pipeline.c.list_artifacts(parent.info.run_id, "retrain")}
    assert arts == {"retrain/report.json", "retrain/report.md"}


@pytest.mark.slow
def test_rerun_is_idempotent(pipeline: SimpleNamespace,
                             capsys: pytest.CaptureFixture[str]) -> None:
    c = pipeline.c
    versions = len(c.search_model_versions(f"name = '{MODEL}'"))
    runs_before = len(c.search_runs([e.experiment_id for e in c.search_experiments()]))
    assert kd_run(["retrain", *pipeline.args]) == 0
    assert "nothing to do: snapshot" in capsys.readouterr().out
    assert len(c.search_model_versions(f"name = '{MODEL}'")) == versions
    assert len(c.search_runs([e.experiment_id for e in c.search_experiments()])) == runs_before


def _registry(c) -> tuple:  # noqa: ANN001
    vs = c.search_model_versions(f"name = '{MODEL}'")
    return (sorted((v.version, v.current_stage) for v in vs),
            dict(c.get_registered_model(MODEL).aliases))


@pytest.mark.slow
def test_bad_snapshot_stops_and_leaves_registry_and_cache_alone(
        pipeline: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    from kd.data.builtin import digits

    _, y = digits()
    rng = np.random.default_rng(1)
    keep = np.flatnonzero((y >= 5) | (rng.random(len(y)) < 0.3))  # classes 0-4 mostly gone
    snap = write_snapshot(pipeline.d / "bad.npz", keep)
    before = _registry(pipeline.c)
    caches = sorted((pipeline.runs / "teacher-cache").iterdir())
    assert kd_run(["retrain", str(CONFIG), f"data.source={snap}", *pipeline.common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{snap} rejected: min_class_share: smallest class share" in err[0]
    assert "; class_balance: largest class share change" in err[0]
    assert _registry(pipeline.c) == before
    assert sorted((pipeline.runs / "teacher-cache").iterdir()) == caches
    bad = [s for s in states(pipeline.runs) if json.loads(s.read_text())["snapshot"]["source"]
           == snap]
    rep = json.loads((bad[0].parent / "report.json").read_text())
    assert rep["status"] == "bad_snapshot" and rep["exit_code"] == 2
    assert [s["status"] for s in rep["stages"]] == ["failed"]


@pytest.mark.slow
def test_overlapping_pipelines_exactly_one_runs_and_drift_is_reported(
        pipeline: SimpleNamespace) -> None:
    """Two real `kd retrain` processes on a new snapshot start together: one takes the lock
    and runs (a strict gate rejects its student: exit 3), the other exits 0 "skipped".
    The champion scores below the drift floor on the new holdout: the report says so."""
    snap = write_snapshot(pipeline.d / "snap2.npz", noise=0.05)
    args = [str(CONFIG), f"data.source={snap}", *pipeline.common, "retrain.tune=false",
            "registry.gate.min_accuracy=0.9999", "retrain.drift_floor=0.9999",
            "retrain.on_busy=exit", "retrain.teacher=true", "retrain.teacher_epochs=1",
            "scaling.num_workers=0"]  # the teacher stage trains in the driver
    before = _registry(pipeline.c)
    procs = [kd_retrain_proc(args, pipeline.env, pipeline.d / f"overlap{i}.log") for i in (0, 1)]
    rcs = [p.wait(timeout=400) for p in procs]
    logs = [(pipeline.d / f"overlap{i}.log").read_text() for i in (0, 1)]
    assert sorted(rcs) == [0, 3], (rcs, [lg[-2000:] for lg in logs])
    skipped = logs[rcs.index(0)]
    assert f"skipped: another pipeline (pid {procs[rcs.index(3)].pid} on" in skipped
    assert "retrain" in skipped and "distill" not in skipped
    ran = [json.loads(s.read_text()) for s in states(pipeline.runs)]
    ran = [s for s in ran if s["snapshot"]["source"] == snap]
    assert len(ran) == 1 and ran[0]["stages"]["distill"]["attempts"] == 1
    exp_ids = [e.experiment_id for e in pipeline.c.search_experiments()]
    parents = pipeline.c.search_runs(
        exp_ids, filter_string=f"tags.`kd.retrain.pipeline_id` = '{ran[0]['pipeline_id']}' "
                               "and tags.`kd.kind` = 'retrain'")
    assert len(parents) == 1
    # the retrained teacher is what the cache and the final distillation used
    teacher = ran[0]["stages"]["teacher"]["out"]["weights"]
    pid = ran[0]["pipeline_id"]  # the teacher stage's own weights file (kd.train.output)
    assert teacher.endswith(f"-rt-{pid[:8]}-teacher/runs/digits-retrain-retrain-{pid}-teacher/model.safetensors")
    assert ran[0]["stages"]["teacher_cache"]["out"]["computed"] is True
    distilled = pipeline.c.get_run(ran[0]["stages"]["distill"]["out"]["run_id"])
    assert distilled.data.tags["kd.teacher_uri"] == teacher
    rep = json.loads((states(pipeline.runs)[0].parent.parent / ran[0]["pipeline_id"]
                      / "report.json").read_text())
    assert rep["status"] == "rejected" and rep["gate"]["decision"] == "rejected"
    assert rep["drift"]["drifted"] and rep["champion"]["accuracy"] < 0.9999
    assert "DRIFT" in (states(pipeline.runs)[0].parent.parent / ran[0]["pipeline_id"]
                       / "report.md").read_text()
    after = _registry(pipeline.c)
    assert after[1]["champion"] == before[1]["champion"]  # rejected: champion unchanged
    assert len(after[0]) == len(before[0]) + 1  # the challenger is registered
    # the same inputs again: the finished pipeline answers 3 again, trains nothing new
    assert kd_run(["retrain", *args]) == 3
    assert _registry(pipeline.c) == after
    again = [json.loads(s.read_text()) for s in states(pipeline.runs)]
    again = [s for s in again if s["snapshot"]["source"] == snap][0]
    assert {n: r["attempts"] for n, r in again["stages"].items()} == \
        {n: r["attempts"] for n, r in ran[0]["stages"].items()}
    assert not pipeline.c.search_registered_models(f"name = '{MODEL}{lock.LOCK_SUFFIX}'")
