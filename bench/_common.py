"""Helpers shared by the benches: a digits teacher and the RESULTS.md section writer."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
RESULTS = REPO / "bench" / "RESULTS.md"


def teacher_weights(work: Path, epochs: int = 8) -> str:
    """Train (once per work folder) the digits cnn_small teacher; its weights path."""
    from kd.config import load_experiment
    from kd.pipeline import train_run

    path = work / "runs" / "digits-teacher" / "model.safetensors"
    if path.exists():
        return str(path)
    exp = load_experiment(CONFIGS / "digits-teacher.yaml", [
        "scaling.num_workers=0", f"trainer.epochs={epochs}", f"storage.path={work / 'runs'}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}"])
    return train_run(exp, "teacher").weights


def write_section(title: str, body: str) -> None:
    """Replace (or append) the ``### title`` block inside ``bench/RESULTS.md``."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    block = f"### {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^### {re.escape(title)}\n.*?(?=^### |^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(block + "\n", text)
    else:
        if "## tune and teacher cache" not in text:
            text = text.rstrip() + "\n\n## tune and teacher cache\n\n"
        text = text.rstrip() + "\n\n" + block
    RESULTS.write_text(text.rstrip() + "\n")
