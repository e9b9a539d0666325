"""Progress a person can read and a worker that uses its cores: the throttled step line,
the live sweep table, torch threads inside a real Ray Train worker, and a normal run
without Ray's PreemptionWatcher ERROR line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from kd.train.progress import EpochProgress, format_eta
from kd.train.threads import worker_threads

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^\[kd\] epoch 2/5  step \d+/100 \(\d+%\)  \d+ samples/s  ETA \d+:\d\d:\d\d$")


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_step_line_is_throttled_and_formatted() -> None:
    clock, out = Clock(), []
    p = EpochProgress(2, 5, 100, world=2, every_s=10.0, clock=clock, out=out.append)
    for _ in range(9):  # 9 steps in 9 s: under the interval, nothing printed
        clock.t += 1.0
        assert p.step(64) is None
    clock.t += 1.0
    line = p.step(64)  # step 10 at 10 s: due
    assert line is not None and LINE.match(line), line
    # 10 steps x 64 samples x 2 workers in 10 s; 90 steps left at 1 s each
    assert "128 samples/s" in line and "ETA 0:01:30" in line and "step 10/100 (10%)" in line
    clock.t += 5.0
    assert p.step(64) is None  # 5 s after the last line
    assert out == [line]


def test_no_line_on_the_last_step_off_rank_or_when_off(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, out = Clock(), []
    p = EpochProgress(1, 1, 3, every_s=1.0, clock=clock, out=out.append)
    for _ in range(3):
        clock.t += 5.0
        p.step(1)
    assert len(out) == 2  # steps 1 and 2; step 3 of 3 is followed by the epoch line
    other = EpochProgress(1, 1, 100, every_s=1.0, enabled=False, clock=clock, out=out.append)
    clock.t += 5.0
    assert other.step(1) is None
    monkeypatch.setenv("KD_PROGRESS_S", "0")
    off = EpochProgress(1, 1, 100, clock=clock, out=out.append)
    clock.t += 100.0
    assert off.step(1) is None and len(out) == 2


def test_unknown_total_has_no_eta_and_eta_format() -> None:
    clock, out = Clock(), []
    p = EpochProgress(1, 3, None, every_s=1.0, clock=clock, out=out.append)
    clock.t = 2.0
    assert p.step(10) == "[kd] epoch 1/3  step 1  5 samples/s"
    assert format_eta(3725.4) == "1:02:05"


def test_worker_threads_rule() -> None:
    assert worker_threads(3, 3, 16, 1) == 3  # the user's reservation wins
    assert worker_threads(None, 1, 16, 1) == 16  # one worker on a node: all its cores
    assert worker_threads(None, 1, 16, 2) == 8  # two on a node: half each
    assert worker_threads(None, 4, 2, 1) == 4  # never fewer than reserved
    assert worker_threads(None, None, None, 1) == 1


def test_live_sweep_table_prints_as_trials_report() -> None:
    from kd.tune.live import LiveTable

    clock, out = Clock(), []
    live = LiveTable(["distill.temperature"], "val/accuracy", "max", every_s=30.0,
                     clock=clock, out=out.append)
    a = SimpleNamespace(trial_id="t_a", config={"distill.temperature": 2.0})
    b = SimpleNamespace(trial_id="t_b", config={"distill.temperature": 8.0})
    live.on_trial_result(1, [], a, {"epoch": 1, "val/accuracy": 0.5})
    assert out == []  # throttled
    clock.t = 31.0
    live.on_trial_result(2, [], b, {"epoch": 1, "val/accuracy": 0.7})
    assert len(out) == 1 and "0/2 trials finished" in out[0]
    rows = out[0].splitlines()[3:]
    assert rows[0].startswith("t_b") and rows[1].startswith("t_a")  # best first
    live.on_trial_complete(3, [], b)  # a finished trial always prints
    assert len(out) == 2 and "1/2 trials finished" in out[1] and "TERMINATED" in out[1]


def _metrics_of_run(overrides: list[str], work: Path) -> dict[str, float]:
    from kd.config import load_experiment
    from kd.train.run import train_run

    exp = load_experiment(REPO / "configs" / "digits-teacher.yaml", [
        "trainer.epochs=1", "scaling.num_workers=1", f"storage.path={work / 'runs'}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}", *overrides])
    return train_run(exp, "teacher").metrics


def test_timed_feed_counts_only_the_wait_for_each_batch() -> None:
    """`_timed` adds the time spent inside each ``next()`` to ``data_wait``, not the
    consumer's time between batches (what ``time/data_wait_s`` reports)."""
    from kd.train.loop import EpochSums, _timed

    def slow_feed() -> Iterator[int]:
        for i in range(3):
            time.sleep(0.05)
            yield i

    acc = EpochSums()
    assert list(_timed(slow_feed(), acc)) == [0, 1, 2]
    assert acc.data_wait >= 0.15
    fast = EpochSums()
    for _ in _timed(iter(range(3)), fast):
        time.sleep(0.05)  # the step: not the feed's time
    assert fast.data_wait < 0.15


