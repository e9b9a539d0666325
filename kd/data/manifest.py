"""The file manifest of a data source: which files, how big, which version, which schema.

`build_manifest` lists a local file, folder or glob, or an ``s3://`` object, prefix or
glob, without reading any row: every file's URI, size and version (local mtime in ns,
S3 ETag) plus the parquet schema of the first file. ``Manifest.digest`` hashes exactly
that (never the bytes): it is the data's content hash (``data_hash``) and the lineage
digest. `check_unchanged` runs at read time in the worker that reads a file: a file
whose size or version differs from the manifest stops the run with its name.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kd import storage
from kd.errors import InputError

SUFFIX_FORMATS = {".npz": "npz", ".npy": "npy", ".parquet": "parquet", ".pq": "parquet",
                  ".csv": "csv", ".jsonl": "jsonl", ".txt": "txt"}
TEXT_FORMATS = ("jsonl", "txt")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}


@dataclass(frozen=True)
class FileEntry:
    """One file: its URI, its path relative to the source root (the row key's file part),
    size in bytes, version (local ``mtime_ns``, S3 ETag) and modification time in ns
    (what a reader can compare through a pyarrow filesystem)."""

    uri: str
    rel: str
    size: int
    version: str
    mtime_ns: int = 0

    @property
    def fs_path(self) -> str:
        """The path inside the pyarrow filesystem: ``bucket/key`` or the local path."""
        return self.uri[len("s3://"):] if self.uri.startswith("s3://") else self.uri


@dataclass
class Manifest:
    """What a source is, without its rows: format, files, schema, image classes."""

    source: str
    fmt: str
    files: list[FileEntry]
    schema: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    endpoint: str | None = None
    content_named: bool = False  # file names are content hashes: the digest skips versions

    def digest(self, extra: str = "") -> str:
        """sha256 (16 hex) of the format, files (rel, size, version), schema, classes
        and ``extra`` (the split and label settings)."""
        doc = {"fmt": self.fmt, "files": [[f.rel, f.size, "" if self.content_named else f.version]
                                          for f in self.files],
               "schema": self.schema, "classes": self.classes, "extra": extra}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def total_bytes(self) -> int:
        """Sum of the file sizes."""
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (for logs and artifacts)."""
        return {**asdict(self), "digest": self.digest()}


def _local_entry(path: Path, root: Path) -> FileEntry:
    st = path.stat()
    rel = path.name if path == root else str(path.relative_to(root))
    return FileEntry(str(path.resolve()), rel, st.st_size, str(st.st_mtime_ns), st.st_mtime_ns)


def _list_local(source: str) -> tuple[Path, list[Path]]:
    if any(c in source for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True)
                       if Path(p).is_file())
        if not files:
            raise InputError(f"{source}: the pattern matches no file")
        return Path(os.path.commonpath([str(f.parent) for f in files])), files
    root = Path(source).expanduser()
    if not root.exists():
        raise InputError(f"{source}: no such file or directory")
    if root.is_file():
        return root, [root]
    return root, sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith((".", "_")))


def _list_s3(source: str, endpoint: str | None) -> list[FileEntry]:
    bucket, key = storage.split_s3(source)
    pattern = key if any(c in key for c in "*?[") else None
    prefix = key.split("*")[0].split("?")[0].split("[")[0] if pattern else key
    client = storage.s3_client(endpoint)
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        objs = [o for page in pages for o in page.get("Contents", [])]
    except Exception as e:  # botocore raises many types; all become one clear line
        raise storage._s3_error(source, e) from None
    if pattern:
        objs = [o for o in objs if fnmatch.fnmatchcase(o["Key"], pattern)]
        base = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
    elif key.endswith("/") or not key:
        base = key
    else:
        objs = [o for o in objs if o["Key"] == key or o["Key"].startswith(key + "/")]
        base = key + "/" if any(o["Key"] != key for o in objs) else key.rsplit("/", 1)[0] + "/"
    objs = [o for o in objs if not Path(o["Key"]).name.startswith((".", "_"))]
    if not objs:
        raise InputError(f"{source}: no such object (nothing under this prefix)")
    return [FileEntry(f"s3://{bucket}/{o['Key']}", o["Key"][len(base):] or Path(o["Key"]).name,
                      int(o["Size"]), str(o["ETag"]).strip('"'),
                      int(o["LastModified"].timestamp()) * 10**9)
            for o in sorted(objs, key=lambda o: o["Key"])]


