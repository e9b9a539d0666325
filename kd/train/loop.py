"""THE training loop: one Ray Train ``TorchTrainer`` train function for every run.

`kd teacher` (CE only), `kd distill` (composite loss), Tune trials and the laptop
default all run `train_loop_per_worker`; ``scaling.num_workers: 0`` runs it in the
driver process, N > 0 on N Ray workers with DDP. Per epoch each worker trains on
its shard of ``train``, all workers evaluate their slice of ``val`` (rows with
``idx % world == rank``) and the sums are all-reduced, so metrics cover the whole
validation set. Rank 0 logs to MLflow and writes the checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kd.config import Experiment
from kd.data import Splits, to_ray
from kd.data.transforms import Transform, build_transforms
from kd.data.transforms import apply as apply_transforms
from kd.errors import InputError, TrainingDiverged
from kd.losses import DistillBatch
from kd.models.weights import save_weights
from kd.train.assemble import Role, assemble
from kd.train.capture import FeatureCapture
from kd.train.semisup import check_label_use

CKPT_MODEL = "model.safetensors"
WEIGHTS_FILE = "model.safetensors"  # a finished run's weights, see final_weights_uri
CKPT_LOSS = "loss.safetensors"
CKPT_STATE = "train_state.pt"
CKPT_MANIFEST = "manifest.json"
TEACHER_LOGITS = "teacher_logits"
TEACHER_FEATURE = "teacher_feature:"
TEACHER_TOPK_VALUES = "teacher_topk_values"
TEACHER_TOPK_INDICES = "teacher_topk_indices"
TOPK_FLOOR = 1e4  # classes outside the cached top-k get logit min(top-k) - TOPK_FLOOR


def dense_from_topk(values: torch.Tensor, indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Full ``[B, C]`` logits from the cached top-k: the k kept logits in place, every
    other class at ``min(top-k) - TOPK_FLOOR`` (probability 0 at any sane temperature),
    so softmax over the result is the teacher's softmax renormalised over its top k."""
    floor = values.min(1, keepdim=True).values - TOPK_FLOOR
    out = floor.expand(values.shape[0], num_classes).clone()
    return out.scatter(1, indices.long(), values)


@dataclass
class FitResult:
    """What a finished run hands back: final metrics, per-epoch history, weights."""

    metrics: dict[str, float]
    history: list[dict[str, float]]
    checkpoint_dir: str
    run_name: str
    checkpoint: Any = None  # the ray.train.Checkpoint (carries the S3 filesystem)


