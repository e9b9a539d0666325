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

A text embedding model (``task: embed``) takes .txt / .jsonl / .parquet / .csv files of
texts (the ``--text-column`` key / column, default ``text``): the read tasks check every
text is non-blank (one line naming the file and line / row), the `Embedder` actors
tokenize them with the model's own verified tokenizer and write ``embedding``
(``fixed_size_list<float32>[D]``) beside the keys.

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
from kd.registry.batch_read import FileTask, ReadPlan, check_head, dataset, key_column, list_inputs
from kd.registry.loader import PRECISIONS

DEFAULT_BATCH = 1024
TEXT_FORMATS = ("txt", "jsonl")  # text only; parquet / csv may hold either
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
    verified, `kd.registry.predict.load_registered`, in ``precision``), then turns each
    numpy batch's ``x`` into ``pred``, ``p0..`` (and ``label``); the key columns pass
    through unchanged."""

    def __init__(self, model_uri: str, tracking_uri: str, use_gpu: bool = False,
                 precision: str = "fp32") -> None:
        from kd.registry.predict import load_registered

        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # an actor may lack the driver's env
        self.model = load_registered(model_uri, precision).to("cuda" if use_gpu else "cpu")
        self.labels = class_names(self.model.config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Probabilities of ``batch["x"]``; ``x`` is dropped from the output."""
        probs = self.model.predict(batch.pop("x"))
        pred = probs.argmax(1).astype(np.int64)
        batch["pred"] = pred
        if self.labels is not None:
            batch["label"] = np.asarray(self.labels, dtype=object)[pred]
        for i in range(probs.shape[1]):
            batch[f"p{i}"] = probs[:, i]
        return batch


class Embedder:
    """The ``map_batches`` class of an embed model: ``text`` in, ``embedding`` out (the
    registered model's ``predict`` in ``precision``: its tokenizer, cut to its
    ``max_length``); the key columns pass through unchanged."""

    def __init__(self, model_uri: str, tracking_uri: str, use_gpu: bool = False,
                 precision: str = "fp32") -> None:
        from kd.registry.predict import load_registered

        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        self.model = load_registered(model_uri, precision).to("cuda" if use_gpu else "cpu")

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        """An arrow table: the key columns and ``embedding`` of ``batch["text"]``."""
        import pyarrow as pa

        from kd.registry.predict_text import embedding_column

        emb = self.model.predict(list(batch.pop("text")))
        return pa.table({**{k: pa.array(v) for k, v in batch.items()},
                         "embedding": embedding_column(emb)})


def read_plan(files: list[FileTask], cfg: dict[str, Any], key: str | None,
              text_column: str) -> tuple[ReadPlan, type]:
    """The `ReadPlan` of the inputs for a model of ``kd_model.json`` ``cfg``, and its
    ``map_batches`` class: texts for an embed model (`Embedder`), else rows of its input
    width (`Predictor`)."""
    from kd.data.readers import Columns
    from kd.data.text import TextSpec

    embed = cfg.get("task") == "embed"
    for f in files:
        if (embed and f.fmt in ("npz", "npy")) or (not embed and f.fmt in TEXT_FORMATS):
            raise InputError(f"--input {f.entry.uri}: " + (
                "holds no texts; a text embedding model takes .txt / .jsonl / .parquet / .csv"
                if embed else "a text file, but the model takes rows of "
                f"{int(np.prod(cfg['input_shape']))} numbers (.npz / .npy / .parquet / .csv)"))
    cols = Columns(key=key_column(files[0], key))
    if not embed:
        return ReadPlan(files, cols, int(np.prod(cfg["input_shape"]))), Predictor
    text = cfg["text"]
    cols.text = TextSpec(text_column, text["tokenizer"], text["fingerprint"],
                         int(text["max_length"]), setting="--text-column")
    cols.defer_text = True
    return ReadPlan(files, cols, 0), Embedder


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


