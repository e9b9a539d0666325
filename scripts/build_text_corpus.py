"""Build a real English text corpus offline from the installed Python packages.

Sources, walked in sorted path order so the output is deterministic: every docstring
(module, class, function; read with ``ast``, nothing is imported) of the ``.py`` files in
site-packages, and every ``.rst`` / ``.md`` / ``.txt`` documentation file there. Each source
(one docstring, or one file) is cut into paragraphs with code dropped (doctest ``>>>``
blocks, reST literal blocks after ``::`` and code directives, markdown fences, tables,
section underlines, numpydoc ``name : type`` lines), its markup stripped (reST roles,
links, emphasis, literals; markdown links, images, headings, bullets; HTML tags; URLs), and
split into sentences. A sentence is kept when it starts with a capital letter, ends in
``.``, ``!`` or ``?``, has 5..60 words, at least 75 % of its words look like words (no
code-like tokens), and at most 5 % non-ASCII characters. Sentences are deduplicated
case-insensitively after normalisation (letters and digits only); the first source wins.

Split: a source goes to holdout when ``sha1(f"{seed}:{source}")`` falls below the holdout
fraction, so all sentences of one docstring or file land on one side.

Writes under OUT_DIR:
- ``train.jsonl``, ``holdout.jsonl``: ``{"text": sentence}`` per line;
- ``retrieval.jsonl``: ``{"query": first sentence, "doc": the following sentences (up to 8)}``
  for held-out docstrings with >= 3 kept sentences, none of them in train (at most
  ``--max-pairs``, picked in hash order so they spread over packages);
- ``corpus.json``: counts, arguments and the per-package sentence counts.

    python scripts/build_text_corpus.py /tmp/corpus --min-sentences 50000

Exits 2 with one line when fewer than ``--min-sentences`` sentences are found.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import site
import sys
import sysconfig
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

DOC_SUFFIXES = (".rst", ".md", ".txt")
MAX_FILE_BYTES = 2_000_000
MIN_WORDS, MAX_WORDS = 5, 60
MAX_DOC_SENTENCES = 8
# directives whose body is prose; any other directive's indented body is skipped
PROSE_DIRECTIVES = {"note", "warning", "seealso", "tip", "important", "hint", "attention", "caution",
                    "danger", "error", "admonition", "versionadded", "versionchanged", "deprecated",
                    "topic", "sidebar", "rubric"}
ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "fig.", "eq.", "no.", "approx.", "resp.", "mr.",
                 "dr.", "al.", "incl.", "ref.", "sec.", "vol.")

URL = re.compile(r"(?:https?|ftp)://\S+|www\.\S+")
UNDERLINE = re.compile(r"^\s*([=\-~^\"'`#*+_.:])\1{2,}\s*$")
DIRECTIVE = re.compile(r"^\s*\.\.\s+([\w:-]+)::(.*)$")
PARAM_LINE = re.compile(r"^\s*\**\w[\w, .*]*\s+:\s*\S*.*$")
GOOGLE_ARG = re.compile(r"^\s*\**\w+(?:\s*\([^)]*\))?:\s+")  # Google style "name (type): text"
SECTION = re.compile(r"^[A-Z][A-Za-z ]{0,30}:$")  # a Google style section line ("Args:")
FIELD = re.compile(r"^:[\w ,.*\\()\[\]|-]+:\s*")  # a reST field list item (:param x:)
BULLET = re.compile(r"^\s*(?:[-*+•]|\d+[.)]|#\.|\([a-z0-9]\))\s+")
WORD = re.compile(r"[(\"'\[]*[A-Za-z][A-Za-z'’-]*[)\"'\]]*[.,;:!?]*[)\"'\]]*")
SPLIT = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9])")
MARKUP = [  # (pattern, replacement), applied in order to one paragraph
    (re.compile(r"!\[[^\]]*\]\([^)]*\)"), ""),                      # markdown image
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),                  # markdown link
    (re.compile(r"\[([^\]]+)\]\[[^\]]*\]"), r"\1"),                 # markdown reference link
    (re.compile(r":[\w:+.-]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`"), r"\1"),  # reST role
    (re.compile(r"`([^`<]+?)\s*<[^>]*>`__?"), r"\1"),               # reST link with target
    (re.compile(r"`+([^`]+?)`+_{0,2}"), r"\1"),                     # literals, refs
    (re.compile(r"\*\*([^*]+)\*\*|__([^_]+)__"), r"\1\2"),          # strong
    (re.compile(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])"), r"\1"),  # emphasis
    (re.compile(r"\|([\w -]+)\|_?"), r"\1"),                        # substitutions
    (re.compile(r"</?[a-zA-Z][^>]*>"), " "),                        # HTML tags
    (re.compile(r"\[\d+\]_|\[#\w*\]_"), ""),                        # reST footnote refs
    (URL, " "),
    (re.compile(r"\s+"), " "),
]


def site_roots() -> list[Path]:
    """The site-packages folders of this interpreter (existing ones, deduplicated)."""
    roots = [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    seen: list[Path] = []
    for r in roots:
        p = Path(r).resolve()
        if p.is_dir() and p not in seen:
            seen.append(p)
    return seen


def walk_files(root: Path) -> Iterator[Path]:
    """Every file under ``root`` in sorted path order, skipping caches and hidden folders."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py") or name.lower().endswith(DOC_SUFFIXES):
                yield Path(folder) / name


