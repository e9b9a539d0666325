"""Batch `kd predict`: a registered model over many files as one Ray Data job.

``kd predict models:/NAME@ALIAS --input s3://b/in/*.parquet --output s3://b/out/``:

1. The driver resolves the alias to a version once (``models:/NAME/V``: every actor
   loads that same version even if the alias moves during the job), downloads it
   sha256-verified to read its input shape, lists the inputs (`batch_read.list_inputs`,
   no row read), reads the first rows of the first file (`batch_read.check_head`) and
   checks that the output can be written. Each failure is one `InputError` line.
2. Ray Data streams the files (`batch_read.dataset`, one read task per file) into
   ``map_batches`` over an actor pool of ``concurrency`` `Predictor` actors; each loads
   the verified model once (on a GPU with ``gpus_per_worker``) and adds ``pred``,
   ``p0..p{C-1}`` (and ``label`` when the model recorded class names).
3. Ray Data writes the rows as parquet under ``output`` (files ``part-<job>-<write uuid>-<task>.parquet``),
   each row beside its keys (``file``, ``row``, ``idx`` and the key column if any). The
   driver never holds the rows; it reads only the written files' footers to count them,
   then writes ``_SUCCESS.json`` last. An output that holds an earlier job's files is
   refused unless ``overwrite`` (`batch_output`: a retried job replaces its rows).

Only the local single-file path (`kd.registry.predict.predict_file`) reads a whole file
in the driver; `is_batch` decides which path a command line takes.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kd import storage
from kd.errors import InputError
from kd.registry.batch_output import SUCCESS, check_fresh, filenames, mark_done, written
from kd.registry.batch_read import ReadPlan, check_head, dataset, key_column, list_inputs

DEFAULT_BATCH = 1024
LABEL_KEY = "class_names"  # kd_model.json: the class names recorded at training ([] = none)


@dataclass(frozen=True)
class BatchReport:
    """What a batch prediction did: the pinned model, rows and files in, files out."""

    model: str
    rows: int
    input_files: int
    output_files: list[str]


def is_batch(inputs: list[str], output: str | None) -> bool:
    """True when the command line needs the Ray Data path: several inputs, an ``s3://``
    input, a folder or glob, or an output that is a folder / ``s3://`` prefix. One local
    .npz / .csv / .parquet file to a file (or stdout) keeps the in-process path."""
    if len(inputs) != 1:
        return True
    src = inputs[0]
    if storage.is_s3(src) or any(c in src for c in "*?[") or Path(src).is_dir():
        return True
    return output is not None and (storage.is_s3(output) or output.endswith("/")
                                   or Path(output).is_dir())


def class_names(cfg: dict[str, Any]) -> list[str] | None:
    """The class names a model recorded at training (``kd_model.json``), else None."""
    names = cfg.get(LABEL_KEY)
    if isinstance(names, list) and names and len(names) == int(cfg["num_classes"]):
        return [str(n) for n in names]
    return None


class Predictor:
    """The ``map_batches`` callable class: loads ``models:/NAME/V`` once per actor (sha256
    verified, `kd.registry.predict.load_registered`), then turns each numpy batch's ``x``
    into ``pred``, ``p0..`` (and ``label``); the key columns pass through unchanged."""

    def __init__(self, model_uri: str, tracking_uri: str, use_gpu: bool = False) -> None:
        import torch

        from kd.registry.predict import load_registered

        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # an actor may lack the driver's env
        self.model = load_registered(model_uri)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model.module.to(self.device)
        self.labels = class_names(self.model.config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Probabilities of ``batch["x"]``; ``x`` is dropped from the output."""
        import torch

        from kd.registry.loader import to_batch

        x = to_batch(batch.pop("x"), self.model.input_shape, self.model.integer)
        with torch.no_grad():
            probs = self.model.module(x.to(self.device)).float().softmax(-1).cpu().numpy()
        pred = probs.argmax(1).astype(np.int64)
        batch["pred"] = pred
        if self.labels is not None:
            batch["label"] = np.asarray(self.labels, dtype=object)[pred]
        for i in range(probs.shape[1]):
            batch[f"p{i}"] = probs[:, i]
        return batch


def pin_model(uri: str) -> tuple[str, dict[str, Any]]:
    """``(models:/NAME/V, kd_model.json)``: the alias resolved once, the version
    downloaded and verified in the driver (a bad URI fails here, before Ray starts)."""
    import json

    from kd.registry.loader import CONFIG, DATA_DIR
    from kd.registry.store import fetch_verified, get_version, parse_uri, registry_client

    ref = parse_uri(uri)
    mv = get_version(registry_client(), ref)
    pinned = f"models:/{mv.name}/{mv.version}"
    folder = fetch_verified(pinned)
    return pinned, json.loads((folder / DATA_DIR / CONFIG).read_text())


def check_output(output: str, endpoint: str | None = None) -> None:
    """The output folder / ``s3://`` prefix accepts writes (one line naming it if not)."""
    storage.check_writable(output, endpoint, what=f"--output {output}")


def predict_batch(model: str, inputs: list[str], output: str, batch_size: int = DEFAULT_BATCH,
                  concurrency: int = 1, gpus_per_worker: float = 0.0, key: str | None = None,
                  endpoint: str | None = None, overwrite: bool = False) -> BatchReport:
    """Run the batch job (module docstring); returns what it wrote. Bad input (no file
    matches, a missing key column, a wrong row width, an unwritable output, a bad model
    URI, earlier output without ``overwrite``: `batch_output`) is an `InputError` with
    one line."""
    from kd.data.readers import Columns
    from kd.data.stream import run_pool
    from kd.runtime import ensure_ray
    from kd.tracking import tracking_uri

    if batch_size < 1 or concurrency < 1 or gpus_per_worker < 0:
        raise InputError("--batch-size and --concurrency must be >= 1, --gpus-per-worker >= 0")
    endpoint = storage.endpoint_url(endpoint)
    pinned, cfg = pin_model(model)
    if cfg.get("task") == "embed":
        raise InputError(f"{model}: batch predict of text embedding models is not supported; "
                         "give one local .jsonl/.txt/.parquet/.csv file and an output file")
    files = list_inputs(inputs, endpoint)
    plan = ReadPlan(files, Columns(key=key_column(files[0], key)),
                    int(np.prod(cfg["input_shape"])))
    check_head(plan)
    check_output(output, endpoint)
    cleared = check_fresh(output, endpoint, overwrite)
    if cleared:
        print(f"[kd] --overwrite: deleted {cleared} files of an earlier job in {output}",
              flush=True)
    ensure_ray()
    job = uuid.uuid4().hex[:8]
    import ray.data

    ds = dataset(plan).map_batches(
        Predictor, fn_constructor_kwargs={"model_uri": pinned, "tracking_uri": tracking_uri(),
                                          "use_gpu": gpus_per_worker > 0},
        batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=1, num_gpus=gpus_per_worker or None)
    fs, path = storage.arrow_fs(output, endpoint)
    # a read task's InputError arrives wrapped by Ray; raised once the actors are released
    run_pool(lambda: ds.write_parquet(path, filesystem=fs, filename_provider=filenames(job)))
    files_out, rows = written(output, job, endpoint)
    mark_done(output, endpoint, {"model": pinned, "rows": rows, "inputs": len(files),
                                 "job": job, "files": files_out})
    print(f"[kd] {pinned}: wrote {rows} predictions for {len(files)} input files to "
          f"{output} ({len(files_out)} parquet files, then {SUCCESS})", flush=True)
    return BatchReport(pinned, rows, len(files), files_out)
