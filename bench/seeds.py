"""Accuracy over seeds on digits, every run through `kd.train.run.train_run` (the one loop,
``scaling.num_workers=0``: in-process, no worker actors).

Per seed: the digits teacher (configs/digits-teacher.yaml) is trained once, then every
student scenario distils from that seed's teacher:

- full labels (configs/digits-kd.yaml): ``scratch`` (CE only), ``kd`` (the config's
  recipe), ``dkd`` (DKD alpha 1, beta 8 plus CE);
- 10% labels (configs/digits-10pct.yaml): ``10pct-scratch`` (CE on the labeled 10%),
  ``10pct-kd`` (the config's recipe: KD over all train inputs, CE on the labeled 10%).

The seed sets ``seed`` (init, shuffling); the train/val/holdout split and the 10% label
draw are fixed (``data.split.seed: 0``). Accuracy and teacher agreement are measured on
the holdout split (360 digits). Prints a table and writes two sections of
bench/RESULTS.md: mean ± sample std (ddof 1) over seeds, and every seed's value.

    PYTHONPATH=$PWD python bench/seeds.py                 # 5 seeds, all scenarios
    PYTHONPATH=$PWD python bench/seeds.py --seeds 2 --only scratch,kd --no-write \\
        --set kd:distill.temperature=2
    PYTHONPATH=$PWD python bench/seeds.py --from-json bench/seeds-results.json  # re-render

Raw per-seed results are saved to bench/seeds-results.json before RESULTS.md is written.
A rerun replaces both sections whole; their "What this shows" paragraphs are written by
hand from the numbers and must be rewritten after a rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FULL = "digits-kd.yaml"
TENPCT = "digits-10pct.yaml"
CE_ONLY = ["distill.losses=[]", "distill.ce_weight=1.0", "distill.min_teacher_confidence=null"]
# scenario -> (config file, role, overrides on top of the config)
SCENARIOS: dict[str, tuple[str, str, list[str]]] = {
    "teacher": ("digits-teacher.yaml", "teacher", []),
    "scratch": (FULL, "student", CE_ONLY),
    "kd": (FULL, "student", []),
    "dkd": (FULL, "student", ["distill.ce_weight=1.0",
                              "distill.losses=[{name: dkd, weight: 1.0, alpha: 1.0, beta: 8.0}]"]),
    "10pct-scratch": (TENPCT, "student", CE_ONLY),
    "10pct-kd": (TENPCT, "student", []),
    # the same pairs at lr 0.1: the best lr on the val split for scratch (and as good for KD)
    "scratch-lr0.1": (FULL, "student", [*CE_ONLY, "optim.lr=0.1"]),
    "kd-lr0.1": (FULL, "student", ["optim.lr=0.1"]),
    "10pct-scratch-lr0.1": (TENPCT, "student", [*CE_ONLY, "optim.lr=0.1"]),
}
FULL_ROWS = ("teacher", "scratch", "kd", "dkd", "scratch-lr0.1", "kd-lr0.1")
TENPCT_ROWS = ("10pct-scratch", "10pct-kd", "10pct-scratch-lr0.1")
PAIRS_FULL = (("kd", "scratch"), ("dkd", "scratch"), ("kd-lr0.1", "scratch-lr0.1"))
PAIRS_10 = (("10pct-kd", "10pct-scratch"), ("10pct-kd", "10pct-scratch-lr0.1"))


@dataclass
class Scores:
    """Holdout accuracy and teacher agreement of one scenario, one entry per seed."""

    accuracy: list[float] = field(default_factory=list)
    agreement: list[float] = field(default_factory=list)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pct(values: list[float]) -> str:
    """``mean ± std`` in percent, or ``-`` for no values."""
    if not values:
        return "-"
    m, s = mean_std(values)
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def run_seed(seed: int, names: list[str], work: Path, common: list[str],
             extra: dict[str, list[str]], results: dict[str, Scores]) -> None:
    """Train this seed's teacher, then each student scenario from it."""
    from kd.config import load_experiment
    from kd.train.run import train_run

    base = [*common, f"seed={seed}", "scaling.num_workers=0", f"storage.path={work / 'runs'}",
            f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "tracking.experiment=bench-seeds"]
    cfg, role, over = SCENARIOS["teacher"]
    exp = load_experiment(REPO / "configs" / cfg,
                          [*base, *over, *extra.get("teacher", []), f"name=teacher-s{seed}"])
    teacher = train_run(exp, "teacher")
    if "teacher" in names:
        results["teacher"].accuracy.append(teacher.holdout["accuracy"])
    for name in names:
        if name == "teacher":
            continue
        cfg, role, over = SCENARIOS[name]
        exp = load_experiment(REPO / "configs" / cfg,
                              [*base, *over, *extra.get(name, []), f"name={name}-s{seed}",
                               f"teacher.weights={teacher.weights}"])
        out = train_run(exp, role)
        results[name].accuracy.append(out.holdout["accuracy"])
        results[name].agreement.append(out.holdout["teacher_agreement"])


