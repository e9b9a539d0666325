"""How close a student's sentence embeddings are to its teacher's, and how fast it encodes.

Pure torch, no Ray. Every similarity is the cosine ``cos(a, b) = a·b / (‖a‖ ‖b‖)`` (rows
are L2-normalised first, a zero row stays zero). Row ``i`` of the student matrix ``s`` and of
the teacher matrix ``t`` embed the same sentence.

- `cosine_rows`: ``cos(s_i, t_i)`` per row (mean of it = ``holdout/cosine``).
- `neighbour_agreement`: does the student keep the teacher's neighbourhoods? For each row,
  its nearest other row (self excluded) under each model; ``nn_top1`` = share of rows whose
  student nearest neighbour is the teacher's, ``nn_top<k>`` = share whose teacher nearest
  neighbour is among the student's ``k`` nearest.
- `recall_at_k`: query ``q_i`` should retrieve document ``d_i`` among all documents.
- `encode_rate`: sentences per second of a model over token ids (eval, no grad, each batch
  trimmed of its trailing all-pad columns by `trim_pad`), the median of repeats.

Rankings are chunked (``chunk`` rows of the ``N × N`` similarity at a time), so N = 10,000
needs ``chunk × N`` floats, not ``N²``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.errors import InputError

CHUNK = 1024


def _pair(s: Tensor, t: Tensor, what: str, same_dim: bool = True) -> tuple[Tensor, Tensor]:
    """``s`` and ``t`` as float32 rows of unit length; an `InputError` unless both are
    2-D with the same number of rows (and, with ``same_dim``, the same width)."""
    if s.dim() != 2 or t.dim() != 2 or s.shape[0] != t.shape[0] or (same_dim and s.shape[1] != t.shape[1]):
        need = "[N, D] with equal shapes" if same_dim else "[N, *] with the same N"
        raise InputError(f"{what}: embeddings must both be {need}, got {tuple(s.shape)} and {tuple(t.shape)}")
    return F.normalize(s.detach().float(), dim=1), F.normalize(t.detach().float(), dim=1)


def cosine_rows(s: Tensor, t: Tensor) -> Tensor:
    """``[N]``: ``cos(s_i, t_i)`` for every row ``i`` of two ``[N, D]`` matrices."""
    s, t = _pair(s, t, "cosine_rows")
    return (s * t).sum(dim=1)


def _nearest(x: Tensor, rows: slice, k: int) -> Tensor:
    """``[len(rows), k]``: indices of the ``k`` rows of unit-row ``x`` most similar to each
    row in ``rows``, the row itself excluded."""
    sim = x[rows] @ x.T
    idx = torch.arange(rows.start, rows.stop)
    sim[torch.arange(len(idx)), idx] = float("-inf")
    return sim.topk(k, dim=1).indices


def neighbour_agreement(s: Tensor, t: Tensor, k: int = 5, chunk: int = CHUNK) -> dict[str, float]:
    """``{"nn_top1": mean_i [nn_s(i) == nn_t(i)], f"nn_top{k}": mean_i [nn_t(i) in
    top_k_s(i)]}`` where ``nn_m(i)`` is row i's nearest other row by cosine under model m and
    ``top_k_s(i)`` the student's k nearest other rows (k is capped at N - 1). The two may
    differ in width: only each model's own similarities are compared."""
    s, t = _pair(s, t, "neighbour_agreement", same_dim=False)
    n = s.shape[0]
    if n < 2:
        raise InputError(f"neighbour_agreement: needs at least 2 rows, got {n}")
    if k < 1:
        raise InputError(f"neighbour_agreement: k must be >= 1, got {k}")
    kk = min(k, n - 1)
    top1 = topk = 0
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        student = _nearest(s, rows, kk)
        teacher = _nearest(t, rows, 1)
        top1 += int((student[:, 0] == teacher[:, 0]).sum())
        topk += int((student == teacher).any(dim=1).sum())
    return {"nn_top1": top1 / n, f"nn_top{k}": topk / n}


