"""Loss terms checked against values worked out independently with numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kd.errors import InputError
from kd.losses import LOSSES, DistillBatch, LossContext, build_composite, kd_loss
from kd.losses.base import required_paths
from kd.losses.logits import nckd, tckd

# ---------------------------------------------------------------- numpy references


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per-row KL(p ‖ q)."""
    return (p * (np.log(p) - np.log(q))).sum(axis=-1)


def ctx(**kw) -> LossContext:
    kw.setdefault("temperature", 4.0)
    kw.setdefault("num_classes", 3)
    return LossContext(**kw)


def t64(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.float64)


def batch(s, labels=None, teachers=(), sf=None, tf=None) -> DistillBatch:
    s = torch.as_tensor(np.asarray(s), dtype=torch.float32)
    labels = torch.full((s.shape[0],), -1) if labels is None else torch.tensor(labels)
    return DistillBatch(
        student_logits=s,
        labels=labels,
        teacher_logits=[torch.as_tensor(np.asarray(t), dtype=torch.float32) for t in teachers],
        student_features=sf or {},
        teacher_features=tf or {},
    )


S = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
T = np.array([[3.0, 2.0, 1.0], [0.0, 1.0, 1.5]])

# ---------------------------------------------------------------- kd


def test_kd_matches_hand_value() -> None:
    temp = 2.0
    # row 0 by hand: softmax([.5, 1, 1.5]) and softmax([1.5, 1, .5])
    e = np.exp([0.5, 1.0, 1.5])
    ps0, pt0 = e / e.sum(), e[::-1] / e.sum()
    kl0 = sum(pt0[c] * np.log(pt0[c] / ps0[c]) for c in range(3))
    kl1 = np_kl(np_softmax(T[1] / temp), np_softmax(S[1] / temp))
    expected = temp**2 * (kl0 + kl1) / 2
    got = LOSSES.get("kd")(ctx(), temperature=temp)(batch(S, teachers=[T]))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # ctx.temperature is used when no param is given
    got4 = LOSSES.get("kd")(ctx(temperature=4.0))(batch(S, teachers=[T]))
    expected4 = 16 * np_kl(np_softmax(T / 4), np_softmax(S / 4)).mean()
    assert got4.item() == pytest.approx(expected4, rel=1e-5)


def test_kd_zero_when_equal() -> None:
    z = torch.randn(5, 7)
    assert kd_loss(z, z.clone(), 3.0).abs().item() < 1e-6


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_kd_gradient_is_T_times_prob_difference(temp: float) -> None:
    rng = np.random.default_rng(0)
    s_np, t_np = rng.normal(size=(4, 6)) * 3, rng.normal(size=(4, 6)) * 3
    s = t64(s_np).requires_grad_(True)
    kd_loss(s, t64(t_np), temp).backward()
    expected = temp * (np_softmax(s_np / temp) - np_softmax(t_np / temp)) / 4
    np.testing.assert_allclose(s.grad.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_kd_keeps_T_squared_for_all_T() -> None:
    s, t = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    for temp in (0.5, 1.0, 8.0):
        kl = np_kl(np_softmax(np.array([1.0, 0.0]) / temp), np_softmax(np.array([0.0, 1.0]) / temp))
        assert kd_loss(s, t, temp).item() == pytest.approx(temp**2 * kl, rel=1e-5)


def test_kd_bad_temperature_and_missing_teacher() -> None:
    with pytest.raises(InputError, match="temperature"):
        LOSSES.get("kd")(ctx(), temperature=0)
    with pytest.raises(InputError, match="teacher"):
        LOSSES.get("kd")(ctx())(batch(S))


# ---------------------------------------------------------------- dkd


def np_tckd_nckd(s: np.ndarray, t: np.ndarray, y: int, temp: float) -> tuple[float, float]:
    ps, pt = np_softmax(s / temp), np_softmax(t / temp)
    bs, bt = np.array([ps[y], 1 - ps[y]]), np.array([pt[y], 1 - pt[y]])
    other = [c for c in range(len(s)) if c != y]
    qs, qt = ps[other] / ps[other].sum(), pt[other] / pt[other].sum()
    return float(np_kl(bt, bs)), float(np_kl(qt, qs))


def test_dkd_matches_hand_value_and_uses_teacher_argmax_for_unlabeled() -> None:
    temp, alpha, beta = 2.0, 1.0, 8.0
    parts = [np_tckd_nckd(S[0], T[0], 1, temp), np_tckd_nckd(S[1], T[1], 2, temp)]
    expected = temp**2 * np.mean([alpha * a + beta * b for a, b in parts])
    loss = LOSSES.get("dkd")(ctx(), temperature=temp)
    assert loss(batch(S, [1, 2], [T])).item() == pytest.approx(expected, rel=1e-5)
    # T's argmax is 0 for row 0 and 2 for row 1
    parts = [np_tckd_nckd(S[0], T[0], 0, temp), np_tckd_nckd(S[1], T[1], 2, temp)]
    expected = temp**2 * np.mean([alpha * a + beta * b for a, b in parts])
    assert loss(batch(S, [-1, -1], [T])).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("temp", [0.5, 1.0, 3.0, 10.0])
def test_per_sample_identity_kd_equals_tckd_plus_weighted_nckd(temp: float) -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 10, generator=g) * 4, torch.randn(8, 10, generator=g) * 4
    y = torch.randint(0, 10, (8,), generator=g)
    p_t = torch.softmax(t / temp, dim=1).gather(1, y[:, None]).squeeze(1)
    rhs = tckd(s, t, y, temp) + (1 - p_t) * nckd(s, t, y, temp)
    lhs = torch.stack([kd_loss(s[i : i + 1], t[i : i + 1], temp) / temp**2 for i in range(8)])
    torch.testing.assert_close(rhs, lhs, rtol=1e-4, atol=1e-6)