def table(rows: tuple[str, ...], results: dict[str, Scores]) -> str:
    """Markdown table: mean ± std, then every seed's value (percent)."""
    lines = ["| scenario | test accuracy % | teacher agreement % | accuracy per seed | "
             "agreement per seed |", "|---|---|---|---|---|"]
    for name in rows:
        r = results.get(name)
        if r is None or not r.accuracy:
            continue
        seeds_acc = " ".join(f"{100 * v:.1f}" for v in r.accuracy)
        seeds_agr = " ".join(f"{100 * v:.1f}" for v in r.agreement) or "-"
        lines.append(f"| {name} | {pct(r.accuracy)} | {pct(r.agreement)} | {seeds_acc} | "
                     f"{seeds_agr} |")
    return "\n".join(lines)


def verdict(kd: str, scratch: str, results: dict[str, Scores]) -> str:
    """``kd`` vs ``scratch``: difference of means against 2 × the larger std, and the
    per-seed paired difference (same seed, same teacher)."""
    a, b = results.get(kd), results.get(scratch)
    if a is None or b is None or not a.accuracy or not b.accuracy:
        return ""
    (ma, sa), (mb, sb) = mean_std(a.accuracy), mean_std(b.accuracy)
    diff, bar = ma - mb, 2 * max(sa, sb)
    paired = [x - y for x, y in zip(a.accuracy, b.accuracy, strict=False)]
    pm, ps = mean_std(paired)
    word = "beats" if diff > bar else "does NOT beat"
    return (f"{kd} {word} {scratch} by more than 2 std: {100 * diff:+.1f} points "
            f"(2 × max std = {100 * bar:.1f}); paired per seed {100 * pm:+.1f} ± {100 * ps:.1f}, "
            f"{sum(d > 0 for d in paired)}/{len(paired)} seeds better.")


