"""THE training loop: one Ray Train ``TorchTrainer`` train function for every run.

`kd teacher` (CE only), `kd distill` (composite loss), Tune trials and the laptop
default all run `train_loop_per_worker`; ``scaling.num_workers: 0`` runs it in the
driver process, N > 0 on N Ray workers with DDP. Per epoch each worker trains on
its shard of ``train``, all workers evaluate their slice of ``val`` (rows with
``idx % world == rank``) and the sums are all-reduced, so metrics cover the whole
validation set. Rank 0 publishes each epoch's metrics into the run's folder (the process
that runs ``fit`` logs them to MLflow: `kd.train.epoch_log`) and writes the checkpoint.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd.config import Experiment
from kd.data.transforms import build_transforms
from kd.errors import TrainingDiverged
from kd.models.weights import register_resolver
from kd.train.assemble import assemble
from kd.train.checkpoint import (
    checkpoint_candidates,
    checkpoint_state,
    restore_optimizer,
    run_location,
    save_checkpoint,
)
from kd.train.consistency import broadcast_state, check_ranks_agree, decide_restore, replicated
from kd.train.epoch_log import publish
from kd.train.optim import make_optimizer, per_step, set_lr
from kd.train.parallel import all_reduce, grad_sync, place_teacher, prepare, rng_states, world_info
from kd.train.progress import EpochProgress
from kd.train.step import Step, autocast, evaluate_shard, input_dtype
from kd.train.threads import set_worker_threads
from kd.train.update import Updater


@dataclass
class Worker:
    """What `_setup` builds for one worker and the epochs use."""

    exp: Experiment
    spec: dict[str, Any]
    rank: int
    world: int
    device: torch.device
    asm: Any
    trainee: torch.nn.Module
    opt: torch.optim.Optimizer
    step: Step
    updater: Updater
    base_lrs: list[float] = field(default_factory=list)
    start_epoch: int = 0


@dataclass
class EpochSums:
    """One worker's running sums over an epoch (before the all-reduce)."""

    sums: dict[str, float] = field(default_factory=dict)
    seen: int = 0
    labeled: int = 0
    elapsed: float = 0.0
    data_wait: float = 0.0  # of ``elapsed``: waiting for the next batch (the feed)
    teacher_forwards: int = 0


def train_loop_per_worker(spec: dict[str, Any]) -> None:
    """The loop: setup -> per epoch (train, evaluate, report). ``spec`` holds the resolved
    experiment (as a dict), the role, data facts (input shape, classes, sample), the
    MLflow run id/URI and the run folder. Returns None: Ray Train sends a train
    function's return value to its controller (a DDP module does not unpickle there)."""
    run_loop(spec)


def run_loop(spec: dict[str, Any]) -> Worker:
    """`train_loop_per_worker`, returning the `Worker` (for a caller that wraps the loop
    and inspects the trained state, e.g. a test comparing ranks)."""
    import ray.train

    entered = time.time()  # wall clock: the driver compares it with its own (bench/fixed_cost)
    w = _setup(spec)
    # the first report of an attempt says when the worker entered the loop and how long
    # setup (build, broadcast, restore) took: where a short run's fixed cost goes
    started = {"time/loop_entered_unix": entered, "time/setup_s": time.time() - entered}
    train_ds = ray.train.get_dataset_shard("train")
    val_ds = ray.train.get_dataset_shard("val")
    global_step = w.start_epoch * spec["steps_per_epoch"]
    for epoch in range(w.start_epoch, w.exp.trainer.epochs):
        sums, global_step = _train_epoch(w, train_ds, epoch, global_step)
        metrics = {**_epoch_metrics(w, sums, val_ds, epoch), **started}
        started = {}
        _report(w, metrics, epoch)
    return w


