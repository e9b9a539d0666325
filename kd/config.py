"""One experiment as pydantic models: YAML in, dotted overrides, resolved config out.

Every section forbids unknown keys, so a typo (``trainer.epoch``) is an error that
names the field path. `load_experiment` is the one way in; its errors are
`InputError` lines of the form ``FILE: field.path: what was expected``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kd.data_config import DataConfig, SplitConfig, TextConfig  # noqa: F401  (re-exported)
from kd.dotted import label, plain_data_problem, set_in
from kd.errors import InputError
from kd.names import NAME_MAX, SEED_MAX, check_name, name_problem  # noqa: F401  (re-exported)
from kd.sections import (  # noqa: F401  (re-exported: kd.config is where sections are looked up)
    EMPTY_GATE,
    GATE_CRITERIA,
    GateConfig,
    RegistryConfig,
    RetrainConfig,
    SnapshotChecks,
    Strict,
    TuneConfig,
    TuneConstraints,
    TuneResources,
    TuneSchedulerConfig,
    TuneSearchConfig,
)


class ModelSpec(Strict):
    """A model by registry name or ``package.module:Class``, its args, width and weights."""

    model: str
    args: dict[str, Any] = Field(default_factory=dict)
    width: float = Field(1.0, gt=0)
    weights: str | None = None


class TeacherConfig(ModelSpec):
    """The primary teacher; ``teachers`` adds more for multi-teacher KD."""

    cache: bool = False
    cache_top_k: int | None = Field(None, ge=1, description="cache only the k largest "
                                    "logits per sample (large output spaces)")
    teachers: list[ModelSpec] = Field(default_factory=list)
    shard: bool = Field(False, description="with scaling.strategy fsdp: shard the frozen "
                        "teacher(s) across workers instead of replicating them")

    def all(self) -> list[ModelSpec]:
        """The primary teacher first, then the extra ones."""
        return [self, *self.teachers]


class StudentConfig(ModelSpec):
    """The student; ``init`` picks random init or pruning the teacher; ``freeze`` keeps
    parts of it as built (e.g. embeddings copied from the teacher)."""

    init: Literal["random", "teacher_pruned", "teacher_layers", "model2vec"] = "random"
    init_layers: list[int] | None = Field(None, description="init: teacher_layers: the "
                                          "teacher's layer index copied into each student "
                                          "layer; default evenly spaced")
    freeze: list[str] = Field(default_factory=list, description="module or parameter paths "
                              "(e.g. bert.embeddings.word_embeddings) kept as built or "
                              "initialised: no gradient, not in the optimizer")

    @model_validator(mode="after")
    def _init_or_weights(self) -> StudentConfig:
        if self.weights and self.init != "random":  # an init runs after the weights load
            raise ValueError(f"init: {self.init} would overwrite weights: {self.weights}; pick one "
                             "(init: random continues from the weights)")
        return self


class LossTerm(BaseModel):
    """One loss term: ``name``, ``weight`` and the loss's own parameters."""

    model_config = ConfigDict(extra="allow")
    name: str
    weight: float = Field(1.0, ge=0)


class DistillConfig(Strict):
    """The recipe: temperature, hard-label CE weight and the weighted loss terms."""

    temperature: float = Field(4.0, gt=0)
    ce_weight: float = Field(1.0, ge=0)
    losses: list[LossTerm] = Field(default_factory=list)
    min_teacher_confidence: float | None = Field(None, ge=0, le=1)


class ScheduleConfig(Strict):
    """LR schedule: cosine (with linear warm-up), step, or none; set once an epoch
    (``per: epoch``) or before every optimizer update (``per: step``, where the warm-up
    is ``warmup_epochs`` epochs plus ``warmup_steps`` steps and the cosine decays smoothly
    to 0 over the run's steps)."""

    name: Literal["cosine", "step", "none"] = "cosine"
    per: Literal["epoch", "step"] = "epoch"
    warmup_epochs: int = Field(0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    step_size: int = Field(30, ge=1)
    gamma: float = Field(0.1, gt=0)

    @model_validator(mode="after")
    def _steps_need_per_step(self) -> ScheduleConfig:
        if self.warmup_steps and self.per != "step":
            raise ValueError("warmup_steps: counts training steps (batches), so it needs per: step "
                             "(or use warmup_epochs)")
        return self


class OptimConfig(Strict):
    """Optimizer and its schedule."""

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)


