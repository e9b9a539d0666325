"""`kd` on bad input: one line on stderr, exit code 2, before any Ray worker starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from kd import cli
from kd.models import build_model
from kd.models.weights import save_weights
from kd.train import run as pipeline

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture
def teacher_weights(tmp_path: Path) -> Path:
    """An (untrained) cnn_small teacher file that fits configs/digits-kd.yaml."""
    path = tmp_path / "teacher.safetensors"
    save_weights(build_model("cnn_small", {"channels": [32, 64]}, (1, 8, 8), 10), path,
                 {"kd.num_classes": "10"})
    return path


@pytest.fixture
def no_ray(ray_session: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the pipeline gets as far as starting Ray for training. The data
    checks run on Ray Data (one streaming pass), so the session's Ray is up."""
    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("Ray was started although the input was bad")

    monkeypatch.setattr(pipeline, "ensure_ray", refuse)


BAD = [
    (["distill.losses.0.name=kdd"], "unknown loss 'kdd'"),
    (["student.model=mlpp"], "unknown model 'mlpp'"),
    (["data.source=digitz"], "unknown dataset 'digitz'"),
    (["data.source=/nonexistent/train.npz"], "/nonexistent/train.npz: no such file or directory"),
    (["trainer.batch_size=big"], "trainer.batch_size: Input should be a valid integer"),
    (["trainer.epoch=3"], "trainer.epoch: unknown field"),
    (["teacher.args.channels=[16, 32]"], "weights do not fit the architecture"),
    (["student.args.dropout=2"], "dropout"),
    (["distill.losses=[{name: fitnet, weight: 1.0, student: body.9, teacher: block2}]"],
     "feature path 'body.9' not found in student model"),
    (["distill.losses=[{name: at, weight: 1.0, student: body.0, teacher: blok2}]"],
     "feature path 'blok2' not found in teacher model; nearest: block2"),
    (["distill.losses=[{name: kd, weight: 1.0, tau: 3}]"], "unexpected parameter 'tau'"),
    (["scaling.strategy=fsdp", "scaling.num_workers=0"], "set scaling.num_workers >= 1"),
    (["scaling.strategy=fsdp", "scaling.use_gpu=true", "trainer.precision=fp16"],
     "trainer.precision: fp16 is not supported with scaling.strategy: fsdp"),
    (["teacher.shard=true"], "teacher.shard: sharding the teacher needs scaling.strategy: fsdp"),
    (["data.transforms=[random_rotate]"], "unknown transform 'random_rotate'"),
    (["distill.ce_weight=0", "distill.losses=[]"], "nothing to train"),
    # before: ran silently with one short step per epoch
    (["trainer.batch_size=5000"], "trainer.batch_size: 5000 is larger than the training split"),
    (["data.y_column=lable"], "no column 'lable' (data.y_column)"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[b[1][:30] for b in BAD])
def test_bad_input_is_one_line_exit_2_before_ray(
    overrides: list[str], message: str, teacher_weights: Path, no_ray: None, workdir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = cli.run(["distill", str(CONFIGS / "digits-kd.yaml"), f"teacher.weights={teacher_weights}",
                    *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("kd: error: ") and "\n" not in err
    assert message in err


def test_teacher_with_other_class_count(tmp_path: Path, no_ray: None, workdir: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t5.safetensors"
    save_weights(build_model("cnn_small", {"channels": [32, 64]}, (1, 8, 8), 5), path,
                 {"kd.num_classes": "5"})
    code = cli.run(["distill", str(CONFIGS / "digits-kd.yaml"), f"teacher.weights={path}"])
    assert code == 2
    assert "label 9 is outside the class range [0, 5) of teacher.weights" in capsys.readouterr().err


def test_missing_teacher_weights(no_ray: None, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.run(["distill", str(CONFIGS / "digits-kd.yaml"), "teacher.weights=null"])
    assert code == 2
    assert "teacher.weights: required to distil" in capsys.readouterr().err


def test_pickled_teacher_is_refused(tmp_path: Path, no_ray: None, workdir: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"weight": Evil()}, path)
    code = cli.run(["distill", str(CONFIGS / "digits-kd.yaml"), f"teacher.weights={path}"])
    captured = capsys.readouterr()
    assert code == 2 and "pwned" not in captured.out


@pytest.mark.parametrize("command", ["teacher", "distill", "evaluate", "demo"])
def test_help_on_every_command(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ex:
        cli.run([command, "--help"])
    assert ex.value.code == 0
    assert f"usage: kd {command}" in capsys.readouterr().out


def test_student_name_that_would_overwrite_its_teacher(tmp_path: Path, no_ray: None, workdir: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A student experiment named like its teacher's run would write over the teacher's
    weights file; it is refused and the teacher file stays as it was."""
    runs = tmp_path / "runs"
    path = runs / "digits-teacher" / "model.safetensors"
    path.parent.mkdir(parents=True)
    save_weights(build_model("cnn_small", {"channels": [32, 64]}, (1, 8, 8), 10), path,
                 {"kd.num_classes": "10"})
    before = path.read_bytes()
    code = cli.run(["distill", str(CONFIGS / "digits-kd.yaml"), f"teacher.weights={path}",
                    f"storage.path={runs}", "name=digits-teacher"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "name: 'digits-teacher' would write the student's weights to" in err
    assert "which is teacher.weights" in err and path.read_bytes() == before


def test_failure_line_names_the_worker_error_not_rays_wrapper() -> None:
    """What `kd` prints for a failed run (and a sweep records for a failed trial) is the
    worker's own error, not "WorkerGroupError: Training failed due to worker errors:"."""
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from kd.errors import InputError, TrainingDiverged, one_line

    group = WorkerGroupError("[Rank 0] ...traceback...", {
        1: ValueError("rank 1 saw the collective break"),
        0: TrainingDiverged("train/loss is nan after epoch 3 (optim.lr 10)\nmore detail")})
    wrapped = RayTaskError("ImplicitFunc.train", "Traceback ...", group).as_instanceof_cause()
    assert one_line(wrapped) == "TrainingDiverged: train/loss is nan after epoch 3 (optim.lr 10)"
    try:
        try:
            raise FileNotFoundError("x.npz")
        except FileNotFoundError as inner:
            raise InputError("data.source: x.npz not found") from inner
    except InputError as outer:
        assert one_line(outer) == "InputError: data.source: x.npz not found"
    try:
        try:
            raise KeyError("weight")
        except KeyError as inner:
            raise RuntimeError() from inner
    except RuntimeError as outer:
        assert one_line(outer) == "KeyError: 'weight'"


def test_packaged_demo_configs_match_the_repository() -> None:
    """`kd demo` outside a checkout reads the copies installed in kd/configs; they must
    be the files configs/ documents, not a drifting second version."""
    from kd.demo import DEMO_FILES, PACKAGED

    for name in DEMO_FILES:
        assert (PACKAGED / name).read_text() == (CONFIGS / name).read_text(), name


@pytest.mark.slow
def test_demo_runs_from_an_empty_folder(ray_session: None, workdir: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The embedded default: no configs folder, no data, no servers; three real runs
    and a table of the three models, with the SQLite MLflow store in this folder."""
    assert cli.run(["demo", "trainer.epochs=2"]) == 0
    out = capsys.readouterr().out
    for row in ("teacher", "student (scratch)", "student (KD)"):
        assert any(line.startswith(row) for line in out.splitlines()), row
    assert f"MLflow records: sqlite:///{workdir / 'mlflow.db'}" in out
    assert (workdir / "kdflow-runs" / "digits-kd" / "model.safetensors").is_file()


@pytest.mark.parametrize("argv,config,overrides", [
    (["distill", "C", "--run-name", "N", "trainer.epochs=1"], "C", ["trainer.epochs=1"]),
    (["distill", "C", "a=1", "--run-name", "N", "b=2"], "C", ["a=1", "b=2"]),
    (["evaluate", "W", "--config", "C", "trainer.epochs=1"], "C", ["trainer.epochs=1"]),
])
def test_options_and_overrides_in_any_order(argv: list[str], config: str, overrides: list[str]) -> None:
    args = cli.parse_args(argv)
    assert (args.config, args.overrides) == (config, overrides)


def test_unknown_option_still_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["distill", "C", "--bogus", "a=1"])
    assert e.value.code == 2 and "--bogus" in capsys.readouterr().err


@pytest.mark.parametrize("command,argv,flags,want", [
    ("distill", ["--config", "C", "--run-name", "N", "a=1"], (), ["distill", "C", "a=1", "--run-name", "N"]),
    ("distill", ["a=1", "--config", "C"], (), ["distill", "C", "a=1"]),
    ("tune", ["--config", "C", "--resume", "a=1"], ("--resume",), ["tune", "C", "a=1", "--resume"]),
])
def test_workflow_entrypoints_share_one_parser(command: str, argv: list[str], flags: tuple[str, ...],
                                               want: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflows"))
    import _entry

    seen: list[list[str]] = []
    monkeypatch.setattr(cli, "run", lambda a: seen.append(a) or 0)
    assert _entry.main(command, argv, flags) == 0 and seen == [want]
