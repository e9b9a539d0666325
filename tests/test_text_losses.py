"""Text / embedding distillation losses (issue 14) and `#k` feature capture, checked against
numpy values worked out by hand and on a real (tiny, random) transformers BertModel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from kd.errors import InputError
from kd.losses import LOSSES, DistillBatch, LossContext, build_composite
from kd.train.capture import FeatureCapture, check_paths, feature_shapes, split_path


def ctx(**kw) -> LossContext:
    kw.setdefault("temperature", 1.0)
    kw.setdefault("num_classes", 4)
    return LossContext(**kw)


def f32(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.float32)


def emb_batch(s, t, **kw) -> DistillBatch:
    s = s if isinstance(s, torch.Tensor) else f32(s)
    t = t if isinstance(t, torch.Tensor) else f32(t)
    return DistillBatch(student_logits=s, labels=torch.full((s.shape[0],), -1),
                        teacher_logits=[t], **kw)


def term(name: str, c: LossContext | None = None, **params) -> nn.Module:
    return LOSSES.get(name)(c or ctx(), **params)


# ---------------------------------------------------------------- sentence-embedding terms


def test_embed_mse_and_cosine_hand_values() -> None:
    s, t = [[1.0, 2.0], [3.0, 4.0]], [[0.0, 2.0], [1.0, 1.0]]
    # differences [1, 0] and [2, 3]: (1 + 0 + 4 + 9) / (2 * 2)
    assert term("embed_mse")(emb_batch(s, t)).item() == pytest.approx(3.5)
    # cos = 0 and 1: mean(1 - 0, 1 - 1)
    cos = term("embed_cosine")(emb_batch([[1.0, 0.0], [1.0, 1.0]], [[0.0, 3.0], [2.0, 2.0]]))
    assert cos.item() == pytest.approx(0.5)


def np_cos_matrix(e: np.ndarray) -> np.ndarray:
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    return u @ u.T


def test_embed_relational_hand_value_off_diagonal_and_width_free() -> None:
    s = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    t = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 5.0]])  # wider teacher: allowed
    d = (np_cos_matrix(s) - np_cos_matrix(t)) ** 2
    expected = (d.sum() - np.trace(d)) / (3 * 2)
    # by hand: S_s off-diag = 0, 1/√2, 1/√2; S_t off-diag = 1/√2, 0, 0
    assert expected == pytest.approx(2 * (0.5 + 0.5 + 0.5) / 6)
    assert term("embed_relational")(emb_batch(s, t)).item() == pytest.approx(expected, rel=1e-5)
    one = term("embed_relational")(emb_batch(s[:1], t[:1]))
    assert one.item() == 0.0


@pytest.mark.parametrize("name", ["embed_mse", "embed_cosine", "embed_relational"])
def test_embedding_terms_zero_when_equal_and_grad_flows(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(5, 6, generator=g)
    assert term(name)(emb_batch(t.clone(), t)).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(5, 6, generator=g, requires_grad=True)
    out = term(name)(emb_batch(s, t))
    out.backward()
    assert out.item() > 0 and s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["embed_mse", "embed_cosine"])
def test_embedding_width_mismatch_names_term_and_suggests_projection(name: str) -> None:
    with pytest.raises(InputError, match=rf"^{name}: student embedding width 3 != teacher's 4; "
                                         r"give the student a projection to 4") as err:
        term(name)(emb_batch(torch.zeros(2, 3), torch.zeros(2, 4)))
    assert "\n" not in str(err.value)


def test_embedding_terms_need_a_teacher() -> None:
    b = DistillBatch(student_logits=torch.zeros(2, 3), labels=torch.full((2,), -1))
    with pytest.raises(InputError, match="embed_cosine: needs the teacher's embedding"):
        term("embed_cosine")(b)


# ---------------------------------------------------------------- hidden_mse


def hidden_ctx(s_shapes: dict, t_shapes: dict) -> LossContext:
    return ctx(student_shapes={k: torch.Size(v) for k, v in s_shapes.items()},
               teacher_shapes={k: torch.Size(v) for k, v in t_shapes.items()})


def test_hidden_mse_hand_value_over_real_tokens_and_pairs() -> None:
    c = hidden_ctx({"s1": (2, 3, 2), "s2": (2, 3, 2)}, {"t1": (2, 3, 2), "t3": (2, 3, 2)})
    loss = term("hidden_mse", c, student=["s1", "s2"], teacher=["t1", "t3"])
    assert all(isinstance(a, nn.Identity) for a in loss.adapters)  # equal widths
    hs = f32([[[1, 1], [2, 0], [9, 9]], [[0, 0], [7, 7], [7, 7]]])
    ht = f32([[[0, 1], [0, 0], [0, 0]], [[1, 1], [0, 0], [0, 0]]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # real tokens: (1,0)->1, (2,0)->4, (-1,-1)->2: sum 7 over 3 tokens * 2 dims
    pair1 = 7 / 6
    b = emb_batch(torch.zeros(2, 4), torch.zeros(2, 4), token_mask=mask,
                  student_features={"s1": hs, "s2": ht.clone()},
                  teacher_features={"t1": ht, "t3": ht})
    assert loss(b).item() == pytest.approx((pair1 + 0.0) / 2, rel=1e-6)


def test_hidden_mse_ignores_padded_positions() -> None:
    c = hidden_ctx({"s": (2, 4, 3)}, {"t": (2, 4, 3)})
    loss = term("hidden_mse", c, student="s", teacher="t")
    g = torch.Generator().manual_seed(1)
    hs, ht = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    before = loss(emb_batch(torch.zeros(2, 4), torch.zeros(2, 4), token_mask=mask,
                            student_features={"s": hs}, teacher_features={"t": ht}))
    hs2, ht2 = hs.clone(), ht.clone()
    hs2[~mask], ht2[~mask] = 1e3, -1e3
    after = loss(emb_batch(torch.zeros(2, 4), torch.zeros(2, 4), token_mask=mask,
                           student_features={"s": hs2}, teacher_features={"t": ht2}))
    assert after.item() == pytest.approx(before.item(), rel=1e-6)
    unmasked = loss(emb_batch(torch.zeros(2, 4), torch.zeros(2, 4),
                              student_features={"s": hs2}, teacher_features={"t": ht2}))
    assert unmasked.item() > 1e3  # token_mask None = every token is real


def test_hidden_mse_adapter_trains_and_student_gets_gradients() -> None:
    c = hidden_ctx({"s": (3, 5, 4)}, {"t": (3, 5, 6)})
    loss = term("hidden_mse", c, student="s", teacher="t")
    assert isinstance(loss.adapters[0], nn.Linear) and loss.adapters[0].weight.shape == (6, 4)
    g = torch.Generator().manual_seed(2)
    hs = torch.randn(3, 5, 4, generator=g, requires_grad=True)
    ht = torch.randn(3, 5, 6, generator=g)
    b = emb_batch(torch.zeros(3, 4), torch.zeros(3, 4), student_features={"s": hs},
                  teacher_features={"t": ht})
    loss(b).backward()
    assert hs.grad.abs().sum() > 0 and loss.adapters[0].weight.grad.abs().sum() > 0
    opt = torch.optim.SGD(loss.parameters(), lr=0.1)
    first = loss(b).item()
    for _ in range(20):
        opt.zero_grad()
        loss(b).backward()
        opt.step()
    assert loss(b).item() < first


def test_hidden_mse_bad_params() -> None:
    c = hidden_ctx({"s": (2, 4, 3), "s2": (2, 4, 3)}, {"t": (2, 5, 3)})
    with pytest.raises(InputError, match=r"^hidden_mse: student and teacher must list the same "
                                         r"number \(>= 1\) of module paths .*got 2 and 1$"):
        term("hidden_mse", c, student=["s", "s2"], teacher=["t"])
    with pytest.raises(InputError, match=r"^hidden_mse: student 's' and teacher 't' have "
                                         r"sequence lengths 4 and 5"):
        term("hidden_mse", c, student="s", teacher="t")
    with pytest.raises(InputError, match=r"distill\.losses\[0\] \(hidden_mse\): .*'nope'.*unknown"):
        build_composite([{"name": "hidden_mse", "student": "nope", "teacher": "t"}], 0.0, c)
    with pytest.raises(InputError, match=r"\(hidden_mse\): hidden_mse: student and teacher must be module paths"):
        build_composite([{"name": "hidden_mse", "student": 3, "teacher": "t"}], 0.0, c)
    c2 = hidden_ctx({"s": (2, 4, 3)}, {"t": (2, 4, 3)})
    loss = term("hidden_mse", c2, student="s", teacher="t")
    b = emb_batch(torch.zeros(2, 4), torch.zeros(2, 4), student_features={"s": torch.zeros(2, 4, 3)},
                  teacher_features={"t": torch.zeros(2, 6, 3)})  # lengths differ at run time
    with pytest.raises(InputError, match=r"^hidden_mse: .*same B and L"):
        loss(b)
    b.teacher_features["t"] = torch.zeros(2, 4, 3)
    b.token_mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(InputError, match=r"^hidden_mse: token_mask has shape \[2, 5\]"):
        loss(b)


# ---------------------------------------------------------------- attention_kl


def np_attention_kl(ps: np.ndarray, pt: np.ndarray, mask: np.ndarray) -> float:
    """Loop reference: KL(teacher ‖ student) per (b, h, real query) over real keys, renormalised."""
    rows = []
    for b in range(ps.shape[0]):
        keys = np.flatnonzero(mask[b])
        for h in range(ps.shape[1]):
            for q in keys:
                p, r = pt[b, h, q, keys], ps[b, h, q, keys]
                p, r = p / p.sum(), r / r.sum()
                rows.append(float((p * np.log(p / r)).sum()))
    return float(np.mean(rows))


def random_probs(g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.softmax(torch.randn(*shape, generator=g) * 2, dim=-1)


def att_batch(ps: torch.Tensor, pt: torch.Tensor, mask: torch.Tensor | None, s="s#1", t="t#1"):
    b = ps.shape[0]
    return emb_batch(torch.zeros(b, 4), torch.zeros(b, 4), token_mask=mask,
                     student_features={s: ps}, teacher_features={t: pt})


def test_attention_kl_hand_value_two_tokens() -> None:
    ps = f32([[[[0.5, 0.5], [0.25, 0.75]]]])  # [1, 1, 2, 2]
    pt = f32([[[[0.75, 0.25], [0.25, 0.75]]]])
    kl0 = 0.75 * np.log(0.75 / 0.5) + 0.25 * np.log(0.25 / 0.5)
    loss = term("attention_kl", student="s#1", teacher="t#1")
    assert loss(att_batch(ps, pt, None)).item() == pytest.approx(kl0 / 2, rel=1e-5)


def test_attention_kl_matches_reference_and_ignores_padding() -> None:
    g = torch.Generator().manual_seed(3)
    ps, pt = random_probs(g, (2, 3, 4, 4)), random_probs(g, (2, 3, 4, 4))
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    loss = term("attention_kl", student=["s#1"], teacher=["t#1"])
    got = loss(att_batch(ps, pt, mask)).item()
    assert got == pytest.approx(np_attention_kl(ps.numpy(), pt.numpy(), mask.numpy()), rel=1e-5)
    ps2, pt2 = ps.clone(), pt.clone()
    pad_q = ~mask[:, None, :, None].expand_as(ps)
    pad_k = ~mask[:, None, None, :].expand_as(ps)
    ps2[pad_q | pad_k], pt2[pad_q | pad_k] = 0.9, 0.01
    assert loss(att_batch(ps2, pt2, mask)).item() == pytest.approx(got, rel=1e-6)
    assert loss(att_batch(pt.clone(), pt, mask)).item() == pytest.approx(0.0, abs=1e-6)


def test_attention_kl_averages_heads_when_counts_differ_and_grad_flows() -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 2, 3, 3, generator=g, requires_grad=True)
    ps, pt = torch.softmax(logits, dim=-1), random_probs(g, (2, 4, 3, 3))
    loss = term("attention_kl", student="s#1", teacher="t#1")
    out = loss(att_batch(ps, pt, None))
    ref = np_attention_kl(ps.detach().mean(1, keepdim=True).numpy(),
                          pt.mean(1, keepdim=True).numpy(), np.ones((2, 3), bool))
    assert out.item() == pytest.approx(ref, rel=1e-5)
    out.backward()
    assert logits.grad.abs().sum() > 0


def test_attention_kl_bad_params_and_captures() -> None:
    with pytest.raises(InputError, match=r"^attention_kl: student path 's' must end in '#1'"):
        term("attention_kl", student="s", teacher="t#1")
    with pytest.raises(InputError, match=r"\(attention_kl\): attention_kl: student and teacher must list the same"):
        build_composite([{"name": "attention_kl", "student": ["a#1", "b#1"], "teacher": "t#1"}],
                        0.0, ctx())
    loss = term("attention_kl", student="s#1", teacher="t#1")
    p = random_probs(torch.Generator().manual_seed(5), (2, 1, 3, 3))
    with pytest.raises(InputError, match=r"^attention_kl: no student feature .*'s#1'.*attn: eager\)$"):
        loss(att_batch(p, p, None, s="other#1"))
    with pytest.raises(InputError, match=r"^attention_kl: teacher capture at 't#1' has shape "
                                         r"\[2, 3, 3\].*attn: eager$"):
        loss(att_batch(p, p[:, 0], None))
    with pytest.raises(InputError, match=r"differ in batch or sequence length"):
        loss(att_batch(p, random_probs(torch.Generator(), (2, 1, 4, 4)), None))


# ---------------------------------------------------------------- DistillBatch / composite


def test_select_keeps_token_mask_rows_and_composite_uses_distill_mask() -> None:
    g = torch.Generator().manual_seed(6)
    hs, ht = torch.randn(3, 4, 2, generator=g), torch.randn(3, 4, 2, generator=g)
    mask = torch.tensor([[True, False, False, False], [True, True, True, True],
                         [True, True, False, False]])
    b = emb_batch(torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), token_mask=mask,
                  student_features={"s": hs}, teacher_features={"t": ht})
    sub = b.select(torch.tensor([True, False, True]))
    assert torch.equal(sub.token_mask, mask[[0, 2]]) and sub.student_features["s"].shape[0] == 2
    c = hidden_ctx({"s": (3, 4, 2)}, {"t": (3, 4, 2)})
    comp = build_composite([{"name": "hidden_mse", "student": "s", "teacher": "t"},
                            {"name": "embed_cosine", "weight": 2.0}], 0.0, c)
    b.distill_mask = torch.tensor([True, False, True])
    total, parts = comp(b)
    direct = term("hidden_mse", c, student="s", teacher="t")(sub)
    assert parts["hidden_mse"].item() == pytest.approx(direct.item(), rel=1e-6)
    assert parts["embed_cosine"].item() == pytest.approx(term("embed_cosine")(sub).item(), rel=1e-6)
    assert total.item() == pytest.approx(direct.item() + 2 * parts["embed_cosine"].item(), rel=1e-6)


# ---------------------------------------------------------------- `#k` capture on a real BertModel


class TinyEncoder(nn.Module):
    """A transformers BertModel under ``.bert`` (as the registry's text models wrap it); output =
    mean over real tokens, L2-normalised."""

    def __init__(self, hidden: int, layers: int, heads: int, attn: str = "eager") -> None:
        super().__init__()
        torch.manual_seed(hidden * 10 + layers)
        self.bert = BertModel(BertConfig(
            vocab_size=40, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=2 * hidden, max_position_embeddings=16, attn_implementation=attn,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        real = ids != 0
        h = self.bert(input_ids=ids, attention_mask=real.long()).last_hidden_state
        pooled = (h * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp(min=1)
        return nn.functional.normalize(pooled, dim=-1)


IDS = torch.tensor([[5, 6, 7, 8, 0], [9, 10, 0, 0, 0], [11, 12, 13, 0, 0]])


def test_split_path() -> None:
    assert split_path("bert.encoder.layer.0.attention.self#1") == ("bert.encoder.layer.0.attention.self", 1)
    assert split_path("layer3") == ("layer3", None)
    with pytest.raises(InputError, match=r"^feature path 'a#x': what follows '#' must be an element"):
        split_path("a#x")


def test_capture_element_1_is_attention_probabilities_with_eager() -> None:
    model = TinyEncoder(16, 2, 4).eval()
    path = "bert.encoder.layer.1.attention.self#1"
    check_paths(model, [path, "bert.encoder.layer.1"])
    with FeatureCapture(model, [path, "bert.encoder.layer.1.attention.self"]) as cap:
        model(IDS)
    probs = cap.features[path]
    assert probs.shape == (3, 4, 5, 5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 4, 5))
    assert probs[1, :, :, 2:].abs().max() < 1e-6  # padded keys get no attention
    assert cap.features["bert.encoder.layer.1.attention.self"].shape == (3, 5, 16)  # element 0
    shapes = feature_shapes(model, [path], IDS)
    assert shapes == {path: torch.Size([3, 4, 5, 5])}


def test_capture_element_errors() -> None:
    sdpa = TinyEncoder(16, 2, 4, attn="sdpa")
    path = "bert.encoder.layer.0.attention.self#1"
    with pytest.raises(InputError, match=r"^feature path '.*self#1' of the teacher model: element 1 "
                                         r"of the module's output is None \(.*attn: eager\)$"):
        feature_shapes(sdpa, [path], IDS, role="teacher")
    eager = TinyEncoder(16, 2, 4)
    with pytest.raises(InputError, match=r"^feature path '.*self#5': the module's output has no "
                                         r"element 5 \(it returned 2 elements\)$"):
        feature_shapes(eager, ["bert.encoder.layer.0.attention.self#5"], IDS)
    with pytest.raises(InputError, match=r"no element 0 \(it returned a Tensor\)"):
        feature_shapes(eager, ["bert.encoder.layer.0#0"], IDS)
    with pytest.raises(InputError, match=r"^feature path 'bert.encoder.layer.7.attention.self#1' not "
                                         r"found in student model"):
        check_paths(eager, ["bert.encoder.layer.7.attention.self#1"])


def test_hidden_and_attention_terms_on_real_tiny_berts() -> None:
    """Student (2 layers, width 16, 2 heads) from teacher (4 layers, width 24, 4 heads):
    adapters sized by the dry run, finite losses, gradients reach student and adapters;
    a student identical to the teacher gives 0."""
    student, teacher = TinyEncoder(16, 2, 2).train(), TinyEncoder(24, 4, 4).eval()
    s_paths = ["bert.encoder.layer.0", "bert.encoder.layer.1.attention.self#1"]
    t_paths = ["bert.encoder.layer.1", "bert.encoder.layer.3.attention.self#1"]
    c = ctx(num_classes=16, student=student, teachers=[teacher],
            student_shapes=feature_shapes(student, s_paths, IDS),
            teacher_shapes=feature_shapes(teacher, t_paths, IDS, "teacher"))
    terms = [{"name": "hidden_mse", "student": s_paths[:1], "teacher": t_paths[:1]},
             {"name": "attention_kl", "student": s_paths[1:], "teacher": t_paths[1:]},
             {"name": "embed_relational"}]
    comp = build_composite(terms, 0.0, c)
    with FeatureCapture(student, s_paths) as s_cap, FeatureCapture(teacher, t_paths) as t_cap:
        with torch.no_grad():
            t_emb = teacher(IDS)
        s_emb = student(IDS)
        b = DistillBatch(s_emb, torch.full((3,), -1), [t_emb], dict(s_cap.features),
                         dict(t_cap.features), token_mask=IDS != 0)
        total, parts = comp(b)
    assert set(parts) == {"hidden_mse", "attention_kl", "embed_relational"}
    assert all(torch.isfinite(v) and v > 0 for v in parts.values())
    total.backward()
    adapter = comp.terms[0].adapters[0]
    assert isinstance(adapter, nn.Linear) and adapter.weight.grad.abs().sum() > 0
    q = student.bert.encoder.layer[1].attention.self.query.weight
    assert q.grad is not None and q.grad.abs().sum() > 0  # attention_kl reaches the student

    twin = TinyEncoder(24, 4, 4).eval()
    twin.load_state_dict(teacher.state_dict())
    same = build_composite([{"name": "hidden_mse", "student": t_paths[:1], "teacher": t_paths[:1]},
                            {"name": "attention_kl", "student": t_paths[1:], "teacher": t_paths[1:]},
                            {"name": "embed_mse"}], 0.0,
                           ctx(student_shapes=c.teacher_shapes, teacher_shapes=c.teacher_shapes))
    with FeatureCapture(twin, t_paths) as s_cap, FeatureCapture(teacher, t_paths) as t_cap:
        b = DistillBatch(twin(IDS), torch.full((3,), -1), [teacher(IDS)], dict(s_cap.features),
                         dict(t_cap.features), token_mask=IDS != 0)
        _, parts = same(b)
    assert all(v.item() == pytest.approx(0.0, abs=1e-6) for v in parts.values())


def test_attention_kl_checks_dry_run_shapes_at_build_time() -> None:
    c = ctx(student_shapes={"s#0": torch.Size([2, 5, 16])}, teacher_shapes={"t#1": (2, 4, 5, 5)})
    with pytest.raises(InputError, match=r"\(attention_kl\): attention_kl: student capture at 's#0' "
                                         r"has shape \[2, 5, 16\], not attention probabilities"):
        build_composite([{"name": "attention_kl", "student": "s#0", "teacher": "t#1"}], 0.0, c)
