"""Feature-based distillation losses: ``fitnet``, ``at``, ``rkd``, ``pkt``, ``sp``, ``bn_stats``.

``student`` / ``teacher`` params are module paths whose outputs kdflow hooks into
``batch.student_features`` / ``batch.teacher_features``. ``fitnet``, ``at``, ``rkd``,
``pkt`` and ``sp`` also accept equal-length lists of paths: pairs are zipped and
their losses summed. Teacher features are detached. ``f_s`` / ``f_t`` are the
student / teacher features, ``B`` the batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.errors import InputError
from kd.losses.base import LOSSES, DistillBatch, LossContext, check_number


def _pairs(name: str, student: str | list[str], teacher: str | list[str]) -> list[tuple[str, str]]:
    """Zip the ``student`` and ``teacher`` path params into (student, teacher) pairs."""
    s = [student] if isinstance(student, str) else [str(p) for p in student]
    t = [teacher] if isinstance(teacher, str) else [str(p) for p in teacher]
    if not s or len(s) != len(t):
        raise InputError(
            f"{name}: student and teacher must name the same number (>= 1) of module paths, "
            f"got {len(s)} and {len(t)}"
        )
    return list(zip(s, t, strict=True))


def _features(batch: DistillBatch, s_path: str, t_path: str | None) -> tuple[Tensor, Tensor | None]:
    """The hooked student feature and (detached) teacher feature for a pair of paths."""
    if s_path not in batch.student_features:
        raise InputError(f"no student feature captured at module path {s_path!r}")
    if t_path is None:
        return batch.student_features[s_path], None
    if t_path not in batch.teacher_features:
        raise InputError(f"no teacher feature captured at module path {t_path!r}")
    return batch.student_features[s_path], batch.teacher_features[t_path].detach()


def _pool_to_common(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool 4-D features to the smaller of the two spatial sizes."""
    if f_s.dim() != 4 or f_t.dim() != 4 or f_s.shape[2:] == f_t.shape[2:]:
        return f_s, f_t
    size = (min(f_s.shape[2], f_t.shape[2]), min(f_s.shape[3], f_t.shape[3]))
    if tuple(f_s.shape[2:]) != size:
        f_s = F.adaptive_avg_pool2d(f_s, size)
    if tuple(f_t.shape[2:]) != size:
        f_t = F.adaptive_avg_pool2d(f_t, size)
    return f_s, f_t


def _adapter(name: str, path: str, s_shape: tuple[int, ...], c_out: int) -> nn.Module:
    """A learned 1x1 conv (4-D ``[B,C,H,W]``) or Linear (2-D ``[B,C]``) to ``c_out`` channels."""
    if len(s_shape) == 4:
        return nn.Conv2d(s_shape[1], c_out, kernel_size=1)
    if len(s_shape) == 2:
        return nn.Linear(s_shape[1], c_out)
    raise InputError(f"{name}: feature at {path!r} must be 2-D or 4-D, got shape {list(s_shape)}")


def _shape(shapes: dict, path: str, side: str, name: str) -> tuple[int, ...]:
    if path not in shapes:
        raise InputError(f"{name}: the {side} output shape at module path {path!r} is unknown")
    return tuple(int(d) for d in shapes[path])


