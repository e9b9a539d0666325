"""`ray job submit` entrypoint for a sweep:

    ray job submit --working-dir . -- \
        python workflows/tune.py --config configs/digits-tune.yaml [overrides] [--resume]

Composes only: the same command as `kd tune` (inside a job, `kd.runtime.ensure_ray`
joins the job's cluster).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd.cli import run  # noqa: E402


def main(argv: list[str]) -> int:
    """Map ``--config FILE [overrides] [--resume]`` onto `kd tune`."""
    args = list(argv)
    if "--config" in args:
        i = args.index("--config")
        config = args[i + 1]
        del args[i:i + 2]
        args = [config, *args]
    return run(["tune", *args])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
