"""`kd tune`: Ray Tune over the one training loop, with MLflow parent/child runs.

The Ray Train V2 pattern: `Tuner` runs the function trainable `trial`, which
applies the trial's sampled values (dotted config paths, `kd.tune.space`) to the
base config and calls `kd.train.run.train_run` - the same TorchTrainer as
`kd distill` - as a child MLflow run of the sweep's parent run. Per-epoch metrics
reach Tune through `ray.tune.integration.ray_train.TuneReportCallback` (Ray Train
workers) or, for ``num_workers: 0`` trials, straight from the loop, so ASHA
(``time_attr = epoch``) can stop a weak trial after any epoch.

The teacher pays once: with ``teacher.cache`` the driver builds the
teacher-output cache before the first trial and every trial reads it. The
driver owns the parent run: it ends pruned / interrupted children as KILLED,
records failed trials as FAILED children with their error, logs the best
trial's params and metrics, ``trials.csv`` and plots, and picks the best trial
meeting ``tune.constraints`` (`kd.tune.report.choose`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd import sse, storage, tracking
from kd.config import Experiment, experiment_from_dict
from kd.data import DATA_TASK_CPUS_ENV
from kd.errors import InputError
from kd.tune.report import NoEligibleTrial, choose, ineligible_reason, rank, table
from kd.tune.runs import clear_tag, collect, finish_children, finished_trial, log_parent, mark_interrupted
from kd.tune.space import Dist, parse_space, probe_students, trial_doc

STATE_SUFFIX = ".latest.json"
TRIAL_CPU = 0.01


@dataclass
class SweepOutcome:
    """A finished sweep: parent run, all trial rows, the chosen one (None if no trial
    met the constraints) and the closest ones in that case."""

    parent_run_id: str
    path: str
    rows: list[dict[str, Any]]
    chosen: dict[str, Any] | None
    closest: list[dict[str, Any]] = field(default_factory=list)
    teacher_mode: str = ""


def trial_resources(exp: Experiment) -> tuple[int, dict[str, float], float]:
    """(workers per trial, the trial function's resources, CPUs one trial takes).

    A trial has at least one Ray Train worker: Train's local mode (``num_workers: 0``)
    refuses to run inside a Tune trial (its report / context calls raise there).

    The trial function itself reserves almost no CPU (`TRIAL_CPU`; Ray refuses 0):
    Ray Data tasks that feed the loop need free CPUs (a trial holding them would
    deadlock its own data), Ray Train workers reserve theirs, and
    ``max_concurrent_trials`` bounds how many trials run."""
    r = exp.tune.resources
    workers = max(1, exp.scaling.num_workers if r.workers is None else r.workers)
    return workers, {"cpu": TRIAL_CPU}, r.cpus_per_worker * workers


def trial(config: dict[str, Any], base: dict[str, Any], parent_run_id: str, sweep: str) -> None:
    """The function trainable: one trial = one `train_run` (child MLflow run)."""
    from ray import tune

    from kd.registry.store import install_resolver
    from kd.train.run import train_run

    install_resolver()  # a trial runs in its own process: models:/ teachers read verified
    # Ray Data tasks of this trial reserve no CPU: the trials' Train workers hold them
    # (kd.data.data_task_cpus says why); set before any dataset is built
    os.environ[DATA_TASK_CPUS_ENV] = "0"

    trial_id = tune.get_context().get_trial_id()
    exp = experiment_from_dict(trial_doc(base, config, trial_id), f"trial {trial_id}")
    from ray.tune.integration.ray_train import TuneReportCallback

    name = f"{sweep}-{trial_id}"
    done = finished_trial(exp, name)
    if done is not None:  # a resumed sweep: this trial had ended before the interrupt
        print(f"[kd] trial {trial_id}: its run {name} already finished; not run again",
              flush=True)
        tune.report(done)
        return
    train_run(exp, "student", run_name=name, parent_run_id=parent_run_id,
              extra_tags={"kd.trial_id": trial_id, "kd.sweep": sweep},
              callbacks=[TuneReportCallback()])


def _base_doc(exp: Experiment, uri: str) -> dict[str, Any]:
    doc = exp.model_dump(mode="json")
    workers, _, _ = trial_resources(exp)
    r = exp.tune.resources
    doc["scaling"]["num_workers"] = workers
    doc["scaling"]["resources_per_worker"] = {"CPU": r.cpus_per_worker,
                                              **({"GPU": r.gpus_per_worker}
                                                 if r.gpus_per_worker else {})}
    doc["scaling"]["use_gpu"] = doc["scaling"]["use_gpu"] or r.gpus_per_worker > 0
    doc["tracking"]["uri"] = uri  # trials run in other folders: pin the store
    return doc


def check_capacity(exp: Experiment) -> str | None:
    """A warning (with the numbers) when ``max_concurrent_trials`` cannot all be placed."""
    import ray

    _, _, per_trial = trial_resources(exp)
    have = float(ray.cluster_resources().get("CPU", 0))
    want = exp.tune.max_concurrent_trials * per_trial
    if per_trial > 0 and want > have:
        fit = int(have // per_trial)
        return (f"tune.max_concurrent_trials={exp.tune.max_concurrent_trials} x {per_trial:g} "
                f"CPU per trial = {want:g} CPUs, but the cluster has {have:g}: at most {fit} "
                "trial(s) will run at a time")
    return None


def teacher_mode(exp: Experiment, splits: Any) -> tuple[str, dict[str, str]]:
    """Build the cache once (``teacher.cache``) or say why every trial runs the teacher."""
    if exp.teacher is None or not exp.distill.losses:
        return "none", {"kd.teacher_mode": "none"}
    if exp.teacher.cache:
        from kd.train.cache import ensure_cache

        cache = ensure_cache(exp, splits)
        print(f"[kd] sweep: teacher outputs cached once at {cache.uri} "
              f"({'computed now' if cache.computed else 'reused'}); every trial reads them",
              flush=True)
        return "cache", {"kd.teacher_mode": "cache", "kd.teacher_cache": cache.uri,
                         "kd.teacher_cache.key": cache.key,
                         "kd.teacher_cache.computed": str(cache.computed).lower()}
    random = list(exp.data.transforms)  # every kdflow transform is a random augmentation
    reason = (f"random augmentation {random} needs a fresh teacher forward per view" if random
              else "teacher.cache is false")
    print(f"[kd] sweep: online teacher, a teacher forward in every trial step ({reason})",
          flush=True)
    return "online", {"kd.teacher_mode": "online", "kd.teacher_online_reason": reason}


def _tune_storage(exp: Experiment, uri: str) -> tuple[Any, str]:
    """(filesystem, path) for Tune's own state under ``uri``: with ``storage.sse`` on
    S3, kdflow's encrypting filesystem (`kd.sse`) so tuner.pkl and the trial state are
    encrypted like every other write; otherwise (None, ``uri``) and Tune builds its own."""
    from kd import sse

    args = sse.of(exp.storage)
    if not (args and storage.is_s3(uri)):
        return None, uri
    return storage.arrow_fs(uri, exp.storage.endpoint_url, args)


def _tuner(exp: Experiment, space: dict[str, Dist], base: dict[str, Any], parent: str,
           sweep: str, root: str, restore: str | None) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from kd.tune.live import LiveTable  # imports ray.tune: only when a sweep runs
    from kd.tune.orphans import ReapOrphans

    t = exp.tune
    _, own, _ = trial_resources(exp)
    trainable = tune.with_resources(
        tune.with_parameters(trial, base=base, parent_run_id=parent, sweep=sweep), own)
    fs, where = _tune_storage(exp, root)
    if restore:
        _, at = _tune_storage(exp, restore)
        return tune.Tuner.restore(at, trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False,
                                  storage_filesystem=fs)
    if t.scheduler.name == "asha":
        # max_t one past the last epoch: ASHA stops a trial that reaches max_t, which
        # would kill a finishing trial before it saves its weights and holdout metrics
        scheduler: Any = ASHAScheduler(time_attr="epoch", max_t=exp.trainer.epochs + 1,
                                       grace_period=min(t.scheduler.grace_period,
                                                        exp.trainer.epochs),
                                       reduction_factor=t.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    if t.search.name == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search: Any = OptunaSearch(seed=t.seed)
    else:
        search = BasicVariantGenerator(random_state=t.seed,
                                       max_concurrent=t.max_concurrent_trials)
    return tune.Tuner(
        trainable,
        param_space={p: d.to_tune() for p, d in space.items()},
        tune_config=tune.TuneConfig(metric=t.metric, mode=t.mode, num_samples=t.num_samples,
                                    max_concurrent_trials=t.max_concurrent_trials,
                                    scheduler=scheduler, search_alg=search),
        run_config=tune.RunConfig(name=sweep, storage_path=where, storage_filesystem=fs,
                                  verbose=0,
                                  callbacks=[LiveTable(list(space), t.metric, t.mode), ReapOrphans()],
                                  failure_config=tune.FailureConfig(max_failures=t.max_failures)),
    )


def _state_uri(exp: Experiment) -> str:
    return storage.join(exp.storage.path, "tune", exp.name + STATE_SUFFIX)


def _save_state(exp: Experiment, state: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "state.json"
        p.write_text(json.dumps(state))
        storage.put(p, _state_uri(exp), exp.storage.endpoint_url, sse.of(exp.storage))


def _load_state(exp: Experiment) -> dict[str, Any]:
    uri = _state_uri(exp)
    try:
        return json.loads(storage.fetch(uri, exp.storage.endpoint_url).read_text())
    except InputError:
        raise InputError(f"kd tune --resume: no sweep of {exp.name!r} to resume ({uri} "
                         "not found); run `kd tune CONFIG` first") from None


def owner_sweep(exp: Experiment) -> tuple[str | None, bool]:
    """Under a KubeRay RayJob: (the sweep name ``<RayJob name>-sweep``, whether this
    sweep already started). A RayJob retry (a new RayCluster, same OWNER_NAME) then
    resumes the sweep instead of starting a new one. Outside a RayJob: (None, False)."""
    from kd.runtime import run_name_from_env

    name = run_name_from_env("sweep")
    if name is None:
        return None, False
    try:
        return name, _load_state(exp).get("sweep") == name
    except InputError:
        return name, False


def run_sweep(exp: Experiment, resume: bool = False, quiet: bool = False) -> SweepOutcome:
    """`kd tune` (see the module docstring); prints the top trials and the choice."""
    from kd.runtime import ensure_ray
    from kd.train.driver import caller_signals, preflight, sample_batch
    from kd.train.text import run_splits

    if exp.student is None:
        raise InputError("student: section is required for `kd tune`")
    space = parse_space(exp)
    splits = run_splits(exp)
    preflight(exp, "student", splits)
    probe_students(exp, space, splits.input_shape, splits.num_classes, sample_batch(splits))
    ensure_ray()
    uri = tracking.tracking_uri(exp)
    root = storage.join(exp.storage.path, "tune")
    owner, started = owner_sweep(exp)
    resume = resume or started
    sweep, parent, base, mode = _start(exp, splits, uri, resume, owner)
    path = storage.join(root, sweep)
    ok = interrupted = False
    try:
        tuner = _tuner(exp, space, base, parent, sweep, root, path if resume else None)
        with caller_signals():  # Tune leaves its SIGINT and SIGUSR1 handlers installed
            results = tuner.fit()  # Ctrl-C: Tune saves its state and returns early
        rows = collect(results, exp, space, base, splits)
        finish_children(uri, exp, parent, rows, base, sweep)
        ended = sum(r["status"] != "INTERRUPTED" for r in rows)
        if ended < exp.tune.num_samples:
            interrupted = True
            mark_interrupted(uri, parent, exp, sweep, ended)
        chosen, closest = choose(rows, exp.tune.constraints, exp.tune.mode)
        log_parent(uri, parent, exp, rows, chosen)
        if resume:
            clear_tag(uri, parent, "kd.stopped")
        why = ineligible_reason(rows)  # every trial failed, was pruned or wrote no weights
        ok = why is None
    finally:
        if not interrupted:
            tracking.end_run(uri, parent, ok)
    outcome = SweepOutcome(parent, path, rows, chosen, closest, mode)
    if not quiet:
        _print_summary(exp, list(space), outcome, uri)
    if why:
        raise NoEligibleTrial(f"sweep {sweep}: {why}")
    return outcome


def _start(exp: Experiment, splits: Any, uri: str, resume: bool,
           owner: str | None = None) -> tuple[str, str, dict[str, Any], str]:
    """(sweep name, parent run id, base config doc, teacher mode) of a new sweep (named
    ``owner`` when given), or of the latest one of this config when ``resume``."""
    warning = check_capacity(exp)
    if warning:
        print(f"[kd] warning: {warning}", flush=True)
    if resume:
        state = _load_state(exp)
        sweep, parent, base = state["sweep"], state["parent_run_id"], state["base"]
        mode = state.get("teacher_mode", "")
        print(f"[kd] resuming sweep {sweep} (MLflow parent run {parent})", flush=True)
        if mode == "cache":
            teacher_mode(exp, splits)  # recomputes if the teacher or data changed meanwhile
        return sweep, parent, base, mode
    mode, tags = teacher_mode(exp, splits)
    sweep = owner or f"{exp.name}-sweep-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    base = _base_doc(exp, uri)
    parent = tracking.start_run(exp, "sweep", {**tags, "kd.sweep": sweep, "kd.data_hash": splits.data_hash})
    if warning:
        tracking.set_tags(uri, parent, {"kd.warning": warning})
    _save_state(exp, {"sweep": sweep, "parent_run_id": parent, "base": base, "teacher_mode": mode})
    print(f"[kd] sweep {sweep}: {exp.tune.num_samples} trials, "
          f"{exp.tune.max_concurrent_trials} at a time; MLflow parent run {parent} at {uri}", flush=True)
    return sweep, parent, base, mode


def _print_summary(exp: Experiment, paths: list[str], o: SweepOutcome, uri: str) -> None:
    """The top trials, the chosen one (or the closest), failed trials, the parent run."""
    print("\ntop trials by " + exp.tune.metric)
    print(table(rank(o.rows, exp.tune.mode), paths))
    chosen = o.chosen
    if chosen is not None:
        print(f"\nchosen: trial {chosen['trial_id']}  {exp.tune.metric} "
              f"{chosen['metric']:.4f}  params {int(chosen['params'])}  "
              f"latency {chosen['latency_ms']:.3f} ms  "
              + "  ".join(f"{p}={chosen[p]}" for p in paths))
    elif ineligible_reason(o.rows):
        print(f"\n{ineligible_reason(o.rows)}")
    else:
        cons = exp.tune.constraints.model_dump(exclude_none=True)
        print(f"\nno trial meets tune.constraints {cons}; the closest:")
        print(table(o.closest, paths))
    for r in o.rows:
        if r["status"] == "ERROR":
            print(f"[kd] trial {r['trial_id']} failed: {r['error'].splitlines()[0][:200]}")
    print(f"MLflow parent run {o.parent_run_id} at {uri}")
