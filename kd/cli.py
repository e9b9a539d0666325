"""`kd`: parse arguments, load the config, call pipeline functions, map errors to exit codes.

Exit codes: 0 success, 1 a run failed, 2 bad input (config, data, arguments),
3 a gate said no. Errors are printed as one line on stderr (``KD_DEBUG=1`` shows
the traceback of a failed run).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from kd.errors import GateRejected, InputError, one_line
from kd.redact import redact, redacted_output

PRECISIONS = ("fp32", "bf16")  # = kd.registry.loader.PRECISIONS (not imported: it imports torch)

EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_GATE = 0, 1, 2, 3


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.epochs=3")


def _load(args: argparse.Namespace):  # noqa: ANN202
    from kd.config import load_experiment

    return load_experiment(args.config, args.overrides)


def cmd_teacher(args: argparse.Namespace) -> int:
    """Train a teacher with CE only (same loop), save its weights."""
    from kd.train.run import train_run

    train_run(_load(args), "teacher", run_name=args.run_name)
    return EXIT_OK


def cmd_distill(args: argparse.Namespace) -> int:
    """Distil the configured teacher(s) into the student."""
    from kd.train.run import train_run

    if args.from_run:
        from kd.tracking import config_from_run

        args.config = str(config_from_run(args.from_run))
    exp = _load(args)
    if args.register and not exp.registry.model_name:
        raise InputError("registry.model_name: required by --register (set it in the config "
                         "or as an override registry.model_name=NAME)")
    outcome = train_run(exp, "student", run_name=args.run_name)
    if args.register:
        from kd.registry.register import register_outcome
        from kd.storage import join

        register_outcome(outcome.run_id, outcome.weights, outcome.weights_sha256, exp,
                         join(exp.storage.path, exp.name))
    return EXIT_OK


def cmd_register(args: argparse.Namespace) -> int:
    """Register a finished run's student (alias challenger)."""
    from kd.registry.register import register_run

    exp = _load(args) if args.config else None
    register_run(args.run_id, args.name, exp)
    return EXIT_OK


def cmd_promote(args: argparse.Namespace) -> int:
    """Gate challenger vs champion and promote, or roll champion back."""
    from kd.registry import promote

    if args.rollback:
        promote.rollback(args.name)
        return EXIT_OK
    exp = _load(args) if args.config else None
    promote.promote(args.name, exp, args.version)
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict class probabilities of a registered model: one local file in-process,
    or many files / s3:// as a Ray Data job (kd.registry.batch)."""
    from kd.registry.batch import is_batch, predict_batch
    from kd.registry.predict import predict_file

    if not is_batch(args.input, args.output):
        if (args.key or args.concurrency != 1 or args.gpus_per_worker or args.overwrite
                or args.text_column != "text"):
            raise InputError("--key, --concurrency, --gpus-per-worker, --overwrite, "
                             "--text-column: batch predict only "
                             "(give --output a folder or s3:// prefix)")
        predict_file(args.model, args.input[0], args.output, args.precision)
    elif args.output is None:
        raise InputError("--output: required for batch predict (a folder or s3:// prefix)")
    else:
        predict_batch(args.model, args.input, args.output, args.batch_size, args.concurrency,
                      args.gpus_per_worker, args.key, overwrite=args.overwrite,
                      text_column=args.text_column, precision=args.precision)
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a weights file / URI on the holdout split."""
    from kd.config import load_experiment
    from kd.train.run import evaluate_weights

    exp = load_experiment(args.config, args.overrides) if args.config else None
    metrics = evaluate_weights(exp, args.weights)
    for k, v in metrics.items():
        print(f"{k:20s} {v:.6g}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve models:/NAME@ALIAS over HTTP with Ray Serve, following the alias."""
    from kd.serve.run import serve_forever

    return serve_forever(args.name, args.alias, args.host, args.port, args.poll_interval,
                         args.replicas, args.num_cpus, args.precision)


def cmd_demo(args: argparse.Namespace) -> int:
    """Teacher, scratch student and distilled student on digits, then a table."""
    from kd.demo import demo_configs, run_demo

    run_demo(demo_configs(args.configs), args.overrides)
    return EXIT_OK


def cmd_cache_teacher(args: argparse.Namespace) -> int:
    """Compute (or find) the teacher-output cache for the config."""
    from kd.train.cache import cache_teacher

    cache_teacher(_load(args), force=args.force)
    return EXIT_OK


def cmd_tune(args: argparse.Namespace) -> int:
    """Ray Tune sweep over the config's tune.space; print top trials and the chosen one."""
    from kd.tune.sweep import run_sweep

    outcome = run_sweep(_load(args), resume=args.resume)
    return EXIT_OK if outcome.chosen is not None else EXIT_FAILED