def detect_format(files: list[FileEntry], source: str) -> str:
    """npz / npy / parquet / csv / jsonl / txt by suffix (all files alike); class
    sub-folders of images."""
    suffixes = {Path(f.rel).suffix.lower() for f in files}
    fmts = {SUFFIX_FORMATS.get(s) for s in suffixes}
    if len(fmts) == 1 and None not in fmts:
        return fmts.pop()  # type: ignore[return-value]
    if suffixes <= IMAGE_SUFFIXES and all("/" in f.rel for f in files):
        return "imagefolder"
    if "parquet" in fmts:
        return "parquet"
    raise InputError(f"{source}: cannot tell the data format from the files "
                     f"(suffixes {sorted(suffixes)}; expected one of {', '.join(SUFFIX_FORMATS)} "
                     "or class folders of images); set data.format")


def _parquet_schema(entry: FileEntry, endpoint: str | None) -> tuple[str, dict[str, str]]:
    import pyarrow.parquet as pq

    fs, path = storage.arrow_fs(entry.uri, endpoint)
    try:
        schema = pq.read_schema(path, filesystem=fs)
    except Exception as e:
        raise InputError(f"{entry.uri}: not a readable parquet file ({e})") from None
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()
            if k.decode().startswith("kd.")}
    return str(schema.remove_metadata()), meta


def build_manifest(source: str, fmt: str = "auto", endpoint: str | None = None) -> Manifest:
    """List ``source`` (file, folder, glob; local or s3://) into a `Manifest`; the
    format is ``fmt`` or detected from the files. Reads no row."""
    if storage.is_s3(source):
        files = _list_s3(source, endpoint)
    else:
        root, paths = _list_local(source)
        files = [_local_entry(p, root) for p in paths]
    if fmt != "imagefolder":
        fmt = detect_format(files, source) if fmt == "auto" else fmt
    if fmt == "imagefolder":
        files = [f for f in files if Path(f.rel).suffix.lower() in IMAGE_SUFFIXES and "/" in f.rel]
        if not files:
            raise InputError(f"{source}: no images found in class folders")
    else:
        files = [f for f in files if SUFFIX_FORMATS.get(Path(f.rel).suffix.lower()) == fmt]
        if not files:
            raise InputError(f"{source}: no {fmt} files")
        empty = [f for f in files if f.size == 0] if fmt in TEXT_FORMATS else []
        if empty:
            raise InputError(f"{empty[0].uri}: empty file; expected {fmt} text, one "
                             f"{'JSON object' if fmt == 'jsonl' else 'text'} per line")
    m = Manifest(source, fmt, files, endpoint=endpoint)
    if fmt == "parquet":
        m.schema, m.metadata = _parquet_schema(files[0], endpoint)
    if fmt == "imagefolder":
        m.classes = sorted({f.rel.split("/")[-2] for f in files})
    return m


def check_unchanged(entry: FileEntry, fs: Any) -> None:
    """Raise `InputError` naming the file when its size or modification time is no
    longer what the manifest recorded: the data changed under the run. Runs in the
    reading worker through the driver's pyarrow filesystem (whose S3 client does not
    expose the ETag: every S3 PUT moves Last-Modified, compared at 1 s resolution)."""
    import pyarrow.fs as pafs

    info = fs.get_file_info(entry.fs_path)
    if info.type != pafs.FileType.File:
        raise InputError(f"{entry.uri}: deleted since the manifest was taken; restart the run "
                         "to take a new manifest")
    mtime = int(info.mtime_ns or 0)
    same_time = (mtime // 10**9 == entry.mtime_ns // 10**9 if entry.uri.startswith("s3://")
                 else mtime == entry.mtime_ns)
    if info.size != entry.size or not same_time:
        raise InputError(f"{entry.uri}: changed since the manifest was taken (size "
                         f"{entry.size} -> {info.size}, mtime_ns {entry.mtime_ns} -> {mtime}); "
                         "restart the run to take a new manifest")
