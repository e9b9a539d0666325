"""FSDP2 + bf16 on GPUs: samples/s and peak GPU memory, DDP vs FSDP, fp32 vs bf16.

Needs CUDA: without a GPU it prints one 'no GPU' line and exits 0. With N GPUs it
trains a wide ResNet student (``wrn``, depth 16, widen 4) on synthetic 3x32x32
data through THE loop (`kd.train.run.train_run`) on N workers, once per row:
FSDP bf16, FSDP fp32, DDP bf16, DDP fp32 (grad_accum 2, grad_clip 1.0; FSDP first: it
is the path a CPU cannot show), and records the loop's ``samples_per_s`` (epochs 2..E),
``gpu/max_mem_gb`` (peak ``torch.cuda.max_memory_allocated`` of rank 0) and where each
row's wall time went (the whole `train_run`, the loop's setup, its train and eval time
summed over epochs) into bench/RESULTS.md and bench/results/gpu_fsdp.json (after every
row, so a run cut short keeps what it measured).

    PYTHONPATH=$PWD python bench/gpu_fsdp.py --epochs 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def _write(rows: list[dict], args: argparse.Namespace, gpus: int) -> None:
    """The rows so far: a table on stdout, bench/results/gpu_fsdp.json, a RESULTS.md section."""
    from _results import write_section

    lines = ["| strategy | precision | samples/s | peak GPU memory GB (rank 0) | val/accuracy "
             "| row wall s | loop setup s | train s | eval s |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['strategy']} | {r['precision']} | {r['samples_per_s']:.0f} "
              f"| {r['peak_gpu_mem_gb']:.2f} | {r['val_accuracy']:.4f} | {r['wall_s']:.1f} "
              f"| {r['setup_s']:.1f} | {r['train_s']:.1f} | {r['eval_s']:.1f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    facts = {"device": torch.cuda.get_device_name(0), "gpus": gpus, "torch": torch.__version__,
             "epochs": args.epochs, "rows": args.rows, "batch_size": args.batch_size,
             "runs": rows}
    (REPO / "bench" / "results" / "gpu_fsdp.json").write_text(json.dumps(facts, indent=2) + "\n")
    write_section("FSDP + bf16 on GPU", f"`python bench/gpu_fsdp.py --epochs {args.epochs}` on "
                  f"{gpus} x {torch.cuda.get_device_name(0)}, wrn-16-4, synthetic 3x32x32, "
                  f"global batch {args.batch_size}, grad_accum 2, grad_clip 1.0.\n\n" + table)


def _row(strategy: str, precision: str, history: list[dict], metrics: dict,
         wall_s: float) -> dict:
    """One row: the mean samples/s of epochs 2..E, rank 0's peak GPU memory, and the
    row's wall time next to the loop's setup and its train / eval time over all epochs."""
    def values(key: str) -> list[float]:  # a key missing from a report is NaN in Ray's frame
        return [v for h in history if (v := h.get(key)) is not None and not math.isnan(v)]

    return {"strategy": strategy, "precision": precision,
            "samples_per_s": statistics.mean(h["samples_per_s"] for h in history
                                             if h["epoch"] >= 2),
            "peak_gpu_mem_gb": max(h.get("gpu/max_mem_gb", float("nan")) for h in history),
            "val_accuracy": metrics["val/accuracy"], "wall_s": wall_s,
            "setup_s": sum(values("time/setup_s")), "train_s": sum(values("time/train_s")),
            "eval_s": sum(values("time/eval_s"))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("[bench] no GPU: torch.cuda.is_available() is False; FSDP + bf16 bench skipped")
        return 0
    from _common import enter_work_dir

    from kd.config import experiment_from_dict, resolve_paths
    from kd.runtime import ensure_ray
    from kd.train.run import train_run

    gpus = torch.cuda.device_count()
    work = enter_work_dir(None, "fsdp")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    ensure_ray()
    rows = []
    for strategy in ("fsdp", "ddp"):
        for precision in ("bf16", "fp32"):
            doc = {
                "name": f"fsdp-{strategy}-{precision}",
                "data": {"source": "synthetic", "args": {"n": args.rows, "num_classes": 10,
                                                         "shape": [3, 32, 32]}},
                "teacher": {"model": "wrn", "args": {"depth": 16, "widen_factor": 4}},
                "trainer": {"epochs": args.epochs, "batch_size": args.batch_size,
                            "precision": precision, "grad_accum": 2, "grad_clip": 1.0},
                "checkpoint": {"every_epochs": 1, "keep": 1},
                "scaling": {"num_workers": gpus, "use_gpu": True, "strategy": strategy},
                "storage": {"path": str(work / "runs")},
            }
            t0 = time.perf_counter()
            out = train_run(resolve_paths(experiment_from_dict(doc)), "teacher")
            row = _row(strategy, precision, out.history, out.metrics, time.perf_counter() - t0)
            rows.append(row)
            print(f"[bench] {strategy} {precision}: {row['samples_per_s']:.0f} samples/s, "
                  f"{row['peak_gpu_mem_gb']:.2f} GB peak, {row['wall_s']:.0f} s", flush=True)
            _write(rows, args, gpus)  # after every row: a run cut short keeps its rows
    return 0


if __name__ == "__main__":
    sys.exit(main())
