"""The pipeline lock: one `kd retrain` per registered model at a time.

Same compare-and-set as the promotion lock (`kd.promote.promotion_lock`): creating the
registered model ``NAME.kd-retrain-lock`` is an atomic insert on a unique key in every
MLflow backend store, so exactly one of several concurrent creators wins. Unlike the
promotion lock it is a lease: the holder records its host, pid and a heartbeat
(refreshed by a daemon thread every ``ttl_s / 4``) and the lock is stale, and broken by
the next comer, when the heartbeat is older than ``ttl_s`` or when the holder ran on
this host and its pid is gone. So a holder that dies (SIGKILL, OOM, node loss) frees
the lock at once on the same host and within ``ttl_s`` anywhere.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kd.registry.store import explain

LOCK_SUFFIX = ".kd-retrain-lock"
OWNER, HOST, PID, BEAT, TTL = ("kd.lock.owner", "kd.lock.host", "kd.lock.pid",
                               "kd.lock.heartbeat", "kd.lock.ttl_s")


class LockBusy(Exception):
    """Another live pipeline holds the lock; ``holder`` describes it."""

    def __init__(self, lock: str, holder: str) -> None:
        super().__init__(f"another pipeline ({holder}) holds {lock}")
        self.lock, self.holder = lock, holder


def lock_name(model: str) -> str:
    """The registered-model name of ``model``'s pipeline lock."""
    return model + LOCK_SUFFIX


def _tags(c: Any, lock: str) -> dict[str, str] | None:
    try:
        return dict(c.get_registered_model(lock).tags)
    except Exception as e:
        if getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise explain(e, f"lock {lock}") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_reason(tags: dict[str, str], now: float | None = None) -> str | None:
    """Why the holder described by ``tags`` is gone, or None while it is alive."""
    now = time.time() if now is None else now
    age = now - float(tags.get(BEAT, "0") or 0)
    if age > float(tags.get(TTL, "0") or 0):
        return f"heartbeat {age:.0f}s old"
    if tags.get(HOST) == socket.gethostname() and not _pid_alive(int(tags.get(PID, "0") or 0)):
        return f"pid {tags.get(PID)} on {tags.get(HOST)} is gone"
    return None


def describe(tags: dict[str, str]) -> str:
    """``pid P on HOST, heartbeat Ns ago``."""
    age = time.time() - float(tags.get(BEAT, "0") or 0)
    return f"pid {tags.get(PID)} on {tags.get(HOST)}, heartbeat {age:.0f}s ago"


def _try_create(c: Any, lock: str, token: str, ttl_s: float, model: str) -> bool:
    tags = {OWNER: token, HOST: socket.gethostname(), PID: str(os.getpid()),
            BEAT: str(time.time()), TTL: str(ttl_s)}
    try:
        c.create_registered_model(lock, tags=tags, description=f"kdflow retrain lock for {model}")
        return True
    except Exception as e:
        if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise explain(e, f"lock {lock}") from None
        return (_tags(c, lock) or {}).get(OWNER) == token  # our create went through on a retry


def _break_if_stale(c: Any, lock: str) -> dict[str, str] | None:
    """Delete a stale lock (re-checking its owner first); the live holder's tags else."""
    tags = _tags(c, lock)
    if tags is None:
        return None
    why = stale_reason(tags)
    if why is None:
        return tags
    again = _tags(c, lock)
    if again is not None and again.get(OWNER) == tags.get(OWNER):
        print(f"[kd] breaking stale lock {lock} ({why})", flush=True)
        try:
            c.delete_registered_model(lock)
        except Exception:  # someone else broke it first: the next create decides
            pass
    return None


def acquire(c: Any, model: str, wait_s: float, ttl_s: float) -> str:
    """Take ``model``'s lock, waiting up to ``wait_s`` (0: one try); returns the owner
    token. Raises `LockBusy` naming the live holder when the time is up."""
    lock, token = lock_name(model), f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    deadline = time.time() + wait_s
    while True:
        if _try_create(c, lock, token, ttl_s, model):
            return token
        holder = _break_if_stale(c, lock)
        if holder is not None and time.time() >= deadline:
            raise LockBusy(lock, describe(holder))
        time.sleep(min(2.0, 0.1 + uuid.uuid4().int % 100 / 500))


def release(c: Any, model: str, token: str) -> None:
    """Delete the lock if ``token`` still owns it (a failure only prints: it goes stale)."""
    lock = lock_name(model)
    try:
        if (_tags(c, lock) or {}).get(OWNER) == token:
            c.delete_registered_model(lock)
    except Exception as e:
        print(f"[kd] could not release {lock}: {e}", flush=True)


def _beat(c: Any, lock: str, token: str, every: float, stop: threading.Event) -> None:
    while not stop.wait(every):
        try:
            if (_tags(c, lock) or {}).get(OWNER) != token:
                print(f"[kd] warning: lost {lock} (broken as stale by another pipeline)",
                      flush=True)
                return
            c.set_registered_model_tag(lock, BEAT, str(time.time()))
        except Exception as e:  # a blip: the next beat retries; ttl_s covers several
            print(f"[kd] warning: heartbeat of {lock} failed: {e}", flush=True)


@contextmanager
def heartbeat(c: Any, model: str, token: str, ttl_s: float) -> Iterator[None]:
    """Keep the lock ``token`` holds alive (a beat every ``ttl_s / 4``) for the body,
    then release it."""
    stop = threading.Event()
    t = threading.Thread(target=_beat, args=(c, lock_name(model), token, ttl_s / 4, stop),
                         daemon=True, name="kd-retrain-lock-heartbeat")
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=5)
        release(c, model, token)
