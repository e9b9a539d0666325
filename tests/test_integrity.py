"""Every artifact kdflow writes carries a sha256 checked on read: corrupt or truncated
files (checkpoint, teacher cache manifest and shard, model weights, retrain state, any
file `storage.put` wrote, locally or on S3) are refused with the file's name; a
checkpoint whose train state pickles code is refused without running it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS
from torch import nn

from kd import cli, storage
from kd.errors import InputError
from kd.integrity import IntegrityError, sidecar
from kd.retrain.state import State
from kd.train.checkpoint import (
    CKPT_MANIFEST,
    CKPT_STATE,
    load_latest_good,
    read_checkpoint,
    save_checkpoint,
)

MARKER_NAME = "pwned.txt"


def _flip(path: Path, at: int | None = None) -> None:
    """Flip one bit of one byte (the middle one by default): same size, other bytes."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _cli(argv: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capfd.readouterr()
    code = cli.run(argv)
    err = capfd.readouterr().err
    return code, err


# -- storage.put / fetch: the sidecar (local) and the S3 metadata -------------------------

def test_put_fetch_local_refuses_corrupt_and_truncated(tmp_path: Path) -> None:
    src = tmp_path / "src.json"
    src.write_text(json.dumps({"a": list(range(100))}))
    dest = tmp_path / "store" / "doc.json"
    sha = storage.put(src, str(dest))
    assert sidecar(dest).read_text().split()[0] == sha
    assert storage.fetch(str(dest)) == dest  # intact: read
    _flip(dest)
    with pytest.raises(IntegrityError, match=rf"^{dest}: sha256 mismatch"):
        storage.fetch(str(dest))
    storage.put(src, str(dest))
    _truncate(dest)
    with pytest.raises(IntegrityError, match=rf"^{dest}: sha256 mismatch"):
        storage.fetch(str(dest))


class _Killed(BaseException):
    """Stands for a SIGKILL at one point of `storage.put`."""


