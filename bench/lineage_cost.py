"""What a run's lineage and figures add to its fixed cost.

Times, against a fresh SQLite MLflow store in a work folder (no Ray, no training):
``log_lineage`` (dataset input + code tags + the teacher's sha256) for a digits student
whose teacher is a cnn_small weights file, and ``log_run_figures`` (curves from 20
logged epochs + a 10-class holdout confusion matrix, two PNG artifacts). Median and
max over ``--repeats`` runs, each on a new MLflow run.

    PYTHONPATH=$PWD python bench/lineage_cost.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _common import CONFIGS, enter_work_dir  # noqa: E402
from _results import write_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--work", help="work folder (default: a fresh temp folder)")
    args = ap.parse_args()
    work = enter_work_dir(args.work, "lineage")

    import numpy as np
    import torch

    from kd import tracking
    from kd.config import load_experiment
    from kd.data import load_splits
    from kd.models import build_model
    from kd.models.weights import save_weights
    from kd.train.evaluate import confusion_counts
    from kd.train.figures import log_run_figures
    from kd.train.lineage import log_lineage

    teacher = work / "teacher.safetensors"
    save_weights(build_model("cnn_small", {"channels": [32, 64]}, (1, 8, 8), 10), teacher)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    exp = load_experiment(CONFIGS / "digits-kd.yaml", [f"teacher.weights={teacher}",
                                                        f"tracking.uri={uri}"])
    splits = load_splits(exp.data)
    rng = np.random.default_rng(0)
    y = torch.as_tensor(splits.holdout.sample(len(splits.holdout)).y)
    pred = torch.where(torch.as_tensor(rng.random(len(y)) < 0.9), y, (y + 1) % 10)
    rows = []
    tracking.start_run(exp, "student")  # the first run pays MLflow's store setup; not timed
    for _ in range(args.repeats):
        run_id = tracking.start_run(exp, "student")
        for epoch in range(1, 21):
            tracking.log_metrics(uri, run_id, {"train/loss": 1 / epoch, "val/loss": 1.2 / epoch,
                                               "val/accuracy": 1 - 1 / (epoch + 1)}, epoch)
        t0 = time.perf_counter()
        log_lineage(uri, run_id, exp, "student", splits)
        t1 = time.perf_counter()
        log_run_figures(uri, run_id, confusion_counts(pred, y, 10))
        t2 = time.perf_counter()
        rows.append({"lineage_s": t1 - t0, "figures_s": t2 - t1})
    table = ["| step | median s | max s |", "|---|---|---|"]
    for key, label in (("lineage_s", "log_lineage (dataset input, tags, teacher sha256)"),
                       ("figures_s", "log_run_figures (curves + confusion PNGs)")):
        vals = [r[key] for r in rows]
        table.append(f"| {label} | {statistics.median(vals):.3f} | {max(vals):.3f} |")
    text = "\n".join(table)
    print(text)
    out = REPO / "bench" / "results" / "lineage_cost.json"
    out.write_text(json.dumps({"repeats": args.repeats, "rows": rows}, indent=1))
    write_section("Lineage and figures: cost per run", (
        f"`PYTHONPATH=$PWD python bench/lineage_cost.py --repeats {args.repeats}` on 2 shared "
        "CPUs, SQLite MLflow store, digits student with a cnn_small teacher file; each repeat "
        "is a new run (raw numbers: `bench/results/lineage_cost.json`).\n\n" + text))


if __name__ == "__main__":
    main()
