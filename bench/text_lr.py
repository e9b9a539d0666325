"""The learning rate of a text student: held-out cosine to the teacher after the same
number of steps, for several AdamW learning rates.

kdflow's own pieces, as `bench/text_step.py` builds them (`assemble` on
``configs/minilm-embed.yaml``, the loop's `Step` and `Updater`), with the recipe
``dropout 0 + frozen word embeddings``. Every learning rate trains the same student
from the same teacher-layer copy on the same ``--steps`` batches of shuffled training
sentences (seed ``--seed``), at a constant rate, which is epoch 0 of a ``kd distill``
run (its cosine schedule is 1.0 there); every ``--every`` steps the student encodes
``--eval`` sentences of ``holdout.jsonl`` (sources no training sentence came from) and
the mean cosine to the teacher's embeddings is recorded.

    PYTHONPATH=$PWD python bench/text_lr.py /work/text-corpus --lrs 2e-4 5e-4 1e-3 2e-3

Prints a table, writes bench/results/text_lr.json and the RESULTS.md section. A short
horizon favours high rates; the whole-run answer is a ``kd distill`` (bench/RESULTS.md,
"text students").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _results import write_section  # noqa: E402
from text_step import SHAPES, batches, embedded, worker  # noqa: E402

RECIPE = "dropout 0 + frozen word embeddings"


def texts(path: Path, n: int, seed: int) -> list[str]:
    """``n`` sentences of a corpus jsonl file, shuffled by ``seed`` (the files are in
    source order)."""
    rows = [json.loads(r)["text"] for r in path.read_text().splitlines()]
    random.Random(seed).shuffle(rows)
    return rows[:n]


def curve(args: argparse.Namespace, lr: float, data: list[dict[str, Any]], sample: Any,
          pad_id: int, held: tuple[Any, Any]) -> dict[str, Any]:
    """Train one student at ``lr``; its held-out cosine every ``--every`` steps."""

    from kd.train.embed_metrics import cosine_rows, encode

    step, updater, _ = worker(Path(args.corpus), args.shape, RECIPE, sample, args.max_length,
                              pad_id, (f"optim.lr={lr}",))
    points, t0, losses = [], time.perf_counter(), []
    for i, b in enumerate(data, 1):
        loss, _, _ = step(b)
        updater.backward(loss)
        updater.step()
        losses.append(float(loss.detach()))
        if i % args.every == 0 or i == len(data):
            cos = float(cosine_rows(encode(step.trainee, held[0], 64, pad_id), held[1]).mean())
            points.append({"step": i, "samples": i * args.batch_size, "cosine": cos,
                           "train_loss": sum(losses[-args.every:]) / len(losses[-args.every:])})
            print(f"[bench] lr {lr:g}: step {i}: held-out cosine {cos:.4f}", flush=True)
    return {"lr": lr, "points": points, "seconds": time.perf_counter() - t0}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    corpus = Path(args.corpus)
    train = texts(corpus / "train.jsonl", args.steps * args.batch_size, args.seed)
    data, sample, pad_id = batches(corpus, args.steps, args.batch_size, args.max_length, train)
    ids, emb, _ = embedded(texts(corpus / "holdout.jsonl", args.eval, args.seed), args.max_length)
    curves = [curve(args, lr, data, sample, pad_id, (ids, emb)) for lr in args.lrs]
    return {"curves": curves, "recipe": RECIPE, "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "args": vars(args)}


def table(doc: dict[str, Any]) -> str:
    steps = [p["step"] for p in doc["curves"][0]["points"]]
    lines = ["| AdamW lr | " + " | ".join(f"cosine at {s} steps" for s in steps)
             + " | train loss, last steps | minutes |",
             "|---|" + "---|" * (len(steps) + 2)]
    for c in doc["curves"]:
        lines.append(f"| {c['lr']:g} | " + " | ".join(f"{p['cosine']:.4f}" for p in c["points"])
                     + f" | {c['points'][-1]['train_loss']:.4f} | {c['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def caption(doc: dict[str, Any]) -> str:
    a = doc["args"]
    return (f"`python bench/text_lr.py CORPUS --steps {a['steps']} --lrs "
            f"{' '.join(f'{v:g}' for v in a['lrs'])}`: student {a['shape']} "
            f"(`student.args={SHAPES[a['shape']]}`, `init: teacher_layers`), recipe "
            f"{doc['recipe']}, `embed_cosine + embed_relational`, batch {a['batch_size']}, "
            f"constant rate (epoch 0 of `kd distill`); held-out cosine to the teacher on "
            f"{a['eval']} `holdout.jsonl` sentences, one run per rate (seed {a['seed']}); torch "
            f"threads {doc['torch_threads']} on {doc['cpus']} CPUs. Raw: `bench/results/text_lr.json`.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("corpus", help="folder of scripts/build_text_corpus.py (train/holdout.jsonl)")
    p.add_argument("--lrs", nargs="+", type=float, default=[2e-4, 5e-4, 1e-3, 2e-3])
    p.add_argument("--shape", default="t2", choices=list(SHAPES))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=200)
    p.add_argument("--eval", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    doc = run(args)
    print(table(doc))
    if not args.no_write:
        (REPO / "bench" / "results" / "text_lr.json").write_text(json.dumps(doc, indent=2) + "\n")
        write_section("text student learning rate", caption(doc) + "\n\n" + table(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
