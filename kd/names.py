"""The rule for names that become folders (``name:``, ``--run-name``) and the range of seeds.

One validator for both, so a run name given on the command line can never be a path out
of ``storage.path`` while the config's ``name`` is checked (docs/reliability.md).
"""

from __future__ import annotations

import re

from kd.errors import InputError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
NAME_MAX = 100
SEED_MAX = 2**31 - 1  # numpy's legacy seed is < 2**32, and the loop adds the rank


def name_problem(value: object, max_len: int | None = NAME_MAX) -> str | None:
    """Why ``value`` is not a valid run / experiment name (None when it is): 1..100
    characters of letters, digits, ``_ . -``, starting with a letter or digit, so it is
    always one safe path component (no ``/``, no ``..`` of its own). The one rule behind
    ``name:`` in the config and the ``--run-name`` flag; ``max_len=None`` checks only the
    characters (run names kdflow derives from a valid name may be longer)."""
    if not isinstance(value, str):
        return "expected a string"
    if not NAME_RE.fullmatch(value):
        return (f"{value[:60]!r} is not a valid name: use letters, digits, '_', '.', '-', "
                "starting with a letter or digit (it names a folder under storage.path)")
    if max_len is not None and len(value) > max_len:
        return f"at most {max_len} characters (got {len(value)})"
    return None


def check_name(value: str, what: str, max_len: int | None = NAME_MAX) -> str:
    """``value`` when `name_problem` finds nothing, else an `InputError` naming ``what``."""
    problem = name_problem(value, max_len)
    if problem:
        raise InputError(f"{what}: {problem}")
    return value
