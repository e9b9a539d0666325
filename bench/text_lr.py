"""Short training probes of a text student's recipe: held-out cosine to the teacher after
the same number of steps, for several learning rates or other config overrides.

kdflow's own pieces, as `bench/text_step.py` builds them (`assemble` on
``configs/minilm-embed.yaml``, the loop's `Step` and `Updater`), with the recipe
``dropout 0 + frozen word embeddings``. Every run trains the same student
from the same teacher-layer copy on the same ``--steps`` batches of shuffled training
sentences (seed ``--seed``), at a constant learning rate, which is epoch 0 of a ``kd distill``
run (its cosine schedule is 1.0 there); every ``--every`` steps the student encodes
``--eval`` sentences of ``holdout.jsonl`` (sources no training sentence came from) and
the mean cosine to the teacher's embeddings is recorded.

    PYTHONPATH=$PWD python bench/text_lr.py /work/text-corpus --lrs 2e-4 5e-4 1e-3 2e-3
    PYTHONPATH=$PWD python bench/text_lr.py /work/text-corpus --section "text student losses" \
        --run optim.lr=5e-4 --run optim.lr=5e-4 "distill.losses=[{name: embed_cosine}]"

Each ``--run`` is one run: its ``key=value`` overrides of ``configs/minilm-embed.yaml``,
one argument each (a value may hold any character); ``--lrs X`` is short for
``--run optim.lr=X``.

Prints a table, writes bench/results/text_lr.json (``text_lr-SECTION.json`` for another
``--section``) and the RESULTS.md section. A short
horizon favours high rates; the whole-run answer is a ``kd distill`` (bench/RESULTS.md,
"text students").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _results import write_section  # noqa: E402
from text_step import SHAPES, batches, embedded, student_args, text_parser, worker  # noqa: E402

RECIPE = "dropout 0 + frozen word embeddings"
SECTION = "text student learning rate"


def raw_name(section: str) -> str:
    """The file under bench/results/ that keeps a section's raw numbers."""
    return "text_lr" + ("" if section == SECTION else "-" + section.replace(" ", "_")) + ".json"


def texts(path: Path, n: int, seed: int) -> list[str]:
    """``n`` sentences of a corpus jsonl file, shuffled by ``seed`` (the files are in
    source order)."""
    rows = [json.loads(r)["text"] for r in path.read_text().splitlines()]
    random.Random(seed).shuffle(rows)
    return rows[:n]


def base_recipe(corpus: Path) -> dict[str, Any]:
    """The optimizer and losses of ``configs/minilm-embed.yaml`` as it stands: what a run's
    overrides change."""
    from kd.config import load_experiment

    exp = load_experiment(REPO / "configs" / "minilm-embed.yaml",
                          [f"data.source={corpus / 'train.jsonl'}"])
    return {"optim": exp.optim.name, "lr": exp.optim.lr,
            "losses": " + ".join(t.name for t in exp.distill.losses)}


def curve(args: argparse.Namespace, run: list[str], data: list[dict[str, Any]], sample: Any,
          pad_id: int, held: tuple[Any, Any]) -> dict[str, Any]:
    """Train one student with the overrides ``run``; its held-out cosine every ``--every``
    steps."""

    from kd.train.embed_metrics import cosine_rows, encode

    step, updater, _ = worker(Path(args.corpus), args.shape, RECIPE, sample, args.max_length,
                              pad_id, tuple(run))
    label = " ".join(run)
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
            print(f"[bench] {label}: step {i}: held-out cosine {cos:.4f}", flush=True)
    return {"run": label, "overrides": run, "points": points, "seconds": time.perf_counter() - t0}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    corpus = Path(args.corpus)
    train = texts(corpus / "train.jsonl", args.steps * args.batch_size, args.seed)
    data, sample, pad_id = batches(corpus, args.steps, args.batch_size, args.max_length, train)
    ids, emb, _ = embedded(texts(corpus / "holdout.jsonl", args.eval, args.seed), args.max_length)
    runs = args.runs or [[f"optim.lr={lr:g}"] for lr in args.lrs]
    curves = [curve(args, run, data, sample, pad_id, (ids, emb)) for run in runs]
    return {"curves": curves, "recipe": RECIPE, "base": base_recipe(corpus), "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "args": vars(args)}


def table(doc: dict[str, Any]) -> str:
    steps = [p["step"] for p in doc["curves"][0]["points"]]
    lines = ["| overrides | " + " | ".join(f"cosine at {s} steps" for s in steps)
             + " | train loss, last steps | minutes |",
             "|---|" + "---|" * (len(steps) + 2)]
    for c in doc["curves"]:
        lines.append(f"| `{c['run']}` | " + " | ".join(f"{p['cosine']:.4f}" for p in c["points"])
                     + f" | {c['points'][-1]['train_loss']:.4f} | {c['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def caption(doc: dict[str, Any]) -> str:
    a = doc["args"]
    runs = " ".join("--run " + shlex.join(r) for r in a["runs"])
    b = doc["base"]
    what = runs if runs else "--lrs " + " ".join(f"{v:g}" for v in a["lrs"])
    return (f"`python bench/text_lr.py CORPUS --steps {a['steps']} {what}`: student {a['shape']} "
            f"(`student.args={student_args(a['shape'])}`, `init: teacher_layers`), recipe "
            f"{doc['recipe']}, otherwise `configs/minilm-embed.yaml` ({b['optim']} lr {b['lr']:g}, "
            f"`{b['losses']}`), batch {a['batch_size']}, constant learning rate "
            f"(epoch 0 of `kd distill`); held-out cosine to the teacher on {a['eval']} "
            f"`holdout.jsonl` sentences, one run each (seed {a['seed']}); torch "
            f"threads {doc['torch_threads']} on {doc['cpus']} CPUs. Raw: "
            f"`bench/results/{raw_name(a['section'])}`.")


def main(argv: list[str] | None = None) -> int:
    p = text_parser(__doc__, steps=600)
    p.add_argument("--lrs", nargs="+", type=float, default=[2e-4, 5e-4, 1e-3, 2e-3])
    p.add_argument("--run", dest="runs", action="append", nargs="+", default=[],
                   metavar="KEY=VALUE", help="one run's overrides; repeat for more runs")
    p.add_argument("--section", default=SECTION, help="RESULTS.md section")
    p.add_argument("--shape", default="t2", choices=list(SHAPES))
    p.add_argument("--every", type=int, default=200)
    p.add_argument("--eval", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.no_write and args.runs and args.section == SECTION:
        p.error("--run: name the RESULTS.md section with --section")
    doc = run(args)
    print(table(doc))
    if not args.no_write:
        (REPO / "bench" / "results" / raw_name(args.section)).write_text(json.dumps(doc, indent=2) + "\n")
        write_section(args.section, caption(doc) + "\n\n" + table(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
