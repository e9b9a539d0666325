"""Credentials that refresh, against an S3 server that enforces auth.

A moto_server of its own (not the shared ``s3_server``) runs with
``INITIAL_NO_AUTH_ACTION_COUNT=3``: the first three requests bootstrap an IAM user, its
policy and its first access key; every later request must be signed by a live key.
Credentials come from a ``credential_process`` in an AWS config file, with an
``Expiration`` a few seconds ahead (like STS / IRSA, but short), so botocore and the AWS
C++ SDK under pyarrow fetch them again once they expire. Rotation: a new key is created,
the process serves it, the old credentials expire, the old key is deleted. A client that
froze the old key is refused from then on; kdflow's storage operations keep working.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import CONFIGS, REPO, free_port, wait_for_port

from kd import storage

EXPIRY_S = 2  # the credential process's Expiration: now + this
CHAIN_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
              "AWS_DEFAULT_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")
POLICY = {"Version": "2012-10-17",
          "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


@dataclass
class AuthS3:
    """The auth-enforcing server, the key file the credential process serves, the env."""

    endpoint: str
    key_file: Path
    env: dict[str, str]
    key: dict[str, str]

    def serve(self, key: dict[str, str]) -> None:
        tmp = self.key_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}))
        os.replace(tmp, self.key_file)
        self.key = key

    def rotate(self) -> str:
        """New key served, old credentials left to expire, old key deleted; the old id."""
        import boto3

        iam = boto3.session.Session().client("iam", endpoint_url=self.endpoint)
        old = self.key["AccessKeyId"]
        self.serve(iam.create_access_key(UserName="kd")["AccessKey"])
        time.sleep(EXPIRY_S + 1.5)  # every holder of the old credentials sees them expire
        iam.delete_access_key(UserName="kd", AccessKeyId=old)
        return old


def _process_script(key_file: Path, dest: Path) -> Path:
    """A ``credential_process``: the served key with an Expiration ``EXPIRY_S`` ahead."""
    dest.write_text(f"""#!{sys.executable}
import json, time
k = json.load(open({str(key_file)!r}))
exp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + {EXPIRY_S}))
print(json.dumps({{"Version": 1, "AccessKeyId": k["id"], "SecretAccessKey": k["secret"],
                  "Expiration": exp}}))
