"""Batch `kd predict` rows/s: local parquet and the S3 API test server, a few sizes.

Trains a tiny MLP pair on digits (1 epoch), registers the student and aliases it
``champion`` in a SQLite MLflow store, writes N random rows of 64 features as parquet
files (4,096 rows per file) to a local folder and to a moto_server bucket, then runs
`kd.registry.batch.predict_batch` (the code behind `kd predict ... --output DIR`) on each
and times it end to end: alias pinned + verified download, listing, the Ray Data job
(read -> Predictor actors -> parquet write) and the footer count. A first small run warms
Ray up and is not reported.

    PYTHONPATH=$PWD python bench/batch_predict.py [--sizes 20000 100000 400000]
        [--concurrency 1] [--batch-size 4096] [--work DIR]

Prints a table and writes bench/results/batch_predict.json and a section of
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))
ROWS_PER_FILE = 4096
SECTION = "batch predict: kd predict as a Ray Data job"


def start_s3(work: Path) -> subprocess.Popen:
    """moto_server on a free loopback port; sets the AWS environment for boto3/pyarrow."""
    from tests.conftest import free_port, wait_for_port

    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    log = open(work / "moto.log", "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT)
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"})
    wait_for_port(port)
    return proc


def register_champion(work: Path) -> str:
    """A 1-epoch MLP teacher + student, registered and aliased champion; its URI."""
    from _common import mlp_student_run

    from kd.registry.register import register_run
    from kd.registry.store import registry_client

    run_id = mlp_student_run(work / "runs", epochs=1)
    name, version = register_run(run_id, "bench-batch")
    registry_client().set_registered_model_alias(name, "champion", version)
    return f"models:/{name}@champion"


def write_inputs(base: str, rows: int) -> int:
    """``rows`` rows as parquet files of ROWS_PER_FILE rows under ``base``; file count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kd import storage

    fs, path = storage.arrow_fs(base)
    if not storage.is_s3(base):
        Path(path).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    n_files = 0
    for start in range(0, rows, ROWS_PER_FILE):
        n = min(ROWS_PER_FILE, rows - start)
        x = (rng.random((n, 64), dtype=np.float32) * 16).reshape(-1)
        table = pa.table({"id": pa.array(np.arange(start, start + n, dtype=np.int64)),
                          "x": pa.FixedSizeListArray.from_arrays(pa.array(x), 64)})
        with fs.open_output_stream(f"{path}/part-{n_files:05d}.parquet") as f:
            pq.write_table(table, f)
        n_files += 1
    return n_files


def one(model: str, src: str, out: str, args: argparse.Namespace) -> tuple[float, int]:
    """(seconds, rows) of one predict_batch run."""
    from kd.registry.batch import predict_batch

    t0 = time.perf_counter()
    report = predict_batch(model, [src], out, args.batch_size, args.concurrency)
    return time.perf_counter() - t0, report.rows


def run(args: argparse.Namespace, work: Path) -> list[dict]:
    import boto3

    from kd.runtime import ensure_ray

    model = register_champion(work)
    ensure_ray(num_cpus=os.cpu_count())
    boto3.client("s3").create_bucket(Bucket="bench")
    write_inputs(str(work / "warm"), 2000)
    one(model, str(work / "warm"), str(work / "warm-out"), args)  # warm-up, not reported
    rows = []
    for size in args.sizes:
        for where, base in (("local", str(work / f"in-{size}")), ("s3", f"s3://bench/in-{size}")):
            files = write_inputs(base, size)
            out = str(work / f"out-{size}") if where == "local" else f"s3://bench/out-{size}/"
            secs, got = one(model, base, out, args)
            assert got == size, (got, size)
            rows.append({"where": where, "rows": size, "files": files, "seconds": round(secs, 2),
                         "rows_per_s": round(size / secs)})
            print(f"{where:5s} {size:>8d} rows {files:>4d} files {secs:7.2f} s "
                  f"{size / secs:>9.0f} rows/s", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| input | rows | files | seconds (end to end) | rows/s |", "|---|---|---|---|---|"]
    lines += [f"| {r['where']} parquet | {r['rows']:,} | {r['files']} | {r['seconds']} | "
              f"{r['rows_per_s']:,} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000, 400_000])
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--work")
    args = ap.parse_args()
    from _common import enter_work_dir

    work = enter_work_dir(args.work, "batch-predict")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    s3 = start_s3(work)
    t0 = time.time()
    try:
        rows = run(args, work)
    finally:
        s3.terminate()
    import ray
    import torch

    meta = {"cpus": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
            "python": platform.python_version(), "concurrency": args.concurrency,
            "batch_size": args.batch_size, "rows_per_file": ROWS_PER_FILE,
            "model": "mlp {hidden: [32]} on 64 features (digits student)",
            "total_s": round(time.time() - t0, 1)}
    out = REPO / "bench" / "results" / "batch_predict.json"
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    text = table(rows)
    print(text)
    from _results import write_section

    write_section(SECTION, f"""`PYTHONPATH=$PWD python bench/batch_predict.py` ({meta['cpus']} shared CPUs,
torch {meta['torch']}, Ray {meta['ray']}; {args.concurrency} Predictor actor, batch
{args.batch_size}, {ROWS_PER_FILE} rows per input file; moto_server as the S3 endpoint on
loopback; the whole bench took {meta['total_s']} s). Seconds are end to end: alias pinned
and the verified model downloaded in the driver, the inputs listed, the first rows
checked, then the Ray Data job (one read task per file -> Predictor actor ->
parquet write) and the written files' footers counted. Raw: bench/results/batch_predict.json.

{text}
""")


if __name__ == "__main__":
    main()
