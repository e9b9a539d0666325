"""sha256 of every artifact kdflow writes, checked when it is read back.

Where the hash lives depends on what is written (docs/reliability.md, "Artifacts,
encryption and secrets"):

- a single file put with `kd.storage.put` (final weights, retrain state and report,
  sweep state, data profiles): on S3 the object's user metadata ``sha256``; on disk a
  sidecar ``<file>.sha256`` (`record`). `kd.storage.fetch` verifies either.
- a weights file written with `kd.models.weights.save_weights`: a sidecar too, checked
  by `kd.models.weights.resolve` whenever one lies beside the file.
- a checkpoint folder: its ``manifest.json`` (size + sha256 of each file).
- the teacher cache: its ``_SUCCESS`` manifest lists every parquet shard's size and
  sha256 (`hash_tree`); `verify_tree` checks them before the shards are read.

A mismatch raises `IntegrityError` (an `InputError`: exit 2) naming the file, the
expected and the found hash: corrupt, truncated or replaced, it is never loaded.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from kd.errors import InputError

SIDECAR = ".sha256"
META_KEY = "sha256"  # S3 user metadata key (x-amz-meta-sha256)
CHUNK = 1 << 20


class IntegrityError(InputError):
    """A file whose bytes do not match the sha256 recorded when kdflow wrote it."""

    def __init__(self, name: str, expected: str, found: str, what: str = "sha256") -> None:
        super().__init__(f"{name}: {what} mismatch (recorded {expected[:16]}, found {found[:16]}): "
                         "the file is corrupt, truncated or was replaced; refusing to read it")
        self.name = name


def sha256_bytes_of(stream: Any) -> tuple[str, int]:
    """(hex sha256, byte count) of a readable binary stream, read in 1 MiB chunks."""
    h, n = hashlib.sha256(), 0
    for chunk in iter(lambda: stream.read(CHUNK), b""):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a local file's bytes."""
    with open(path, "rb") as f:
        return sha256_bytes_of(f)[0]


def sidecar(path: str | Path) -> Path:
    """``<path>.sha256``: where a local file's recorded hash lives."""
    p = Path(path)
    return p.with_name(p.name + SIDECAR)


def record(path: str | Path, sha: str | None = None, also: tuple[str, ...] = ()) -> str:
    """Write the sidecar of ``path`` (atomically: temp file + rename); return the hash.
    ``also``: more hashes the file may have for now, one line each after the first (the
    content a `kd.storage.put` is about to replace; see `accepted`)."""
    sha = sha or sha256_file(path)
    dest = sidecar(path)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(f"{h}  {Path(path).name}\n" for h in (sha, *also)))
    os.replace(tmp, dest)
    return sha


def accepted(path: str | Path) -> list[str] | None:
    """The hashes in ``path``'s sidecar (the recorded one first), or None when it has
    none. Two lines only while a replacement is under way: a process killed between
    swapping the file and rewriting its sidecar leaves a file with either hash, both
    sound. A sidecar line that is not a sha256 is an `InputError` naming it."""
    side = sidecar(path)
    if not side.is_file():
        return None
    try:
        shas = [line.split()[0].lower() for line in side.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError):
        shas = []
    if not shas or any(len(h) != 64 or any(c not in "0123456789abcdef" for c in h) for h in shas):
        raise InputError(f"{side}: not a sha256 sidecar (corrupt)")
    return shas


def recorded(path: str | Path) -> str | None:
    """The hash in ``path``'s sidecar (its first line), or None when it has none."""
    shas = accepted(path)
    return None if shas is None else shas[0]


def verify_file(path: str | Path, expected: str | None, name: str | None = None) -> None:
    """Raise `IntegrityError` naming ``name`` (default: the path) when the file's sha256
    is not ``expected``; nothing to check when ``expected`` is None."""
    if expected is None:
        return
    found = sha256_file(path)
    if found != expected.lower():
        raise IntegrityError(str(name or path), expected, found)


def verify_sidecar(path: str | Path, name: str | None = None) -> None:
    """Check a local file against its sidecar, when it has one (`record`): its sha256
    must be one of the sidecar's hashes (`accepted`)."""
    shas = accepted(path)
    if shas is None:
        return
    found = sha256_file(path)
    if found not in shas:
        raise IntegrityError(str(name or path), shas[0], found)


def hash_tree(fs: Any, root: str) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size", "sha256"}}`` of every file under ``root`` on a pyarrow
    filesystem (read once, streamed)."""
    import pyarrow.fs as pafs

    out: dict[str, dict[str, Any]] = {}
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    for info in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        with fs.open_input_stream(info.path) as f:
            sha, size = sha256_bytes_of(f)
        out[info.path[len(root):].lstrip("/")] = {"size": size, "sha256": sha}
    return out


def verify_tree(fs: Any, root: str, files: dict[str, dict[str, Any]], uri: str) -> None:
    """Every file `hash_tree` recorded under ``root`` is present with the same size and
    sha256, and there is no other file; else `InputError` / `IntegrityError` naming the
    file as ``<uri>/<relative path>``."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    present = {i.path[len(root):].lstrip("/"): i for i in infos if i.type == pafs.FileType.File}
    for rel, meta in sorted(files.items()):
        name = f"{uri.rstrip('/')}/{rel}"
        info = present.get(rel)
        if info is None:
            raise InputError(f"{name}: missing (recorded in the manifest; deleted or never "
                             "completely written)")
        if info.size != meta["size"]:
            raise IntegrityError(name, f"{meta['size']} bytes", f"{info.size} bytes", "size")
        with fs.open_input_stream(info.path) as f:
            sha, _ = sha256_bytes_of(f)
        if sha != meta["sha256"]:
            raise IntegrityError(name, meta["sha256"], sha)
    extra = sorted(set(present) - set(files))
    if extra:
        raise InputError(f"{uri.rstrip('/')}/{extra[0]}: not in the manifest (a file was added "
                         "after the cache was written)")