class TrainerConfig(Strict):
    """Epochs, global batch size, precision, accumulation, clipping, retries."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_accum: int = Field(1, ge=1)
    grad_clip: float | None = Field(None, gt=0)
    max_failures: int = Field(0, ge=0)


class CheckpointConfig(Strict):
    """How often to checkpoint and how many checkpoints to keep."""

    every_epochs: int = Field(1, ge=1)
    keep: int = Field(2, ge=1)


class ScalingConfig(Strict):
    """Ray Train workers: 0 runs the loop in the driver process."""

    num_workers: int = Field(1, ge=0)
    use_gpu: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"
    resources_per_worker: dict[str, float] = Field(default_factory=dict)


class TrackingConfig(Strict):
    """MLflow: tracking URI (default: sqlite file in the working directory), experiment."""

    uri: str | None = None
    experiment: str = "kdflow"
    run_name: str | None = None


class StorageConfig(Strict):
    """Where checkpoints, caches and results go: a local path or an s3:// URI."""

    path: str = "./kdflow-runs"
    endpoint_url: str | None = None
    sse: Literal["AES256", "aws:kms"] | None = Field(
        None, description="S3 server-side encryption passed on every write (docs/config.md)")
    sse_kms_key_id: str | None = Field(None, min_length=1,
                                       description="the KMS key id or ARN for sse: aws:kms")

    @model_validator(mode="after")
    def _kms_needs_key(self) -> StorageConfig:
        if self.sse == "aws:kms" and not self.sse_kms_key_id:
            raise ValueError("sse_kms_key_id: required when sse is aws:kms (the KMS key id or ARN)")
        if self.sse_kms_key_id and self.sse != "aws:kms":
            raise ValueError("sse_kms_key_id is only used with sse: aws:kms")
        return self


TOKEN_TERMS = ("hidden_mse", "attention_kl")  # text losses on per-token teacher outputs


