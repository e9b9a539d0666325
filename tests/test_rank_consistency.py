"""Rank consistency pieces on a real 2-process gloo group (no Ray): the adapters'
gradient average issues one collective per call whatever grads a rank has, padding
forwards equalise evaluation, rank 0's state is broadcast, a drift is caught, and
the restore is decided once by rank 0. Plus the fp16 GradScaler path on CPU.

Each case runs in two spawned processes (`torch.multiprocessing`); a rank that issues
fewer collectives than its peer makes the other block until the group's 20 s timeout,
so a mismatch fails the test instead of hanging it.
"""

from __future__ import annotations

import datetime
import os
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.conftest import free_port


def _run(rank: int, world: int, port: int, case: str, tmp: str, errs: Any) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=20))
    try:
        CASES[case](rank, world, Path(tmp))
        torch.distributed.barrier()
    except BaseException:
        errs.put(f"rank {rank}: {traceback.format_exc()}")
    finally:
        torch.distributed.destroy_process_group()


def _spawn(case: str, tmp: Path) -> None:
    ctx = torch.multiprocessing.get_context("spawn")
    errs = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_run, args=(r, 2, port, case, str(tmp), errs)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    found = []
    while not errs.empty():
        found.append(errs.get())
    assert not found, "\n".join(found)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def _grads(rank: int, world: int, tmp: Path) -> None:
    from kd.train.parallel import average_grads

    a, b, c = (nn.Parameter(torch.zeros(3)) for _ in range(3))
    if rank == 0:  # rank 1's filter kept no sample: its adapter has no grad at all
        a.grad = torch.tensor([2.0, 4.0, 6.0])
    b.grad = torch.full((3,), float(rank + 1))
    average_grads([a, b, c], world)
    assert torch.equal(a.grad, torch.tensor([1.0, 2.0, 3.0]))  # rank 1 counted as zero
    assert torch.equal(b.grad, torch.full((3,), 1.5))
    assert c.grad is None  # no rank had one: the optimizer skips it everywhere
    # Both ranks are still in step: the next collective pairs up.
    t = torch.tensor([float(rank)])
    torch.distributed.all_reduce(t)
    assert float(t) == 1.0


class _Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        t = torch.ones(1)
        torch.distributed.all_reduce(t)  # a collective per forward, as in FSDP
        return x


def _pad(rank: int, world: int, tmp: Path) -> None:
    from kd.train.parallel import lockstep

    m = _Counter()
    mine = [torch.zeros(1, 2)] * (3 if rank == 0 else 0)  # rank 1 has no val rows
    seen = 0
    for batch in lockstep(mine, world, torch.device("cpu")):
        m(torch.zeros(1, 2) if batch is None else batch)  # padding forward on None
        seen += batch is not None
    assert (seen, m.calls) == ((3, 3) if rank == 0 else (0, 3))


def _broadcast_and_check(rank: int, world: int, tmp: Path) -> None:
    from kd.train.consistency import broadcast_state, check_ranks_agree

    torch.manual_seed(rank)  # the old per-rank construction seed: different adapters
    m = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    with pytest.raises(RuntimeError, match=r"ranks disagree .* at start: rank\(s\) \[1\]"):
        check_ranks_agree([m], world, "at start")
    broadcast_state([m], world, torch.device("cpu"))
    check_ranks_agree([m], world, "after broadcast")
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                 ref.state_dict().values(), strict=True))


def _save(d: Path, epoch: int) -> None:
    from kd.train.checkpoint import save_checkpoint

    m = nn.Linear(2, 2)
    d.mkdir(parents=True)
    save_checkpoint(d, m.state_dict(), nn.Module(), {}, epoch, [torch.get_rng_state()])


