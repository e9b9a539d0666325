"""Holdout quality of a sentence-embedding student against its teacher (``task: embed``).

Keys (the run logs them as ``holdout/<key>``; the gate reads them):

- ``cosine``: mean over the holdout rows of cos(student(x), teacher(x));
- ``nn_top1`` / ``nn_top5``: over the first ``NN_ROWS`` holdout rows, the share whose
  nearest other row under the student is the teacher's nearest, and the share whose
  teacher nearest row is in the student's top 5 (`kd.train.embed_metrics`);
- ``recall_at_1`` / ``recall_at_10`` (and ``teacher_recall_at_*``): with
  ``data.text.retrieval`` set, a jsonl of ``{query, doc}`` pairs: the share of queries
  whose own doc is the nearest / in the 10 nearest of all docs;
- ``params``, ``size_bytes``, ``latency_ms`` (one batch), ``sentences_per_s`` (encode rate
  on holdout rows, this process's torch threads).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import nn

from kd.config import Experiment
from kd.errors import InputError
from kd.models import count_params, model_size_bytes
from kd.models.tokens import load_tokenizer
from kd.train.embed_metrics import (
    cosine_rows,
    encode,
    encode_rate,
    neighbour_agreement,
    recall_at_k,
    trim_pad,
)
from kd.train.evaluate import latency_ms

NN_ROWS = 5000
BATCH = 256


def read_pairs(uri: str, endpoint: str | None = None) -> tuple[list[str], list[str]]:
    """``(queries, docs)`` of a jsonl file of ``{"query": ..., "doc": ...}`` lines (local
    or s3://); a line without both strings is an `InputError` naming the file and line."""
    from kd import storage

    try:
        text = storage.fetch(uri, endpoint).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"data.text.retrieval {uri}: not UTF-8 (byte {e.start})") from None
    queries, docs = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"data.text.retrieval {uri}: line {n} is not JSON") from None
        if not (isinstance(row, dict) and isinstance(row.get("query"), str)
                and isinstance(row.get("doc"), str) and row["query"].strip() and row["doc"].strip()):
            raise InputError(f"data.text.retrieval {uri}: line {n} needs non-empty string "
                             "fields 'query' and 'doc'")
        queries.append(row["query"])
        docs.append(row["doc"])
    if not queries:
        raise InputError(f"data.text.retrieval {uri}: no query/doc pairs")
    return queries, docs


def retrieval_ids(exp: Experiment) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """Token ids of the ``data.text.retrieval`` queries and docs and the pad id (None
    when the experiment names no retrieval file or tokenizer)."""
    text = exp.data.text
    if text is None or text.retrieval is None or text.tokenizer is None:
        return None
    tok = load_tokenizer(text.tokenizer)
    queries, docs = read_pairs(text.retrieval, exp.storage.endpoint_url)
    q_ids, d_ids = (torch.as_tensor(tok.encode(t, text.max_length)[0]) for t in (queries, docs))
    return q_ids, d_ids, tok.pad_id


def recall(model: nn.Module, ids: tuple[torch.Tensor, torch.Tensor, int]) -> dict[str, float]:
    """Recall@1/@10 of ``model`` on the retrieval pairs ``ids`` (`retrieval_ids`): the
    share of queries whose own doc is the nearest / in the 10 nearest of all docs."""
    q_ids, d_ids, pad = ids
    return recall_at_k(encode(model, q_ids, pad_id=pad), encode(model, d_ids, pad_id=pad))


def evaluate_embed(exp: Experiment, model: nn.Module, split: Any,
                   teacher: nn.Module | None) -> dict[str, float]:
    """The metrics of the module docstring over a streamed holdout ``split``."""
    return evaluate_embed_many(exp, {"model": model}, split, teacher)["model"]


def evaluate_embed_many(exp: Experiment, models: dict[str, nn.Module], split: Any,
                        teacher: nn.Module | None) -> dict[str, dict[str, float]]:
    """`evaluate_embed` of every model in ``models`` (name -> module) in one pass over the
    streamed holdout ``split``. The teacher encodes each
    holdout batch and the retrieval pairs once, whatever the number of models: scoring a
    challenger and a champion together costs the teacher half of scoring them apart."""
    tok = load_tokenizer(exp.data.text.tokenizer) if exp.data.text and exp.data.text.tokenizer else None
    pad = tok.pad_id if tok is not None else 0
    cos = dict.fromkeys(models, 0.0)
    s_nn: dict[str, list[torch.Tensor]] = {k: [] for k in models}
    t_nn: list[torch.Tensor] = []
    head: list[torch.Tensor] = []
    rows = 0
    for batch in split.batches(512):
        ids = torch.as_tensor(np.array(batch["x"]))
        t = encode(teacher, ids, pad_id=pad) if teacher is not None else None
        keep = t is not None and sum(len(a) for a in t_nn) < NN_ROWS
        if keep:
            t_nn.append(t)
        for name, m in models.items():
            s = encode(m, ids, pad_id=pad)
            if t is not None:
                cos[name] += float(cosine_rows(s, t).sum())
            if keep:
                s_nn[name].append(s)
        if sum(len(a) for a in head) < BATCH:
            head.append(ids)
        rows += len(ids)
    pairs = retrieval_ids(exp)
    teacher_recall = recall(teacher, pairs) if pairs and teacher is not None else {}
    out = {}
    for name, m in models.items():
        o = {"rows": float(rows), "params": float(count_params(m)),
             "size_bytes": float(model_size_bytes(m))}
        if t_nn and rows:
            o["cosine"] = cos[name] / rows
            o.update(neighbour_agreement(torch.cat(s_nn[name])[:NN_ROWS], torch.cat(t_nn)[:NN_ROWS]))
        if head:
            ids = torch.cat(head)[:BATCH]
            o["latency_ms"] = latency_ms(m, trim_pad(ids[:64], pad))
            o["sentences_per_s"] = encode_rate(m, ids, pad_id=pad)
        if pairs:
            o.update(recall(m, pairs))
            o.update({f"teacher_{k}": v for k, v in teacher_recall.items()})
            o["retrieval_pairs"] = float(len(pairs[0]))
        out[name] = o
    return out