def test_nckd_is_finite_with_extreme_logits() -> None:
    s = torch.tensor([[1e4, 0.0, -1e4], [0.0, 50.0, 0.0]], requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 0.0], [0.0, -50.0, 3.0]])
    y = torch.tensor([0, 1])
    total = (tckd(s, t, y, 1.0) + nckd(s, t, y, 1.0)).sum()
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(s.grad).all()


# ---------------------------------------------------------------- multi_kd


def test_multi_kd_one_teacher_equals_kd() -> None:
    b = batch(S, teachers=[T])
    one = LOSSES.get("multi_kd")(ctx(), temperature=3.0)(b)
    assert one.item() == pytest.approx(kd_loss(b.student_logits, b.teacher_logits[0], 3.0).item())


def test_multi_kd_weighted_hand_value() -> None:
    t2 = np.array([[0.0, 0.0, 5.0], [1.0, 1.0, 1.0]])
    temp = 2.0
    q = 0.75 * np_softmax(T / temp) + 0.25 * np_softmax(t2 / temp)
    expected = temp**2 * np_kl(q, np_softmax(S / temp)).mean()
    loss = LOSSES.get("multi_kd")(ctx(), weights=[3, 1], temperature=temp)
    assert loss(batch(S, teachers=[T, t2])).item() == pytest.approx(expected, rel=1e-5)


def test_multi_kd_wrong_weights_length() -> None:
    with pytest.raises(InputError, match="weights"):
        LOSSES.get("multi_kd")(ctx(teachers=[nn.Identity(), nn.Identity()]), weights=[1.0])
    loss = LOSSES.get("multi_kd")(ctx(), weights=[1.0, 2.0, 3.0])
    with pytest.raises(InputError, match="weights"):
        loss(batch(S, teachers=[T, T]))


# ---------------------------------------------------------------- feature losses


def test_fitnet_hand_value_with_identity_adapter_and_pooling() -> None:
    c = ctx(student_shapes={"s": torch.Size([1, 1, 2, 2])}, teacher_shapes={"t": (1, 1, 1, 1)})
    loss = LOSSES.get("fitnet")(c, student="s", teacher="t")
    conv = loss.adapters[0]
    with torch.no_grad():
        conv.weight.fill_(2.0)
        conv.bias.fill_(1.0)
    f_s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    f_t = torch.tensor([[[[4.0]]]])
    # adapter: 2*x+1 -> [[3,5],[7,9]], pooled to 6; (6-4)^2 = 4
    assert loss(batch(S[:1], sf={"s": f_s}, tf={"t": f_t})).item() == pytest.approx(4.0)


def test_fitnet_adapter_trains() -> None:
    c = ctx(student_shapes={"s": (4, 3, 5, 5)}, teacher_shapes={"t": (4, 6, 5, 5)})
    loss = LOSSES.get("fitnet")(c, student="s", teacher="t")
    params = [p for p in loss.parameters() if p.requires_grad]
    assert params and sum(p.numel() for p in params) == 3 * 6 + 6
    g = torch.Generator().manual_seed(0)
    b = batch(
        S,
        sf={"s": torch.randn(4, 3, 5, 5, generator=g)},
        tf={"t": torch.randn(4, 6, 5, 5, generator=g)},
    )
    opt = torch.optim.SGD(params, lr=0.1)
    first = loss(b).item()
    for _ in range(10):
        opt.zero_grad()
        loss(b).backward()
        opt.step()
    assert loss(b).item() < first


