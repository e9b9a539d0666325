"""The bad-input corpus: property-based tests (hypothesis) over the config loader and the
`kd` command line. Every case must end in one of two ways:

- a clean `InputError`: one line, no traceback; through the CLI, exit 2;
- a valid config, whose resolved YAML loads back to the same config with the same hash
  (the resolved config is what a run logs and ``--from-run`` reloads).

Anything else (another exception, exit 1, a traceback, a multi-line message) fails.
The CLI is driven in-process (`kd.cli.run`) with the run itself stubbed out: the case
ends where a valid config would start training. Counts of the cases and their outcomes
are written to ``$KD_CORPUS_SUMMARY`` when it is set (``bench/bad_input_corpus.py``).
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from kd import cli
from kd.config import Experiment, experiment_from_dict, load_experiment, resolve_paths
from kd.errors import InputError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BASE = yaml.safe_load((CONFIGS / "digits-kd.yaml").read_text())
SETTINGS = settings(max_examples=int(os.environ.get("KD_CORPUS_EXAMPLES", "300")), deadline=None,
                    derandomize=not os.environ.get("KD_CORPUS_RANDOM"), database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])
OUTCOMES: collections.Counter[tuple[str, str]] = collections.Counter()


def schema_paths(model: type[BaseModel] = Experiment, prefix: str = "") -> list[str]:
    """Every field of the schema as a dotted path; sub-sections recursed into."""
    out = []
    for name, f in model.model_fields.items():
        path = f"{prefix}{name}"
        out.append(path)
        for arg in (f.annotation, *typing.get_args(f.annotation)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                out += schema_paths(arg, path + ".")
    return out


FIELDS = schema_paths()
PARTS = sorted({p for f in FIELDS for p in f.split(".")})

huge_ints = st.sampled_from([2**31, 2**63, 2**64 + 1, 10**30, -(10**30), 10**400])
scalars = st.one_of(st.none(), st.booleans(), st.integers(), huge_ints,
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
                    st.sampled_from(["../../somewhere", "/etc/passwd", "a/../../b", "..", "~",
                                     "s3://b/../k", "名前", "\u202eevil", "x\x00y", "a\nb", "-1",
                                     "1e400", ".nan", "!!binary AAAA", "*alias", "&a x", "{", "["]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12)


def field_type(path: str) -> Any:
    """The annotation of the schema field at ``path`` (Optional unwrapped)."""
    model: Any = Experiment
    ann: Any = None
    for part in path.split("."):
        ann = model.model_fields[part].annotation
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        model = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if len(args) == 1 and typing.get_origin(ann) is not None and model is None:
            ann = args[0]
    return ann


def near_valid(path: str) -> st.SearchStrategy[Any]:
    """Values of roughly the field's own type: the edges (0, negatives, huge, nan, inf,
    unicode, NUL, traversal) where a type check passes and a range check must not."""
    ann = field_type(path)
    if ann is bool:
        return st.booleans()
    if typing.get_origin(ann) is typing.Literal:
        return st.one_of(st.sampled_from(typing.get_args(ann)), st.text(max_size=10))
    if ann in (int, float):
        return st.one_of(st.integers(-5, 10**6), huge_ints, st.floats(allow_nan=True, allow_infinity=True))
    if ann is str:
        return st.one_of(st.text(max_size=40), st.sampled_from(["../../x", "a/b", "\x00", "é/名", "s3://b/k"]))
    return values


def yaml_value(value: Any) -> str:
    """``value`` as the text after ``=`` in an override (parsed back as YAML)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")


overrides = st.one_of(
    st.tuples(st.sampled_from(FIELDS), values).map(lambda kv: f"{kv[0]}={yaml_value(kv[1])}"),
    st.tuples(st.sampled_from(FIELDS), st.text(max_size=20)).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.tuples(st.lists(st.one_of(st.sampled_from(PARTS), st.text(max_size=6),
                                 st.integers(0, 3).map(str)), min_size=1, max_size=5),
              st.text(max_size=20)).map(lambda kv: f"{'.'.join(kv[0])}={kv[1]}"),
    st.text(max_size=30),  # no '=' at all, or a random one
)


def record(test: str, outcome: str) -> str:
    OUTCOMES[(test, outcome)] += 1
    return outcome


def check_valid(exp: Experiment) -> None:
    """A valid config hashes, and its resolved YAML loads back to the same config."""
    again = resolve_paths(experiment_from_dict(yaml.safe_load(exp.to_yaml()), "resolved"))
    assert again == exp and again.hash() == exp.hash()


def outcome_of_load(path: Path, extra: list[str]) -> str:
    try:
        exp = load_experiment(path, extra)
    except InputError as e:
        msg = str(e)
        assert msg.strip() and "\n" not in msg and "Traceback" not in msg, msg
        return "input error"
    check_valid(exp)
    return "valid"


