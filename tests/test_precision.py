"""Inference precision of a loaded student (`kd.registry.loader.StudentModel`): bf16
weights under bf16 autocast give float32 outputs close to fp32's, for models that cast
inside ``forward`` too; a bad precision is one line; a CPU without native bf16 is told
once. The registry, batch and serve paths are tested in test_text_registry.py,
test_batch_predict.py and test_serve.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd.cli import PRECISIONS as CLI_PRECISIONS
from kd.models import build_model
from kd.registry import loader
from kd.registry.loader import PRECISIONS, StudentModel, check_precision


def student(name: str, shape: tuple[int, ...], precision: str) -> StudentModel:
    torch.manual_seed(0)
    return StudentModel(build_model(name, {}, shape, 10).eval(), {"input_shape": list(shape)},
                        precision=precision)


@pytest.mark.parametrize(("name", "shape"), [("mlp", (64,)), ("cnn_small", (1, 8, 8))])
def test_bf16_probabilities_are_float32_and_close_to_fp32(name: str, shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(0).random((64, *shape), dtype=np.float32)
    fp32, bf16 = student(name, shape, "fp32"), student(name, shape, "bf16")
    assert next(bf16.module.parameters()).dtype == torch.bfloat16
    assert next(fp32.module.parameters()).dtype == torch.float32
    p32, p16 = fp32.predict(x), bf16.predict(x)
    assert p16.dtype == np.float32 and p16.shape == (64, 10)
    np.testing.assert_allclose(p16.sum(1), 1.0, atol=1e-5)
    assert np.abs(p16 - p32).max() < 0.02 and not np.allclose(p16, p32, atol=1e-6)
    assert bf16.get_raw_model() is bf16


def test_bad_precision_is_one_line() -> None:
    assert PRECISIONS == CLI_PRECISIONS == ("fp32", "bf16")
    with pytest.raises(ValueError, match=r"^precision: expected one of fp32, bf16, got 'fp16'$"):
        check_precision("fp16")
    with pytest.raises(ValueError, match="got 'half'"):
        student("mlp", (64,), "half")


def test_a_cpu_without_native_bf16_is_told_once(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(loader, "native_bf16", lambda device: False)
    m = student("mlp", (64,), "bf16")
    x = np.zeros((2, 64), np.float32)
    m.predict(x)
    m.predict(x)
    err = capsys.readouterr().err.splitlines()
    assert err == ["[kd] precision bf16: this cpu has no native bf16 (avx512_bf16 / amx_bf16 / "
                   "bf16); expect it slower than fp32"]
    monkeypatch.setattr(loader, "native_bf16", lambda device: True)
    student("mlp", (64,), "bf16").predict(x)
    student("mlp", (64,), "fp32").predict(x)
    assert capsys.readouterr().err == ""
