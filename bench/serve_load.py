"""60-s load across a promotion and a rollback: `kd serve` vs `mlflow models serve`.

Usage (run un-niced for the numbers of record):

    PYTHONPATH=$PWD python bench/serve_load.py [--duration 60] [--clients 8]
        [--poll-interval 10] [--promote-at 20] [--rollback-at 40] [--servers kd,mlflow]

Starts a real `mlflow server` (SQLite backend, local artifacts, free port), trains two
digits students through kdflow, registers them (v1 champion, v2 challenger; they disagree
on the probe row that starts every request batch), then for each server: starts it,
runs C client threads for ``--duration`` s, promotes v2 (`kd.registry.promote.promote`,
the `kd promote NAME --version 2` path) at ``--promote-at`` and rolls back
(`kd.registry.promote.rollback`, `kd promote NAME --rollback`) at ``--rollback-at``, but
no sooner than one poll interval + 5 s after the promotion moved the alias (the gate
scores both versions first, which takes seconds on a loaded machine), and the load runs
at least that long past the rollback.
Every request is recorded (CSV in the work folder; a per-second timeline in the JSON);
the table gives req/s, p50/p99 latency, errors, the versions
served and the seconds from each alias move until every response carries the new version.
Writes bench/results/serve_load.json and the "serve load" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _serve_load as sl  # noqa: E402
from _common import enter_work_dir  # noqa: E402
from _results import write_section  # noqa: E402

OUT = sl.REPO / "bench" / "results" / "serve_load.json"


def one_server(kind: str, m: sl.Models, uri: str, a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Start ``kind`` ('kd' or 'mlflow'), run the timeline against it, stop it; its summary."""
    from kd.registry.promote import promote, rollback

    log = work / f"{kind}-serve.log"
    t = time.time()
    if kind == "kd":
        proc, url = sl.start_kd_serve(m.name, a.poll_interval, uri, log)
        path = "/predict"
    else:
        proc, url = sl.start_mlflow_serve(m.name, uri, log)
        path = "/invocations"
    ready = time.time() - t
    watch = sl.AliasWatch(uri, m.name)
    try:
        warm = sl.Load(url, path, m, a.clients)
        warm.start()
        time.sleep(a.warmup)
        warm_recs = warm.stop()
        load = sl.Load(url, path, m, a.clients)
        recs, events = sl.run_timeline(load, watch, a.duration, [
            (a.promote_at, sl.Event("promote v2", "2"), lambda: promote(m.name, version="2")),
            (a.rollback_at, sl.Event("rollback to v1", "1"), lambda: rollback(m.name))],
            settle=a.poll_interval + 5.0)  # a slow gate under load never squeezes out a poll
    finally:
        watch.close()
        sl.stop(proc)
    s = sl.summarize("kd serve" if kind == "kd" else "mlflow models serve", recs, events)
    sl.write_records(recs, work / f"{kind}-requests.csv")
    s.update(start_s=round(ready, 1), warmup_requests=len(warm_recs),
             warmup_errors=sum(r.status != 200 for r in warm_recs),
             requests_csv=str(work / f"{kind}-requests.csv"), timeline=sl.timeline(recs))
    return s


def table(rows: list[dict[str, Any]], a: argparse.Namespace, load: str) -> str:
    """The printed / RESULTS.md table."""
    lines = ["| server | req/s | p50 ms | p99 ms | requests | errors | served | "
             "promote: alias moved at s / s until all v2 | rollback: alias moved at s / s until all v1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in rows:
        ev = [f"{e['alias_moved_s']} / "
              f"{'never' if e['seconds_to_all_new'] is None else e['seconds_to_all_new']}"
              for e in s["events"]]
        served = ", ".join(f"v{k}: {n}" for k, n in sorted(s["served"].items()))
        lines.append(f"| {s['server']} | {s['req_per_s']} | {s['p50_ms']} | {s['p99_ms']} | "
                     f"{s['requests']} | {s['errors']} | {served} | {' | '.join(ev)} |")
    lines.append("")
    lines.append(f"{a.clients} client threads, {a.rows} rows per "
                 f"request, {a.duration:.0f} s, promote at {a.promote_at:.0f} s, rollback at "
                 f"{a.rollback_at:.0f} s, kd serve poll interval {a.poll_interval:g} s; {load}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rows", type=int, default=8, help="rows per request (the probe row first)")
    ap.add_argument("--poll-interval", type=float, default=10.0)
    ap.add_argument("--promote-at", type=float, default=None, help="default duration/3")
    ap.add_argument("--rollback-at", type=float, default=None, help="default 2*duration/3")
    ap.add_argument("--warmup", type=float, default=3.0, help="unrecorded load before t=0 (s)")
    ap.add_argument("--servers", default="kd,mlflow")
    ap.add_argument("--work", help="work folder (default: a fresh temp folder)")
    a = ap.parse_args()
    if not a.servers or set(a.servers.split(",")) - {"kd", "mlflow"}:
        ap.error(f"--servers: a comma-separated list of kd, mlflow; got {a.servers!r}")
    a.promote_at = a.duration / 3 if a.promote_at is None else a.promote_at
    a.rollback_at = 2 * a.duration / 3 if a.rollback_at is None else a.rollback_at
    work = enter_work_dir(a.work, "serve-load")
    proc, uri = sl.launch_mlflow_server(f"sqlite:///{work / 'mlflow.db'}", str(work / "artifacts"),
                                        work / "mlflow-server.log")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        t = time.time()
        m = sl.setup_models(work, f"serve-load-{int(t)}", a.rows)
        print(f"[bench] trained and registered v1 (champion), v2 in {time.time() - t:.0f} s; "
              f"probe row: v1 -> {m.probe['1']}, v2 -> {m.probe['2']} "
              f"({m.holdout_disagree} of 256 holdout rows differ)", flush=True)
        rows = []
        for kind in a.servers.split(","):
            before = os.getloadavg()[0]
            rows.append(one_server(kind, m, uri, a, work))
            rows[-1]["loadavg_before"] = round(before, 2)
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "timeline"}), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    load = (f"load average before each run {', '.join(str(r['loadavg_before']) for r in rows)} "
            f"on {os.cpu_count()} cpus (shared machine)")
    text = table(rows, a, load)
    print("\n" + text)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"args": vars(a), "cpus": os.cpu_count(), "results": rows}, indent=1))
    write_section("serve load: kd serve vs mlflow models serve across a promotion and a rollback",
                  text + "\n\nSource: `bench/serve_load.py` -> `bench/results/serve_load.json`.")


if __name__ == "__main__":
    main()
