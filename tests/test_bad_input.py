"""Bad input a new user gives: each case is refused with one line naming the flag, the
field or the file (exit 2), before Ray starts and before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from kd import cli
from kd.config import check_name, experiment_from_dict, load_experiment, name_problem
from kd.errors import InputError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a run gets as far as starting Ray."""
    import kd.train.run

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("Ray was started although the input was bad")

    monkeypatch.setattr(kd.train.run, "ensure_ray", refuse)


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("run_name", ["../../somewhere", "/tmp/abs", "a/b", "..", ".hidden",
                                      "a\nb", "x" * 101, ""],
                         ids=["traversal", "absolute", "slash", "dotdot", "dot", "newline", "long", "empty"])
@pytest.mark.parametrize("command", ["teacher", "distill"])
def test_run_name_flag_is_validated_like_name(command: str, run_name: str, tmp_path: Path,
                                              workdir: Path, no_ray: None,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`--run-name ../../somewhere` used to be joined onto storage.path as is: the run's
    checkpoints went outside it. It is now held to the rule of ``name:`` (exit 2)."""
    config = CONFIGS / ("digits-teacher.yaml" if command == "teacher" else "digits-kd.yaml")
    runs = tmp_path / "a" / "b" / "runs"
    code = cli.run([command, str(config), "--run-name", run_name, f"storage.path={runs}",
                    "scaling.num_workers=0", "trainer.epochs=1"])
    err = one_error_line(capsys)
    assert code == 2, err
    assert err.startswith("kd: error: --run-name: "), err
    assert name_problem(run_name) in err
    assert not (tmp_path / "somewhere").exists() and not runs.exists()
    # the config's name: is refused by the same rule
    with pytest.raises(InputError) as e:
        experiment_from_dict({"name": run_name})
    assert name_problem(run_name) in str(e.value)


def test_train_run_refuses_a_run_name_that_leaves_storage(no_ray: None, tmp_path: Path) -> None:
    """Library callers of `train_run` get the same check (without the 100-character cap,
    which names kdflow derives from a valid name may exceed)."""
    from kd.train.run import train_run

    exp = load_experiment(CONFIGS / "digits-teacher.yaml", [f"storage.path={tmp_path}/runs"])
    with pytest.raises(InputError, match="run name: '../escape' is not a valid name"):
        train_run(exp, "teacher", run_name="../escape")
    assert check_name("n" * 150, "run name", max_len=None) == "n" * 150


def test_a_name_with_a_trailing_newline_is_refused() -> None:
    """Python's ``re`` with ``$`` would accept "name\\n": the rule uses fullmatch."""
    assert name_problem("ok-name") is None
    assert name_problem("ok-name\n") is not None


CONFIG_FILES = [
    ("binary.yaml", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not a UTF-8 text file"),
    ("syntax.yaml", b"name: x\ntrainer: {epochs: [1,\n", "line 3 invalid YAML"),
    ("list.yaml", b"- name: x\n", "expected a mapping of sections at the top level, got a list"),
    ("scalar.yaml", b"just a string\n", "expected a mapping of sections at the top level, got a str"),
    ("empty.yaml", b"", "the file is empty"),
    ("comments.yaml", b"# only a comment\n", "the file is empty"),
    ("python.yaml", b"name: !!python/object/apply:os.system ['echo pwned']\n", "invalid YAML"),
    ("deep.yaml", b"name: x\ndata: {args: {a: " + b"[" * 5000 + b"]" * 5000 + b"}}\n", "invalid YAML"),
]


@pytest.mark.parametrize(("filename", "content", "expected"), CONFIG_FILES, ids=[c[0] for c in CONFIG_FILES])
def test_config_file_that_is_not_a_yaml_mapping(filename: str, content: bytes, expected: str,
                                                tmp_path: Path, no_ray: None,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A binary file used to exit 1 with a bare UnicodeDecodeError; every malformed
    config file is now exit 2 with one line that names the file."""
    path = tmp_path / filename
    path.write_bytes(content)
    code = cli.run(["teacher", str(path)])
    err = one_error_line(capsys)
    assert code == 2, err
    assert err.startswith(f"kd: error: {path}:") and expected in err, err
    assert "pwned" not in err


def test_a_directory_given_as_config(tmp_path: Path, no_ray: None,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.run(["distill", str(tmp_path)])
    err = one_error_line(capsys)
    assert code == 2 and err == f"kd: error: {tmp_path}: is a directory, not a config file"


# Found by the property-based corpus (tests/test_bad_input_corpus.py); each was accepted
# as a valid config (and failed later, or did not survive the logged resolved config's
# round trip), or raised something other than InputError.
NOT_PLAIN = [
    ("storage.path=runs\x00", "storage.path: the text holds a NUL byte"),  # was ValueError, exit 1
    ("data.source=digits\x00", "data.source: the text holds a NUL byte"),
    ("teacher.weights=/w\x00.safetensors", "teacher.weights: the text holds a NUL byte"),
    ("optim.momentum=.inf", "optim.momentum: inf is not a finite number"),
    ("optim.lr=.inf", "optim.lr: inf is not a finite number"),
    ("distill.losses=[{name: kd, alpha: .nan}]", "distill.losses.0.alpha: nan is not a finite number"),
    ("data.args={a: !!binary AAAA}", "data.args.a: expected plain config data (text, number, list, "
                                     "mapping), got bytes"),
    ("data.args={a: 2001-12-14}", "data.args.a: expected plain config data (text, number, list, "
                                  "mapping), got date"),
    ("data.args={a: !!set {x}}", "data.args.a: expected plain config data (text, number, list, "
                                 "mapping), got set"),
    ("student.args={a: {1: 2}}", "student.args.a.1: keys must be strings, got int 1"),
    ("trainer.epochs=100000000000000000000", "trainer.epochs: integer out of the 64-bit range"),
    ("seed=-1", "seed: Input should be greater than or equal to 0"),
    ("seed=4294967296", "seed: Input should be less than or equal to 2147483647"),
    ("data.split.seed=-3", "data.split.seed: Input should be greater than or equal to 0"),
    ("tune.seed=99999999999", "tune.seed: Input should be less than or equal to 2147483647"),
]


@pytest.mark.parametrize(("override", "expected"), NOT_PLAIN, ids=[o for o, _ in NOT_PLAIN])
def test_config_values_that_are_not_plain_data(override: str, expected: str, tmp_path: Path,
                                               no_ray: None, capsys: pytest.CaptureFixture[str]) -> None:
    config = CONFIGS / "digits-kd.yaml"
    code = cli.run(["distill", str(config), override, f"storage.path={tmp_path}"]
                   if not override.startswith("storage.path") else ["distill", str(config), override])
    err = one_error_line(capsys)
    assert code == 2, err
    assert err.startswith(f"kd: error: {config}: ") and expected in err, err


def test_an_odd_mapping_key_keeps_the_error_on_one_line(tmp_path: Path) -> None:
    """A YAML key holding a newline used to split the error over two lines."""
    path = tmp_path / "k.yaml"
    path.write_text('name: x\n"\\n": 1\ntrainer: {"ep\\tochs": 2}\n')
    with pytest.raises(InputError) as e:
        load_experiment(path)
    assert "\n" not in str(e.value)
    assert "'\\n': unknown field" in str(e.value) and "trainer.'ep\\tochs': unknown field" in str(e.value)


def test_a_tilde_user_that_does_not_exist_is_one_line() -> None:
    """``~name/...`` of a user this machine does not have (found by the bad-input corpus:
    pathlib raised RuntimeError) is a one-line error naming the field."""
    from kd.config import load_experiment
    from kd.errors import InputError

    for override, field in (("data.source=~0", "data.source"), ("storage.path=~nobody-x/runs", "storage.path"),
                            ("teacher.weights=~nobody-x/w.safetensors", "weights")):
        with pytest.raises(InputError) as e:
            load_experiment(CONFIGS / "digits-kd.yaml", [override])
        assert str(e.value).startswith(f"{field}: ") and "\n" not in str(e.value)
