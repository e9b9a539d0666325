"""What processes that wake every 10 ms cost a training loop that fills every core.

    PYTHONPATH=$PWD python bench/wakers.py [--seconds 18] [--rounds 2] [--wakers 6] \
        [--work-us 40]

Every Ray process (the Train controller, its synchronization actor, the placement-group
cleaner, Ray Data's actors, an idle worker) wakes about 100 times a second (the core
worker's 10 ms signal check) and does a little work: measured on this VM, 0.7-0.8% of
one core each (bench/RESULTS.md, "loop overhead"). This bench reproduces that shape
without Ray: ``--wakers`` Python processes, each sleeping 10 ms and then computing for
about ``--work-us`` microseconds, beside the plain resnet20 SGD loop of
`bench/overhead.py` (batch 128, 32x32x3, in memory) and reports the loop's img/s:

- torch on every core (the default) with no wakers, with wakers at nice 0, at nice 15
  (Ray's default worker niceness) and under ``SCHED_IDLE`` (run only when a core idles);
- torch on one thread less than the cores (a spare core), without and with wakers at
  nice 0.

Conditions are interleaved over ``--rounds``; each is the median of its ~1 s epochs.
The wakers' own CPU share comes from ``/proc/<pid>/stat``. Prints a table, writes
bench/results/wakers.json and a RESULTS.md section.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
from _results import write_section  # noqa: E402
from overhead import CLASSES, SHAPE, _median_after_warmup, plain_loop  # noqa: E402

WAKER = ("import sys, time\nn = int(sys.argv[1])\nwhile True:\n"
         "    time.sleep(0.01)\n    sum(range(n))\n")
CONDITIONS = [("all cores", 0, "-"), ("all cores", None, "nice 0"), ("all cores", None, "nice 15"),
              ("all cores", None, "SCHED_IDLE"), ("a spare core", 0, "-"),
              ("a spare core", None, "nice 0")]


def spins_for(us: float) -> int:
    """The ``n`` for which ``sum(range(n))`` takes about ``us`` microseconds here."""
    n, t = 100_000, time.perf_counter()
    for _ in range(20):
        sum(range(n))
    per = (time.perf_counter() - t) / 20 / n
    return max(1, int(us * 1e-6 / per))


def start_wakers(k: int, how: str, spins: int) -> list[subprocess.Popen]:
    """``k`` waker processes at nice 0, nice 15 or under SCHED_IDLE."""
    def setup() -> None:
        if how == "nice 15":
            os.nice(15)
        elif how == "SCHED_IDLE":
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    return [subprocess.Popen([sys.executable, "-c", WAKER, str(spins)], preexec_fn=setup)
            for _ in range(k)]


def cpu_ticks(pids: list[int]) -> int:
    """utime + stime of ``pids`` in clock ticks."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total


def loop(seconds: float, threads: int) -> float:
    """`bench/overhead.py`'s plain loop (CE only) on ``threads`` torch threads over 512
    in-memory images, about one epoch per second for ``seconds``: median img/s of its
    epochs after the first."""
    torch.set_num_threads(threads)
    x, y = torch.randn(512, *SHAPE), torch.randint(0, CLASSES, (512,))
    return _median_after_warmup(plain_loop("CE only", x, y, None, max(3, round(seconds))))


def measure(args: argparse.Namespace) -> list[dict]:
    """Every condition, interleaved over the rounds."""
    cores, spins = os.cpu_count() or 1, spins_for(args.work_us)
    rows = [{"threads": name, "wakers": args.wakers if k is None else k, "how": how,
             "rates": [], "waker_core_share": []} for name, k, how in CONDITIONS]
    for r in range(args.rounds):
        for row in rows:
            ps = start_wakers(row["wakers"], row["how"], spins)
            time.sleep(1.0)
            before, t = cpu_ticks([p.pid for p in ps]), time.perf_counter()
            threads = cores if row["threads"] == "all cores" else max(1, cores - 1)
            row["rates"].append(loop(args.seconds, threads))
            used = cpu_ticks([p.pid for p in ps]) - before
            share = used / os.sysconf("SC_CLK_TCK") / (time.perf_counter() - t) / max(1, len(ps))
            row["waker_core_share"].append(share)
            for p in ps:
                p.kill()
                p.wait()
            print(f"[bench] round {r + 1}/{args.rounds}: {row['threads']}, {row['wakers']} wakers "
                  f"{row['how']}: {row['rates'][-1]:.0f} img/s", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: each condition's mean img/s against its thread setting without wakers."""
    base = {r["threads"]: statistics.mean(r["rates"]) for r in rows if r["wakers"] == 0}
    lines = ["| torch threads | wakers | img/s (mean) | vs no wakers | rounds | each waker's CPU |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        mean = statistics.mean(r["rates"])
        waker = (f"{statistics.mean(r['waker_core_share']):.2%} of a core" if r["wakers"] else "-")
        who = f"{r['wakers']} {r['how']}" if r["wakers"] else "0"
        lines.append(f"| {r['threads']} | {who} | {mean:.0f} | {mean / base[r['threads']]:.3f}x "
                     f"| {', '.join(f'{v:.0f}' for v in r['rates'])} | {waker} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=18.0, help="loop time per condition")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--wakers", type=int, default=6)
    ap.add_argument("--work-us", type=float, default=40.0, help="work per wake-up")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = measure(args)
    text = table(rows)
    print(text)
    if args.no_write:
        return
    cmd = " ".join(["python bench/wakers.py", *sys.argv[1:]])
    load = os.getloadavg()
    out = REPO / "bench" / "results" / "wakers.json"
    out.write_text(json.dumps({"command": cmd, "date": started, "cpus": os.cpu_count(),
                               "args": vars(args), "rows": rows}, indent=2) + "\n")
    write_section("processes that wake every 10 ms, beside a loop on every core", (
        f"`{cmd}` on {started}: {os.cpu_count()} CPU cores, load average {load[0]:.2f} / "
        f"{load[1]:.2f} / {load[2]:.2f} at the end. The plain resnet20 SGD loop of "
        "`bench/overhead.py` (batch 128, in memory) beside processes that each sleep 10 ms and "
        f"then compute ~{args.work_us:.0f} us, as every Ray process does (its core worker's "
        "signal check). img/s: the mean over rounds of each condition's median ~1 s window; "
        "conditions interleaved. Raw: `bench/results/wakers.json`.\n\n" + text))


if __name__ == "__main__":
    main()