@pytest.mark.parametrize("at", ["file swap", "final sidecar"])
def test_a_put_killed_midway_leaves_a_pair_that_verifies(tmp_path: Path, at: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A local file and its sidecar cannot be replaced together. A process killed after
    the file's rename but before the sidecar's (a `kd retrain` SIGKILLed in CI) left a
    state.json that `fetch` refused as corrupt, so the resume stopped. While the file is
    swapped its sidecar accepts the old content's hash too: killed before the swap the
    old file verifies, after it the new one; damage is still refused."""
    import os

    from kd import integrity

    dest = tmp_path / "store" / "state.json"
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text('{"stage": 1}')
    new.write_text('{"stage": 2}')
    storage.put(old, str(dest))
    real_replace, real_record = os.replace, integrity.record

    def replace(src: object, dst: object) -> None:
        if at == "file swap" and Path(str(dst)) == dest:
            raise _Killed
        real_replace(src, dst)

    def record(path: object, sha: object = None, also: tuple[str, ...] = ()) -> str:
        if at == "final sidecar" and not also:
            raise _Killed
        return real_record(path, sha, also)

    monkeypatch.setattr(storage.os, "replace", replace)
    monkeypatch.setattr(integrity, "record", record)
    with pytest.raises(_Killed):
        storage.put(new, str(dest))
    monkeypatch.undo()
    want = old if at == "file swap" else new
    assert storage.fetch(str(dest)).read_text() == want.read_text()
    _flip(dest)
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        storage.fetch(str(dest))
    storage.put(new, str(dest))  # a whole put leaves one hash again
    assert len(sidecar(dest).read_text().splitlines()) == 1 and storage.fetch(str(dest))


def test_put_fetch_s3_refuses_a_changed_object(bucket: str, s3_server: str,
                                               tmp_path: Path) -> None:
    import boto3

    src = tmp_path / "w.bin"
    src.write_bytes(bytes(range(256)) * 8)
    uri = f"s3://{bucket}/runs/w.bin"
    sha = storage.put(src, uri)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    head = s3.head_object(Bucket=bucket, Key="runs/w.bin")
    assert head["Metadata"]["sha256"] == sha
    assert storage.fetch(uri, cache_dir=str(tmp_path / "c1")).read_bytes() == src.read_bytes()
    # bit rot / tampering that kept the metadata: refused, named
    body = bytearray(src.read_bytes())
    body[7] ^= 0xFF
    s3.put_object(Bucket=bucket, Key="runs/w.bin", Body=bytes(body), Metadata=head["Metadata"])
    with pytest.raises(IntegrityError, match=rf"^{uri}: sha256 mismatch"):
        storage.fetch(uri, cache_dir=str(tmp_path / "c2"))


# -- retrain state --------------------------------------------------------------------------

def _saved_state(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "pipe"
    st = State.load(str(folder), None, {"stages": {}})
    st.mark("train", "done", out={"run_id": "abc"}, seconds=1.5)
    return folder, folder / "state.json"


def test_retrain_state_corrupt_byte_refused(tmp_path: Path) -> None:
    folder, path = _saved_state(tmp_path)
    assert State.load(str(folder), None, {}).done("train")
    # a one-byte change that still parses ("done" -> "dône" would not; flip a digit)
    text = path.read_text()
    path.write_text(text.replace('"seconds": 1.5', '"seconds": 1.7'))
    with pytest.raises(IntegrityError, match=rf"^{path}: sha256 mismatch"):
        State.load(str(folder), None, {})


def test_retrain_state_truncated_refused_not_restarted(tmp_path: Path) -> None:
    folder, path = _saved_state(tmp_path)
    _truncate(path)
    sidecar(path).unlink()  # even without its hash: a torn state file is not "no state"
    with pytest.raises(InputError, match=rf"^{path}: not a readable retrain state file"):
        State.load(str(folder), None, {"stages": {}})


# -- checkpoints ------------------------------------------------------------------------------

def _checkpoint(d: Path) -> Path:
    d.mkdir(parents=True)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    save_checkpoint(d, state, nn.Identity(), opt.state_dict(), 0, [torch.get_rng_state()])
    return d


class _Ckpt:
    """What `load_latest_good` takes: a ``path`` and ``as_directory()``."""

    def __init__(self, d: Path) -> None:
        self.path = str(d)

    def as_directory(self):  # noqa: ANN201 - a context manager
        import contextlib

        return contextlib.nullcontext(self.path)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
@pytest.mark.parametrize("name", ["model.safetensors", CKPT_STATE])
def test_checkpoint_damaged_file_named(tmp_path: Path, damage: str, name: str) -> None:
    d = _checkpoint(tmp_path / "epoch_00001")
    assert read_checkpoint(d)["state"]["epoch"] == 0
    (_flip if damage == "flip" else _truncate)(d / name)
    with pytest.raises(IntegrityError, match=rf"^{d}/{name}: (sha256|size) mismatch"):
        read_checkpoint(d)
    # the resume path: the only checkpoint is damaged -> an error naming the file
    with pytest.raises(RuntimeError, match=rf"{d}/{name}: (sha256|size) mismatch"):
        load_latest_good([_Ckpt(d)], verbose=False)


def test_checkpoint_corrupt_manifest_named(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path / "epoch_00001")
    _truncate(d / CKPT_MANIFEST)
    with pytest.raises(InputError, match=rf"^{d}/{CKPT_MANIFEST}: not a checkpoint manifest"):
        read_checkpoint(d)


class _Payload:
    """Unpickling this would write the marker file (a stand-in for any code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.write_text, (self.marker, "code ran"))


def test_pickle_bearing_checkpoint_refused_without_running_code(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path / "epoch_00001")
    marker = tmp_path / MARKER_NAME
    torch.save({"optimizer": {}, "epoch": 0, "evil": _Payload(marker)}, d / CKPT_STATE)
    # the attacker also rewrote the manifest, so the hashes match: weights_only must stop it
    doc = json.loads((d / CKPT_MANIFEST).read_text())
    doc["files"][CKPT_STATE] = {"size": (d / CKPT_STATE).stat().st_size,
                                "sha256": storage.sha256_file(d / CKPT_STATE)}
    (d / CKPT_MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(InputError, match=rf"^{d}/{CKPT_STATE}: refused: not a plain train state"):
        read_checkpoint(d)
    assert not marker.exists()


def test_pickle_bearing_weights_refused_without_running_code(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / MARKER_NAME
    bad = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2), "evil": _Payload(marker)}, bad)
    code, err = _cli(["evaluate", str(bad)], capfd)
    assert code == 2 and err.startswith(f"kd: error: {bad}: refused to load"), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


