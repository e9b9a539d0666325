"""The `tune:`, `retrain:` and `registry:` sections of an experiment, and `Strict`, the base of every
section (unknown keys are errors). Split from config.py to keep each module small;
`kd.config` re-exports every name here."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kd.names import SEED_MAX


class Strict(BaseModel):
    """Base for every section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class TuneSchedulerConfig(Strict):
    """Trial scheduler: ASHA stops weak trials at rungs ``grace_period * rf^k`` epochs."""

    name: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)


class TuneSearchConfig(Strict):
    """Search algorithm: random sampling or Optuna's TPE."""

    name: Literal["random", "optuna"] = "random"


class TuneConstraints(Strict):
    """Limits the chosen trial must meet; a missing limit is not checked."""

    max_params: int | None = Field(None, ge=1)
    max_latency_ms: float | None = Field(None, gt=0)
    min_teacher_agreement: float | None = Field(None, ge=0, le=1)


class TuneResources(Strict):
    """What one trial gets: Ray Train workers (None = ``scaling.num_workers``) and
    CPUs / GPUs per worker (a 0-worker trial runs the loop in the trial process)."""

    workers: int | None = Field(None, ge=0)
    cpus_per_worker: float = Field(1.0, ge=0)
    gpus_per_worker: float = Field(0.0, ge=0)


class TuneConfig(Strict):
    """`kd tune`: the search space by dotted config path (``loguniform(a, b)``,
    ``uniform(a, b)``, ``randint(a, b)``, ``choice([...])``), budget, scheduler,
    search algorithm, concurrency, retries, per-trial resources, constraints."""

    metric: str = "val/accuracy"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(8, ge=1)
    max_concurrent_trials: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    scheduler: TuneSchedulerConfig = Field(default_factory=TuneSchedulerConfig)
    search: TuneSearchConfig = Field(default_factory=TuneSearchConfig)
    space: dict[str, str] = Field(default_factory=dict)
    constraints: TuneConstraints = Field(default_factory=TuneConstraints)
    resources: TuneResources = Field(default_factory=TuneResources)


class SnapshotChecks(Strict):
    """Limits a new data snapshot must meet before `kd retrain` trains on it; a missing
    limit is not checked. "Previous" is the snapshot the current champion was trained on."""

    min_samples: int | None = Field(None, ge=1)
    max_sample_change: float | None = Field(0.5, ge=0, description="largest relative change "
                                            "of the sample count against the previous snapshot")
    max_class_share_change: float | None = Field(0.1, ge=0, le=1, description="largest "
                                                 "change of any class's share (0..1)")
    min_class_share: float | None = Field(None, ge=0, le=1)


class RetrainConfig(Strict):
    """`kd retrain`: which optional stages run, the final distillation's own epochs and
    workers, snapshot limits, the drift floor and what to do when another pipeline runs."""

    teacher: bool = Field(False, description="retrain the teacher on the snapshot first")
    teacher_epochs: int | None = Field(None, ge=1)
    tune: bool = Field(False, description="run the tune: sweep and distil with its choice")
    epochs: int | None = Field(None, ge=1, description="final distillation epochs "
                               "(default trainer.epochs)")
    workers: int | None = Field(None, ge=0, description="final distillation Ray Train "
                                "workers (default scaling.num_workers)")
    checks: SnapshotChecks = Field(default_factory=SnapshotChecks)
    drift_floor: float | None = Field(None, ge=0, le=1, description="report drift when the "
                                      "champion's accuracy on the new holdout is below this")
    on_busy: Literal["wait", "exit"] = "exit"
    wait_s: float = Field(3600.0, ge=0)
    lock_ttl_s: float = Field(120.0, ge=5, description="a lock whose heartbeat is older is "
                              "stale (its holder died)")


class GateConfig(Strict):
    """Promotion gate thresholds; a missing threshold is not checked. A gate names at
    least one threshold, or says ``allow_any: true`` (promote whatever is registered)."""

    min_accuracy: float | None = None
    max_accuracy_drop: float | None = None
    min_teacher_agreement: float | None = None
    max_params: int | None = None
    max_latency_ms: float | None = None
    min_cosine: float | None = Field(None, ge=-1, le=1, description="task embed: mean holdout "
                                     "cosine between student and teacher embeddings")
    min_recall_at_10: float | None = Field(None, ge=0, le=1, description="task embed: "
                                           "holdout retrieval recall@10 (data.text.retrieval)")
    max_cosine_drop: float | None = Field(None, ge=0, le=2, description="task embed: "
                                          "challenger cosine >= champion cosine - value, both "
                                          "scored on the config's holdout")
    allow_any: bool = False

    def criteria(self) -> list[str]:
        """The names of the thresholds that are set."""
        return [k for k in GATE_CRITERIA if getattr(self, k) is not None]

    def task_problem(self, task: str) -> str | None:
        """One line naming the first set criterion that does not apply to ``task`` (a
        classifier's accuracy gate on an embedding model, or an embedding criterion on a
        classifier), else None. See `TASK_CRITERIA`."""
        for other, names in TASK_CRITERIA.items():
            bad = [k for k in names if other != task and getattr(self, k) is not None]
            if bad:
                fits = ", ".join(TASK_CRITERIA.get(task, ())) or "none"
                return (f"registry.gate.{bad[0]}: applies to task {other} models, but this model's "
                        f"task is {task}; its gate criteria are {fits}, max_params, max_latency_ms")
        return None

    @model_validator(mode="after")
    def _not_both(self) -> GateConfig:
        if self.allow_any and self.criteria():
            raise ValueError(f"allow_any: true contradicts the thresholds set "
                             f"({', '.join(self.criteria())}); keep one or the other")
        return self


GATE_CRITERIA = ("min_accuracy", "max_accuracy_drop", "min_teacher_agreement", "max_params",
                 "max_latency_ms", "min_cosine", "min_recall_at_10", "max_cosine_drop")
TASK_CRITERIA = {"classify": ("min_accuracy", "max_accuracy_drop", "min_teacher_agreement"),
                 "embed": ("min_cosine", "min_recall_at_10", "max_cosine_drop")}  # the rest: every task
EMPTY_GATE = ("registry.gate names no criterion: set at least one of "
              + ", ".join(GATE_CRITERIA) + ", or registry.gate.allow_any: true to promote "
              "any model")


class RegistryConfig(Strict):
    """Model registry name and the promotion gate (required once ``model_name`` is set:
    a registered model is gated)."""

    model_name: str | None = None
    gate: GateConfig = Field(default_factory=GateConfig)

    @model_validator(mode="after")
    def _gated(self) -> RegistryConfig:
        if self.model_name and not (self.gate.allow_any or self.gate.criteria()):
            raise ValueError(EMPTY_GATE)
        return self