""")
    dest.chmod(0o755)
    return dest


@pytest.fixture
def auth_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[AuthS3]:
    """An auth-enforcing moto_server and this process's AWS chain pointed at a
    ``credential_process`` (no key in the environment)."""
    import boto3

    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    with open(tmp_path / "moto.log", "w") as out:
        proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port)
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="kd")
        iam.put_user_policy(UserName="kd", PolicyName="all", PolicyDocument=json.dumps(POLICY))
        key = iam.create_access_key(UserName="kd")["AccessKey"]
        script = _process_script(tmp_path / "key.json", tmp_path / "credential-process")
        (tmp_path / "aws-config").write_text(
            f"[default]\ncredential_process = {script}\nregion = us-east-1\n")
        for var in CHAIN_VARS:
            monkeypatch.delenv(var, raising=False)
        aws = {"AWS_CONFIG_FILE": str(tmp_path / "aws-config"),
               "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint}
        for k, v in aws.items():
            monkeypatch.setenv(k, v)
        s3 = AuthS3(endpoint, tmp_path / "key.json", aws, key)
        s3.serve(key)
        yield s3
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _frozen_client(endpoint: str, key_id: str, secret: str):  # noqa: ANN202
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=key_id, aws_secret_access_key=secret)


def test_storage_keeps_working_across_rotation(auth_s3: AuthS3, tmp_path: Path) -> None:
    from botocore.exceptions import ClientError

    assert storage.static_credentials() is None  # refreshable: nothing to hand on
    with pytest.raises(ClientError, match="InvalidAccessKeyId"):  # the server checks keys
        _frozen_client(auth_s3.endpoint, "AKIANOTAKEY", "x").list_buckets()
    storage.s3_client().create_bucket(Bucket="kd-rotate")
    src = tmp_path / "a.bin"
    src.write_bytes(b"before")
    storage.put(src, "s3://kd-rotate/a.bin")
    fs, path = storage.arrow_fs("s3://kd-rotate/ckpt")
    with fs.open_output_stream(f"{path}/one") as f:
        f.write(b"1")
    blob = pickle.dumps(fs)  # what Ray pickles into a worker
    assert auth_s3.key["SecretAccessKey"].encode() not in blob
    old, old_secret = auth_s3.key["AccessKeyId"], auth_s3.key["SecretAccessKey"]

    assert auth_s3.rotate() == old
    with pytest.raises(ClientError, match="InvalidAccessKeyId"):  # a frozen copy now fails
        _frozen_client(auth_s3.endpoint, old, old_secret).list_buckets()
    src.write_bytes(b"after")
    storage.put(src, "s3://kd-rotate/a.bin")
    assert storage.fetch("s3://kd-rotate/a.bin").read_bytes() == b"after"
    storage.check_writable("s3://kd-rotate/x")
    with fs.open_output_stream(f"{path}/two") as f:  # the same filesystem object
        f.write(b"2")
    assert fs.open_input_file(f"{path}/one").read() == b"1"
    # a fresh process (like a Ray worker) unpickles the filesystem and resolves its own
    (tmp_path / "fs.pkl").write_bytes(blob)
    child = ("import pickle, sys; fs = pickle.load(open(sys.argv[1], 'rb'))\n"
             "with fs.open_output_stream(sys.argv[2]) as f: f.write(b'3')\n"
             "print(fs.open_input_file(sys.argv[2]).read().decode(), flush=True)\n"
             "import pyarrow.fs; del fs; pyarrow.fs.finalize_s3()  # else a crash at exit")
    out = subprocess.run([sys.executable, "-c", child, str(tmp_path / "fs.pkl"), f"{path}/three"],
                         capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert out.returncode == 0 and out.stdout.strip() == "3", out.stderr[-2000:]


@pytest.mark.slow
def test_ray_train_run_survives_rotation(auth_s3: AuthS3, tmp_path: Path) -> None:
    """A real `kd teacher` (one Ray Train worker, checkpoints every epoch on the auth S3)
    whose key is rotated after its first checkpoint: it finishes, and writes checkpoints
    and its final weights with the new key. (With the credentials frozen into the
    filesystem, as before, the run fails: INVALID_ACCESS_KEY_ID.)"""
    storage.s3_client().create_bucket(Bucket="kd-train")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *CHAIN_VARS)}
    env.update({**auth_s3.env, "PYTHONPATH": str(REPO)})
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "kd.cli", "teacher", str(CONFIGS / "digits-teacher.yaml"),
           "trainer.epochs=20", "trainer.batch_size=8", "checkpoint.every_epochs=1",
           "checkpoint.keep=20",
           "storage.path=s3://kd-train/runs", "teacher.args={channels: [32, 64]}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    s3 = storage.s3_client()
    rotated_at = None
    deadline = time.time() + 400
    while proc.poll() is None and time.time() < deadline:
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="kd-train").get("Contents", [])]
        if any("/epoch_" in k for k in keys):  # kdflow names checkpoints epoch_NNNNN
            auth_s3.rotate()
            rotated_at = time.time()
            break
        time.sleep(0.2)
    rc = proc.wait(timeout=max(10, deadline - time.time()))
    reader.join(timeout=10)
    log = "".join(lines)
    assert rc == 0, log[-4000:]
    assert rotated_at is not None, "the run ended before its first checkpoint showed"
    objs = s3.list_objects_v2(Bucket="kd-train")["Contents"]
    after = [o["Key"] for o in objs if o["LastModified"].timestamp() >= int(rotated_at) + 1]
    assert "runs/digits-teacher/model.safetensors" in after, log[-4000:]
    # Ray Train's worker kept writing checkpoints under the new key (S3 times are seconds)
    ckpts = {k.split("/")[2] for k in after if "/epoch_" in k}
    when = sorted((o["LastModified"].timestamp() - rotated_at, o["Key"]) for o in objs)
    assert len(ckpts) >= 3, (when[-40:], log[-3000:])
