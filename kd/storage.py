"""Local and S3 paths: fetch a file, write a file atomically, join URIs.

S3 access uses boto3 with the standard AWS credential chain; an S3-compatible
endpoint comes from ``storage.endpoint_url`` or ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``. Every failure is an `InputError` naming the URI.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from kd.errors import InputError


def is_s3(uri: str) -> bool:
    """True for ``s3://bucket/key`` URIs."""
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def endpoint_url(explicit: str | None = None) -> str | None:
    """The S3 endpoint override: explicit, else the AWS environment variables, else None."""
    return explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_client(endpoint: str | None = None):  # noqa: ANN201 - boto3 client type is dynamic
    """A boto3 S3 client with bounded retries and connect timeouts."""
    import boto3
    from botocore.config import Config

    cfg = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30)
    return boto3.client("s3", endpoint_url=endpoint_url(endpoint), config=cfg)


def _s3_error(uri: str, err: Exception) -> InputError:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(err, NoCredentialsError):
        return InputError(f"{uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID/"
                          "AWS_SECRET_ACCESS_KEY or a profile)")
    if isinstance(err, EndpointConnectionError):
        return InputError(f"{uri}: S3 endpoint unreachable ({err})")
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket",):
            return InputError(f"{uri}: bucket does not exist")
        if code in ("404", "NoSuchKey", "NotFound"):
            return InputError(f"{uri}: no such object")
        return InputError(f"{uri}: S3 error {code}: {err}")
    return InputError(f"{uri}: {err}")


def fetch(uri: str, endpoint: str | None = None, cache_dir: str | None = None) -> Path:
    """A local path holding the file at ``uri`` (downloaded for s3://).

    Local paths must exist; a missing file is an `InputError`.
    """
    if not is_s3(uri):
        path = Path(uri).expanduser()
        if not path.exists():
            raise InputError(f"{uri}: no such file or directory")
        return path
    bucket, key = split_s3(uri)
    base = Path(cache_dir or tempfile.mkdtemp(prefix="kd-s3-"))
    local = base / hashlib.sha256(uri.encode()).hexdigest()[:16] / Path(key).name
    local.parent.mkdir(parents=True, exist_ok=True)
    client = s3_client(endpoint)
    try:
        client.download_file(bucket, key, str(local))
    except Exception as e:  # botocore raises many types; all become one clear line
        err = _s3_error(uri, e)
        if "no such object" in str(err) and not bucket_exists(client, bucket):
            err = InputError(f"{uri}: bucket does not exist")
        raise err from None
    return local


def bucket_exists(client: object, bucket: str) -> bool:
    """True when ``HeadBucket`` succeeds (False on 404 / 403 / any client error)."""
    try:
        client.head_bucket(Bucket=bucket)  # type: ignore[attr-defined]
        return True
    except Exception:
        return False


def put(local: str | Path, uri: str, endpoint: str | None = None) -> None:
    """Copy a local file to ``uri``: an S3 upload, or an atomic rename on disk."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client(endpoint).upload_file(str(local), bucket, key)
        except Exception as e:
            raise _s3_error(uri, e) from None
        return
    dest = Path(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    tmp.write_bytes(Path(local).read_bytes())
    os.replace(tmp, dest)


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI."""
    if is_s3(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(base).joinpath(*parts))


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