# -- model weights (a run's final weights: safetensors + the sidecar storage.put wrote) -----

@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_weights_damaged_refused_by_cli(tmp_path: Path, digits_teacher: str, damage: str,
                                        capfd: pytest.CaptureFixture[str]) -> None:
    src = Path(digits_teacher)
    assert sidecar(src).is_file()  # the run recorded the final weights' hash
    w = tmp_path / "model.safetensors"
    shutil.copy(src, w)
    shutil.copy(sidecar(src), sidecar(w))
    (_flip(w, at=w.stat().st_size - 3) if damage == "flip" else _truncate(w))
    code, err = _cli(["evaluate", str(w)], capfd)
    assert code == 2, err
    assert err.startswith(f"kd: error: {w}: sha256 mismatch"), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    # without the sidecar a truncated safetensors file is still refused by its header
    if damage == "truncate":
        sidecar(w).unlink()
        code, err = _cli(["evaluate", str(w)], capfd)
        assert code == 2 and err.startswith(f"kd: error: {w}: not a readable safetensors"), err


# -- the teacher cache: manifest and shards -------------------------------------------------

def _cache(workdir: Path, teacher: str):  # noqa: ANN202 - a TeacherCache
    from kd.config import load_experiment
    from kd.data import load_splits
    from kd.train.cache import ensure_cache

    exp = load_experiment(CONFIGS / "digits-kd.yaml", [
        f"teacher.weights={teacher}", "teacher.cache=true", f"storage.path={workdir / 'runs'}",
        "scaling.num_workers=0"])
    return exp, ensure_cache(exp, load_splits(exp.data))


def test_cache_shard_and_manifest_damage_named(workdir: Path, digits_teacher: str,
                                               capfd: pytest.CaptureFixture[str]) -> None:
    from kd.train.cache import MARKER, cache_dataset

    exp, cache = _cache(workdir, digits_teacher)
    files = cache.manifest["files"]
    assert files and all(len(m["sha256"]) == 64 for m in files.values())
    assert cache_dataset(cache).count() == cache.manifest["rows"]  # intact: read
    shard = sorted(files)[0]
    path = Path(cache.data_uri) / shard
    original = path.read_bytes()
    _flip(path)
    with pytest.raises(IntegrityError, match=rf"^{cache.data_uri}/{shard}: sha256 mismatch"):
        cache_dataset(cache)
    _truncate(path)
    with pytest.raises(IntegrityError, match=rf"^{cache.data_uri}/{shard}: size mismatch"):
        cache_dataset(cache)
    path.write_bytes(original)
    cache_dataset(cache)
    # the manifest itself, truncated: kd cache-teacher refuses it by name (exit 2)
    marker = Path(cache.uri) / MARKER
    _truncate(marker)
    code, err = _cli(["cache-teacher", str(CONFIGS / "digits-kd.yaml"),
                      f"teacher.weights={digits_teacher}", "teacher.cache=true",
                      f"storage.path={workdir / 'runs'}"], capfd)
    assert code == 2, err
    assert err.startswith(f"kd: error: {marker}: teacher cache manifest unreadable"), err


def test_a_put_replaces_a_file_whose_sidecar_is_damaged(tmp_path: Path) -> None:
    """A damaged sidecar makes `fetch` refuse the file (it names the sidecar); a new `put`
    over it writes the file and a sound sidecar again instead of failing on the old one."""
    dest = tmp_path / "store" / "state.json"
    src = tmp_path / "state.json"
    src.write_text('{"stage": 1}')
    storage.put(src, str(dest))
    sidecar(dest).write_text("not a hash\n")
    with pytest.raises(InputError, match="not a sha256 sidecar"):
        storage.fetch(str(dest))
    src.write_text('{"stage": 2}')
    storage.put(src, str(dest))
    assert storage.fetch(str(dest)).read_text() == '{"stage": 2}'
