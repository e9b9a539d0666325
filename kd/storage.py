"""Local and S3 paths: fetch a file, write a file atomically, join URIs.

S3 access uses the standard AWS credential chain, and keeps no frozen copy of what
it resolves, so short-lived credentials (STS, IRSA web identity, instance or container
roles, a ``credential_process``) refresh during a long run:

- boto3 clients are built lazily, one per process and credential source
  (`s3_client`); botocore refreshes their credentials before they expire.
- pyarrow ``S3FileSystem`` objects (Ray Train checkpoints, the teacher cache) get no
  keys when the chain's credentials are refreshable: pyarrow (the AWS C++ SDK's default
  chain: environment, config/credentials files incl. ``credential_process``, web
  identity, SSO, container and instance roles) resolves and refreshes them in each
  process, and a filesystem pickled into a Ray worker re-resolves them there. Only
  static keys (environment variables or a credentials file, which cannot refresh) are
  passed explicitly, so workers without the driver's environment still reach the store.

An S3-compatible endpoint comes from ``storage.endpoint_url`` or ``AWS_ENDPOINT_URL_S3``
/ ``AWS_ENDPOINT_URL``. Every failure is an `InputError` naming the URI.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kd import integrity
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


# The environment variables that choose where the AWS chain finds credentials.
CHAIN_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
             "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
             "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
             "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
# botocore's names for credentials that cannot refresh (``Credentials.method``).
STATIC_METHODS = frozenset({"env", "shared-credentials-file", "config-file", "explicit",
                            "boto-config"})
_CLIENTS: dict[tuple, Any] = {}
# Retries of S3 requests, deliberately bounded (tests/faults/test_fault_s3.py): botocore's
# "standard" mode and the AWS C++ SDK's standard strategy (pyarrow) both retry throttling,
# 5xx and connection errors with capped, jittered exponential backoff, up to this many
# attempts in all; then the error names the object's URI.
S3_ATTEMPTS = 3


def _chain_key(kind: str, endpoint: str | None) -> tuple:
    """Cache key of a client: process, kind, endpoint and the chain's environment (a
    forked worker or a changed AWS environment gets a client of its own)."""
    return (os.getpid(), kind, endpoint, tuple(os.environ.get(k) for k in CHAIN_ENV))


def s3_client(endpoint: str | None = None, attempts: int = S3_ATTEMPTS):  # noqa: ANN201 - boto3 type is dynamic
    """A boto3 S3 client with bounded retries and connect timeouts, built once per process
    and credential source. Its credentials come from a session of its own, which refreshes
    expiring ones (botocore's ``RefreshableCredentials``); nothing is frozen here."""
    import boto3
    from botocore.config import Config

    ep = endpoint_url(endpoint)
    key = _chain_key(f"s3-{attempts}", ep)
    if key not in _CLIENTS:
        # total_max_attempts counts the first try; botocore's max_attempts counts retries
        # only (max_attempts=1 was 2 requests, so the preflight's "no retries" retried).
        cfg = Config(retries={"total_max_attempts": attempts, "mode": "standard"},
                     connect_timeout=5 if attempts > 1 else 3,
                     read_timeout=30 if attempts > 1 else 10)
        _CLIENTS[key] = boto3.session.Session().client("s3", endpoint_url=ep, config=cfg)
    return _CLIENTS[key]


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

    Local paths must exist; a missing file is an `InputError`. A file that `put` wrote
    is checked against the sha256 recorded then (S3 metadata ``sha256``, or the local
    sidecar ``<file>.sha256``): a mismatch is a `kd.integrity.IntegrityError` naming it.
    """
    if not is_s3(uri):
        path = Path(uri).expanduser()
        if not path.exists():
            raise InputError(f"{uri}: no such file or directory")
        if path.is_file():
            integrity.verify_sidecar(path, uri)
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
    try:
        recorded = client.head_object(Bucket=bucket, Key=key).get("Metadata", {}).get(
            integrity.META_KEY)
    except Exception as e:
        raise _s3_error(uri, e) from None
    integrity.verify_file(local, recorded, uri)
    return local


def bucket_exists(client: object, bucket: str) -> bool:
    """True when ``HeadBucket`` succeeds (False on 404 / 403 / any client error)."""
    try:
        client.head_bucket(Bucket=bucket)  # type: ignore[attr-defined]
        return True
    except Exception:
        return False


def put(local: str | Path, uri: str, endpoint: str | None = None,
        sse: dict[str, str] | None = None) -> str:
    """Copy a local file to ``uri`` and record its sha256 (returned): an S3 upload with
    the hash as user metadata ``sha256`` and the server-side encryption headers ``sse``
    (`kd.sse.of(exp.storage)`), or an atomic rename on disk with a sidecar
    ``<file>.sha256`` (`kd.integrity.record`). `fetch` checks the hash."""
    sha = integrity.sha256_file(local)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client(endpoint).upload_file(str(local), bucket, key, ExtraArgs={
                **(sse or {}), "Metadata": {integrity.META_KEY: sha}})
        except Exception as e:
            raise _s3_error(uri, e) from None
        return sha
    dest = Path(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    tmp.write_bytes(Path(local).read_bytes())
    # The file and its sidecar cannot be swapped together: while the file is replaced the
    # sidecar accepts the old content's hashes too, so a process killed in between leaves
    # a pair that verifies (a retrain state.json once did not: its resume was refused).
    # A damaged sidecar is not kept: the file it described is refused anyway.
    old = _old_hashes(dest)
    if old and sha not in old:
        integrity.record(dest, sha, also=tuple(old))
    os.replace(tmp, dest)
    return integrity.record(dest, sha)


def _old_hashes(dest: Path) -> list[str] | None:
    """The hashes ``dest``'s sidecar accepts (`kd.integrity.accepted`); None when there is
    no file, no sidecar or a damaged one (a put replaces both)."""
    if not dest.is_file():
        return None
    try:
        return integrity.accepted(dest)
    except InputError:
        return None


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI."""
    if is_s3(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(base).joinpath(*parts))


sha256_file = integrity.sha256_file  # re-exported: hex sha256 of a local file


def _credentials() -> Any:
    """The AWS chain's credentials object (botocore ``Credentials`` or its refreshable
    subclass), or None when the chain finds none. Nothing is frozen."""
    import boto3

    return boto3.session.Session().get_credentials()


def static_credentials() -> tuple[str, str, str | None] | None:
    """``(access key, secret key, session token)`` when the chain's credentials are static
    (environment variables, a credentials/config file with keys): they cannot refresh, so
    handing them on loses nothing. None for refreshable credentials (STS, web identity,
    ``credential_process``, instance or container role) or none at all."""
    from botocore.credentials import RefreshableCredentials

    creds = _credentials()
    if creds is None or isinstance(creds, RefreshableCredentials) \
            or creds.method not in STATIC_METHODS:
        return None
    f = creds.get_frozen_credentials()
    return f.access_key, f.secret_key, f.token


def arrow_fs(uri: str, endpoint: str | None = None,
             sse: dict[str, str] | None = None) -> tuple[Any, str]:
    """``(pyarrow filesystem, path inside it)`` for ``uri``: a local filesystem and
    the absolute path, or an ``S3FileSystem`` and ``bucket/prefix``.

    The S3 filesystem carries the endpoint override (``storage.endpoint_url`` /
    ``AWS_ENDPOINT_URL_S3``; scheme and host:port split as pyarrow wants them). It
    carries keys only when the chain's are static (`static_credentials`); otherwise
    pyarrow's own chain resolves and refreshes them in every process that uses it, a
    Ray worker that unpickled it included (see the module docstring). With ``sse``
    (`kd.sse.of(exp.storage)`) every write through it is server-side encrypted
    (`kd.sse.wrap`); give it wherever the filesystem writes.
    """
    import pyarrow.fs as pafs

    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    bucket, key = split_s3(uri)
    kwargs: dict[str, Any] = {
        "region": (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                   or "us-east-1"),
        "connect_timeout": 5, "request_timeout": 30,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS),
    }
    ep = endpoint_url(endpoint)
    if ep:
        parsed = urlparse(ep if "://" in ep else f"https://{ep}")
        kwargs.update(endpoint_override=parsed.netloc + parsed.path.rstrip("/"),
                      scheme=parsed.scheme)
    creds = static_credentials()
    if creds is not None:
        kwargs.update(access_key=creds[0], secret_key=creds[1], session_token=creds[2])
    from kd.sse import wrap

    fs = wrap(pafs.S3FileSystem(**kwargs), sse or {}, ep, creds)
    return fs, "/".join(p for p in (bucket, key.strip("/")) if p)