def docstrings(path: Path) -> Iterator[tuple[str, str]]:
    """``(qualified name, docstring)`` of the module and of every class and function in
    ``path``; nothing for a file that does not parse."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return
    todo: list[tuple[str, ast.AST]] = [("<module>", tree)]
    while todo:
        name, node = todo.pop(0)
        doc = ast.get_docstring(node, clean=True) if isinstance(
            node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) else None
        if doc:
            yield name, doc
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                todo.append((child.name if name == "<module>" else f"{name}.{child.name}", child))


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def paragraphs(text: str) -> Iterator[str]:
    """The prose paragraphs of a docstring or documentation file, code and tables dropped."""
    para: list[str] = []
    skip_deeper: int | None = None  # skip lines indented deeper than this (a literal block)
    fence = doctest = False
    for raw in text.expandtabs(4).splitlines():
        line, stripped = raw.rstrip(), raw.strip()
        if stripped.startswith(("```", "~~~")):
            fence = not fence
            yield " ".join(para)
            para = []
            continue
        if fence:
            continue
        if skip_deeper is not None:
            if not stripped or _indent(line) > skip_deeper:
                continue
            skip_deeper = None
        if doctest and stripped:
            continue
        doctest = stripped.startswith((">>>", "..."))
        if doctest or not stripped or UNDERLINE.match(line) or stripped.startswith(("|", "+-", "+=")):
            yield " ".join(para)
            para = []
            continue
        directive = DIRECTIVE.match(line)
        if directive and directive.group(1).lower() not in PROSE_DIRECTIVES:
            yield " ".join(para)
            para, skip_deeper = [], _indent(line)
            continue
        if directive:
            stripped = directive.group(2).strip()
        elif stripped.startswith(".."):  # comment, target or footnote definition
            continue
        if stripped.startswith("#") or SECTION.match(stripped) or any(
                rx.match(stripped) for rx in (BULLET, PARAM_LINE, FIELD, GOOGLE_ARG)):
            yield " ".join(para)  # a heading, list item, field or parameter line starts a paragraph
            para = []
            if stripped.startswith("#") or SECTION.match(stripped) or PARAM_LINE.match(stripped):
                continue
            stripped = GOOGLE_ARG.sub("", FIELD.sub("", BULLET.sub("", stripped)))
        para.append(stripped)
        if stripped.endswith("::"):
            para[-1] = para[-1][:-1]
            yield " ".join(para)
            para, skip_deeper = [], _indent(line)
    yield " ".join(para)


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of one paragraph (markup stripped), not split after common abbreviations."""
    for pattern, repl in MARKUP:
        paragraph = pattern.sub(repl, paragraph)
    out: list[str] = []
    for piece in SPLIT.split(paragraph.strip()):
        if out and out[-1].lower().endswith(ABBREVIATIONS):
            out[-1] = f"{out[-1]} {piece}"
        elif piece:
            out.append(piece)
    return out


def keep(sentence: str) -> bool:
    """The sentence filter: capitalised, terminal punctuation, 5..60 words, word-like
    tokens >= 75 %, non-ASCII characters <= 5 %."""
    s = sentence.strip()
    if not s or not (s[0].isupper() or s[0] in "\"'(") or s[-1] not in ".!?\"')":
        return False
    if s[-1] in "\"')" and len(s) > 1 and s[-2] not in ".!?":
        return False
    words = s.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return False
    if sum(1 for w in words if WORD.fullmatch(w)) < 0.75 * len(words):
        return False
    return sum(1 for c in s if ord(c) > 127) <= 0.05 * len(s)


def norm_key(sentence: str) -> str:
    """The deduplication key: lower case, letters and digits only, single spaces."""
    return " ".join(re.findall(r"[a-z0-9]+", sentence.lower()))


def source_sentences(roots: list[Path], counts: Counter) -> Iterator[tuple[str, str, bool, list[str]]]:
    """``(source id, package, is_docstring, kept sentences)`` for every source, in order."""
    for root in roots:
        for path in walk_files(root):
            try:
                if path.stat().st_size > MAX_FILE_BYTES:
                    continue
            except OSError:
                continue
            rel = path.relative_to(root).as_posix()
            package = rel.split("/")[0].split("-")[0].removesuffix(".py")
            if path.suffix == ".py":
                counts["py_files"] += 1
                items = [(f"{rel}::{name}", doc, True) for name, doc in docstrings(path)]
                counts["docstrings"] += len(items)
            else:
                counts["doc_files"] += 1
                items = [(rel, path.read_text(errors="replace"), False)]
            for sid, text, is_doc in items:
                raw = [s.strip() for p in paragraphs(text) if p.strip() for s in split_sentences(p)]
                counts["sentences_raw"] += len(raw)
                yield sid, package, is_doc, [s for s in raw if keep(s)]


