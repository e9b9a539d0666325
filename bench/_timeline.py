"""When each Ray process of a run started and when it first showed each task title.

Ray names a worker process after what it runs (``ray::IDLE``, ``ray::TrainController.__init__``,
``ray::RayTrainWorker.run_train_fn``, ...; its ``/proc/<pid>/cmdline``). A thread reads
``/proc`` every ``interval`` seconds and keeps, per (pid, title), the process's start time
(``/proc/<pid>/stat`` field 22) and the first time the title was seen: a timeline of the
controller, worker group and data actors' start without Ray's state API (kdflow's local
Ray runs without the dashboard)."""

from __future__ import annotations

import os
import threading
import time

TICK = os.sysconf("SC_CLK_TCK")


def _boot_time() -> float:
    with open("/proc/stat") as f:
        return next(float(line.split()[1]) for line in f if line.startswith("btime"))


class RayProcessTimeline:
    """``start()``, then ``rows(t0)``: (title, process start - t0, first seen - t0) per
    (pid, title), in order of first sight. Sampling every 0.1 s costs a few % of a core."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.seen: dict[tuple[int, str], tuple[float, float]] = {}
        self._stop = threading.Event()
        self._boot = _boot_time()

    def start(self) -> RayProcessTimeline:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            for pid in (d for d in os.listdir("/proc") if d.isdigit()):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read().split(b"\0")[0].decode(errors="replace")
                    if not cmd.startswith("ray::"):
                        continue
                    with open(f"/proc/{pid}/stat") as f:
                        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
                except (OSError, ValueError, IndexError):
                    continue  # the process ended meanwhile
                key = (int(pid), cmd.split()[0])
                if key not in self.seen:
                    self.seen[key] = (self._boot + ticks / TICK, now)
            self._stop.wait(self.interval)

    def rows(self, t0: float) -> list[tuple[str, float, float]]:
        return sorted(((title[5:], born - t0, seen - t0)
                       for (_, title), (born, seen) in self.seen.items()), key=lambda r: r[2])