def check_writable(uri: str, endpoint: str | None = None, what: str | None = None) -> None:
    """Preflight for ``storage.path``: before any worker starts, prove the location
    exists and accepts writes. S3: credentials resolve, the endpoint answers, the
    bucket exists (one ``HeadBucket``, no retries, so a dead endpoint fails in
    seconds). Local: the folder can be created. Any failure is one `InputError`
    naming ``what`` (default ``storage.path URI``)."""
    where = what or f"storage.path {uri}"
    if not is_s3(uri):
        try:
            Path(uri).expanduser().mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"{where}: cannot create the folder ({e.strerror})") from None
        if not os.access(Path(uri).expanduser(), os.W_OK):
            raise InputError(f"{where}: folder is not writable")
        return
    bucket, _ = split_s3(uri)
    if not bucket:
        raise InputError(f"{where}: expected s3://bucket/prefix")
    if _credentials() is None:
        raise InputError(f"{where}: no AWS credentials found (set AWS_ACCESS_KEY_ID/"
                         "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role)")
    from botocore.exceptions import ClientError

    ep = endpoint_url(endpoint)
    try:
        s3_client(ep, attempts=1).head_bucket(Bucket=bucket)
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise InputError(f"{where}: bucket {bucket!r} does not exist"
                             f"{f' at {ep}' if ep else ''}") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise InputError(f"{where}: access to bucket {bucket!r} denied ({code}); "
                             "check the AWS credentials") from None
        raise InputError(f"{where}: S3 error {code}") from None
    except Exception as e:  # connection refused, DNS, timeouts: botocore has many types
        raise InputError(f"{where}: S3 endpoint {ep or 'AWS default'} unreachable "
                         f"({type(e).__name__})") from None
