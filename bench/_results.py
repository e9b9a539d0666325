"""Write one ``## <topic>`` section of bench/RESULTS.md, replacing an older one."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(topic: str, body: str) -> None:
    """Replace (or append) the section headed ``## {topic}`` with ``body``."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = f"## {topic}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(topic)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    RESULTS.write_text(text)
