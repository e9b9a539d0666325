"""Dotted paths into a nested dict/list document (``trainer.epochs``, ``distill.losses.0.weight``):
one walker for config overrides (`kd.config.apply_overrides`) and the tune search space
(`kd.tune.space`); `flatten` for MLflow params and near-miss hints; `plain_data_problem`
for what a config document may hold."""

from __future__ import annotations

import copy
import difflib
import json
import math
import numbers
from typing import Any

from kd.errors import InputError


class MissingKey(LookupError):
    """A dict along the path has no such key (and the walk may not create it)."""


def walk(doc: Any, dotted: str, label: str, create: bool = False) -> tuple[Any, str]:
    """The container that holds the last part of ``dotted``, and that part (an existing list
    index is checked). With ``create`` missing or null dict entries become ``{}``; without
    it a missing key raises `MissingKey`. Errors name ``label`` (e.g. ``override a.b``)."""
    parts = dotted.split(".")
    node: Any = doc
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise InputError(f"{label}: {'.'.join(parts[:i]) or '(top)'} is a list of {len(node)}; "
                                 f"{part!r} is not an index in it (no list item {part})")
            if not last:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                break
            if node.get(part) is None:
                if not create:
                    raise MissingKey(".".join(parts[:i + 1]))
                node[part] = {}
            node = node[part]
        else:
            raise InputError(f"{label}: {'.'.join(parts[:i])} is a value, not a section")
    return node, parts[-1]


def set_in(doc: Any, dotted: str, value: Any, label: str) -> None:
    """Set ``dotted = value`` in place, creating dicts as needed."""
    node, key = walk(doc, dotted, label, create=True)
    node[int(key) if isinstance(node, list) else key] = value


def with_values(doc: dict[str, Any], values: dict[str, Any], label: str = "path") -> dict[str, Any]:
    """A copy of ``doc`` with every ``{dotted: value}`` set."""
    out = copy.deepcopy(doc)
    for path, value in values.items():
        set_in(out, path, value, f"{label} {path}")
    return out


def check_exists(doc: dict[str, Any], dotted: str, label: str, new_ok_under: str = "") -> None:
    """Raise `InputError` (with a near-miss hint) unless ``dotted`` names a field of ``doc``;
    a missing last key directly under a ``new_ok_under`` section is accepted."""
    parts = dotted.split(".")
    try:
        node, key = walk(doc, dotted, label)
    except MissingKey:
        node, key = None, ""
    if isinstance(node, list) or (isinstance(node, dict) and key in node):
        return
    if node is not None and new_ok_under and parts[-2:-1] == [new_ok_under]:
        return  # e.g. a model argument not set in the config: the model checks it
    near = difflib.get_close_matches(dotted, list(flatten(doc)), n=2, cutoff=0.6)
    hint = f" (did you mean {' or '.join(near)}?)" if near else ""
    raise InputError(f"{label}: no such config field{hint}")


def flatten(doc: Any, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; lists index by position."""
    out: dict[str, str] = {}
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(doc, list) and doc:
        for i, v in enumerate(doc):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = json.dumps(doc) if isinstance(doc, (list, dict)) else str(doc)
    return out


INT64 = 2**63


def label(parts: list[Any]) -> str:
    """A dotted path for messages; a key with odd characters (a hand-written YAML key
    can be anything) is quoted, so the message stays one line."""
    out = []
    for p in parts:
        text = str(p)
        out.append(text if text and text.isprintable() and text.strip() == text else repr(text))
    return ".".join(out) or "(top level)"


def plain_data_problem(doc: Any, path: list[Any] | None = None) -> tuple[str, str] | None:
    """The first value of ``doc`` that is not plain config data, as ``(dotted path, why)``;
    None when all is plain. Plain: mappings with string keys, lists, strings without NUL
    bytes, booleans, 64-bit integers, finite floats, null. What YAML adds beyond that
    (``!!binary``, timestamps, sets, ``.nan``/``.inf``, non-string keys, huge integers)
    would not survive the round trip through the logged resolved config (JSON / YAML),
    or would fail later inside torch / numpy / a file system call."""
    path = path or []
    if isinstance(doc, dict):
        for k, v in doc.items():
            if not isinstance(k, str):
                return label([*path, k]), f"keys must be strings, got {type(k).__name__} {k!r}"[:200]
            found = plain_data_problem(v, [*path, k])
            if found:
                return found
        return None
    if isinstance(doc, (list, tuple)):  # tuples: documents built in Python
        for i, v in enumerate(doc):
            found = plain_data_problem(v, [*path, i])
            if found:
                return found
        return None
    if doc is None or isinstance(doc, bool):
        return None
    if isinstance(doc, numbers.Integral):  # numpy integers too (a sampled tune value)
        return None if -INT64 <= int(doc) < INT64 else (label(path), "integer out of the 64-bit range")
    if isinstance(doc, numbers.Real):
        return None if math.isfinite(doc) else (label(path), f"{doc} is not a finite number")
    if isinstance(doc, str):
        return None if "\x00" not in doc else (label(path), "the text holds a NUL byte")
    return label(path), f"expected plain config data (text, number, list, mapping), got {type(doc).__name__}"
