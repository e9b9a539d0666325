"""Model quality and cost on a held-out split: accuracy, teacher agreement,
calibration (ECE), confusion matrix, parameter count, size on disk and latency per batch.

`evaluate` takes arrays, or a streamed split (`kd.data.StreamSplit`): then it is scored
batch by batch and the per-batch counts (`batch_scores`) are summed, so the holdout is
never loaded whole: a small split in this process, a large one in Ray Data tasks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from kd.models import count_params, model_size_bytes

ECE_BINS = 10


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


def latency_ms(model: nn.Module, sample: torch.Tensor, repeats: int = 30,
               budget_s: float = 2.0) -> float:
    """Median wall time in ms of one no-grad forward of ``sample`` on one CPU thread,
    after 3 warm-ups: at most ``repeats`` timed forwards, fewer (but at least 5) once
    ``budget_s`` seconds of them have passed (a large model is not timed for minutes).
    Torch's intra-op threads are set to 1 for the measurement and restored after it, so
    the figure belongs to the model: comparable between machines with different core
    counts, and not skewed by a neighbour process busy on a core. With torch's 2 threads
    on 2 cores, a digits MLP timed while Ray Train's controller shut down read 4.5-5.7 ms
    instead of 0.03 ms, every forward waiting out the neighbour's time slice
    (bench/latency.py); a gate's ``max_latency_ms`` then rejected at random."""
    model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: list[float] = []
    try:
        with torch.no_grad():
            for _ in range(3):
                model(sample)
            start = time.perf_counter()
            while len(times) < max(repeats, 1) and (
                    len(times) < 5 or time.perf_counter() - start < budget_s):
                t0 = time.perf_counter()
                model(sample)
                times.append((time.perf_counter() - t0) * 1000)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


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


def batch_scores(logits: torch.Tensor, y: torch.Tensor, teacher_pred: torch.Tensor | None,
                 num_classes: int) -> dict[str, np.ndarray]:
    """The additive counts of one batch: rows, labeled, correct, teacher agreements,
    the confusion matrix and per-confidence-bin sums (count, confidence, correct)."""
    probs = logits.float().softmax(1)
    conf, pred = probs.max(1)
    lab = y >= 0
    b = torch.clamp(torch.ceil(conf * ECE_BINS).long() - 1, 0, ECE_BINS - 1)[lab]
    hit = (pred[lab] == y[lab]).double()
    bins = np.stack([torch.bincount(b, minlength=ECE_BINS).double().numpy(),
                     torch.zeros(ECE_BINS, dtype=torch.float64).index_add_(0, b, conf[lab].double()).numpy(),
                     torch.zeros(ECE_BINS, dtype=torch.float64).index_add_(0, b, hit).numpy()])
    agree = float((teacher_pred == pred).sum()) if teacher_pred is not None else 0.0
    return {"counts": np.asarray([[len(y), float(lab.sum()), float(hit.sum()), agree]]),
            "confusion": confusion_counts(pred, y, num_classes)[None],
            "bins": bins[None]}


def score_batch(batch: dict[str, Any], models: list[nn.Module], teacher: nn.Module | None,
                num_classes: list[int]) -> dict[str, np.ndarray]:
    """`batch_scores` of every model in ``models`` (``num_classes[i]`` classes) on one
    batch, keyed ``counts<i>``, ``confusion<i>`` and ``bins<i>`` (each with a leading
    axis of 1, a Ray Data output row); the teacher runs once per batch."""
    x = np.array(batch["x"])  # a writable copy of the block's view
    y = torch.as_tensor(np.array(batch["y"]))
    tpred = predict_logits(teacher, x).argmax(1) if teacher is not None else None
    out: dict[str, np.ndarray] = {}
    for i, model in enumerate(models):
        for k, v in batch_scores(predict_logits(model, x), y, tpred, num_classes[i]).items():
            out[f"{k}{i}"] = v
    return out


