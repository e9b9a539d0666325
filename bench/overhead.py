"""kdflow's loop against a plain PyTorch loop, side by side in one run.

Workload: resnet56 (teacher) -> resnet20 (student) on 32x32x3 synthetic images
(``data.source: synthetic``), batch 128, SGD (lr 0.05, momentum 0.9), three modes:

- CE only: the student on labels (``distill.losses=[]``, ``distill.ce_weight=1``);
- KD, online teacher: ``0.1 CE + 0.9 T^2 KL`` (T 4) with the teacher forward per batch;
- KD, from the cache: the same loss with the teacher's logits read from the cache.

kdflow runs ``train_run`` (what ``kd distill`` runs) with ``scaling.num_workers: 1``,
the default path (one Ray Train worker on a local Ray). The plain loop runs in this
process on in-memory tensors (``torch.randperm`` shuffle, slicing), with torch's default
thread count here. samples/s for both is the train samples of an epoch over its train
time (data feeding included, evaluation excluded), median over epochs 2..E (epoch 1
warms up). The teacher is untrained (random weights): the cost, not the accuracy, is
measured.

A shared machine's load comes and goes, so each mode runs ``--repeats`` interleaved
pairs (plain, kdflow, plain, kdflow, ...): the table gives the medians of the repeats,
the ratio of the medians, and every repeat's pair. kdflow's loop also logs how much of
each epoch it waited for the next batch (``time/data_wait_s``: Ray Data's fetch,
shuffle and tensor conversion not hidden by its prefetch); the table gives that share
and kdflow's rate with the wait taken out (its compute alone), which splits a gap
between feeding and computing. ``--plain-in-ray`` adds the plain loop run inside a
one-CPU Ray task with the threads kdflow's worker uses (the worker's process, without
kdflow's loop and Ray Data).

    PYTHONPATH=$PWD python bench/overhead.py [--rows 5000] [--epochs 4] [--workers 1] \
        [--repeats 3] [--plain-in-ray]

Prints a table, writes bench/results/overhead.json and the RESULTS.md section.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import enter_work_dir  # noqa: E402
from _results import write_section  # noqa: E402

SHAPE = [3, 32, 32]
CLASSES = 10
BATCH = 128
T = 4.0
MODES = {
    "CE only": ["distill.losses=[]", "distill.ce_weight=1.0"],
    "KD, online teacher": ["teacher.cache=false"],
    "KD, from the cache": ["teacher.cache=true"],
}


def experiment(work: Path, teacher: str, rows: int, epochs: int, workers: int, extra: list[str]):
    """The kdflow experiment of one mode (the same for every mode but ``extra``)."""
    from kd.config import apply_overrides, experiment_from_dict

    doc = {
        "name": "overhead", "seed": 0,
        "data": {"source": "synthetic", "args": {"n": rows, "num_classes": CLASSES,
                                                 "shape": SHAPE},
                 "split": {"train": 0.8, "val": 0.1, "holdout": 0.1}},
        "teacher": {"model": "resnet56", "weights": teacher},
        "student": {"model": "resnet20"},
        "distill": {"temperature": T, "ce_weight": 0.1, "losses": [{"name": "kd", "weight": 0.9}]},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0,
                  "schedule": {"name": "none"}},
        "trainer": {"epochs": epochs, "batch_size": BATCH},
        "checkpoint": {"every_epochs": 1000},
        "scaling": {"num_workers": workers},
        "storage": {"path": str(work / "runs")},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "overhead"},
    }
    return experiment_from_dict(apply_overrides(doc, extra))


def plain_loop(mode: str, x: torch.Tensor, y: torch.Tensor, teacher: torch.nn.Module | None,
               epochs: int) -> list[float]:
    """The plain PyTorch loop; samples/s of each epoch (``teacher`` unused for CE only)."""
    from kd.models import build_model

    torch.manual_seed(0)
    student = build_model("resnet20", {}, tuple(SHAPE), CLASSES)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    cached = None
    if mode == "KD, from the cache":
        with torch.no_grad():
            cached = torch.cat([teacher(x[i:i + 512]) for i in range(0, len(x), 512)])
    rates = []
    for _ in range(epochs):
        student.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), BATCH):
            j = perm[i:i + BATCH]
            xb, yb = x[j], y[j]
            out = student(xb)
            loss = F.cross_entropy(out, yb)
            if mode != "CE only":
                if cached is not None:
                    t = cached[j]
                else:
                    with torch.no_grad():
                        t = teacher(xb)
                kl = F.kl_div(F.log_softmax(out / T, 1), F.log_softmax(t / T, 1),
                              reduction="batchmean", log_target=True) * T * T
                loss = 0.1 * loss + 0.9 * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rates.append(len(x) / (time.perf_counter() - t0))
    return rates


def _median_after_warmup(rates: list[float]) -> float:
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def kdflow_run(work: Path, tpath: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    """One `train_run` of the mode; its per-epoch samples/s, feed-wait shares, wall s,
    the last epoch's ``train/loss``."""
    from mlflow.tracking import MlflowClient

    from kd.train.run import train_run

    exp = experiment(work, str(tpath), args.rows, args.epochs, args.workers, extra)
    t0 = time.perf_counter()
    out = train_run(exp, "student")
    wall = time.perf_counter() - t0
    client = MlflowClient(exp.tracking.uri)

    def history(key: str) -> list[float]:  # one value per epoch
        return [m.value for m in sorted(client.get_metric_history(out.run_id, key),
                                        key=lambda m: m.step)]

    rates, train_s, wait_s = history("samples_per_s"), history("time/train_s"), \
        history("time/data_wait_s")
    compute = [r * t / max(t - w, 1e-9) for r, t, w in zip(rates, train_s, wait_s, strict=True)]
    return {"rates": rates, "img_s": _median_after_warmup(rates),
            "wait_share": _median_after_warmup([w / t for w, t in zip(wait_s, train_s, strict=True)]),
            "compute_img_s": _median_after_warmup(compute), "wall_s": wall,
            "threads": out.metrics.get("worker/torch_threads"),
            "final_loss": history("train/loss")[-1]}