def _restore(rank: int, world: int, tmp: Path) -> None:
    import pyarrow.fs as pafs

    from kd.train.checkpoint import checkpoint_candidates
    from kd.train.consistency import decide_restore

    fs = pafs.LocalFileSystem()
    run = str(tmp / "run")
    if rank == 0:
        _save(tmp / "run" / "epoch_00001", 0)
        _save(tmp / "run" / "epoch_00002", 1)
        (tmp / "run" / "epoch_00002" / "model.safetensors").write_bytes(b"torn")
    torch.distributed.barrier()
    # Rank 1 sees a different listing (say, a stale one): it still loads rank 0's choice.
    cands = checkpoint_candidates(fs, run) if rank == 0 else []
    out = decide_restore(cands, fs, rank, world, verbose=False)
    assert out is not None and out["path"].endswith("epoch_00001")
    assert out["state"]["epoch"] == 0
    # Rank 1 cannot read the chosen checkpoint (its filesystem lacks it): all ranks fail.
    other = pafs.SubTreeFileSystem(str(tmp / "elsewhere"), fs) if rank == 1 else fs
    with pytest.raises(RuntimeError, match=r"restore failed on every rank .*rank 1: "):
        decide_restore(checkpoint_candidates(fs, run), other, rank, world, verbose=False)
    # Nothing readable for rank 0: every rank raises rank 0's reason.
    torch.distributed.barrier()
    if rank == 0:
        (tmp / "run" / "epoch_00001" / "manifest.json").unlink()
    torch.distributed.barrier()
    with pytest.raises(RuntimeError, match=r"rank 0: no readable checkpoint"):
        decide_restore(checkpoint_candidates(fs, run), fs, rank, world, verbose=False)


CASES = {"grads": _grads, "pad": _pad, "broadcast": _broadcast_and_check, "restore": _restore}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_process_collectives(case: str, tmp_path: Path) -> None:
    _spawn(case, tmp_path)


def test_fp16_grad_scaler_skips_inf_and_checkpoints_its_scale() -> None:
    """The fp16 path: scaled backward, unscale before clipping, a step with an inf grad
    skipped and the scale halved; the scale survives a state_dict round trip."""
    from kd.train.update import Updater

    torch.manual_seed(0)
    m = nn.Linear(3, 1)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    up = Updater(opt, list(m.parameters()), [], "fp16", grad_clip=1.0, world=1,
                 device=torch.device("cpu"))
    before = [p.detach().clone() for p in m.parameters()]
    up.backward(m(torch.full((2, 3), float("inf"))).sum())
    up.step()
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters(), strict=True))
    assert up.state_dict()["scale"] == 65536.0 / 2
    x = torch.ones(2, 3)
    up.backward(m(x).sum())
    assert float(m.weight.grad.abs().max()) > 100  # scaled
    up.step()
    assert not torch.equal(before[0], m.weight)
    assert m.weight.grad is None
    # Unscaled and clipped before the step: the weights moved by at most lr * clip.
    assert float((m.weight.detach() - before[0]).norm()) <= 0.1 * 1.0 + 1e-6
    fresh = Updater(opt, list(m.parameters()), [], "fp16", None, 1, torch.device("cpu"))
    fresh.load_state_dict(up.state_dict())
    assert fresh.state_dict()["scale"] == up.state_dict()["scale"]
    assert Updater(opt, [], [], "fp32", None, 1, torch.device("cpu")).state_dict() == {}


def test_incomplete_checkpoints_are_absent_damaged_ones_are_errors(tmp_path: Path) -> None:
    """A writer killed mid-upload leaves a folder with a manifest but missing files: it
    counts as not saved (the previous one, or a fresh start). A complete folder whose
    bytes do not match its manifest is damage: with nothing else readable, an error."""
    import pyarrow.fs as pafs

    from kd.train.checkpoint import checkpoint_candidates, load_latest_good

    fs, run = pafs.LocalFileSystem(), str(tmp_path / "run")
    _save(tmp_path / "run" / "epoch_00001", 0)
    (tmp_path / "run" / "epoch_00001" / "train_state.pt").unlink()  # upload cut short
    assert load_latest_good(checkpoint_candidates(fs, run), verbose=False) is None
    _save(tmp_path / "run" / "epoch_00002", 1)
    _save(tmp_path / "run" / "epoch_00003", 2)
    (tmp_path / "run" / "epoch_00003" / "model.safetensors").unlink()
    out = load_latest_good(checkpoint_candidates(fs, run), verbose=False)
    assert out is not None and out["path"].endswith("epoch_00002")
    (tmp_path / "run" / "epoch_00002" / "model.safetensors").write_bytes(b"torn")
    with pytest.raises(RuntimeError, match="epoch_00002/model.safetensors: size mismatch"):
        load_latest_good(checkpoint_candidates(fs, run), verbose=False)
