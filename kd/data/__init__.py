"""Data: built-in sets and user files -> streamed train/val/holdout -> Ray Datasets.

`load_splits` is the one entry. It lists the source into a manifest
(`kd.data.manifest`, no row read), whose digest is the data hash; the split is a
hash of each row's key (`kd.data.stream`), fixed without a pass over the data;
label masking (``labels: none``, ``labeled_fraction``) is by the same hash, and an
unlabeled transfer set joins train. One streaming aggregate (`kd.data.profile`)
counts rows and classes per split and checks the labels. Nothing is materialised
in the driver: each split is read by Ray Data in blocks (`StreamSplit.dataset`).
Text (``data.text``: jsonl, txt, or a string column of parquet / csv) takes the same
path and is tokenized in the read tasks (`kd.data.text`).
"""

from __future__ import annotations

from typing import Any

from kd.config import DataConfig
from kd.data import builtin  # noqa: F401  (registers the built-in sets)
from kd.data.base import UNLABELED, ArraySplit
from kd.data.manifest import TEXT_FORMATS, Manifest, build_manifest
from kd.data.profile import Profile, SplitCounts, cached_profile, check_split_classes, profile, resolve_classes
from kd.data.readers import Columns
from kd.data.registry import DATASETS
from kd.data.splits import Splits, StreamSplit
from kd.data.stream import DATA_TASK_CPUS_ENV, SPLITS, Source, data_task_cpus
from kd.data.text import TextSpec, text_spec
from kd.errors import InputError

__all__ = ["DATA_TASK_CPUS_ENV", "DATASETS", "ArraySplit", "Splits", "StreamSplit", "load_splits",
           "to_ray", "data_task_cpus", "UNLABELED", "source_of"]


def _resolve(cfg: DataConfig) -> tuple[str, bool]:
    """``(uri, builtin?)``: a built-in name (or ``package.module:fn``) is written once to
    a local parquet file (`kd.data.builtin.materialise`)."""
    source = cfg.source
    if (source in DATASETS and ":" not in source) or (":" in source and "://" not in source):
        args = {k: v for k, v in cfg.args.items()}
        return builtin.materialise(source, args), True
    if "/" not in source and "." not in source and "*" not in source:
        DATASETS.get(source)  # raises "unknown dataset ... did you mean"
    return source, False


def _text(cfg: DataConfig, m: Manifest) -> TextSpec | None:
    """The `TextSpec` of ``data.text`` (its tokenizer loaded here); jsonl / txt files
    without ``data.text`` are an `InputError`."""
    if cfg.text is None:
        if m.fmt in TEXT_FORMATS:
            raise InputError(f"{m.source}: {m.fmt} files are text; set data.text (column, tokenizer, "
                             "max_length)")
        return None
    return text_spec(cfg.text)


def _columns(cfg: DataConfig, m: Manifest, builtin_set: bool) -> Columns:
    shape = cfg.args.get("shape")
    if shape is None and "kd.shape" in m.metadata:
        import json

        shape = json.loads(m.metadata["kd.shape"])
    key = None if builtin_set else cfg.key_column
    # a label column named in the config (not the default "y") is required
    required = cfg.y_column != DataConfig.model_fields["y_column"].default
    return Columns(cfg.x_column, cfg.y_column, key,
                   tuple(int(d) for d in shape) if shape is not None else None,
                   cfg.args.get("size"), y_required=required, text=_text(cfg, m))


def _fs(uri: str, endpoint: str | None) -> Any:
    """The pyarrow filesystem for ``uri`` (S3 with the endpoint and credentials), built
    here and shipped with the read tasks (`kd.storage.arrow_fs`)."""
    from kd import storage

    return storage.arrow_fs(uri, endpoint)[0]


def source_of(cfg: DataConfig, endpoint: str | None = None) -> tuple[Source, str]:
    """The experiment's main `Source` (split ``all``) and the data hash (the manifest
    digest plus split and label settings, the text settings and the tokenizer's
    fingerprint, and the transfer set's manifest)."""
    uri, builtin_set = _resolve(cfg)
    fmt = "parquet" if builtin_set else cfg.format
    m = build_manifest(uri, fmt, endpoint)
    if builtin_set:  # content-addressed file: its name is its version
        m.content_named = True
    s = cfg.split
    src = Source(m, _columns(cfg, m, builtin_set), "all", (s.train, s.val, s.holdout), s.seed,
                 cfg.labels, cfg.labeled_fraction, fs=_fs(uri, endpoint))
    extra = f"{s.model_dump_json()}|{cfg.labels}|{cfg.labeled_fraction}|{cfg.transforms}|" \
            f"{cfg.key_column}|{cfg.x_column}|{cfg.y_column}|{cfg.args}"
    if src.cols.text is not None:  # older (non-text) configs keep their hash
        extra += f"|{src.cols.text.digest_part()}"
    return src, m.digest(extra)


