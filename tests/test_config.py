"""Config: YAML in, dotted overrides, errors that name the field, resolved paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kd.config import apply_overrides, experiment_from_dict, load_experiment
from kd.dotted import flatten
from kd.errors import InputError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, doc: dict, name: str = "exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc))
    return p


def test_example_configs_load() -> None:
    kd = load_experiment(CONFIGS / "digits-kd.yaml")
    assert kd.student is not None and kd.student.model == "mlp"
    assert kd.distill.losses[0].name == "kd" and kd.distill.losses[0].weight == 0.9
    assert Path(kd.teacher.weights).is_absolute()  # resolved for Ray workers
    assert Path(kd.storage.path).is_absolute()
    teacher = load_experiment(CONFIGS / "digits-teacher.yaml")
    assert teacher.student is None and teacher.teacher.model == "cnn_small"


def test_dotted_overrides_reach_nested_fields_and_list_items() -> None:
    exp = load_experiment(CONFIGS / "digits-kd.yaml",
                          ["trainer.epochs=3", "distill.temperature=2", "distill.losses.0.weight=0.5",
                           "student.args.hidden=[8, 8]", "scaling.num_workers=0"])
    assert exp.trainer.epochs == 3
    assert exp.distill.temperature == 2.0
    assert exp.distill.losses[0].weight == 0.5
    assert exp.student.args["hidden"] == [8, 8]
    assert exp.scaling.num_workers == 0


def test_loss_term_params_are_kept() -> None:
    exp = experiment_from_dict({"name": "x", "distill": {"losses": [
        {"name": "dkd", "weight": 1.0, "alpha": 1.0, "beta": 8.0}]}})
    assert exp.distill.losses[0].model_extra == {"alpha": 1.0, "beta": 8.0}  # LossTerm.params() was dead code


@pytest.mark.parametrize(("override", "expected"), [
    ("trainer.epoch=3", "trainer.epoch: unknown field"),
    # Fault injection is not part of the schema any more: an old config gets the strict error.
    ("trainer.fail_at_step=3", "trainer.fail_at_step: unknown field"),
    ("trainer.epochs=many", "trainer.epochs: Input should be a valid integer"),
    ("distill.temperature=-1", "distill.temperature: Input should be greater than 0"),
    ("data.split.train=0.9", "data.split: Value error, train + val + holdout must be 1.0"),
    ("scaling.strategy=horovod", "scaling.strategy: Input should be 'ddp' or 'fsdp'"),
])
def test_bad_fields_are_one_line_errors_naming_the_field(override: str, expected: str) -> None:
    with pytest.raises(InputError) as err:
        load_experiment(CONFIGS / "digits-kd.yaml", [override])
    msg = str(err.value)
    assert expected in msg
    assert "\n" not in msg
    assert "digits-kd.yaml" in msg


def test_override_errors() -> None:
    with pytest.raises(InputError, match="expected dotted.path=value"):
        apply_overrides({}, ["trainer.epochs"])
    with pytest.raises(InputError, match="no list item 3"):
        apply_overrides({"distill": {"losses": [{"name": "kd"}]}}, ["distill.losses.3.weight=1"])


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="config file not found"):
        load_experiment(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrainer: {epochs: [1,\n")
    with pytest.raises(InputError, match="invalid YAML"):
        load_experiment(bad)


def test_resolved_config_round_trips_and_hash_tracks_content(tmp_path: Path) -> None:
    exp = load_experiment(CONFIGS / "digits-kd.yaml")
    again = load_experiment(write(tmp_path, yaml.safe_load(exp.to_yaml())))
    assert again == exp
    assert again.hash() == exp.hash()
    assert load_experiment(CONFIGS / "digits-kd.yaml", ["seed=1"]).hash() != exp.hash()


def test_flatten_names_every_leaf() -> None:
    flat = flatten({"a": {"b": 1, "c": [{"d": 2}]}, "e": None})
    assert flat == {"a.b": "1", "a.c.0.d": "2", "e": "None"}