def recall_at_k(q: Tensor, d: Tensor, ks: Sequence[int] = (1, 10), chunk: int = CHUNK) -> dict[str, float]:
    """``{f"recall_at_{k}": share of queries i whose document d_i ranks among the top k of
    all documents by cos(q_i, d_j)}``. Rank of d_i = the number of other documents with
    similarity >= cos(q_i, d_i): ties count against the query, so a model that maps every
    document to one vector scores recall_at_1 = 0 (with more than one document)."""
    q, d = _pair(q, d, "recall_at_k")
    if any(k < 1 for k in ks):
        raise InputError(f"recall_at_k: every k must be >= 1, got {list(ks)}")
    n = q.shape[0]
    hits = dict.fromkeys(ks, 0)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        sim = q[start:stop] @ d.T
        idx = torch.arange(start, stop)
        own = sim[torch.arange(stop - start), idx]
        rank = (sim >= own[:, None]).sum(dim=1) - 1  # minus the document itself
        for k in ks:
            hits[k] += int((rank < k).sum())
    return {f"recall_at_{k}": hits[k] / n if n else 0.0 for k in ks}


def trim_pad(ids: Tensor, pad_id: int) -> Tensor:
    """``ids[:, :L]`` with L the longest real length: one past the last column holding a
    non-pad token in any row (at least 1). Exact for models that mask by ``pad_id``."""
    if ids.dim() != 2:
        raise InputError(f"trim_pad: token ids must be [B, L], got {tuple(ids.shape)}")
    real = (ids != pad_id).any(dim=0).nonzero()
    length = int(real[-1]) + 1 if len(real) else 1
    return ids[:, :length]


def forward_by_length(model: nn.Module, ids: Tensor, pad_id: int, chunk: int) -> Tensor:
    """``model(ids)`` computed on rows grouped by real length: the rows sorted by length,
    forwarded ``chunk`` at a time, each chunk cut by `trim_pad`, the outputs put back in
    row order (differentiably: gradients flow as for one forward). Equal to one forward for
    models that mask by ``pad_id``, with far less padding when lengths vary."""
    lengths = (ids != pad_id).long().cumsum(dim=1).argmax(dim=1)  # index of the last real token
    order = torch.argsort(lengths, stable=True)
    outs = [model(trim_pad(ids[order[i:i + chunk]], pad_id)).float()
            for i in range(0, ids.shape[0], chunk)]
    if not outs:
        return torch.empty(0)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return torch.cat(outs)[inverse]


def encode(model: nn.Module, ids: Tensor, batch_size: int = 256, pad_id: int = 0) -> Tensor:
    """``[N, D]`` float32 outputs of ``model`` over token ids ``[N, L]``, in row order (eval,
    no grad), by `forward_by_length` in batches of ``batch_size``. The model's train/eval
    mode is restored after."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return forward_by_length(model, ids, pad_id, batch_size)
    finally:
        model.train(was)


def encode_rate(model: nn.Module, ids: Tensor, batch_size: int = 64, repeats: int = 3,
                pad_id: int = 0) -> float:
    """Sentences per second: ``N / seconds`` to encode all ``N`` rows of ``ids`` in batches
    of ``batch_size`` (eval, no grad, each batch trimmed by `trim_pad`), the median over
    ``repeats`` timed passes after one untimed warm-up batch."""
    if ids.shape[0] == 0 or repeats < 1 or batch_size < 1:
        raise InputError(f"encode_rate: needs rows, repeats >= 1 and batch_size >= 1, got "
                         f"{ids.shape[0]} rows, repeats {repeats}, batch_size {batch_size}")
    batches = [trim_pad(ids[i:i + batch_size], pad_id) for i in range(0, ids.shape[0], batch_size)]
    was = model.training
    model.eval()
    rates = []
    try:
        with torch.no_grad():
            model(batches[0])
            for _ in range(repeats):
                t0 = time.perf_counter()
                for b in batches:
                    model(b)
                rates.append(ids.shape[0] / max(time.perf_counter() - t0, 1e-9))
    finally:
        model.train(was)
    return statistics.median(rates)
