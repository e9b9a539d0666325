"""The embedded demo: a teacher, the same student from scratch and distilled, on digits.

Runs `train_run` three times (teacher; student with CE only; student with the
configured KD recipe) and prints a comparison table of holdout metrics.
"""

from __future__ import annotations

from pathlib import Path

from kd.config import load_experiment
from kd.tracking import tracking_uri
from kd.train.run import RunOutcome, train_run

COLUMNS = ("accuracy", "teacher_agreement", "params", "latency_ms")


def format_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    """A plain-text table: one row per model, the holdout metrics in COLUMNS."""
    head = f"{'model':22s}" + "".join(f"{c:>19s}" for c in COLUMNS)
    lines = [head, "-" * len(head)]
    for name, m in rows:
        cells = []
        for c in COLUMNS:
            v = m.get(c)
            cells.append(f"{'-':>19s}" if v is None else
                         f"{int(v):>19d}" if c == "params" else f"{v:>19.4f}")
        lines.append(f"{name:22s}" + "".join(cells))
    return "\n".join(lines)


PACKAGED = Path(__file__).resolve().parent / "configs"
DEMO_FILES = ("digits-teacher.yaml", "digits-kd.yaml")


def demo_configs(given: str | None) -> Path:
    """The folder the demo reads: ``given``; else ``./configs`` when it holds the demo's
    files (a checkout); else the copies installed with the package (`PACKAGED`)."""
    if given:
        return Path(given)
    here = Path("configs")
    return here if all((here / f).is_file() for f in DEMO_FILES) else PACKAGED


def run_demo(configs: Path, overrides: list[str] | None = None) -> list[tuple[str, RunOutcome]]:
    """Teacher from ``digits-teacher.yaml``, then scratch and KD from ``digits-kd.yaml``."""
    overrides = overrides or []
    teacher_exp = load_experiment(configs / "digits-teacher.yaml", overrides)
    teacher = train_run(teacher_exp, "teacher")
    kd_overrides = [*overrides, f"teacher.weights={teacher.weights}"]
    scratch_exp = load_experiment(configs / "digits-kd.yaml",
                                  [*kd_overrides, "distill.losses=[]", "distill.ce_weight=1.0",
                                   "name=digits-scratch"])
    scratch = train_run(scratch_exp, "student")
    kd_exp = load_experiment(configs / "digits-kd.yaml", kd_overrides)
    distilled = train_run(kd_exp, "student")
    results = [("teacher", teacher), ("student (scratch)", scratch), ("student (KD)", distilled)]
    print()
    print(format_table([(n, r.holdout) for n, r in results]))
    print(f"\nMLflow records: {tracking_uri(kd_exp)}  (experiment {kd_exp.tracking.experiment!r})")
    print(f"browse them with: mlflow ui --backend-store-uri {tracking_uri(kd_exp)}")
    return results
