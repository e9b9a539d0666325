"""What a neighbour process does to `latency_ms`, on one thread and on all of them.

`kd.train.evaluate.latency_ms` times one no-grad forward of one batch with torch's
intra-op threads set to 1. This bench shows why: for three models (the demo's digits
MLP student, its cnn_small teacher, a resnet20 on 32x32x3), batch 128, it times the
median forward on 1 thread (`latency_ms`) and on all of the machine's threads (the
same loop, the way it measured before), in rounds after a 50 ms pause, first on an idle
machine and then beside one neighbour process that spins on a core (as Ray Train's
controller does for about half a second after `fit` returns, when `kd` scores the
holdout): a pool thread woken behind the neighbour waits out its time slice. Prints a table, writes the
"latency_ms and a busy neighbour" section of bench/RESULTS.md and
bench/results/latency.json.

    PYTHONPATH=$PWD python bench/latency.py --rounds 10
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _results import write_section  # noqa: E402


def _spin() -> None:
    """A neighbour: one core kept busy until killed."""
    while True:
        pass


def _all_threads_ms(model, sample, repeats: int = 30) -> float:  # type: ignore[no-untyped-def]
    """The median forward on torch's current threads (how `latency_ms` timed before)."""
    import torch

    with torch.no_grad():
        for _ in range(3):
            model(sample)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(sample)
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _measure(models: dict, rounds: int) -> dict[str, dict[str, list[float]]]:  # type: ignore[type-arg]
    """Per model: every round's 1-thread and all-threads median, in ms."""
    from kd.train.evaluate import latency_ms

    out: dict[str, dict[str, list[float]]] = {}
    for name, (model, sample) in models.items():
        model.eval()
        out[name] = {"one_thread": [], "all_threads": []}
        for _ in range(rounds):  # a pause before each: torch's pool threads go to sleep
            time.sleep(0.05)
            out[name]["all_threads"].append(_all_threads_ms(model, sample))
            time.sleep(0.05)
            out[name]["one_thread"].append(latency_ms(model, sample))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()

    import torch

    from kd.models import build_model

    models = {
        "digits mlp [32] (demo student)": (build_model("mlp", {"hidden": [32]}, (1, 8, 8), 10),
                                           torch.randn(128, 1, 8, 8)),
        "digits cnn_small (demo teacher)": (build_model("cnn_small", {"channels": [32, 64]},
                                                        (1, 8, 8), 10), torch.randn(128, 1, 8, 8)),
        "resnet20, 32x32x3": (build_model("resnet20", {}, (3, 32, 32), 10),
                              torch.randn(128, 3, 32, 32)),
    }
    idle = _measure(models, args.rounds)
    neighbour = multiprocessing.get_context("fork").Process(target=_spin, daemon=True)
    neighbour.start()
    try:
        time.sleep(0.5)
        busy = _measure(models, args.rounds)
    finally:
        neighbour.kill()
    rows = ["| model | 1 thread, idle | 1 thread, busy neighbour | all threads, idle "
            "| all threads, busy neighbour |", "|---|---|---|---|---|"]
    for name in models:
        cells = [d[name][k] for k in ("one_thread", "all_threads") for d in (idle, busy)]
        rows.append(f"| {name} | " + " | ".join(
            f"{statistics.median(c):.3f} / {max(c):.3f}" for c in cells) + " |")
    table = "\n".join(rows)
    print(table)
    facts = {"command": f"python bench/latency.py --rounds {args.rounds}", "cpus": os.cpu_count(),
             "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                             time.gmtime()),
             "idle": idle, "busy_neighbour": busy}
    (REPO / "bench" / "results" / "latency.json").write_text(json.dumps(facts, indent=2) + "\n")
    write_section("latency_ms and a busy neighbour", (
        f"`python bench/latency.py --rounds {args.rounds}` on {facts['date']}: ms per no-grad "
        f"forward of a 128-row batch: median / worst of {args.rounds} rounds, each the median of "
        f"up to 30 forwards after a 50 ms pause; {os.cpu_count()} CPUs, torch's threads {facts['torch_threads']}; the "
        "neighbour is one process spinning on a core. Raw: `bench/results/latency.json`.\n\n"
        + table))


if __name__ == "__main__":
    main()
