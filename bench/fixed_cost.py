"""The fixed cost of a small `kd distill`: a cold local Ray against a running head.

    PYTHONPATH=$PWD python bench/fixed_cost.py [--repeats 2] [--epochs 2]

Runs ``kd distill configs/digits-kd.yaml trainer.epochs=2`` (about 0.5 s of compute)
as a fresh process each time, with a digits teacher trained once first:

- cold: no ``RAY_ADDRESS``, `kd` starts (and stops) its own local Ray;
- running head: ``ray start --head`` once, then ``RAY_ADDRESS=127.0.0.1:PORT kd distill``.

``--timeline`` adds one running-head run that samples ``/proc`` for Ray's processes
(`bench/_timeline.py`): when the Train controller, its helper actors, the worker and
the dataset manager started, and when each first ran its task; printed, not in the medians.

Each child process times its phases (the functions `kd.train.run.train_run` calls,
wrapped) and prints them as JSON: imports, data, preflight, Ray start / connect, MLflow
run, ``fit`` (the TorchTrainer: controller + worker group start, epochs, shutdown),
the epochs' own train + eval time inside ``fit``, final weights, holdout evaluation and
artifacts. Prints a table, writes bench/results/fixed_cost.json and a RESULTS.md section.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MARK = "FIXED_COST "
TIMELINE_ENV = "KD_BENCH_TIMELINE"  # set: the child samples its Ray processes (_timeline.py)
PHASES = ["imports", "data", "preflight", "ray", "mlflow run", "fit", "  worker start",
          "  loop setup", "  of which epochs", "  reports, checkpoint, shutdown",
          "weights", "holdout eval", "mlflow logging", "other", "total"]


def child(argv: list[str]) -> None:
    """Run `kd distill` in this process with timers around its phases; print them."""
    sys.path.insert(0, str(REPO))
    from kd import cli, storage, tracking
    from kd.train import run

    times: dict[str, float] = {"imports": time.perf_counter() - T0}

    stack: list[float] = []  # time spent in nested timed calls, per open call

    def timed(owner: object, attr: str, phase: str) -> None:
        """Time ``owner.attr`` into ``phase``, exclusive of timed calls inside it (Ray
        started inside load_splits counts as ray, not data)."""
        fn = getattr(owner, attr)

        def wrapper(*a, **k):  # noqa: ANN002, ANN003, ANN202
            t = time.perf_counter()
            stack.append(0.0)
            try:
                return fn(*a, **k)
            finally:
                took = time.perf_counter() - t
                inner = stack.pop()
                times[phase] = times.get(phase, 0.0) + took - inner
                if stack:
                    stack[-1] += took
        setattr(owner, attr, wrapper)

    from kd import runtime

    timed(runtime, "ensure_ray", "ray")
    for attr, phase in [("run_splits", "data"), ("preflight", "preflight"),
                        ("ensure_ray", "ray"), ("fit", "fit"), ("evaluate", "holdout eval"),
                        ("evaluate_with_confusion", "holdout eval"),
                        ("primary_teacher", "holdout eval"), ("save_weights", "weights"),
                        ("publish_weights", "weights"),
                        ("build_spec", "weights"), ("load_state_dict", "weights"),
                        ("log_lineage", "mlflow logging"), ("log_run_figures", "mlflow logging")]:
        timed(run, attr, phase)
    timed(storage, "put", "weights")
    for attr in ("start_run", "resume_run"):
        timed(tracking, attr, "mlflow run")
    for attr in ("log_artifact", "log_metrics", "set_tags", "end_run"):
        timed(tracking, attr, "mlflow logging")
    fit = run.fit
    timeline, rows = None, []
    if os.environ.get(TIMELINE_ENV):
        sys.path.insert(0, str(REPO / "bench"))
        from _timeline import RayProcessTimeline

        timeline = RayProcessTimeline().start()

    def fit_and_epochs(*a, **k):  # noqa: ANN002, ANN003, ANN202
        start = time.time()
        out = fit(*a, **k)
        end = time.time()
        times.update(fit_phases(a[4], a[3], start, end))
        if timeline is not None:
            timeline.stop()
            rows.extend(timeline.rows(start))
        return out
    run.fit = fit_and_epochs
    code = cli.run(argv)
    times["total"] = time.perf_counter() - T0
    times["other"] = times["total"] - sum(v for k, v in times.items()
                                          if k != "total" and not k.startswith("  "))
    print(MARK + json.dumps({"rc": code, **times, **({"timeline": rows} if rows else {})}),
          flush=True)
    from kd.runtime import end_process

    end_process(code)  # as `kd` itself ends (kd.cli.main)


def fit_phases(uri: str, run_id: str, start: float, end: float) -> dict[str, float]:
    """Where ``fit``'s seconds went, from the run's MLflow metrics (every epoch; Ray's
    result keeps the last one only) and the loop's first-report timestamps: worker start
    (controller + worker group + dataset shards, until the loop is entered), setup
    (build, broadcast, restore), the epochs' train + eval, and the rest (reports,
    checkpoint upload, worker group shutdown)."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)

    def hist(key: str) -> list[float]:
        return [m.value for m in c.get_metric_history(run_id, key)]

    entered, setup = hist("time/loop_entered_unix")[:1], hist("time/setup_s")[:1]
    epochs = sum(hist("time/train_s")) + sum(hist("time/eval_s"))
    start_s = entered[0] - start if entered else float("nan")
    setup_s = setup[0] if setup else float("nan")
    return {"  worker start": start_s, "  loop setup": setup_s, "  of which epochs": epochs,
            "  reports, checkpoint, shutdown": (end - start) - start_s - setup_s - epochs}


