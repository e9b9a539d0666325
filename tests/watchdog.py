"""A per-test watchdog: a test still running after ``KD_TEST_WATCHDOG_S`` seconds
(default 300; 0 = off) gets one report on the real stderr, while it still runs:

- the test's id and how long it has run;
- the machine: load average, free memory, free space under /tmp, and the processes using
  the most CPU and memory (``ps``);
- the session's Ray: its CPUs in use against its total, when this process has Ray up;
- the session's moto S3 server: whether it answers an HTTP request within 5 s;
- every Python thread's innermost frames, one line each.

pytest-timeout ends a hung test at 600 s, but a CI run shows only the progress dots
until the suite ends, and a hang that the timeout cannot interrupt (a thread blocked in
C++ code) ends nothing: this report is printed before either, so a hang in CI says
where it waits and why. It only reads; it never changes the test's outcome.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

WATCHDOG_ENV = "KD_TEST_WATCHDOG_S"
_ERR: list[Any] = []  # the terminal's stderr, kept before pytest captures a test's output


def pytest_configure(config: pytest.Config) -> None:
    """Keep a handle on the real stderr (pytest's capture is suspended here; during a
    test, fd 2 is pytest's capture file, shown only if the test fails)."""
    _ERR.append(os.fdopen(os.dup(2), "w", buffering=1))


def say(text: str) -> None:
    """Print ``text`` on the terminal now, even from inside a test (not captured)."""
    print(text, file=_ERR[0] if _ERR else sys.__stderr__, flush=True)


def _bounded(fn: Callable[[], Any], seconds: float = 10.0) -> str:
    """``fn()``'s result as text, or why there is none, within ``seconds``."""
    out: list[str] = []

    def call() -> None:
        try:
            out.append(str(fn()))
        except Exception as e:  # noqa: BLE001 - a report, never a failure
            out.append(f"{type(e).__name__}: {e}")

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(seconds)
    return out[0] if out else f"no answer within {seconds:.0f} s"


def _ray_resources() -> str:
    import ray

    if not ray.is_initialized():
        return "not started in this process"
    total, free = ray.cluster_resources(), ray.available_resources()
    return f"CPU {free.get('CPU', 0):g} free of {total.get('CPU', 0):g}; all free: {free}"


def _s3_answers() -> str:
    url = os.environ.get("AWS_ENDPOINT_URL_S3")
    if not url:
        return "AWS_ENDPOINT_URL_S3 is not set"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return f"{url} answered {r.status}"
    except urllib.error.HTTPError as e:
        return f"{url} answered {e.code}"


def _ps() -> str:
    rows = subprocess.run(["ps", "-eo", "pid,ppid,ni,pcpu,rss,etime,args", "--sort=-pcpu"],
                          capture_output=True, text=True, timeout=10).stdout.splitlines()
    return "\n".join(r[:200] for r in rows[:12])


def stacks(frames: int = 8) -> str:
    """Each Python thread's innermost ``frames`` frames (site-packages paths shortened)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        if names.get(ident) == "kd-test-watchdog":
            continue
        out.append(f"  thread {names.get(ident, ident)}:")
        for f in traceback.extract_stack(frame)[-frames:]:
            where = f.filename.split("site-packages/")[-1]
            out.append(f"    {where}:{f.lineno} {f.name}")
    return "\n".join(out)


def report(nodeid: str, started: float) -> str:
    """The watchdog's report for the test ``nodeid`` running since ``started``."""
    usage = shutil.disk_usage("/tmp")
    lines = [
        f"[watchdog] {nodeid}: still running after {time.time() - started:.0f} s",
        f"[watchdog] load average {os.getloadavg()}; /tmp free {usage.free / 2**30:.1f} GiB",
        f"[watchdog] memory: {_bounded(lambda: Path('/proc/meminfo').read_text().splitlines()[:3])}",
        f"[watchdog] ray: {_bounded(_ray_resources)}",
        f"[watchdog] s3: {_bounded(_s3_answers)}",
        f"[watchdog] processes:\n{_bounded(_ps)}",
        f"[watchdog] threads:\n{stacks()}",
    ]
    return "\n".join(lines)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Arm the watchdog around the test's setup, call and teardown (fixtures included:
    a session fixture is set up inside the first test that asks for it)."""
    seconds = float(os.environ.get(WATCHDOG_ENV, "300"))
    if seconds <= 0:
        yield
        return
    started, done = time.time(), threading.Event()

    def watch() -> None:
        if done.wait(seconds):
            return
        say("\n" + report(item.nodeid, started))

    threading.Thread(target=watch, name="kd-test-watchdog", daemon=True).start()
    try:
        yield
    finally:
        done.set()
