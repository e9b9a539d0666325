"""Model quality and cost on a held-out split: accuracy, teacher agreement,
calibration (ECE), parameter count, size on disk and latency per batch."""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from torch import nn

from kd.models import count_params, model_size_bytes


def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> torch.Tensor:
    """Logits of ``model`` (eval mode, no grad) for all of ``x``, batched."""
    model.eval()
    dtype = torch.int64 if np.issubdtype(x.dtype, np.integer) else torch.float32
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            outs.append(model(torch.as_tensor(x[i:i + batch_size], dtype=dtype)).float())
    return torch.cat(outs) if outs else torch.empty(0)


def expected_calibration_error(probs: torch.Tensor, y: torch.Tensor, bins: int = 10) -> float:
    """ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)| over equal-width confidence bins."""
    conf, pred = probs.max(1)
    ece = torch.zeros(())
    edges = torch.linspace(0, 1, bins + 1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.float().mean() * ((pred[m] == y[m]).float().mean() - conf[m].mean()).abs()
    return float(ece)


def confusion_counts(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> np.ndarray:
    """Confusion counts as an int64 ``(num_classes, num_classes)`` array: rows are the true
    class, columns the predicted one. Rows with ``y < 0`` (unlabeled) are skipped. Counts
    of disjoint batches add up, so a streaming evaluation can sum them per batch."""
    pred = torch.as_tensor(pred).reshape(-1).long().cpu()
    y = torch.as_tensor(y).reshape(-1).long().cpu()
    if pred.shape != y.shape:
        raise ValueError(f"confusion_counts: {len(pred)} predictions for {len(y)} labels")
    keep = y >= 0
    flat = y[keep] * num_classes + pred[keep]
    counts = torch.bincount(flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).numpy().astype(np.int64)


def latency_ms(model: nn.Module, sample: torch.Tensor, repeats: int = 30) -> float:
    """Median wall time in ms of one no-grad forward of ``sample`` (after 3 warm-ups)."""
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(repeats + 3):
            t0 = time.perf_counter()
            model(sample)
            if i >= 3:
                times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray,
             teacher: nn.Module | None = None, batch_size: int = 128) -> dict[str, float]:
    """Metrics of ``model`` on ``(x, y)`` (labels -1 are skipped for accuracy/ECE):
    ``accuracy``, ``ece``, ``teacher_agreement`` (share of equal argmax, if a teacher
    is given), ``params``, ``size_bytes`` and ``latency_ms`` for one batch."""
    return evaluate_with_confusion(model, x, y, teacher, None, batch_size)[0]


def evaluate_with_confusion(model: nn.Module, x: np.ndarray, y: np.ndarray,
                            teacher: nn.Module | None, num_classes: int | None,
                            batch_size: int = 128) -> tuple[dict[str, float], np.ndarray | None]:
    """`evaluate`'s metrics and, from the same predictions, `confusion_counts` over
    ``num_classes`` (None without ``num_classes`` or when no row is labeled)."""
    logits = predict_logits(model, x)
    yt = torch.as_tensor(y)
    lab = yt >= 0
    pred = logits.argmax(1)
    out = {
        "accuracy": float((pred[lab] == yt[lab]).float().mean()) if lab.any() else float("nan"),
        "ece": expected_calibration_error(logits.softmax(1)[lab], yt[lab]) if lab.any() else float("nan"),
        "params": float(count_params(model)),
        "size_bytes": float(model_size_bytes(model)),
    }
    if teacher is not None:
        out["teacher_agreement"] = float((predict_logits(teacher, x).argmax(1) == pred).float().mean())
    dtype = torch.int64 if np.issubdtype(x.dtype, np.integer) else torch.float32
    out["latency_ms"] = latency_ms(model, torch.as_tensor(x[:batch_size], dtype=dtype))
    counts = confusion_counts(pred, yt, num_classes) if num_classes and lab.any() else None
    return out, counts
