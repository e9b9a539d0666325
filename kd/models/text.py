"""A tiny transformer encoder classifier over int64 token ids."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import InputError
from . import MODELS


class TextEncoder(nn.Module):
    """``embed + pos -> encoder (pre-norm layers) -> norm -> masked mean pool -> head``.

    Input ids ``[B, L]`` (``L <= max_len``); ``pad_id`` tokens are masked out of
    attention and of the mean. Feature paths: ``encoder.layers.<i>``, ``norm``, ``embed``.
    """

    def __init__(
        self, vocab_size: int, num_classes: int, dim: int, depth: int, heads: int, max_len: int,
        pad_id: int, dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.pos = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=4 * dim, dropout=dropout, batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids: Tensor) -> Tensor:
        """``ids``: integer ``[B, L]`` -> logits ``[B, num_classes]``."""
        if ids.dim() != 2 or ids.dtype.is_floating_point:
            raise ValueError(f"text_encoder takes integer token ids [B, L], got {ids.dtype} "
                             f"{tuple(ids.shape)}")
        ids = ids.long()
        length = ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"text_encoder: sequence length {length} > max_len {self.max_len}")
        pad = ids == self.pad_id
        # A row of only padding would attend to nothing (NaN): let it see its first token.
        attn_pad = pad.clone()
        attn_pad[:, 0] &= ~pad.all(dim=1)
        pos = torch.arange(length, device=ids.device)
        x = self.embed(ids) + self.pos(pos)[None]
        x = self.norm(self.encoder(x, src_key_padding_mask=attn_pad))
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        pooled = (x * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        return self.head(pooled)


@MODELS.register("text_encoder")
def text_encoder(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    width: float = 1.0,
    vocab_size: int = 30522,
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
    max_len: int = 128,
    pad_id: int = 0,
    dropout: float = 0.0,
) -> TextEncoder:
    """Tiny transformer encoder over token ids ``[B, L]`` (``input_shape=(L,)``), masked
    mean pool over non-pad tokens, linear head. ``width`` scales ``dim`` (kept a multiple
    of ``heads``); the default vocabulary fits BERT-style uncased tokenizers."""
    for arg, v in (("vocab_size", vocab_size), ("dim", dim), ("depth", depth),
                   ("heads", heads), ("max_len", max_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"model 'text_encoder': argument {arg!r} must be a positive int, "
                             f"got {v!r}")
    if len(input_shape) != 1:
        raise InputError(f"model 'text_encoder' takes token ids shaped (L,), got input_shape "
                         f"{tuple(input_shape)}")
    if input_shape[0] > max_len:
        raise InputError(f"model 'text_encoder': sequence length {input_shape[0]} exceeds "
                         f"argument 'max_len' {max_len}")
    if not 0 <= pad_id < vocab_size:
        raise InputError(f"model 'text_encoder': argument 'pad_id' {pad_id!r} is outside the "
                         f"vocabulary of {vocab_size}")
    d = max(heads, int(round(dim * width / heads)) * heads)
    return TextEncoder(vocab_size, num_classes, d, depth, heads, max_len, pad_id, float(dropout))