def _setup(spec: dict[str, Any]) -> Worker:
    """Seed, assemble trainee + teachers + loss, restore the checkpoint rank 0 chose,
    make every rank hold rank 0's trainee + loss state, wrap for data parallelism,
    build the optimizer, the `Updater` and the `Step`.

    Construction is seeded with ``exp.seed`` on every rank (identical random init of
    trainee and adapters) and rank 0's state is broadcast after the restore as well;
    per-rank seeds (``exp.seed + rank``) drive only data order and augmentation."""
    import ray.train
    import ray.train.torch

    from kd.config import experiment_from_dict

    exp = experiment_from_dict(spec["exp"])
    for prefix, fn in spec.get("resolvers", {}).items():
        register_resolver(prefix, fn)
    rank, world = world_info()
    if exp.scaling.num_workers > 0:  # in the driver (0) torch keeps its own default
        set_worker_threads(exp.scaling.resources_per_worker)
    torch.manual_seed(exp.seed)  # the same construction on every rank
    np.random.seed(exp.seed)
    device = ray.train.torch.get_device() if exp.scaling.use_gpu else torch.device("cpu")
    sample = torch.as_tensor(np.asarray(spec["sample"]), dtype=input_dtype(spec))
    asm = assemble(exp, spec["role"], tuple(spec["input_shape"]), spec["num_classes"], sample)
    asm.teachers = [place_teacher(t, exp, device) for t in asm.teachers]
    asm.loss.to(device)
    fs, run_path = run_location(spec)
    restored = decide_restore(checkpoint_candidates(fs, run_path, ray.train.get_checkpoint()),
                              fs, rank, world, verbose=rank == 0, device=device)
    if restored is not None:
        asm.trainee.load_state_dict(restored["model"])
        if restored["loss"] is not None:
            asm.loss.load_state_dict(restored["loss"])
    broadcast_state([asm.trainee, asm.loss], world, device)
    torch.manual_seed(exp.seed + rank)  # per rank from here: data order, augmentation
    np.random.seed(exp.seed + rank)
    # The optimizer is built after wrapping: FSDP2 replaces parameters with DTensors.
    trainee = prepare(asm.trainee, exp, device)
    own = [p for p in trainee.parameters() if p.requires_grad]  # student.freeze: not in it
    adapters = list(asm.loss.parameters())
    opt = make_optimizer(exp, own, adapters)
    updater = Updater(opt, own + adapters, adapters, exp.trainer.precision, exp.trainer.grad_clip,
                      world, device)
    step = Step(asm, trainee, device, input_dtype(spec),
                build_transforms(exp.data.transforms, tuple(spec["input_shape"]), spec["input_integer"]),
                seed=exp.seed * 1000 + rank, pad_id=spec.get("pad_id"))
    w = Worker(exp, spec, rank, world, device, asm, trainee, opt, step, updater,
               base_lrs=[g["lr"] for g in opt.param_groups])  # before a restore overwrites them
    if restored is not None:
        _resume(w, restored)
    return w


def _resume(w: Worker, restored: dict[str, Any]) -> None:
    """Optimizer state, RNG stream and start epoch from a restored checkpoint."""
    restore_optimizer(w.opt, restored["state"]["optimizer"], w.trainee, w.asm.loss)
    w.updater.load_state_dict(restored["state"].get("scaler"))
    per_rank = restored["state"].get("torch_rng_per_rank") or []
    if len(per_rank) == w.world:  # same world size: each worker continues its own stream
        torch.set_rng_state(per_rank[w.rank])
    elif w.rank == 0:
        torch.set_rng_state(restored["state"]["torch_rng"])
    w.start_epoch = int(restored["state"]["epoch"]) + 1
    if w.rank == 0:
        print(f"[kd] resumed from the epoch {w.start_epoch} checkpoint: continuing with epoch "
              f"{w.start_epoch + 1}/{w.exp.trainer.epochs}", flush=True)


