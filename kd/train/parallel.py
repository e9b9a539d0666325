"""Data-parallel helpers: the worker's rank and world, all-reduce, DDP / FSDP2 wrapping,
gradient sync per accumulation window, averaging the gradients of parameters outside
DDP/FSDP, every rank's RNG state."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from kd.config import Experiment


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def world_info() -> tuple[int, int]:
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def all_reduce(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def is_fsdp(model: nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync")


def state_container(trainee: nn.Module, loss: nn.Module) -> nn.Module:
    """Trainee and loss adapters under one root, so FSDP's state-dict helpers can
    name every parameter the optimizer holds."""
    return nn.ModuleDict({"trainee": trainee, "loss": loss})


def rng_states(world: int) -> list[torch.Tensor]:
    """Every worker's torch RNG state, rank order (a collective when world > 1)."""
    mine = torch.get_rng_state()
    if world <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [mine]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, mine)
    return out


def grad_sync(model: nn.Module, sync: bool) -> Any:
    """Context for one micro-step: DDP ``no_sync()`` / FSDP2
    ``set_requires_gradient_sync(False)`` when ``sync`` is False, else nothing."""
    if sync:
        if is_fsdp(model):
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if is_fsdp(model):
        model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def average_grads(params: list[nn.Parameter], world: int) -> None:
    """All-reduce mean of the gradients of parameters outside DDP/FSDP (the loss's
    adapters, e.g. FitNets regressors), so every worker steps the same way.

    Every rank issues the same single all-reduce every call, whatever its grads: a
    missing grad (the confidence filter kept no sample on this rank, so the adapter
    was not used) counts as a zero grad. A parameter that no rank has a grad for keeps
    ``grad = None`` (the optimizer skips it on every rank alike)."""
    if world <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                      for p in params]
                     + [torch.tensor([float(p.grad is not None) for p in params],
                                     device=params[0].device)])
    torch.distributed.all_reduce(flat)
    had = flat[-len(params):]
    offset = 0
    for i, p in enumerate(params):
        n = p.numel()
        if float(had[i]) > 0:
            p.grad = (flat[offset:offset + n] / world).view_as(p).to(p.dtype)
        else:
            p.grad = None
        offset += n


def is_sharded(t: torch.Tensor) -> bool:
    """True for an FSDP2 DTensor: a parameter (or its grad) split across the ranks."""
    return hasattr(t, "to_local")


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, world: int) -> torch.Tensor:
    """Scale the gradients of ``params`` by ``min(1, max_norm / (‖g‖ + 1e-6))``, where
    ``‖g‖ = sqrt(Σ ‖g_p‖²)`` is the L2 norm of all of them together; returns ``‖g‖``.

    Under FSDP2 the trainee's grads are DTensors sharded across the ranks, the adapters'
    plain tensors (equal on every rank after `average_grads`): the shards' squared norms
    are summed over the ranks by one all-reduce, which every rank issues whenever a
    parameter is a DTensor (the same on every rank), grads or not. Without DTensors it
    is ``torch.nn.utils.clip_grad_norm_``."""
    if not any(is_sharded(p) for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    shards = [g.to_local() for g in grads if is_sharded(g)]
    plain = [g for g in grads if not is_sharded(g)]
    device = next(p.to_local().device for p in params if is_sharded(p))
    sq = torch.zeros((), device=device)
    for g in shards:
        sq += g.float().pow(2).sum()
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sq)  # the shards partition each parameter
    for g in plain:
        sq += g.float().pow(2).sum().to(device)
    total = sq.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in shards + plain:
        g.mul_(coef.to(g.device, g.dtype))
    return total


def _fsdp_api() -> tuple[Any, Any]:
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6 keeps FSDP2 under _composable
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return MixedPrecisionPolicy, fully_shard


def _shard(model: nn.Module, exp: Experiment, device: torch.device) -> nn.Module:
    """FSDP2: each child with parameters is a shard unit, then the root; with
    ``precision: bf16`` parameters are cast to bf16 for compute, reductions in fp32.
    Batch norms stay in fp32 under bf16 (FSDP1's default too): each is its own unit
    with fp32 parameters that leaves its input bf16, so ``batch_norm`` gets bf16 input
    with fp32 weight and fp32 running statistics, a mix its kernels take (bf16 weights
    beside fp32 running statistics are refused: "expected scalar type BFloat16")."""
    policy_cls, fully_shard = _fsdp_api()
    model.to(device)
    mp = (policy_cls(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if exp.trainer.precision == "bf16" else policy_cls())
    norms = [m for m in model.modules() if m is not model and any(True for _ in m.parameters())
             and isinstance(m, nn.modules.batchnorm._BatchNorm)] if exp.trainer.precision == "bf16" else []
    fp32 = policy_cls(param_dtype=torch.float32, reduce_dtype=torch.float32,
                      cast_forward_inputs=False)
    for norm in norms:
        fully_shard(norm, mp_policy=fp32)
    for child in model.children():
        if child not in norms and any(True for _ in child.parameters()):
            fully_shard(child, mp_policy=mp)
    return fully_shard(model, mp_policy=mp)


def place_teacher(teacher: nn.Module, exp: Experiment, device: torch.device) -> nn.Module:
    """A frozen teacher on this worker: replicated (moved to the device) by default;
    with ``teacher.shard`` and ``scaling.strategy: fsdp`` sharded by FSDP2 across the
    workers (parameters all-gathered per unit in forward, freed after), for teachers
    too large for one device. Teachers have no gradients, so nothing is synchronised."""
    if exp.teacher is not None and exp.teacher.shard and exp.scaling.strategy == "fsdp":
        return _shard(teacher, exp, device)
    return teacher.to(device)


def prepare(model: nn.Module, exp: Experiment, device: torch.device) -> nn.Module:
    """Move to the device and wrap the trainee for data parallelism: DDP via Ray's
    ``prepare_model``, or FSDP2 ``fully_shard`` for ``scaling.strategy: fsdp`` (each
    child with parameters is a shard unit, then the root; with ``precision: bf16``
    parameters are cast to bf16 for compute and gradients reduced in fp32).
    Teachers never pass through here (see `place_teacher`): they are frozen and have
    no gradients to synchronise."""
    import ray.train.torch

    if exp.scaling.strategy == "fsdp":
        return _shard(model, exp, device)
    return ray.train.torch.prepare_model(model, move_to_device=device)


def lockstep(batches: Iterable[Any], world: int, device: torch.device) -> Iterator[Any]:
    """Yield this rank's batches, then None, until every rank's are exhausted: before
    each item the ranks all-reduce (max) whether any still has one, so all ranks run the
    same number of iterations. A rank handed None (or a batch with no rows of its own)
    must still run a padding forward: FSDP's forward is a collective (it all-gathers the
    parameters), so evaluation needs equal forwards on every rank."""
    it = iter(batches)
    if world <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        yield from it
        return
    while True:
        item = next(it, None)
        more = torch.tensor([0.0 if item is None else 1.0], device=device)
        torch.distributed.all_reduce(more, op=torch.distributed.ReduceOp.MAX)
        if float(more.item()) == 0:
            return
        yield item
