"""Fault: the disk fills while a checkpoint is written (a small tmpfs)."""

from __future__ import annotations

import errno
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CONFIGS


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted under tmp_path (needs root / CAP_SYS_ADMIN, as on CI);
    unmounted after the test."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip()}): needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(disk: Path) -> None:
    """Write a file until the filesystem says ENOSPC."""
    with open(disk / f"filler-{uuid.uuid4().hex[:6]}", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


@pytest.mark.slow
def test_disk_full_while_checkpointing(ray_session: None, workdir: Path, small_disk: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Injected: the checkpoint disk (a 4 MiB tmpfs holding the run's checkpoint folders)
    is filled to ENOSPC after epoch 1's checkpoint is written, just before epoch 2's.
    Survives: the run stops with one clear error naming the checkpoint file it could not
    write; the half-written folder is removed; epoch 1's checkpoint is intact and loads
    (manifest and sha256 checked) with its epoch."""
    import kd.train.loop as loop
    from kd.config import load_experiment
    from kd.errors import one_line
    from kd.train.checkpoint import CKPT_MANIFEST, read_checkpoint
    from kd.train.run import train_run

    # num_workers 0: Ray's in-process mode keeps each checkpoint in its kd-ckpt-* folder
    # (tempfile's directory): point that at the small disk.
    monkeypatch.setattr(tempfile, "tempdir", str(small_disk))
    real_check = loop.check_finite

    def check_then_fill(metrics: dict[str, float], epoch: int, exp: object) -> None:
        real_check(metrics, epoch, exp)
        if epoch == 2:  # epoch 1's checkpoint is on the disk: fill it before epoch 2's
            _fill(small_disk)

    monkeypatch.setattr(loop, "check_finite", check_then_fill)
    exp = load_experiment(CONFIGS / "digits-teacher.yaml", [
        "scaling.num_workers=0", "trainer.epochs=3", "checkpoint.every_epochs=1",
        f"storage.path={workdir / 'runs'}"])
    with pytest.raises(Exception) as e:
        train_run(exp, "teacher")
    line = one_line(e.value)
    folders = sorted(small_disk.glob("kd-ckpt-*"))
    assert line.startswith("CheckpointWriteError: checkpoint of epoch 2 not written: "), line
    assert str(small_disk) in line and "kd-ckpt-" in line and "No space left on device" in line, line
    assert len(folders) == 1, folders  # epoch 2's partial folder was removed
    assert (folders[0] / CKPT_MANIFEST).exists()
    for p in small_disk.glob("filler-*"):
        p.unlink()  # room for the loader's reads is not needed, but leave the disk usable
    state = read_checkpoint(folders[0])
    assert int(state["state"]["epoch"]) == 0 and state["model"]  # epoch 1, complete
