"""A static (model2vec-style) sentence encoder: one vector per token, averaged.

Pure torch (no transformers): it serves with torch + tokenizers only.

    e_b = P( (1 / |T_b|) * sum_{t in T_b} E[t] ),   T_b = the non-pad tokens of row b
    out = e_b / ||e_b||_2                              (normalize: true)

``E`` is the table ``embed.weight`` ``[vocab, dim]`` (an ``nn.EmbeddingBag`` in mean mode
whose ``padding_idx`` excludes pads from both sum and count: one fused kernel, no
``[B, L, dim]`` intermediate); ``P`` is ``proj``, a Linear ``dim -> num_classes`` when they
differ (identity otherwise). A row of only pads pools to ``P(0)``. Per-token weights
(model2vec's SIF weights) live in the table's rows (`kd.train.textinit.init_model2vec`).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import InputError
from . import MODELS, scaled


class StaticEmbed(nn.Module):
    """Token table (``embed``) + masked mean + optional projection (``proj``) + L2 norm."""

    pretrained = False

    def __init__(self, vocab_size: int, dim: int, num_classes: int, pad_id: int, normalize: bool,
                 tokenizer: str | None) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, dim, mode="mean", padding_idx=pad_id)
        self.proj = nn.Linear(dim, num_classes) if dim != num_classes else None
        self.pad_id = int(pad_id)
        self.normalize = bool(normalize)
        self.tokenizer = tokenizer

    def pool(self, ids: Tensor) -> Tensor:
        """The mean of the non-pad token vectors, projected, before normalisation ``[B, D]``."""
        if ids.dim() != 2 or ids.dtype.is_floating_point:
            raise ValueError(f"static_embed takes integer token ids [B, L], got {ids.dtype} {tuple(ids.shape)}")
        v = self.embed(ids.long())
        return self.proj(v) if self.proj is not None else v

    def forward(self, ids: Tensor) -> Tensor:
        """ids ``[B, L]`` -> sentence embedding ``[B, num_classes]`` (unit length when normalize)."""
        v = self.pool(ids)
        return F.normalize(v, dim=-1) if self.normalize else v


@MODELS.register("static_embed")
def static_embed(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    width: float = 1.0,
    vocab_size: int = 30522,
    dim: int = 256,
    pad_id: int = 0,
    normalize: bool = True,
    tokenizer: str | None = None,
) -> StaticEmbed:
    """Static token-vector encoder over ids ``[B, L]`` (``input_shape=(L,)``): table
    ``[vocab_size, round(dim * width)]``, mean over non-pad tokens, Linear to ``num_classes``
    when the widths differ, L2 normalisation. ``tokenizer`` is only recorded."""
    name = "static_embed"
    for arg, v in (("vocab_size", vocab_size), ("dim", dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"model {name!r}: argument {arg!r} must be a positive int, got {v!r}")
    if len(input_shape) != 1:
        raise InputError(f"model {name!r} takes token ids shaped (L,), got input_shape {tuple(input_shape)}")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int) or not 0 <= pad_id < vocab_size:
        raise InputError(f"model {name!r}: argument 'pad_id' {pad_id!r} is outside the vocabulary of {vocab_size}")
    return StaticEmbed(vocab_size, scaled(dim, width), num_classes, pad_id, normalize, tokenizer)