class PairLoss(nn.Module):
    """A loss summed over (student path, teacher path) pairs: ``Σ_i pair(f_s_i, f_t_i, i)``."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        super().__init__()
        self.pairs = pairs

    def pair(self, f_s: Tensor, f_t: Tensor, i: int) -> Tensor:
        """The loss of pair ``i`` (student feature, detached teacher feature)."""
        raise NotImplementedError

    def forward(self, batch: DistillBatch) -> Tensor:
        total = batch.student_logits.new_zeros(())
        for i, (s_path, t_path) in enumerate(self.pairs):
            f_s, f_t = _features(batch, s_path, t_path)
            total = total + self.pair(f_s, f_t, i)
        return total


class FitNetLoss(PairLoss):
    """``Σ_pairs MSE(adapter(f_s), f_t)`` (mean over all elements)."""

    def __init__(self, pairs: list[tuple[str, str]], adapters: list[nn.Module]) -> None:
        super().__init__(pairs)
        self.adapters = nn.ModuleList(adapters)

    def pair(self, f_s: Tensor, f_t: Tensor, i: int) -> Tensor:
        with torch.autocast(f_s.device.type, enabled=False):  # float32, like the others
            f_s, f_t = _pool_to_common(self.adapters[i](f_s.float()), f_t.float())
            return F.mse_loss(f_s, f_t)


@LOSSES.register("fitnet")
def fitnet(ctx: LossContext, student: str | list[str], teacher: str | list[str]) -> nn.Module:
    """FitNets hints (Romero et al., 2015): ``mean((adapter(f_s) − f_t)²)``, in float32.

    The adapter is a learned 1x1 conv (4-D) or Linear (2-D) from the student's to the
    teacher's channels, sized from ``ctx.student_shapes`` / ``ctx.teacher_shapes``
    (missing shapes are an `InputError`); differing spatial sizes are adaptive-avg-pooled
    to the smaller one. Its parameters must be trained with the student.
    """
    pairs = _pairs("fitnet", student, teacher)
    adapters = []
    for s_path, t_path in pairs:
        s_shape = _shape(ctx.student_shapes, s_path, "student", "fitnet")
        t_shape = _shape(ctx.teacher_shapes, t_path, "teacher", "fitnet")
        if len(s_shape) != len(t_shape):
            raise InputError(
                f"fitnet: student {s_path!r} {list(s_shape)} and teacher {t_path!r} "
                f"{list(t_shape)} features have different ranks"
            )
        adapters.append(_adapter("fitnet", s_path, s_shape, t_shape[1]))
    return FitNetLoss(pairs, adapters)


def attention_map(f: Tensor, p: float = 2.0) -> Tensor:
    """``a(f) = normalize(mean_c |f|^p flattened)``: ``[B, H·W]``, unit L2 norm per row,
    in float32. The absolute value is the paper's: signed (pre-ReLU) features with an odd
    ``p`` would otherwise give signed maps, and a fractional ``p`` NaN."""
    return F.normalize(f.float().abs().pow(p).mean(dim=1).reshape(f.shape[0], -1), dim=1)


class ATLoss(PairLoss):
    """``Σ_pairs mean((a(f_s) − a(f_t))²)`` over batch and positions."""

    def __init__(self, pairs: list[tuple[str, str]], p: float) -> None:
        super().__init__(pairs)
        self.p = p

    def pair(self, f_s: Tensor, f_t: Tensor, i: int) -> Tensor:
        if f_s.dim() != 4 or f_t.dim() != 4:
            s_path, t_path = self.pairs[i]
            raise InputError(f"at: features at {s_path!r} / {t_path!r} must be 4-D")
        f_s, f_t = _pool_to_common(f_s, f_t)
        return (attention_map(f_s, self.p) - attention_map(f_t, self.p)).pow(2).mean()


@LOSSES.register("at")
def at(
    ctx: LossContext, student: str | list[str], teacher: str | list[str], p: float = 2.0
) -> nn.Module:
    """Attention transfer (Zagoruyko & Komodakis, 2017), mdistiller/torchdistill form:
    ``mean((a(f_s) − a(f_t))²)``, ``a(f) = normalize(mean_c |f|^p flattened)``, summed
    over path pairs. Spatial sizes are adaptive-avg-pooled to the smaller one; channel
    counts may differ. Typically weighted ~1000. ``p`` must be a finite number > 0."""
    return ATLoss(_pairs("at", student, teacher), check_number(p, "p", positive=True))


def _pdist(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Pairwise euclidean distances ``[B, B]`` with an exactly-zero diagonal."""
    sq = e.pow(2).sum(dim=1)
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps)
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return d2.sqrt().masked_fill(eye, 0.0)