def test_fitnet_linear_adapter_and_missing_shape() -> None:
    c = ctx(student_shapes={"s": (2, 3)}, teacher_shapes={"t": (2, 5)})
    assert isinstance(LOSSES.get("fitnet")(c, student="s", teacher="t").adapters[0], nn.Linear)
    with pytest.raises(InputError, match="'s'"):
        LOSSES.get("fitnet")(ctx(), student="s", teacher="t")


def test_at_hand_value() -> None:
    f_s = np.array([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # [1, 2, 1, 2]
    f_t = np.array([[[[0.0, 1.0]]]])  # [1, 1, 1, 2]
    a_s = np.array([(1 + 9) / 2, (4 + 0) / 2])
    a_s = a_s / np.sqrt((a_s**2).sum())
    a_t = np.array([0.0, 1.0])
    expected = ((a_s - a_t) ** 2).mean()
    loss = LOSSES.get("at")(ctx(), student=["s"], teacher=["t"])
    b = batch(S[:1], sf={"s": torch.tensor(f_s).float()}, tf={"t": torch.tensor(f_t).float()})
    assert loss(b).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(InputError):
        LOSSES.get("at")(ctx(), student=["a", "b"], teacher=["t"])


def np_smooth_l1(x: np.ndarray, y: np.ndarray) -> float:
    d = np.abs(x - y)
    return float(np.where(d < 1, 0.5 * d**2, d - 0.5).mean())


def np_rkd_parts(e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(e)
    d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(n)] for i in range(n)])
    d = d / d[d > 0].mean()
    ang = np.zeros((n, n, n))
    for i in range(n):
        for j in range(n):
            for k in range(n):
                u, v = e[j] - e[i], e[k] - e[i]
                if j != i and k != i:
                    ang[i, j, k] = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
    return d, ang


def test_rkd_hand_value() -> None:
    e_s = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    e_t = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    (ds, as_), (dt, at_) = np_rkd_parts(e_s), np_rkd_parts(e_t)
    expected = 25 * np_smooth_l1(ds, dt) + 50 * np_smooth_l1(as_, at_)
    loss = LOSSES.get("rkd")(ctx(), student="s", teacher="t")
    b = batch(S[:1], sf={"s": torch.tensor(e_s).float()}, tf={"t": torch.tensor(e_t).float()})
    assert loss(b).item() == pytest.approx(expected, rel=1e-4)


def test_pkt_hand_value() -> None:
    e_s = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    e_t = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])

    def cond(e: np.ndarray) -> np.ndarray:
        u = e / np.linalg.norm(e, axis=1, keepdims=True)
        k = (u @ u.T + 1) / 2
        return k / k.sum(axis=1, keepdims=True)

    ps, pt = cond(e_s), cond(e_t)
    expected = (pt * np.log(pt / ps)).mean()
    loss = LOSSES.get("pkt")(ctx(), student="s", teacher="t")
    b = batch(S[:1], sf={"s": torch.tensor(e_s).float()}, tf={"t": torch.tensor(e_t).float()})
    assert loss(b).item() == pytest.approx(expected, rel=1e-4)


def test_sp_hand_value() -> None:
    f_s = np.array([[1.0, 0.0], [1.0, 2.0]])
    f_t = np.array([[0.0, 1.0, 1.0], [2.0, 0.0, 1.0]])

    def gram(f: np.ndarray) -> np.ndarray:
        g = f @ f.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    expected = ((gram(f_s) - gram(f_t)) ** 2).sum() / 4
    loss = LOSSES.get("sp")(ctx(), student="s", teacher="t")
    b = batch(S, sf={"s": torch.tensor(f_s).float()}, tf={"t": torch.tensor(f_t).float()})
    assert loss(b).item() == pytest.approx(expected, rel=1e-5)


def _teacher_with_bn(mean: list[float], var: list[float]) -> nn.Module:
    teacher = nn.Sequential(nn.Conv2d(1, len(mean), 1), nn.BatchNorm2d(len(mean)))
    teacher[1].running_mean.copy_(torch.tensor(mean))
    teacher[1].running_var.copy_(torch.tensor(var))
    return teacher


def test_bn_stats_zero_when_stats_match_and_hand_value() -> None:
    f = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]], [[[5.0, 7.0]], [[2.0, 2.0]]]])  # [2,2,1,2]
    # channel 0: 1,3,5,7 -> mean 4, population var 5; channel 1: 0,0,2,2 -> mean 1, var 1
    c = ctx(teachers=[_teacher_with_bn([4.0, 1.0], [5.0, 1.0])])
    loss = LOSSES.get("bn_stats")(c, student="s", teacher_bn="1")
    assert loss(batch(S, sf={"s": f})).item() == pytest.approx(0.0, abs=1e-6)
    c = ctx(teachers=[_teacher_with_bn([3.0, 1.0], [5.0, 4.0])])
    loss = LOSSES.get("bn_stats")(c, student="s", teacher_bn="1")
    # ((4-3)^2 + 0 + 0 + (1-4)^2) / 2 channels
    assert loss(batch(S, sf={"s": f})).item() == pytest.approx((1 + 9) / 2)


