"""The trials table while a sweep runs: a Ray Tune callback in the driver.

`LiveTable` keeps each trial's latest reported result and prints the ranked table
(`kd.tune.report.table`) when a trial finishes, fails or is stopped, and otherwise at
most once every ``every_s`` seconds (30 by default; 0 turns the periodic print off) as
results arrive, so a sweep of many minutes shows where
it stands before the final summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ray.tune import Callback

from kd.tune.report import rank, table

EVERY_S = 30.0


class LiveTable(Callback):
    """Prints the trials table as trials report (see the module docstring)."""

    def __init__(self, space_paths: list[str], metric: str, mode: str,
                 every_s: float | None = None, clock: Callable[[], float] = time.monotonic,
                 out: Callable[[str], None] | None = None) -> None:
        self.paths, self.metric, self.mode = space_paths, metric, mode
        self.every = EVERY_S if every_s is None else every_s
        self.clock = clock
        self.out = out or (lambda text: print(text, flush=True))
        self.rows: dict[str, dict[str, Any]] = {}
        self.last = clock()

    def row(self, trial: Any, result: dict[str, Any] | None, status: str) -> dict[str, Any]:
        """One table row from a trial and its latest result."""
        r = dict(self.rows.get(trial.trial_id, {"trial_id": trial.trial_id}))
        r["status"] = status
        for p in self.paths:
            r[p] = (trial.config or {}).get(p, r.get(p, ""))
        if result:
            r["epochs_trained"] = result.get("epoch", r.get("epochs_trained", ""))
            for k in ("val/accuracy", "val/teacher_agreement"):
                if k in result:
                    r[k] = result[k]
            if self.metric in result:
                r["metric"] = result[self.metric]
        return r

    def render(self) -> str:
        """The table, best first, then trials without a metric yet."""
        rows = list(self.rows.values())
        ranked = rank(rows, self.mode)
        rest = [r for r in rows if r not in ranked]
        return table(ranked + rest, self.paths, limit=len(rows))

    def _show(self, force: bool) -> None:
        now = self.clock()
        if not force and (self.every <= 0 or now - self.last < self.every):
            return
        self.last = now
        done = sum(r["status"] != "RUNNING" for r in self.rows.values())
        self.out(f"[kd] sweep: {done}/{len(self.rows)} trials finished\n{self.render()}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        self.rows[trial.trial_id] = self.row(trial, result, "RUNNING")
        self._show(force=False)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.rows[trial.trial_id] = self.row(trial, None, "TERMINATED")
        self._show(force=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.rows[trial.trial_id] = self.row(trial, None, "ERROR")
        self._show(force=True)
