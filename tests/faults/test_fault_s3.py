"""Fault: S3 returns errors and answers slowly (a fault proxy in front of moto_server)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from kd import storage
from kd.errors import InputError
from tests.faults.s3_proxy import FaultProxy, Rule


@pytest.fixture
def proxy(s3_server: str) -> Iterator[FaultProxy]:
    """A fault proxy in front of the session's moto_server; stopped after the test."""
    p = FaultProxy(s3_server).start()
    yield p
    p.stop()


def _blob(tmp_path: Path, n: int = 200_000) -> tuple[Path, str]:
    data = hashlib.sha256(b"kd").digest() * (n // 32)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def _remote_sha(s3_server: str, bucket: str, key: str) -> str | None:
    """sha256 of the object as moto holds it (read directly, not through the proxy);
    None when no object is visible."""
    s3 = boto3.client("s3", endpoint_url=s3_server)
    try:
        return hashlib.sha256(s3.get_object(Bucket=bucket, Key=key)["Body"].read()).hexdigest()
    except s3.exceptions.NoSuchKey:
        return None


def test_s3_errors_and_slow_answers_are_retried(proxy: FaultProxy, s3_server: str, bucket: str,
                                               tmp_path: Path) -> None:
    """Injected: the first 2 PUTs of the final-weights object get 503 SlowDown, then one
    PUT of another object and one GET are delayed 2 s. Survives: boto3's deliberate retry
    config (standard mode, ``storage.S3_ATTEMPTS`` attempts) writes the object on the 3rd
    attempt, complete with the right sha256; the slow ones complete; a fetch is intact."""
    local, sha = _blob(tmp_path)
    assert storage.s3_client(proxy.url).meta.config.retries == {
        "total_max_attempts": storage.S3_ATTEMPTS, "mode": "standard"}
    proxy.rules.append(Rule("PUT", "/w1/model.safetensors", status=503, times=2))
    storage.put(local, f"s3://{bucket}/w1/model.safetensors", proxy.url)
    assert [s.action for s in proxy.attempts("PUT", "/w1/model.safetensors")] == \
        ["503", "503", "forwarded"]
    assert _remote_sha(s3_server, bucket, "w1/model.safetensors") == sha

    proxy.rules += [Rule("PUT", "/w2/", delay_s=2, times=1), Rule("GET", "/w2/", delay_s=2, times=1)]
    t0 = time.monotonic()
    storage.put(local, f"s3://{bucket}/w2/model.safetensors", proxy.url)
    back = storage.fetch(f"s3://{bucket}/w2/model.safetensors", proxy.url, str(tmp_path / "dl"))
    assert time.monotonic() - t0 >= 4  # both slow answers were waited for, not failed
    assert storage.sha256_file(back) == sha
    assert _remote_sha(s3_server, bucket, "w2/model.safetensors") == sha


def test_s3_write_that_keeps_failing_is_bounded_and_leaves_nothing(
        proxy: FaultProxy, s3_server: str, bucket: str, tmp_path: Path) -> None:
    """Injected: every PUT of one key gets 500 InternalError, through boto3 (final
    weights, `storage.put`) and through pyarrow's S3 filesystem (checkpoints, the teacher
    cache). Survives: each gives up after exactly ``storage.S3_ATTEMPTS`` attempts with
    a clear error naming the key, in bounded time, and no object is visible at that key."""
    local, _ = _blob(tmp_path)
    proxy.rules.append(Rule("PUT", "/bad/", status=500))
    t0 = time.monotonic()
    with pytest.raises(InputError) as e:
        storage.put(local, f"s3://{bucket}/bad/model.safetensors", proxy.url)
    assert f"s3://{bucket}/bad/model.safetensors" in str(e.value) and "InternalError" in str(e.value)
    assert len(proxy.attempts("PUT", "/bad/model.safetensors")) == storage.S3_ATTEMPTS
    assert _remote_sha(s3_server, bucket, "bad/model.safetensors") is None

    fs, root = storage.arrow_fs(f"s3://{bucket}/bad", proxy.url)
    with pytest.raises(OSError) as e2:
        with fs.open_output_stream(f"{root}/cache.parquet") as f:
            f.write(local.read_bytes())
    assert "bad/cache.parquet" in str(e2.value), str(e2.value)
    assert len(proxy.attempts("PUT", "/bad/cache.parquet")) == storage.S3_ATTEMPTS
    assert _remote_sha(s3_server, bucket, "bad/cache.parquet") is None
    assert time.monotonic() - t0 < 60


def _checkpoint(d: Path, epoch: int) -> Path:
    import torch

    from kd.train.checkpoint import checkpoint_state, save_checkpoint

    torch.manual_seed(epoch)
    model, loss = torch.nn.Linear(64, 10), torch.nn.Module()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    d.mkdir(parents=True)
    state, opt_state = checkpoint_state(model, loss, opt)
    save_checkpoint(d, state, loss, opt_state, epoch, [torch.get_rng_state()])
    return d


def test_checkpoint_upload_cut_short_is_never_loaded(proxy: FaultProxy, s3_server: str,
                                                     bucket: str, tmp_path: Path,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    """Injected: a checkpoint folder is uploaded the way Ray Train uploads it
    (``pyarrow.fs.copy_files`` with kdflow's S3 filesystem) while every PUT of its
    ``manifest.json`` gets 500. Found here: ``copy_files`` does not raise, it only prints
    the error (naming the key) and goes on. Survives: the manifest object is absent, so
    the half-written folder is not a checkpoint to kdflow's loader, which loads the
    previous complete one (epoch 1) instead."""
    import pyarrow.fs as pafs

    from kd.train.checkpoint import checkpoint_candidates, load_latest_good

    fs, root = storage.arrow_fs(f"s3://{bucket}/runs/r1", proxy.url)
    local = pafs.LocalFileSystem()
    pafs.copy_files(str(_checkpoint(tmp_path / "e1", 0)), f"{root}/epoch_00001",
                    source_filesystem=local, destination_filesystem=fs)
    proxy.rules.append(Rule("PUT", "epoch_00002/manifest.json", status=500))
    pafs.copy_files(str(_checkpoint(tmp_path / "e2", 1)), f"{root}/epoch_00002",
                    source_filesystem=local, destination_filesystem=fs)
    err = capfd.readouterr().err
    assert "runs/r1/epoch_00002/manifest.json" in err and "INTERNAL_FAILURE" in err, err
    assert len(proxy.attempts("PUT", "epoch_00002/manifest.json")) == storage.S3_ATTEMPTS
    assert _remote_sha(s3_server, bucket, "runs/r1/epoch_00002/manifest.json") is None
    assert _remote_sha(s3_server, bucket, "runs/r1/epoch_00002/model.safetensors") is not None
    names = [c.path.rsplit("/", 1)[1] for c in checkpoint_candidates(fs, root)]
    assert names == ["epoch_00002", "epoch_00001"]  # the cut-short folder is listed...
    state = load_latest_good(checkpoint_candidates(fs, root), verbose=False)
    assert state is not None and state["path"].endswith("epoch_00001")  # ...but never loaded
    assert state["state"]["epoch"] == 0
