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


def main(command: str, argv: list[str] | None = None) -> int:
    """Parse ``--config FILE [--run-name NAME] [dotted=overrides ...]`` and run
    ``kd COMMAND FILE overrides [--run-name NAME]``; returns the exit code."""
    from kd.cli import run

    p = argparse.ArgumentParser(prog=f"workflows/{command}.py",
                                description=f"`kd {command}` as a Ray job entrypoint")
    p.add_argument("--config", required=True, help="experiment YAML (relative to the working dir)")
    p.add_argument("--run-name", help="Ray run name; re-submitting the same name resumes it")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.epochs=2")
    args = p.parse_args(argv)
    extra = ["--run-name", args.run_name] if args.run_name else []
    return run([command, args.config, *args.overrides, *extra])
