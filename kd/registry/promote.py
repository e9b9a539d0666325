"""The promotion gate (challenger -> champion), rollback, and the promotion lock.

`promote` scores the challenger and the current champion on the same holdout split
(sha256-verified downloads, the same evaluation code) and moves the ``champion``
alias only if `gate_check` passes. The decision, both sides' metrics and the reason
are tagged on both versions (``kd.gate.*``) and printed. The registered model keeps
the champion history: ``kd.champion_history`` (a stack of versions, top = current)
and ``kd.alias_log`` (the last `LOG_KEEP` alias moves).

Two promoters never interleave: each holds `promotion_lock` (see its docstring)
while it reads the champion, decides, moves the alias and writes the history.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd.config import EMPTY_GATE, Experiment, GateConfig
from kd.errors import GateRejected, InputError
from kd.registry.embed import EMBED
from kd.registry.register import CHALLENGER, CHAMPION, run_config, teacher_and_holdout
from kd.registry.store import (
    AliasNotSet,
    ModelRef,
    download_version,
    explain,
    get_version,
    registry_client,
)

HISTORY_TAG, LOG_TAG = "kd.champion_history", "kd.alias_log"
LOG_KEEP = 50
LOCK_SUFFIX = ".kd-lock"
LOCK_TTL_S = 600.0
LOCK_WAIT_S = 120.0
SHOWN = {"classify": ("accuracy", "teacher_agreement", "params", "latency_ms"),
         "embed": ("cosine", "recall_at_10", "teacher_recall_at_10", "nn_top1", "params",
                   "latency_ms")}


@dataclass
class Decision:
    """One gate decision: which versions, both sides' metrics, pass/fail and why."""

    name: str
    challenger: str
    champion: str | None
    promoted: bool
    reasons: list[str]
    challenger_metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] | None = None
    task: str = "classify"

    @property
    def reason(self) -> str:
        """All gate findings as one line."""
        return "; ".join(self.reasons)


def gate_check(gate: GateConfig, new: dict[str, float],
               old: dict[str, float] | None) -> tuple[bool, list[str]]:
    """Each configured threshold as one finding; passes when none fails.

    accuracy >= min_accuracy; accuracy >= champion accuracy - max_accuracy_drop (only
    with a champion); teacher_agreement >= min_teacher_agreement; params <= max_params;
    latency_ms <= max_latency_ms; cosine >= min_cosine, recall_at_10 >=
    min_recall_at_10 and cosine >= champion cosine - max_cosine_drop (embedding models).
    A threshold whose metric is missing fails. A gate with no threshold passes only with
    ``allow_any: true``; otherwise it is an `InputError`.
    """
    if gate.allow_any:
        return True, ["the gate allows any model (registry.gate.allow_any: true)"]
    if not gate.criteria():
        raise InputError(EMPTY_GATE)
    findings: list[tuple[bool, str]] = []

    def check(metric: str, ok_fn: Any, limit: float, text: str) -> None:
        if metric not in new:
            findings.append((False, f"{metric} unavailable (needed for {text})"))
            return
        ok = bool(ok_fn(new[metric], limit))
        findings.append((ok, f"{metric} {new[metric]:.4g} {'meets' if ok else 'fails'} {text}"))

    if gate.min_accuracy is not None:
        check("accuracy", lambda v, t: v >= t, gate.min_accuracy, f">= {gate.min_accuracy:g}")
    for metric, drop in (("accuracy", gate.max_accuracy_drop), ("cosine", gate.max_cosine_drop)):
        if drop is not None and old is not None and metric in old:
            check(metric, lambda v, t: v >= t, old[metric] - drop,
                  f">= champion {old[metric]:.4g} - {drop:g}")
    if gate.min_teacher_agreement is not None:
        check("teacher_agreement", lambda v, t: v >= t, gate.min_teacher_agreement,
              f">= {gate.min_teacher_agreement:g}")
    if gate.max_params is not None:
        check("params", lambda v, t: v <= t, gate.max_params, f"<= {gate.max_params}")
    if gate.max_latency_ms is not None:
        check("latency_ms", lambda v, t: v <= t, gate.max_latency_ms,
              f"<= {gate.max_latency_ms:g} ms")
    for metric, limit in (("cosine", gate.min_cosine), ("recall_at_10", gate.min_recall_at_10)):
        if limit is not None:
            check(metric, lambda v, t: v >= t, limit, f">= {limit:g}")
    if not findings:  # only a max_*_drop, and no champion yet
        return True, ["first champion: max_accuracy_drop / max_cosine_drop have no champion "
                      "to compare with"]
    return all(ok for ok, _ in findings), [text for _, text in findings]


