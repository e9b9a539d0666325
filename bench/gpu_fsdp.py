"""FSDP2 + bf16 on GPUs: samples/s and peak GPU memory, DDP vs FSDP, fp32 vs bf16.

Needs CUDA: without a GPU it prints one 'no GPU' line and exits 0. With N GPUs it
trains a wide ResNet student (``wrn``, depth 16, widen 4) on synthetic 3x32x32
data through THE loop (`kd.train.run.train_run`) on N workers, once per row:
DDP fp32, DDP bf16, FSDP fp32, FSDP bf16 (grad_accum 2, grad_clip 1.0), and
records the loop's ``samples_per_s`` (epochs 2..E) and ``gpu/max_mem_gb`` (peak
``torch.cuda.max_memory_allocated`` of rank 0) into bench/RESULTS.md and
bench/results/gpu_fsdp.json (after every row, so a run cut short keeps what it measured).

    PYTHONPATH=$PWD python bench/gpu_fsdp.py --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def _write(rows: list[tuple[str, str, float, float, float]], args: argparse.Namespace,
           gpus: int) -> None:
    """The rows so far: a table on stdout, bench/results/gpu_fsdp.json, a RESULTS.md section."""
    from _results import write_section

    lines = ["| strategy | precision | samples/s | peak GPU memory GB (rank 0) | val/accuracy |",
             "|---|---|---|---|---|"]
    lines += [f"| {s} | {pr} | {r:.0f} | {m:.2f} | {a:.4f} |" for s, pr, r, m, a in rows]
    table = "\n".join(lines)
    print(table)
    facts = {"device": torch.cuda.get_device_name(0), "gpus": gpus, "torch": torch.__version__,
             "epochs": args.epochs, "rows": args.rows, "batch_size": args.batch_size,
             "runs": [{"strategy": s, "precision": pr, "samples_per_s": r, "peak_gpu_mem_gb": m,
                       "val_accuracy": a} for s, pr, r, m, a in rows]}
    (REPO / "bench" / "results" / "gpu_fsdp.json").write_text(json.dumps(facts, indent=2) + "\n")
    write_section("FSDP + bf16 on GPU", f"`python bench/gpu_fsdp.py --epochs {args.epochs}` on "
                  f"{gpus} x {torch.cuda.get_device_name(0)}, wrn-16-4, synthetic 3x32x32, "
                  f"global batch {args.batch_size}, grad_accum 2, grad_clip 1.0.\n\n" + table)


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
    for strategy in ("ddp", "fsdp"):
        for precision in ("fp32", "bf16"):
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
            out = train_run(resolve_paths(experiment_from_dict(doc)), "teacher")
            rate = statistics.mean(h["samples_per_s"] for h in out.history if h["epoch"] >= 2)
            mem = max(h.get("gpu/max_mem_gb", float("nan")) for h in out.history)
            rows.append((strategy, precision, rate, mem, out.metrics["val/accuracy"]))
            print(f"[bench] {strategy} {precision}: {rate:.0f} samples/s, "
                  f"{mem:.2f} GB peak", flush=True)
            _write(rows, args, gpus)  # after every row: a run cut short keeps its rows
    return 0


if __name__ == "__main__":
    sys.exit(main())
