"""Ray job / RayCronJob entrypoint for `kd retrain` (scheduled retraining):

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python workflows/retrain.py --config configs/digits-retrain.yaml [dotted=overrides ...]

Same command, same exit codes as `kd retrain CONFIG [overrides]` (docs/retrain.md):
0 promoted or nothing to do, 1 a stage failed, 2 bad config or snapshot, 3 the gate
said no. No ``--run-name``: the pipeline id and its stages' Ray run names derive from
the inputs, so a re-submitted job resumes by itself.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _entry import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("retrain", run_name=False))
