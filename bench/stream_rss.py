"""The driver's peak RSS while `kd teacher` streams parquet of growing size.

For each size, parquet shards of flat float32 features (class means + noise, 256
features, ~1 KiB a row) are written to local disk (and uploaded to a moto_server, the
in-memory S3 test server, for the S3 curve); then one fresh driver process runs a
1-epoch `train_run` of a small MLP on them (``scaling.num_workers: 1``) against one
already-running local Ray head (held by the bench's parent process), while a thread samples the driver's VmRSS; its
VmHWM (peak RSS) at the end is the number. The data never passes through the driver,
so the peak should stay flat (within ~150 MB) from 100 MB to 4 GB.

    python bench/stream_rss.py                          # 100 MB, 1 GB, 4 GB local; 100 MB, 1 GB S3
    python bench/stream_rss.py --local-mb 100 --s3-mb   # a quick check

Writes bench/results/stream_rss.json and the "streaming data: driver peak RSS"
section of bench/RESULTS.md. Checks free disk space first; deletes the data after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FEATURES, CLASSES, SHARD_ROWS = 256, 10, 100_000


def write_shards(root: Path, mb: int) -> int:
    """``mb`` MB of parquet shards under ``root``; returns the row count."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = mb * 1_000_000 // (FEATURES * 4)
    root.mkdir(parents=True, exist_ok=True)
    means = np.random.default_rng(0).normal(0, 1, (CLASSES, FEATURES)).astype(np.float32)
    for i, start in enumerate(range(0, rows, SHARD_ROWS)):
        n = min(SHARD_ROWS, rows - start)
        rng = np.random.default_rng(i + 1)
        y = rng.integers(0, CLASSES, n)
        x = means[y] + 2.0 * rng.standard_normal((n, FEATURES), dtype=np.float32)
        col = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), FEATURES)
        pq.write_table(pa.table({"x": col, "y": pa.array(y)}), root / f"part-{i:05d}.parquet",
                       row_group_size=16_384)
    return rows


def run_once(source: str, work: Path) -> dict[str, float]:
    """In a fresh driver: one 1-epoch teacher run on ``source``; peak RSS and speed."""
    fields = {"VmRSS:": "rss", "RssAnon:": "anon", "RssShmem:": "shmem"}
    peak = dict.fromkeys(fields.values(), 0)
    stop = threading.Event()

    def sample() -> None:  # RssAnon: the driver's own memory; RssShmem: object-store pages it mapped
        while not stop.is_set():
            for words in map(str.split, Path("/proc/self/status").read_text().splitlines()):
                key = fields.get(words[0]) if words else None
                if key:
                    peak[key] = max(peak[key], int(words[1]) * 1024)
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    from kd.config import experiment_from_dict
    from kd.train.run import train_run

    os.chdir(work)
    doc = {"name": "stream-rss", "data": {"source": source, "args": {"num_classes": CLASSES}},
           "teacher": {"model": "mlp", "args": {"hidden": [64]}},
           "optim": {"name": "adam", "lr": 0.003, "weight_decay": 0.0},
           "trainer": {"epochs": 1, "batch_size": 1024}, "scaling": {"num_workers": 1},
           "checkpoint": {"every_epochs": 1, "keep": 1},
           "storage": {"path": str(work / "runs")},
           "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}"}}
    t0 = time.perf_counter()
    out = train_run(experiment_from_dict(doc), "teacher")
    wall = time.perf_counter() - t0
    stop.set()
    hwm = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    return {"peak_rss_mb": hwm / 1e6, "sampled_rss_mb": peak["rss"] / 1e6,
            "sampled_anon_mb": peak["anon"] / 1e6, "sampled_shmem_mb": peak["shmem"] / 1e6,
            "wall_s": wall,
            "samples_per_s": float(out.metrics.get("samples_per_s", float("nan"))),
            "train_rows_seen": float(out.metrics.get("train/labeled_samples", 0.0))
            + float(out.metrics.get("train/unlabeled_samples", 0.0)),
            "val_rows": float(out.metrics.get("val/samples", float("nan"))),
            "holdout_accuracy": out.holdout["accuracy"]}