def upsert_section(text: str, heading: str, body: str) -> str:
    """Replace the ``## heading`` section of a markdown text (up to the next ``## ``), or
    append it at the end."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    block = [heading, "", *body.strip().splitlines(), ""]
    if start is None:
        out = [*lines, ""] if lines and lines[-1].strip() else list(lines)
        return "\n".join([*out, *block]).lstrip("\n") + "\n"
    end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")),
               len(lines))
    return "\n".join([*lines[:start], *block, *lines[end:]]).rstrip("\n") + "\n"


def recipe(cfg: str) -> str:
    """One line describing a config's student, recipe and optimiser."""
    from kd.config import load_experiment

    e = load_experiment(REPO / "configs" / cfg)
    train = (f"{e.optim.name} lr {e.optim.lr:g}, {e.optim.schedule.name}, {e.trainer.epochs} "
             f"epochs, batch {e.trainer.batch_size}")
    if e.student is None:
        assert e.teacher is not None
        return f"`configs/{cfg}`: teacher {e.teacher.model} {e.teacher.args}, CE; {train}"
    terms = ", ".join(f"{t.name} ×{t.weight:g}" for t in e.distill.losses)
    conf = (f", min_teacher_confidence {e.distill.min_teacher_confidence}"
            if e.distill.min_teacher_confidence is not None else "")
    return (f"`configs/{cfg}`: student {e.student.model} {e.student.args}, T = "
            f"{e.distill.temperature:g}, CE ×{e.distill.ce_weight:g} + {terms}{conf}; {train}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    p.add_argument("--set", action="append", default=[], metavar="SCENARIO:key=value",
                   help="override for one scenario ('all:' for every run, teacher included)")
    p.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--json", default=str(REPO / "bench" / "seeds-results.json"),
                   help="where the raw per-seed results are saved (before RESULTS.md)")
    p.add_argument("--from-json", help="render a saved results file; train nothing")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    common: list[str] = []
    extra: dict[str, list[str]] = {}
    for item in args.set:
        scen, _, kv = item.partition(":")
        (common if scen == "all" else extra.setdefault(scen, [])).append(kv)

    note = None
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        results = {n: Scores(**v) for n, v in saved["results"].items()}
        names, wall, args.seeds, args.set = list(results), saved["wall_s"], saved["seeds"], \
            saved["set"]
        argv = saved["argv"]
        note = saved.get("note")
    else:
        from kd.runtime import ensure_ray

        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        ensure_ray(num_cpus=2)
        results = {n: Scores() for n in names}
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="kd-bench-seeds-") as d:
            for seed in range(args.seeds):
                run_seed(seed, names, Path(d), common, extra, results)
                print(f"[bench] seed {seed} done, {time.perf_counter() - t0:.0f} s", flush=True)
        wall = time.perf_counter() - t0
        Path(args.json).write_text(json.dumps({
            "seeds": args.seeds, "wall_s": wall, "set": args.set,
            "argv": argv if argv is not None else sys.argv[1:],
            "results": {n: asdict(r) for n, r in results.items()}}, indent=1) + "\n")

    import torch

    full, tenpct = table(FULL_ROWS, results), table(TENPCT_ROWS, results)
    v_full = "\n\n".join(x for x in (verdict(a, b, results) for a, b in PAIRS_FULL) if x)
    v_10 = "\n\n".join(x for x in (verdict(a, b, results) for a, b in PAIRS_10) if x)
    print(f"\nfull labels\n{full}\n{v_full}\n\n10% labels\n{tenpct}\n{v_10}\n")
    print(f"{args.seeds} seeds, {wall:.0f} s wall on {os.cpu_count()} CPUs")
    if args.no_write:
        return 0
    cmd = " ".join(["python bench/seeds.py", *(argv if argv is not None else sys.argv[1:])])
    setting = (f"{args.seeds} seeds (0..{args.seeds - 1}); one teacher per seed; holdout = 360 "
               f"digits; mean ± sample std; `{cmd}` took {wall:.0f} s "
               f"on {os.cpu_count()} shared CPUs (torch {torch.__version__}, "
               f"`scaling.num_workers=0`)." + (f" Note: {note}." if note else ""))
    extras = "".join(f"\n- override `{s}`" for s in args.set)
    out = Path(args.out)
    text = out.read_text() if out.exists() else "# Benchmark results\n"
    if any(n in FULL_ROWS for n in names):
        body = (f"{setting}\n\n- {recipe('digits-teacher.yaml')}\n- {recipe(FULL)}\n"
                f"- scratch: same student and schedule, CE ×1 only; DKD: CE ×1 + dkd "
                f"(alpha 1, beta 8, T from the config); `-lr0.1`: the same at lr 0.1"
                f"{extras}\n\n{full}\n\n{v_full}\n")
        text = upsert_section(text, "## Distillation on digits: teacher, scratch, KD, DKD", body)
    if any(n in TENPCT_ROWS for n in names):
        body = (f"{setting}\n\n- {recipe(TENPCT)}\n- 10pct-scratch: same student, schedule "
                f"and data, CE ×1 on the labeled 10% only (unlabeled rows add nothing); "
                f"`-lr0.1`: the same at lr 0.1\n"
                f"- teacher: the full-label digits teacher of the same seed{extras}\n\n"
                f"{tenpct}\n\n{v_10}\n")
        text = upsert_section(text, "## Semi-supervised: digits with 10% of the labels", body)
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
