"""Model registry against real servers: an ``mlflow server`` (SQLite, artifacts proxied to
moto's S3 server) and the same flow on PostgreSQL. One teacher + student pair is trained
once per module (``scaling.num_workers=0``, 2 epochs) and registered as needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import CONFIGS, REPO, counting, free_port, launch_mlflow_server

from kd.cli import run as kd_run
from kd.config import load_experiment
from kd.registry.promote import HISTORY_TAG, LOCK_SUFFIX, LOG_TAG, gate_check
from kd.registry.register import LINEAGE_KEYS, register_outcome, register_run

pytestmark = pytest.mark.slow

GATE = ["registry.gate.min_accuracy=0.05", "registry.gate.max_accuracy_drop=0.5",
        "registry.gate.min_teacher_agreement=0.05", "registry.gate.max_params=100000",
        "registry.gate.max_latency_ms=1000"]
CONSUMER = r"""
import json, sys
import mlflow, numpy as np, torch
uri, npy = sys.argv[1], sys.argv[2]
x = np.load(npy)
probs = mlflow.pyfunc.load_model(uri).predict(x)
net = mlflow.pytorch.load_model(uri)
with torch.no_grad():
    q = net(torch.as_tensor(x).reshape(len(x), 1, 8, 8)).softmax(-1).numpy()
print(json.dumps({"probs": probs.tolist(), "torch": q.tolist(),
                  "is_module": isinstance(net, torch.nn.Module),
                  "loader_file": sys.modules["kdflow_model_loader"].__file__,
                  "kd_imported": "kd" in sys.modules}))
