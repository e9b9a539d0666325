"""Scoring two embedding students on one holdout: apart (two `evaluate_embed` calls, as the
gate and `kd retrain`'s evaluate stage did) against together (`evaluate_embed_many`: the
teacher encodes the holdout and the retrieval pairs once).

    PYTHONPATH=$PWD python bench/embed_scoring.py CORPUS A.safetensors B.safetensors [--rows 20000]

``CORPUS`` is the folder of scripts/build_text_corpus.py: the first ``--rows`` lines of
``holdout.jsonl`` become the data of `configs/minilm-embed.yaml` (its split keeps 5% as the
holdout scored here) with its ``retrieval.jsonl``; the teacher is the config's
all-MiniLM-L6-v2. Both ways run ``--repeats`` times, interleaved; the table gives the
median seconds, how many rows the teacher encoded, and that the metrics agree. Prints the
table, writes bench/results/embed_scoring.json and the RESULTS.md section.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
from _results import write_section  # noqa: E402


class Counting(torch.nn.Module):
    """The teacher, counting the rows it encodes."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.rows = net, 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.rows += len(ids)
        return self.net(ids)


def setup(args: argparse.Namespace, work: Path) -> tuple[Any, Any, Counting, dict[str, Any]]:
    """(experiment, holdout split, counting teacher, the two students)."""
    from kd.config import load_experiment
    from kd.models.tokens import offline
    from kd.train.assemble import primary_teacher
    from kd.train.run import model_from_weights
    from kd.train.text import run_splits

    offline()
    corpus = Path(args.corpus)
    lines = (corpus / "holdout.jsonl").read_text().splitlines()[:args.rows]
    (work / "data.jsonl").write_text("\n".join(lines) + "\n")
    exp = load_experiment(REPO / "configs" / "minilm-embed.yaml", [
        f"data.source={work / 'data.jsonl'}", f"data.text.retrieval={corpus / 'retrieval.jsonl'}",
        f"storage.path={work / 'runs'}"])
    splits = run_splits(exp)
    teacher = Counting(primary_teacher(exp, splits))
    students = {Path(w).parent.name: model_from_weights(w)[0].eval() for w in args.weights}
    return exp, splits.holdout, teacher, students


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both ways, ``--repeats`` interleaved rounds; the results document."""
    from kd.train.embed_eval import evaluate_embed, evaluate_embed_many

    work = Path(tempfile.mkdtemp(prefix="kd-bench-embed-scoring-"))
    os.chdir(work)
    exp, holdout, teacher, students = setup(args, work)
    apart_s, together_s, metrics = [], [], {}
    for _ in range(args.repeats):
        teacher.rows, t0 = 0, time.perf_counter()
        metrics["apart"] = {k: evaluate_embed(exp, m, holdout, teacher) for k, m in students.items()}
        apart_s.append(time.perf_counter() - t0)
        apart_rows, teacher.rows, t0 = teacher.rows, 0, time.perf_counter()
        metrics["together"] = evaluate_embed_many(exp, students, holdout, teacher)
        together_s.append(time.perf_counter() - t0)
        together_rows = teacher.rows
    timed = {"latency_ms", "sentences_per_s"}
    agree = max(abs(metrics["apart"][k][key] - metrics["together"][k][key])
                for k in students for key in set(metrics["apart"][k]) - timed)
    med = statistics.median
    return {"args": vars(args), "holdout_rows": len(holdout), "students": list(students),
            "apart_s": apart_s, "together_s": together_s, "apart_median_s": med(apart_s),
            "together_median_s": med(together_s), "teacher_rows_apart": apart_rows,
            "teacher_rows_together": together_rows, "max_metric_difference": agree,
            "cosines": {k: v["cosine"] for k, v in metrics["together"].items()},
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load_avg_end": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def table(doc: dict[str, Any]) -> str:
    a, t = doc["apart_median_s"], doc["together_median_s"]
    return "\n".join([
        "| way | seconds (median) | every round | rows the teacher encoded |",
        "|---|---|---|---|",
        f"| apart: `evaluate_embed` per student | {a:.1f} | "
        f"{', '.join(f'{s:.1f}' for s in doc['apart_s'])} | {doc['teacher_rows_apart']} |",
        f"| together: `evaluate_embed_many` | {t:.1f} ({a / t:.2f}x faster) | "
        f"{', '.join(f'{s:.1f}' for s in doc['together_s'])} | {doc['teacher_rows_together']} |"])


def caption(doc: dict[str, Any]) -> str:
    a = doc["args"]
    return (f"`python bench/embed_scoring.py CORPUS A B --rows {a['rows']} --repeats "
            f"{a['repeats']}` on {doc['date']}: students {', '.join(doc['students'])} (cosine "
            + ", ".join(f"{v:.4f}" for v in doc["cosines"].values())
            + f") scored on {doc['holdout_rows']} holdout rows plus the corpus's retrieval pairs "
            "against all-MiniLM-L6-v2 (fp32), as the gate and `kd retrain`'s evaluate stage "
            f"score a challenger and a champion; torch with {doc['threads']} threads on "
            f"{doc['cpus']} shared CPUs, load average {doc['load_avg_end'][0]:.2f} at the end. "
            f"The metrics of the two ways differ by at most {doc['max_metric_difference']:.1e} "
            "(timings aside). Raw: `bench/results/embed_scoring.json`.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("corpus")
    p.add_argument("weights", nargs=2, help="two text students' weights files")
    p.add_argument("--rows", type=int, default=20000, help="corpus lines (5%% become the holdout)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    doc = run(args)
    print(table(doc))
    if not args.no_write:
        (REPO / "bench" / "results" / "embed_scoring.json").write_text(json.dumps(doc, indent=2) + "\n")
        write_section("scoring two embedding versions: apart vs together",
                      caption(doc) + "\n\n" + table(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
