"""The model card: one markdown page per registered version, rendered from data."""

from __future__ import annotations

import json
from typing import Any

ROWS = (("accuracy", "{:.4f}"), ("teacher_agreement", "{:.4f}"), ("ece", "{:.4f}"),
        ("params", "{:,.0f}"), ("size_bytes", "{:,.0f}"), ("latency_ms", "{:.3f}"))


def _cell(metrics: dict[str, float] | None, key: str, fmt: str) -> str:
    if not metrics or key not in metrics:
        return "-"
    return fmt.format(metrics[key])


def render(name: str, student: dict[str, float], teacher: dict[str, float] | None,
           recipe: dict[str, Any], lineage: dict[str, str], plots: list[str]) -> str:
    """Markdown: teacher vs student holdout metrics, the recipe (student, teacher,
    distill, optim, trainer sections of the config), lineage tags and the plots (paths
    relative to the model folder)."""
    lines = [f"# Model card: {name}", "",
             "A student distilled by kdflow. Load it with "
             f"`mlflow.pyfunc.load_model(\"models:/{name}@champion\")`; "
             "`predict(x)` returns class probabilities.", "",
             "## Holdout metrics", "", "| metric | teacher | student |", "|---|---|---|"]
    for key, fmt in ROWS:
        lines.append(f"| {key} | {_cell(teacher, key, fmt)} | {_cell(student, key, fmt)} |")
    if teacher and student.get("params") and teacher.get("params"):
        ratio = teacher["params"] / student["params"]
        lines += ["", f"Compression: {ratio:.1f}x fewer parameters."]
    lines += ["", "## Recipe", "", "```json", json.dumps(recipe, indent=2, sort_keys=True), "```",
              "", "## Lineage", "", "| tag | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in sorted(lineage.items())]
    if plots:
        lines += ["", "## Training curves", ""]
        lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"
