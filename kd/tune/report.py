"""What a sweep hands back: the trials table, the constrained choice of the best,
the Pareto front, the CSV and the plots logged to the parent MLflow run."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from kd.config import TuneConstraints

BASE_COLUMNS = ("trial_id", "status", "epochs", "epochs_trained", "metric", "val/accuracy",
                "val/teacher_agreement", "params", "latency_ms")


class NoEligibleTrial(RuntimeError):
    """No trial of a sweep finished with weights: there is nothing to choose (exit 1)."""


def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


def violation(row: dict[str, Any], c: TuneConstraints) -> float:
    """How far a trial is from meeting the constraints: the sum of relative excesses
    ``max(0, params/max_params - 1) + max(0, latency/max_latency - 1)
    + max(0, (min_agreement - agreement)/min_agreement)``; 0 means it meets them.
    A constrained value that is missing or NaN fails its constraint (infinite excess)."""
    v = 0.0
    if c.max_params is not None:
        v += _excess(_num(row.get("params")) / c.max_params - 1.0)
    if c.max_latency_ms is not None:
        v += _excess(_num(row.get("latency_ms")) / c.max_latency_ms - 1.0)
    if c.min_teacher_agreement is not None:
        agree = _num(row.get("val/teacher_agreement"))
        v += _excess((c.min_teacher_agreement - agree) / max(c.min_teacher_agreement, 1e-9))
    return v


def _excess(x: float) -> float:
    """``max(0, x)``, with NaN as infinitely far (``max(0.0, nan)`` is 0.0 in Python)."""
    return math.inf if math.isnan(x) else max(0.0, x)


def eligible(row: dict[str, Any]) -> bool:
    """A trial that may be chosen: it finished (``DONE``) and its run wrote weights."""
    return row.get("status") == "DONE" and bool(row.get("weights"))


def ineligible_reason(rows: list[dict[str, Any]]) -> str | None:
    """None when some trial is `eligible`; else one line saying why none is."""
    if any(eligible(r) for r in rows):
        return None
    counts: dict[str, int] = {}
    for r in rows:
        key = str(r.get("status")) if r.get("status") != "DONE" else "DONE without weights"
        counts[key] = counts.get(key, 0) + 1
    seen = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no trials"
    return f"no trial finished with weights to choose from ({seen})"


def rank(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Trials with a metric value, best first (``mode`` max or min)."""
    scored = [r for r in rows if not math.isnan(_num(r.get("metric")))]
    return sorted(scored, key=lambda r: _num(r["metric"]), reverse=mode == "max")


def choose(rows: list[dict[str, Any]], c: TuneConstraints, mode: str
           ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(best `eligible` trial meeting the constraints or None, the closest eligible trials
    when none does: ranked by `violation`, then by the metric). ERROR, PRUNED and
    INTERRUPTED trials, and trials whose run wrote no weights, are never chosen."""
    ranked = rank([r for r in rows if eligible(r)], mode)
    feasible = [r for r in ranked if violation(r, c) == 0.0]
    if feasible:
        return feasible[0], []
    closest = sorted(ranked, key=lambda r: violation(r, c))  # stable: metric order kept
    return None, closest[:3]


def pareto_front(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Trials not dominated in (fewer params, better metric), sorted by params."""
    pts = [r for r in rank(rows, mode) if not math.isnan(_num(r.get("params")))]
    sign = 1.0 if mode == "max" else -1.0
    front: list[dict[str, Any]] = []
    best = -math.inf
    for r in sorted(pts, key=lambda r: (_num(r["params"]), -sign * _num(r["metric"]))):
        score = sign * _num(r["metric"])
        if score > best:
            front.append(r)
            best = score
    return front


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4g}"
    return str(v)


def table(rows: list[dict[str, Any]], space_paths: list[str], limit: int = 10) -> str:
    """Plain-text table of trials (the given rows, in order), base columns then the
    searched values."""
    cols = [*BASE_COLUMNS, *space_paths]
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows[:limit]]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
              for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """All trials, one row each, every column any trial has (history excluded)."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and k != "history"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in cols})


def plots(rows: list[dict[str, Any]], metric: str, mode: str, folder: Path) -> list[Path]:
    """accuracy-vs-params (Pareto front marked), metric-vs-temperature and per-trial
    learning curves as PNGs in ``folder`` (matplotlib Agg); returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    ranked = rank(rows, mode)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([_num(r["params"]) for r in ranked], [_num(r["metric"]) for r in ranked],
               c="tab:blue", label="trials")
    front = pareto_front(rows, mode)
    ax.plot([_num(r["params"]) for r in front], [_num(r["metric"]) for r in front], "o-",
            c="tab:red", label="Pareto front", drawstyle="steps-post")
    ax.set_xscale("log")
    ax.set_xlabel("student parameters")
    ax.set_ylabel(metric)
    ax.legend()
    fig.tight_layout()
    out.append(folder / "accuracy_vs_params.png")
    fig.savefig(out[-1], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([_num(r.get("distill.temperature")) for r in ranked],
               [_num(r["metric"]) for r in ranked])
    ax.set_xlabel("distill.temperature")
    ax.set_ylabel(metric)
    fig.tight_layout()
    out.append(folder / "accuracy_vs_temperature.png")
    fig.savefig(out[-1], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    curves = 0
    for r in rows:
        hist = r.get("history") or []
        xs = [h.get("epoch") for h in hist if metric in h]
        ys = [h.get(metric) for h in hist if metric in h]
        if xs:
            ax.plot(xs, ys, marker=".", label=str(r["trial_id"])[-5:])
            curves += 1
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    if 0 < curves <= 12:  # no legend without a curve (every trial failed before an epoch)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.append(folder / "learning_curves.png")
    fig.savefig(out[-1], dpi=90)
    plt.close(fig)
    return out