def test_bn_stats_errors_and_adapter() -> None:
    c = ctx(teachers=[_teacher_with_bn([0.0, 0.0], [1.0, 1.0])])
    with pytest.raises(InputError, match="'0'"):
        LOSSES.get("bn_stats")(c, student="s", teacher_bn="0")  # a Conv2d
    with pytest.raises(InputError, match="'nope'"):
        LOSSES.get("bn_stats")(c, student="s", teacher_bn="nope")
    c.student_shapes = {"s": (2, 5, 3, 3)}
    loss = LOSSES.get("bn_stats")(c, student="s", teacher_bn="1")
    assert sum(p.numel() for p in loss.parameters()) == 5 * 2 + 2
    out = loss(batch(S, sf={"s": torch.randn(2, 5, 3, 3)}))
    out.backward()
    assert torch.isfinite(out)


# ---------------------------------------------------------------- composite


def test_composite_ce_only_all_unlabeled_is_zero_with_finite_grads() -> None:
    comp = build_composite([], ce_weight=1.0, ctx=ctx())
    s = torch.randn(4, 3, requires_grad=True)
    total, parts = comp(DistillBatch(student_logits=s, labels=torch.full((4,), -1)))
    total.backward()
    assert total.item() == 0.0 and set(parts) == {"ce"}
    assert torch.isfinite(s.grad).all()


def test_composite_total_parts_and_features() -> None:
    terms = [
        {"name": "kd", "weight": 0.5, "temperature": 2.0},
        {"name": "at", "weight": 10.0, "student": "a", "teacher": "x"},
        {"name": "kd", "temperature": 1.0},
        {"name": "sp", "student": ["b", "a"], "teacher": ["y", "x"]},
    ]
    comp = build_composite(terms, ce_weight=0.3, ctx=ctx())
    assert required_paths(terms) == (["a", "b"], ["x", "y"])
    g = torch.Generator().manual_seed(0)
    feats = {k: torch.randn(2, 2, 3, 3, generator=g) for k in "abxy"}
    b = batch(S, [2, -1], [T], sf={k: feats[k] for k in "ab"}, tf={k: feats[k] for k in "xy"})
    total, parts = comp(b)
    assert list(parts) == ["ce", "kd.0", "at", "kd.2", "sp"]
    ce = -np.log(np_softmax(S[0])[2])  # only the labeled row counts
    kd2 = 4 * np_kl(np_softmax(T / 2), np_softmax(S / 2)).mean()
    kd1 = np_kl(np_softmax(T), np_softmax(S)).mean()
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert parts["kd.0"].item() == pytest.approx(kd2, rel=1e-5)
    assert parts["kd.2"].item() == pytest.approx(kd1, rel=1e-5)
    expected = 0.3 * ce + 0.5 * kd2 + 10 * parts["at"].item() + kd1 + parts["sp"].item()
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert all(not v.requires_grad for v in parts.values())


def test_composite_unknown_name_lists_known() -> None:
    with pytest.raises(InputError, match=r"distill\.losses\[0\].*known: .*dkd.*kd"):
        build_composite([{"name": "kdd"}], ce_weight=1.0, ctx=ctx())


def test_composite_unexpected_and_missing_param() -> None:
    with pytest.raises(InputError, match=r"losses\[1\] \(kd\): unexpected parameter 'alpha'"):
        build_composite([{"name": "kd"}, {"name": "kd", "alpha": 2}], ce_weight=1.0, ctx=ctx())
    with pytest.raises(InputError, match=r"\(fitnet\).*student"):
        build_composite([{"name": "fitnet", "teacher": "t"}], ce_weight=1.0, ctx=ctx())
    with pytest.raises(InputError, match="nothing to train"):
        build_composite([], ce_weight=0.0, ctx=ctx())


@pytest.mark.parametrize("bad", [-1, "heavy", True, float("nan"), float("inf")])
def test_composite_refuses_a_bad_weight_naming_the_term(bad: object) -> None:
    with pytest.raises(InputError, match=r"distill\.losses\[0\] \(kd\): weight: must be a finite"):
        build_composite([{"name": "kd", "weight": bad}], ce_weight=1.0, ctx=ctx())
    with pytest.raises(InputError, match=r"distill\.ce_weight: must be a finite number >= 0"):
        build_composite([{"name": "kd"}], ce_weight=bad, ctx=ctx())  # type: ignore[arg-type]
