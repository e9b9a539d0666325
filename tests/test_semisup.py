"""Distillation on unlabeled and partly labeled data (issue 6).

Unit checks of the confidence filter and the class balancing; the loop's step on
a batch without labels; end-to-end runs (``scaling.num_workers: 0``, the same loop
in-process) on data with no labels, a partly labeled parquet file and a transfer
set on the S3 test server; bad input through `kd.cli.run`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kd import cli
from kd.config import experiment_from_dict, resolve_paths
from kd.data import load_splits
from kd.data.builtin import synthetic
from kd.errors import InputError
from kd.losses import DistillBatch, LossContext, build_composite, kd_loss
from kd.losses.composite import teacher_confidence
from kd.train.assemble import assemble
from kd.train.driver import sample_batch as _sample
from kd.train.semisup import balance_by_teacher, balanced_indices
from kd.train.step import Step

SYNTH = {"source": "synthetic", "args": {"n": 400, "num_classes": 4, "noise": 1.0}}


def experiment(tmp: Path, name: str, **sections: object) -> dict:
    """A small config dict: synthetic data, MLP teacher/student, 4 epochs, in-process."""
    doc: dict = {
        "name": name, "data": dict(SYNTH),
        "teacher": {"model": "mlp", "args": {"hidden": [32]}},
        "student": {"model": "mlp", "args": {"hidden": [8]}},
        "distill": {"temperature": 2.0, "ce_weight": 1.0, "losses": [{"name": "kd"}]},
        "optim": {"name": "adam", "lr": 0.01, "weight_decay": 0.0},
        "trainer": {"epochs": 4, "batch_size": 64}, "scaling": {"num_workers": 0},
        "storage": {"path": str(tmp / "runs")},
    }
    for key, value in sections.items():
        doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
    return doc


def write_config(tmp: Path, doc: dict) -> str:
    path = tmp / f"{doc['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


@pytest.fixture(scope="module")
def teacher_weights(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real teacher on the synthetic data, trained by `kd teacher` (the same loop)."""
    tmp = tmp_path_factory.mktemp("teacher")
    doc = experiment(tmp, "semisup-teacher", tracking={"uri": f"sqlite:///{tmp / 'mlflow.db'}"})
    assert cli.run(["teacher", write_config(tmp, doc)]) == 0
    return str(tmp / "runs" / "semisup-teacher" / "model.safetensors")