@contextmanager
def promotion_lock(c: Any, name: str, wait_s: float = LOCK_WAIT_S,
                   ttl_s: float = LOCK_TTL_S) -> Iterator[str]:
    """Hold the promotion lock of model ``name``.

    The lock is a registered model named ``NAME.kd-lock``: creating a registered model is
    an atomic insert on a unique key in every MLflow backend store (SQLite, PostgreSQL,
    MySQL), so exactly one of several concurrent creators succeeds and the others get
    RESOURCE_ALREADY_EXISTS (a compare-and-set that works through a real server). The
    holder's token and expiry are tags on it; a lock older than ``ttl_s`` (a crashed
    promoter) is broken. Released by deleting it. Waits up to ``wait_s``.
    """
    lock = name + LOCK_SUFFIX
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    deadline = time.time() + wait_s
    while True:
        try:
            c.create_registered_model(lock, tags={"kd.lock.owner": token,
                                                  "kd.lock.expires": str(time.time() + ttl_s)},
                                      description=f"kdflow promotion lock for {name}")
            break
        except Exception as e:
            if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise explain(e, f"lock {lock}") from None
            if _owner(c, lock) == token:  # our create went through, its reply was retried
                break
        _break_if_stale(c, lock)
        if time.time() > deadline:
            raise InputError(f"{name}: another promotion holds {lock} for over {wait_s:.0f}s; "
                             f"if none runs, delete the registered model {lock!r}")
        time.sleep(0.1 + uuid.uuid4().int % 100 / 1000)
    try:
        yield token
    finally:
        try:
            if _owner(c, lock) == token:
                c.delete_registered_model(lock)
        except Exception as e:  # the lock expires after ttl_s anyway
            print(f"[kd] could not release {lock}: {explain(e, 'release')}", flush=True)


def _owner(c: Any, lock: str) -> str | None:
    try:
        return c.get_registered_model(lock).tags.get("kd.lock.owner")
    except Exception:  # released meanwhile
        return None


def _break_if_stale(c: Any, lock: str) -> None:
    try:
        tags = c.get_registered_model(lock).tags
        if float(tags.get("kd.lock.expires", "inf")) < time.time():
            owner = tags.get("kd.lock.owner")
            print(f"[kd] breaking stale lock {lock} (owner {owner})", flush=True)
            c.delete_registered_model(lock)
    except Exception:  # released meanwhile: the next create decides
        pass


def _model_tags(c: Any, name: str) -> dict[str, str]:
    try:
        return dict(c.get_registered_model(name).tags)
    except Exception as e:
        if getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            raise InputError(f"{name}: no registered model named {name!r}") from None
        raise explain(e, f"registered model {name!r}") from None


def _history(tags: dict[str, str]) -> tuple[list[str], list[dict[str, Any]]]:
    stack = [str(v) for v in json.loads(tags.get(HISTORY_TAG, "[]"))]
    return stack, json.loads(tags.get(LOG_TAG, "[]"))


def _write_history(c: Any, name: str, stack: list[str], log: list[dict[str, Any]]) -> None:
    c.set_registered_model_tag(name, HISTORY_TAG, json.dumps(stack))
    c.set_registered_model_tag(name, LOG_TAG, json.dumps(log[-LOG_KEEP:]))


def _alias_version(c: Any, name: str, alias: str) -> Any | None:
    try:
        return get_version(c, ModelRef(name, alias=alias))
    except AliasNotSet:
        return None


def fetch_version(c: Any, mv: Any) -> tuple[Path, dict[str, Any]]:
    """A version's ``data/student`` folder (downloaded, sha256-verified) and its
    ``kd_model.json``."""
    from kd.registry.loader import CONFIG, DATA_DIR

    folder = download_version(c, mv, weights_only=True)  # sha256-verified here
    return folder / DATA_DIR, json.loads((folder / DATA_DIR / CONFIG).read_text())


