"""A run's figures: learning curves and, for classifiers, the holdout confusion matrix.

One piece of plotting code for curves: `write_curves` reads a run's per-epoch metric
history from MLflow and draws `CURVES` (one panel each); `train_run` logs its PNG under
the run's ``plots/`` artifacts, and registration (`kd.registry.register`) draws the same
figure for the model card. matplotlib runs headless (Agg); without matplotlib no figure
is written and the run goes on.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from kd import tracking

CURVES = ("train/loss", "val/loss", "val/accuracy", "val/teacher_agreement")
PLOTS_DIR = "plots"
CURVES_PNG, CONFUSION_PNG = "curves.png", "confusion.png"


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def metric_series(c: Any, run_id: str, keys: tuple[str, ...] = CURVES) -> dict[str, tuple]:
    """``{key: (steps, values)}`` sorted by step, for each of ``keys`` the run logged."""
    series = {}
    for key in keys:
        try:
            hist = sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)
        except Exception:  # metric not logged
            continue
        if hist:
            series[key] = ([m.step for m in hist], [m.value for m in hist])
    return series


def write_curves(c: Any, run_id: str, dest: Path) -> list[str]:
    """``dest/curves.png``: the run's per-epoch `CURVES` (one panel each); the names of
    the plots written, relative to ``dest``'s parent (none without matplotlib or metrics)."""
    plt = _pyplot()
    series = metric_series(c, run_id)
    if plt is None or not series:
        return []
    fig, axes = plt.subplots(1, len(series), figsize=(3.2 * len(series), 2.6), squeeze=False)
    for ax, (key, (steps, values)) in zip(axes[0], series.items(), strict=True):
        ax.plot(steps, values, marker="o")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
    fig.tight_layout()
    dest.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest / CURVES_PNG, dpi=80)
    plt.close(fig)
    return [f"{PLOTS_DIR}/{CURVES_PNG}"]


def write_confusion(counts: np.ndarray, dest: Path, title: str = "holdout") -> list[str]:
    """``dest/confusion.png``: the confusion counts (rows true, columns predicted), each
    cell annotated when the matrix is small enough to read; the names written."""
    plt = _pyplot()
    if plt is None or counts.size == 0:
        return []
    n = counts.shape[0]
    side = min(10.0, 1.5 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(counts, cmap="Blues")
    if n <= 20:
        top = counts.max() or 1
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if counts[i, j] > top / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion ({title}, {int(counts.sum())} rows)", fontsize=9)
    fig.tight_layout()
    dest.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest / CONFUSION_PNG, dpi=80)
    plt.close(fig)
    return [f"{PLOTS_DIR}/{CONFUSION_PNG}"]


def log_run_figures(uri: str, run_id: str, confusion: np.ndarray | None) -> list[str]:
    """Draw the run's learning curves (from its logged metrics) and, for a classifier,
    ``confusion`` (holdout counts from `kd.train.evaluate.confusion_counts`); upload
    them as the run's ``plots/`` artifacts. Returns the artifact paths logged."""
    with tempfile.TemporaryDirectory() as d:
        dest = Path(d) / PLOTS_DIR
        written = write_curves(tracking.client(uri), run_id, dest)
        if confusion is not None:
            written += write_confusion(confusion, dest)
        if written:
            tracking.log_artifact(uri, run_id, dest, PLOTS_DIR)
    return written