def _train_epoch(w: Worker, train_ds: Any, epoch: int, global_step: int) -> tuple[EpochSums, int]:
    """One pass over this worker's shard of ``train``; returns its sums and the global step."""
    exp, accum, spe = w.exp, w.exp.trainer.grad_accum, w.spec["steps_per_epoch"]
    set_lr(w.opt, w.base_lrs, exp, epoch, 0, spe)
    stepwise = per_step(exp)
    w.trainee.train()
    acc = EpochSums()
    t0 = time.perf_counter()
    w.opt.zero_grad(set_to_none=True)
    forwards_before = w.step.teacher_forwards
    batches = train_ds.iter_torch_batches(
        batch_size=max(1, exp.trainer.batch_size // w.world),
        local_shuffle_buffer_size=min(w.spec["train_rows"], 4096),
        local_shuffle_seed=exp.seed * 1000 + epoch * w.world + w.rank)
    progress = EpochProgress(epoch + 1, exp.trainer.epochs, w.spec.get("steps_per_epoch"),
                             w.world, enabled=w.rank == 0)
    for i, (batch, is_last) in enumerate(_with_last(_timed(batches, acc))):
        # Gradients are all-reduced on the last micro-step of each accumulation
        # window (and of the epoch) only; the others skip the DDP/FSDP sync.
        sync = (i + 1) % accum == 0 or is_last
        with grad_sync(w.trainee, sync):
            with autocast(exp.trainer.precision, w.device):
                total, parts, db = w.step(batch)
            w.updater.backward(total / accum)
        if sync:
            if stepwise:
                set_lr(w.opt, w.base_lrs, exp, epoch, i, spe)
            w.updater.step()
        _accumulate(acc, total, parts, db)
        progress.step(len(db.labels))
        global_step += 1
    acc.elapsed = time.perf_counter() - t0
    acc.teacher_forwards = w.step.teacher_forwards - forwards_before
    return acc, global_step


def _accumulate(acc: EpochSums, total: torch.Tensor, parts: dict[str, torch.Tensor], db: Any) -> None:
    """Add one batch's sample-weighted losses and counts to ``acc``."""
    n = len(db.labels)
    acc.seen += n
    acc.labeled += int(db.label_mask.sum())
    s = acc.sums
    if db.distill_mask is not None:  # share of samples kept by the confidence filter
        s["train/distilled_fraction"] = s.get("train/distilled_fraction", 0.0) + float(db.distill_mask.sum())
    s["train/loss"] = s.get("train/loss", 0.0) + float(total.detach()) * n
    for k, v in parts.items():
        s[f"train/loss/{k}"] = s.get(f"train/loss/{k}", 0.0) + float(v) * n


def _epoch_metrics(w: Worker, acc: EpochSums, val_ds: Any, epoch: int) -> dict[str, float]:
    """All-reduced train metrics of the epoch plus the evaluation of ``val``."""
    keys = sorted(acc.sums)
    reduced = all_reduce([acc.sums[k] for k in keys]
                         + [acc.data_wait, acc.seen, acc.labeled, acc.elapsed], w.device)
    total_seen = max(reduced[-3], 1.0)
    metrics: dict[str, float] = {k: v / total_seen for k, v in zip(keys, reduced, strict=False)}
    t1 = time.perf_counter()
    metrics.update(evaluate_shard(w.step, val_ds, w.spec, w.rank, w.world, w.device))
    metrics["time/eval_s"] = time.perf_counter() - t1
    metrics["time/train_s"] = acc.elapsed
    metrics["time/data_wait_s"] = reduced[-4] / w.world  # the workers' mean
    metrics.update({
        "epoch": epoch + 1, "samples_per_s": reduced[-3] / max(reduced[-1] / w.world, 1e-9),
        "train/labeled_samples": reduced[-2],
        "train/unlabeled_samples": reduced[-3] - reduced[-2],
        "lr": w.opt.param_groups[0]["lr"],
        "train/teacher_forward_batches": float(acc.teacher_forwards),
        "worker/torch_threads": float(torch.get_num_threads()),
        "worker/niceness": float(os.nice(0)),  # Ray's default for workers is 15 (kd.runtime)
    })
    if w.device.type == "cuda":  # peak memory of this worker (rank 0's is logged)
        metrics["gpu/max_mem_gb"] = torch.cuda.max_memory_allocated(w.device) / 1e9
    return metrics


def _report(w: Worker, metrics: dict[str, float], epoch: int) -> None:
    """Publish for MLflow and print (rank 0), stop on a non-finite loss, checkpoint when
    due, ``ray.train.report``."""
    import ray.train

    exp = w.exp
    save = epoch + 1 == exp.trainer.epochs or (epoch + 1) % exp.checkpoint.every_epochs == 0
    if w.rank == 0:
        publish(w.spec["storage_fs"], w.spec["run_path"], metrics, step=epoch + 1)
        shown = "  ".join(f"{k} {metrics[k]:.4f}" for k in
                          ("train/loss", "val/accuracy", "val/teacher_agreement", "val/cosine") if k in metrics)
        print(f"[kd] epoch {epoch + 1}/{exp.trainer.epochs}  {shown}  "
              f"{metrics['samples_per_s']:.0f} samples/s", flush=True)
    check_finite(metrics, epoch + 1, exp)
    # Gathering an FSDP state dict is a collective: every rank takes part.
    if save:  # an invariant worth its all-gather: every rank trains the same state
        check_ranks_agree(replicated(w.trainee, w.asm.loss), w.world, f"after epoch {epoch + 1}")
    state = checkpoint_state(w.trainee, w.asm.loss, w.opt) if save else None
    rngs = rng_states(w.world) if save else []
    if not (save and w.rank == 0):
        ray.train.report(metrics)
        return
    # Ray uploads the folder into storage in the background and deletes it;
    # in local mode (num_workers 0) it keeps a reference, so the folder stays.
    d = tempfile.mkdtemp(prefix="kd-ckpt-")
    save_checkpoint(Path(d), state[0], w.asm.loss, state[1], epoch, rngs,
                    extra={"scaler": w.updater.state_dict()})
    local = exp.scaling.num_workers == 0
    ray.train.report(
        metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
        checkpoint_dir_name=f"epoch_{epoch + 1:05d}",
        checkpoint_upload_mode=(ray.train.CheckpointUploadMode.SYNC if local
                                else ray.train.CheckpointUploadMode.ASYNC),
        delete_local_checkpoint_after_upload=not local)


def check_finite(metrics: dict[str, float], epoch: int, exp: Experiment) -> None:
    """Raise `TrainingDiverged` when the epoch's mean ``train/loss`` is nan or inf.

    Every rank holds the same all-reduced value, so all ranks raise together (no
    collective is left waiting); the epoch is already logged, no checkpoint is saved."""
    loss = metrics["train/loss"]
    if not math.isfinite(loss):
        raise TrainingDiverged(
            f"train/loss is {loss} after epoch {epoch} (optim.lr {exp.optim.lr:g}): training "
            "diverged; lower optim.lr, set trainer.grad_clip, or check the inputs for nan/inf")


def _timed(items: Iterable[Any], acc: EpochSums) -> Iterator[Any]:
    """Yield ``items``, adding the time spent inside each ``next()`` (the wait for the
    feed: Ray Data's fetch, shuffle and tensor conversion not hidden by its prefetch)
    to ``acc.data_wait``."""
    it = iter(items)
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            acc.data_wait += time.perf_counter() - t0
            return
        acc.data_wait += time.perf_counter() - t0
        yield item


def _with_last(items: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """Yield ``(item, is_last)``: one item of look-ahead, so a streaming iterator's
    final batch is known before its backward pass."""
    it = iter(items)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True