CLUSTER_FLAGS = ("image", "ray_version", "workers", "gpus_per_worker", "gpu_type", "mlflow_uri",
                 "s3_endpoint", "s3_secret", "service_account")


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit a workflow to a Ray cluster (Jobs API) or to Kubernetes (a KubeRay RayJob)."""
    if args.k8s == bool(args.address):
        raise InputError("kd submit: give exactly one of --address URL (Ray Jobs API) or --k8s")
    if args.k8s:
        from kd.deploy.k8s import submit_k8s
        from kd.deploy.render import ClusterOptions

        opts = ClusterOptions(**{k: getattr(args, k) for k in CLUSTER_FLAGS
                                 if getattr(args, k) is not None})
        return submit_k8s(args.config, args.overrides, args.workflow, args.namespace, opts,
                          name=args.name, dry_run=args.dry_run, timeout_s=args.timeout)
    from kd.deploy.submit import submit_ray_job

    return submit_ray_job(args.address, args.workflow, args.config, args.overrides,
                          run_name=args.run_name)


def _submit_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--workflow", default="distill",
                   choices=["teacher", "distill", "tune", "retrain"], help="default distill")
    p.add_argument("--address", help="Ray Jobs API of a running cluster, http://HEAD:8265 "
                   "(token auth: set RAY_AUTH_TOKEN)")
    p.add_argument("--run-name", help="(--address) Ray run name; an existing one resumes")
    p.add_argument("--k8s", action="store_true", help="create a KubeRay RayJob instead")
    p.add_argument("--namespace", default="default", help="(--k8s) namespace")
    p.add_argument("--name", help="(--k8s) RayJob name, at most 47 characters "
                   "(default <experiment>-<workflow>-<UTC time>); a name that ran resumes")
    p.add_argument("--dry-run", action="store_true", help="(--k8s) print the manifests only")
    p.add_argument("--timeout", type=float, help="(--k8s) seconds to follow the RayJob")
    for flag in CLUSTER_FLAGS:
        kind = int if flag in ("workers", "gpus_per_worker") else str
        p.add_argument("--" + flag.replace("_", "-"), type=kind,
                       help="(--k8s) default: helm/kdflow/values.yaml's")


def cmd_retrain(args: argparse.Namespace) -> int:
    """The scheduled pipeline: snapshot -> ... -> promoted champion (docs/retrain.md)."""
    from kd.retrain import run_pipeline

    run_pipeline(_load(args))  # promoted / nothing to do / skipped; else an error below
    return EXIT_OK


RUN_NAME_HELP = "Ray run name; an existing one resumes from its checkpoint"


def _run_commands(sub: argparse._SubParsersAction) -> None:
    """teacher, distill, cache-teacher, tune: a config and overrides each."""
    p = sub.add_parser("teacher", help="train a teacher (CE only) with the kdflow loop")
    _config_args(p)
    p.add_argument("--run-name", help=RUN_NAME_HELP)
    p.set_defaults(fn=cmd_teacher)

    p = sub.add_parser("distill", help="distil the teacher into the student")
    _config_args(p)
    p.add_argument("--run-name", help=RUN_NAME_HELP)
    p.add_argument("--from-run", help="reproduce an MLflow run: take its logged config "
                   "(CONFIG is then ignored; write '-')")
    p.add_argument("--register", action="store_true",
                   help="register the student under registry.model_name (alias challenger)")
    p.set_defaults(fn=cmd_distill)

    p = sub.add_parser("cache-teacher", help="run the teacher once over the train data and "
                       "store its outputs (teacher-output cache)")
    _config_args(p)
    p.add_argument("--force", action="store_true", help="recompute even if a valid cache exists")
    p.set_defaults(fn=cmd_cache_teacher)

    p = sub.add_parser("tune", help="Ray Tune sweep over tune.space (ASHA / Optuna, MLflow "
                       "parent + child runs)")
    _config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the latest interrupted sweep of this config")
    p.set_defaults(fn=cmd_tune)

    p = sub.add_parser("retrain", help="scheduled retraining: validate the data snapshot, "
                       "[teacher], cache, [tune], distil, evaluate, register, gate, promote; "
                       "resumable (docs/retrain.md)")
    _config_args(p)
    p.set_defaults(fn=cmd_retrain)

    p = sub.add_parser("submit", help="run a workflow on a Ray cluster (--address) or as a "
                       "KubeRay RayJob (--k8s); follows it, exits with the job's code")
    _submit_args(p)
    p.set_defaults(fn=cmd_submit)


def _registry_commands(sub: argparse._SubParsersAction) -> None:
    """register, promote, predict, evaluate."""
    p = sub.add_parser("register", help="register a finished run's student (alias challenger)")
    p.add_argument("run_id", help="MLflow run id of a kd distill run")
    p.add_argument("config", nargs="?", help="experiment YAML (default: the run's logged config)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for CONFIG")
    p.add_argument("--name", help="registered model name (default registry.model_name)")
    p.set_defaults(fn=cmd_register)

    p = sub.add_parser("promote", help="gate challenger vs champion; promote or --rollback")
    p.add_argument("name", help="registered model name")
    p.add_argument("config", nargs="?", help="experiment YAML with the gate and holdout data "
                   "(default: the challenger's logged config)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for CONFIG")
    p.add_argument("--version", help="gate this version instead of the challenger alias")
    p.add_argument("--rollback", action="store_true",
                   help="move champion back to the previous champion")
    p.set_defaults(fn=cmd_promote)

    p = sub.add_parser("predict", help="class probabilities of a registered model for a file, "
                       "or for many files / s3:// as a Ray Data job")
    p.add_argument("model", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--input", required=True, nargs="+", help=".npz / .parquet / .csv file "
                   "(an embedding model: .jsonl / .txt / .parquet / .csv of texts), "
                   "or folders / globs / s3:// prefixes (batch)")
    p.add_argument("--output", help=".npz / .csv / .parquet file (an embedding model: .npz / "
                   ".npy / .parquet; default: print); batch: a folder or s3:// prefix for parquet "
                   "(an embedding model: an 'embedding' column)")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per model call (batch)")
    p.add_argument("--concurrency", type=int, default=1, help="predictor actors (batch)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per actor (batch)")
    p.add_argument("--key", help="row-key column written beside the predictions (batch; "
                   "default: 'id' if present, else file + row)")
    p.add_argument("--text-column", default="text", help="batch, an embedding model: the "
                   "jsonl key / parquet or csv column of the texts (default: text)")
    p.add_argument("--overwrite", action="store_true", help="batch: first delete an earlier "
                   "job's part-*.parquet and _SUCCESS.json under --output (else refused)")
    _precision_arg(p)
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("evaluate", help="evaluate weights on the holdout split")
    p.add_argument("weights", help="weights file, s3:// URI, runs:/ or models:/ URI")
    p.add_argument("--config", help="experiment whose data (and teacher) to use; default digits")
    p.add_argument("overrides", nargs="*", help="dotted overrides for --config")
    p.set_defaults(fn=cmd_evaluate)


def _serve_command(sub: argparse._SubParsersAction) -> None:
    """kd serve (docs/serving.md#kd-serve)."""
    p = sub.add_parser("serve", help="serve models:/NAME@ALIAS over HTTP (Ray Serve), "
                                     "following the alias")
    p.add_argument("name", help="registered model name")
    p.add_argument("--alias", default="champion")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--poll-interval", type=float, default=10.0, help="seconds between alias checks")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--num-cpus", type=float, default=None,
                   help="CPUs reserved per model replica (default 1)")
    _precision_arg(p)
    p.set_defaults(fn=cmd_serve)


