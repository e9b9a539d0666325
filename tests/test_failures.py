"""The one-line failure notice (`kd.train.failures.FailureNotice`) without a cluster:
its text for a restart and for the last failure, and the resume epoch it reads from the
run folder (the newest *complete* checkpoint). The 2-worker kill test in
tests/test_cluster.py checks the line as Ray's controller prints it."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from torch import nn

from kd.train.checkpoint import save_checkpoint
from kd.train.failures import FailureNotice, resume_epoch


def _save(d: Path, epoch: int) -> None:
    d.mkdir(parents=True)
    save_checkpoint(d, nn.Linear(2, 2).state_dict(), nn.Module(), {}, epoch,
                    [torch.get_rng_state()])


def test_resume_epoch_is_one_after_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    fs, run = pafs.LocalFileSystem(), str(tmp_path / "run")
    assert resume_epoch(fs, run) == 1  # nothing saved yet
    _save(tmp_path / "run" / "epoch_00001", 0)
    _save(tmp_path / "run" / "epoch_00002", 1)
    assert resume_epoch(fs, run) == 3
    (tmp_path / "run" / "epoch_00002" / "train_state.pt").unlink()  # upload cut short
    assert resume_epoch(fs, run) == 2


def test_notice_names_rank_attempt_and_epoch(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    _save(tmp_path / "run" / "epoch_00001", 0)
    n = FailureNotice(1, pafs.LocalFileSystem(), str(tmp_path / "run"), epochs=3)
    n.after_exception(None, {1: RuntimeError("A worker health check failed.\nmore")})
    n.after_exception(None, {0: ValueError("x"), 1: ValueError("y")})
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "[kd] worker rank 1 (RuntimeError: A worker health check failed.) failed: restart 1 of "
        "trainer.max_failures 1, resuming from epoch 2/3",
        "[kd] workers rank 0 (ValueError: x), rank 1 (ValueError: y) failed; no restarts left "
        "(trainer.max_failures 1): the run stops",
    ]