def in_holdout(source: str, seed: int, fraction: float) -> bool:
    """True when ``source`` hashes into the holdout share (sha1 of ``seed:source``)."""
    h = int.from_bytes(hashlib.sha1(f"{seed}:{source}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def collect(roots: list[Path], seed: int, fraction: float) -> dict:
    """Walk the sources; the deduplicated train and holdout sentences, the retrieval
    candidates (held-out docstrings with >= 3 kept sentences) and the counts."""
    counts: Counter = Counter()
    first: dict[str, bool] = {}  # sentence key -> landed in holdout
    train: list[str] = []
    hold: list[str] = []
    candidates: list[tuple[str, list[str]]] = []
    packages: Counter = Counter()
    for sid, package, is_doc, sents in source_sentences(roots, counts):
        counts["sentences_kept"] += len(sents)
        held = in_holdout(sid, seed, fraction)
        if held and is_doc and len(sents) >= 3:
            candidates.append((sid, sents))
        for s in sents:
            k = norm_key(s)
            if k in first:
                continue
            first[k] = held
            (hold if held else train).append(s)
            packages[package] += 1
    return {"train": train, "holdout": hold, "candidates": candidates, "first": first,
            "counts": counts, "packages": packages}


def retrieval_pairs(candidates: list[tuple[str, list[str]]], first: dict[str, bool], seed: int,
                    limit: int) -> list[dict[str, str]]:
    """Up to ``limit`` ``{"query", "doc"}`` pairs from held-out docstrings none of whose
    sentences is in train, one pair per distinct query and doc, in hash order."""
    order = sorted(candidates, key=lambda c: hashlib.sha1(f"{seed}:pair:{c[0]}".encode()).hexdigest())
    pairs: list[dict[str, str]] = []
    seen: set[str] = set()
    for _, sents in order:
        keys = [norm_key(s) for s in sents]
        if not all(first.get(k) for k in keys):  # a sentence of it is in train
            continue
        query, doc = sents[0], " ".join(sents[1:1 + MAX_DOC_SENTENCES])
        qk, dk = keys[0], norm_key(doc)
        if qk in seen or dk in seen:
            continue
        seen.update((qk, dk))
        pairs.append({"query": query, "doc": doc})
        if len(pairs) >= limit:
            break
    return pairs


def subsample(sentences: list[str], n: int, seed: int) -> list[str]:
    """``n`` of ``sentences`` chosen by a seeded hash (the same for the same input), in their
    original order."""
    rank = sorted(range(len(sentences)),
                  key=lambda i: hashlib.sha1(f"{seed}:keep:{sentences[i]}".encode()).hexdigest())
    keep = set(rank[:n])
    return [s for i, s in enumerate(sentences) if i in keep]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    """One JSON object per line, UTF-8."""
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--min-sentences", type=int, default=50_000)
    p.add_argument("--holdout", type=float, default=0.1, help="share of sources held out (0..1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-pairs", type=int, default=2000, help="retrieval pairs at most")
    p.add_argument("--max-train", type=int, default=None,
                   help="keep at most this many train sentences: a fixed hash sample, in order")
    p.add_argument("--root", action="append", default=None,
                   help="folder to read instead of site-packages (repeatable)")
    args = p.parse_args(argv)
    if not 0 < args.holdout < 1:
        p.error(f"--holdout must be in (0, 1), got {args.holdout}")
    t0 = time.perf_counter()
    roots = [Path(r).resolve() for r in args.root] if args.root else site_roots()
    got = collect(roots, args.seed, args.holdout)
    total = len(got["train"]) + len(got["holdout"])
    if total < args.min_sentences:
        print(f"build_text_corpus: only {total} deduplicated sentences in {', '.join(map(str, roots))}; "
              f"need --min-sentences {args.min_sentences}", file=sys.stderr)
        return 2
    pairs = retrieval_pairs(got["candidates"], got["first"], args.seed, args.max_pairs)
    if args.max_train is not None and len(got["train"]) > args.max_train:
        got["train"] = subsample(got["train"], args.max_train, args.seed)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", [{"text": s} for s in got["train"]])
    write_jsonl(out / "holdout.jsonl", [{"text": s} for s in got["holdout"]])
    write_jsonl(out / "retrieval.jsonl", pairs)
    counts = dict(sorted(got["counts"].items()))
    counts.update(sentences_dedup=total, train=len(got["train"]), holdout=len(got["holdout"]),
                  retrieval_pairs=len(pairs), retrieval_candidates=len(got["candidates"]))
    meta = {"counts": counts, "seed": args.seed, "holdout_fraction": args.holdout,
            "roots": [str(r) for r in roots], "python": sys.version.split()[0],
            "packages": dict(sorted(got["packages"].items()))}
    (out / "corpus.json").write_text(json.dumps(meta, indent=1) + "\n")
    for k, v in counts.items():
        print(f"{k:>22}: {v}")
    print(f"{'packages':>22}: {len(meta['packages'])}")
    print(f"{'seconds':>22}: {time.perf_counter() - t0:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
