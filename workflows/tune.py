"""`ray job submit` entrypoint for a sweep:

    ray job submit --working-dir . -- \
        python workflows/tune.py --config configs/digits-tune.yaml [overrides] [--resume]

Composes only: the same command as `kd tune` (inside a job, `kd.runtime.ensure_ray`
joins the job's cluster).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _entry import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("tune", flags=("--resume",)))
