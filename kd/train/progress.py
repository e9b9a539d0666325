"""Step progress inside a long epoch: one line, throttled, rank 0 only.

    [kd] epoch 3/20  step 120/400 (30%)  851 samples/s  ETA 0:00:41

The loop prints one line per epoch; an epoch of many minutes would otherwise be
silent. `EpochProgress` prints at most one line every ``every_s`` seconds (10 by
default, ``KD_PROGRESS_S`` overrides it, 0 turns it off), never on the last step
(the epoch line follows), and nothing on ranks other than 0. samples/s counts this
worker's samples times the world size (the shards are equal), the ETA is for the rest
of the epoch at the mean rate so far.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

EVERY_S = 10.0
ENV = "KD_PROGRESS_S"


def interval_from_env(default: float = EVERY_S) -> float:
    """``KD_PROGRESS_S`` as seconds (0 = off); the default when unset or not a number."""
    raw = os.environ.get(ENV, "").strip()
    try:
        return max(0.0, float(raw)) if raw else default
    except ValueError:
        return default


def format_eta(seconds: float) -> str:
    """``H:MM:SS`` for a non-negative number of seconds."""
    s = int(round(max(0.0, seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class EpochProgress:
    """Counts the steps and samples of one epoch; `step` prints the throttled line."""

    def __init__(self, epoch: int, epochs: int, total_steps: int | None, world: int = 1,
                 enabled: bool = True, every_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 out: Callable[[str], None] | None = None) -> None:
        self.epoch, self.epochs, self.total, self.world = epoch, epochs, total_steps, world
        self.every = interval_from_env() if every_s is None else every_s
        self.enabled = enabled and self.every > 0
        self.clock = clock
        self.out = out or (lambda line: print(line, flush=True))
        self.start = self.last = clock()
        self.steps = self.samples = 0

    def line(self, now: float) -> str:
        """The progress line as of ``now``."""
        elapsed = max(now - self.start, 1e-9)
        rate = self.samples * self.world / elapsed
        parts = [f"[kd] epoch {self.epoch}/{self.epochs}"]
        if self.total:
            parts.append(f"step {self.steps}/{self.total} ({100 * self.steps // self.total}%)")
        else:
            parts.append(f"step {self.steps}")
        parts.append(f"{rate:.0f} samples/s")
        if self.total:
            left = max(self.total - self.steps, 0) * elapsed / max(self.steps, 1)
            parts.append(f"ETA {format_eta(left)}")
        return "  ".join(parts)

    def step(self, samples: int) -> str | None:
        """Count one step of ``samples`` rows; print and return the line when due."""
        self.steps += 1
        self.samples += samples
        if not self.enabled:
            return None
        now = self.clock()
        if now - self.last < self.every or (self.total and self.steps >= self.total):
            return None
        self.last = now
        text = self.line(now)
        self.out(text)
        return text
