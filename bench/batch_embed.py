"""Batch `kd predict` of text embedding students: sentences/s end to end.

Registers trained embed students from their MLflow runs (a copy of the store that
``--tracking`` names, so the original is not changed), aliases each ``champion``, splits
the first ``--rows`` sentences of a held-out jsonl corpus into ``--files`` files and runs
`kd.registry.batch.predict_batch` (what ``kd predict URI --input DIR --output DIR`` runs)
on them: alias pinned + verified download, listing, the Ray Data job (read tasks check the
texts -> `Embedder` actors tokenize and encode -> parquet write) and the footer count.
A first small job per student warms Ray and the model download up and is not reported.
Each `Embedder` actor reserves 1 CPU, so Ray gives it one torch thread: ``--concurrency``
is how many cores encode.

    PYTHONPATH=$PWD python bench/batch_embed.py --tracking sqlite:////work/bench-text/mlflow.db \\
        --runs t3i512=RUN_ID static=RUN_ID --input /work/text-corpus/holdout.jsonl \\
        [--rows 8000] [--files 8] [--concurrency 1 2]

Prints a table and writes bench/results/batch_embed.json and a section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))
SECTION = "batch embed: kd predict with a text student"


def copy_store(uri: str, work: Path) -> str:
    """A copy of the SQLite store ``uri`` in ``work`` (artifacts stay where they are)."""
    src = Path(uri.removeprefix("sqlite:///"))
    shutil.copy(src, work / "mlflow.db")
    return f"sqlite:///{work / 'mlflow.db'}"


def write_inputs(corpus: Path, rows: int, files: int, folder: Path) -> int:
    """The first ``rows`` lines of ``corpus`` as ``files`` jsonl files; the rows written."""
    lines = corpus.read_text(encoding="utf-8").splitlines()[:rows]
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(lines) // files)
    for i in range(files):
        (folder / f"part-{i:03d}.jsonl").write_text("\n".join(lines[i * per:(i + 1) * per]) + "\n")
    return len(lines)


def one(model: str, src: Path, out: Path, concurrency: int, batch: int) -> tuple[float, int]:
    """(seconds, rows) of one predict_batch job."""
    from kd.registry.batch import predict_batch

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    report = predict_batch(model, [str(src / "*.jsonl")], str(out), batch, concurrency)
    return time.perf_counter() - t0, report.rows


def run(args: argparse.Namespace, work: Path) -> list[dict]:
    from kd.registry.register import register_run
    from kd.registry.store import registry_client
    from kd.runtime import ensure_ray

    ensure_ray(num_cpus=os.cpu_count())
    n = write_inputs(Path(args.input), args.rows, args.files, work / "in")
    write_inputs(Path(args.input), 64, 2, work / "warm")
    rows = []
    for spec in args.runs:
        label, run_id = spec.split("=", 1)
        name, version = register_run(run_id, f"bench-embed-{label}")
        registry_client().set_registered_model_alias(name, "champion", version)
        model = f"models:/{name}@champion"
        one(model, work / "warm", work / "warm-out", 1, args.batch_size)  # not reported
        for conc in args.concurrency:
            secs, got = one(model, work / "in", work / f"out-{label}", conc, args.batch_size)
            assert got == n, (got, n)
            rows.append({"student": label, "run_id": run_id, "concurrency": conc, "rows": n,
                         "files": args.files, "seconds": round(secs, 2),
                         "sentences_per_s": round(n / secs, 1)})
            print(f"{label:10s} x{conc} {n} sentences {secs:7.2f} s {n / secs:8.1f}/s", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| student | Embedder actors | sentences | files | seconds (end to end) | "
             "sentences/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['student']} | {r['concurrency']} | {r['rows']:,} | {r['files']} | "
              f"{r['seconds']} | {r['sentences_per_s']:,} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracking", required=True, help="sqlite:///... store of the runs")
    ap.add_argument("--runs", nargs="+", required=True, help="LABEL=RUN_ID of embed students")
    ap.add_argument("--input", required=True, help="a jsonl corpus with a text key")
    ap.add_argument("--rows", type=int, default=8000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--work")
    args = ap.parse_args()
    from _common import enter_work_dir

    work = enter_work_dir(args.work, "batch-embed")
    os.environ["MLFLOW_TRACKING_URI"] = copy_store(args.tracking, work)
    t0 = time.time()
    rows = run(args, work)
    meta = {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)),
            "batch_size": args.batch_size, "total_s": round(time.time() - t0, 1),
            "load_avg_1_5_15_at_end": os.getloadavg(), "input": args.input}
    (REPO / "bench" / "results" / "batch_embed.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    text = table(rows)
    print(text)
    from _results import write_section

    write_section(SECTION, f"""`PYTHONPATH=$PWD python bench/batch_embed.py --rows {args.rows}
--files {args.files} --concurrency {' '.join(map(str, args.concurrency))}` on {meta['date']}
({meta['cpus']} CPUs, load average {meta['load_avg_1_5_15_at_end'][0]:.2f} at the end;
the whole bench took {meta['total_s']} s): the students of "text students" above,
registered from their runs, over held-out sentences of the MiniLM corpus as jsonl files.
Seconds are end to end (alias pinned, verified download, listing, the Ray Data job with
`Embedder` actors, batch {args.batch_size}, footers counted). An actor reserves 1 CPU (less
when the actors would leave no room for a read task) and encodes with one torch thread.
Raw: bench/results/batch_embed.json.

{text}
""")


if __name__ == "__main__":
    main()
