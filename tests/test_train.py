"""The one training loop, end to end: `kd teacher` then `kd distill`, MLflow records,
weights that rebuild their model, a real Ray worker, feature losses."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from kd import cli
from kd.config import load_experiment
from kd.errors import InputError
from kd.models.weights import read_metadata
from kd.train.optim import lr_factor
from kd.train.run import train_run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAST = ["scaling.num_workers=0", "trainer.epochs=3", "checkpoint.every_epochs=1"]


def test_lr_schedule() -> None:
    assert lr_factor(0, 10, 1, "cosine", 2, 30, 0.1) == 0.5
    assert lr_factor(1, 10, 1, "cosine", 2, 30, 0.1) == 1.0
    assert lr_factor(2, 10, 1, "cosine", 2, 30, 0.1) == 1.0
    assert math.isclose(lr_factor(6, 10, 1, "cosine", 2, 30, 0.1), 0.5)
    assert lr_factor(35, 40, 1, "step", 0, 30, 0.1) == pytest.approx(0.1)
    assert lr_factor(5, 10, 1, "none", 0, 30, 0.1) == 1.0
    # per step (100 steps an epoch): step decay still moves at whole epochs
    assert lr_factor(2999, 4000, 100, "step", 0, 30, 0.1) == 1.0
    assert lr_factor(3000, 4000, 100, "step", 0, 30, 0.1) == pytest.approx(0.1)


def test_a_per_step_schedule_warms_up_and_decays_smoothly() -> None:
    """``per: step``: linear warm-up over ``warmup_steps``, then a cosine that falls at
    every update and ends near 0; the same (epoch, batch) always gives the same LR (what
    a resumed run and every rank rely on); steps past the expected count hold the
    epoch's last value."""
    import torch

    from kd.train.optim import set_lr

    exp = load_experiment(CONFIGS / "digits-kd.yaml", [
        "trainer.epochs=3", "optim.lr=0.1", "optim.schedule={name: cosine, per: step, warmup_steps: 4}"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    def lr(epoch: int, step: int) -> float:
        set_lr(opt, [0.1], exp, epoch, step, 10)
        return opt.param_groups[0]["lr"]

    assert [lr(0, i) for i in range(4)] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    after = [lr(e, i) for e in range(3) for i in range(10)][4:]
    assert after[0] == pytest.approx(0.1)
    assert all(b < a for a, b in zip(after, after[1:], strict=False))
    assert lr(1, 9) == pytest.approx(0.05 * (1 + math.cos(math.pi * 15 / 26)))
    assert 0 < lr(2, 9) < 0.001 and lr(2, 9) == lr(2, 15)
    per_epoch = load_experiment(CONFIGS / "digits-kd.yaml", [
        "trainer.epochs=3", "optim.lr=0.1", "optim.schedule={name: cosine}"])
    set_lr(opt, [0.1], per_epoch, 1, 7, 10)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.075)  # the whole epoch at one value


def test_warmup_steps_need_a_per_step_schedule() -> None:
    with pytest.raises(InputError, match=r"optim\.schedule: .*warmup_steps: .*needs per: step"):
        load_experiment(CONFIGS / "digits-kd.yaml", ["optim.schedule.warmup_steps=100"])


def test_the_loop_sets_a_per_step_lr_before_every_update(digits_teacher: str, workdir: Path) -> None:
    """A real `kd distill` with ``per: step``: the LR logged at each epoch's end is the
    schedule's value at that epoch's last batch (a per-epoch schedule would log 1.0x,
    0.75x and 0.25x of the base LR here)."""
    exp = load_experiment(CONFIGS / "digits-kd.yaml", [
        f"teacher.weights={digits_teacher}", "scaling.num_workers=0", "trainer.epochs=3",
        "optim.schedule={name: cosine, per: step, warmup_steps: 3}"])
    out = train_run(exp, "student")
    client = MlflowClient(mlflow.get_tracking_uri())
    rows = client.get_metric_history(out.run_id, "train/labeled_samples")[0].value
    spe = math.ceil(rows / exp.trainer.batch_size)
    logged = [m.value for m in sorted(client.get_metric_history(out.run_id, "lr"), key=lambda m: m.step)]
    want = [exp.optim.lr * lr_factor(e * spe + spe - 1, 3 * spe, spe, "cosine", 3, 30, 0.1)
            for e in range(3)]
    assert logged == pytest.approx(want)
    assert logged[2] < 0.01 * exp.optim.lr


@pytest.fixture(scope="module")
def trained(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`kd teacher` then `kd distill` through the CLI, in-process, in one folder."""
    import os

    work = tmp_path_factory.mktemp("e2e")
    old = Path.cwd()
    os.chdir(work)
    saved_uri = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        assert cli.run(["teacher", str(CONFIGS / "digits-teacher.yaml"), *FAST]) == 0
        assert cli.run(["distill", str(CONFIGS / "digits-kd.yaml"), *FAST]) == 0
        yield {"work": work, "uri": f"sqlite:///{work / 'mlflow.db'}"}
    finally:
        os.chdir(old)
        if saved_uri:
            os.environ["MLFLOW_TRACKING_URI"] = saved_uri


def _runs(uri: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("kdflow-digits")
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_runs_are_recorded_in_mlflow(trained: dict) -> None:
    client = MlflowClient(trained["uri"])
    teacher, student = _runs(trained["uri"])
    assert teacher.data.tags["kd.kind"] == "teacher" and student.data.tags["kd.kind"] == "student"
    for run in (teacher, student):
        assert run.info.status == "FINISHED"
        assert run.data.params["trainer.epochs"] == "3"
        history = client.get_metric_history(run.info.run_id, "val/accuracy")
        assert [m.step for m in history] == [1, 2, 3]
        arts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "weights"} <= arts
        assert "holdout/accuracy" in run.data.metrics
    assert student.data.params["distill.losses.0.name"] == "kd"
    for key in ("train/loss", "train/loss/kd", "train/loss/ce", "val/teacher_agreement", "val/loss",
                "epoch", "samples_per_s"):
        assert key in student.data.metrics, key
    assert student.data.tags["kd.teacher_uri"].endswith("digits-teacher/model.safetensors")


def test_teacher_learns_and_student_agrees(trained: dict) -> None:
    teacher, student = _runs(trained["uri"])
    assert teacher.data.metrics["holdout/accuracy"] > 0.6  # chance is 0.1
    assert student.data.metrics["holdout/teacher_agreement"] > 0.5


def test_weights_carry_their_architecture(trained: dict, capsys: pytest.CaptureFixture[str]) -> None:
    weights = trained["work"] / "kdflow-runs" / "digits-kd" / "model.safetensors"
    meta = read_metadata(weights)
    assert meta["kd.model"] == "mlp" and meta["kd.num_classes"] == "10"
    assert cli.run(["evaluate", str(weights)]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "latency_ms" in out and "params" in out


def test_evaluate_runs_uri(trained: dict, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["uri"])
    _, student = _runs(trained["uri"])
    assert cli.run(["evaluate", f"runs:/{student.info.run_id}/weights/model.safetensors"]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_from_run_reproduces_the_config(trained: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from kd.tracking import config_from_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["uri"])
    _, student = _runs(trained["uri"])
    path = config_from_run(student.info.run_id)
    again = load_experiment(path)
    assert again.hash() == student.data.tags["kd.config_hash"]


def test_real_worker_with_feature_losses(ray_session: None, workdir: Path) -> None:
    """One real Ray Train worker (not the in-process mode), DKD + FitNets + AT + RKD
    terms reading features by module path from a ResNet student and a CNN teacher."""
    from kd.models import build_model
    from kd.models.weights import save_weights

    save_weights(build_model("cnn_small", {"channels": [32, 64]}, (1, 8, 8), 10), workdir / "t.safetensors")
    exp = load_experiment(CONFIGS / "digits-kd.yaml", [
        f"teacher.weights={workdir / 't.safetensors'}", "student.model=resnet8", "student.args={}",
        "trainer.epochs=2", "scaling.num_workers=1", "checkpoint.every_epochs=1",
        "distill.losses=[{name: dkd, weight: 1.0, alpha: 1.0, beta: 8.0},"
        " {name: fitnet, weight: 1.0, student: layer3, teacher: block2},"
        " {name: at, weight: 10.0, student: layer2, teacher: block1},"
        " {name: rkd, weight: 0.1, student: layer3, teacher: block2}]",
    ])
    out = train_run(exp, "student")
    for term in ("dkd", "fitnet", "at", "rkd", "ce"):
        assert math.isfinite(out.metrics[f"train/loss/{term}"]), term
    assert out.metrics["epoch"] == 2
    client = MlflowClient(mlflow.get_tracking_uri())
    assert [m.step for m in client.get_metric_history(out.run_id, "train/loss/fitnet")] == [1, 2]


def test_a_diverging_run_stops_with_the_reason(digits_teacher: str, workdir: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """lr 1e9 makes the loss nan in epoch 1: the run stops there (not after 20 epochs of
    nan), exit 1 with one line naming the cause, the MLflow run FAILED with that reason,
    and no checkpoint of the nan model is written."""
    code = cli.run(["distill", str(CONFIGS / "digits-kd.yaml"), f"teacher.weights={digits_teacher}",
                    "optim.lr=1e9", "scaling.num_workers=0", "checkpoint.every_epochs=1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1
    assert err.startswith("kd: run failed: TrainingDiverged: train/loss is nan after epoch 1")
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("kdflow-digits").experiment_id])[0]
    assert run.info.status == "FAILED" and "training diverged" in run.data.tags["kd.error"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch")] == [1]
    assert not list(workdir.glob("kdflow-runs/**/epoch_*"))


def _alive_train_controllers() -> int:
    """TrainController actors alive in this Ray (the GCS actor table; see tests.rank_probe)."""
    from ray._private import state

    return sum(a["ActorClassName"] == "TrainController" and a["State"] == "ALIVE"
               for a in state.actors().values())


def test_ctrl_c_after_a_run_interrupts_and_its_controller_exits(ray_session: None,
                                                                workdir: Path) -> None:
    """Ray Train's fit() installs a SIGINT handler holding the run's controller and
    leaves it: Ctrl-C after training (holdout scoring, registration, a workflow's next
    stage) was swallowed, and the controller and its DatasetManager lived on until the
    next fit. `kd.train.driver.caller_signals` puts the caller's handler back: a SIGINT
    after `train_run` reaches it, and no Train controller is left alive."""
    import signal
    import time

    got: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        exp = load_experiment(CONFIGS / "digits-teacher.yaml", [
            "trainer.epochs=1", "scaling.num_workers=1", "teacher.model=mlp",
            "teacher.args={hidden: [32]}"])
        train_run(exp, "teacher")
        signal.raise_signal(signal.SIGINT)
        assert got == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 30
    while _alive_train_controllers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _alive_train_controllers() == 0
