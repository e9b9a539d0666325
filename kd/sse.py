"""S3 server-side encryption on every write (``storage.sse``, ``storage.sse_kms_key_id``).

boto3 writes (`kd.storage.put`) pass `extra_args` to ``upload_file``. pyarrow's
``S3FileSystem`` has no SSE-S3 / SSE-KMS option (it drops such headers, checked
against pyarrow 25), and it is what Ray Train copies checkpoints with and Ray Data
writes the teacher cache with. So when SSE is configured, `kd.storage.arrow_fs` wraps
it in `SSEHandler` (a ``pyarrow.fs.PyFileSystem``): reads, listings and deletes go to
pyarrow's own S3 filesystem unchanged; every object opened for writing is spooled to a
local temp file and uploaded with boto3 on close, with the SSE headers and its sha256
as user metadata; copies and moves inside the bucket are ``CopyObject`` calls, and
folder markers ``PutObject`` calls, with the same headers; deletes are boto3 calls
(pyarrow re-creates a deleted object's parent marker, unencrypted). The handler
pickles (Ray ships it to workers) without its client.
"""

from __future__ import annotations

import tempfile
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

SSE_MODES = ("AES256", "aws:kms")


def extra_args(sse: str | None, kms_key_id: str | None = None) -> dict[str, str]:
    """boto3 ``ExtraArgs`` for the configured encryption (empty without ``sse``)."""
    if not sse:
        return {}
    out = {"ServerSideEncryption": sse}
    if sse == "aws:kms" and kms_key_id:
        out["SSEKMSKeyId"] = kms_key_id
    return out


def of(storage_cfg: Any) -> dict[str, str]:
    """`extra_args` of a ``StorageConfig`` (or its dict form, or None)."""
    if storage_cfg is None:
        return {}
    get = storage_cfg.get if isinstance(storage_cfg, dict) else (
        lambda k: getattr(storage_cfg, k, None))
    return extra_args(get("sse"), get("sse_kms_key_id"))


def _bucket_key(path: str) -> tuple[str, str]:
    bucket, _, key = path.lstrip("/").partition("/")
    return bucket, key


class _Upload:
    """A write-only file that uploads itself with boto3 (and the SSE headers) on close."""

    def __init__(self, handler: SSEHandler, path: str) -> None:
        self.handler, self.path = handler, path
        self.f = tempfile.NamedTemporaryFile(prefix="kd-sse-")  # noqa: SIM115 - closed in close()
        self.closed = False

    def write(self, data: bytes) -> int:
        return self.f.write(data)

    def tell(self) -> int:
        return self.f.tell()

    def flush(self) -> None:
        self.f.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.f.flush()
            self.handler.upload(self.f.name, self.path)
        finally:
            self.f.close()


class SSEHandler(pafs.FileSystemHandler):
    """pyarrow filesystem handler: ``inner`` (an ``S3FileSystem``) for everything but
    writes, which carry ``sse`` (boto3 ``ExtraArgs``) and a ``sha256`` metadata entry."""

    def __init__(self, inner: pafs.S3FileSystem, sse: dict[str, str], endpoint: str | None,
                 creds: tuple[str, str, str | None] | None = None) -> None:
        self.inner, self.sse, self.endpoint, self.creds = inner, dict(sse), endpoint, creds
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    def client(self) -> Any:
        """The boto3 client (built on first use in each process)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            kw: dict[str, Any] = {}
            if self.creds is not None:
                kw = {"aws_access_key_id": self.creds[0], "aws_secret_access_key": self.creds[1],
                      "aws_session_token": self.creds[2]}
            self._client = boto3.session.Session(**kw).client(
                "s3", endpoint_url=self.endpoint,
                config=Config(retries={"max_attempts": 3, "mode": "standard"}))
        return self._client

    def upload(self, local: str, path: str) -> None:
        """Upload ``local`` to ``bucket/key`` with the SSE headers and its sha256."""
        from kd.integrity import sha256_file

        bucket, key = _bucket_key(path)
        args = {**self.sse, "Metadata": {"sha256": sha256_file(local)}}
        self.client().upload_file(local, bucket, key, ExtraArgs=args)

    # pyarrow's FileSystemHandler interface: everything but writes is delegated.
    def get_type_name(self) -> str:
        return "kd-s3-sse"

    def equals(self, other: Any) -> bool:
        return isinstance(other, SSEHandler) and other.sse == self.sse \
            and other.inner.equals(self.inner)

    def normalize_path(self, path: str) -> str:
        return self.inner.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.inner.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.inner.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        """An empty ``<key>/`` marker object (what pyarrow writes), encrypted like the rest:
        a bucket policy that denies unencrypted puts would refuse pyarrow's own."""
        bucket, key = _bucket_key(path)
        if key and self.inner.get_file_info(path).type == pafs.FileType.NotFound:
            self.client().put_object(Bucket=bucket, Key=key.rstrip("/") + "/", Body=b"",
                                     **self.sse)

    # Deletes are boto3 calls too: pyarrow re-creates a deleted object's parent folder
    # marker, unencrypted.
    def _delete_under(self, path: str, keep_marker: bool) -> int:
        bucket, key = _bucket_key(path)
        prefix = key.rstrip("/") + "/" if key else ""
        keys = [o["Key"] for page in self.client().get_paginator("list_objects_v2").paginate(
                    Bucket=bucket, Prefix=prefix) for o in page.get("Contents", [])
                if not (keep_marker and o["Key"] == prefix)]
        for i in range(0, len(keys), 1000):
            self.client().delete_objects(Bucket=bucket, Delete={
                "Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})
        return len(keys)

    def delete_dir(self, path: str) -> None:
        self._delete_under(path, keep_marker=False)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        if not missing_dir_ok and self.inner.get_file_info(path).type == pafs.FileType.NotFound:
            raise FileNotFoundError(path)
        self._delete_under(path, keep_marker=True)

    def delete_root_dir_contents(self) -> None:
        raise OSError("kd: refusing to delete the contents of every bucket")

    def delete_file(self, path: str) -> None:
        bucket, key = _bucket_key(path)
        self.client().delete_object(Bucket=bucket, Key=key)

    def copy_file(self, src: str, dest: str) -> None:
        sb, sk = _bucket_key(src)
        db, dk = _bucket_key(dest)
        self.client().copy_object(CopySource={"Bucket": sb, "Key": sk}, Bucket=db, Key=dk,
                                  **self.sse)

    def move(self, src: str, dest: str) -> None:
        if self.inner.get_file_info(src).type == pafs.FileType.Directory:
            for info in self.inner.get_file_info(pafs.FileSelector(src, recursive=True)):
                if info.type == pafs.FileType.File:
                    self.move(info.path, dest.rstrip("/") + info.path[len(src.rstrip("/")):])
            self.delete_dir(src)
            return
        self.copy_file(src, dest)
        self.delete_file(src)

    def open_input_stream(self, path: str) -> Any:
        return self.inner.open_input_stream(path)

    def open_input_file(self, path: str) -> Any:
        return self.inner.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any = None) -> Any:
        return pa.PythonFile(_Upload(self, path), mode="w")

    def open_append_stream(self, path: str, metadata: Any = None) -> Any:
        raise OSError(f"{path}: S3 objects cannot be appended to")


def wrap(inner: pafs.S3FileSystem, sse: dict[str, str], endpoint: str | None,
         creds: tuple[str, str, str | None] | None) -> pafs.FileSystem:
    """``inner`` with every write encrypted per ``sse`` (unchanged when ``sse`` is empty)."""
    if not sse:
        return inner
    return pafs.PyFileSystem(SSEHandler(inner, sse, endpoint, creds))