def _normalised_pdist(e: Tensor) -> Tensor:
    """Distances divided by their mean over the non-zero pairs (1 when there are none)."""
    d = _pdist(e)
    nonzero = (d > 0).sum().clamp(min=1)
    return d / (d.sum() / nonzero).clamp(min=1e-12)


def _angles(e: Tensor) -> Tensor:
    """``cos∠(e_j − e_i, e_k − e_i)`` for all triplets, flattened ``[B³]``."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)


class RKDLoss(PairLoss):
    """``w_d · smoothL1(ψ_D(f_s), ψ_D(f_t)) + w_a · smoothL1(ψ_A(f_s), ψ_A(f_t))``, summed
    over pairs."""

    def __init__(self, pairs: list[tuple[str, str]], w_d: float, w_a: float) -> None:
        super().__init__(pairs)
        self.w_d, self.w_a = w_d, w_a

    def pair(self, f_s: Tensor, f_t: Tensor, i: int) -> Tensor:
        s, t = f_s.reshape(f_s.shape[0], -1).float(), f_t.reshape(f_t.shape[0], -1).float()
        out = s.new_zeros(())
        if self.w_d:
            out = out + self.w_d * F.smooth_l1_loss(_normalised_pdist(s), _normalised_pdist(t))
        if self.w_a:
            out = out + self.w_a * F.smooth_l1_loss(_angles(s), _angles(t))
        return out


@LOSSES.register("rkd")
def rkd(
    ctx: LossContext,
    student: str | list[str],
    teacher: str | list[str],
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> nn.Module:
    """Relational KD (Park et al., 2019) on features flattened to ``[B, D]``:
    ``distance_weight · smoothL1(d_s/μ_s, d_t/μ_t) + angle_weight · smoothL1(A_s, A_t)``
    where ``d`` are pairwise euclidean distances, ``μ`` their mean over non-zero pairs,
    and ``A_ijk = cos∠(e_j − e_i, e_k − e_i)``; smooth-L1 with beta 1, mean reduction.
    Student and teacher dims may differ. Memory O(B²·D) for the angle term."""
    return RKDLoss(_pairs("rkd", student, teacher), float(distance_weight), float(angle_weight))


def _cosine_conditional(e: Tensor, eps: float) -> Tensor:
    """PKT kernel: ``K = (cos(e_i, e_j) + 1)/2``, each row normalised to sum 1."""
    e = e / (e.norm(dim=1, keepdim=True) + eps)
    k = (e @ e.t() + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


class PKTLoss(PairLoss):
    """``mean_ij P^t_ij · log((P^t_ij + eps) / (P^s_ij + eps))``, summed over pairs."""

    def __init__(self, pairs: list[tuple[str, str]], eps: float = 1e-7) -> None:
        super().__init__(pairs)
        self.eps = eps

    def pair(self, f_s: Tensor, f_t: Tensor, i: int) -> Tensor:
        p_s = _cosine_conditional(f_s.reshape(f_s.shape[0], -1).float(), self.eps)
        p_t = _cosine_conditional(f_t.reshape(f_t.shape[0], -1).float(), self.eps)
        return (p_t * torch.log((p_t + self.eps) / (p_s + self.eps))).mean()


@LOSSES.register("pkt")
def pkt(ctx: LossContext, student: str | list[str], teacher: str | list[str]) -> nn.Module:
    """Probabilistic knowledge transfer (Passalis & Tefas, 2018), on flattened features:
    ``P_ij = K_ij / Σ_j K_ij`` with ``K_ij = (cos(f_i, f_j) + 1)/2``; loss
    ``mean_ij P^t_ij · log((P^t_ij + ε)/(P^s_ij + ε))``, ``ε = 1e-7`` (mean over all B²
    entries, as in the reference code, i.e. KL(teacher ‖ student) per row / B)."""
    return PKTLoss(_pairs("pkt", student, teacher))


def _similarity(f: Tensor) -> Tensor:
    """``G = normalize(F Fᵀ)`` row-wise (L2) for ``F`` the flattened ``[B, D]`` features."""
    flat = f.reshape(f.shape[0], -1).float()
    return F.normalize(flat @ flat.t(), dim=1)


class SPLoss(PairLoss):
    """``Σ_pairs ‖G_s − G_t‖_F² / B²``."""

    def pair(self, f_s: Tensor, f_t: Tensor, i: int) -> Tensor:
        b = f_s.shape[0]
        return (_similarity(f_s) - _similarity(f_t)).pow(2).sum() / (b * b)


@LOSSES.register("sp")
def sp(ctx: LossContext, student: str | list[str], teacher: str | list[str]) -> nn.Module:
    """Similarity-preserving KD (Tung & Mori, 2019): ``‖G_s − G_t‖_F² / B²`` with
    ``G = normalize(F Fᵀ)`` row-wise over flattened features. Typically weighted ~3000."""
    return SPLoss(_pairs("sp", student, teacher))


class BNStatsLoss(nn.Module):
    """``mean_c[(μ_s,c − μ_t,c)² + (σ²_s,c − σ²_t,c)²]`` against fixed teacher running stats."""

    def __init__(
        self, path: str, mean: Tensor, var: Tensor, adapter: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.path, self.adapter = path, adapter
        self.register_buffer("running_mean", mean.detach().clone().float(), persistent=False)
        self.register_buffer("running_var", var.detach().clone().float(), persistent=False)

    def forward(self, batch: DistillBatch) -> Tensor:
        f, _ = _features(batch, self.path, None)
        if self.adapter is not None:
            f = self.adapter(f)
        if f.dim() not in (2, 4) or f.shape[1] != self.running_mean.numel():
            raise InputError(
                f"bn_stats: feature at {self.path!r} has shape {list(f.shape)}; expected "
                f"[B, {self.running_mean.numel()}] or [B, {self.running_mean.numel()}, H, W]"
            )
        dims = [0] if f.dim() == 2 else [0, 2, 3]
        var, mean = torch.var_mean(f.float(), dim=dims, correction=0)
        return ((mean - self.running_mean).pow(2) + (var - self.running_var).pow(2)).mean()


@LOSSES.register("bn_stats")
def bn_stats(ctx: LossContext, student: str, teacher_bn: str) -> nn.Module:
    """BN-statistics matching: ``mean_c[(μ_s − μ_t)² + (σ²_s − σ²_t)²]``.

    ``μ_s, σ²_s`` are the per-channel batch mean and biased (population) variance of the
    student feature at ``student`` (4-D ``[B,C,H,W]`` or 2-D ``[B,C]``); ``μ_t, σ²_t`` the
    ``running_mean`` / ``running_var`` of the BatchNorm at ``teacher_bn`` in
    ``ctx.teachers[0]``, copied when the term is built. When ``ctx.student_shapes``
    shows a different channel count, a learned 1x1 conv / Linear adapter maps the
    student feature to the teacher's channels first.
    """
    if not ctx.teachers:
        raise InputError("bn_stats: needs a teacher model to read the BatchNorm statistics from")
    try:
        bn = ctx.teachers[0].get_submodule(teacher_bn)
    except AttributeError:
        raise InputError(f"bn_stats: teacher has no module at path {teacher_bn!r}") from None
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None:
        raise InputError(
            f"bn_stats: teacher module {teacher_bn!r} is {type(bn).__name__}, not a BatchNorm "
            f"with running statistics"
        )
    adapter = None
    if student in ctx.student_shapes:
        s_shape = tuple(int(d) for d in ctx.student_shapes[student])
        if len(s_shape) < 2:
            raise InputError(f"bn_stats: feature at {student!r} has shape {list(s_shape)}")
        if s_shape[1] != bn.running_mean.numel():
            adapter = _adapter("bn_stats", student, s_shape, bn.running_mean.numel())
    return BNStatsLoss(student, bn.running_mean, bn.running_var, adapter)