def _scored_parts(split: Any, models: list[nn.Module], teacher: nn.Module | None,
                  classes: list[int]) -> Iterator[dict[str, np.ndarray]]:
    """`score_batch` of every 512-row batch of ``split``: in this process when the split
    is read here (`StreamSplit.read_here`: a small source, no task start), else in Ray
    Data tasks fused with the reads, in parallel, so only the per-batch counts reach
    this process, never the rows (nor their object-store pages)."""
    if split.read_here:
        for batch in split.batches(512):
            yield score_batch(batch, models, teacher, classes)
        return
    from kd.data.stream import data_task_cpus, input_errors

    ds = split.dataset().map_batches(
        score_batch, fn_kwargs={"models": models, "teacher": teacher, "num_classes": classes},
        batch_size=512, batch_format="numpy", num_cpus=data_task_cpus())
    yield from input_errors(ds.iter_batches(batch_size=None, batch_format="numpy"))


def evaluate_stream_many(models: dict[str, nn.Module], split: Any, teacher: nn.Module | None,
                         num_classes: dict[str, int]) -> dict[str, tuple[dict[str, float], np.ndarray]]:
    """Accuracy, ECE, teacher agreement and the confusion matrix of every model in
    ``models`` (name -> module, ``num_classes[name]`` classes) over a streamed split, in one
    pass that runs the teacher once per batch whatever the number of models: the sums of
    `score_batch` over `_scored_parts`. A small split is scored in this process (an actor
    start cost 3-11 s on 2 cores, more than scoring digits); a large one by Ray Data
    tasks beside the reads, so this process holds counts, not rows."""
    names = list(models)
    classes = [num_classes[k] for k in names]
    sums = [[np.zeros(4), np.zeros((c, c), np.int64), np.zeros((3, ECE_BINS))] for c in classes]
    for part in _scored_parts(split, [models[k] for k in names], teacher, classes):
        for i, acc in enumerate(sums):
            acc[0] += np.asarray(part[f"counts{i}"]).sum(0)
            acc[1] += np.asarray(part[f"confusion{i}"]).sum(0).astype(np.int64)
            acc[2] += np.asarray(part[f"bins{i}"]).sum(0)
    out = {}
    for name, (counts, conf, bins) in zip(names, sums):
        n, lab, hit, agree = counts
        m = {"accuracy": hit / lab if lab else float("nan"),
             "ece": float(np.abs(bins[2] - bins[1]).sum() / lab) if lab else float("nan")}
        if teacher is not None:
            m["teacher_agreement"] = agree / n if n else float("nan")
        out[name] = ({k: float(v) for k, v in m.items()}, conf)
    return out


def evaluate_split_many(models: dict[str, nn.Module], split: Any, teacher: nn.Module | None = None,
                        batch_size: int = 128) -> dict[str, tuple[dict[str, float], np.ndarray]]:
    """`evaluate` of a streamed split plus its confusion matrix (`confusion_counts`,
    summed over the blocks) for every model in ``models``, in one pass
    (`evaluate_stream_many`: a gate's challenger and champion cost the teacher one pass)."""
    sample = split.sample(batch_size).x
    classes = {k: int(predict_logits(m, sample[:1]).shape[1]) if len(sample) else 1
               for k, m in models.items()}
    got = evaluate_stream_many(models, split, teacher, classes)
    dtype = torch.int64 if np.issubdtype(sample.dtype, np.integer) else torch.float32
    for name, model in models.items():
        out = got[name][0]
        out.update(params=float(count_params(model)), size_bytes=float(model_size_bytes(model)))
        out["latency_ms"] = latency_ms(model, torch.as_tensor(sample, dtype=dtype))
    return got


def evaluate_with_confusion(model: nn.Module, split: Any, teacher: nn.Module | None = None,
                            batch_size: int = 128) -> tuple[dict[str, float], np.ndarray]:
    """`evaluate_split_many` of one model."""
    return evaluate_split_many({"model": model}, split, teacher, batch_size)["model"]


def evaluate(model: nn.Module, x: Any, y: np.ndarray | None = None,
             teacher: nn.Module | None = None, batch_size: int = 128) -> dict[str, float]:
    """Metrics of ``model`` on ``(x, y)``, or on a streamed split passed as ``x`` (``y``
    unused; see `evaluate_stream_many`). Labels -1 are skipped for accuracy/ECE. Keys:
    ``accuracy``, ``ece``, ``teacher_agreement`` (share of equal argmax, if a teacher
    is given), ``params``, ``size_bytes`` and ``latency_ms`` for one batch."""
    if hasattr(x, "dataset"):
        return evaluate_with_confusion(model, x, teacher, batch_size)[0]
    assert y is not None
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
    return out
