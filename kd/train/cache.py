"""The frozen teacher's output cache: the teacher runs once, every run and trial reads.

`ensure_cache` runs the primary teacher over the train split with Ray Data
``map_batches`` (a pool of actors, each holding one frozen teacher; on a GPU when
``scaling.use_gpu``; bf16 autocast when ``trainer.precision: bf16``) and writes its
outputs as parquet under ``<storage.path>/teacher-cache/<key>/``, local or s3://.
What is stored: the train rows themselves (``x``, ``y``, ``idx``: the row key) next to
``teacher_logits`` and ``teacher_feature:<path>`` for every teacher module path a loss
term hooks, so a cached run streams the cache as its train set (`cache_dataset`):
no join, nothing loaded whole (docs/cache.md says why).

``key = sha256(teacher weights sha256, teacher architecture, data content hash,
transforms, outputs requested, precision, format)``: change any of them and the key
changes, so the cache is recomputed, never silently reused.

Atomicity: rows go into ``<key>/data-<uuid>/``; the manifest ``<key>/_SUCCESS``
(JSON: the key's inputs, the data folder's name, the row count, and the size and
sha256 of every parquet shard) is written last. `cache_dataset` checks every shard
against it before Ray Data reads one (`kd.integrity.verify_tree`): a corrupt,
truncated, missing or added shard, or an unreadable manifest, is an `InputError`
naming the file.
A cache without a manifest is invisible (and replaced); a manifest whose recorded
teacher or data hash differs from what is expected is logged and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from kd import integrity, sse, storage
from kd.config import Experiment
from kd.data import Splits
from kd.data.shards import shard_dataset
from kd.data.stream import run_pool
from kd.errors import InputError
from kd.train.columns import TEACHER_FEATURE, TEACHER_LOGITS, TEACHER_TOPK_INDICES, TEACHER_TOPK_VALUES
from kd.train.embed_metrics import encode
from kd.train.text import pad_id, run_splits, weights_ref

CACHE_DIR = "teacher-cache"
TEXT_SUB_BATCH = 32
MARKER = "_SUCCESS"
FORMAT_VERSION = 3  # 2: the rows' inputs and labels are stored with the outputs; 3: shard sha256s
LOGITS = "logits"


@dataclass
class TeacherCache:
    """One usable cache: where it is, its key, its manifest, whether this call computed it."""

    uri: str
    key: str
    manifest: dict[str, Any]
    computed: bool
    endpoint: str | None = None

    @property
    def data_uri(self) -> str:
        """The folder holding the parquet rows."""
        return storage.join(self.uri, self.manifest["data_dir"])


def requested_outputs(exp: Experiment) -> list[str]:
    """``logits`` plus the teacher module paths the configured loss terms read."""
    from kd.losses.base import required_paths

    _, t_paths = required_paths([t.model_dump() for t in exp.distill.losses])
    k = exp.teacher.cache_top_k if exp.teacher is not None else None
    return [f"{LOGITS}:top{k}" if k else LOGITS, *t_paths]


def teacher_sha256(exp: Experiment) -> str:
    """sha256 of the primary teacher's weights file (`kd.train.lineage.teacher_sha`);
    an error without teacher weights."""
    from kd.train.lineage import teacher_sha

    sha = teacher_sha(exp)
    if not sha:
        raise InputError("teacher.weights: required to cache teacher outputs")
    return sha


def key_facts(exp: Experiment, splits: Splits) -> dict[str, Any]:
    """Everything the cached outputs depend on (the key hashes exactly this)."""
    assert exp.teacher is not None
    return {
        "format": FORMAT_VERSION,
        "teacher_sha256": teacher_sha256(exp),
        "teacher": {"model": exp.teacher.model, "args": exp.teacher.args,
                    "width": exp.teacher.width},
        "data_hash": splits.data_hash,
        "train_rows": len(splits.train),
        "transforms": list(exp.data.transforms),
        "outputs": requested_outputs(exp),
        "precision": exp.trainer.precision,
    }


def cache_key(facts: dict[str, Any]) -> str:
    """sha256 (24 hex) of the canonical JSON of `key_facts`."""
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]


def cache_root(exp: Experiment) -> str:
    """``<storage.path>/teacher-cache``."""
    return storage.join(exp.storage.path, CACHE_DIR)


def _read_manifest(fs: Any, path: str, uri: str) -> dict[str, Any] | None:
    """The cache's manifest, None when there is none; an `InputError` naming it when it
    is not the JSON object `compute_cache` writes (corrupt or truncated)."""
    import pyarrow.fs as pafs

    info = fs.get_file_info(f"{path}/{MARKER}")
    if info.type != pafs.FileType.File:
        return None
    with fs.open_input_stream(f"{path}/{MARKER}") as f:
        raw = f.read()
    name = storage.join(uri, MARKER)
    try:
        doc = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{name}: teacher cache manifest unreadable ({type(e).__name__}); "
                         "corrupt or truncated: rebuild it with kd cache-teacher --force") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data_dir"), str) \
            or (doc.get("facts", {}).get("format") == FORMAT_VERSION
                and not isinstance(doc.get("files"), dict)):
        raise InputError(f"{name}: not a teacher cache manifest (fields missing); corrupt: "
                         "rebuild it with kd cache-teacher --force")
    return doc


def _write_manifest(fs: Any, path: str, manifest: dict[str, Any]) -> None:
    with fs.open_output_stream(f"{path}/{MARKER}") as f:
        f.write(json.dumps(manifest, indent=1, sort_keys=True).encode())


def _clear(fs: Any, path: str) -> None:
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir_contents(path, missing_dir_ok=True)


def find_cache(exp: Experiment, splits: Splits) -> TeacherCache | None:
    """The complete cache for this teacher + data + outputs, or None (logged) when
    there is none, it is half-written, or its manifest disagrees with the key."""
    facts = key_facts(exp, splits)
    key = cache_key(facts)
    uri = storage.join(cache_root(exp), key)
    fs, path = storage.arrow_fs(uri, exp.storage.endpoint_url)
    manifest = _read_manifest(fs, path, uri)
    if manifest is None:
        return None
    recorded = manifest.get("facts", {})
    if recorded != facts:
        diff = sorted(k for k in facts if recorded.get(k) != facts[k])
        print(f"[kd] teacher cache {uri}: its manifest differs in {', '.join(diff)} "
              f"(written by teacher sha256 {str(recorded.get('teacher_sha256'))[:12]}, "
              f"expected {facts['teacher_sha256'][:12]}): recomputing", flush=True)
        return None
    return TeacherCache(uri, key, manifest, computed=False, endpoint=exp.storage.endpoint_url)


class TeacherForward:
    """Ray Data ``map_batches`` callable: one frozen teacher per actor; a numpy batch
    ``{x, y, idx}`` -> ``{x, y, idx, teacher_logits, teacher_feature:<path>...}``."""

    def __init__(self, exp_doc: dict[str, Any], input_shape: list[int], num_classes: int,
                 paths: list[str], top_k: int | None = None, actors: int = 1) -> None:
        import torch

        from kd.config import experiment_from_dict
        from kd.models.weights import freeze
        from kd.train.assemble import build_spec
        from kd.train.capture import FeatureCapture

        exp = experiment_from_dict(exp_doc)
        assert exp.teacher is not None
        self.device = torch.device("cuda" if exp.scaling.use_gpu and torch.cuda.is_available()
                                   else "cpu")
        if self.device.type == "cpu":  # Ray gave the actor OMP_NUM_THREADS=1: use its share
            from kd.train.threads import actor_threads

            torch.set_num_threads(actor_threads(actors))
        self.model = freeze(build_spec(exp.teacher, "teacher", tuple(input_shape), num_classes,
                                       load_weights=True)).to(self.device)
        self.paths = paths
        self.top_k = min(top_k, num_classes) if top_k else None
        self.capture = FeatureCapture(self.model, paths, "teacher") if paths else None
        self.bf16 = exp.trainer.precision == "bf16"
        # text: trim all-pad tail columns (exact: the models mask by pad id); a text cache
        # holds sentence embeddings only (kd.config refuses per-token terms with the cache)
        self.pad = pad_id(exp) if exp.task == "embed" else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        x = torch.from_numpy(np.array(batch["x"]))
        x = x.to(self.device, torch.int64 if not x.is_floating_point() else torch.float32)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                             enabled=self.bf16):
            # text: rows by length in sub-batches, each cut to its longest row (exact: the
            # models mask by pad id), instead of padding every row to the batch's longest
            logits = (self.model(x) if self.pad is None
                      else encode(self.model, x, batch_size=TEXT_SUB_BATCH, pad_id=self.pad))
        out = {"x": np.asarray(batch["x"]), "y": np.asarray(batch["y"]),
               "idx": np.asarray(batch["idx"])}
        if self.top_k:
            values, indices = logits.float().topk(self.top_k, dim=1)
            out[TEACHER_TOPK_VALUES] = values.cpu().numpy()
            out[TEACHER_TOPK_INDICES] = indices.cpu().numpy().astype(np.int64)
        else:
            out[TEACHER_LOGITS] = logits.float().cpu().numpy()
        if self.capture is not None:
            for p in self.paths:
                out[TEACHER_FEATURE + p] = self.capture.features[p].float().cpu().numpy()
        return out


def compute_cache(exp: Experiment, splits: Splits, batch_size: int = 256) -> TeacherCache:
    """Run the teacher over the train split and write the cache (see module docstring)."""
    import ray.data

    from kd.runtime import ensure_ray

    ensure_ray()
    facts = key_facts(exp, splits)
    key = cache_key(facts)
    uri = storage.join(cache_root(exp), key)
    fs, path = storage.arrow_fs(uri, exp.storage.endpoint_url, sse.of(exp.storage))
    _clear(fs, path)  # a half-written attempt (no manifest) is never read: start over
    data_dir = f"data-{uuid.uuid4().hex[:8]}"
    use_gpu = exp.scaling.use_gpu
    workers = max(1, exp.scaling.num_workers)
    print(f"[kd] teacher cache: computing {key} ({len(splits.train)} rows, outputs "
          f"{facts['outputs']}, {workers} actor(s){' on GPU' if use_gpu else ''})", flush=True)
    t0 = time.perf_counter()
    out = splits.train.dataset().map_batches(
        TeacherForward,
        fn_constructor_kwargs={"exp_doc": exp.model_dump(mode="json"),
                               "input_shape": list(splits.input_shape),
                               "num_classes": splits.num_classes,
                               "paths": facts["outputs"][1:],
                               "top_k": exp.teacher.cache_top_k, "actors": workers},
        batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=1 if use_gpu else 0)
    run_pool(lambda: out.write_parquet(f"{path}/{data_dir}", filesystem=fs))  # bad data: 1 line
    files = integrity.hash_tree(fs, f"{path}/{data_dir}")  # read back once: shard sha256s
    seconds = time.perf_counter() - t0
    manifest = {"facts": facts, "key": key, "data_dir": data_dir, "rows": len(splits.train),
                "columns": [*([TEACHER_TOPK_VALUES, TEACHER_TOPK_INDICES]
                              if exp.teacher.cache_top_k else [TEACHER_LOGITS]),
                            *[TEACHER_FEATURE + p for p in facts["outputs"][1:]]],
                "files": files, "seconds": round(seconds, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_manifest(fs, path, manifest)  # last: only now is the cache visible
    print(f"[kd] teacher cache: wrote {uri} in {seconds:.1f}s", flush=True)
    return TeacherCache(uri, key, manifest, computed=True, endpoint=exp.storage.endpoint_url)


def ensure_cache(exp: Experiment, splits: Splits, force: bool = False) -> TeacherCache:
    """The cache for this experiment: reused when a complete one with the same key
    exists (unless ``force``), else computed now."""
    if exp.teacher is None:
        raise InputError("teacher: section is required to cache teacher outputs")
    if not force:
        found = find_cache(exp, splits)
        if found is not None:
            print(f"[kd] teacher cache: reusing {found.uri}", flush=True)
            return found
    return compute_cache(exp, splits)


def cache_dataset(cache: TeacherCache) -> Any:
    """The cache's rows (``x``, ``y``, ``idx`` and the teacher columns) as a lazy Ray
    Dataset read block by block from its parquet shards: the train set of a cached run.
    Every shard is checked against the manifest's size and sha256 first (one streamed
    read in this process; `kd.integrity.verify_tree`)."""
    fs, path = storage.arrow_fs(cache.data_uri, cache.endpoint)
    integrity.verify_tree(fs, path, cache.manifest.get("files") or {}, cache.data_uri)
    return shard_dataset(fs, path)


def cache_teacher(exp: Experiment, force: bool = False) -> TeacherCache:
    """`kd cache-teacher CONFIG`: load the data, build or reuse the cache, print where."""
    if weights_ref(exp.teacher) is None:
        raise InputError("teacher.weights: required to cache teacher outputs")
    splits = run_splits(exp)
    cache = ensure_cache(exp, splits, force=force)
    state = "computed" if cache.computed else "reused"
    print(f"{cache.uri}  ({state}, {cache.manifest['rows']} rows, "
          f"columns {', '.join(cache.manifest['columns'])})")
    return cache
