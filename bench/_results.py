"""Write one section of bench/RESULTS.md, replacing an older copy of it."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
# Written by hand under a generated table, this line keeps what follows it (to the next
# heading) when the section is rewritten: notes on runs survive a re-run of the bench.
NOTES_MARK = "<!-- notes below are kept when the bench rewrites this section -->"


def write_section(topic: str, body: str, level: int = 2, parent: str | None = None) -> None:
    """Replace (or append) the section headed ``#`` * level + `` topic`` with ``body``.
    A new level-3 section goes under the level-2 heading ``parent`` (added if missing).
    Where the old section holds `NOTES_MARK`, the mark and what follows it are kept
    after the new body."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    mark = "#" * level
    section = f"{mark} {topic}\n\n{body.strip()}\n"
    stops = "|".join(f"^{'#' * k} " for k in range(2, level + 1))
    pattern = re.compile(rf"^{mark} {re.escape(topic)}\n.*?(?={stops}|\Z)", re.S | re.M)
    old = pattern.search(text)
    if old and NOTES_MARK in old.group(0):
        section += "\n" + old.group(0)[old.group(0).index(NOTES_MARK):].rstrip() + "\n"
    if old:
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        if parent and f"## {parent}\n" not in text:
            text = text.rstrip() + f"\n\n## {parent}\n"
        text = text.rstrip() + "\n\n" + section
    RESULTS.write_text(text.rstrip() + "\n")
