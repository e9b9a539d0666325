"""The loop's data-parallel helpers in two real processes on CPU (gloo).

DDP: a micro-step under ``_grad_sync(sync=False)`` leaves gradients local (the
workers' differ), the final one all-reduces them; ``_average_grads`` makes the
loss adapters' gradients (outside DDP) equal on every worker.

FSDP2: ``fully_shard`` runs on CPU (gloo), so the loop's helpers are checked for
real in two spawned processes: sharding with the bf16 mixed-precision policy, gradient
sync switched off for a non-final micro-step, batch norms kept in fp32 under bf16
(train and eval forwards), the grad-norm clip over DTensor shards and plain adapter
grads, a foreach update with the adapter in its own param group, the full state dict
gathered for a checkpoint (model + optimizer including the loss adapter's parameters),
and that state restored into a freshly sharded model and optimizer.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.conftest import REPO, free_port


def _worker(rank: int, world: int, port: int) -> None:
    sys.path.insert(0, str(REPO))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.nn.parallel import DistributedDataParallel

    from kd.config import experiment_from_dict
    from kd.train.checkpoint import checkpoint_state
    from kd.train.checkpoint import restore_optimizer as _restore_optimizer
    from kd.train.optim import make_optimizer
    from kd.train.parallel import average_grads as _average_grads
    from kd.train.parallel import clip_grad_norm, place_teacher, prepare
    from kd.train.parallel import grad_sync as _grad_sync
    from kd.train.parallel import is_fsdp as _is_fsdp

    def same_on_all_ranks(t: torch.Tensor) -> bool:
        parts = [torch.zeros_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return all(torch.equal(parts[0], p) for p in parts[1:])

    torch.manual_seed(0)
    ddp = DistributedDataParallel(nn.Linear(4, 2))
    xr = torch.full((3, 4), float(rank + 1))
    with _grad_sync(ddp, sync=False):
        ddp(xr).sum().backward()
    assert not same_on_all_ranks(ddp.module.weight.grad)  # no_sync: still local
    with _grad_sync(ddp, sync=True):
        ddp(xr).sum().backward()
    assert same_on_all_ranks(ddp.module.weight.grad)  # the final micro-step syncs
    side = nn.Linear(4, 2)
    side(xr).sum().backward()
    assert not same_on_all_ranks(side.weight.grad)
    _average_grads(list(side.parameters()), world)
    assert same_on_all_ranks(side.weight.grad)

    # teacher.shard: a frozen teacher split across the workers computes what the whole one does
    teacher_exp = experiment_from_dict({"name": "x", "scaling": {"strategy": "fsdp"},
                                        "teacher": {"model": "mlp", "shard": True}})
    torch.manual_seed(5)
    full = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval().requires_grad_(False)
    sharded = place_teacher(copy.deepcopy(full), teacher_exp, torch.device("cpu"))
    assert sum(p.to_local().numel() for p in sharded.parameters()) < sum(
        p.numel() for p in full.parameters())  # each worker holds only its shard
    xt = torch.randn(5, 8) + rank
    with torch.no_grad():
        assert torch.allclose(sharded(xt), full(xt), atol=1e-6)
    replicated = place_teacher(copy.deepcopy(full), experiment_from_dict({"name": "x"}),
                               torch.device("cpu"))
    assert all(not hasattr(p, "to_local") for p in replicated.parameters())

    exp = experiment_from_dict({"name": "x", "scaling": {"strategy": "fsdp"},
                                "trainer": {"precision": "bf16"}})

    def build(seed: int) -> tuple[nn.Module, nn.Module]:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), nn.Linear(4, 4)

    # bf16 with batch norms (first run on a GPU failed: bf16 BN weights beside fp32
    # running statistics are refused): the norms keep fp32 parameters, take bf16 input
    torch.manual_seed(1)
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)), nn.Flatten(),
                         nn.Linear(16, 3))
    conv = prepare(conv, exp, torch.device("cpu"))
    xc = torch.randn(5, 1, 6, 6) + rank
    for _ in range(2):
        conv(xc).float().sum().backward()
    for bn in (conv[1], conv[3][1]):
        assert bn.running_mean.dtype == torch.float32 and bn.running_mean.abs().sum() > 0
        assert all(p.grad is not None and torch.isfinite(p.grad.full_tensor()).all()
                   for p in bn.parameters())
    assert conv.eval()(xc).dtype == torch.bfloat16  # bf16 compute everywhere else

    model, adapter = build(0)
    trainee = prepare(model, exp, torch.device("cpu"))
    assert _is_fsdp(trainee)
    opt = make_optimizer(exp, list(trainee.parameters()), list(adapter.parameters()))
    for g in opt.param_groups:
        g["foreach"] = True  # CUDA's default: one foreach op per group, DTensors apart
    x = torch.randn(6, 8) + rank
    for micro in range(2):
        with _grad_sync(trainee, sync=micro == 1):
            out = trainee(x).float()
            (out.sum() + adapter(out).sum()).backward()
    # the clip over DTensor shards + plain adapter grads: one norm, equal on every rank
    _average_grads(list(adapter.parameters()), world)
    grads = [p.grad.full_tensor() for p in trainee.parameters()] + [
        p.grad for p in adapter.parameters()]
    norm = torch.sqrt(sum(g.float().pow(2).sum() for g in grads))
    total = clip_grad_norm([*trainee.parameters(), *adapter.parameters()], float(norm) / 2, world)
    assert torch.allclose(total, norm, rtol=1e-5) and same_on_all_ranks(total.reshape(1))
    clipped = [p.grad.full_tensor() for p in trainee.parameters()] + [
        p.grad for p in adapter.parameters()]
    assert torch.allclose(torch.sqrt(sum(g.float().pow(2).sum() for g in clipped)), norm / 2,
                          rtol=1e-4)
    opt.step()
    state, opt_state = checkpoint_state(trainee, adapter, opt)
    box = [state, opt_state]
    dist.broadcast_object_list(box, src=0)  # rank 0 holds the gathered state
    state, opt_state = box
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert "loss.weight" in opt_state["state"]  # the adapter's momentum is saved too

    model2, adapter2 = build(1)
    model2.load_state_dict(state)
    trainee2 = prepare(model2, exp, torch.device("cpu"))
    opt2 = make_optimizer(exp, list(trainee2.parameters()), list(adapter2.parameters()))
    _restore_optimizer(opt2, opt_state, trainee2, adapter2)
    state2, opt_state2 = checkpoint_state(trainee2, adapter2, opt2)
    if rank == 0:
        for k, v in state.items():
            assert torch.equal(v, state2[k]), k
        for k, v in opt_state["state"].items():
            if "loss." in k:
                continue  # adapter2 is a fresh module: only the trainee was restored
            assert torch.equal(v["momentum_buffer"], opt_state2["state"][k]["momentum_buffer"]), k
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ddp_no_sync_and_fsdp2_checkpoint_roundtrip_on_cpu() -> None:
    mp.spawn(_worker, args=(2, free_port()), nprocs=2)