def measure(source: str, env: dict[str, str]) -> dict[str, float]:
    """`run_once` in a child process (a fresh driver: its VmHWM is this run's alone)."""
    work = Path(tempfile.mkdtemp(prefix="kd-rss-"))
    cmd = [sys.executable, __file__, "--child", source, "--work", str(work)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    shutil.rmtree(work, ignore_errors=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"child failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def start_moto(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """moto_server on a free port; returns it and its endpoint."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("moto_server")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except Exception:
            time.sleep(0.2)
    return proc, url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--local-mb", type=int, nargs="*", default=[100, 1000, 4000])
    ap.add_argument("--s3-mb", type=int, nargs="*", default=[100, 1000])
    ap.add_argument("--data-dir", default=None, help="where to write the parquet (default /tmp)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the RESULTS.md section from bench/results/stream_rss.json")
    a = ap.parse_args()
    if a.report_only:
        report(json.loads((REPO / "bench" / "results" / "stream_rss.json").read_text())["rows"])
        return
    if a.child:
        print("RESULT " + json.dumps(run_once(a.child, Path(a.work))), flush=True)
        return
    need = max([0, *a.local_mb]) * 1.2e6
    data = Path(a.data_dir or tempfile.mkdtemp(prefix="kd-rss-data-"))
    free = shutil.disk_usage(data).free
    if free < need + 2e9:
        sys.exit(f"stream_rss: {data} has {free / 1e9:.1f} GB free; need {need / 1e9:.1f} GB + 2 GB")
    env = {**os.environ, "PYTHONPATH": str(REPO), "KD_DATA_CACHE": str(data / "builtin"),
           "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})  # boto3 here too
    import ray  # this process holds the bench's own local Ray head; ray.shutdown() ends it

    # The bench's own loopback head; its child drivers join it without a token.
    os.environ["RAY_AUTH_MODE"] = env["RAY_AUTH_MODE"] = "disabled"
    ctx = ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    env["RAY_ADDRESS"] = ctx.address_info["gcs_address"]
    rows: list[dict[str, object]] = []
    moto = None
    try:
        for kind, sizes in (("local", a.local_mb), ("s3", a.s3_mb)):
            for mb in sizes:
                root = data / f"{kind}-{mb}"
                n = write_shards(root, mb)
                on_disk = sum(p.stat().st_size for p in root.iterdir())
                source = str(root)
                if kind == "s3":
                    import boto3

                    if moto is None:
                        moto, url = start_moto(env)
                        env["AWS_ENDPOINT_URL_S3"] = url
                        boto3.client("s3", endpoint_url=url).create_bucket(Bucket="bench")
                    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"])
                    for p in sorted(root.iterdir()):
                        s3.upload_file(str(p), "bench", f"{mb}/{p.name}")
                    source = f"s3://bench/{mb}/"
                r = measure(source, env)
                row = {"store": kind, "size_mb": round(on_disk / 1e6), "rows": n, **r}
                rows.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(root, ignore_errors=True)
    finally:
        if moto is not None:
            moto.terminate()
        ray.shutdown()
        shutil.rmtree(data, ignore_errors=True)
    report(rows)


def report(rows: list[dict[str, object]]) -> None:
    """Print the table; write the JSON and the RESULTS.md section."""
    sys.path.insert(0, str(REPO / "bench"))
    from _results import write_section

    out = REPO / "bench" / "results" / "stream_rss.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "cpus": os.cpu_count(),
                               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))
    lines = ["| store | parquet MB | rows | train rows seen | driver peak RSS MB | of which private "
             "(RssAnon) MB | object-store pages (RssShmem) MB | train samples/s | wall s | holdout acc |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['store']} | {r['size_mb']} | {r['rows']} | {r['train_rows_seen']:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {r.get('sampled_anon_mb', float('nan')):.0f} | "
              f"{r.get('sampled_shmem_mb', float('nan')):.0f} | {r['samples_per_s']:.0f} | "
              f"{r['wall_s']:.0f} | {r['holdout_accuracy']:.4f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    notes = []
    for what, key in (("peak RSS", "peak_rss_mb"), ("private peak", "sampled_anon_mb")):
        for k in ("local", "s3"):
            v = [r[key] for r in rows if r["store"] == k and key in r]
            if v:
                notes.append(f"{k}: {what} spread {max(v) - min(v):.0f} MB over {len(v)} sizes")
    write_section("streaming data: driver peak RSS", (
        "`python bench/stream_rss.py` (one fresh driver per size, 1 epoch, mlp [64] on 256 "
        "float features, `scaling.num_workers: 1`, against one running local Ray head; "
        "S3 = moto_server, in memory). Peak RSS = the driver's VmHWM; private = the peak of "
        "its RssAnon and object-store pages = the peak of its RssShmem (Ray's shared-memory "
        "object store, mapped where the driver reads blocks), both sampled every 0.2 s.\n\n"
        f"{table}\n\n{'; '.join(notes)}. Raw: bench/results/stream_rss.json."))


if __name__ == "__main__":
    main()
