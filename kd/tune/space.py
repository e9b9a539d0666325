"""The `tune.space` mini-language, parsed without eval.

``{dotted.config.path: "dist(args)"}`` with ``dist`` one of ``loguniform(a, b)``
(0 < a < b), ``uniform(a, b)`` (a < b), ``randint(a, b)`` (ints, a < b, b exclusive)
and ``choice([v1, v2, ...])`` (a non-empty list of literals). Arguments are read
with `ast.literal_eval` (literals only). Each path must name a field of the
resolved config (lists by index, e.g. ``distill.losses.0.weight``; keys inside a
model's ``args`` may be new), and the distribution's extreme values must validate.
`probe_students` then builds and runs the student at the extremes of each ``student.*``
key on the data's real input shape and class count (the sweep calls it once the data
is loaded).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any

from kd.config import Experiment, experiment_from_dict
from kd.dotted import check_exists, with_values
from kd.errors import InputError, one_line

KINDS = ("loguniform", "uniform", "randint", "choice")
_CALL = re.compile(r"^\s*([A-Za-z_]\w*)\s*\((.*)\)\s*$", re.S)


@dataclass(frozen=True)
class Dist:
    """One parsed distribution: ``kind`` and its literal arguments."""

    kind: str
    args: tuple[Any, ...]

    def to_tune(self) -> Any:
        """The equivalent `ray.tune` search domain."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args[0]))
        return getattr(tune, self.kind)(*self.args)

    def extremes(self) -> list[Any]:
        """Values at the edges of the range (every option for ``choice``)."""
        if self.kind == "choice":
            return list(self.args[0])
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return [self.args[0], self.args[1]]


def parse_dist(path: str, text: Any) -> Dist:
    """Parse ``"loguniform(1, 10)"`` etc.; an `InputError` names ``tune.space.<path>``."""
    where = f"tune.space.{path}"
    if not isinstance(text, str):
        raise InputError(f"{where}: expected a string like 'uniform(0.1, 1.0)', got {text!r}")
    m = _CALL.match(text)
    if not m or m.group(1) not in KINDS:
        raise InputError(f"{where}: {text!r} is not one of {', '.join(k + '(...)' for k in KINDS)}")
    kind, raw = m.group(1), m.group(2)
    try:
        args = ast.literal_eval(f"({raw},)") if raw.strip() else ()
    except (ValueError, SyntaxError):
        raise InputError(f"{where}: arguments of {kind} must be literals, got {raw!r}") from None
    if kind == "choice":
        if len(args) != 1 or not isinstance(args[0], (list, tuple)) or not args[0]:
            raise InputError(f"{where}: choice takes one non-empty list, e.g. choice([0.5, 1.0])")
        return Dist(kind, (list(args[0]),))
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool)
                                 for a in args):
        raise InputError(f"{where}: {kind} takes two numbers (low, high), got {raw!r}")
    lo, hi = args
    if not lo < hi:
        raise InputError(f"{where}: {kind}({lo}, {hi}): low must be < high")
    if kind == "loguniform" and lo <= 0:
        raise InputError(f"{where}: loguniform({lo}, {hi}): bounds must be > 0")
    if kind == "randint" and not (isinstance(lo, int) and isinstance(hi, int)):
        raise InputError(f"{where}: randint({lo}, {hi}): bounds must be integers")
    return Dist(kind, (lo, hi))


def apply_values(doc: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``doc`` with every ``{path: value}`` of a trial applied."""
    return with_values(doc, values, "tune.space")


def _check_path(doc: dict[str, Any], path: str) -> None:
    check_exists(doc, path, f"tune.space.{path}", new_ok_under="args")


def parse_space(exp: Experiment) -> dict[str, Dist]:
    """Parse and check ``exp.tune.space`` (see the module docstring)."""
    if not exp.tune.space:
        raise InputError("tune.space: empty; name at least one field, e.g. "
                         "distill.temperature: loguniform(1, 10)")
    doc = exp.model_dump(mode="json")
    space: dict[str, Dist] = {}
    for path, text in exp.tune.space.items():
        if path.startswith("tune.") or path == "name":
            raise InputError(f"tune.space.{path}: this field cannot be searched")
        dist = parse_dist(path, text)
        _check_path(doc, path)
        for value in dist.extremes():
            try:
                experiment_from_dict(with_values(doc, {path: value}), "trial")
            except InputError as e:
                raise InputError(f"tune.space.{path}: value {value!r} is not valid here "
                                 f"({str(e).removeprefix('trial: ')})") from None
        space[path] = dist
    return space


def probe_students(exp: Experiment, space: dict[str, Dist], input_shape: tuple[int, ...],
                   num_classes: int, sample: Any = None) -> None:
    """Build the student at each extreme value of every ``student.*`` key of ``space`` for
    the data's real ``input_shape`` and ``num_classes`` and, given a ``sample`` batch, run
    it and check the output is ``[B, num_classes]``. Any failure is an `InputError`
    naming ``tune.space.<key>``, the value and the shape; nothing is swallowed."""
    import torch

    from kd.models import build_model

    doc = exp.model_dump(mode="json")
    for path, dist in space.items():
        if not path.startswith("student."):
            continue
        for value in dist.extremes():
            st = experiment_from_dict(with_values(doc, {path: value}), "trial").student
            if st is None:
                continue
            try:
                model = build_model(st.model, st.args, input_shape, num_classes, st.width)
                if sample is not None:
                    model.eval()
                    with torch.no_grad():
                        out = model(sample)
                    if out.ndim != 2 or out.shape[1] != num_classes:
                        raise InputError(f"outputs shape {tuple(out.shape)}, expected "
                                         f"[batch, {num_classes}]")
            except Exception as e:  # noqa: BLE001 - every failure is reported, as input
                why = str(e) if isinstance(e, InputError) else one_line(e)
                raise InputError(f"tune.space.{path}: value {value!r}: the student "
                                 f"{st.model!r} does not work on this data (input shape "
                                 f"{list(input_shape)}, {num_classes} classes): {why}") from None


def trial_doc(base: dict[str, Any], values: dict[str, Any], trial_id: str) -> dict[str, Any]:
    """The config of one trial: base + sampled values; its own name (so weights of
    concurrent trials never collide)."""
    doc = apply_values(base, values)
    doc["name"] = f"{base['name']}-{trial_id}"[:100]
    doc["tracking"]["run_name"] = f"{base['name']}-trial-{trial_id}"
    return doc
