"""Count the bad-input corpus: run tests/test_bad_input_corpus.py (hypothesis) and print
how many cases each property tried and how each ended, as a markdown table.

    python bench/bad_input_corpus.py                 # the CI size (300 examples a test)
    python bench/bad_input_corpus.py --examples 2000 --random   # a bigger, fresh sample

A case ends as a clean one-line InputError (exit 2 through the CLI) or a valid config;
anything else fails the run (pytest's exit code is this script's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=300, help="hypothesis examples per test")
    p.add_argument("--random", action="store_true", help="a fresh random sample (default: "
                   "derandomized, the same cases as CI)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        summary = Path(d) / "summary.json"
        env = {**os.environ, "KD_CORPUS_SUMMARY": str(summary),
               "KD_CORPUS_EXAMPLES": str(args.examples), "PYTHONPATH": str(REPO)}
        if args.random:
            env["KD_CORPUS_RANDOM"] = "1"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "tests/test_bad_input_corpus.py"], cwd=REPO, env=env)
        wall = time.perf_counter() - start
        rows = json.loads(summary.read_text()) if summary.exists() else []
    total = sum(r["cases"] for r in rows)
    print(f"\n{total} cases, {args.examples} examples a test, "
          f"{'random' if args.random else 'derandomized'}, {wall:.0f} s, pytest exit {proc.returncode}\n")
    print("| property | outcome | cases |\n|---|---|---:|")
    for r in rows:
        print(f"| {r['test']} | {r['outcome']} | {r['cases']} |")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