def plain_in_ray(mode: str, x: torch.Tensor, y: torch.Tensor, teacher: torch.nn.Module,
                 epochs: int) -> list[float]:
    """`plain_loop` inside a one-CPU Ray task, with torch's threads set as kdflow sets a
    one-worker run's (the node's CPUs): the Ray worker process without kdflow's loop."""
    import ray

    @ray.remote(num_cpus=1)
    def task(mode: str, x: torch.Tensor, y: torch.Tensor, teacher: torch.nn.Module,
             epochs: int) -> list[float]:
        sys.path.insert(0, str(REPO / "bench"))
        torch.set_num_threads(int(ray.cluster_resources()["CPU"]))
        return plain_loop(mode, x, y, teacher, epochs)

    return ray.get(task.remote(mode, x, y, teacher, epochs))


def run_mode(k: int, mode: str, ctx: dict, args: argparse.Namespace) -> dict:
    """``args.repeats`` interleaved pairs (plain, kdflow) of one mode, plus their medians."""
    x, y, teacher = ctx["x"], ctx["y"], ctx["teacher"]
    plains, kdfs, in_ray = [], [], []
    for r in range(args.repeats):
        plains.append(_median_after_warmup(plain_loop(mode, x, y, teacher, args.epochs)))
        kdfs.append(kdflow_run(ctx["work"], ctx["tpath"], args, MODES[mode]))
        if args.plain_in_ray:
            in_ray.append(_median_after_warmup(plain_in_ray(mode, x, y, teacher, args.epochs)))
        print(f"[bench] {mode} repeat {r + 1}/{args.repeats}: plain {plains[-1]:.0f}  kdflow "
              f"{kdfs[-1]['img_s']:.0f} img/s (feed wait {kdfs[-1]['wait_share']:.1%})"
              + (f"  plain in a Ray task {in_ray[-1]:.0f}" if in_ray else "")
              + f"  load {os.getloadavg()[0]:.1f}", flush=True)
    med = statistics.median
    plain, kdf = med(plains), med(k["img_s"] for k in kdfs)
    return {"mode": mode, "plain": plain, "kdflow": kdf, "ratio": kdf / plain,
            "plain_repeats": plains, "kdflow_repeats": [k["img_s"] for k in kdfs],
            "ratio_repeats": [k["img_s"] / p for k, p in zip(kdfs, plains, strict=True)],
            "feed_wait_share": med(k["wait_share"] for k in kdfs),
            "kdflow_compute": med(k["compute_img_s"] for k in kdfs),
            "plain_in_ray": med(in_ray) if in_ray else None, "plain_in_ray_repeats": in_ray,
            "kdflow_runs": kdfs, "worker_threads": kdfs[0]["threads"]}


