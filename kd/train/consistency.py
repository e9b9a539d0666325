"""Rank consistency: every rank holds the same trainee and loss adapters, issues the
same collectives, and restores the same checkpoint.

- `broadcast_state` copies rank 0's parameters and buffers to every rank (at start and
  after a restore), so adapters built from random init (FitNets, bn_stats) agree.
- `check_ranks_agree` all-gathers a checksum of trainee + loss state and raises,
  naming the ranks, when they differ (run at every checkpoint: a cheap invariant).
- `decide_restore` lets rank 0 alone choose the checkpoint (`load_latest_good`), broadcasts
  its path, and makes all ranks load that one or all fail with every rank's reason.

Every function is a collective when ``world > 1`` with an initialised process group:
all ranks must call it, in the same order. With one process they are plain local code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd.train.checkpoint import load_latest_good, read_checkpoint
from kd.train.parallel import is_fsdp


def distributed(world: int) -> bool:
    """True when ``world > 1`` and a torch process group is up (collectives apply)."""
    return (world > 1 and torch.distributed.is_available()
            and torch.distributed.is_initialized())


def _tensors(modules: list[nn.Module]) -> list[torch.Tensor]:
    """Every parameter and buffer of ``modules``, in a fixed (name) order."""
    out: list[torch.Tensor] = []
    for m in modules:
        for _, t in sorted(m.state_dict(keep_vars=True).items()):
            if isinstance(t, torch.Tensor):
                out.append(t)
    return out


def replicated(trainee: nn.Module, loss: nn.Module) -> list[nn.Module]:
    """The modules every rank holds whole: the loss, and the trainee unless FSDP shards
    it (each rank then holds its own shard; FSDP keeps those consistent itself)."""
    return [loss] if is_fsdp(trainee) else [trainee, loss]


def broadcast_state(modules: list[nn.Module], world: int, device: torch.device) -> None:
    """Overwrite every rank's parameters and buffers with rank 0's (in place). Each
    tensor travels through ``device`` (NCCL broadcasts only CUDA tensors)."""
    if not distributed(world):
        return
    with torch.no_grad():
        for t in _tensors(modules):
            buf = t.data.to(device)
            torch.distributed.broadcast(buf, src=0)
            if buf is not t.data:
                t.data.copy_(buf)


def state_checksum(modules: list[nn.Module]) -> list[float]:
    """[sum, position-weighted sum] in float64 over every parameter and buffer: equal
    on two ranks whose states are bitwise equal, and sensitive to any drift."""
    total, weighted = 0.0, 0.0
    with torch.no_grad():
        for i, t in enumerate(_tensors(modules)):
            v = t.detach().double().cpu()
            if v.numel() == 0:
                continue
            total += float(v.sum())
            pos = torch.arange(1, v.numel() + 1, dtype=torch.float64)
            weighted += float((v.flatten() * pos).sum()) * (i + 1)
    return [total, weighted]


def check_ranks_agree(modules: list[nn.Module], world: int, what: str) -> None:
    """Raise RuntimeError when any rank's state checksum differs from rank 0's."""
    if not distributed(world):
        return
    mine = state_checksum(modules)
    every: list[Any] = [None] * world
    torch.distributed.all_gather_object(every, mine)
    bad = [r for r, c in enumerate(every) if c != every[0]]
    if bad:
        raise RuntimeError(f"ranks disagree on the trainee + loss state {what}: rank(s) {bad} "
                           f"checksum {[every[r] for r in bad]} vs rank 0 {every[0]}")


def decide_restore(candidates: list[Any], fs: Any, rank: int, world: int, verbose: bool,
                   device: torch.device | None = None) -> dict[str, Any] | None:
    """The checkpoint every rank resumes from, chosen once.

    Rank 0 runs `load_latest_good` over ``candidates`` and broadcasts the chosen path
    (or its error, or "none"); the other ranks load exactly that path from ``fs``. A
    flag is all-reduced: if any rank failed, every rank raises RuntimeError with each
    failing rank's reason. Without a process group this is `load_latest_good`."""
    if not distributed(world):
        return load_latest_good(candidates, verbose=verbose)
    choice: list[Any] = [None]
    restored: dict[str, Any] | None = None
    error = ""
    if rank == 0:
        try:
            restored = load_latest_good(candidates, verbose=verbose)
            choice[0] = ("ok", restored["path"] if restored is not None else None)
        except Exception as e:  # broadcast, then every rank raises it together
            error = f"rank 0: {e}"
            choice[0] = ("error", error)
    torch.distributed.broadcast_object_list(choice, src=0)
    status, value = choice[0]
    if rank != 0 and status == "ok" and value is not None:
        restored, error = _load_path(fs, value)
        error = f"rank {rank}: {error}" if error else ""
    elif rank != 0 and status == "error":
        error = value
    flags = torch.tensor([1.0 if error else 0.0], device=device)
    torch.distributed.all_reduce(flags)
    if float(flags[0]) > 0:
        reasons: list[Any] = [None] * world
        torch.distributed.all_gather_object(reasons, error)
        raise RuntimeError("restore failed on every rank (decided once by rank 0): "
                           + "; ".join(sorted({r for r in reasons if r})))
    return restored


def _load_path(fs: Any, path: str) -> tuple[dict[str, Any] | None, str]:
    """(checkpoint, "") read from ``path``, or (None, the reason it failed)."""
    import ray.train

    try:
        with ray.train.Checkpoint(path, filesystem=fs).as_directory() as d:
            out = read_checkpoint(Path(d), path)
        out["path"] = path
        return out, ""
    except Exception as e:  # read_checkpoint's errors already name the file
        msg = str(e)
        return None, msg if path.rstrip("/") in msg else f"{path}: {msg}"