def score_versions(c: Any, versions: list[Any], exp: Experiment, teacher: Any, x: Any,
                   y: Any) -> list[dict[str, float]]:
    """Holdout metrics of registered versions (each downloaded, sha256-verified, rebuilt) on
    the streamed holdout split ``x`` of ``exp`` (``y`` unused), so all are scored on the
    same rows, together in one pass in which the teacher sees the holdout once: classifiers
    by `kd.train.evaluate.evaluate_split_many`, embedding models by
    `kd.train.embed_eval.evaluate_embed_many` (cosine to ``teacher``, neighbours, retrieval)."""
    from kd.registry.loader import build_module

    built = [build_module(fetch_version(c, mv)[0], verify=False) for mv in versions]
    models = {str(i): m for i, (m, _) in enumerate(built)}
    if built and all(cfg.get("task") == EMBED for _, cfg in built):
        from kd.train.embed_eval import evaluate_embed_many

        got = evaluate_embed_many(exp, models, x, teacher)
    else:
        from kd.train.evaluate import evaluate_split_many

        got = {k: m for k, (m, _) in evaluate_split_many(models, x, teacher).items()}
    return [got[str(i)] for i in range(len(built))]


def version_task(c: Any, mv: Any) -> str:
    """``classify`` or ``embed``: the version's ``kd.task`` tag (set at registration),
    else its ``kd_model.json`` (versions registered before the tag)."""
    task = (mv.tags or {}).get("kd.task")
    return task if task else str(fetch_version(c, mv)[1].get("task", "classify"))


def _fmt(m: dict[str, float] | None, k: str) -> str:
    return "-" if not m or k not in m else f"{m[k]:.4g}"


def report(d: Decision) -> str:
    """Printable decision: both sides' metrics, the verdict and the reason."""
    lines = [f"{'metric':20s}{'challenger v' + d.challenger:>18s}"
             f"{('champion v' + d.champion) if d.champion else 'champion (none)':>18s}"]
    lines += [f"{k:20s}{_fmt(d.challenger_metrics, k):>18s}{_fmt(d.champion_metrics, k):>18s}"
              for k in SHOWN.get(d.task, SHOWN["classify"])]
    verdict = "PROMOTED" if d.promoted else "REJECTED"
    lines.append(f"{d.name}: {verdict} v{d.challenger}: {d.reason}")
    return "\n".join(lines)


def promote(name: str, exp: Experiment | None = None, version: str | None = None) -> Decision:
    """Gate the challenger (or ``version``) against the champion; move ``champion`` on pass.

    Raises `GateRejected` (exit 3) after tagging a rejection; `InputError` (exit 2) for an
    unknown model, a missing challenger, a checksum mismatch or an unreachable server.
    """
    c = registry_client()
    _model_tags(c, name)  # a clear error for an unknown name, before taking the lock
    with promotion_lock(c, name):
        new = (get_version(c, ModelRef(name, version=version)) if version
               else _alias_version(c, name, CHALLENGER))
        if new is None:
            raise InputError(f"{name}: no version has the alias {CHALLENGER!r}; register one "
                             "or pass --version")
        old = _alias_version(c, name, CHAMPION)
        if old is not None and old.version == new.version:
            print(f"[kd] {name} v{new.version} is already {CHAMPION}", flush=True)
            return Decision(name, new.version, old.version, True, ["already champion"])
        exp = exp or run_config(c, new.run_id)
        gate = exp.registry.gate
        if not (gate.allow_any or gate.criteria()):
            raise InputError(EMPTY_GATE)  # before any scoring
        task = version_task(c, new)
        problem = gate.task_problem(task)
        if problem:
            raise InputError(f"{name} v{new.version}: {problem}")
        new_m, old_m = _score_pair(c, new, old, exp, task)
        ok, reasons = gate_check(gate, new_m, old_m)
        d = Decision(name, new.version, old.version if old else None, ok, reasons, new_m, old_m,
                     task)
        _record(c, d)
    print(report(d), flush=True)
    if not ok:
        raise GateRejected(f"{name} v{d.challenger}: {d.reason}")
    return d


