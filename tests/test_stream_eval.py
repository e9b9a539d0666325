"""Holdout evaluation over a streamed split: per-batch counts summed in the driver
equal the metrics of the same rows scored in memory; `confusion_counts`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


def test_streamed_holdout_metrics_equal_in_memory_ones(ray_session: None) -> None:
    splits = load_splits(DataConfig(source="digits"))
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