def lr_factor(epoch: int, epochs: int, name: str, warmup: int, step_size: int,
              gamma: float) -> float:
    """LR multiplier for ``epoch``: linear warm-up to 1 over ``warmup`` epochs, then
    cosine ``0.5 (1 + cos(pi e / E))`` over the rest, or ``gamma ** (e // step)``."""
    if epoch < warmup:
        return (epoch + 1) / warmup
    e, span = epoch - warmup, max(1, epochs - warmup)
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * e / span))
    if name == "step":
        return gamma ** (e // step_size)
    return 1.0


def make_optimizer(exp: Experiment, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay), Adam or AdamW from ``optim``."""
    o = exp.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(params, lr=o.lr, weight_decay=o.weight_decay)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _world() -> tuple[int, int]:
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def _input_dtype(spec: dict[str, Any]) -> torch.dtype:
    return torch.int64 if spec["input_integer"] else torch.float32


def _autocast(precision: str, device: torch.device) -> Any:
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


class Step:
    """One forward of trainee (+ teachers) and the composite loss for a batch."""

    def __init__(self, asm: Any, trainee: nn.Module, device: torch.device,
                 input_dtype: torch.dtype, transforms: list[Transform] | None = None,
                 seed: int = 0) -> None:
        self.asm, self.trainee, self.device, self.input_dtype = asm, trainee, device, input_dtype
        self.transforms = transforms or []
        self.gen = torch.Generator().manual_seed(seed)
        self.s_cap = FeatureCapture(trainee, asm.student_paths, "student")
        self.t_cap = (FeatureCapture(asm.teachers[0], asm.teacher_paths, "teacher")
                      if asm.teachers else None)
        self.teacher_forwards = 0

    def cached(self, batch: dict[str, torch.Tensor]) -> bool:
        """True when the batch carries every teacher output the loss needs (the cache's
        logits, plus ``teacher_feature:<path>`` for each hooked teacher path)."""
        has_logits = TEACHER_LOGITS in batch or TEACHER_TOPK_VALUES in batch
        return (has_logits and len(self.asm.teachers) == 1
                and all(TEACHER_FEATURE + p in batch for p in self.asm.teacher_paths))

    def teacher_logits(self, batch: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
        """Cached logits when the batch carries them (and no features are needed),
        else a no-grad forward of every teacher."""
        return self.teacher_outputs(batch, x)[0]

    def teacher_outputs(self, batch: dict[str, torch.Tensor], x: torch.Tensor,
                        num_classes: int = 0) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """(logits per teacher, primary teacher features): read from the batch when it
        carries the cached outputs, else a no-grad forward (counted in
        ``teacher_forwards``) of every teacher."""
        if self.cached(batch):
            feats = {p: batch[TEACHER_FEATURE + p].to(self.device).float()
                     for p in self.asm.teacher_paths}
            if TEACHER_LOGITS in batch:
                return [batch[TEACHER_LOGITS].to(self.device).float()], feats
            dense = dense_from_topk(batch[TEACHER_TOPK_VALUES].to(self.device).float(),
                                    batch[TEACHER_TOPK_INDICES].to(self.device), num_classes)
            return [dense], feats
        self.teacher_forwards += 1
        with torch.no_grad():
            logits = [t(x).float() for t in self.asm.teachers]
        return logits, dict(self.t_cap.features) if self.t_cap else {}

    def __call__(self, batch: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor], DistillBatch]:
        x = batch["x"].to(self.device, self.input_dtype)
        y = batch["y"].to(self.device)
        if self.transforms and self.trainee.training:  # the teacher sees the same view
            x = apply_transforms(self.transforms, x, self.gen)
        logits = self.trainee(x)
        t_logits, t_feats = (self.teacher_outputs(batch, x, logits.shape[1])
                             if self.asm.teachers else ([], {}))
        db = DistillBatch(logits.float(), y, t_logits, dict(self.s_cap.features), t_feats)
        total, parts = self.asm.loss(db)
        return total, parts, db


def evaluate_shard(step: Step, ds: Any, spec: dict[str, Any], rank: int, world: int,
                   device: torch.device) -> dict[str, float]:
    """Accuracy, teacher agreement and CE over this worker's slice of ``val``,
    all-reduced so every worker returns metrics of the whole set."""
    step.trainee.eval()
    sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # correct, agree, ce_sum, labeled, rows
    with torch.no_grad():
        for batch in ds.iter_torch_batches(batch_size=512):
            keep = (batch["idx"] % world) == rank
            if not keep.any():
                continue
            batch = {k: v[keep] for k, v in batch.items()}
            x, y = batch["x"].to(device, step.input_dtype), batch["y"].to(device)
            logits = step.trainee(x).float()
            pred = logits.argmax(1)
            lab = y >= 0
            sums[0] += float((pred[lab] == y[lab]).sum())
            if lab.any():
                sums[2] += float(F.cross_entropy(logits[lab], y[lab], reduction="sum"))
            sums[3] += float(lab.sum())
            sums[4] += float(len(y))
            if step.asm.teachers:
                sums[1] += float((step.teacher_logits(batch, x)[0].argmax(1) == pred).sum())
    correct, agree, ce, labeled, rows = _all_reduce(sums, device)
    out = {"val/accuracy": correct / max(labeled, 1), "val/loss": ce / max(labeled, 1),
           "val/samples": rows}
    if step.asm.teachers:
        out["val/teacher_agreement"] = agree / max(rows, 1)
    step.trainee.train()
    return out


def _is_fsdp(model: nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync")


def _state_container(trainee: nn.Module, loss: nn.Module) -> nn.Module:
    """Trainee and loss adapters under one root, so FSDP's state-dict helpers can
    name every parameter the optimizer holds."""
    return nn.ModuleDict({"trainee": trainee, "loss": loss})


def checkpoint_state(trainee: nn.Module, loss: nn.Module,
                     opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    """(full model state dict on CPU, optimizer state). For FSDP both are gathered
    from the shards with ``torch.distributed.checkpoint.state_dict`` (a collective:
    every rank must call it); for DDP / a plain module they are local copies."""
    if _is_fsdp(trainee):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(trainee, options=full),
                get_optimizer_state_dict(_state_container(trainee, loss), opt, options=full))
    return {k: v.detach().cpu() for k, v in _unwrap(trainee).state_dict().items()}, opt.state_dict()


def rng_states(world: int) -> list[torch.Tensor]:
    """Every worker's torch RNG state, rank order (a collective when world > 1)."""
    mine = torch.get_rng_state()
    if world <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [mine]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, mine)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_checkpoint(path: Path, model_state: dict[str, torch.Tensor], loss: nn.Module,
                     opt_state: Any, epoch: int, rngs: list[torch.Tensor]) -> None:
    """Write model, loss adapters and train state, then ``manifest.json`` (size and
    sha256 of each file) LAST: a folder without a matching manifest is incomplete.
    The folder is a private temp dir; Ray copies it into storage and registers it
    only after the copy finished, so a half-written checkpoint is never the latest."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model_state.items()}, str(path / CKPT_MODEL))
    if any(True for _ in loss.state_dict()):
        save_weights(loss, path / CKPT_LOSS)
    torch.save({"optimizer": opt_state, "epoch": epoch, "torch_rng": rngs[0],
                "torch_rng_per_rank": rngs}, path / CKPT_STATE)
    files = {f.name: {"size": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(path.iterdir()) if f.is_file()}
    (path / CKPT_MANIFEST).write_text(json.dumps({"epoch": epoch + 1, "files": files}))


def _read_checkpoint(d: Path) -> dict[str, Any]:
    """Verify the manifest (every file present, same size and sha256) and load the
    tensors without unpickling code; raise ValueError naming what is wrong."""
    from safetensors.torch import load_file

    if not (d / CKPT_MANIFEST).exists():
        raise ValueError("no manifest.json (incomplete checkpoint)")
    manifest = json.loads((d / CKPT_MANIFEST).read_text())
    for name, meta in manifest["files"].items():
        f = d / name
        if not f.exists():
            raise ValueError(f"{name} missing")
        if f.stat().st_size != meta["size"] or _sha256(f) != meta["sha256"]:
            raise ValueError(f"{name} does not match its manifest (truncated or corrupt)")
    return {"model": load_file(d / CKPT_MODEL),
            "loss": load_file(d / CKPT_LOSS) if (d / CKPT_LOSS).exists() else None,
            "state": torch.load(d / CKPT_STATE, map_location="cpu", weights_only=True)}


def checkpoint_candidates(fs: Any, run_path: str, registered: Any = None) -> list[Any]:
    """Checkpoints of one run, newest first: every ``epoch_*`` folder in the run
    folder, plus the one Ray registered (``ray.train.get_checkpoint()``) if it lies
    elsewhere. The folder listing also finds a checkpoint whose report Ray had not
    yet received when a worker died (the controller polls every ~2 s), so a
    restart never repeats an epoch that was saved."""
    import pyarrow.fs as pafs
    import ray.train

    infos = fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    names = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                    and i.base_name.startswith("epoch_")), reverse=True)
    out = [ray.train.Checkpoint(f"{run_path}/{n}", filesystem=fs) for n in names]
    if registered is not None and registered.path.rstrip("/") not in {c.path for c in out}:
        out.insert(0, registered)
    return out


def prune_checkpoints(fs: Any, run_path: str, keep: int, final: str) -> list[str]:
    """Delete all but the ``keep`` newest ``epoch_*`` folders of a finished run (never
    ``final``, the checkpoint the run returns). Ray's own ``num_to_keep`` only knows the
    checkpoints whose report reached its controller; one saved just before a worker
    died is found by the folder listing and would otherwise stay. Returns the removed."""
    removed = []
    for ckpt in checkpoint_candidates(fs, run_path)[keep:]:
        if ckpt.path.rstrip("/") != final.rstrip("/"):
            fs.delete_dir(ckpt.path)
            removed.append(ckpt.path)
    return removed


def load_latest_good(candidates: list[Any], verbose: bool) -> dict[str, Any] | None:
    """Load the newest readable checkpoint: one that is corrupt, truncated or
    half-uploaded (its manifest does not match) is skipped, logged, and the
    previous one tried. None when there are no candidates; RuntimeError when
    there are some but none is readable."""
    errors = []
    for c in candidates:
        try:
            with c.as_directory() as d:
                out = _read_checkpoint(Path(d))
        except Exception as e:
            errors.append(f"{c.path}: {e}")
            if verbose:
                print(f"[kd] checkpoint {c.path} unreadable ({e}); trying the previous one",
                      flush=True)
            continue
        if verbose and errors:
            print(f"[kd] fell back to checkpoint {c.path}", flush=True)
        return out
    if errors:
        raise RuntimeError("no readable checkpoint: " + "; ".join(errors))
    return None


def _restore_optimizer(opt: torch.optim.Optimizer, state: Any, trainee: nn.Module,
                       loss: nn.Module) -> None:
    if _is_fsdp(trainee):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(_state_container(trainee, loss), opt, state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state)


def run_location(spec: dict[str, Any]) -> tuple[Any, str]:
    """(pyarrow filesystem, path) of this run's folder: the filesystem the driver
    built (``fit`` puts it in the spec, with resolved credentials), else one built
    here from ``run_dir`` (for callers that assemble their own spec)."""
    if spec.get("storage_fs") is not None and spec.get("run_path"):
        return spec["storage_fs"], spec["run_path"]
    from kd import storage

    return storage.arrow_fs(spec["run_dir"], spec["exp"]["storage"].get("endpoint_url"))


def _maybe_inject_fault(spec: dict[str, Any], global_step: int, rank: int, world: int) -> None:
    """Fault injection for tests: kill the last worker at ``trainer.fail_at_step``,
    once (a marker file in the run folder, local or S3, stops it on the retry)."""
    import pyarrow.fs as pafs

    at = spec["exp"]["trainer"]["fail_at_step"]
    if at is None or global_step != at or rank != world - 1:
        return
    fs, run_path = run_location(spec)
    marker = run_path + "/.fault-injected"
    if fs.get_file_info(marker).type != pafs.FileType.NotFound:
        return
    fs.create_dir(run_path, recursive=True)
    with fs.open_output_stream(marker) as f:
        f.write(str(global_step).encode())
    print(f"[kd] fault injection: killing worker rank {rank} at step {global_step}", flush=True)
    os._exit(1)


def train_loop_per_worker(spec: dict[str, Any]) -> None:
    """The loop. ``spec`` holds the resolved experiment (as a dict), the role, data
    facts (input shape, classes, sample), the MLflow run id/URI and the run folder."""
    import ray.train
    import ray.train.torch

    from kd import tracking
    from kd.config import experiment_from_dict

    exp = experiment_from_dict(spec["exp"])
    rank, world = _world()
    torch.manual_seed(exp.seed + rank)
    np.random.seed(exp.seed + rank)
    device = ray.train.torch.get_device() if exp.scaling.use_gpu else torch.device("cpu")
    sample = torch.as_tensor(np.asarray(spec["sample"]), dtype=_input_dtype(spec))
    asm = assemble(exp, spec["role"], tuple(spec["input_shape"]), spec["num_classes"], sample)
    asm.teachers = [place_teacher(t, exp, device) for t in asm.teachers]
    asm.loss.to(device)
    start_epoch = 0
    restored = load_latest_good(
        checkpoint_candidates(*run_location(spec), ray.train.get_checkpoint()),
        verbose=rank == 0)
    if restored is not None:
        asm.trainee.load_state_dict(restored["model"])
        if restored["loss"] is not None:
            asm.loss.load_state_dict(restored["loss"])
    # The optimizer is built after wrapping: FSDP2 replaces parameters with DTensors.
    trainee = prepare(asm.trainee, exp, device)
    loss_params = list(asm.loss.parameters())
    params = list(trainee.parameters()) + loss_params
    opt = make_optimizer(exp, params)
    base_lrs = [g["lr"] for g in opt.param_groups]  # before a restore overwrites them
    if restored is not None:
        _restore_optimizer(opt, restored["state"]["optimizer"], trainee, asm.loss)
        per_rank = restored["state"].get("torch_rng_per_rank") or []
        if len(per_rank) == world:  # same world size: each worker continues its own stream
            torch.set_rng_state(per_rank[rank])
        elif rank == 0:
            torch.set_rng_state(restored["state"]["torch_rng"])
        start_epoch = int(restored["state"]["epoch"]) + 1
        if rank == 0:
            print(f"[kd] resumed from checkpoint at epoch {start_epoch}", flush=True)
    step = Step(asm, trainee, device, _input_dtype(spec),
                build_transforms(exp.data.transforms, tuple(spec["input_shape"]), spec["input_integer"]),
                seed=exp.seed * 1000 + rank)
    sched = exp.optim.schedule
    train_ds = ray.train.get_dataset_shard("train")
    val_ds = ray.train.get_dataset_shard("val")
    per_worker = max(1, exp.trainer.batch_size // world)
    accum = exp.trainer.grad_accum
    global_step = start_epoch * spec["steps_per_epoch"]
    for epoch in range(start_epoch, exp.trainer.epochs):
        f = lr_factor(epoch, exp.trainer.epochs, sched.name, sched.warmup_epochs,
                      sched.step_size, sched.gamma)
        for g, lr in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = lr * f
        trainee.train()
        sums: dict[str, float] = {}
        seen = labeled = 0
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        forwards_before = step.teacher_forwards
        batches = train_ds.iter_torch_batches(
            batch_size=per_worker,
            local_shuffle_buffer_size=min(spec["train_rows"], 4096),
            local_shuffle_seed=exp.seed * 1000 + epoch * world + rank)
        for i, (batch, is_last) in enumerate(_with_last(batches)):
            _maybe_inject_fault(spec, global_step, rank, world)
            # Gradients are all-reduced on the last micro-step of each accumulation
            # window (and of the epoch) only; the others skip the DDP/FSDP sync.
            sync = (i + 1) % accum == 0 or is_last
            with _grad_sync(trainee, sync):
                with _autocast(exp.trainer.precision, device):
                    total, parts, db = step(batch)
                (total / accum).backward()
            if sync:
                _average_grads(loss_params, world)
                if exp.trainer.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, exp.trainer.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            n = len(db.labels)
            seen += n
            labeled += int(db.label_mask.sum())
            if db.distill_mask is not None:  # share of samples kept by the confidence filter
                sums["train/distilled_fraction"] = (sums.get("train/distilled_fraction", 0.0)
                                                    + float(db.distill_mask.sum()))
            sums["train/loss"] = sums.get("train/loss", 0.0) + float(total.detach()) * n
            for k, v in parts.items():
                sums[f"train/loss/{k}"] = sums.get(f"train/loss/{k}", 0.0) + float(v) * n
            global_step += 1
        elapsed = time.perf_counter() - t0
        train_forwards = step.teacher_forwards - forwards_before
        keys = sorted(sums)
        reduced = _all_reduce([sums[k] for k in keys] + [seen, labeled, elapsed], device)
        total_seen = max(reduced[-3], 1.0)
        metrics: dict[str, float] = {k: v / total_seen for k, v in zip(keys, reduced, strict=False)}
        t1 = time.perf_counter()
        metrics.update(evaluate_shard(step, val_ds, spec, rank, world, device))
        metrics["time/eval_s"] = time.perf_counter() - t1
        metrics["time/train_s"] = elapsed
        metrics.update({
            "epoch": epoch + 1, "samples_per_s": reduced[-3] / max(reduced[-1] / world, 1e-9),
            "train/labeled_samples": reduced[-2],
            "train/unlabeled_samples": reduced[-3] - reduced[-2],
            "lr": opt.param_groups[0]["lr"],
            "train/teacher_forward_batches": float(train_forwards),
        })
        if device.type == "cuda":  # peak memory of this worker (rank 0's is logged)
            metrics["gpu/max_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        last = epoch + 1 == exp.trainer.epochs
        save = last or (epoch + 1) % exp.checkpoint.every_epochs == 0
        if rank == 0:
            tracking.log_metrics(spec["tracking_uri"], spec["run_id"], metrics, step=epoch + 1)
            shown = "  ".join(f"{k} {metrics[k]:.4f}" for k in
                              ("train/loss", "val/accuracy", "val/teacher_agreement")
                              if k in metrics)
            print(f"[kd] epoch {epoch + 1}/{exp.trainer.epochs}  {shown}  "
                  f"{metrics['samples_per_s']:.0f} samples/s", flush=True)
        check_finite(metrics, epoch + 1, exp)
        # Gathering an FSDP state dict is a collective: every rank takes part.
        state = checkpoint_state(trainee, asm.loss, opt) if save else None
        rngs = rng_states(world) if save else []
        if save and rank == 0:
            # Ray uploads the folder into storage in the background and deletes it;
            # in local mode (num_workers 0) it keeps a reference, so the folder stays.
            d = tempfile.mkdtemp(prefix="kd-ckpt-")
            _save_checkpoint(Path(d), state[0], asm.loss, state[1], epoch, rngs)
            local = exp.scaling.num_workers == 0
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                checkpoint_dir_name=f"epoch_{epoch + 1:05d}",
                checkpoint_upload_mode=(ray.train.CheckpointUploadMode.SYNC if local
                                        else ray.train.CheckpointUploadMode.ASYNC),
                delete_local_checkpoint_after_upload=not local)
        else:
            ray.train.report(metrics)


def check_finite(metrics: dict[str, float], epoch: int, exp: Experiment) -> None:
    """Raise `TrainingDiverged` when the epoch's mean ``train/loss`` is nan or inf.

    Every rank holds the same all-reduced value, so all ranks raise together (no
    collective is left waiting); the epoch is already logged, no checkpoint is saved."""
    loss = metrics["train/loss"]
    if not math.isfinite(loss):
        raise TrainingDiverged(
            f"train/loss is {loss} after epoch {epoch} (optim.lr {exp.optim.lr:g}): training "
            "diverged; lower optim.lr, set trainer.grad_clip, or check the inputs for nan/inf")


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


def _grad_sync(model: nn.Module, sync: bool) -> Any:
    """Context for one micro-step: DDP ``no_sync()`` / FSDP2
    ``set_requires_gradient_sync(False)`` when ``sync`` is False, else nothing."""
    if sync:
        if _is_fsdp(model):
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if _is_fsdp(model):
        model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def _average_grads(params: list[nn.Parameter], world: int) -> None:
    """All-reduce mean of the gradients of parameters outside DDP/FSDP (the loss's
    adapters, e.g. FitNets regressors), so every worker steps the same way."""
    if world <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= world


def _fsdp_api() -> tuple[Any, Any]:
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6 keeps FSDP2 under _composable
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return MixedPrecisionPolicy, fully_shard


def _shard(model: nn.Module, exp: Experiment, device: torch.device) -> nn.Module:
    """FSDP2: each child with parameters is a shard unit, then the root; with
    ``precision: bf16`` parameters are cast to bf16 for compute, reductions in fp32."""
    policy_cls, fully_shard = _fsdp_api()
    model.to(device)
    mp = (policy_cls(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if exp.trainer.precision == "bf16" else policy_cls())
    for child in model.children():
        if any(True for _ in child.parameters()):
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


def preflight(exp: Experiment, role: Role, splits: Splits) -> None:
    """Everything that can be checked before a worker starts: names, weights that
    fit, feature paths, class counts, strategy and precision on this hardware."""
    if exp.scaling.strategy == "fsdp" and not exp.scaling.use_gpu:
        raise InputError("scaling.strategy: fsdp shards students across GPUs; set "
                         "scaling.use_gpu: true (on CPU use ddp)")
    if exp.trainer.precision == "fp16" and not exp.scaling.use_gpu:
        raise InputError("trainer.precision: fp16 needs a GPU; use bf16 or fp32 on CPU")
    if exp.scaling.use_gpu and not torch.cuda.is_available() and exp.scaling.num_workers == 0:
        raise InputError("scaling.use_gpu: true but no GPU is visible to the driver")
    if exp.teacher is not None and exp.teacher.shard and exp.scaling.strategy != "fsdp":
        raise InputError("teacher.shard: sharding the teacher needs scaling.strategy: fsdp "
                         "(with ddp every worker holds a replica)")
    if exp.trainer.fail_at_step is not None and exp.trainer.max_failures < 1:
        raise InputError("trainer.fail_at_step kills a worker: set trainer.max_failures >= 1")
    check_label_use(exp, role, splits)
    check_output_is_not_a_teacher(exp, role)
    build_transforms(exp.data.transforms, splits.input_shape,
                     bool(np.issubdtype(splits.train.x.dtype, np.integer)))
    from kd import storage

    storage.check_writable(exp.storage.path, exp.storage.endpoint_url)
    assemble(exp, role, splits.input_shape, splits.num_classes, _sample(splits))


def final_weights_uri(exp: Experiment) -> str:
    """Where a finished run's weights go: ``<storage.path>/<name>/model.safetensors``."""
    from kd import storage

    return storage.join(exp.storage.path, exp.name, WEIGHTS_FILE)


