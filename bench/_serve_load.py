"""Load across a promotion and a rollback: shared by ``bench/serve_load.py`` and
``tests/test_serve_swap.py`` (the test imports this file; nothing here is copied there).

The pieces, each usable alone:

- `setup_models`: trains a tiny digits teacher and two MLP students through kdflow
  (`kd.train.run.train_run`), registers both (`kd.registry.register.register_run`) and
  promotes v1 (`kd.registry.promote.promote`), so v1 is ``champion`` and v2 the
  ``challenger``. It picks a *probe row* on which v1 and v2 predict different classes,
  so a response's version can be read from its predictions even when the server sends
  no version field (``mlflow models serve``).
- `start_kd_serve` / `start_mlflow_serve` / `stop`: the two servers as child processes
  on free loopback ports; `stop` ends only the process (group) it started, by id.
- `Load`: C client threads, each POSTing the same batch (probe row first) in a loop over
  a keep-alive connection; every request is recorded (`Rec`).
- `AliasWatch`: polls the registry every 0.2 s and records when ``champion`` moved, the
  reference time for "seconds until every response carries the new version".
- `run_timeline`: the load for ``duration`` seconds with actions (promote, rollback) at
  given offsets; `summarize`: req/s, p50/p99, errors and per-event convergence.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from tests.conftest import free_port, launch_mlflow_server, wait_for_port  # noqa: E402

CONFIGS = REPO / "configs"
GATE = ["registry.gate.min_accuracy=0.05", "registry.gate.max_accuracy_drop=0.5",
        "registry.gate.min_teacher_agreement=0.05", "registry.gate.max_params=100000",
        "registry.gate.max_latency_ms=1000"]  # loose: this bench measures the swap, not the gate
__all__ = ["launch_mlflow_server", "free_port"]


@dataclass
class Models:
    """Two registered versions of ``name``: v1 champion, v2 challenger; ``rows`` is the
    request batch (row 0 the probe row) and ``probe[v]`` the class version v predicts
    for it (the two differ)."""

    name: str
    rows: np.ndarray
    probe: dict[str, int]
    holdout_disagree: int


def _train(work: Path, epochs_seed: list[tuple[int, int]]) -> tuple[Any, list[str]]:
    """An MLP teacher (2 epochs), then one MLP student per (epochs, seed); (exp, run ids)."""
    from kd.config import load_experiment
    from kd.train.run import train_run

    common = ["scaling.num_workers=0", f"storage.path={work / 'runs'}", "teacher.model=mlp",
              "teacher.args={hidden: [64]}", "checkpoint.every_epochs=1"]
    t = train_run(load_experiment(CONFIGS / "digits-teacher.yaml", [*common, "trainer.epochs=2"]),
                  "teacher")
    exp, runs = None, []
    for epochs, seed in epochs_seed:
        exp = load_experiment(CONFIGS / "digits-kd.yaml", [
            *common, f"trainer.epochs={epochs}", f"seed={seed}", f"teacher.weights={t.weights}",
            *GATE])
        runs.append(train_run(exp, "student").run_id)
    return exp, runs


def setup_models(work: Path, name: str, batch_rows: int = 8) -> Models:
    """Train, register v1 and v2 of ``name`` in the registry at MLFLOW_TRACKING_URI,
    promote v1; pick the probe row (see the module docstring). Raises RuntimeError when
    the two students agree on every sampled holdout row."""
    import mlflow

    from kd.data import load_splits
    from kd.registry.promote import promote
    from kd.registry.register import register_run

    exp, (run1, run2) = _train(work, [(2, 0), (6, 1)])
    assert register_run(run1, name)[1] == "1" and promote(name).promoted
    assert register_run(run2, name)[1] == "2"
    x = load_splits(exp.data).holdout.sample(256).x
    x = x.reshape(len(x), -1).astype(np.float32)
    p1, p2 = (mlflow.pyfunc.load_model(f"models:/{name}/{v}").predict(x).argmax(1) for v in "12")
    differ = np.flatnonzero(p1 != p2)
    if not len(differ):
        raise RuntimeError(f"{name}: v1 and v2 agree on all {len(x)} holdout rows; no probe row")
    i = int(differ[0])
    rest = np.delete(x, i, axis=0)[: batch_rows - 1]
    return Models(name, np.concatenate([x[i:i + 1], rest]), {"1": int(p1[i]), "2": int(p2[i])},
                  len(differ))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def start_kd_serve(name: str, poll_s: float, tracking_uri: str, log: Path,
                   timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """``kd serve NAME`` (its own local Ray unless RAY_ADDRESS is set) on a free port;
    waits for its ``serving models:/NAME@ALIAS version V at URL`` line; returns (process, URL)."""
    port = free_port()
    env = {**_env(), "MLFLOW_TRACKING_URI": tracking_uri}
    out = open(log, "w")  # noqa: SIM115 - the child writes it for its whole life
    proc = subprocess.Popen([sys.executable, "-m", "kd.cli", "serve", name, "--port", str(port),
                             "--poll-interval", str(poll_s)], env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=log.parent)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kd serve exited {proc.returncode}: {log.read_text()[-3000:]}")
        found = re.search(r"serving models:/\S+ version \S+ at (http://\S+)", log.read_text())
        if found:  # the address Serve's proxy really listens on
            return proc, found.group(1).replace("//localhost:", "//127.0.0.1:")
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"kd serve not serving after {timeout:.0f}s: {log.read_text()[-3000:]}")


def start_mlflow_serve(name: str, tracking_uri: str, log: Path,
                       timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """``mlflow models serve -m models:/NAME@champion --env-manager local`` on a free port;
    waits for ``GET /ping``; returns (process, base URL)."""
    port = free_port()
    exe = Path(sys.executable).with_name("mlflow")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    env.pop("PYTHONPATH", None)  # a consumer without kdflow: the model ships its loader
    out = open(log, "w")  # noqa: SIM115
    proc = subprocess.Popen([*cmd, "models", "serve", "-m", f"models:/{name}@champion",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=log.parent)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited: {log.read_text()[-3000:]}")
        try:
            wait_for_port(port, timeout=0.5)
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/ping")
            if c.getresponse().status == 200:
                return proc, f"http://127.0.0.1:{port}"
        except (OSError, RuntimeError, http.client.HTTPException):
            time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"mlflow models serve not ready after {timeout:.0f}s: {log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen, grace: float = 60.0) -> None:
    """SIGINT the child, then SIGTERM, then SIGKILL (each after a wait); then SIGKILL what
    is left of its own process group (started with ``start_new_session``: uvicorn workers,
    the processes of its local Ray). Only what this process started, by id."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 15.0), (signal.SIGKILL, 15.0)):
        if proc.poll() is not None:
            break
        proc.send_signal(sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Rec:
    """One request: send time (s since the load started), latency (s), HTTP status (0 =
    no answer), the version the body names (None when it names none) and the version its
    probe-row prediction identifies (None when neither version predicts that class)."""

    t: float
    latency: float
    status: int
    version: str | None
    by_probe: str | None
    error: str = ""

    @property
    def served(self) -> str | None:
        """The version that answered: the body's field, else the probe row's."""
        return self.version or self.by_probe


def _probe_version(body: dict[str, Any], probe: dict[str, int]) -> str | None:
    first = body["predictions"][0]
    cls = int(np.argmax(first)) if isinstance(first, list) else int(first)
    hits = [v for v, c in probe.items() if c == cls]
    return hits[0] if len(hits) == 1 else None


class Load:
    """``clients`` threads POSTing ``{"inputs": rows}`` to ``url + path`` until `stop`."""

    def __init__(self, url: str, path: str, models: Models, clients: int) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.addr, self.path, self.probe = (host, int(port)), path, models.probe
        self.body = json.dumps({"inputs": models.rows.tolist()}).encode()
        self.recs: list[Rec] = []
        self.done = threading.Event()
        self.t0 = 0.0
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def start(self) -> float:
        """Start the clients; returns the reference time (time.time()) of t = 0."""
        self.t0 = time.time()
        for th in self.threads:
            th.start()
        return self.t0

    def stop(self) -> list[Rec]:
        """Stop the clients (each finishes its request in flight); all records by send time."""
        self.done.set()
        for th in self.threads:
            th.join(timeout=120)
        return sorted(self.recs, key=lambda r: r.t)

    def _client(self) -> None:
        conn = None
        hdr = {"Content-Type": "application/json"}
        while not self.done.is_set():
            t = time.time()
            try:
                conn = conn or http.client.HTTPConnection(*self.addr, timeout=60)
                conn.request("POST", self.path, self.body, hdr)
                resp = conn.getresponse()
                raw = resp.read()
                lat = time.time() - t
                if resp.status != 200:
                    self.recs.append(Rec(t - self.t0, lat, resp.status, None, None, raw[:200].decode()))
                    continue
                body = json.loads(raw)
                v = body.get("version") if isinstance(body, dict) else None
                self.recs.append(Rec(t - self.t0, lat, 200, None if v is None else str(v),
                                     _probe_version(body, self.probe)))
            except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
                self.recs.append(Rec(t - self.t0, time.time() - t, 0, None, None,
                                     f"{type(e).__name__}: {e}"[:200]))
                if conn is not None:
                    conn.close()
                conn = None


class AliasWatch:
    """Polls ``name@alias`` every ``every`` s; ``moves`` lists (time.time(), version) at
    the start and at each change seen."""

    def __init__(self, tracking_uri: str, name: str, alias: str = "champion",
                 every: float = 0.2) -> None:
        from mlflow import MlflowClient

        self.c, self.name, self.alias, self.every = MlflowClient(tracking_uri), name, alias, every
        self.moves: list[tuple[float, str]] = []
        self.done = threading.Event()
        self.th = threading.Thread(target=self._run, daemon=True)
        self.th.start()

    def _run(self) -> None:
        while not self.done.is_set():
            try:
                v = str(self.c.get_model_version_by_alias(self.name, self.alias).version)
                if not self.moves or self.moves[-1][1] != v:
                    self.moves.append((time.time(), v))
            except Exception:  # noqa: BLE001 - a slow or busy server: try again
                pass
            self.done.wait(self.every)

    def wait_for(self, version: str, after: float, timeout: float = 120.0) -> float:
        """The time ``alias`` was first seen on ``version`` after ``after``."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for t, v in self.moves:
                if v == version and t >= after:
                    return t
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}@{self.alias} not on v{version} after {timeout:.0f}s")

    def close(self) -> None:
        """Stop polling."""
        self.done.set()
        self.th.join(timeout=10)


@dataclass
class Event:
    """An action of the timeline: its label, the version it moves the alias to, when it
    was called, returned and when the alias was seen moving (all s since t = 0)."""

    label: str
    target: str
    called: float = 0.0
    returned: float = 0.0
    moved: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def run_timeline(load: Load, watch: AliasWatch, duration: float,
                 actions: list[tuple[float, Event, Callable[[], Any]]],
                 settle: float = 0.0) -> tuple[list[Rec], list[Event]]:
    """Run ``load`` for ``duration`` s; at each offset call its action (in order, each
    after the previous one returned) and wait until the alias watch sees the move. With
    ``settle`` > 0 an action waits at least ``settle`` s past the previous move, and the
    load lasts at least ``settle`` s past the last one."""
    t0 = load.start()
    events: list[Event] = []
    try:
        for at, ev, fn in actions:
            start = max(at, events[-1].moved + settle if events and settle else 0.0)
            time.sleep(max(0.0, t0 + start - time.time()))
            ev.called = time.time() - t0
            fn()
            ev.returned = time.time() - t0
            ev.moved = watch.wait_for(ev.target, t0 + ev.called) - t0
            events.append(ev)
        end = max(t0 + duration, t0 + (events[-1].moved + settle if events else 0.0))
        time.sleep(max(0.0, end - time.time()))
    finally:
        recs = load.stop()
    return recs, events


def convergence(recs: list[Rec], ev: Event, until: float) -> dict[str, Any]:
    """Responses finished between ``ev.moved`` and ``until``: how many carried the target
    version, and ``seconds``: from the alias move to the end of the last response that
    still carried another version (0.0 when none did; None when no response in the window
    carried the target: the server never followed)."""
    window = [r for r in recs if r.status == 200 and ev.moved <= r.t + r.latency < until]
    hits = [r for r in window if r.served == ev.target]
    stale = [r.t + r.latency for r in window if r.served != ev.target]
    seconds = None if not hits else (max(stale) - ev.moved if stale else 0.0)
    if seconds is not None and stale and max(stale) > max(r.t + r.latency for r in hits):
        seconds = None  # the last responses were still stale: not converged in the window
    return {"event": ev.label, "target": ev.target, "called_s": round(ev.called, 2),
            "returned_s": round(ev.returned, 2), "alias_moved_s": round(ev.moved, 2),
            "responses": len(window), "with_target": len(hits),
            "seconds_to_all_new": None if seconds is None else round(seconds, 2)}


def summarize(server: str, recs: list[Rec], events: list[Event]) -> dict[str, Any]:
    """One server's numbers: requests/s (answered 200), p50/p99 latency (ms), errors
    (non-200 or no answer) with their first reasons, versions served, whether the body's
    version ever disagreed with the probe row's, and `convergence` per event."""
    ok = [r for r in recs if r.status == 200]
    span = (max(r.t + r.latency for r in recs) - min(r.t for r in recs)) if recs else 0.0
    lat = np.array([r.latency for r in ok]) * 1000 if ok else np.zeros(1)
    errs = [r for r in recs if r.status != 200]
    ends = [e.moved for e in events[1:]] + [float("inf")]
    served: dict[str, int] = {}
    for r in ok:
        served[str(r.served)] = served.get(str(r.served), 0) + 1
    return {"server": server, "requests": len(recs), "ok": len(ok), "errors": len(errs),
            "error_examples": sorted({f"{r.status} {r.error}" for r in errs})[:5],
            "seconds": round(span, 2), "req_per_s": round(len(ok) / span, 1) if span else 0.0,
            "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1), "served": served,
            "version_field_vs_probe_mismatch": sum(
                1 for r in ok if r.version and r.by_probe and r.version != r.by_probe),
            "events": [convergence(recs, e, end) for e, end in zip(events, ends)]}


def timeline(recs: list[Rec], step: float = 1.0) -> list[dict[str, Any]]:
    """Per ``step`` seconds of send time: requests, errors, responses per version served,
    median latency (ms): the swaps as the clients saw them."""
    out: dict[int, list[Rec]] = {}
    for r in recs:
        out.setdefault(int(r.t // step), []).append(r)
    rows = []
    for k in sorted(out):
        b = out[k]
        by: dict[str, int] = {}
        for r in b:
            if r.status == 200:
                by[str(r.served)] = by.get(str(r.served), 0) + 1
        rows.append({"t": round(k * step, 1), "requests": len(b),
                     "errors": sum(r.status != 200 for r in b), "served": by,
                     "p50_ms": round(float(np.median([r.latency for r in b])) * 1000, 1)})
    return rows


def write_records(recs: list[Rec], path: Path) -> None:
    """Every request as CSV: send s, latency s, status, version field, probe version, error."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "latency_s", "status", "version", "probe_version", "error"])
        for r in recs:
            w.writerow([f"{r.t:.4f}", f"{r.latency:.4f}", r.status, r.version or "",
                        r.by_probe or "", r.error])
