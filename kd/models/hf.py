"""Transformer sentence encoders over int64 token ids: a pretrained Hugging Face model
(`hf_encoder`, the usual text teacher) and a randomly initialised BERT (`bert_student`).

Both take ids ``[B, L]`` right-padded with ``pad_id``, build the attention mask as
``ids != pad_id``, pool the last hidden states and L2-normalise:

    mean pooling:  e_b = sum_l m_bl h_bl / max(1, sum_l m_bl),   m = (ids != pad_id)
    cls pooling:   e_b = h_b0
    output:        e_b / ||e_b||_2   (normalize: true)

They wrap the transformer as attribute ``bert``, so feature paths are
``bert.embeddings``, ``bert.encoder.layer.<i>`` and, for attention probabilities under
``attn: eager``, ``bert.encoder.layer.<i>.attention.self#1`` (transformers' BertSelfAttention
returns ``(context, probs)``; probs ``[B, heads, L, L]`` under eager, None under sdpa).

transformers is imported inside the factories only: the registered model's loader
imports this package without it, and `static_embed` never needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import InputError
from . import MODELS, scaled
from .tokens import load_tokenizer, model_dir, offline

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
POOLINGS = ("mean", "cls")
ATTNS = ("sdpa", "eager")


def masked_mean(hidden: Tensor, keep: Tensor) -> Tensor:
    """``sum_l keep[b, l] * hidden[b, l] / max(1, sum_l keep[b, l])``: ``[B, L, D] -> [B, D]``."""
    k = keep.unsqueeze(-1).to(hidden.dtype)
    return (hidden * k).sum(1) / k.sum(1).clamp(min=1.0)


def check_ids(name: str, ids: Tensor) -> Tensor:
    """``ids`` as int64 ``[B, L]``, else ValueError naming the model."""
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name} takes integer token ids [B, L], got {ids.dtype} {tuple(ids.shape)}")
    return ids.long()


class PooledEncoder(nn.Module):
    """A transformer (``bert``) + pooling + optional ``proj`` (Linear) + L2 normalisation."""

    pretrained = False

    def __init__(self, bert: nn.Module, pad_id: int, pooling: str, normalize: bool,
                 proj: nn.Linear | None, name: str) -> None:
        super().__init__()
        self.bert = bert
        self.proj = proj
        self.pad_id = int(pad_id)
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.kind = name

    def pool(self, ids: Tensor) -> Tensor:
        """The pooled (and projected) embedding before normalisation, ``[B, D]``."""
        ids = check_ids(self.kind, ids)
        keep = ids != self.pad_id
        out = self.bert(input_ids=ids, attention_mask=keep.long()).last_hidden_state
        v = out[:, 0] if self.pooling == "cls" else masked_mean(out, keep)
        return self.proj(v) if self.proj is not None else v

    def forward(self, ids: Tensor) -> Tensor:
        """ids ``[B, L]`` -> sentence embedding ``[B, D]`` (unit length when normalize)."""
        v = self.pool(ids)
        return F.normalize(v, dim=-1) if self.normalize else v


class HFEncoder(PooledEncoder):
    """A pretrained Hugging Face encoder: its weights come with it (``pretrained = True``);
    a registry rebuild from args alone needs ``path`` to exist where it is rebuilt."""

    pretrained = True


class BertStudent(PooledEncoder):
    """A randomly initialised transformers BertModel built from its args alone."""

    pretrained = False


def _choice(name: str, arg: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise InputError(f"model {name!r}: argument {arg!r} must be one of {', '.join(allowed)}, got {value!r}")
    return str(value)


def _seq_len(name: str, input_shape: tuple[int, ...], max_len: int) -> None:
    if len(input_shape) != 1:
        raise InputError(f"model {name!r} takes token ids shaped (L,), got input_shape {tuple(input_shape)}")
    if input_shape[0] > max_len:
        raise InputError(f"model {name!r}: sequence length {input_shape[0]} exceeds the model's "
                         f"{max_len} positions (data.text.max_length)")


def _checked_dir(path: str) -> Path:
    """The model directory ``path`` names, with config.json, safetensors weights and a
    tokenizer; else `InputError` naming args.path."""
    d = model_dir(path)
    if not (d / "config.json").is_file():
        raise InputError(f"model 'hf_encoder': args.path {path!r} ({d}) has no config.json")
    if not any((d / f).is_file() for f in WEIGHT_FILES):
        raise InputError(f"model 'hf_encoder': args.path {path!r} ({d}) has no safetensors weights "
                         f"({' or '.join(WEIGHT_FILES)})")
    load_tokenizer(str(d))  # InputError naming the directory when tokenizer.json is missing
    return d


@MODELS.register("hf_encoder")
def hf_encoder(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    width: float = 1.0,
    path: str,
    pooling: str = "mean",
    normalize: bool = True,
    attn: str = "sdpa",
    pad_id: int | None = None,
) -> HFEncoder:
    """``AutoModel.from_pretrained(model_dir(path))`` (local files, safetensors, float32) as
    ``bert``, pooled (``mean`` over ids != pad_id, or ``cls``) and L2-normalised:
    ids ``[B, L]`` -> ``[B, hidden]``. ``num_classes`` is not used (the output width is the
    model's hidden size); ``width`` must be 1. ``pad_id`` defaults to the tokenizer's."""
    name = "hf_encoder"
    if width != 1:
        raise InputError(f"model {name!r}: width must be 1 (a pretrained model has a fixed size), got {width!r}")
    pooling = _choice(name, "pooling", pooling, POOLINGS)
    attn = _choice(name, "attn", attn, ATTNS)
    d = _checked_dir(path)
    pad = load_tokenizer(str(d)).pad_id if pad_id is None else int(pad_id)
    offline()
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per build (driver, each worker, each trial)
    try:
        bert = AutoModel.from_pretrained(str(d), local_files_only=True, use_safetensors=True,
                                         attn_implementation=attn, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"model {name!r}: args.path {path!r} ({d}) is not a loadable model: {first}") from None
    _seq_len(name, input_shape, int(getattr(bert.config, "max_position_embeddings", 1 << 30)))
    model = HFEncoder(bert, pad, pooling, normalize, None, name)
    model.path = str(path)
    return model.eval()


def _positive(name: str, **values: Any) -> None:
    for arg, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"model {name!r}: argument {arg!r} must be a positive int, got {v!r}")


@MODELS.register("bert_student")
def bert_student(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    width: float = 1.0,
    vocab_size: int = 30522,
    hidden: int = 384,
    layers: int = 3,
    heads: int = 12,
    intermediate: int = 1536,
    max_len: int = 512,
    pad_id: int = 0,
    normalize: bool = True,
    attn: str = "sdpa",
    tokenizer: str | None = None,
    dropout: float = 0.1,
) -> BertStudent:
    """A random-init transformers ``BertModel`` (no pooler, BERT defaults otherwise: GELU,
    dropout 0.1, LayerNorm eps 1e-12, 2 token types) with mean pooling over ids != pad_id,
    a Linear projection ``hidden -> num_classes`` when they differ, L2 normalisation.
    ``width`` scales ``hidden`` (kept a multiple of ``heads``) and ``intermediate``;
    ``tokenizer`` is only recorded (attribute ``tokenizer``); ``attn: eager`` exposes
    attention probabilities (see the module docstring). ``dropout`` is BERT's hidden and
    attention-probability dropout (default 0.1, BERT's). Measured on a 2-layer student
    distilling all-MiniLM-L6-v2 (bench/RESULTS.md): 0 makes the CPU step 1.15x faster, and
    0 with the word embeddings frozen (``student.freeze``) reached the same validation cosine."""
    name = "bert_student"
    _positive(name, vocab_size=vocab_size, hidden=hidden, layers=layers, heads=heads,
              intermediate=intermediate, max_len=max_len)
    attn = _choice(name, "attn", attn, ATTNS)
    _seq_len(name, input_shape, max_len)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise InputError(f"model {name!r}: argument 'dropout' must be a number in [0, 1), got {dropout!r}")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int) or not 0 <= pad_id < vocab_size:
        raise InputError(f"model {name!r}: argument 'pad_id' {pad_id!r} is outside the vocabulary of {vocab_size}")
    h = max(heads, int(round(hidden * width / heads)) * heads)
    offline()
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=vocab_size, hidden_size=h, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=scaled(intermediate, width),
                     max_position_embeddings=max_len, pad_token_id=pad_id,
                     hidden_dropout_prob=float(dropout), attention_probs_dropout_prob=float(dropout))
    cfg._attn_implementation = attn
    bert = BertModel(cfg, add_pooling_layer=False)
    proj = nn.Linear(h, num_classes) if h != num_classes else None
    model = BertStudent(bert, pad_id, "mean", normalize, proj, name)
    model.tokenizer = tokenizer
    return model