def _precision_arg(p: argparse.ArgumentParser) -> None:
    """``--precision`` of the commands that run a registered model."""
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (default) or bf16: weights in bfloat16 under bf16 autocast, about "
                        "2x the rows/s on a CPU with avx512_bf16 / amx_bf16 or a recent GPU, "
                        "slower on a CPU without (docs/serving.md#precision)")


def build_parser() -> argparse.ArgumentParser:
    """The `kd` argument parser with one sub-command per workflow step."""
    parser = argparse.ArgumentParser(prog="kd", description="kdflow: distil PyTorch teachers "
                                     "into small students on Ray, tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_commands(sub)
    _registry_commands(sub)
    _serve_command(sub)
    p = sub.add_parser("demo", help="the embedded demo: teacher, scratch and KD on digits")
    p.add_argument("--configs", default=None,
                   help="folder with digits-teacher.yaml and digits-kd.yaml (default: ./configs "
                        "when it has them, else the copies installed with kdflow)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run")
    p.set_defaults(fn=cmd_demo)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; options and dotted overrides may come in any order
    (``kd distill C --run-name N k=v`` as well as ``kd distill C k=v --run-name N``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides"):
        if getattr(args, "config", "") is None and "=" not in extra[0] and not extra[0].startswith("-"):
            args.config = extra.pop(0)  # an optional CONFIG positional written after an option
        bad = [a for a in extra if a.startswith("-") or "=" not in a]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def run(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code (errors printed as one line)."""
    args = parse_args(argv)
    fn: Callable[[argparse.Namespace], int] = args.fn
    with redacted_output():
        return _run(fn, args)


def _run(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Call ``fn``; map its errors to exit codes, each printed as one redacted line."""
    try:
        if getattr(args, "run_name", None) is not None:
            from kd.names import check_name

            check_name(args.run_name, "--run-name")  # the rule of name: (a folder under storage.path)
        from kd.registry.store import install_resolver

        install_resolver()  # models:/ weights URIs are read with verification
        return fn(args)
    except InputError as e:
        print(f"kd: error: {redact(e)}", file=sys.stderr)
        return EXIT_INPUT
    except GateRejected as e:
        print(f"kd: gate rejected: {redact(e)}", file=sys.stderr)
        return EXIT_GATE
    except KeyboardInterrupt:
        print("kd: interrupted", file=sys.stderr)
        return EXIT_FAILED
    except Exception as e:  # a failed run: one line, the details are in the Ray/MLflow logs
        if os.environ.get("KD_DEBUG"):
            raise
        print(f"kd: run failed: {redact(one_line(e))}", file=sys.stderr)
        return EXIT_FAILED


def main() -> None:
    """Console-script entry point: `run`, then `kd.runtime.end_process` (no slow
    interpreter teardown after a Ray run)."""
    from kd.runtime import end_process

    end_process(run())


if __name__ == "__main__":
    main()