"""


def train_pair(d: Path, teacher_weights: str | None = None, epochs: int = 2) -> SimpleNamespace:
    """Train (or reuse) a tiny MLP teacher and distil an MLP student; returns paths and ids."""
    from kd.train.run import train_run

    common = ["scaling.num_workers=0", f"trainer.epochs={epochs}", "checkpoint.every_epochs=1",
              f"storage.path={d / 'runs'}", "teacher.model=mlp", "teacher.args={hidden: [64]}"]
    if teacher_weights is None:
        t = train_run(load_experiment(CONFIGS / "digits-teacher.yaml", common), "teacher")
        teacher_weights = t.weights
    exp = load_experiment(CONFIGS / "digits-kd.yaml",
                          [*common, f"teacher.weights={teacher_weights}", *GATE])
    out = train_run(exp, "student")
    cfg = d / "kd.yaml"
    cfg.write_text(exp.to_yaml())
    return SimpleNamespace(exp=exp, outcome=out, run_id=out.run_id, config=str(cfg),
                           teacher=teacher_weights, dir=d)


def client():  # noqa: ANN201
    from kd.registry.store import registry_client

    return registry_client()


def kd_proc(*args: str, **kw) -> subprocess.Popen:  # noqa: ANN003
    """`python -m kd.cli ARGS` in a child process (this worktree first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "kd.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def consume(uri: str, x: np.ndarray, tmp: Path) -> dict:
    """Load ``uri`` in a fresh process that imports only mlflow, torch and numpy."""
    np.save(tmp / "x.npy", x)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", CONSUMER, uri, str(tmp / "x.npy")], cwd=tmp,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tracking: str, ray_session: None,
            tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return train_pair(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="module")
def holdout(trained: SimpleNamespace) -> np.ndarray:
    from kd.data import load_splits

    return load_splits(trained.exp.data).holdout.sample(16).x.reshape(16, -1).astype(np.float32)


@pytest.fixture(scope="module")
def champion(trained: SimpleNamespace) -> str:
    """Model ``kd-main``: version 1 registered and promoted through the CLI."""
    name, version = register_run(trained.run_id, "kd-main")
    assert (name, version) == ("kd-main", "1")
    assert kd_run(["promote", "kd-main", trained.config]) == 0
    return name


def test_gate_check_thresholds() -> None:
    from kd.config import GateConfig
    from kd.errors import InputError

    gate = GateConfig(min_accuracy=0.5, max_accuracy_drop=0.01, max_params=100)
    new = {"accuracy": 0.6, "params": 50.0}
    assert gate_check(gate, new, None)[0]  # first version: absolute thresholds only
    assert gate_check(gate, new, {"accuracy": 0.605})[0]
    ok, why = gate_check(gate, new, {"accuracy": 0.7})
    assert not ok and any("fails >= champion 0.7" in r for r in why)
    ok, why = gate_check(GateConfig(min_teacher_agreement=0.9), new, None)
    assert not ok and "teacher_agreement unavailable" in why[0]
    with pytest.raises(InputError, match="registry.gate names no criterion"):
        gate_check(GateConfig(), new, None)  # an empty gate is refused, never a pass


def test_cli_registry_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kd.cli import build_parser

    args = build_parser().parse_args(["distill", "c.yaml", "--register"])
    assert args.register and args.command == "distill"
    args = build_parser().parse_args(["promote", "m", "c.yaml", "a.b=1", "--version", "3"])
    assert (args.name, args.config, args.overrides, args.version) == ("m", "c.yaml", ["a.b=1"], "3")
    assert build_parser().parse_args(["promote", "m", "--rollback"]).rollback
    cfg = tmp_path / "c.yaml"
    cfg.write_text((CONFIGS / "digits-kd.yaml").read_text())
    assert kd_run(["distill", str(cfg), "registry.model_name=null", "--register"]) == 2
    assert "registry.model_name: required by --register" in capsys.readouterr().err
    assert kd_run(["predict", "runs:/abc/model", "--input", "x.npz"]) == 2


def test_register_promote_and_consume(trained: SimpleNamespace, champion: str,
                                      holdout: np.ndarray, tmp_path: Path) -> None:
    import mlflow

    c = client()
    mv = c.get_model_version_by_alias(champion, "champion")
    assert mv.version == "1"
    for key in LINEAGE_KEYS:
        assert mv.tags.get(key), f"lineage tag {key} missing"
    assert mv.tags["kd.weights_sha256"] == trained.outcome.weights_sha256
    assert mv.tags["kd.source_run_id"] == trained.run_id
    assert mv.tags["kd.teacher_uri"] == trained.teacher
    assert mv.tags["kd.gate.decision"] == "promoted"
    assert json.loads(c.get_registered_model(champion).tags[HISTORY_TAG]) == ["1"]
    with pytest.raises(Exception, match="alias"):  # promotion consumed the challenger alias
        c.get_model_version_by_alias(champion, "challenger")

    card = Path(mlflow.artifacts.download_artifacts(f"models:/{champion}/1/model_card.md",
                                                    dst_path=str(tmp_path))).read_text()
    assert "| accuracy |" in card and trained.outcome.weights_sha256 in card
    assert "teacher" in card and '"temperature": 4.0' in card
    assert "![plots/curves.png](plots/curves.png)" in card

    got = consume(f"models:/{champion}@champion", holdout, tmp_path)
    from kd.train.run import model_from_weights

    model, _ = model_from_weights(trained.outcome.weights)
    import torch

    with torch.no_grad():
        want = model(torch.as_tensor(holdout).reshape(-1, 1, 8, 8)).softmax(-1).numpy()
    probs = np.array(got["probs"])
    assert probs.shape == (16, 10)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, want, atol=1e-5)
    np.testing.assert_allclose(np.array(got["torch"]), want, atol=1e-5)
    assert got["is_module"]
    # the loader came with the model, under its own name: no `kd` package shadows kdflow
    assert "/code/kdflow_model_loader/" in got["loader_file"] and not got["kd_imported"]

    import pandas as pd

    pyfunc = mlflow.pyfunc.load_model(f"models:/{champion}@champion")
    df_probs = pyfunc.predict(pd.DataFrame(holdout))
    np.testing.assert_allclose(df_probs, want, atol=1e-5)


