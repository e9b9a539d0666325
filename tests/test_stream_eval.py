"""Holdout evaluation over a streamed split: per-batch counts summed in the driver
(scored there, or in Ray Data tasks) equal the metrics of the same rows scored in
memory; `StreamSplit.batches` reads every row of a split; `confusion_counts`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kd.data.splits
from kd.config import DataConfig
from kd.data import load_splits
from kd.models import build_model
from kd.train.evaluate import confusion_counts, evaluate, evaluate_with_confusion


def test_confusion_counts_rows_true_cols_predicted_skips_unlabeled() -> None:
    y = torch.tensor([0, 0, 1, 2, -1, 2])
    pred = torch.tensor([0, 1, 1, 0, 2, 2])
    m = confusion_counts(pred, y, 3)
    assert m.dtype == np.int64 and m.shape == (3, 3)
    assert m.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert m.sum() == 5  # the unlabeled row is not counted


@pytest.mark.parametrize("where", ["read here", "ray data tasks"])
def test_streamed_holdout_metrics_equal_in_memory_ones(where: str, ray_session: None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways of scoring a streamed split (read in this process when small; Ray Data
    tasks beside the reads when large) give the in-memory metrics of the same rows."""
    if where == "ray data tasks":
        monkeypatch.setattr(kd.data.splits, "LOCAL_READ_BYTES", 0)
    splits = load_splits(DataConfig(source="digits"))
    assert splits.holdout.read_here == (where == "read here")
    torch.manual_seed(0)
    model = build_model("mlp", {"hidden": [16]}, splits.input_shape, splits.num_classes).eval()
    teacher = build_model("mlp", {"hidden": [8]}, splits.input_shape, splits.num_classes).eval()
    streamed, conf = evaluate_with_confusion(model, splits.holdout, teacher)
    rows = splits.holdout.sample(len(splits.holdout))
    assert len(rows) == len(splits.holdout)
    in_memory = evaluate(model, rows.x, rows.y, teacher)
    for k in ("accuracy", "ece", "teacher_agreement"):
        assert streamed[k] == pytest.approx(in_memory[k], abs=1e-6), k
    assert conf.sum() == len(rows) and np.trace(conf) / conf.sum() == pytest.approx(streamed["accuracy"])


@pytest.mark.parametrize("where", ["read here", "ray data"])
def test_split_batches_give_every_row_of_the_split_once(where: str, ray_session: None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`StreamSplit.batches`, read here or by Ray Data: every holdout row once, in batches
    of at most the asked size, with the split's shape, and none of train's or val's rows."""
    if where == "ray data":
        monkeypatch.setattr(kd.data.splits, "LOCAL_READ_BYTES", 0)
    splits = load_splits(DataConfig(source="digits"))
    got = list(splits.holdout.batches(100))
    assert got and max(len(b["y"]) for b in got) <= 100
    idx = np.concatenate([b["idx"] for b in got])
    assert len(idx) == len(splits.holdout) == len(set(idx.tolist()))
    assert np.concatenate([b["x"] for b in got]).shape[1:] == splits.input_shape
    others = {int(i) for s in (splits.train, splits.val) for b in s.batches(512) for i in b["idx"]}
    assert not others & set(idx.tolist())


@pytest.mark.parametrize("where", ["read here", "ray data"])
def test_a_small_split_is_held_for_the_epochs_with_the_same_rows(
        where: str, ray_session: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`held_for_epochs` puts a small split in the object store: read in this process
    (``ray.data.from_blocks``, no read task to start) when `read_here`, else materialised
    by Ray Data's read tasks; either way the same rows, columns and types."""
    from ray.data.dataset import MaterializedDataset

    from kd.data.splits import held_for_epochs

    if where == "ray data":
        monkeypatch.setattr(kd.data.splits, "LOCAL_READ_BYTES", 0)
    splits = load_splits(DataConfig(source="digits"))
    held = held_for_epochs(splits.train, len(splits.train), row_bytes=1)
    # how it was filled: blocks put from here, or the read tasks' output (Ray Data's plan)
    capsys.readouterr()
    held.explain()
    assert ("FromBlocks" in capsys.readouterr().out) == (where == "read here")
    assert held.schema().names == ["x", "y", "idx"]
    got = {k: np.concatenate([b[k] for b in held.iter_batches(batch_format="numpy")])
           for k in ("x", "y", "idx")}
    want = splits.train.sample(len(splits.train))
    order = np.argsort(got["idx"])
    assert np.array_equal(got["idx"][order], np.sort(want.idx))
    ref = np.argsort(want.idx)
    assert np.array_equal(got["x"][order], want.x[ref]) and got["x"].dtype == want.x.dtype
    assert np.array_equal(got["y"][order], want.y[ref])
    assert isinstance(held, MaterializedDataset)
    too_big = held_for_epochs(splits.train, len(splits.train), row_bytes=1 << 40)
    assert not isinstance(too_big, MaterializedDataset)  # read from its files every epoch


class _Probe(torch.nn.Module):
    """Records torch's thread count at every forward; sleeps ``pause`` s in each."""

    def __init__(self, pause: float = 0.0) -> None:
        super().__init__()
        self.pause, self.threads = pause, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        self.threads.append(torch.get_num_threads())
        time.sleep(self.pause)
        return x


def test_latency_is_timed_on_one_thread_and_bounded() -> None:
    """`latency_ms` times every forward on one torch thread (a busy neighbour process
    cannot stall a pool thread: bench/latency.py) and gives the caller's thread count
    back, also when the forward fails; a slow model is timed at least 5 times, then
    only until ``budget_s`` has passed; the result is the median, in ms."""
    from kd.train.evaluate import latency_ms

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        probe = _Probe()
        latency_ms(probe, torch.zeros(4, 3), repeats=30)
        assert probe.threads == [1] * 33 and torch.get_num_threads() == 2  # 3 warm-ups + 30
        slow = _Probe(pause=0.05)
        ms = latency_ms(slow, torch.zeros(4, 3), repeats=30, budget_s=0.1)
        assert len(slow.threads) == 3 + 5 and 50 <= ms < 1000
        with pytest.raises(RuntimeError):
            latency_ms(torch.nn.Linear(2, 2), torch.zeros(4, 3))  # wrong input width
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
