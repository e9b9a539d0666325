"""S3 server-side encryption (``storage.sse``) is passed on every write kdflow makes,
checked against the test S3 server: after a real run (checkpoints uploaded by a Ray
Train worker, final weights) and a teacher cache (parquet shards written by Ray Data,
its manifest), ``HeadObject`` on every key shows the configured encryption."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONFIGS

from kd import sse, storage
from kd.config import load_experiment
from kd.errors import InputError

KMS_KEY = "arn:aws:kms:us-east-1:123456789012:key/kdflow-test-key"


def _heads(s3_server: str, bucket: str) -> dict[str, dict]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {k: s3.head_object(Bucket=bucket, Key=k) for k in keys}


@pytest.mark.parametrize(("doc", "field"), [
    ({"sse": "aws:kms"}, "sse_kms_key_id: required when sse is aws:kms"),
    ({"sse": "AES128"}, "storage.sse: Input should be 'AES256' or 'aws:kms'"),
    ({"sse": "AES256", "sse_kms_key_id": "k"}, "sse_kms_key_id is only used with sse: aws:kms"),
])
def test_sse_config_validated(tmp_path: Path, doc: dict, field: str) -> None:
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"name": "x", "storage": {"path": "s3://b/p", **doc}}))
    with pytest.raises(InputError, match=field.replace("(", r"\(")) as e:
        load_experiment(cfg)
    assert str(e.value).startswith(f"{cfg}: storage")


def test_every_write_path_carries_sse(s3_server: str, bucket: str, tmp_path: Path) -> None:
    import pyarrow.fs as pafs

    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 1000)
    args = sse.extra_args("AES256")
    storage.put(src, f"s3://{bucket}/plain/f.bin")  # control: moto does not encrypt by default
    storage.put(src, f"s3://{bucket}/put/f.bin", sse=args)
    fs, root = storage.arrow_fs(f"s3://{bucket}/arrow", sse=args)
    with fs.open_output_stream(f"{root}/a/one.bin") as f:
        f.write(b"y" * 5000)
    pafs.copy_files(str(tmp_path), f"{root}/tree", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)  # how Ray Train uploads a checkpoint folder
    fs.copy_file(f"{root}/a/one.bin", f"{root}/a/two.bin")
    fs.move(f"{root}/a/two.bin", f"{root}/b/three.bin")
    heads = _heads(s3_server, bucket)
    assert heads.pop("plain/f.bin").get("ServerSideEncryption") is None
    assert sorted(k for k in heads if not k.endswith("/")) == [
        "arrow/a/one.bin", "arrow/b/three.bin", "arrow/tree/f.bin", "put/f.bin"]
    assert {k: h.get("ServerSideEncryption") for k, h in heads.items()} == dict.fromkeys(
        heads, "AES256")
    with fs.open_input_stream(f"{root}/a/one.bin") as f:  # reads are plain pyarrow
        assert f.read() == b"y" * 5000


def test_run_and_cache_writes_all_kms_encrypted(s3_server: str, bucket: str, workdir: Path,
                                                ray_session: None) -> None:
    from kd.data import load_splits
    from kd.train.cache import ensure_cache
    from kd.train.run import train_run

    common = [f"storage.path=s3://{bucket}/runs", "storage.sse=aws:kms",
              f"storage.sse_kms_key_id={KMS_KEY}", f"tracking.uri=sqlite:///{workdir}/m.db"]
    exp = load_experiment(CONFIGS / "digits-teacher.yaml", [
        *common, "scaling.num_workers=1", "trainer.epochs=2", "checkpoint.every_epochs=1"])
    out = train_run(exp, "teacher")  # a Ray Train worker uploads the checkpoints
    kd_exp = load_experiment(CONFIGS / "digits-kd.yaml", [
        *common, f"teacher.weights={out.weights}", "teacher.cache=true",
        "scaling.num_workers=0"])
    ensure_cache(kd_exp, load_splits(kd_exp.data))  # Ray Data writes the shards
    heads = _heads(s3_server, bucket)
    assert any("/epoch_" in k for k in heads), sorted(heads)  # checkpoints
    assert any(k.endswith(".parquet") for k in heads), sorted(heads)  # cache shards
    assert any(k.endswith("/_SUCCESS") for k in heads), sorted(heads)  # cache manifest
    assert out.weights.removeprefix(f"s3://{bucket}/") in heads, sorted(heads)  # final weights
    plain = {k: (h.get("ServerSideEncryption"), h.get("SSEKMSKeyId")) for k, h in heads.items()
             if (h.get("ServerSideEncryption"), h.get("SSEKMSKeyId")) != ("aws:kms", KMS_KEY)}
    assert not plain, plain


def test_sweep_state_is_encrypted_too(s3_server: str, bucket: str, workdir: Path,
                                      digits_teacher: str, ray_session: None) -> None:
    """Ray Tune writes its own state (tuner.pkl, experiment and trial state) under
    ``<storage.path>/tune/<sweep>/``: with ``storage.sse`` it goes through kdflow's
    encrypting filesystem like every other write (before: plain objects)."""
    from kd.tune.sweep import run_sweep

    exp = load_experiment(CONFIGS / "digits-tune.yaml", [
        f"teacher.weights={digits_teacher}", f"storage.path=s3://{bucket}/runs",
        "storage.sse=aws:kms", f"storage.sse_kms_key_id={KMS_KEY}",
        f"tracking.uri=sqlite:///{workdir}/m.db", "tune.num_samples=1",
        "tune.max_concurrent_trials=1", "trainer.epochs=1", "tune.scheduler={name: none}",
        "tune.space={optim.lr: 'choice([0.05])'}", "tune.constraints={}",
        "tune.resources.cpus_per_worker=0.25"])
    run_sweep(exp, quiet=True)
    heads = _heads(s3_server, bucket)
    tune_keys = [k for k in heads if k.startswith("runs/tune/") and "/" in k[len("runs/tune/"):]]
    assert any(k.endswith("tuner.pkl") for k in tune_keys), sorted(heads)
    plain = {k: heads[k].get("ServerSideEncryption") for k in tune_keys
             if (heads[k].get("ServerSideEncryption"), heads[k].get("SSEKMSKeyId")) != ("aws:kms", KMS_KEY)}
    assert not plain, plain
