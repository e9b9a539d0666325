"""The driver side of a run: checks before any worker starts (`preflight`) and `fit`,
which runs `kd.train.loop.train_loop_per_worker` under a Ray ``TorchTrainer``."""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kd.config import Experiment
from kd.data import Splits
from kd.data.splits import held_for_epochs
from kd.data.transforms import build_transforms
from kd.errors import InputError
from kd.models.weights import WEIGHTS_FILE, resolvers
from kd.train.assemble import Role, assemble
from kd.train.checkpoint import prune_checkpoints
from kd.train.loop import train_loop_per_worker
from kd.train.semisup import check_label_use
from kd.train.text import pad_id


@dataclass
class FitResult:
    """What a finished run hands back: final metrics, per-epoch history, weights."""

    metrics: dict[str, float]
    history: list[dict[str, float]]
    checkpoint_dir: str
    run_name: str
    checkpoint: Any = None  # the ray.train.Checkpoint (carries the S3 filesystem)


def preflight(exp: Experiment, role: Role, splits: Splits) -> None:
    """Everything that can be checked before a worker starts: names, weights that
    fit, feature paths, class counts, strategy and precision on this hardware."""
    if exp.scaling.strategy == "fsdp" and exp.scaling.num_workers == 0:
        raise InputError("scaling.strategy: fsdp shards the student across Ray Train workers; "
                         "set scaling.num_workers >= 1 (0 runs in this process, unsharded)")
    if exp.trainer.precision == "fp16" and not exp.scaling.use_gpu:
        raise InputError("trainer.precision: fp16 needs a GPU; use bf16 or fp32 on CPU")
    if exp.trainer.precision == "fp16" and exp.scaling.strategy == "fsdp":
        raise InputError("trainer.precision: fp16 is not supported with scaling.strategy: "
                         "fsdp (each rank would check only its own shard for inf/nan); use bf16")
    if exp.scaling.use_gpu and not torch.cuda.is_available() and exp.scaling.num_workers == 0:
        raise InputError("scaling.use_gpu: true but no GPU is visible to the driver")
    if exp.teacher is not None and exp.teacher.shard and exp.scaling.strategy != "fsdp":
        raise InputError("teacher.shard: sharding the teacher needs scaling.strategy: fsdp "
                         "(with ddp every worker holds a replica)")
    check_label_use(exp, role, splits)
    if exp.trainer.batch_size > len(splits.train):
        raise InputError(f"trainer.batch_size: {exp.trainer.batch_size} is larger than the training "
                         f"split ({len(splits.train)} rows of {exp.data.source}): every epoch "
                         f"would be one short step; use at most {len(splits.train)}")
    check_output_is_not_a_teacher(exp, role)
    build_transforms(exp.data.transforms, splits.input_shape, splits.integer_inputs)
    from kd import storage

    storage.check_writable(exp.storage.path, exp.storage.endpoint_url)
    assemble(exp, role, splits.input_shape, splits.num_classes, sample_batch(splits))


def final_weights_uri(exp: Experiment) -> str:
    """The latest copy of a name's weights: ``<storage.path>/<name>/model.safetensors``
    (each run's own file is `kd.train.output.run_weights_uri`)."""
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


def sample_batch(splits: Splits) -> torch.Tensor:
    """Four train rows (read through Ray Data: a bounded sample, not the split)."""
    x = splits.train.sample(4).x
    return torch.as_tensor(x, dtype=torch.int64 if splits.integer_inputs else torch.float32)


def run_dir(exp: Experiment, run_name: str) -> str:
    """The folder of one Ray run: ``<storage.path>/<run_name>``."""
    from kd import storage

    return storage.join(exp.storage.path, run_name)


def _epoch_datasets(splits: Splits, train_dataset: Any | None) -> dict[str, Any]:
    """train (the cache's rows when given) and val, each held in the object store for
    the epochs when small (`kd.data.splits.held_for_epochs`)."""
    row = 4 * math.prod(splits.input_shape) + 8 * (2 + splits.num_classes)  # x, y, idx, logits
    train = train_dataset if train_dataset is not None else splits.train
    return {"train": held_for_epochs(train, len(splits.train), row),
            "val": held_for_epochs(splits.val, len(splits.val), row)}


