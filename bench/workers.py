"""1 vs 2 Ray workers on this machine: samples/s and accuracy at the same global batch.

Rows: student-only training (the digits MLP student, CE only) and KD with the
online teacher (the digits CNN teacher running forward on every batch), each on
1 and 2 DDP workers with the same global batch size (2 workers: half each).
samples/s is the loop's own ``samples_per_s`` (training samples per second of
training time, all workers together), averaged over epochs 2..E (epoch 1 holds
warm-up); accuracy is the final ``val/accuracy``, mean over seeds with every
seed listed. A teacher is trained first (in-process, ``num_workers=0``).

    PYTHONPATH=$PWD python bench/workers.py --epochs 8 --seeds 0 1 2 --student-seeds 0
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _common import enter_work_dir  # noqa: E402
from _results import write_section  # noqa: E402

from kd.config import load_experiment  # noqa: E402
from kd.runtime import ensure_ray  # noqa: E402
from kd.train.run import train_run  # noqa: E402


def _run(cfg: str, role: str, overrides: list[str]) -> tuple[float, float, float]:
    """Train once; (mean samples/s of epochs 2..E from the MLflow run, final
    val/accuracy, wall seconds of the whole run)."""
    from mlflow.tracking import MlflowClient

    exp = load_experiment(REPO / "configs" / cfg, overrides)
    t0 = time.perf_counter()
    out = train_run(exp, role)  # type: ignore[arg-type]
    wall = time.perf_counter() - t0
    hist = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_metric_history(
        out.run_id, "samples_per_s")
    rates = [m.value for m in hist if m.step >= 2] or [m.value for m in hist]
    return statistics.mean(rates), out.metrics["val/accuracy"], wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="seeds of the KD rows (the accuracy comparison)")
    p.add_argument("--student-seeds", type=int, nargs="+", default=[0],
                   help="seeds of the student-only rows (throughput)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--teacher", help="existing digits teacher weights (else one is trained)")
    args = p.parse_args()
    load_start = os.getloadavg()[0]
    work = enter_work_dir(None, "workers")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    ensure_ray(num_cpus=os.cpu_count())
    common = [f"storage.path={work / 'runs'}", f"trainer.batch_size={args.batch_size}",
              "checkpoint.every_epochs=100"]
    teacher = Path(args.teacher) if args.teacher else (
        work / "runs" / "digits-teacher" / "model.safetensors")
    if not args.teacher:
        _run("digits-teacher.yaml", "teacher",
             [*common, "scaling.num_workers=0", "trainer.epochs=10"])
    # teacher.weights is set in both modes: student-only never runs the teacher in
    # training (no KD terms), it only scores holdout agreement at the end.
    common.append(f"teacher.weights={teacher}")
    modes = {
        "student-only": (["distill.losses=[]", "distill.ce_weight=1.0"], args.student_seeds),
        "KD, online teacher": ([], args.seeds),
    }
    rows = []
    for mode, (extra, seeds) in modes.items():
        for workers in (1, 2):
            rates, accs, walls = [], [], []
            for seed in seeds:
                r, a, w = _run("digits-kd.yaml", "student",
                               [*common, *extra, f"scaling.num_workers={workers}",
                                f"trainer.epochs={args.epochs}", f"seed={seed}"])
                rates.append(r)
                accs.append(a)
                walls.append(w)
                print(f"[bench] {mode:20s} workers={workers} seed={seed} {r:8.0f} samples/s "
                      f"val/accuracy {a:.4f} wall {w:.0f}s", flush=True)
            rows.append((mode, workers, statistics.mean(rates), accs, statistics.mean(walls)))
    base = {m: r for m, w, r, _, _ in rows if w == 1}
    student_base = base["student-only"]
    lines = ["| mode | workers | samples/s | vs student-only, 1 worker | val/accuracy mean "
             "(seeds) | wall s/run |", "|---|---|---|---|---|---|"]
    for mode, workers, rate, accs, wall in rows:
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        seeds = ", ".join(f"{a:.4f}" for a in accs)
        lines.append(f"| {mode} | {workers} | {rate:.0f} | {rate / student_base:.2f}x | "
                     f"{statistics.mean(accs):.4f} ± {sd:.4f} ({seeds}) | {wall:.0f} |")
    table = "\n".join(lines)
    print(table)
    body = (f"`python bench/workers.py --epochs {args.epochs} --seeds "
            f"{' '.join(map(str, args.seeds))} --student-seeds "
            f"{' '.join(map(str, args.student_seeds))}` on this machine "
            f"({os.cpu_count()} cores, shared with other jobs; 1-min load average "
            f"{load_start:.1f} at start, {os.getloadavg()[0]:.1f} at the end), digits, "
            "MLP student, CNN teacher, global batch "
            f"{args.batch_size} (2 workers: {args.batch_size // 2} each), DDP over gloo. "
            "samples/s = training samples per second of training time, all workers together, "
            "mean of epochs 2..E; accuracy = final val/accuracy, mean ± sd over seeds.\n\n"
            + table)
    write_section("Ray Train workers (1 vs 2)", body)


if __name__ == "__main__":
    main()
