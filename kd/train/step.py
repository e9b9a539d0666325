"""One training step (trainee + teachers forward, composite loss) and the sharded
evaluation of ``val``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd.data.transforms import Transform
from kd.data.transforms import apply as apply_transforms
from kd.losses import DistillBatch
from kd.train.capture import FeatureCapture
from kd.train.columns import (
    TEACHER_FEATURE,
    TEACHER_LOGITS,
    TEACHER_TOPK_INDICES,
    TEACHER_TOPK_VALUES,
    dense_from_topk,
)
from kd.train.embed_metrics import encode, forward_by_length, trim_pad
from kd.train.parallel import all_reduce, is_fsdp, lockstep

TEXT_CHUNK = 16  # rows per length group in a text training step


def input_dtype(spec: dict[str, Any]) -> torch.dtype:
    return torch.int64 if spec["input_integer"] else torch.float32


def autocast(precision: str, device: torch.device) -> Any:
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


class Step:
    """One forward of trainee (+ teachers) and the composite loss for a batch."""

    def __init__(self, asm: Any, trainee: nn.Module, device: torch.device,
                 input_dtype: torch.dtype, transforms: list[Transform] | None = None,
                 seed: int = 0, pad_id: int | None = None) -> None:
        self.asm, self.trainee, self.device, self.input_dtype = asm, trainee, device, input_dtype
        self.pad_id = pad_id  # text: token ids padded with it (batches trimmed, mask built)
        self.transforms = transforms or []
        self.gen = torch.Generator().manual_seed(seed)
        self.s_cap = FeatureCapture(trainee, asm.student_paths, "student")
        self.t_cap = (FeatureCapture(asm.teachers[0], asm.teacher_paths, "teacher")
                      if asm.teachers else None)
        self.teacher_forwards = 0
        # text without per-token terms on one unwrapped worker: forward rows grouped by
        # length (kd.train.embed_metrics.forward_by_length), not padded to the batch's longest;
        # DDP / FSDP take one forward per backward, so several workers keep one forward
        self.by_length = (pad_id is not None and not self.s_cap.paths and not asm.teacher_paths
                          and not isinstance(trainee, torch.nn.parallel.DistributedDataParallel)
                          and not is_fsdp(trainee))

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
            logits = [(encode(t, x, TEXT_CHUNK, self.pad_id) if self.by_length else t(x)).float()
                      for t in self.asm.teachers]
        return logits, dict(self.t_cap.features) if self.t_cap else {}

    def inputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's ``x`` on the device; token ids without their all-pad tail columns."""
        x = batch["x"].to(self.device, self.input_dtype)
        return x if self.pad_id is None else trim_pad(x, self.pad_id)

    def __call__(self, batch: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor], DistillBatch]:
        x = self.inputs(batch)
        y = batch["y"].to(self.device)
        if self.transforms and self.trainee.training:  # the teacher sees the same view
            x = apply_transforms(self.transforms, x, self.gen)
        logits = (forward_by_length(self.trainee, x, self.pad_id, TEXT_CHUNK) if self.by_length
                  else self.trainee(x))
        t_logits, t_feats = (self.teacher_outputs(batch, x, logits.shape[1])
                             if self.asm.teachers else ([], {}))
        db = DistillBatch(logits.float(), y, t_logits, dict(self.s_cap.features), t_feats,
                          token_mask=None if self.pad_id is None else x != self.pad_id)
        total, parts = self.asm.loss(db)
        return total, parts, db


def _score(step: Step, batch: dict[str, torch.Tensor], sums: list[float]) -> None:
    """Add one val batch to ``sums``: [correct, agree, ce_sum, labeled, rows] for a
    classifier; for embeddings (``step.pad_id`` set) slot 0 sums the cosine to the
    teacher and slot 3 counts the rows it was taken over."""
    x, y = step.inputs(batch), batch["y"].to(step.device)
    logits = step.trainee(x).float()
    sums[4] += float(len(y))
    if step.pad_id is not None:
        if step.asm.teachers:
            t = step.teacher_logits(batch, x)[0]
            sums[0] += float(F.cosine_similarity(logits, t.float(), dim=1).sum())
            sums[3] += float(len(y))
        return
    pred = logits.argmax(1)
    lab = y >= 0
    sums[0] += float((pred[lab] == y[lab]).sum())
    if lab.any():
        sums[2] += float(F.cross_entropy(logits[lab], y[lab], reduction="sum"))
    sums[3] += float(lab.sum())
    if step.asm.teachers:
        sums[1] += float((step.teacher_logits(batch, x)[0].argmax(1) == pred).sum())


def evaluate_shard(step: Step, ds: Any, spec: dict[str, Any], rank: int, world: int,
                   device: torch.device) -> dict[str, float]:
    """Accuracy, teacher agreement and CE over this worker's slice of ``val`` (for
    embeddings: ``val/cosine``, the mean cosine to the teacher, and ``val/loss`` =
    1 - that), all-reduced so every worker returns metrics of the whole set. Every rank issues
    the same trainee forwards (`lockstep`): FSDP's forward is a collective, so a rank
    with no rows in a batch (or no batches left) runs a one-row padding forward."""
    step.trainee.eval()
    sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # correct, agree, ce_sum, labeled, rows
    pad = torch.as_tensor(spec["sample"][:1]).to(device, step.input_dtype)
    with torch.no_grad():
        for batch in lockstep(ds.iter_torch_batches(batch_size=512), world, device):
            keep = None if batch is None else (batch["idx"] % world) == rank
            if keep is None or not keep.any():
                step.trainee(pad)  # padding forward: equal collectives on every rank
                if step.asm.teachers and is_fsdp(step.asm.teachers[0]):  # a sharded teacher too
                    step.teacher_logits({}, pad)
                continue
            _score(step, {k: v[keep] for k, v in batch.items()}, sums)
    correct, agree, ce, labeled, rows = all_reduce(sums, device)
    if step.pad_id is not None:
        step.trainee.train()
        cos = correct / max(labeled, 1)
        return {"val/cosine": cos, "val/loss": 1.0 - cos, "val/samples": rows}
    out = {"val/accuracy": correct / max(labeled, 1), "val/loss": ce / max(labeled, 1),
           "val/samples": rows}
    if step.asm.teachers:
        out["val/teacher_agreement"] = agree / max(rows, 1)
    step.trainee.train()
    return out

