"""Inference precision: fp32 against bf16 (``--precision bf16`` of `kd predict` / `kd serve`,
``model_config={"precision": "bf16"}`` of the pyfunc) on this CPU.

    PYTHONPATH=$PWD python bench/precision.py CORPUS [STUDENT.safetensors ...] [--n 2048]

Every model runs through `kd.registry.loader.StudentModel.predict`, the code behind the
pyfunc, `kd predict` and `kd serve`: texts in (tokenized, forwarded longest first, 256 per
call), float32 embeddings out; a classifier: rows in, probabilities out. Models: the
all-MiniLM-L6-v2 teacher, each distilled text student given (kdflow weights files, rebuilt
with `kd.train.run.model_from_weights`), and resnet20 (random weights, 32x32x3 rows) for a
CNN. Per model and precision, rows/s over ``--n`` held-out sentences (``CORPUS/holdout.jsonl``,
a seeded sample; resnet20: ``--n`` random rows), in ``--repeats`` interleaved rounds (every
model and precision once per round): the median, and per round the ratio bf16 / fp32 (its
median). What bf16 changes: for embeddings the cosine of each bf16 row to the same model's
fp32 row (mean and min) and the mean cosine to the fp32 teacher (the student's score) in
both precisions; for resnet20 the share of equal argmax and the largest probability change.
Prints a table, writes bench/results/precision.json and the RESULTS.md section.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _results import write_section  # noqa: E402
from text_students import TEACHER, read_jsonl, teacher_model  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def text_models(args: argparse.Namespace, tok: Any) -> dict[str, Callable[[], torch.nn.Module]]:
    """name -> a builder of a fresh module (bf16 converts its module in place)."""
    from kd.train.run import model_from_weights

    out: dict[str, Callable[[], torch.nn.Module]] = {
        f"teacher ({TEACHER})": lambda: teacher_model(args.max_length, tok.pad_id)[0]}
    for path in args.weights:
        _, meta = model_from_weights(path)
        name = f"{meta.get('kd.model', 'student')} {Path(path).parent.name}"
        out[name] = lambda p=path: model_from_weights(p)[0]
    return out


def wrap(module: torch.nn.Module, precision: str, tok: Any, max_length: int) -> Any:
    """A `StudentModel` of an embedding module (the registry's prediction path)."""
    from kd.registry.loader import StudentModel

    cfg = {"input_shape": [max_length], "task": "embed", "text": {"max_length": max_length},
           "input_dtype": "int64"}
    return StudentModel(module.eval(), cfg, tok, precision)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def rate(fn: Callable[[], Any], n: int) -> float:
    """Rows/s of one call of ``fn`` over ``n`` rows."""
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every model in both precisions; the results document."""
    from kd.models import build_model, count_params
    from kd.models.tokens import load_tokenizer, offline
    from kd.registry.loader import StudentModel, native_bf16

    offline()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    tok = load_tokenizer(TEACHER)
    hold = [r["text"] for r in read_jsonl(Path(args.corpus) / "holdout.jsonl")]
    texts = random.Random(args.seed).sample(hold, min(args.n, len(hold)))
    runners: dict[tuple[str, str], Callable[[], np.ndarray]] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name, build in text_models(args, tok).items():
        for p in PRECISIONS:
            m = wrap(build(), p, tok, args.max_length)
            runners[(name, p)] = lambda m=m: m.predict(texts)
        rows[name] = {"kind": "embed", "params": count_params(build())}
    x = np.random.default_rng(args.seed).random((args.n, 3, 32, 32), dtype=np.float32)
    for p in PRECISIONS:
        torch.manual_seed(0)
        m = StudentModel(build_model("resnet20", {}, (3, 32, 32), 10).eval(),
                         {"input_shape": [3, 32, 32]}, precision=p)
        runners[("resnet20 (random weights)", p)] = lambda m=m: np.concatenate(
            [m.predict(x[i:i + 256]) for i in range(0, len(x), 256)])
    rows["resnet20 (random weights)"] = {"kind": "classify",
                                         "params": count_params(build_model("resnet20", {}, (3, 32, 32), 10))}
    outs = {k: fn() for k, fn in runners.items()}  # warm-up pass, and the outputs compared
    teacher = next(iter(rows))
    for name, row in rows.items():
        a, b = outs[(name, "fp32")], outs[(name, "bf16")]
        if row["kind"] == "embed":
            c = cosine(b, a)
            row.update(cos_bf16_fp32_mean=float(c.mean()), cos_bf16_fp32_min=float(c.min()),
                       cos_teacher_fp32=float(cosine(a, outs[(teacher, "fp32")]).mean()),
                       cos_teacher_bf16=float(cosine(b, outs[(teacher, "fp32")]).mean()))
        else:
            row.update(argmax_equal=float((a.argmax(1) == b.argmax(1)).mean()),
                       max_prob_change=float(np.abs(a - b).max()))
    rates: dict[tuple[str, str], list[float]] = {k: [] for k in runners}
    for _ in range(args.repeats):
        for k, fn in runners.items():
            rates[k].append(rate(fn, args.n))
    med = statistics.median
    for name, row in rows.items():
        f, b = rates[(name, "fp32")], rates[(name, "bf16")]
        row.update(fp32_per_s=med(f), bf16_per_s=med(b), fp32_rates=f, bf16_rates=b,
                   bf16_speedup=med(y / z for y, z in zip(b, f, strict=True)))
        if row["kind"] == "embed":
            tf, tb = rates[(teacher, "fp32")], rates[(teacher, "bf16")]
            row.update(x_teacher_fp32=med(y / z for y, z in zip(f, tf, strict=True)),
                       x_teacher_bf16=med(y / z for y, z in zip(b, tb, strict=True)),
                       bf16_x_teacher_fp32=med(y / z for y, z in zip(b, tf, strict=True)))
    return {"args": vars(args), "rows": rows, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "machine": platform.machine(), "native_bf16": native_bf16(torch.device("cpu")),
            "load_avg_end": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def table(doc: dict[str, Any]) -> str:
    """The markdown table of the results document."""
    lines = ["| model | params | fp32 rows/s | bf16 rows/s | bf16 / fp32 | cosine bf16 vs fp32 "
             "(mean / min) | cosine to the teacher: fp32 / bf16 | x teacher, both fp32 | "
             "x teacher, both bf16 |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in doc["rows"].items():
        if r["kind"] == "embed":
            q = (f"{r['cos_bf16_fp32_mean']:.6f} / {r['cos_bf16_fp32_min']:.6f} | "
                 f"{r['cos_teacher_fp32']:.4f} / {r['cos_teacher_bf16']:.4f} | "
                 f"{r['x_teacher_fp32']:.2f} | {r['x_teacher_bf16']:.2f}")
        else:
            q = (f"argmax equal {r['argmax_equal']:.4f}, largest probability change "
                 f"{r['max_prob_change']:.4f} | - | - | -")
        lines.append(f"| {name} | {r['params'] / 1e6:.2f} M | {r['fp32_per_s']:.0f} | "
                     f"{r['bf16_per_s']:.0f} | {r['bf16_speedup']:.2f}x | {q} |")
    return "\n".join(lines)


def caption(doc: dict[str, Any]) -> str:
    a = doc["args"]
    return (f"`python bench/precision.py` on {doc['date']}: {a['n']} held-out sentences (seed "
            f"{a['seed']}, `max_length` {a['max_length']}) through `StudentModel.predict` (the "
            "pyfunc / `kd predict` / `kd serve` path: tokenizer, longest first, 256 per call); "
            f"resnet20: {a['n']} random 32x32x3 rows, 256 per call. Median of {a['repeats']} "
            "interleaved rounds; ratios are medians of per-round ratios. torch "
            f"{doc['torch']} with {doc['threads']} threads on {doc['cpus']} shared CPUs "
            f"({doc['machine']}, native bf16: {doc['native_bf16']}); load average "
            f"{doc['load_avg_end'][0]:.2f} at the end. Raw: `bench/results/precision.json`.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("corpus", help="folder of scripts/build_text_corpus.py (holdout.jsonl)")
    p.add_argument("weights", nargs="*", help="distilled text students' weights files")
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    doc = run(args)
    print(table(doc))
    if not args.no_write:
        out = REPO / "bench" / "results" / "precision.json"
        out.write_text(json.dumps(doc, indent=2) + "\n")
        write_section("inference precision: fp32 vs bf16", caption(doc) + "\n\n" + table(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
