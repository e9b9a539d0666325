"""Registry costs: register a version, promote it, and what a consumer pays to load it.

Usage (a finished `kd distill` run in the tracking store named by MLFLOW_TRACKING_URI,
or a fresh SQLite store where a tiny teacher/student pair is trained first):

    PYTHONPATH=$PWD python bench/registry.py [--run-id RUN_ID] [--repeats 3]

Prints a table (median and all repeats, seconds) and writes bench/results/registry.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONSUMER = """
import time, sys
t0 = time.perf_counter()
import mlflow, numpy as np
m = mlflow.pyfunc.load_model(sys.argv[1])
t1 = time.perf_counter()
x = np.random.default_rng(0).random((1000, 64), dtype=np.float32)
m.predict(x)
t2 = time.perf_counter()
import mlflow.pytorch
mlflow.pytorch.load_model(sys.argv[1])
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def train(d: Path) -> str:
    """A 2-epoch MLP teacher and student on digits; the student's run id."""
    from _common import mlp_student_run

    return mlp_student_run(d, epochs=2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-id")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kd-bench-registry-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    run_id = args.run_id or train(work)
    from kd.registry.promote import promote
    from kd.registry.register import register_run

    name = f"bench-{int(time.time())}"
    rows: dict[str, list[float]] = {"register (log + tag + alias)": [], "promote (gate)": [],
                                    "consumer pyfunc load": [], "consumer predict 1000 rows": [],
                                    "consumer mlflow.pytorch load": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        register_run(run_id, name)
        rows["register (log + tag + alias)"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        promote(name)
        rows["promote (gate)"].append(time.perf_counter() - t0)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        out = subprocess.run([sys.executable, "-c", CONSUMER, f"models:/{name}@champion"],
                             env=env, capture_output=True, text=True, check=True)
        load, pred, torch_load = map(float, out.stdout.split()[-3:])
        rows["consumer pyfunc load"].append(load)
        rows["consumer predict 1000 rows"].append(pred)
        rows["consumer mlflow.pytorch load"].append(torch_load)
    print(f"\nstore: {os.environ['MLFLOW_TRACKING_URI']}  (load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus)")
    print(f"{'step':32s}{'median s':>10s}  all repeats")
    for k, v in rows.items():
        print(f"{k:32s}{statistics.median(v):>10.2f}  {', '.join(f'{x:.2f}' for x in v)}")
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "registry.json").write_text(json.dumps(
        {"store": os.environ["MLFLOW_TRACKING_URI"], "loadavg": os.getloadavg()[0],
         "seconds": rows}, indent=1))


if __name__ == "__main__":
    main()
