"""Ray job entrypoint for `kd teacher` (train a teacher with CE only).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python workflows/teacher.py --config configs/digits-teacher.yaml trainer.epochs=2
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _entry import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("teacher"))