def check_output_is_not_a_teacher(exp: Experiment, role: Role) -> None:
    """A student run writes ``<storage.path>/<name>/model.safetensors``; refuse a ``name``
    whose file is one of this run's teacher weights, which the run would overwrite."""
    from kd import storage

    if role != "student" or exp.teacher is None:
        return
    out = final_weights_uri(exp)
    norm = (lambda u: u if storage.is_s3(u) else str(Path(u).resolve()))  # noqa: E731
    for i, t in enumerate(exp.teacher.all()):
        if t.weights and norm(t.weights) == norm(out):
            field = "teacher.weights" if i == 0 else f"teacher.teachers.{i - 1}.weights"
            raise InputError(f"name: {exp.name!r} would write the student's weights to {out}, "
                             f"which is {field}; give the student experiment its own name")


def _sample(splits: Splits) -> torch.Tensor:
    x = splits.train.x[:4]
    integer = np.issubdtype(x.dtype, np.integer)
    return torch.as_tensor(x, dtype=torch.int64 if integer else torch.float32)


def run_dir(exp: Experiment, run_name: str) -> str:
    """The folder of one Ray run: ``<storage.path>/<run_name>``."""
    from kd import storage

    return storage.join(exp.storage.path, run_name)


def fit(exp: Experiment, role: Role, splits: Splits, run_id: str, tracking_uri: str,
        run_name: str, extra_train_columns: dict[str, np.ndarray] | None = None,
        callbacks: list[Any] | None = None) -> FitResult:
    """Run the loop under a `TorchTrainer` and return the final metrics and checkpoint.
    A ``run_name`` whose folder already holds checkpoints resumes from the latest."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from kd import storage

    fs, storage_path = storage.arrow_fs(exp.storage.path, exp.storage.endpoint_url)
    spec = {
        "exp": exp.model_dump(mode="json"), "role": role, "run_id": run_id,
        "tracking_uri": tracking_uri, "input_shape": list(splits.input_shape),
        "num_classes": splits.num_classes, "sample": splits.train.x[:4].tolist(),
        "input_integer": bool(np.issubdtype(splits.train.x.dtype, np.integer)),
        "train_rows": len(splits.train), "run_dir": run_dir(exp, run_name),
        "storage_fs": fs, "run_path": f"{storage_path}/{run_name}",
        "steps_per_epoch": math.ceil(len(splits.train) / max(1, exp.trainer.batch_size)),
    }
    resources = dict(exp.scaling.resources_per_worker) or None
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec,
        scaling_config=ray.train.ScalingConfig(
            num_workers=exp.scaling.num_workers, use_gpu=exp.scaling.use_gpu,
            resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path,
            storage_filesystem=fs if storage.is_s3(exp.storage.path) else None,
            failure_config=ray.train.FailureConfig(max_failures=exp.trainer.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=exp.checkpoint.keep),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=callbacks),
        datasets={"train": to_ray(splits.train, extra_train_columns), "val": to_ray(splits.val)},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"run {run_name} finished without a checkpoint")
    prune_checkpoints(fs, f"{storage_path}/{run_name}", exp.checkpoint.keep, result.checkpoint.path)
    history = []
    if result.metrics_dataframe is not None:
        history = result.metrics_dataframe.to_dict("records")
    return FitResult(dict(result.metrics or {}), history, result.checkpoint.path, run_name,
                     result.checkpoint)