def _score_pair(c: Any, new: Any, old: Any | None, exp: Experiment,
                task: str) -> tuple[dict[str, float], dict[str, float] | None]:
    """Challenger and champion metrics, both scored on ``exp``'s holdout against its
    primary teacher, together (`score_versions`)."""
    teacher, x, y = teacher_and_holdout(exp)
    if old is not None and version_task(c, old) != task:
        print(f"[kd] champion v{old.version} is not a {task} model; the gate compares "
              "nothing with it", flush=True)
        old = None
    got = score_versions(c, [new] if old is None else [new, old], exp, teacher, x, y)
    return got[0], got[1] if old is not None else None


def _record(c: Any, d: Decision) -> None:
    """Tag both versions with the decision; on pass move the aliases and the history."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tags = {"kd.gate.decision": "promoted" if d.promoted else "rejected",
            "kd.gate.reason": d.reason[:4000], "kd.gate.at": now,
            "kd.gate.challenger": d.challenger, "kd.gate.champion": d.champion or "",
            "kd.gate.challenger_metrics": json.dumps(d.challenger_metrics, sort_keys=True),
            "kd.gate.champion_metrics": json.dumps(d.champion_metrics, sort_keys=True)}
    try:
        for v in filter(None, (d.challenger, d.champion)):
            for k, val in tags.items():
                c.set_model_version_tag(d.name, v, k, val)
        if not d.promoted:
            return
        stack, log = _history(_model_tags(c, d.name))
        if not stack and d.champion:  # a champion set before kdflow kept history
            stack = [d.champion]
        c.set_registered_model_alias(d.name, CHAMPION, d.challenger)
        try:
            if c.get_model_version_by_alias(d.name, CHALLENGER).version == d.challenger:
                c.delete_registered_model_alias(d.name, CHALLENGER)
        except Exception:  # no challenger alias (promoted with --version)
            pass
        log.append({"at": now, "action": "promote", "from": d.champion, "to": d.challenger})
        _write_history(c, d.name, [*stack, d.challenger], log)
        c.set_model_version_tag(d.name, d.challenger, "kd.promoted_at", now)
    except Exception as e:
        raise explain(e, f"{d.name}: recording the decision") from None


def _deleted(c: Any, name: str, version: str) -> bool:
    """True only when the server says version ``version`` does not exist
    (RESOURCE_DOES_NOT_EXIST); any other failure (network, auth, server error) is an
    `InputError`, so a rollback never skips a version it could not read."""
    try:
        c.get_model_version(name, version)
        return False
    except Exception as e:
        if getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return True
        raise explain(e, f"{name}: rollback stopped, {CHAMPION} left where it was; reading "
                         f"v{version}") from None


def rollback(name: str) -> str:
    """Move ``champion`` back to the previous champion in ``kd.champion_history``
    (skipping versions deleted since: only a RESOURCE_DOES_NOT_EXIST answer counts as
    deleted; any other error stops the rollback with the alias and history untouched);
    returns the version now champion."""
    c = registry_client()
    _model_tags(c, name)
    with promotion_lock(c, name):
        stack, log = _history(_model_tags(c, name))
        current = _alias_version(c, name, CHAMPION)
        if stack and current is not None and stack[-1] != current.version:
            stack.append(current.version)  # the alias was moved outside kdflow
        dropped = stack.pop() if stack else None
        while stack and _deleted(c, name, stack[-1]):
            print(f"[kd] {name} v{stack[-1]} was deleted; skipping it", flush=True)
            stack.pop()
        if not stack:
            raise InputError(f"{name}: no previous champion to roll back to "
                             f"(history: {_model_tags(c, name).get(HISTORY_TAG, '[]')})")
        target = stack[-1]
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            c.set_registered_model_alias(name, CHAMPION, target)
            log.append({"at": now, "action": "rollback", "from": dropped, "to": target})
            _write_history(c, name, stack, log)
            if dropped:
                c.set_model_version_tag(name, dropped, "kd.rolled_back_at", now)
        except Exception as e:
            raise explain(e, f"{name}: rollback") from None
    print(f"[kd] {name}: {CHAMPION} rolled back from v{dropped} to v{target}", flush=True)
    return target