def test_predict_cli_formats(champion: str, holdout: np.ndarray, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    import pandas as pd

    np.savez(tmp_path / "in.npz", x=holdout)
    pd.DataFrame(holdout).rename(columns=str).to_csv(tmp_path / "in.csv", index=False)
    pd.DataFrame({"x": list(holdout)}).to_parquet(tmp_path / "in.parquet")
    uri = f"models:/{champion}@champion"
    assert kd_run(["predict", uri, "--input", str(tmp_path / "in.npz"),
                   "--output", str(tmp_path / "out.npz")]) == 0
    ref = np.load(tmp_path / "out.npz")["probs"]
    assert ref.shape == (16, 10)
    assert kd_run(["predict", uri, "--input", str(tmp_path / "in.csv"),
                   "--output", str(tmp_path / "out.csv")]) == 0
    out = pd.read_csv(tmp_path / "out.csv")
    np.testing.assert_allclose(out[[f"p{i}" for i in range(10)]].to_numpy(), ref, atol=1e-5)
    assert (out["pred"].to_numpy() == ref.argmax(1)).all()
    capsys.readouterr()
    assert kd_run(["predict", uri, "--input", str(tmp_path / "in.parquet")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "row\tpred\tprob" and len(lines) == 17
    assert kd_run(["predict", uri, "--input", str(tmp_path / "x.txt")]) == 2
    assert kd_run(["predict", uri, "--input", str(tmp_path / "in.npz"),
                   "--output", str(tmp_path / "o.json")]) == 2


def test_gate_rejects_and_tags_both_versions(trained: SimpleNamespace,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    name = "kd-gate"
    register_run(trained.run_id, name)
    assert kd_run(["promote", name, trained.config]) == 0  # first version: absolute thresholds
    register_run(trained.run_id, name)
    capsys.readouterr()
    assert kd_run(["promote", name, trained.config, "registry.gate.min_accuracy=0.99"]) == 3
    out = capsys.readouterr()
    assert "REJECTED v2" in out.out and "champion v1" in out.out
    assert "gate rejected" in out.err and "fails >= 0.99" in out.err
    c = client()
    assert c.get_model_version_by_alias(name, "champion").version == "1"
    assert c.get_model_version_by_alias(name, "challenger").version == "2"
    for v in ("1", "2"):
        tags = c.get_model_version(name, v).tags
        assert tags["kd.gate.decision"] == "rejected"
        assert "fails >= 0.99" in tags["kd.gate.reason"]
        assert json.loads(tags["kd.gate.champion_metrics"])["accuracy"] > 0
        assert json.loads(tags["kd.gate.challenger_metrics"])["params"] > 0


def test_concurrent_promoters_and_rollback(trained: SimpleNamespace,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    name = "kd-race"
    for _ in range(3):
        register_run(trained.run_id, name)
    assert kd_run(["promote", name, trained.config, "--version", "1"]) == 0
    procs = [kd_proc("promote", name, trained.config, "--version", v) for v in ("2", "3")]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-2000:]
    c = client()
    model = c.get_registered_model(name)
    history = json.loads(model.tags[HISTORY_TAG])
    champ = c.get_model_version_by_alias(name, "champion").version
    assert history[0] == "1" and sorted(history[1:]) == ["2", "3"] and history[-1] == champ
    log = json.loads(model.tags[LOG_TAG])
    assert [e["to"] for e in log] == history
    assert [e["from"] for e in log] == [None, *history[:-1]]  # each move saw the one before
    with pytest.raises(Exception, match="not found|does not exist"):
        c.get_registered_model(name + LOCK_SUFFIX)  # the lock was released

    assert kd_run(["promote", name, "--rollback"]) == 0
    assert c.get_model_version_by_alias(name, "champion").version == history[1]
    assert c.get_model_version(name, history[2]).tags.get("kd.rolled_back_at")
    assert kd_run(["promote", name, "--rollback"]) == 0
    assert c.get_model_version_by_alias(name, "champion").version == "1"
    capsys.readouterr()
    assert kd_run(["promote", name, "--rollback"]) == 2
    assert "no previous champion" in capsys.readouterr().err
    assert json.loads(c.get_registered_model(name).tags[HISTORY_TAG]) == ["1"]


def test_faults_unknown_deleted_and_tampered(trained: SimpleNamespace, s3_server: str,
                                             tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import boto3
    import mlflow

    x = str(tmp_path / "in.npz")
    np.savez(x, x=np.zeros((2, 64), np.float32))
    assert kd_run(["promote", "no-such-model"]) == 2
    assert "no registered model named 'no-such-model'" in capsys.readouterr().err
    assert kd_run(["predict", "models:/no-such-model@champion", "--input", x]) == 2
    assert "no registered model named 'no-such-model'" in capsys.readouterr().err

    name = "kd-faults"
    register_run(trained.run_id, name)  # v1: challenger, then deleted
    register_run(trained.run_id, name)  # v2: tampered
    c = client()
    c.set_registered_model_alias(name, "challenger", "1")
    c.set_registered_model_alias(name, "champion", "2")
    c.delete_model_version(name, "1")
    capsys.readouterr()
    assert kd_run(["predict", f"models:/{name}@challenger", "--input", x]) == 2
    assert "not set or points at a deleted version" in capsys.readouterr().err
    assert kd_run(["promote", name]) == 2
    assert "no version has the alias 'challenger'" in capsys.readouterr().err

    s3 = boto3.client("s3", endpoint_url=s3_server)
    mv = c.get_model_version(name, "2")
    model_id = mv.model_id or next(p for p in mv.source.split("/") if p.startswith("m-"))
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow-artifacts")["Contents"]
            if model_id in o["Key"] and o["Key"].endswith("student/model.safetensors")]
    assert len(keys) == 1
    blob = bytearray(s3.get_object(Bucket="mlflow-artifacts", Key=keys[0])["Body"].read())
    blob[-1] ^= 0xFF
    s3.put_object(Bucket="mlflow-artifacts", Key=keys[0], Body=bytes(blob))
    assert kd_run(["predict", f"models:/{name}@champion", "--input", x]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert kd_run(["evaluate", f"models:/{name}/2"]) == 2  # every kdflow load verifies
    with pytest.raises(Exception, match="sha256"):  # and so does the shipped pyfunc loader
        mlflow.pyfunc.load_model(f"models:/{name}/2")


def test_server_down_bounded_and_record_kept(trained: SimpleNamespace, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    t0 = time.time()
    assert kd_run(["promote", "kd-main"]) == 2
    err = capsys.readouterr().err
    assert "unreachable after 3 retries" in err, err
    assert time.time() - t0 < 60
    from kd.errors import InputError

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the bound was shown above
    with pytest.raises(InputError, match="retry with: kd register"):
        register_outcome(trained.run_id, trained.outcome.weights,
                         trained.outcome.weights_sha256, trained.exp, tmp_path)
    record = json.loads((tmp_path / "registration.json").read_text())
    assert record["run_id"] == trained.run_id and record["status"] == "pending"


@pytest.fixture(scope="module")
def postgres_uri() -> str:
    """Base URI of a PostgreSQL server: $KD_TEST_POSTGRES_URI, else .ci/postgres.sh starts one."""
    if os.environ.get("KD_TEST_POSTGRES_URI"):
        return os.environ["KD_TEST_POSTGRES_URI"]
    try:
        out = subprocess.run(["bash", str(REPO / ".ci" / "postgres.sh")], capture_output=True,
                             text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"no PostgreSQL server could be started: {e}")
    if out.returncode != 0:
        pytest.skip(f"no PostgreSQL server could be started (.ci/postgres.sh exit "
                    f"{out.returncode}): {out.stderr.strip()[-500:]}")
    return out.stdout.strip().splitlines()[-1]


def test_postgres_backend_flow(postgres_uri: str, trained: SimpleNamespace, s3_server: str,
                               holdout: np.ndarray, tmp_path: Path) -> None:
    import psycopg2

    db = f"kd_test_{os.getpid()}_{int(time.time())}"
    conn = psycopg2.connect(postgres_uri + "/postgres")
    conn.autocommit = True
    conn.cursor().execute(f"CREATE DATABASE {db}")
    backend = postgres_uri.replace("postgresql://", "postgresql+psycopg2://", 1)
    proc, url = launch_mlflow_server(f"{backend}/{db}", "s3://mlflow-artifacts/pg",
                                     tmp_path / "pg-server.log", s3_server)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", url)
            pair = train_pair(tmp_path, teacher_weights=trained.teacher, epochs=1)
            pair.exp.registry.model_name = "kd-pg"
            assert register_outcome(pair.run_id, pair.outcome.weights, pair.outcome.weights_sha256,
                                    pair.exp, tmp_path) == ("kd-pg", "1")
            record = json.loads((tmp_path / "registration.json").read_text())
            assert record["status"] == "registered" and record["version"] == "1"
            assert kd_run(["promote", "kd-pg", pair.config]) == 0
            got = consume("models:/kd-pg@champion", holdout, tmp_path)
        np.testing.assert_allclose(np.array(got["probs"]).sum(1), 1.0, atol=1e-5)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        conn.cursor().execute(f"DROP DATABASE IF EXISTS {db}")
        conn.close()


@pytest.mark.usefixtures("ray_session")
def test_classifiers_scored_together_share_one_teacher_pass() -> None:
    """`evaluate_split_many` (the gate's and the retrain's challenger + champion): the
    teacher sees each holdout batch once for both students, and each student gets the
    metrics and confusion matrix `evaluate_with_confusion` gives it alone."""
    import torch

    from kd.models import build_model
    from kd.train.evaluate import evaluate_split_many, evaluate_with_confusion
    from kd.train.text import run_splits

    holdout = run_splits(load_experiment(CONFIGS / "digits-kd.yaml")).holdout
    torch.manual_seed(0)
    teacher = counting(build_model("cnn_small", {}, (1, 8, 8), 10).eval())
    students = {k: build_model("mlp", {"hidden": [16]}, (1, 8, 8), 10).eval() for k in "ab"}
    alone = {k: evaluate_with_confusion(m, holdout, teacher) for k, m in students.items()}
    per_student, teacher.rows = teacher.rows / 2, 0
    together = evaluate_split_many(students, holdout, teacher)
    assert teacher.rows == per_student == len(holdout)
    for k in students:
        (m, conf), (m1, conf1) = together[k], alone[k]
        assert (conf == conf1).all() and conf.sum() == len(holdout)
        assert set(m) == set(m1) and "teacher_agreement" in m
        assert all(m[key] == pytest.approx(m1[key]) for key in set(m) - {"latency_ms"})
    assert together["a"][0]["accuracy"] != together["b"][0]["accuracy"]
