"""Wall time of a short-epoch run against Ray Train's report poll interval.

Ray Train V2 workers put each ``train.report`` into a one-slot queue that the
controller drains once per poll (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, Ray's default
2 s). kdflow reports every epoch, so on small data every epoch waited for a poll.
This runs ``kd distill configs/digits-kd.yaml`` (20 epochs, 1 worker) as a fresh
process per interval and repeat, and records the whole run's wall time and the
median seconds between consecutive epochs (from the MLflow ``epoch`` metric's
timestamps), with the holdout accuracy to show the result does not change.

    PYTHONPATH=$PWD python bench/report_poll.py --intervals 2.0 0.5 0.25 0.1 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _common import enter_work_dir, teacher_weights  # noqa: E402
from _results import write_section  # noqa: E402

from kd.runtime import POLL_ENV, POLL_INTERVAL_S  # noqa: E402


def one_run(work: Path, teacher: str, interval: str, repeat: int, epochs: int) -> dict[str, float]:
    """One ``kd distill`` process; wall s, median s per epoch (epochs 2..E), holdout."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{work / 'mlflow.db'}"
    name = f"poll-{interval}-{repeat}"
    cmd = [sys.executable, "-m", "kd.cli", "distill", str(REPO / "configs" / "digits-kd.yaml"),
           f"teacher.weights={teacher}", f"storage.path={work / 'runs' / name}",
           f"tracking.uri={uri}", f"tracking.run_name={name}", f"trainer.epochs={epochs}"]
    env = {**os.environ, POLL_ENV: interval, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=work)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"kd distill failed at interval {interval}:\n{out.stderr[-2000:]}")
    text = out.stdout + out.stderr
    run_id = re.search(r"MLflow run ([0-9a-f]{32})", text).group(1)  # type: ignore[union-attr]
    holdout = float(re.search(r"holdout accuracy ([0-9.]+)", text).group(1))  # type: ignore[union-attr]
    stamps = sorted(m.timestamp for m in MlflowClient(uri).get_metric_history(run_id, "epoch"))
    gaps = [(b - a) / 1000 for a, b in zip(stamps[1:], stamps[2:])]
    return {"wall": wall, "epoch_s": statistics.median(gaps), "holdout": holdout}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--intervals", nargs="+", default=["2.0", "0.5", "0.25", "0.1"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = enter_work_dir(args.work, "poll")
    teacher = teacher_weights(work)
    rows = []
    for iv in args.intervals:
        runs = [one_run(work, teacher, iv, r, args.epochs) for r in range(args.repeats)]
        rows.append((iv, runs))
        print(f"interval {iv}s: " + ", ".join(f"{r['wall']:.1f}s" for r in runs), flush=True)
    lines = [
        f"`python bench/report_poll.py --intervals {' '.join(args.intervals)} --repeats "
        f"{args.repeats} --epochs {args.epochs}` on {time.strftime('%Y-%m-%d')}; `kd distill "
        "configs/digits-kd.yaml` (1 Ray Train worker, MLP student, online cnn_small teacher), a "
        "fresh process per run (Ray start-up included in wall time), 2 CPU cores. kdflow's "
        f"default is {POLL_INTERVAL_S} s.",
        "",
        "| poll interval s | wall s (mean) | per repeat | s per epoch (median, epochs 2..E) "
        "| holdout accuracy |",
        "|---|---|---|---|---|",
    ]
    for iv, runs in rows:
        walls = ", ".join(f"{r['wall']:.1f}" for r in runs)
        holdouts = ", ".join(f"{r['holdout']:.4f}" for r in runs)
        lines.append(
            f"| {iv} | {statistics.mean(r['wall'] for r in runs):.1f} | {walls} | "
            f"{statistics.median(r['epoch_s'] for r in runs):.2f} | {holdouts} |")
    table = "\n".join(lines)
    print(table)
    write_section("Ray Train report poll interval", table)


if __name__ == "__main__":
    main()