def _split_coordinators() -> int:
    """Ray Data SplitCoordinator actors this Ray has ever started (the GCS actor table
    keeps dead ones; `tests.rank_probe` explains why not ``ray.util.state``)."""
    from ray._private import state

    return sum(a["ActorClassName"] == "SplitCoordinator" for a in state.actors().values())


@pytest.mark.slow
def test_one_worker_uses_the_cores_it_is_given(ray_session: None, workdir: Path) -> None:
    """ray_session declares 2 CPUs: the default one-worker run uses both (Ray alone would
    give it OMP_NUM_THREADS=1), at the driver's niceness (Ray alone: 15 more); a
    reservation of 1 CPU gives 1 thread. The one worker reads the whole train split
    itself, every row once an epoch, with no Ray Data split coordinator in between
    (`kd.train.driver.datasets_to_split`; its cost in bench/split_of_one.py)."""
    import ray

    from kd.config import load_experiment
    from kd.data import load_splits

    node_cpus = ray.cluster_resources()["CPU"]
    assert node_cpus == 2
    coordinators = _split_coordinators()
    metrics = _metrics_of_run([], workdir)
    assert _split_coordinators() == coordinators
    train_rows = len(load_splits(load_experiment(REPO / "configs" / "digits-teacher.yaml").data).train)
    assert metrics["train/labeled_samples"] == train_rows
    assert metrics["worker/torch_threads"] == node_cpus
    # and at the driver's niceness, not Ray's worker default of +15 (kd.runtime)
    assert metrics["worker/niceness"] == os.nice(0)
    # the feed's share of the epoch is logged with it (bench/overhead.py reads it)
    assert 0 < metrics["time/data_wait_s"] < metrics["time/train_s"]
    assert _metrics_of_run(["scaling.resources_per_worker={CPU: 1}"], workdir)["worker/torch_threads"] == 1


def _fresh_shell_env() -> dict[str, str]:
    """The environment of a user's new shell: no Ray variables that this test session's
    own ``ray.init`` put into ``os.environ`` (Ray sets ``RAY_AUTH_MODE`` there)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")}
    env["PYTHONPATH"] = str(REPO)
    return env


def test_a_local_ray_keeps_token_auth_without_rays_warning(tmp_path: Path) -> None:
    """Ray 2.60 turns token authentication on for a new local Ray and says so at WARNING
    on every start unless ``RAY_AUTH_MODE`` is set; kdflow keeps Ray's choice and lowers
    that one logger (``kd.runtime.AUTH_LOG``): the local Ray still requires the token, and
    the line is gone."""
    code = ("from kd.runtime import ensure_ray; ensure_ray(1); "
            "from ray._raylet import AuthenticationMode as A, get_authentication_mode as m; "
            "print('token auth', m() == A.TOKEN)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_fresh_shell_env(),
                          capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "token auth True" in proc.stdout, text[-3000:]
    assert "Token authentication is" not in text, text[-3000:]


@pytest.mark.slow
def test_a_normal_run_prints_no_preemption_watcher_error(tmp_path: Path) -> None:
    """A fresh local Ray started by `kd` (as `kd demo` does): Ray's PreemptionWatcher
    constructor-argument ERROR line is not printed, nor Ray Data's and Ray Train's lines
    for every dataset execution and report."""
    env = _fresh_shell_env()
    proc = subprocess.run(
        [sys.executable, "-c", "from kd.cli import main; main()", "teacher",
         str(REPO / "configs" / "digits-teacher.yaml"), "trainer.epochs=1",
         "scaling.num_workers=1", f"storage.path={tmp_path / 'runs'}",
         f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "[kd] epoch 1/1" in text
    assert "PreemptionWatcher" not in text, text[-3000:]
    assert "Token authentication is" not in text, text[-3000:]  # kd.runtime.AUTH_LOG
    # nor Ray Data's or Ray Train's per-epoch chatter (kd.runtime.quiet_logs)
    for line in ("Starting execution of Dataset", "execution finished in", "Progress bars disabled",
                 "Reporting training result"):
        assert line not in text, text[-3000:]


def test_read_only_batch_warning_is_silenced_in_workers(ray_session: None) -> None:
    """Ray Data's batches are read-only numpy views of the object store; Ray hides
    torch.as_tensor's warning about that with ``warnings.catch_warnings``, which is not
    thread-safe, so under its prefetch threads the warning reached `kd demo`'s output now
    and then. kdflow's workers ignore that one warning (``PYTHONWARNINGS`` in
    `kd.runtime.ensure_ray`); other warnings still show."""
    import ray

    @ray.remote(num_cpus=0)
    def convert() -> list[str]:
        import warnings

        import numpy as np
        import torch

        read_only = np.frombuffer(b"\x00" * 16, dtype=np.float32)
        with warnings.catch_warnings(record=True) as seen:
            torch.as_tensor(read_only)
            warnings.warn("another warning", UserWarning, stacklevel=1)
        return [str(w.message) for w in seen]

    assert ray.get(convert.remote()) == ["another warning"]
