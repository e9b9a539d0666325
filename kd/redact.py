"""Credentials never leave the process in what kdflow logs, tags, prints or reports.

`redact` takes any text and replaces

- the password (or bare token) in a URI's userinfo: ``http://user:pass@host`` ->
  ``http://user:***@host``, ``https://tok@host`` -> ``https://***@host``;
- every credential value kdflow can know of: the values of the environment variables
  named in `SECRET_ENV` or whose names end in ``_KEY``, ``_SECRET``, ``_TOKEN``,
  ``_PASSWORD`` (or ``_ACCESS_KEY_ID``), and the keys of the AWS shared credentials
  file, wherever they appear -> ``***``.

It is applied where configs are logged (MLflow params and the ``config.yaml``
artifact: `kd.tracking.start_run`), to every tag kdflow sets, and to the one line the
CLI prints for an error; `RedactingStream` wraps the CLI's stdout/stderr so Ray's
forwarded worker logs are redacted too. Values shorter than `MIN_LEN` (8) are left alone
(redacting ``"1"`` everywhere would garble the output and protect nothing).
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

MASK = "***"
MIN_LEN = 8
SECRET_SUFFIXES = ("_KEY", "_SECRET", "_TOKEN", "_PASSWORD", "_ACCESS_KEY_ID", "_SECRET_KEY")
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
              "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
# scheme://user:password@  or  scheme://token@  (userinfo never holds '/', '@' or space)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*)"
                       r"(?::(?P<pw>[^/@\s]*))?@")


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Credential values known in this process, longest first (so a secret that
    contains another is masked whole)."""
    env = os.environ if environ is None else environ
    found = {v for k, v in env.items()
             if (k.upper() in SECRET_ENV or k.upper().endswith(SECRET_SUFFIXES)) and v}
    found |= set(_chain_keys())
    return sorted((v for v in found if len(v) >= MIN_LEN), key=len, reverse=True)


_FILE_KEYS: dict[tuple[str, float], tuple[str, ...]] = {}


def _chain_keys() -> Iterable[str]:
    """The keys in the AWS shared credentials file (``AWS_SHARED_CREDENTIALS_FILE`` or
    ``~/.aws/credentials``), every profile; parsed locally (no network), cached per
    file version."""
    import configparser
    from pathlib import Path

    path = Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials").expanduser()
    try:
        key = (str(path), path.stat().st_mtime)
    except OSError:
        return ()
    if key not in _FILE_KEYS:
        parser = configparser.RawConfigParser()
        try:
            parser.read(path)
        except (configparser.Error, UnicodeDecodeError):
            return ()
        _FILE_KEYS[key] = tuple(
            v for sec in parser.sections() for k, v in parser.items(sec)
            if k in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token") and v)
    return _FILE_KEYS[key]


def _mask_userinfo(m: re.Match[str]) -> str:
    if m.group("pw") is not None:
        return f"{m.group('scheme')}{m.group('user')}:{MASK}@"
    return f"{m.group('scheme')}{MASK}@"


def redact(text: Any, secrets: list[str] | None = None) -> str:
    """``text`` (made a string) with URI passwords and known credential values masked."""
    out = _USERINFO.sub(_mask_userinfo, str(text))
    for value in secret_values() if secrets is None else secrets:
        out = out.replace(value, MASK)
    return out


def redact_map(values: dict[str, Any]) -> dict[str, str]:
    """Every value of a str -> value map, redacted (keys are names, kept)."""
    secrets = secret_values()
    return {k: redact(v, secrets) for k, v in values.items()}


class RedactingStream:
    """A text stream that redacts what it is given before passing it to ``inner``. Text
    is redacted line by line (a partial line waits for its end or a flush), so a
    secret split across two ``write`` calls is still masked."""

    def __init__(self, inner: TextIO) -> None:
        self.inner, self.pending, self.lock = inner, "", threading.Lock()

    def write(self, s: str) -> int:
        with self.lock:  # Ray's log thread prints worker output beside the main thread
            self.pending += s
            if "\n" in self.pending:
                done, _, self.pending = self.pending.rpartition("\n")
                self.inner.write(redact(done + "\n"))
        return len(s)

    def flush(self) -> None:
        with self.lock:
            if self.pending:
                self.inner.write(redact(self.pending))
                self.pending = ""
        self.inner.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@contextmanager
def redacted_output() -> Iterator[None]:
    """Within the block, ``sys.stdout`` and ``sys.stderr`` redact what is printed (the
    CLI runs every command in one)."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(saved[0]), RedactingStream(saved[1])  # type: ignore[assignment]
    try:
        yield
    finally:
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except (OSError, ValueError):  # the underlying stream was closed
                pass
        sys.stdout, sys.stderr = saved
