"""THE training loop: one Ray Train ``TorchTrainer`` train function for every run.

`kd teacher` (CE only), `kd distill` (composite loss), Tune trials and the laptop
default all run `train_loop_per_worker`; ``scaling.num_workers: 0`` runs it in the
driver process, N > 0 on N Ray workers with DDP. Per epoch each worker trains on
its shard of ``train``, all workers evaluate their slice of ``val`` (rows with
``idx % world == rank``) and the sums are all-reduced, so metrics cover the whole
validation set. Rank 0 logs to MLflow and writes the checkpoint.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kd.assemble import Role, assemble
from kd.config import Experiment
from kd.data import Splits, to_ray
from kd.errors import InputError
from kd.hooks import FeatureCapture
from kd.losses import DistillBatch
from kd.models.weights import save_weights

CKPT_MODEL = "model.safetensors"
CKPT_LOSS = "loss.safetensors"
CKPT_STATE = "train_state.pt"
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
                 input_dtype: torch.dtype) -> None:
        self.asm, self.trainee, self.device, self.input_dtype = asm, trainee, device, input_dtype
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

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], DistillBatch]:
        x = batch["x"].to(self.device, self.input_dtype)
        y = batch["y"].to(self.device)
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
            sums[2] += float(F.cross_entropy(logits[lab], y[lab], reduction="sum")) if lab.any() else 0.0
            sums[3] += float(lab.sum())
            sums[4] += float(len(y))
            if step.asm.teachers:
                sums[1] += float((step.teacher_logits(batch, x)[0].argmax(1) == pred).sum())
    correct, agree, ce, labeled, rows = _all_reduce(sums, device)
    out = {"val/accuracy": correct / max(labeled, 1), "val/loss": ce / max(labeled, 1)}
    if step.asm.teachers:
        out["val/teacher_agreement"] = agree / max(rows, 1)
    step.trainee.train()
    return out


def _save_checkpoint(path: Path, trainee: nn.Module, loss: nn.Module,
                     opt: torch.optim.Optimizer, epoch: int) -> None:
    save_weights(_unwrap(trainee), path / CKPT_MODEL)
    if any(True for _ in loss.state_dict()):
        save_weights(loss, path / CKPT_LOSS)
    torch.save({"optimizer": opt.state_dict(), "epoch": epoch,
                "torch_rng": torch.get_rng_state()}, path / CKPT_STATE)


def _restore(ckpt: Any, trainee: nn.Module, loss: nn.Module,
             opt: torch.optim.Optimizer) -> int:
    """Load the checkpoint into model, loss adapters and optimizer; return next epoch."""
    from safetensors.torch import load_file

    with ckpt.as_directory() as d:
        d = Path(d)
        _unwrap(trainee).load_state_dict(load_file(d / CKPT_MODEL))
        if (d / CKPT_LOSS).exists():
            loss.load_state_dict(load_file(d / CKPT_LOSS))
        state = torch.load(d / CKPT_STATE, map_location="cpu", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"]) + 1


def _maybe_inject_fault(spec: dict[str, Any], global_step: int, rank: int, world: int) -> None:
    """Fault injection for tests: kill the last worker at ``trainer.fail_at_step``,
    once (a marker file in the run folder stops it on the retry)."""
    at = spec["exp"]["trainer"]["fail_at_step"]
    if at is None or global_step != at or rank != world - 1:
        return
    marker = Path(spec["run_dir"]) / ".fault-injected"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(global_step))
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
    for t in asm.teachers:
        t.to(device)
    asm.loss.to(device)
    params = list(asm.trainee.parameters()) + list(asm.loss.parameters())
    opt = make_optimizer(exp, params)
    start_epoch = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        start_epoch = _restore(ckpt, asm.trainee, asm.loss, opt)
        if rank == 0:
            print(f"[kd] resumed from checkpoint at epoch {start_epoch}", flush=True)
    trainee = prepare(asm.trainee, exp, device)
    step = Step(asm, trainee, device, _input_dtype(spec))
    base_lrs = [g["lr"] for g in opt.param_groups]
    sched = exp.optim.schedule
    train_ds = ray.train.get_dataset_shard("train")
    val_ds = ray.train.get_dataset_shard("val")
    per_worker = max(1, exp.trainer.batch_size // world)
    accum = exp.trainer.grad_accum
    global_step = start_epoch * spec["steps_per_epoch"]
    for epoch in range(start_epoch, exp.trainer.epochs):
        f = lr_factor(epoch, exp.trainer.epochs, sched.name, sched.warmup_epochs,
                      sched.step_size, sched.gamma)
        for g, lr in zip(opt.param_groups, base_lrs):
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
        for i, batch in enumerate(batches):
            _maybe_inject_fault(spec, global_step, rank, world)
            with _autocast(exp.trainer.precision, device):
                total, parts, db = step(batch)
            (total / accum).backward()
            if (i + 1) % accum == 0:
                if exp.trainer.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, exp.trainer.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            n = len(db.labels)
            seen += n
            labeled += int(db.label_mask.sum())
            sums["train/loss"] = sums.get("train/loss", 0.0) + float(total) * n
            for k, v in parts.items():
                sums[f"train/loss/{k}"] = sums.get(f"train/loss/{k}", 0.0) + float(v) * n
            global_step += 1
        if seen % (per_worker * accum) and any(p.grad is not None for p in params):
            opt.step()
            opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        train_forwards = step.teacher_forwards - forwards_before
        keys = sorted(sums)
        reduced = _all_reduce([sums[k] for k in keys] + [seen, labeled, elapsed], device)
        total_seen = max(reduced[-3], 1.0)
        metrics: dict[str, float] = {k: v / total_seen for k, v in zip(keys, reduced)}
        t1 = time.perf_counter()
        metrics.update(evaluate_shard(step, val_ds, spec, rank, world, device))
        metrics["time/eval_s"] = time.perf_counter() - t1
        metrics["time/train_s"] = elapsed
        metrics.update({
            "epoch": epoch + 1, "samples_per_s": reduced[-3] / max(reduced[-1] / world, 1e-9),
            "train/labeled_samples": reduced[-2], "train/unlabeled_samples": reduced[-3] - reduced[-2],
            "lr": opt.param_groups[0]["lr"],
            "train/teacher_forward_batches": float(train_forwards),
        })
        last = epoch + 1 == exp.trainer.epochs
        save = last or (epoch + 1) % exp.checkpoint.every_epochs == 0
        if rank == 0:
            tracking.log_metrics(spec["tracking_uri"], spec["run_id"], metrics, step=epoch + 1)
            shown = "  ".join(f"{k} {metrics[k]:.4f}" for k in
                              ("train/loss", "val/accuracy", "val/teacher_agreement") if k in metrics)
            print(f"[kd] epoch {epoch + 1}/{exp.trainer.epochs}  {shown}  "
                  f"{metrics['samples_per_s']:.0f} samples/s", flush=True)
        if save and rank == 0:
            # Ray uploads the folder into storage in the background and deletes it;
            # in local mode (num_workers 0) it keeps a reference, so the folder stays.
            d = tempfile.mkdtemp(prefix="kd-ckpt-")
            _save_checkpoint(Path(d), trainee, asm.loss, opt, epoch)
            local = exp.scaling.num_workers == 0
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                checkpoint_dir_name=f"epoch_{epoch + 1:05d}",
                checkpoint_upload_mode=(ray.train.CheckpointUploadMode.SYNC if local
                                        else ray.train.CheckpointUploadMode.ASYNC),
                delete_local_checkpoint_after_upload=not local)
        else:
            ray.train.report(metrics)


def prepare(model: nn.Module, exp: Experiment, device: torch.device) -> nn.Module:
    """Move to the device and wrap for data parallelism: DDP via Ray's
    ``prepare_model``, or FSDP2 ``fully_shard`` for ``scaling.strategy: fsdp``."""
    import ray.train.torch

    if exp.scaling.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        model.to(device)
        for child in model.children():
            if any(True for _ in child.parameters()):
                fully_shard(child)
        return fully_shard(model)
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
    assemble(exp, role, splits.input_shape, splits.num_classes, _sample(splits))


def _sample(splits: Splits) -> torch.Tensor:
    x = splits.train.x[:4]
    return torch.as_tensor(x, dtype=torch.int64 if np.issubdtype(x.dtype, np.integer) else torch.float32)


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

    spec = {
        "exp": exp.model_dump(mode="json"), "role": role, "run_id": run_id,
        "tracking_uri": tracking_uri, "input_shape": list(splits.input_shape),
        "num_classes": splits.num_classes, "sample": splits.train.x[:4].tolist(),
        "input_integer": bool(np.issubdtype(splits.train.x.dtype, np.integer)),
        "train_rows": len(splits.train), "run_dir": run_dir(exp, run_name),
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
            name=run_name, storage_path=exp.storage.path,
            failure_config=ray.train.FailureConfig(max_failures=exp.trainer.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=exp.checkpoint.keep),
            callbacks=callbacks),
        datasets={"train": to_ray(splits.train, extra_train_columns), "val": to_ray(splits.val)},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"run {run_name} finished without a checkpoint")
    history = []
    if result.metrics_dataframe is not None:
        history = result.metrics_dataframe.to_dict("records")
    return FitResult(dict(result.metrics or {}), history, result.checkpoint.path, run_name)
