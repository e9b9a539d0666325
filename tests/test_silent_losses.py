"""Silent failures in the losses (issue 15): DKD's alpha / beta and AT's p are validated,
attention maps use |f|^p, and AT / FitNets compute in float32."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from kd.errors import InputError
from kd.losses import LOSSES, DistillBatch, LossContext, build_composite

CTX = LossContext(temperature=4.0, num_classes=3)


def _batch(sf: dict, tf: dict) -> DistillBatch:
    return DistillBatch(student_logits=torch.zeros(sf[next(iter(sf))].shape[0], 3),
                        labels=torch.full((sf[next(iter(sf))].shape[0],), -1),
                        teacher_logits=[torch.zeros(sf[next(iter(sf))].shape[0], 3)],
                        student_features=sf, teacher_features=tf)


@pytest.mark.parametrize("param, value", [("alpha", -1.0), ("beta", -0.5), ("alpha", "abc"),
                                          ("beta", math.nan), ("alpha", math.inf),
                                          ("beta", True), ("alpha", [1])])
def test_dkd_alpha_beta_are_validated(param: str, value: object) -> None:
    """Before the fix a negative / NaN value was accepted and "abc" raised ValueError
    (exit 1); now each is an InputError (exit 2) naming the loss term and the field."""
    with pytest.raises(InputError, match=rf"^distill\.losses\[0\] \(dkd\): {param}: must be a "
                                         r"finite number >= 0, got "):
        build_composite([{"name": "dkd", param: value}], ce_weight=1.0, ctx=CTX)


def test_dkd_accepts_numbers_and_numeric_strings() -> None:
    loss = LOSSES.get("dkd")(CTX, alpha=0, beta="1e-3")  # YAML reads 1e-3 as a string
    assert (loss.alpha, loss.beta) == (0.0, 1e-3)


@pytest.mark.parametrize("p", [0, -2, "x", math.nan])
def test_at_p_is_validated(p: object) -> None:
    with pytest.raises(InputError, match=r"\(at\): p: must be a finite number > 0"):
        build_composite([{"name": "at", "student": "s", "teacher": "t", "p": p}],
                        ce_weight=1.0, ctx=CTX)


def _np_at(f_s: np.ndarray, f_t: np.ndarray, p: float) -> float:
    def amap(f: np.ndarray) -> np.ndarray:
        a = (np.abs(f) ** p).mean(axis=1).reshape(f.shape[0], -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)
    return float(((amap(f_s) - amap(f_t)) ** 2).mean())


@pytest.mark.parametrize("p", [3.0, 1.5, 2.0])
def test_at_uses_absolute_value_on_signed_features(p: float) -> None:
    """Signed (pre-ReLU) features: before the fix p=3 gave signed maps (a different
    value) and p=1.5 gave NaN; |f|^p matches the paper's reference for every p."""
    rng = np.random.default_rng(0)
    f_s, f_t = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 5, 4, 4))
    loss = LOSSES.get("at")(CTX, student="s", teacher="t", p=p)
    got = loss(_batch({"s": torch.tensor(f_s).float()}, {"t": torch.tensor(f_t).float()}))
    assert math.isfinite(got.item())
    assert got.item() == pytest.approx(_np_at(f_s, f_t, p), rel=1e-4)


def test_at_and_fitnet_compute_in_float32() -> None:
    """bf16 features: AT returned a bf16 loss before the fix, and FitNets' float32
    adapter refused bf16 input; both now give the float32 value of the same features."""
    rng = np.random.default_rng(1)
    f_s = torch.tensor(rng.normal(size=(2, 3, 4, 4))).bfloat16()
    f_t = torch.tensor(rng.normal(size=(2, 3, 4, 4))).bfloat16()
    at = LOSSES.get("at")(CTX, student="s", teacher="t")
    got = at(_batch({"s": f_s}, {"t": f_t}))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_np_at(f_s.double().numpy(), f_t.double().numpy(), 2.0),
                                       rel=1e-4)
    ctx = LossContext(temperature=4.0, num_classes=3, student_shapes={"s": f_s.shape},
                      teacher_shapes={"t": f_t.shape})
    fit = LOSSES.get("fitnet")(ctx, student="s", teacher="t")
    adapter = fit.adapters[0]
    assert isinstance(adapter, nn.Module)
    got = fit(_batch({"s": f_s}, {"t": f_t}))
    want = torch.nn.functional.mse_loss(adapter(f_s.float()), f_t.float())
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-6)
