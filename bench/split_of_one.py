"""One Ray Train worker with and without a split of one, back to back in one Ray session.

kdflow gives a lone worker the whole train stream (``datasets_to_split=[]``,
`kd.train.driver.datasets_to_split`); Ray Train's default would split it in one through
Ray Data's ``SplitCoordinator`` actor. This bench runs bench/overhead.py's CE-only
workload (resnet20 on 32x32x3 synthetic images, batch 128, SGD, ``scaling.num_workers:
1``) ``--repeats`` interleaved times each way: "split of one" patches
``datasets_to_split`` to return ``["train"]`` in this (the driver's) process. samples/s
is the median of epochs 2..E of a run; the final ``train/loss`` of every run is printed
(the same rows in the same shuffle give the same losses).

    PYTHONPATH=$PWD python bench/split_of_one.py [--rows 3000] [--epochs 6] [--repeats 3]

Prints a table, writes bench/results/split_of_one.json and the RESULTS.md section "one
worker without a split of one".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _common import enter_work_dir  # noqa: E402
from _results import write_section  # noqa: E402
from overhead import MODES, kdflow_run, random_teacher  # noqa: E402

WAYS = ("split of one", "whole stream (kdflow)")


def run_way(way: str, work: Path, tpath: Path, args: argparse.Namespace) -> dict:
    """One kdflow CE run, the train split handed over ``way``."""
    from kd.train import driver

    own = driver.datasets_to_split
    if way == WAYS[0]:
        driver.datasets_to_split = lambda exp: ["train"]  # Ray Train's default for one worker
    try:
        return kdflow_run(work, tpath, args, MODES["CE only"])
    finally:
        driver.datasets_to_split = own


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    args.workers = 1
    work = enter_work_dir(args.work, "split-of-one")
    _, tpath = random_teacher(work)
    t_start = time.time()
    runs: dict[str, list[dict]] = {w: [] for w in WAYS}
    for r in range(args.repeats):
        for way in WAYS:
            out = run_way(way, work, tpath, args)
            runs[way].append(out)
            print(f"[bench] repeat {r + 1}/{args.repeats} {way}: {out['img_s']:.0f} img/s, "
                  f"epochs {[round(x) for x in out['rates']]}, wall {out['wall_s']:.1f} s, "
                  f"final train/loss {out['final_loss']:.6f}", flush=True)
    lines = ["| train split handed to the one worker | img/s (median of repeats) | repeats | "
             "run wall s (repeats) | final train/loss (repeats) |", "|---|---|---|---|---|"]
    for way in WAYS:
        rs = runs[way]
        lines.append(f"| {way} | {statistics.median(o['img_s'] for o in rs):.0f} | "
                     + ", ".join(f"{o['img_s']:.0f}" for o in rs) + " | "
                     + ", ".join(f"{o['wall_s']:.1f}" for o in rs) + " | "
                     + ", ".join(f"{o['final_loss']:.6f}" for o in rs) + " |")
    table = "\n".join(lines)
    print(table)
    command = f"python bench/split_of_one.py --rows {args.rows} --epochs {args.epochs} --repeats {args.repeats}"
    facts = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t_start)),
             "cpus": os.cpu_count(), "load_avg_1_5_15_at_end": os.getloadavg(), "runs": runs}
    (REPO / "bench" / "results" / "split_of_one.json").write_text(json.dumps(facts, indent=2) + "\n")
    write_section("one worker without a split of one", (
        f"`{command}` started {facts['date']}; bench/overhead.py's CE-only workload (resnet20, "
        f"32x32x3 synthetic, batch 128, SGD), `scaling.num_workers: 1`, {args.epochs} epochs, "
        f"interleaved runs in one Ray session on {facts['cpus']} CPU cores. img/s: median of "
        "epochs 2..E of a run. \"split of one\" is Ray Train's default (`datasets_to_split="
        "[\"train\"]`: Ray Data's SplitCoordinator actor hands the one worker every block); "
        "kdflow hands a lone worker the whole stream (`datasets_to_split=[]`). Raw: "
        "`bench/results/split_of_one.json`.\n\n" + table))


if __name__ == "__main__":
    main()
