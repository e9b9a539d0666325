"""Teacher-output cache: computed once, reused, recomputed when the key changes,
never read half-written; training from it runs no teacher forward and matches the
online teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kd import cli
from kd.config import load_experiment
from kd.data import load_splits
from kd.errors import InputError
from kd.models.weights import load_state_dict, save_weights
from kd.train.cache import MARKER, ensure_cache, find_cache
from kd.train.run import train_run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _cached_rows(cache) -> dict:  # noqa: ANN001 - a TeacherCache
    """Every row of a (small) cache, streamed back with `cache_dataset`."""
    from kd.train.cache import cache_dataset

    return cache_dataset(cache).take_batch(100_000, batch_format="numpy")


def _train_idx(splits) -> list[int]:  # noqa: ANN001 - Splits
    return splits.train.dataset().take_batch(100_000, batch_format="numpy")["idx"].tolist()


def _exp(workdir: Path, teacher: str, *more: str):
    return load_experiment(CONFIGS / "digits-kd.yaml", [
        f"teacher.weights={teacher}", "teacher.cache=true", f"storage.path={workdir / 'runs'}",
        "scaling.num_workers=0", "trainer.epochs=3", *more])


def test_cache_once_reused_recomputed(workdir: Path, digits_teacher: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    exp = _exp(workdir, digits_teacher)
    splits = load_splits(exp.data)
    first = ensure_cache(exp, splits)
    assert first.computed
    second = ensure_cache(exp, splits)
    assert not second.computed and second.uri == first.uri
    assert second.manifest["data_dir"] == first.manifest["data_dir"]
    # the CLI finds the same cache and reports it reused
    assert cli.run(["cache-teacher", str(CONFIGS / "digits-kd.yaml"),
                    f"teacher.weights={digits_teacher}", "teacher.cache=true",
                    f"storage.path={workdir / 'runs'}"]) == 0
    assert f"{first.uri}  (reused" in capsys.readouterr().out

    # other teacher weights -> another key, computed again
    state, meta = load_state_dict(digits_teacher)
    other = workdir / "other.safetensors"
    save_weights({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()},
                 other, meta)
    changed = ensure_cache(_exp(workdir, str(other)), splits)
    assert changed.computed and changed.key != first.key

    # a manifest recording another teacher is not trusted: logged and recomputed
    marker = Path(first.uri) / MARKER
    doc = json.loads(marker.read_text())
    doc["facts"]["teacher_sha256"] = "0" * 64
    marker.write_text(json.dumps(doc))
    assert find_cache(exp, splits) is None
    assert "manifest differs in teacher_sha256" in capsys.readouterr().out
    # a half-written cache (no manifest) is invisible, then replaced
    marker.unlink()
    assert find_cache(exp, splits) is None
    again = ensure_cache(exp, splits)
    assert again.computed and len([p for p in Path(first.uri).iterdir() if p.is_dir()]) == 1


def test_training_from_cache_matches_online(workdir: Path, digits_teacher: str) -> None:
    cached = train_run(_exp(workdir, digits_teacher), "student")
    online = train_run(_exp(workdir, digits_teacher, "teacher.cache=false"), "student")
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    fwd_cached = c.get_metric_history(cached.run_id, "train/teacher_forward_batches")
    fwd_online = c.get_metric_history(online.run_id, "train/teacher_forward_batches")
    assert len(fwd_cached) == len(fwd_online) == 3
    assert all(m.value == 0 for m in fwd_cached)
    assert all(m.value > 0 for m in fwd_online)
    # the same teacher logits, the same seed and order: the same run within float noise
    assert abs(cached.metrics["val/accuracy"] - online.metrics["val/accuracy"]) <= 0.02
    assert abs(cached.metrics["train/loss"] - online.metrics["train/loss"]) < 1e-3


def test_cache_refuses_random_augmentation(workdir: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InputError, match="online teacher"):
        load_experiment(CONFIGS / "digits-kd.yaml",
                        ["teacher.cache=true", "data.transforms=[random_crop]"])
    assert cli.run(["cache-teacher", str(CONFIGS / "digits-kd.yaml"), "teacher.cache=true",
                    "data.transforms=[random_flip]"]) == 2
    assert "random augmentation" in capsys.readouterr().err


def test_feature_outputs_are_cached(workdir: Path, digits_teacher: str) -> None:
    """A feature loss's teacher path is stored and read back in row order."""
    exp = _exp(workdir, digits_teacher, "student.model=cnn_small",
               "student.args={channels: [8, 16]}",
               "distill.losses=[{name: kd, weight: 0.9}, {name: at, weight: 1.0, "
               "student: block2, teacher: block2}]")
    splits = load_splits(exp.data)
    cache = ensure_cache(exp, splits)
    cols = _cached_rows(cache)
    assert set(cols) == {"x", "y", "idx", "teacher_logits", "teacher_feature:block2"}
    assert sorted(cols["idx"].tolist()) == sorted(_train_idx(splits))  # the train rows, once each
    from kd.train.run import primary_teacher

    teacher = primary_teacher(exp, splits)
    with torch.no_grad():
        logits = teacher(torch.as_tensor(cols["x"][:5]))
    assert torch.allclose(torch.as_tensor(cols["teacher_logits"][:5]), logits, atol=1e-5)
    assert cols["teacher_feature:block2"].shape[1] == 64


def test_top_k_cache_trains_without_teacher(workdir: Path, digits_teacher: str) -> None:
    """``teacher.cache_top_k``: only k logits per row are stored (another key); the
    loop rebuilds dense logits whose softmax is the teacher's renormalised top k."""
    from kd.train.columns import dense_from_topk

    exp = _exp(workdir, digits_teacher, "teacher.cache_top_k=3")
    splits = load_splits(exp.data)
    cache = ensure_cache(exp, splits)
    cols = _cached_rows(cache)
    assert set(cols) == {"x", "y", "idx", "teacher_topk_values", "teacher_topk_indices"}
    assert cols["teacher_topk_values"].shape == (len(splits.train), 3)
    assert cache.key != ensure_cache(_exp(workdir, digits_teacher), splits).key
    values = torch.tensor([[3.0, 1.0, 0.5]])
    dense = dense_from_topk(values, torch.tensor([[7, 2, 4]]), 10)
    probs = (dense / 4.0).softmax(1)
    assert torch.allclose(probs[0, [7, 2, 4]], (values / 4.0).softmax(1)[0], atol=1e-6)
    assert float(probs[0, [0, 1, 3, 5, 6, 8, 9]].sum()) < 1e-6
    out = train_run(exp, "student")
    from mlflow.tracking import MlflowClient

    hist = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_metric_history(
        out.run_id, "train/teacher_forward_batches")
    assert hist and all(m.value == 0 for m in hist)
    assert out.metrics["val/accuracy"] > 0.3
