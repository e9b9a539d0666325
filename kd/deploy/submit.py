"""`kd submit CONFIG --address http://HEAD:8265`: a kdflow workflow as a Ray job.

The experiment (with the command line's dotted overrides applied and validated) is
uploaded as the job's working directory (one file, ``experiment.yaml``); kdflow
itself must be installed on the cluster (the kdflow image). The job's logs are
streamed, the job is followed to its end, and the exit code is the job's: 0 when it
succeeded, the driver's exit code when it failed (1 when Ray does not know it).
Token authentication (Ray 2.60's default) is read by Ray's client from
``RAY_AUTH_TOKEN``.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import yaml

from kd.config import apply_overrides, experiment_from_dict, read_yaml
from kd.deploy.render import CONFIG_FILE
from kd.errors import InputError

NAMED_RUNS = ("teacher", "distill")  # workflows that take --run-name


def experiment_doc(config: str, overrides: list[str]) -> tuple[str, str]:
    """(experiment name, YAML text) of ``config`` with ``overrides`` applied; validated
    here so a bad config fails before anything is submitted. Paths are kept as written
    (they must name places the cluster sees: s3://, or paths inside the image)."""
    doc = apply_overrides(read_yaml(config), overrides)
    exp = experiment_from_dict(doc, config)
    return exp.name, yaml.safe_dump(doc, sort_keys=False)


def job_entrypoint(workflow: str, run_name: str | None) -> str:
    """``python -m kd.cli WORKFLOW experiment.yaml [--run-name NAME]``."""
    extra = ""
    if run_name:
        if workflow not in NAMED_RUNS:
            raise InputError(f"--run-name: only {' and '.join(NAMED_RUNS)} take a run name")
        extra = f" --run-name {run_name}"
    return f"python -m kd.cli {workflow} {CONFIG_FILE}{extra}"


def exit_code(info: Any) -> int:
    """The job's exit code from its JobInfo: 0 succeeded, else the driver's code (>0) or 1."""
    status = str(getattr(info.status, "value", info.status))
    if status == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and code > 0 else 1


async def _tail(client: Any, job_id: str, out: TextIO) -> None:
    async for lines in client.tail_job_logs(job_id):
        out.write(lines)
        out.flush()


def follow(client: Any, job_id: str, out: TextIO, poll_s: float = 0.5) -> Any:
    """Stream the job's logs to ``out`` until it ends; return its final JobInfo."""
    try:
        asyncio.run(_tail(client, job_id, out))
    except Exception as e:  # the log stream broke: keep following the status
        print(f"[kd] log stream ended early ({type(e).__name__}); following the status",
              file=sys.stderr)
    while True:
        info = client.get_job_info(job_id)
        if info.status.is_terminal():
            return info
        time.sleep(poll_s)


def submit_ray_job(address: str, workflow: str, config: str, overrides: list[str],
                   run_name: str | None = None, env_vars: dict[str, str] | None = None,
                   out: TextIO | None = None) -> int:
    """Submit ``kd WORKFLOW`` through the Ray Jobs API, stream its logs, return its
    exit code (see the module docstring)."""
    from ray.job_submission import JobSubmissionClient

    out = out or sys.stdout
    _, text = experiment_doc(config, overrides)
    entry = job_entrypoint(workflow, run_name)
    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # unreachable, or refused (token)
        raise InputError(f"--address: cannot reach the Ray Jobs API at {address}: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    with tempfile.TemporaryDirectory(prefix="kd-submit-") as d:
        (Path(d) / CONFIG_FILE).write_text(text)
        runtime_env: dict[str, Any] = {"working_dir": d}
        if env_vars:
            runtime_env["env_vars"] = env_vars
        job_id = client.submit_job(entrypoint=entry, runtime_env=runtime_env)
    print(f"[kd] submitted Ray job {job_id} to {address}: {entry}", flush=True)
    info = follow(client, job_id, out)
    code = exit_code(info)
    print(f"[kd] Ray job {job_id} {info.status}: exit code {code}", flush=True)
    return code
