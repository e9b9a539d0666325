"""Write one section of bench/RESULTS.md, replacing an older copy of it."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(topic: str, body: str, level: int = 2, parent: str | None = None) -> None:
    """Replace (or append) the section headed ``#`` * level + `` topic`` with ``body``.
    A new level-3 section goes under the level-2 heading ``parent`` (added if missing)."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    mark = "#" * level
    section = f"{mark} {topic}\n\n{body.strip()}\n"
    stops = "|".join(f"^{'#' * k} " for k in range(2, level + 1))
    pattern = re.compile(rf"^{mark} {re.escape(topic)}\n.*?(?={stops}|\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        if parent and f"## {parent}\n" not in text:
            text = text.rstrip() + f"\n\n## {parent}\n"
        text = text.rstrip() + "\n\n" + section
    RESULTS.write_text(text.rstrip() + "\n")
