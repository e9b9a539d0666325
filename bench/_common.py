"""Helpers shared by the benches: a digits teacher and the RESULTS.md section writer."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
RESULTS = REPO / "bench" / "RESULTS.md"


def enter_work_dir(given: str | None, name: str) -> Path:
    """Make and enter the bench's work folder (``given`` or a fresh temp folder), so
    MLflow's SQLite file, artifacts and run folders never land in the repository."""
    import os
    import tempfile

    work = Path(given or tempfile.mkdtemp(prefix=f"kd-bench-{name}-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    return work


def teacher_weights(work: Path, epochs: int = 8) -> str:
    """Train (once per work folder) the digits cnn_small teacher; its weights path."""
    from kd.config import load_experiment
    from kd.train.run import train_run

    path = work / "runs" / "digits-teacher" / "model.safetensors"
    if path.exists():
        return str(path)
    exp = load_experiment(CONFIGS / "digits-teacher.yaml", [
        "scaling.num_workers=0", f"trainer.epochs={epochs}", f"storage.path={work / 'runs'}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}"])
    return train_run(exp, "teacher").weights


def mlp_student_run(work: Path, epochs: int) -> str:
    """An MLP teacher and a KD student on digits (``epochs`` each, in-process, runs under
    ``work``); the student's MLflow run id, ready for ``register_run``."""
    from kd.config import load_experiment
    from kd.train.run import train_run

    common = ["scaling.num_workers=0", f"trainer.epochs={epochs}", f"storage.path={work}",
              "teacher.model=mlp", "teacher.args={hidden: [64]}"]
    t = train_run(load_experiment(CONFIGS / "digits-teacher.yaml", common), "teacher")
    s = train_run(load_experiment(CONFIGS / "digits-kd.yaml",
                                  [*common, f"teacher.weights={t.weights}"]), "student")
    return s.run_id


def write_section(title: str, body: str) -> None:
    """Replace (or append) the ``### title`` block under ``## tune and teacher cache``."""
    from _results import write_section as write

    write(title, body, level=3, parent="tune and teacher cache")