def actor_cpus(concurrency: int) -> float:
    """The CPUs each predictor actor reserves: 1, or less when ``concurrency`` whole-CPU
    actors would leave the cluster no room for a read task (`data_task_cpus`): the actors
    would then wait forever for rows no read task can produce. Says so in one line; a
    share below 0.1 CPU is an `InputError` naming ``--concurrency``."""
    import ray

    from kd.data.stream import data_task_cpus

    total, read = ray.cluster_resources().get("CPU", 0.0), data_task_cpus()
    if concurrency + read <= total:
        return 1.0
    share = (total - read) / concurrency
    if share < 0.1:
        raise InputError(f"--concurrency {concurrency}: the Ray cluster has {total:g} CPUs, too "
                         f"few for {concurrency} actors and the read tasks ({read:g} CPU each)")
    print(f"[kd] --concurrency {concurrency} on {total:g} CPUs: each actor reserves "
          f"{share:.3g} CPU, so the read tasks ({read:g} CPU) can run", flush=True)
    return share


def check_output(output: str, endpoint: str | None = None) -> None:
    """The output folder / ``s3://`` prefix accepts writes (one line naming it if not)."""
    storage.check_writable(output, endpoint, what=f"--output {output}")


def predict_batch(model: str, inputs: list[str], output: str, batch_size: int = DEFAULT_BATCH,
                  concurrency: int = 1, gpus_per_worker: float = 0.0, key: str | None = None,
                  endpoint: str | None = None, overwrite: bool = False,
                  text_column: str = "text", precision: str = "fp32") -> BatchReport:
    """Run the batch job (module docstring), the model in ``precision`` on every actor;
    returns what it wrote. Bad input (no file
    matches, a missing key or text column, a wrong row width, a blank text, text files for
    a model of numbers or the reverse, an unwritable output, a bad model URI, earlier
    output without ``overwrite``: `batch_output`) is an `InputError` with one line."""
    from kd.data.stream import run_pool
    from kd.runtime import ensure_ray
    from kd.tracking import tracking_uri

    if batch_size < 1 or concurrency < 1 or gpus_per_worker < 0:
        raise InputError("--batch-size and --concurrency must be >= 1, --gpus-per-worker >= 0")
    if precision not in PRECISIONS:
        raise InputError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    endpoint = storage.endpoint_url(endpoint)
    pinned, cfg = pin_model(model)
    plan, udf = read_plan(list_inputs(inputs, endpoint), cfg, key, text_column)
    files = plan.files
    check_head(plan)
    check_output(output, endpoint)
    cleared = check_fresh(output, endpoint, overwrite)
    if cleared:
        print(f"[kd] --overwrite: deleted {cleared} files of an earlier job in {output}",
              flush=True)
    ensure_ray()
    job = uuid.uuid4().hex[:8]
    import ray.data

    cpus = actor_cpus(concurrency)
    ds = dataset(plan).map_batches(
        udf, fn_constructor_kwargs={"model_uri": pinned, "tracking_uri": tracking_uri(),
                                          "use_gpu": gpus_per_worker > 0,
                                          "precision": precision},
        batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=cpus, num_gpus=gpus_per_worker or None)
    fs, path = storage.arrow_fs(output, endpoint)
    # a read task's InputError arrives wrapped by Ray; raised once the actors are released
    run_pool(lambda: ds.write_parquet(path, filesystem=fs, filename_provider=filenames(job)))
    files_out, rows = written(output, job, endpoint)
    mark_done(output, endpoint, {"model": pinned, "rows": rows, "inputs": len(files),
                                 "job": job, "files": files_out})
    what = "embeddings" if udf is Embedder else "predictions"
    print(f"[kd] {pinned}: wrote {rows} {what} for {len(files)} input files to "
          f"{output} ({len(files_out)} parquet files, then {SUCCESS})", flush=True)
    return BatchReport(pinned, rows, len(files), files_out)
