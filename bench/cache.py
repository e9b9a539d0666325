"""Samples/s of student-only training, KD with the online teacher and KD from the
teacher-output cache: same student, data, batch size, in-process loop.

    PYTHONPATH=$PWD python bench/cache.py [--epochs 6] [--seeds 0 1]

Samples/s is the loop's ``samples_per_s`` (train samples / train time of an epoch),
the median (and the best) over epochs 2..N (epoch 1 warms up); modes are
interleaved per seed so background load falls on all of them alike. Writes bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from _common import CONFIGS, enter_work_dir, teacher_weights, write_section

from kd.config import load_experiment
from kd.train.run import train_run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = enter_work_dir(args.work, "cache")
    teacher = teacher_weights(work)
    modes = {
        "student only": ["distill.losses=[]", "distill.ce_weight=1.0"],
        "KD online teacher": ["teacher.cache=false"],
        "KD from cache": ["teacher.cache=true"],
    }
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    speeds: dict[str, list[float]] = {m: [] for m in modes}
    peaks: dict[str, list[float]] = {m: [] for m in modes}
    accs: dict[str, list[float]] = {m: [] for m in modes}
    for seed in args.seeds:  # modes interleaved, so background load hits all alike
        for name, extra in modes.items():
            exp = load_experiment(CONFIGS / "digits-kd.yaml", [
                f"teacher.weights={teacher}", f"storage.path={work / 'runs'}",
                f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "scaling.num_workers=0",
                f"trainer.epochs={args.epochs}", "trainer.batch_size=64", f"seed={seed}",
                "checkpoint.every_epochs=100", *extra])
            out = train_run(exp, "student")
            hist = client.get_metric_history(out.run_id, "samples_per_s")
            steps = [m.value for m in sorted(hist, key=lambda m: m.step)[1:]]
            speeds[name].append(statistics.median(steps))
            peaks[name].append(max(steps))
            accs[name].append(out.metrics["val/accuracy"])
    base = statistics.mean(speeds["student only"])
    base_peak = max(peaks["student only"])
    lines = ["| mode | samples/s (mean of per-run medians) | per seed | best epoch | "
             "step time vs student-only (medians / best) | val accuracy per seed |",
             "|---|---|---|---|---|---|"]
    for name in modes:
        mean = statistics.mean(speeds[name])
        lines.append(f"| {name} | {mean:.0f} | {', '.join(f'{s:.0f}' for s in speeds[name])} | "
                     f"{max(peaks[name]):.0f} | {base / mean:.2f}x / "
                     f"{base_peak / max(peaks[name]):.2f}x | "
                     f"{', '.join(f'{a:.3f}' for a in accs[name])} |")
    table = "\n".join(lines)
    print(table)
    write_section("teacher-output cache: samples/s", (
        f"`python bench/cache.py --epochs {args.epochs} --seeds "
        f"{' '.join(map(str, args.seeds))}` on {time.strftime('%Y-%m-%d')}; digits, "
        "student mlp [32], teacher cnn_small [32, 64], batch 64, `num_workers: 0` "
        f"(the loop in-process), 2 CPU cores (1-min load average {os.getloadavg()[0]:.1f} "
        "at the end; compare the ratios). Step time ratio = student-only samples/s / "
        "mode samples/s (target for the cache <= 1.10x).\n\n" + table))


if __name__ == "__main__":
    main()