def load_splits(cfg: DataConfig, endpoint: str | None = None) -> Splits:
    """Manifest, hashed split, one streaming profile and checks (see module docstring).
    Starts (or joins) Ray: the profile is a Ray Data pass. Unlabeled text has
    ``num_classes`` 0; texts cut to ``data.text.max_length`` are counted
    (``Splits.truncated``) and reported in one line."""
    from kd.runtime import ensure_ray

    src, digest = source_of(cfg, endpoint)  # a missing file or object fails here, before Ray
    ensure_ray()
    prof = cached_profile(src, digest)
    num_classes = _num_classes(cfg, prof, src)
    train_sources = [src.with_split("train")]
    train_counts = prof.splits["train"]
    manifest = src.manifest.to_json()
    truncated = prof.truncated
    if cfg.transfer:
        tsrc, tprof = _transfer(cfg, src, prof, endpoint)
        rows = sum(c.rows for c in tprof.splits.values())
        train_counts = SplitCounts(train_counts.rows + rows, train_counts.labeled,
                                   list(train_counts.per_class))
        train_sources.append(tsrc)
        digest = Manifest(cfg.source, "", []).digest(f"{digest}|transfer={tsrc.manifest.digest()}")
        manifest["transfer"] = tsrc.manifest.to_json()
        truncated += tprof.truncated
    splits = Splits(StreamSplit(train_sources, train_counts, "train"),
                    *(StreamSplit([src.with_split(n)], prof.splits[n], n) for n in SPLITS[1:]),
                    num_classes=num_classes, input_shape=prof.input_shape, data_hash=digest,
                    input_dtype=prof.input_dtype, manifest=manifest,
                    class_names=class_names(cfg, src.manifest.classes, num_classes), truncated=truncated)
    if truncated and src.cols.text is not None:
        total = sum(len(s) for s in (splits.train, splits.val, splits.holdout))
        n = src.cols.text.max_length
        print(f"[kd] data.text.max_length {n}: {truncated:,} of {total:,} texts were cut to {n} tokens "
              "(set data.text.truncation: error to refuse them)", flush=True)
    return splits


def _num_classes(cfg: DataConfig, prof: Profile, src: Source) -> int:
    """The class count (`resolve_classes`, then `check_split_classes`); 0 for text without
    a label anywhere and no ``data.args.num_classes`` (an embedding task's data)."""
    unlabeled = all(c.labeled == 0 for c in prof.splits.values())
    if src.cols.text is not None and unlabeled and cfg.args.get("num_classes") is None:
        return 0
    num_classes = resolve_classes(prof, cfg.args.get("num_classes"), src.manifest.metadata, cfg.source)
    check_split_classes(prof, num_classes, cfg.source)
    return num_classes


def _transfer(cfg: DataConfig, src: Source, prof: Profile, endpoint: str | None) -> tuple[Source, Profile]:
    """The transfer set (``data.transfer``, unlabeled, joins train) and its profile; its
    input shape must be the labeled set's."""
    assert cfg.transfer is not None
    t = build_manifest(cfg.transfer, "auto", endpoint)
    shape = cfg.args.get("shape")
    tcols = Columns(cfg.x_column, cfg.y_column, None, tuple(shape) if shape is not None else None,
                    src.cols.image_size, text=src.cols.text)
    tsrc = Source(t, tcols, "train", unlabeled=True, salt="transfer:", fs=_fs(cfg.transfer, endpoint))
    tprof = profile(tsrc)
    if tprof.input_shape != prof.input_shape:
        raise InputError(f"data.transfer {cfg.transfer}: input shape {tprof.input_shape} "
                         f"differs from the labeled set's {prof.input_shape}")
    return tsrc, tprof


def class_names(cfg: DataConfig, folders: list[str], num_classes: int) -> list[str]:
    """``data.class_names``, else an image folder's class directories (when there is one
    per class), else none. ``data.class_names`` of another length than the data's class
    count is an `InputError` naming the field."""
    if cfg.class_names:
        if len(cfg.class_names) != num_classes:
            raise InputError(f"data.class_names: {len(cfg.class_names)} names for "
                             f"{num_classes} classes")
        return list(cfg.class_names)
    return list(folders) if len(folders) == num_classes else []


def to_ray(split: StreamSplit) -> Any:
    """The split's lazy Ray Dataset (columns ``x``, ``y``, ``idx``)."""
    return split.dataset()
