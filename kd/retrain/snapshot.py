"""Snapshot validation: a profile of the new data and checks against the previous one.

The profile is plain JSON (content hash, sample count, input shape and dtype, class
count and per-class counts). Profiles are kept under
``<storage.path>/retrain/<model>/snapshots/<hash>.json``; "previous" is the profile of
the snapshot the current champion was trained on (its ``kd.retrain.snapshot_hash`` tag).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from kd import storage
from kd.config import SnapshotChecks
from kd.data import Splits
from kd.errors import InputError


def profile(splits: Splits, source: str) -> dict[str, Any]:
    """What the checks compare: hash, samples, schema, labels, per-class counts."""
    parts = (splits.train, splits.val, splits.holdout)  # counted by the streaming profile
    counts = np.zeros(splits.num_classes, np.int64)
    for p in parts:
        counts[:len(p.counts.per_class)] += np.asarray(p.counts.per_class, np.int64)
    labeled = int(counts.sum())
    return {"source": source, "hash": splits.data_hash, "samples": sum(len(p) for p in parts),
            "labeled": labeled, "input_shape": list(splits.input_shape),
            "input_dtype": splits.input_dtype, "num_classes": int(splits.num_classes),
            "class_counts": [int(c) for c in counts] if labeled else []}


def _shares(p: dict[str, Any]) -> list[float]:
    total = max(1, sum(p["class_counts"]))
    return [c / total for c in p["class_counts"]]


def _schema(new: dict[str, Any], old: dict[str, Any]) -> list[tuple[str, bool, str]]:
    same = new["input_shape"] == old["input_shape"] and new["input_dtype"] == old["input_dtype"]
    out = [("schema", same, f"inputs {new['input_dtype']}{new['input_shape']} "
            f"{'match' if same else 'differ from'} previous "
            f"{old['input_dtype']}{old['input_shape']}")]
    ok = new["num_classes"] <= old["num_classes"]
    out.append(("label_range", ok, f"labels in [0, {new['num_classes']}) "
                f"{'within' if ok else 'outside'} previous range [0, {old['num_classes']})"))
    return out


def _against_previous(new: dict[str, Any], old: dict[str, Any],
                      lim: SnapshotChecks) -> list[tuple[str, bool, str]]:
    out = _schema(new, old)
    if lim.max_sample_change is not None:
        change = abs(new["samples"] - old["samples"]) / max(1, old["samples"])
        ok = change <= lim.max_sample_change
        out.append(("sample_count", ok, f"{new['samples']} samples, {change:.1%} change from "
                    f"previous {old['samples']} ({'<=' if ok else '>'} "
                    f"{lim.max_sample_change:.1%})"))
    if lim.max_class_share_change is not None and not (new["labeled"] and old["labeled"]):
        out.append(("class_balance", True, "skipped: no labels in "
                    + ("this or the previous snapshot" if new["labeled"] or old["labeled"]
                       else "either snapshot (an unlabeled corpus)")))
    elif lim.max_class_share_change is not None and out[1][1]:
        a, b = _shares(new), _shares(old)
        b += [0.0] * (len(a) - len(b))
        worst = max(range(len(a)), key=lambda i: abs(a[i] - b[i]), default=0)
        delta = abs(a[worst] - b[worst]) if a else 0.0
        ok = delta <= lim.max_class_share_change
        out.append(("class_balance", ok, f"largest class share change {delta:.3f} (class "
                    f"{worst}: {b[worst]:.3f} -> {a[worst]:.3f}) {'<=' if ok else '>'} "
                    f"{lim.max_class_share_change:g}"))
    return out


def check(new: dict[str, Any], old: dict[str, Any] | None,
          lim: SnapshotChecks) -> list[tuple[str, bool, str]]:
    """Every configured check as ``(name, passed, finding)``; absolute limits always,
    the comparisons only when a previous profile exists. The class checks need labels:
    on an unlabeled snapshot (a text corpus, unlabeled images) they pass as skipped."""
    out: list[tuple[str, bool, str]] = []
    if lim.min_samples is not None:
        ok = new["samples"] >= lim.min_samples
        out.append(("min_samples", ok, f"{new['samples']} samples "
                    f"{'>=' if ok else '<'} {lim.min_samples}"))
    if lim.min_class_share is not None and not new["labeled"]:
        out.append(("min_class_share", True, "skipped: the snapshot has no labels"))
    elif lim.min_class_share is not None:
        shares = _shares(new)
        low = min(range(len(shares)), key=shares.__getitem__, default=0)
        ok = bool(shares) and shares[low] >= lim.min_class_share
        out.append(("min_class_share", ok, f"smallest class share {shares[low] if shares else 0:.3f}"
                    f" (class {low}) {'>=' if ok else '<'} {lim.min_class_share:g}"))
    if old is not None:
        out += _against_previous(new, old, lim)
    else:
        out.append(("previous", True, "no previous snapshot profile: comparisons skipped"))
    return out


def profile_uri(folder: str, snapshot_hash: str) -> str:
    """Where the profile of snapshot ``snapshot_hash`` is kept."""
    return storage.join(folder, "snapshots", f"{snapshot_hash}.json")


def save_profile(folder: str, prof: dict[str, Any], endpoint: str | None,
                 sse: dict[str, str] | None = None) -> str:
    """Write the profile atomically; returns its URI."""
    uri = profile_uri(folder, prof["hash"])
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "profile.json"
        p.write_text(json.dumps(prof, indent=1))
        storage.put(p, uri, endpoint, sse)
    return uri


def load_profile(folder: str, snapshot_hash: str, endpoint: str | None) -> dict[str, Any] | None:
    """The stored profile of ``snapshot_hash``, or None when there is none."""
    try:
        return json.loads(storage.fetch(profile_uri(folder, snapshot_hash), endpoint).read_text())
    except InputError:
        return None