class Experiment(Strict):
    """One kdflow experiment, the single source of truth for a run."""

    name: str
    task: Literal["classify", "embed"] = Field("classify", description="classify: logits "
                                               "over classes; embed: the models output "
                                               "sentence embeddings (docs/text.md)")
    seed: int = Field(0, ge=0, le=SEED_MAX)
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig | None = None
    student: StudentConfig | None = None
    distill: DistillConfig = Field(default_factory=DistillConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    retrain: RetrainConfig | None = None

    @model_validator(mode="after")
    def _cache_needs_fixed_inputs(self) -> Experiment:
        if self.teacher is None or not self.teacher.cache:
            return self
        random = list(self.data.transforms)  # every kdflow transform is a random augmentation
        if random:
            raise ValueError(
                f"teacher.cache: true cannot be combined with the random augmentation "
                f"data.transforms {random}: cached teacher outputs belong to one fixed view "
                "of each input, an augmented input needs a fresh teacher forward; set "
                "teacher.cache: false (the online teacher) or drop the random transforms")
        if self.teacher.teachers:
            raise ValueError("teacher.cache: true caches the primary teacher only; with "
                             "teacher.teachers set, use teacher.cache: false (online teachers)")
        return self

    @model_validator(mode="after")
    def _embed_needs_text(self) -> Experiment:
        problem = self.registry.gate.task_problem(self.task)
        if problem:
            raise ValueError(problem)
        if self.task != "embed":
            return self
        if self.data.text is None:
            raise ValueError("task: embed reads text: set data.text (at least {} for the "
                             "defaults: column text, the teacher's tokenizer)")
        if self.teacher is not None and self.teacher.cache_top_k:
            raise ValueError("teacher.cache_top_k: embeddings are cached whole; drop it for "
                             "task: embed")
        if self.distill.min_teacher_confidence is not None:
            raise ValueError("distill.min_teacher_confidence: a teacher embedding has no class "
                             "confidence; drop it for task: embed")
        token_terms = [t.name for t in self.distill.losses if t.name in TOKEN_TERMS]
        if self.teacher is not None and self.teacher.cache and token_terms:
            raise ValueError(f"teacher.cache: true stores sentence embeddings only; the per-token "
                             f"terms {token_terms} need the online teacher (teacher.cache: false)")
        if "metric" not in self.tune.model_fields_set:  # embeddings have no accuracy
            self.tune.metric = "val/cosine"
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        problem = name_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    def hash(self) -> str:
        """sha256 (16 hex) of the canonical JSON of this config: the config's lineage id."""
        doc = self.model_dump(mode="json")
        if doc.get("retrain") is None:  # configs without a retrain: section keep their hash
            doc.pop("retrain", None)
        for k in ("sse", "sse_kms_key_id"):  # configs without encryption keep their hash
            if doc.get("storage", {}).get(k) is None:
                doc.get("storage", {}).pop(k, None)
        if doc.get("data", {}).get("class_names") is None:  # configs without names keep their hash
            doc.get("data", {}).pop("class_names", None)
        for section, key, default in (("", "task", "classify"), ("data", "text", None),
                                      ("student", "init_layers", None)):
            holder = doc if not section else (doc.get(section) or {})
            if key in holder and holder[key] == default:  # older configs keep their hash
                holder.pop(key)
        blob = json.dumps(doc, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_yaml(self) -> str:
        """The resolved config as YAML, loadable again by `load_experiment`."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``doc`` with each ``dotted.path=value`` applied (value parsed as YAML)."""
    out = copy.deepcopy(doc)
    for item in overrides:
        if "=" not in item:
            raise InputError(f"override {item!r}: expected dotted.path=value")
        key, _, raw = item.partition("=")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        set_in(out, key.strip(), value, f"override {key.strip()}")
    return out


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line: ``SOURCE: field.path: message`` for each problem, joined by '; '."""
    items = []
    for e in err.errors():
        loc = label(list(e["loc"]))
        msg = " ".join(e["msg"].split())  # one line, whatever the input held
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "missing":
            msg = "required field is missing"
        items.append(f"{loc}: {msg}")
    return f"{source}: " + "; ".join(items)


def experiment_from_dict(doc: dict[str, Any], source: str = "config") -> Experiment:
    """Validate a plain dict; errors become one `InputError` line naming the fields
    (a value that is not plain data, `kd.dotted.plain_data_problem`, included)."""
    found = plain_data_problem(doc)
    if found:
        raise InputError(f"{source}: {found[0]}: {found[1]}")
    try:
        return Experiment.model_validate(doc)
    except ValidationError as e:
        raise InputError(format_validation_error(e, source)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML mapping. Every way a file can fail to be one (missing, a directory,
    unreadable, not UTF-8 text, bad YAML, empty, not a mapping at the top) is one
    `InputError` line naming the file."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{path}: is a directory, not a config file")
    if not p.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not a UTF-8 text file (byte {e.start}: {e.reason}); "
                         "a config is a YAML text file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise InputError(f"{path}:{where} invalid YAML ({problem})") from None
    except RecursionError:
        raise InputError(f"{path}: invalid YAML (nested too deeply)") from None
    if doc is None:
        raise InputError(f"{path}: the file is empty; expected a mapping of sections")
    if not isinstance(doc, dict):
        raise InputError(f"{path}: expected a mapping of sections at the top level, "
                         f"got a {type(doc).__name__}")
    return doc


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> Experiment:
    """Read ``path``, apply dotted overrides, validate and resolve local paths."""
    doc = apply_overrides(read_yaml(path), overrides or [])
    return resolve_paths(experiment_from_dict(doc, str(path)))


def _is_uri(value: str) -> bool:
    return "://" in value or value.startswith(("runs:/", "models:/"))


def _abs(value: str | None, field: str = "path") -> str | None:
    if value is None or _is_uri(value):
        return value
    try:
        p = Path(value).expanduser()
    except RuntimeError:  # "~name" of a user this machine does not have
        raise InputError(f"{field}: {value!r} starts with ~{value[1:].split('/')[0]}, a user "
                         "this machine does not know; write the path out") from None
    if p.is_absolute() or not (value.startswith((".", "~")) or "/" in value or p.exists()):
        return value
    return str(p.resolve())


def resolve_paths(exp: Experiment) -> Experiment:
    """Make relative local paths absolute, so Ray workers (whose working directory
    differs from the driver's) find the same files."""
    exp = exp.model_copy(deep=True)
    exp.data.source = _abs(exp.data.source, "data.source") or exp.data.source
    exp.data.transfer = _abs(exp.data.transfer, "data.transfer")
    text = exp.data.text
    if text is not None:
        teacher_path = exp.teacher.args.get("path") if exp.teacher is not None else None
        if text.tokenizer is None and isinstance(teacher_path, str):
            text.tokenizer = teacher_path  # a pretrained teacher's own
        text.tokenizer = _abs(text.tokenizer, "data.text.tokenizer")
        text.retrieval = _abs(text.retrieval, "data.text.retrieval")
    exp.storage.path = _abs(exp.storage.path if "/" in exp.storage.path
                            else "./" + exp.storage.path, "storage.path") or exp.storage.path
    specs = [*(exp.teacher.all() if exp.teacher is not None else []),
             *([exp.student] if exp.student is not None else [])]
    for spec in specs:
        spec.weights = _abs(spec.weights, "weights")
        for key in ("path", "tokenizer"):  # text models' directories (kd.models.tokens)
            if isinstance(spec.args.get(key), str):
                spec.args[key] = _abs(spec.args[key], f"args.{key}")
    return exp