def _timeline_table(traced: dict) -> str:
    """The Ray processes of one running-head run, in order: when each process started and
    when it first showed each task title, in seconds after ``fit`` began."""
    lines = [f"Timeline of one more running-head run (`--timeline`, not in the medians; "
             f"process wall {traced['process wall']:.1f} s): seconds after `fit` began.",
             "", "| Ray process: task title | process started | title first seen |",
             "|---|---|---|"]
    lines += [f"| {title} | {born:.2f} | {seen:.2f} |" for title, born, seen in traced["timeline"]
              if seen >= -1.0]  # the head's own long-lived processes are left out
    lines.append(f"| (the loop entered, kdflow's own mark) | | {traced['  worker start']:.2f} |")
    return "\n".join(lines)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distill(work: Path, teacher: str, epochs: int, env: dict[str, str],
             extra: tuple[str, ...] = ()) -> dict[str, float]:
    argv = ["distill", str(REPO / "configs" / "digits-kd.yaml"), f"trainer.epochs={epochs}",
            f"teacher.weights={teacher}", f"storage.path={work / 'runs'}",
            f"tracking.uri=sqlite:///{work / 'mlflow.db'}", *extra]
    t = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--child", *argv], cwd=work, env=env,
                       capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t
    lines = [x for x in p.stdout.splitlines() if x.startswith(MARK)]
    if p.returncode != 0 or not lines or json.loads(lines[-1][len(MARK):])["rc"] != 0:
        raise SystemExit(f"kd distill failed ({p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    out = json.loads(lines[-1][len(MARK):])
    out["process wall"] = wall
    out["start + exit (outside main)"] = wall - out["total"]
    return out


def _start_head(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = _port()
    temp = tempfile.mkdtemp(prefix="kdfc-", dir="/tmp")
    ray = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    for _ in range(120):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    time.sleep(2.0)  # the raylet registers after the GCS port opens
    return head, address


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--work", default=None)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--timeline", action="store_true",
                    help="one more running-head run that records when each Ray process started")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "bench"))
    from _common import enter_work_dir, teacher_weights
    from _results import write_section

    sys.path.insert(0, str(REPO))
    work = enter_work_dir(args.work, "fixed-cost")
    teacher = teacher_weights(work)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    runs: dict[str, list[dict[str, float]]] = {"cold": [], "running head": [], "in-process": []}
    for _ in range(args.repeats):
        runs["cold"].append(_distill(work, teacher, args.epochs, env))
    head, address = _start_head(env)
    # `ray start` turns token auth on (its token in ~/.ray/auth_token); the client must ask
    joined = {**env, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"}
    try:
        _distill(work, teacher, args.epochs, joined)  # head warm-up
        for _ in range(args.repeats):
            runs["running head"].append(_distill(work, teacher, args.epochs, joined))
            runs["in-process"].append(_distill(work, teacher, args.epochs, joined,
                                               ("scaling.num_workers=0",)))
        traced = (_distill(work, teacher, args.epochs, {**joined, TIMELINE_ENV: "1"})
                  if args.timeline else None)
    finally:  # stop exactly this head: its process group
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
    keys = [*PHASES, "start + exit (outside main)", "process wall"]
    med = {m: {k: statistics.median(r.get(k, 0.0) for r in rs) for k in keys}
           for m, rs in runs.items()}
    lines = ["| phase (s, median) | cold local Ray | running head (`RAY_ADDRESS`) | running head, "
             "`scaling.num_workers=0` |", "|---|---|---|---|"]
    lines += [f"| {k.strip()}{' (inside fit)' if k.startswith(' ') else ''} | "
              f"{med['cold'][k]:.2f} | {med['running head'][k]:.2f} | {med['in-process'][k]:.2f} |"
              for k in keys]
    table = "\n".join(lines)
    if traced is not None:
        table += "\n\n" + _timeline_table(traced)
    print(table)
    load = os.getloadavg()
    facts = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "epochs": args.epochs,
             "repeats": args.repeats, "cpus": os.cpu_count(), "load_avg_1_5_15_at_end": load,
             "median": med, "runs": runs, "timeline_run": traced}
    if args.no_write:
        return
    (REPO / "bench" / "results").mkdir(exist_ok=True)
    (REPO / "bench" / "results" / "fixed_cost.json").write_text(json.dumps(facts, indent=2) + "\n")
    write_section("fixed cost of a small kd distill", (
        f"`python bench/fixed_cost.py --repeats {args.repeats} --epochs {args.epochs}` on "
        f"{facts['date']}: `kd distill configs/digits-kd.yaml trainer.epochs={args.epochs}`, "
        f"each a fresh process; {os.cpu_count()} CPU cores, load average {load[0]:.2f} / "
        f"{load[1]:.2f} / {load[2]:.2f} (1/5/15 min) at the end. Target: <= 8 s against a "
        "running head.\n\n" + table))


if __name__ == "__main__":
    main()