def datasets_to_split(exp: Experiment) -> list[str]:
    """``["train"]`` across several workers (Ray Data's ``streaming_split``: equal shards);
    ``[]`` for one worker (or none: the loop in the driver), which then reads the whole
    train stream itself (``Dataset.iterator()``, as every worker reads val): the same rows
    in the same per-epoch shuffle, without a split of one. That split costs Ray Data's
    ``SplitCoordinator`` actor: a process started before the first batch, every block
    handed through it, and Ray's 10 ms core-worker wake-ups for the rest of the run.
    Measured back to back (bench/RESULTS.md, "one worker without a split of one"): the same
    losses, resnet20 +8-10% img/s, its first epoch 1.2-1.7x faster."""
    return ["train"] if exp.scaling.num_workers > 1 else []


@contextmanager
def caller_signals() -> Iterator[None]:
    """Put the caller's SIGINT and SIGUSR1 handlers back when the block ends. Ray Train's
    ``fit()`` installs its own SIGINT handler in the main thread (a first Ctrl-C aborts the
    run gracefully) and leaves it there, holding the finished run's controller: that
    controller and its DatasetManager stayed alive until the next ``fit``, and a Ctrl-C
    after training (holdout scoring, registration, a workflow's next stage) was swallowed
    (it asked the finished controller to abort; a third Ctrl-C exited with status 0).
    Tune's ``fit()`` leaves its handler on SIGINT and on SIGUSR1, whose default action
    (ending the process) it replaced with setting a finished sweep's stop flag."""
    main = threading.current_thread() is threading.main_thread()
    names = [s for s in ("SIGINT", "SIGUSR1") if hasattr(signal, s)] if main else []
    previous = {getattr(signal, s): signal.getsignal(getattr(signal, s)) for s in names}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: not set from Python, nothing to put back
                signal.signal(signum, handler)


def fit(exp: Experiment, role: Role, splits: Splits, run_id: str, tracking_uri: str,
        run_name: str, train_dataset: Any | None = None,
        callbacks: list[Any] | None = None) -> FitResult:
    """Run the loop under a `TorchTrainer` and return the final metrics and checkpoint.
    ``train_dataset`` replaces the train split's stream (the teacher cache's rows);
    Ray Train streams both to the workers (train split across several, whole to one:
    `datasets_to_split`; val whole, each worker keeping its ``idx % world`` rows), from
    the object store when small.
    A ``run_name`` whose folder already holds checkpoints resumes from the latest."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from kd import sse, storage
    from kd.train.epoch_log import EpochRelay
    from kd.train.failures import FailureNotice

    fs, storage_path = storage.arrow_fs(exp.storage.path, exp.storage.endpoint_url,
                                        sse.of(exp.storage))
    spec = {
        "exp": exp.model_dump(mode="json"), "role": role, "input_shape": list(splits.input_shape),
        "num_classes": splits.num_classes, "sample": sample_batch(splits).tolist(),
        "input_integer": splits.integer_inputs,
        "pad_id": pad_id(exp) if exp.task == "embed" else None,
        "train_rows": len(splits.train), "run_dir": run_dir(exp, run_name),
        "storage_fs": fs, "run_path": f"{storage_path}/{run_name}",
        "steps_per_epoch": math.ceil(len(splits.train) / max(1, exp.trainer.batch_size)),
        "resolvers": resolvers(),  # URI resolvers registered above train/ (models:/), for the workers
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
            callbacks=[*(callbacks or []), FailureNotice(
                exp.trainer.max_failures, fs, f"{storage_path}/{run_name}", exp.trainer.epochs)]),
        datasets=_epoch_datasets(splits, train_dataset),
        dataset_config=ray.train.DataConfig(datasets_to_split=datasets_to_split(exp)),
    )
    with caller_signals(), EpochRelay(fs, f"{storage_path}/{run_name}", tracking_uri, run_id):
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