@pytest.fixture(scope="module", autouse=True)
def summary() -> Any:
    yield
    rows = [{"test": t, "outcome": o, "cases": n} for (t, o), n in sorted(OUTCOMES.items())]
    print("\nbad-input corpus:", json.dumps(rows))
    if os.environ.get("KD_CORPUS_SUMMARY"):
        Path(os.environ["KD_CORPUS_SUMMARY"]).write_text(json.dumps(rows, indent=1))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("corpus")


@SETTINGS
@given(doc=st.one_of(values, st.dictionaries(st.sampled_from([*BASE, "x"]), values, max_size=6),
                     st.builds(lambda d, k, v: {**d, k: v}, st.just(BASE), st.sampled_from(list(BASE)),
                               values)))
def test_random_yaml_documents(doc: Any, folder: Path) -> None:
    """Random YAML documents: scalars, lists, mappings with the real section names."""
    path = folder / "doc.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    record("random YAML documents", outcome_of_load(path, []))


@SETTINGS
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))),
       raw=st.binary(max_size=100))
def test_random_text_and_bytes(text: str, raw: bytes, folder: Path) -> None:
    """Random text as a config (YAML syntax errors, tags, anchors) and random bytes."""
    path = folder / "text.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    record("random text", outcome_of_load(path, []))
    path.write_bytes(raw)
    record("random bytes", outcome_of_load(path, []))


@SETTINGS
@given(field=st.sampled_from(FIELDS), value=values)
def test_wrong_types_for_every_field(field: str, value: Any) -> None:
    """Any value (wrong types, huge numbers, nan, unicode, traversal) in any schema field."""
    record("any value in any field", outcome_of_load(CONFIGS / "digits-kd.yaml",
                                                     [f"{field}={yaml_value(value)}"]))


@SETTINGS
@given(data=st.data(), field=st.sampled_from(FIELDS))
def test_edge_values_of_each_fields_own_type(data: st.DataObject, field: str) -> None:
    """Values of the field's own type at the edges: 0, negative, huge, nan, inf, unicode."""
    value = data.draw(near_valid(field))
    record("edge values of the field's type", outcome_of_load(CONFIGS / "digits-kd.yaml",
                                                              [f"{field}={yaml_value(value)}"]))


@SETTINGS
@given(extra=st.lists(overrides, max_size=4))
def test_random_dotted_overrides(extra: list[str]) -> None:
    """Random ``a.b=c`` overrides: real and made-up paths, list indexes, no ``=``."""
    record("random dotted overrides", outcome_of_load(CONFIGS / "digits-kd.yaml", extra))


class Started(Exception):
    """A valid config reached the run (stubbed)."""


@SETTINGS
@given(command=st.sampled_from(["teacher", "distill"]),
       run_name=st.one_of(st.none(), st.text(max_size=40),
                          st.sampled_from(["../../somewhere", "ok-name", "a/b", "..", "/abs", "x" * 101])),
       name=st.one_of(st.none(), st.text(max_size=30), st.sampled_from(["../x", "ok.name", "é"])),
       extra=st.lists(overrides, max_size=3))
def test_cli_arguments(command: str, run_name: str | None, name: str | None, extra: list[str],
                       folder: Path) -> None:
    """`kd teacher|distill CONFIG [overrides] [--run-name N]` in-process: exit 0 (the run
    would start) or exit 2 with one ``kd: error:`` line (or argparse's usage error)."""
    config = CONFIGS / ("digits-teacher.yaml" if command == "teacher" else "digits-kd.yaml")
    argv = [command, str(config), *([f"name={yaml_value(name)}"] if name is not None else []), *extra]
    if run_name is not None:
        argv += [f"--run-name={run_name}"]
    started: list[Experiment] = []
    err, out = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(out):
        mp.delenv("KD_DEBUG", raising=False)
        mp.setattr("kd.train.run.train_run", lambda exp, *_a, **_k: started.append(exp) or _raise())
        try:
            code = cli.run(argv)
        except SystemExit as e:  # argparse: a usage error (exit 2), or -h (exit 0)
            if e.code == 0 and out.getvalue().startswith("usage: kd"):
                record("CLI arguments", "help (exit 0)")
                return
            assert e.code == 2 and "error:" in err.getvalue(), err.getvalue()
            record("CLI arguments", "usage error (exit 2)")
            return
    text = err.getvalue()
    assert "Traceback" not in text, text
    if started:
        assert code == 1 and text.startswith("kd: run failed: Started"), text
        check_valid(started[0])
        record("CLI arguments", "valid: the run starts")
        return
    assert code == 2, (code, text)
    assert text.startswith("kd: error: ") and text.count("\n") == 1, text
    record("CLI arguments", "input error (exit 2)")


def _raise() -> None:
    raise Started("stub")
