"""Shared argument handling for the ``ray job submit`` entrypoints.

An entrypoint only composes: it parses ``--config``, ``--run-name`` and dotted
overrides, then runs the same `kd` command the CLI runs (`kd.cli.run`), so exit
codes and error lines are the CLI's (0 ok, 1 failed, 2 bad input).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The job's working directory (``--working-dir .``) holds the kd package: put it
# first on the path so the driver imports the submitted code, not an installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(command: str, argv: list[str] | None = None, flags: tuple[str, ...] = (),
         run_name: bool = True) -> int:
    """Parse ``--config FILE [--run-name NAME] [FLAGS] [dotted=overrides ...]`` (in any order)
    and run ``kd COMMAND FILE overrides [--run-name NAME] [FLAGS]``; returns the exit code.
    ``flags`` are on/off options of that command passed through (``--resume`` for tune).
    Commands whose run names derive from their inputs (retrain) pass ``run_name=False``."""
    from kd.cli import run

    p = argparse.ArgumentParser(prog=f"workflows/{command}.py",
                                description=f"`kd {command}` as a Ray job entrypoint")
    p.add_argument("--config", required=True, help="experiment YAML (relative to the working dir)")
    if run_name and command != "tune":
        p.add_argument("--run-name", help="Ray run name; re-submitting the same name resumes it")
    for flag in flags:
        p.add_argument(flag, action="store_true", help=f"`kd {command} {flag}`")
    args, overrides = p.parse_known_args(argv)
    bad = [a for a in overrides if a.startswith("-") or "=" not in a]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    extra = ["--run-name", args.run_name] if getattr(args, "run_name", None) else []
    extra += [f for f in flags if getattr(args, f.lstrip("-").replace("-", "_"))]
    return run([command, args.config, *overrides, *extra])
