"""FSDP2-sharded students and mixed precision, through the real loop.

- On CPU (gloo), in CI: 2 Ray Train workers shard a batch-norm student with FSDP2 in
  bf16, distil it with KD + a FitNets hint (a plain-tensor adapter beside the DTensor
  parameters) under gradient clipping and accumulation, resume a re-submitted run from
  its checkpoint, and the saved weights score the same on the holdout.
- On a CUDA GPU only (skipped where torch sees none; CI has none): the same student on
  the GPU, and an fp16 teacher whose GradScaler state is in every checkpoint and carried
  across a resume. Last run on an H200: see docs/cluster.md.

The first GPU run of this scenario failed twice (bf16 batch-norm weights beside fp32
running statistics; a foreach optimizer update and the grad-norm clip given DTensors and
plain tensors in one list); the CPU test now catches both.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_cluster import _epochs_logged

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _exp(tmp: Path, name: str, trainer: dict[str, Any], **parts: Any) -> Any:
    from kd.config import experiment_from_dict, resolve_paths

    doc = {
        "name": name, "seed": 0, "data": {"source": "digits"},
        "teacher": {"model": "cnn_small", "args": {"channels": [32, 64]}},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": {"name": "none"}},
        "trainer": {"epochs": 2, "batch_size": 64, **trainer},
        "checkpoint": {"every_epochs": 1, "keep": 3},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": name},
        "storage": {"path": str(tmp / "runs")},
        **parts,
    }
    return resolve_paths(experiment_from_dict(doc))


def _fsdp_student(tmp: Path, teacher: str, scaling: dict[str, Any]) -> tuple[Any, Any]:
    """A cnn_small student (batch norms) sharded by FSDP2, bf16, KD + FitNets, grad_accum 2,
    grad_clip 1.0: 2 epochs, then re-submitted with epochs 3. ``(experiment, outcome)``."""
    from kd.train.run import train_run

    parts = {
        "teacher": {"model": "cnn_small", "args": {"channels": [32, 64]}, "weights": teacher},
        "student": {"model": "cnn_small", "args": {"channels": [16, 32]}},
        "distill": {"temperature": 4.0, "ce_weight": 0.5, "losses": [
            {"name": "kd", "weight": 0.9},
            {"name": "fitnet", "weight": 0.1, "student": "block2", "teacher": "block2"}]},
        "scaling": {**scaling, "strategy": "fsdp"},
    }
    trainer = {"precision": "bf16", "grad_accum": 2, "grad_clip": 1.0, "batch_size": 16}
    first = train_run(_exp(tmp, "fsdp", trainer, **parts), "student", run_name="s")
    exp = _exp(tmp, "fsdp", {**trainer, "epochs": 3}, **parts)
    out = train_run(exp, "student", run_name="s")
    assert out.run_id == first.run_id
    return exp, out


def _check_student(exp: Any, out: Any, min_accuracy: float) -> None:
    from kd.train.run import evaluate_weights

    assert _epochs_logged(exp, out.run_id) == [1, 2, 3]  # epochs 1-2 not retrained
    assert out.metrics["val/accuracy"] > min_accuracy, out.metrics
    scored = evaluate_weights(exp, out.weights)  # a plain safetensors file, scored on the CPU
    assert abs(scored["accuracy"] - out.holdout["accuracy"]) < 0.02, (scored, out.holdout)


@pytest.mark.slow
def test_fsdp_bf16_student_on_two_cpu_workers(digits_teacher: str, workdir: Path) -> None:
    exp, out = _fsdp_student(workdir, digits_teacher, {"num_workers": 2})
    _check_student(exp, out, 0.5)


@pytest.fixture(scope="module")
def fp16_teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """A cnn_small teacher trained 2 epochs in fp16 on the GPU, then re-submitted with
    epochs 3 under the same run name: ``(experiment, outcome of the resumed run)``."""
    from kd.runtime import ensure_ray
    from kd.train.run import train_run

    ensure_ray()  # its own Ray: a GPU machine needs no S3 test server for these
    tmp = tmp_path_factory.mktemp("fp16")
    gpu = {"scaling": {"num_workers": 1, "use_gpu": True}}
    first = train_run(_exp(tmp, "fp16", {"precision": "fp16"}, **gpu), "teacher", run_name="t")
    exp = _exp(tmp, "fp16", {"precision": "fp16", "epochs": 3}, **gpu)
    again = train_run(exp, "teacher", run_name="t")
    assert again.run_id == first.run_id
    return exp, again


@needs_gpu
def test_fp16_trains_with_a_grad_scaler_and_resumes(fp16_teacher: tuple[Any, Any]) -> None:
    from kd.train.checkpoint import read_checkpoint

    exp, out = fp16_teacher
    assert _epochs_logged(exp, out.run_id) == [1, 2, 3]
    assert out.metrics["val/accuracy"] > 0.8 and out.holdout["accuracy"] > 0.8
    run = Path(exp.storage.path) / "t"
    scales = []
    for epoch in (1, 2, 3):
        scaler = read_checkpoint(run / f"epoch_{epoch:05d}")["state"]["scaler"]
        assert set(scaler) >= {"scale", "_growth_tracker"}, scaler
        scales.append(float(scaler["scale"]))
    assert all(math.isfinite(s) and s > 0 for s in scales), scales
    # The resumed epoch 3 started from epoch 2's scale, not a fresh 65536: with ~17
    # steps an epoch and growth_interval 2000 the scale only ever backs off here.
    assert scales[2] <= scales[1] <= scales[0] <= 65536.0, scales


@needs_gpu
def test_fsdp_bf16_student_on_a_gpu(fp16_teacher: tuple[Any, Any], tmp_path: Path) -> None:
    exp, out = _fsdp_student(tmp_path, fp16_teacher[1].weights, {"num_workers": 1, "use_gpu": True})
    _check_student(exp, out, 0.7)
    assert max(h.get("gpu/max_mem_gb", 0.0) for h in out.history) > 0  # rank 0's peak