@pytest.fixture
def no_ray(ray_session: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a run gets as far as starting (or joining) Ray for training.
    The data checks themselves run on Ray Data (one streaming profile pass), so the
    session's Ray is up; the run's own `ensure_ray` (after preflight) must not be reached."""
    import kd.train.run

    def boom(*_: object, **__: object) -> None:
        raise AssertionError("Ray was started before the bad input was reported")

    monkeypatch.setattr(kd.train.run, "ensure_ray", boom)


# -- the confidence filter and class balancing --------------------------------------

def _composite(threshold: float | None, ce_weight: float = 1.0):  # noqa: ANN202
    ctx = LossContext(temperature=2.0, num_classes=3)
    return build_composite([{"name": "kd", "weight": 1.0}], ce_weight, ctx, threshold)


def test_confidence_filter_drops_unconfident_samples_from_distillation_only() -> None:
    torch.manual_seed(0)
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.tensor([[9.0, 0, 0], [0.1, 0, 0], [0, 8.0, 0], [0, 0, 0.2]])
    labels = torch.tensor([0, 1, -1, -1])
    conf = teacher_confidence(t)
    keep = conf >= 0.9
    assert keep.tolist() == [True, False, True, False]
    total, parts = _composite(0.9)(batch := DistillBatch(s, labels, [t]))
    assert batch.distill_mask.tolist() == keep.tolist()
    assert torch.allclose(parts["kd"], kd_loss(s[keep], t[keep], 2.0))
    ce = torch.nn.functional.cross_entropy(s[:2], labels[:2])  # both labeled rows keep CE
    assert torch.allclose(parts["ce"], ce)
    assert torch.allclose(total, ce + kd_loss(s[keep], t[keep], 2.0))
    total.backward()
    assert s.grad[1].abs().sum() > 0  # row 1: low confidence, but labeled -> CE gradient
    assert s.grad[3].abs().sum() == 0  # row 3: low confidence and unlabeled -> no gradient


def test_confidence_filter_with_no_confident_sample_gives_zero_terms() -> None:
    s = torch.randn(3, 3, requires_grad=True)
    t = torch.zeros(3, 3)  # max softmax 1/3 everywhere
    total, parts = _composite(0.5, ce_weight=0.0)(DistillBatch(s, torch.full((3,), -1), [t]))
    assert float(total.detach()) == 0.0 and float(parts["kd"]) == 0.0
    total.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() == 0


def test_without_threshold_every_sample_is_distilled() -> None:
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    batch = DistillBatch(s, torch.full((5,), -1), [t])
    _, parts = _composite(None)(batch)
    assert batch.distill_mask is None
    assert torch.allclose(parts["kd"], kd_loss(s, t, 2.0))


def test_balanced_indices_equalise_predicted_classes() -> None:
    pred = np.array([0] * 50 + [1] * 30 + [2] * 4)
    idx = balanced_indices(pred, seed=0)
    assert np.bincount(pred[idx]).tolist() == [28, 28, 28]
    assert set(np.flatnonzero(pred == 2)) <= set(idx)  # a small class keeps all its rows
    assert len(set(idx[pred[idx] == 0])) == 28  # a big one is subsampled without repeats
    assert np.array_equal(idx, balanced_indices(pred, seed=0))
    assert not np.array_equal(idx, balanced_indices(pred, seed=1))


def test_balance_by_teacher_resamples_only_unlabeled_rows(teacher_weights: str,
                                                          tmp_path: Path) -> None:
    doc = experiment(tmp_path, "bal", data={"labeled_fraction": 0.2, "balance_by_teacher": True},
                     teacher={"model": "mlp", "args": {"hidden": [32]}, "weights": teacher_weights})
    exp = resolve_paths(experiment_from_dict(doc))
    splits = load_splits(exp.data)
    out = balance_by_teacher(exp, "student", splits)
    before = splits.train.dataset().take_batch(10_000, batch_format="numpy")
    after = out.train.dataset().take_batch(10_000, batch_format="numpy")
    assert len(after["y"]) == len(out.train)  # the counted size is the streamed size
    lab_before = dict(zip(before["idx"][before["y"] >= 0].tolist(), before["y"][before["y"] >= 0].tolist()))
    lab_after = dict(zip(after["idx"][after["y"] >= 0].tolist(), after["y"][after["y"] >= 0].tolist()))
    assert lab_after == lab_before and (after["y"] >= 0).sum() == splits.train.labeled  # labeled rows once
    from kd.train.evaluate import predict_logits
    from kd.train.run import primary_teacher

    teacher = primary_teacher(exp, splits)
    pred = lambda b: predict_logits(teacher, b["x"][b["y"] < 0]).argmax(1).numpy()  # noqa: E731
    skew_before = np.bincount(pred(before), minlength=4)
    counts = np.bincount(pred(after), minlength=4)
    assert counts[skew_before > 0].min() > 0
    # about equal per predicted class (each row's repeat count is drawn, not exact)
    assert counts.max() / counts[counts > 0].min() < 1.6
    assert out.data_hash != splits.data_hash


# -- the loop's step on a batch without labels ------------------------------------

def test_loop_step_on_a_batch_without_labels(teacher_weights: str, tmp_path: Path) -> None:
    doc = experiment(tmp_path, "nolab",
                     teacher={"model": "mlp", "args": {"hidden": [32]}, "weights": teacher_weights})
    exp = resolve_paths(experiment_from_dict(doc))
    splits = load_splits(exp.data)
    asm = assemble(exp, "student", splits.input_shape, splits.num_classes, _sample(splits))
    step = Step(asm, asm.trainee, torch.device("cpu"), torch.float32)
    batch = {"x": torch.as_tensor(splits.train.sample(16).x), "y": torch.full((16,), -1)}
    total, parts, db = step(batch)
    assert float(parts["ce"]) == 0.0 and float(parts["kd"]) > 0
    total.backward()
    grads = [p.grad for p in asm.trainee.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0  # the KD term still teaches


# -- end to end, in-process -------------------------------------------------------

def test_pure_distillation_on_data_without_labels(teacher_weights: str, workdir: Path) -> None:
    from kd.train.run import train_run

    doc = experiment(workdir, "pure", data={"labels": "none"},
                     teacher={"model": "mlp", "args": {"hidden": [32]}, "weights": teacher_weights},
                     distill={"temperature": 2.0, "ce_weight": 1.0, "losses": [{"name": "kd"}],
                              "min_teacher_confidence": 0.6})
    exp = resolve_paths(experiment_from_dict(doc))
    out = train_run(exp, "student")
    m = out.metrics
    assert m["train/labeled_samples"] == 0
    assert m["train/unlabeled_samples"] == len(load_splits(exp.data).train)
    assert m["train/loss/ce"] == 0.0 and np.isfinite(m["train/loss"])
    assert 0.5 < m["train/distilled_fraction"] <= 1.0
    assert out.holdout["accuracy"] > 0.85 and out.holdout["teacher_agreement"] > 0.85


def test_partly_labeled_parquet_is_read_and_trained(workdir: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kd.train.run import train_run

    x, y = synthetic(n=400, num_classes=4, shape=(16,), noise=1.0, seed=3)
    labels = pa.array([int(v) if i % 3 == 0 else None for i, v in enumerate(y)], pa.int64())
    pq.write_table(pa.table({"x": pa.array(x.tolist()), "y": labels}), workdir / "part.parquet")
    doc = experiment(workdir, "parquet", data={"source": str(workdir / "part.parquet"), "args": {}})
    exp = resolve_paths(experiment_from_dict(doc))
    splits = load_splits(exp.data)
    assert splits.num_classes == 4 and splits.input_shape == (16,)
    assert 0 < splits.train.labeled < len(splits.train)
    out = train_run(exp, "teacher")
    assert out.metrics["train/labeled_samples"] == splits.train.labeled
    assert out.metrics["train/unlabeled_samples"] == len(splits.train) - splits.train.labeled
    assert out.holdout["accuracy"] > 0.8


def test_transfer_set_from_s3(teacher_weights: str, workdir: Path, bucket: str,
                              s3_server: str) -> None:
    import boto3

    from kd.train.run import train_run

    tx, _ = synthetic(n=200, num_classes=4, noise=1.0, seed=0)
    np.savez(workdir / "transfer.npz", x=tx)
    boto3.client("s3", endpoint_url=s3_server).upload_file(
        str(workdir / "transfer.npz"), bucket, "sets/transfer.npz")
    doc = experiment(workdir, "transfer",
                     data={"labeled_fraction": 0.1, "transfer": f"s3://{bucket}/sets/transfer.npz"},
                     teacher={"model": "mlp", "args": {"hidden": [32]}, "weights": teacher_weights})
    exp = resolve_paths(experiment_from_dict(doc))
    train = load_splits(exp.data).train
    labeled = train.labeled
    assert 0.05 * (len(train) - 200) <= labeled <= 0.15 * (len(train) - 200)  # ~10%, by row hash
    m = train_run(exp, "student").metrics
    assert m["train/labeled_samples"] == labeled
    assert m["train/unlabeled_samples"] == len(train) - labeled  # the 200 transfer rows included
    assert m["val/accuracy"] > 0.85


# -- bad input: one line, exit 2, before Ray starts ------------------------------

def _bad(tmp: Path, capsys: pytest.CaptureFixture, command: str, doc: dict) -> str:
    rc = cli.run([command, write_config(tmp, doc)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("kd: error: ")
    return err


def test_label_outside_the_class_range(workdir: Path, no_ray: None,
                                       capsys: pytest.CaptureFixture) -> None:
    np.savez(workdir / "d.npz", x=np.zeros((20, 4), np.float32), y=np.arange(20) % 5)
    doc = experiment(workdir, "range", data={"source": str(workdir / "d.npz"),
                                             "args": {"num_classes": 4}})
    err = _bad(workdir, capsys, "teacher", doc)
    assert "label 4 is outside the class range [0, 4)" in err and "data.args.num_classes is 4" in err
    np.savez(workdir / "neg.npz", x=np.zeros((20, 4), np.float32), y=np.arange(20) % 4 - 2)
    doc["data"] = {"source": str(workdir / "neg.npz")}
    assert "labels must be >= 0 (or -1 / null for unlabeled), found -2" in _bad(workdir, capsys,
                                                                         "teacher", doc)


def test_label_outside_the_teachers_classes(teacher_weights: str, workdir: Path, no_ray: None,
                                            capsys: pytest.CaptureFixture) -> None:
    x, y = synthetic(n=100, num_classes=4, noise=1.0, seed=0)
    np.savez(workdir / "one.npz", x=x, y=np.where(np.arange(100) == 7, 4, y))
    doc = experiment(workdir, "five", data={"source": str(workdir / "one.npz"), "args": {}},
                     teacher={"model": "mlp", "args": {"hidden": [32]}, "weights": teacher_weights})
    err = _bad(workdir, capsys, "distill", doc)  # one row of class 4 misses two splits
    assert "data.split: the" in err and "split has no row of class(es) 4" in err
    np.savez(workdir / "five.npz", x=x, y=np.where(np.arange(100) % 4 == 3, 4, y))
    doc["data"]["source"] = str(workdir / "five.npz")
    err = _bad(workdir, capsys, "distill", doc)
    assert "label 4 is outside the class range [0, 4) of teacher.weights" in err


def test_transfer_set_with_another_input_shape(workdir: Path, no_ray: None,
                                               capsys: pytest.CaptureFixture) -> None:
    np.savez(workdir / "t.npz", x=np.zeros((10, 1, 4, 4), np.float32))
    doc = experiment(workdir, "shape", data={"transfer": str(workdir / "t.npz")})
    err = _bad(workdir, capsys, "teacher", doc)
    assert "data.transfer" in err and "(1, 4, 4) differs from the labeled set's (1, 8, 8)" in err


def test_no_labels_with_a_ce_only_recipe(teacher_weights: str, workdir: Path, no_ray: None,
                                         capsys: pytest.CaptureFixture) -> None:
    teacher = {"model": "mlp", "args": {"hidden": [32]}, "weights": teacher_weights}
    doc = experiment(workdir, "ceonly", data={"labels": "none"}, teacher=teacher,
                     distill={"losses": []})
    err = _bad(workdir, capsys, "distill", doc)
    assert "data.labels: none, but the recipe has only CE" in err
    assert "data.labels: none, but `kd teacher` trains with CE only" in _bad(
        workdir, capsys, "teacher", experiment(workdir, "tnone", data={"labels": "none"}))
    doc = experiment(workdir, "conf", teacher=teacher,
                     distill={"losses": [], "min_teacher_confidence": 0.5})
    assert "distill.min_teacher_confidence" in _bad(workdir, capsys, "distill", doc)
    doc = experiment(workdir, "bal", data={"balance_by_teacher": True})
    assert "data.balance_by_teacher: needs a teacher with weights" in _bad(
        workdir, capsys, "distill", doc)


def test_unlabeled_file_needs_a_class_count(workdir: Path) -> None:
    np.savez(workdir / "u.npz", x=np.zeros((10, 4), np.float32))
    doc = experiment(workdir, "nolabels", data={"source": str(workdir / "u.npz"), "args": {}})
    with pytest.raises(InputError, match="no labels at all; set data.args.num_classes"):
        load_splits(resolve_paths(experiment_from_dict(doc)).data)