def table(rows: list[dict]) -> str:
    """The markdown table of the modes (medians, then every repeat)."""
    ce = rows[0]["kdflow"]
    in_ray = any(r["plain_in_ray"] for r in rows)
    lines = ["| mode | plain img/s | kdflow img/s | ratio (medians) | best repeats: plain / kdflow "
             "| repeats: plain / kdflow = ratio "
             "| kdflow feed wait | kdflow without the wait | "
             + ("plain loop in a Ray task | " if in_ray else "") + "kdflow step cost vs CE |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if in_ray else "") + "---|"]
    for r in rows:
        reps = ", ".join(f"{p:.0f} / {k:.0f} = {q:.2f}x" for p, k, q in
                         zip(r["plain_repeats"], r["kdflow_repeats"], r["ratio_repeats"], strict=True))
        ray_col = ""
        if in_ray:
            ray_col = (f"{r['plain_in_ray']:.0f} ({r['plain_in_ray'] / r['plain']:.2f}x; "
                       + ", ".join(f"{v:.0f}" for v in r["plain_in_ray_repeats"]) + ") | ")
        best_p, best_k = max(r["plain_repeats"]), max(r["kdflow_repeats"])
        lines.append(f"| {r['mode']} | {r['plain']:.0f} | {r['kdflow']:.0f} | {r['ratio']:.2f}x "
                     f"| {best_p:.0f} / {best_k:.0f} = {best_k / best_p:.2f}x | {reps} "
                     f"| {r['feed_wait_share']:.1%} | {r['kdflow_compute']:.0f} "
                     f"({r['kdflow_compute'] / r['plain']:.2f}x) | {ray_col}{ce / r['kdflow']:.2f}x |")
    return "\n".join(lines)


def write_outputs(facts: dict, command: str) -> None:
    """bench/results/overhead.json and the RESULTS.md section, from ``facts``."""
    rows, load = facts["modes"], facts["load_avg_1_5_15_at_end"]
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "overhead.json").write_text(json.dumps(facts, indent=2) + "\n")
    write_section("loop overhead: kdflow vs a plain PyTorch loop", (
        f"`{command}` started {facts['date']}, {facts['wall_s'] / 60:.0f} min; resnet56 -> "
        f"resnet20, 32x32x3 synthetic, {facts['rows_train']} train rows, batch {BATCH}, SGD; "
        f"{facts['cpus']} CPU cores, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
        f"(1/5/15 min) at the end; kdflow worker torch threads: {rows[0]['worker_threads']}, "
        f"plain loop: {facts['driver_torch_threads']}. img/s: median of epochs 2..E, train time "
        f"only, then the median of {facts['repeats']} interleaved repeats (plain, kdflow, plain, "
        "kdflow, ...). Feed wait: the share of kdflow's train time spent waiting for the next "
        "batch (`time/data_wait_s`). Targets: ratio >= 0.95x; KD from the cache <= 1.05x the CE "
        f"step cost (here {facts['cache_vs_ce_step_cost']:.2f}x). Raw: "
        "`bench/results/overhead.json`.\n\n" + table(rows)))


def random_teacher(work: Path) -> tuple[torch.nn.Module, Path]:
    """The benches' resnet56 teacher with random weights (seed 1), frozen, and the
    safetensors file under ``work`` that kdflow's configs point at."""
    from kd.models import build_model
    from kd.models.weights import freeze, save_weights

    torch.manual_seed(1)
    tpath = work / "teacher.safetensors"
    teacher = freeze(build_model("resnet56", {}, tuple(SHAPE), CLASSES))
    save_weights(teacher, tpath)
    return teacher, tpath


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=5000, help="synthetic rows (80%% train)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--workers", type=int, default=1, help="kdflow scaling.num_workers")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved (plain, kdflow) pairs per mode")
    ap.add_argument("--plain-in-ray", action="store_true", help="also the plain loop in a Ray task")
    ap.add_argument("--work", default=None)
    ap.add_argument("--modes", nargs="+", type=int, default=[0, 1, 2], help="which of the 3")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--render", metavar="JSON", help="only re-render RESULTS.md from a saved run")
    args = ap.parse_args()
    command = (f"python bench/overhead.py --rows {args.rows} --epochs {args.epochs} --workers "
               f"{args.workers} --repeats {args.repeats}{' --plain-in-ray' if args.plain_in_ray else ''}")
    if args.render:
        facts = json.loads(Path(args.render).read_text())
        write_outputs(facts, facts.get("command", command))
        return
    work = enter_work_dir(args.work, "overhead")
    from kd.data import load_splits

    teacher, tpath = random_teacher(work)
    splits = load_splits(experiment(work, str(tpath), args.rows, args.epochs, args.workers, []).data)
    train = splits.train.sample(len(splits.train))  # the same train rows kdflow trains on
    ctx = {"x": torch.as_tensor(train.x), "y": torch.as_tensor(train.y), "teacher": teacher,
           "work": work, "tpath": tpath}
    t_start = time.time()
    rows = [run_mode(k, mode, ctx, args) for k, mode in enumerate(MODES) if k in args.modes]
    print(table(rows))
    facts = {"command": command, "rows_train": len(ctx["x"]), "epochs": args.epochs,
             "batch": BATCH, "workers": args.workers, "repeats": args.repeats,
             "cpus": os.cpu_count(), "driver_torch_threads": torch.get_num_threads(),
             "load_avg_1_5_15_at_end": os.getloadavg(),
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t_start)),
             "wall_s": time.time() - t_start,
             "cache_vs_ce_step_cost": rows[0]["kdflow"] / rows[-1]["kdflow"], "modes": rows}
    print(json.dumps({k: v for k, v in facts.items() if k != "modes"}))
    if not args.no_write:
        write_outputs(facts, command)


if __name__ == "__main__":
    main()
