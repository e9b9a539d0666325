"""Text / embedding distillation losses: ``embed_mse``, ``embed_cosine``, ``embed_relational``,
``hidden_mse`` and ``attention_kl`` (``task: embed``).

Notation: ``s_i`` / ``t_i`` are the student / teacher sentence embeddings (rows of
``batch.student_logits`` and ``batch.teacher_logits[0]``, ``[B, D]``), ``x̂ = x / ‖x‖``,
``m`` the token mask (``batch.token_mask`` ``[B, L]``, True for real tokens; None = all
real). The token-level terms pair student path ``i`` with teacher path ``i`` (``student:``
and ``teacher:`` lists of equal length, e.g. ``bert.encoder.layer.1`` with
``bert.encoder.layer.3``) and average over the pairs. Teacher values are detached; every
term computes in float32 and sees only the rows the composite's ``distill_mask`` keeps
(`CompositeLoss` hands it ``batch.select(distill_mask)``, which keeps ``token_mask``'s rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.errors import InputError
from kd.losses.base import LOSSES, DistillBatch, LossContext

EAGER_HINT = "set the model's args attn: eager"
PROB_EPS = 1e-12


def _embeddings(batch: DistillBatch, name: str, same_width: bool = True) -> tuple[Tensor, Tensor]:
    """(student ``[B, D]``, detached teacher ``[B, D']``) embeddings in float32; ``D == D'``
    unless not ``same_width``. A missing teacher or a shape mismatch is an `InputError`."""
    if not batch.teacher_logits:
        raise InputError(f"{name}: needs the teacher's embedding, but the batch has none")
    s, t = batch.student_logits.float(), batch.teacher_logits[0].detach().float()
    if s.dim() != 2 or t.dim() != 2 or s.shape[0] != t.shape[0]:
        raise InputError(f"{name}: expected student and teacher embeddings [B, D], got "
                         f"{list(s.shape)} and {list(t.shape)}")
    if same_width and s.shape[1] != t.shape[1]:
        raise InputError(f"{name}: student embedding width {s.shape[1]} != teacher's {t.shape[1]}; "
                         f"give the student a projection to {t.shape[1]} (the embedding width "
                         f"kdflow passes as num_classes)")
    return s, t


class EmbedMSE(nn.Module):
    """``(1 / (B·D)) Σ_i ‖s_i − t_i‖²``."""

    def forward(self, batch: DistillBatch) -> Tensor:
        with torch.autocast(batch.student_logits.device.type, enabled=False):
            s, t = _embeddings(batch, "embed_mse")
            return F.mse_loss(s, t)


class EmbedCosine(nn.Module):
    """``(1 / B) Σ_i (1 − cos(s_i, t_i))``."""

    def forward(self, batch: DistillBatch) -> Tensor:
        with torch.autocast(batch.student_logits.device.type, enabled=False):
            s, t = _embeddings(batch, "embed_cosine")
            return (1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean()


def cosine_matrix(e: Tensor) -> Tensor:
    """``Ê Êᵀ`` for ``Ê`` the rows of ``e`` ``[B, D]`` scaled to unit L2 norm: ``[B, B]``."""
    unit = F.normalize(e, dim=1, eps=1e-12)
    return unit @ unit.t()


class EmbedRelational(nn.Module):
    """``Σ_{i≠j} (ŝ_i·ŝ_j − t̂_i·t̂_j)² / (B(B−1))``; 0 when ``B < 2``."""

    def forward(self, batch: DistillBatch) -> Tensor:
        with torch.autocast(batch.student_logits.device.type, enabled=False):
            s, t = _embeddings(batch, "embed_relational", same_width=False)
            b = s.shape[0]
            if b < 2:
                return s.sum() * 0.0
            off = ~torch.eye(b, dtype=torch.bool, device=s.device)
            sq = (cosine_matrix(s) - cosine_matrix(t)).pow(2)
            return sq.where(off, 0.0).sum() / (b * (b - 1))


@LOSSES.register("embed_mse")
def embed_mse(ctx: LossContext) -> nn.Module:
    """Embedding MSE: ``(1 / (B·D)) Σ_i Σ_d (s_id − t_id)²`` (mean over batch and dims).
    Student and teacher widths must be equal (else an `InputError` at the first batch)."""
    return EmbedMSE()


@LOSSES.register("embed_cosine")
def embed_cosine(ctx: LossContext) -> nn.Module:
    """Embedding cosine distance: ``(1 / B) Σ_i (1 − s_i·t_i / (‖s_i‖ ‖t_i‖))``, in [0, 2].
    Student and teacher widths must be equal (else an `InputError` at the first batch)."""
    return EmbedCosine()


@LOSSES.register("embed_relational")
def embed_relational(ctx: LossContext) -> nn.Module:
    """Relational (similarity-matrix) distillation: with ``S_s = Ŝ Ŝᵀ`` and ``S_t = T̂ T̂ᵀ``
    the batch cosine-similarity matrices (rows L2-normalised),
    ``Σ_{i≠j} (S_s,ij − S_t,ij)² / (B(B−1))``: the MSE over the off-diagonal entries
    only (the diagonal is 1 on both sides and would only dilute the value); 0 for a batch
    of 1. No temperature. Student and teacher widths may differ (``S`` is ``[B, B]``)."""
    return EmbedRelational()


def _path_list(value: object) -> list[str] | None:
    """One path or a list/tuple of paths as a list of strings (None for anything else)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _mapping(name: str, student: object, teacher: object) -> list[tuple[str, str]]:
    """The (student path, teacher path) layer mapping; unequal or empty lists are an
    `InputError` naming ``student`` / ``teacher``."""
    s, t = _path_list(student), _path_list(teacher)
    if s is None or t is None:
        raise InputError(f"{name}: student and teacher must be module paths or lists of paths, "
                         f"got {student!r} and {teacher!r}")
    if not s or len(s) != len(t):
        raise InputError(f"{name}: student and teacher must list the same number (>= 1) of "
                         f"module paths (the layer mapping), got {len(s)} and {len(t)}")
    return list(zip(s, t, strict=True))


def _shape(ctx: LossContext, name: str, path: str, side: str, rank: int) -> tuple[int, ...]:
    """The dry-run shape of ``path`` (batch dim included), which must have ``rank`` dims."""
    shapes = ctx.student_shapes if side == "student" else ctx.teacher_shapes
    if path not in shapes:
        raise InputError(f"{name}: the {side} output shape at module path {path!r} is unknown")
    shape = tuple(int(d) for d in shapes[path])
    if len(shape) != rank:
        raise InputError(f"{name}: {side} feature at {path!r} has shape {list(shape)}; expected "
                         f"{rank} dims")
    return shape


def _feature(batch: DistillBatch, name: str, path: str, side: str, hint: str = "") -> Tensor:
    """The captured feature at ``path`` in float32 (teacher side detached)."""
    feats = batch.student_features if side == "student" else batch.teacher_features
    f = feats.get(path)
    if not isinstance(f, Tensor):
        raise InputError(f"{name}: no {side} feature captured at module path {path!r}{hint}")
    return f.float() if side == "student" else f.detach().float()


def _token_mask(batch: DistillBatch, name: str, b: int, length: int, device: torch.device) -> Tensor:
    """``batch.token_mask`` as bool ``[B, L]`` (all True when None); a shape that differs
    from the features' ``[B, L]`` is an `InputError`."""
    if batch.token_mask is None:
        return torch.ones(b, length, dtype=torch.bool, device=device)
    m = batch.token_mask.to(device=device, dtype=torch.bool)
    if tuple(m.shape) != (b, length):
        raise InputError(f"{name}: token_mask has shape {list(m.shape)} but the features are "
                         f"[B={b}, L={length}]")
    return m


class HiddenMSE(nn.Module):
    """``mean_pairs Σ_{b,l: m_bl} ‖A_p(h^s_bl) − h^t_bl‖² / (Σ m · H_t)``."""

    def __init__(self, pairs: list[tuple[str, str]], adapters: list[nn.Module]) -> None:
        super().__init__()
        self.pairs = pairs
        self.adapters = nn.ModuleList(adapters)

    def pair(self, batch: DistillBatch, i: int) -> Tensor:
        s_path, t_path = self.pairs[i]
        hs = self.adapters[i](_feature(batch, "hidden_mse", s_path, "student"))
        ht = _feature(batch, "hidden_mse", t_path, "teacher")
        if hs.dim() != 3 or ht.dim() != 3 or hs.shape != ht.shape:
            raise InputError(f"hidden_mse: student {s_path!r} (adapted {list(hs.shape)}) and teacher "
                             f"{t_path!r} {list(ht.shape)} hidden states must both be [B, L, H] "
                             f"with the same B and L (sequence lengths differ?)")
        m = _token_mask(batch, "hidden_mse", hs.shape[0], hs.shape[1], hs.device)
        sq = (hs - ht).pow(2).sum(dim=-1).where(m, 0.0)
        return sq.sum() / (m.sum() * ht.shape[-1]).clamp(min=1)

    def forward(self, batch: DistillBatch) -> Tensor:
        with torch.autocast(batch.student_logits.device.type, enabled=False):
            total = sum(self.pair(batch, i) for i in range(len(self.pairs)))
            return total / len(self.pairs)


@LOSSES.register("hidden_mse")
def hidden_mse(ctx: LossContext, student: str | list[str], teacher: str | list[str]) -> nn.Module:
    """Hidden-state MSE over real tokens, averaged over the layer mapping:
    ``(1/P) Σ_p Σ_{b,l: m_bl} ‖A_p(h^s_p,bl) − h^t_p,bl‖² / (Σ_bl m_bl · H_t)``.

    ``h^s_p`` / ``h^t_p`` are the ``[B, L, H]`` outputs of student path ``p`` / teacher path
    ``p``; ``A_p`` is a learned ``Linear(H_s, H_t)`` when the widths (from
    ``ctx.student_shapes`` / ``ctx.teacher_shapes``) differ, else the identity. Unequal
    list lengths are an `InputError` naming student / teacher; so are unknown or non-3-D
    shapes and, at the first batch, sequence lengths that differ between the two sides.
    """
    pairs = _mapping("hidden_mse", student, teacher)
    adapters: list[nn.Module] = []
    for s_path, t_path in pairs:
        s_shape = _shape(ctx, "hidden_mse", s_path, "student", 3)
        t_shape = _shape(ctx, "hidden_mse", t_path, "teacher", 3)
        if s_shape[1] != t_shape[1]:
            raise InputError(f"hidden_mse: student {s_path!r} and teacher {t_path!r} have sequence "
                             f"lengths {s_shape[1]} and {t_shape[1]}; both must read the same tokens")
        adapters.append(nn.Identity() if s_shape[2] == t_shape[2] else nn.Linear(s_shape[2], t_shape[2]))
    return HiddenMSE(pairs, adapters)


def _probs(batch: DistillBatch, path: str, side: str) -> Tensor:
    """Attention probabilities ``[B, H, L, L]`` captured at ``path``."""
    hint = f" (attention probabilities need eager attention: {EAGER_HINT})"
    p = _feature(batch, "attention_kl", path, side, hint)
    if p.dim() != 4 or p.shape[-1] != p.shape[-2]:
        raise InputError(f"attention_kl: {side} capture at {path!r} has shape {list(p.shape)}, not "
                         f"attention probabilities [B, H, L, L]; use the '#1' element of an "
                         f"attention module and {EAGER_HINT}")
    return p


def _restrict(p: Tensor, keys: Tensor) -> Tensor:
    """``p`` over the real keys only, renormalised to sum 1 per query row."""
    p = p.where(keys, 0.0)
    return p / p.sum(dim=-1, keepdim=True).clamp(min=PROB_EPS)


class AttentionKL(nn.Module):
    """``mean_pairs Σ_{b,h,q: m_bq} KL(P^t_bhq ‖ P^s_bhq) / (H · Σ m)`` over real keys."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        super().__init__()
        self.pairs = pairs

    def pair(self, batch: DistillBatch, i: int) -> Tensor:
        s_path, t_path = self.pairs[i]
        ps, pt = _probs(batch, s_path, "student"), _probs(batch, t_path, "teacher")
        if ps.shape[0] != pt.shape[0] or ps.shape[2:] != pt.shape[2:]:
            raise InputError(f"attention_kl: student {s_path!r} {list(ps.shape)} and teacher "
                             f"{t_path!r} {list(pt.shape)} differ in batch or sequence length")
        if ps.shape[1] != pt.shape[1]:  # different head counts: compare head-averaged maps
            ps, pt = ps.mean(dim=1, keepdim=True), pt.mean(dim=1, keepdim=True)
        b, h, length = ps.shape[0], ps.shape[1], ps.shape[-1]
        m = _token_mask(batch, "attention_kl", b, length, ps.device)
        keys, queries = m[:, None, None, :], m[:, None, :].expand(b, h, length)
        ps, pt = _restrict(ps, keys), _restrict(pt, keys)
        kl = (torch.xlogy(pt, pt) - pt * ps.clamp(min=PROB_EPS).log()).where(keys, 0.0).sum(-1)
        return kl.where(queries, 0.0).sum() / queries.sum().clamp(min=1)

    def forward(self, batch: DistillBatch) -> Tensor:
        with torch.autocast(batch.student_logits.device.type, enabled=False):
            total = sum(self.pair(batch, i) for i in range(len(self.pairs)))
            return total / len(self.pairs)


@LOSSES.register("attention_kl")
def attention_kl(ctx: LossContext, student: str | list[str], teacher: str | list[str]) -> nn.Module:
    """Attention-distribution KL (MiniLM / TinyBERT style), averaged over the mapping:
    ``(1/P) Σ_p (1 / (H·Σ_bq m_bq)) Σ_{b,h,q: m_bq} Σ_{k: m_bk} P^t_bhqk (log P^t_bhqk − log P^s_bhqk)``.

    ``P`` are the attention probabilities ``[B, H, L, L]`` captured at paths ending in
    ``#k`` (``bert.encoder.layer.<i>.attention.self#1``), restricted to the real keys and
    renormalised per query row; only real query rows count. When the head counts differ
    both sides are averaged over heads first (``H = 1``). ``log P^s`` is clamped at
    ``log 1e-12`` (attention dropout can zero a student probability). A path without the
    ``#k`` suffix, unequal lists, or (at the first batch) a capture that is missing / None /
    not 4-D is an `InputError` (the latter saying to set the model's args ``attn: eager``).
    """
    pairs = _mapping("attention_kl", student, teacher)
    for s_path, t_path in pairs:
        for side, path in (("student", s_path), ("teacher", t_path)):
            if "#" not in path:
                raise InputError(f"attention_kl: {side} path {path!r} must end in '#1' (element 1 "
                                 f"of an attention module's output: its probabilities)")
            shapes = ctx.student_shapes if side == "student" else ctx.teacher_shapes
            if path in shapes and (len(shapes[path]) != 4 or shapes[path][-1] != shapes[path][-2]):
                raise InputError(f"attention_kl: {side} capture at {path!r} has shape "
                                 f"{list(shapes[path])}, not attention probabilities [B, H, L, L]; "
                                 f"{EAGER_HINT}")
    return AttentionKL(pairs)
