"""The model card: one markdown page per registered version, rendered from data."""

from __future__ import annotations

import json
from typing import Any

ROWS = (("accuracy", "{:.4f}"), ("teacher_agreement", "{:.4f}"), ("ece", "{:.4f}"),
        ("params", "{:,.0f}"), ("size_bytes", "{:,.0f}"), ("latency_ms", "{:.3f}"))
EMBED_ROWS = (("cosine", "{:.4f}"), ("nn_top1", "{:.4f}"), ("nn_top5", "{:.4f}"),
              ("recall_at_1", "{:.4f}"), ("recall_at_10", "{:.4f}"), ("params", "{:,.0f}"),
              ("latency_ms", "{:.3f}"), ("sentences_per_s", "{:,.1f}"))
USAGE = {"classify": "`predict(x)` returns class probabilities.",
         "embed": "`predict([\"a sentence\", ...])` returns float32 sentence embeddings [N, D] "
                  "(texts are tokenized with the shipped tokenizer.json). The teacher column "
                  "shows the teacher's own retrieval recall on the same pairs; cosine and "
                  "nn_top1/nn_top5 compare the student with the teacher."}


def _cell(metrics: dict[str, float] | None, key: str, fmt: str) -> str:
    if not metrics or key not in metrics:
        return "-"
    return fmt.format(metrics[key])


def render(name: str, student: dict[str, float], teacher: dict[str, float] | None,
           recipe: dict[str, Any], lineage: dict[str, str], plots: list[str],
           task: str = "classify", notes: list[str] | None = None) -> str:
    """Markdown: teacher vs student holdout metrics (`ROWS`, or `EMBED_ROWS` for
    ``task`` embed), ``notes`` (e.g. a flavor that could not be written), the recipe
    (student, teacher, distill, optim, trainer sections of the config), lineage tags and
    the plots (paths relative to the model folder)."""
    lines = [f"# Model card: {name}", "",
             "A student distilled by kdflow. Load it with "
             f"`mlflow.pyfunc.load_model(\"models:/{name}@champion\")`; {USAGE[task]}", "",
             "## Holdout metrics", "", "| metric | teacher | student |", "|---|---|---|"]
    for key, fmt in EMBED_ROWS if task == "embed" else ROWS:
        lines.append(f"| {key} | {_cell(teacher, key, fmt)} | {_cell(student, key, fmt)} |")
    if teacher and student.get("params") and teacher.get("params"):
        ratio = teacher["params"] / student["params"]
        lines += ["", f"Compression: {ratio:.1f}x fewer parameters."]
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    lines += ["", "## Recipe", "", "```json", json.dumps(recipe, indent=2, sort_keys=True), "```",
              "", "## Lineage", "", "| tag | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in sorted(lineage.items())]
    if plots:
        lines += ["", "## Training curves", ""]
        lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"
