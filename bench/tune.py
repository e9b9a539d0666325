"""Sweep benchmarks on digits:

1. wall time of the same sweep with the shared teacher cache vs the online teacher
   (a teacher forward in every trial step);
2. ASHA vs no pruning: total epochs trained and best accuracy found (same seed, so
   the same sampled configs);
3. ``student.init: teacher_pruned`` vs random init at equal epochs (cnn_small at
   width 0.5 of the teacher), over seeds.

    PYTHONPATH=$PWD python bench/tune.py [--trials 4] [--epochs 4] [--seeds 0 1]

Writes bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _common import CONFIGS, enter_work_dir, teacher_weights, write_section

from kd.config import load_experiment
from kd.train.run import train_run
from kd.tune.sweep import run_sweep


def sweep(work: Path, teacher: str, args: argparse.Namespace, *extra: str) -> tuple[float, list]:
    exp = load_experiment(CONFIGS / "digits-tune.yaml", [
        f"teacher.weights={teacher}", f"storage.path={work / 'runs'}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}", f"tune.num_samples={args.trials}",
        f"trainer.epochs={args.epochs}", "tune.search.name=random", "tune.seed=0",
        "tune.constraints={}", "checkpoint.every_epochs=100",
        "tune.space={distill.temperature: 'uniform(2, 6)', "
        "optim.lr: 'choice([0.0005, 0.02, 0.1])', student.width: 'choice([0.5, 1.0])'}",
        *extra])
    t0 = time.perf_counter()
    out = run_sweep(exp, quiet=True)
    return time.perf_counter() - t0, out.rows


def best(rows: list) -> float:
    return max(r["metric"] for r in rows if r["metric"] == r["metric"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = enter_work_dir(args.work, "tune")
    teacher = teacher_weights(work)

    fifo = "tune.scheduler.name=none"
    t_cache, r_cache = sweep(work, teacher, args, fifo, "teacher.cache=true")
    t_online, r_online = sweep(work, teacher, args, fifo, "teacher.cache=false")
    t_asha, r_asha = sweep(work, teacher, args, "teacher.cache=true",
                           "tune.scheduler={name: asha, grace_period: 1, reduction_factor: 2}")
    epochs = lambda rows: sum(r["epochs_trained"] for r in rows)  # noqa: E731
    sweep_table = "\n".join([
        "| sweep | wall s | trials | epochs trained | best val/accuracy |",
        "|---|---|---|---|---|",
        f"| shared cache, no pruning | {t_cache:.0f} | {len(r_cache)} | {epochs(r_cache)} | "
        f"{best(r_cache):.3f} |",
        f"| online teacher, no pruning | {t_online:.0f} | {len(r_online)} | {epochs(r_online)} | "
        f"{best(r_online):.3f} |",
        f"| shared cache, ASHA (grace 1, rf 2) | {t_asha:.0f} | {len(r_asha)} | "
        f"{epochs(r_asha)} | {best(r_asha):.3f} |",
    ])
    print(sweep_table)

    accs: dict[str, list[float]] = {"random": [], "teacher_pruned": []}
    for init in accs:
        for seed in args.seeds:
            exp = load_experiment(CONFIGS / "digits-kd.yaml", [
                f"teacher.weights={teacher}", f"storage.path={work / 'runs'}",
                f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "scaling.num_workers=0",
                "student.model=cnn_small", "student.args={channels: [32, 64]}",
                "student.width=0.5", f"student.init={init}", f"seed={seed}",
                f"trainer.epochs={args.epochs}", "checkpoint.every_epochs=100"])
            accs[init].append(train_run(exp, "student").metrics["val/accuracy"])
    init_table = "\n".join([
        "| student.init | val/accuracy mean | per seed |", "|---|---|---|",
        *[f"| {k} | {statistics.mean(v):.3f} | {', '.join(f'{a:.3f}' for a in v)} |"
          for k, v in accs.items()]])
    print(init_table)
    write_section("kd tune: shared cache, ASHA, pruned-teacher init", (
        f"`python bench/tune.py --trials {args.trials} --epochs {args.epochs} --seeds "
        f"{' '.join(map(str, args.seeds))}` on {time.strftime('%Y-%m-%d')}; digits, teacher "
        "cnn_small [32, 64], student mlp [32] x width; random search (seed 0, so every sweep "
        "samples the same configs) over temperature, lr, width; 2 trials at a time, 1 Ray "
        "Train worker of 0.5 CPU each; 2 CPU cores; \"epochs trained\" counts the epochs the "
        "workers really trained (`epochs_trained`, read from each child run), not only the "
        "ones ASHA saw.\n\n" + sweep_table +
        f"\n\nPruned-teacher init vs random init, cnn_small width 0.5 of the teacher, "
        f"{args.epochs} epochs of KD, seeds {args.seeds}:\n\n" + init_table))


if __name__ == "__main__":
    main()
