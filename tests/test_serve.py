"""`kd serve` against real parts: an ``mlflow server`` on SQLite (webhooks need a SQL
store), Ray Serve in the session's Ray (two Model replicas with 0 CPUs, HTTP on a free port), and a
digits student registered twice (versions 1 and 2 of ``kd-serve``). One application is
shared by the module's tests, which run in order: serve -> bad requests -> promotion and
rollback by polling -> a webhook-driven swap -> registry stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import CONFIGS, REPO, free_port, launch_mlflow_server

pytestmark = pytest.mark.slow

NAME, APP = "kd-serve", "kd-serve-test"
POLL_S = 8.0  # long enough that a webhook-driven swap is not a poll's doing
SECRET_ENV, SECRET = "KD_SERVE_TEST_WEBHOOK_SECRET", "s3cret-for-tests"
DIGITS = [f"digit-{i}" for i in range(10)]
REPLICAS = 2  # every replica must swap


def http(url: str, body: object = None, raw: bytes | None = None,
         timeout: float = 60) -> tuple[int, dict]:
    """(status, JSON body) of a GET (no body) or POST."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """An ``mlflow server`` on SQLite with local proxied artifacts that may send webhooks
    to loopback over http (MLflow allows only https and public IPs by default) and
    re-reads its webhook list every second."""
    d = tmp_path_factory.mktemp("serve-registry")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "http,https")
        mp.setenv("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", "true")
        mp.setenv("MLFLOW_WEBHOOK_CACHE_TTL", "1")  # the server caches webhook lists (60 s)
        proc, url = launch_mlflow_server(f"sqlite:///{d / 'mlflow.db'}", str(d / "artifacts"),
                                         d / "server.log")
        mp.setenv("MLFLOW_TRACKING_URI", url)
        try:
            yield SimpleNamespace(url=url, proc=proc, dir=d)
        finally:
            proc.terminate()
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def versions(registry: SimpleNamespace, ray_session: None) -> SimpleNamespace:
    """A 1-epoch MLP teacher and student on digits (with class names) registered twice;
    ``champion`` -> version 1."""
    from kd.config import load_experiment
    from kd.registry.register import register_run
    from kd.registry.store import registry_client
    from kd.train.run import train_run

    d = registry.dir
    common = ["scaling.num_workers=0", "trainer.epochs=1", f"storage.path={d / 'runs'}",
              "teacher.model=mlp", "teacher.args={hidden: [32]}"]
    teacher = train_run(load_experiment(CONFIGS / "digits-teacher.yaml", common), "teacher")
    exp = load_experiment(CONFIGS / "digits-kd.yaml",
                          [*common, f"teacher.weights={teacher.weights}",
                           f"data.class_names=[{', '.join(DIGITS)}]"])
    run_id = train_run(exp, "student").run_id
    assert register_run(run_id, NAME, exp) == (NAME, "1")
    assert register_run(run_id, NAME, exp) == (NAME, "2")
    c = registry_client(registry.url)
    c.set_registered_model_alias(NAME, "champion", "1")
    from sklearn.datasets import load_digits

    x = (load_digits().images[:5] / 16.0).reshape(5, 64)
    return SimpleNamespace(client=c, x=x.tolist())


@pytest.fixture(scope="module")
def app(versions: SimpleNamespace, registry: SimpleNamespace) -> Iterator[SimpleNamespace]:
    """The application on a free HTTP port, deleted (and Serve shut down) at the end."""
    from ray import serve

    from kd.serve.run import deploy

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"name": NAME, "poll_interval_s": POLL_S, "tracking_uri": registry.url,
            "num_cpus": 0, "webhook_secret_env": SECRET_ENV, "max_batch_size": 8,
            "num_replicas": REPLICAS}
    version = deploy(APP, args, route_prefix="/", runtime_env={"env_vars": {SECRET_ENV: SECRET}})
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", version=version, port=port)
    finally:
        serve.delete(APP)
        serve.shutdown()


def replicas(n: int = REPLICAS) -> dict[int, dict]:
    """Every Model replica's version, pid and swap count, by pid (asked until ``n`` seen)."""
    from ray import serve

    h = serve.get_deployment_handle("Model", app_name=APP)
    seen: dict[int, dict] = {}
    for _ in range(200):
        info = h.info.remote().result(timeout_s=60)
        seen[info["pid"]] = info
        if len(seen) == n:
            return seen
    raise AssertionError(f"only {len(seen)} of {n} replicas answered")


def wait_all(version: str, timeout: float = 60) -> dict[int, dict]:
    """Every replica by pid, once all serve ``version``."""
    deadline = time.time() + timeout
    while True:
        got = replicas()
        if {i["version"] for i in got.values()} == {version}:
            return got
        assert time.time() < deadline, got
        time.sleep(0.3)


def wait_version(url: str, x: list, version: str, timeout: float) -> float:
    """Seconds until /predict answers with ``version``; every answer on the way is a 200."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        code, out = http(url + "/predict", {"inputs": x})
        assert code == 200, out
        if out["version"] == version:
            return time.time() - t0
        time.sleep(0.2)
    raise AssertionError(f"still not version {version} after {timeout} s: {out}")


def test_cli_unknown_model_or_alias_is_one_line(versions: SimpleNamespace) -> None:
    """`kd serve` checks the alias before it starts Ray or Serve: exit 2, one line."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args, expect in ((["no-such-model"], "no registered model named 'no-such-model'"),
                         ([NAME, "--alias", "nightly"], "alias 'nightly' is not set")):
        out = subprocess.run([sys.executable, "-m", "kd.cli", "serve", *args, "--port",
                              str(free_port())], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 2, out.stderr[-2000:]
        assert out.stderr.strip().count("\n") == 0 and expect in out.stderr


def test_predict_and_health(app: SimpleNamespace, versions: SimpleNamespace) -> None:
    assert app.version == "1"
    code, out = http(app.url + "/predict", {"inputs": versions.x})
    assert code == 200, out
    assert out["model"] == NAME and out["version"] == "1"
    assert len(out["predictions"]) == 5 and all(isinstance(p, int) for p in out["predictions"])
    assert out["labels"] == [DIGITS[p] for p in out["predictions"]]
    probs = np.asarray(out["probabilities"])
    assert probs.shape == (5, 10) and np.allclose(probs.sum(1), 1, atol=1e-4)
    nested = (np.asarray(versions.x).reshape(5, 1, 8, 8)).tolist()  # the model's input shape
    assert http(app.url + "/predict", {"inputs": nested})[1]["predictions"] == out["predictions"]
    code, health = http(app.url + "/health")
    assert code == 200
    assert health["model"] == NAME and health["alias"] == "champion"
    assert health["version"] == "1" and health["registry"] == "ok"
    assert health["precision"] == "fp32"
    assert abs(health["checked_at"] - time.time()) < 60


@pytest.mark.parametrize(("body", "status", "reason"), [
    (b"{not json", 400, "not JSON"),
    (b'{"rows": [[1, 2]]}', 400, '"inputs"'),
    (b'{"inputs": [[1, 2, 3]]}', 422, "64 numbers"),
    (b'{"inputs": [["a", "b"]]}', 422, "string"),
    (b'{"inputs": [[1, 2], [1]]}', 422, "same shape"),
    (json.dumps({"inputs": [[0.0] * 64] * 4097}).encode(), 413, "4096"),
])
def test_bad_requests(app: SimpleNamespace, body: bytes, status: int, reason: str) -> None:
    code, out = http(app.url + "/predict", raw=body)
    assert code == status, out
    assert set(out) == {"error"} and reason in out["error"] and "\n" not in out["error"]


def test_bf16_app_beside_the_fp32_one(app: SimpleNamespace, versions: SimpleNamespace,
                                      registry: SimpleNamespace) -> None:
    """``precision: bf16`` (``kd serve --precision bf16``): a second application on
    ``/bf16`` serves the same version with bf16 weights; its probabilities are float32,
    close to the fp32 app's but not equal, with the same classes; /health says bf16. A bad
    precision is one line before anything is deployed."""
    from ray import serve

    from kd.errors import InputError
    from kd.serve.run import deploy

    with pytest.raises(InputError, match="precision must be one of fp32, bf16; got 'fp16'"):
        deploy("kd-serve-bad", {"name": NAME, "tracking_uri": registry.url, "precision": "fp16"})
    assert deploy("kd-serve-bf16", {"name": NAME, "tracking_uri": registry.url, "num_cpus": 0,
                                    "precision": "bf16"}, route_prefix="/bf16") == "1"
    try:
        code, b = http(app.url + "/bf16/predict", {"inputs": versions.x})
        assert code == 200, b
        f = http(app.url + "/predict", {"inputs": versions.x})[1]
        assert b["version"] == f["version"] == "1" and b["predictions"] == f["predictions"]
        pb, pf = np.asarray(b["probabilities"]), np.asarray(f["probabilities"])
        assert np.abs(pb - pf).max() < 0.02 and not np.allclose(pb, pf, atol=1e-6)
        assert http(app.url + "/bf16/health")[1]["precision"] == "bf16"
    finally:
        serve.delete("kd-serve-bf16")


class Load:
    """Clients posting /predict in a loop on threads; counts answers and failures."""

    def __init__(self, url: str, x: list, clients: int = 3) -> None:
        self.url, self.x, self.ok, self.failed = url, x, 0, []
        self.seen: set[str] = set()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                code, out = http(self.url + "/predict", {"inputs": self.x[:2]})
            except Exception as e:  # a dropped connection counts as a failure too
                code, out = -1, {"error": repr(e)}
            if code == 200:
                self.ok += 1
                self.seen.add(out["version"])
            else:
                self.failed.append((code, out))

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def test_promotion_and_rollback_swap_in_place(app: SimpleNamespace,
                                              versions: SimpleNamespace) -> None:
    before = wait_all("1")
    c, x = versions.client, versions.x
    load = Load(app.url, x)
    c.set_registered_model_alias(NAME, "champion", "2")
    took = wait_version(app.url, x, "2", POLL_S + 30)
    wait_all("2")
    print(f"promotion visible after {took:.1f} s (poll interval {POLL_S} s)")
    assert http(app.url + "/health")[1]["version"] == "2"
    c.set_registered_model_alias(NAME, "champion", "1")  # rollback
    took = wait_version(app.url, x, "1", POLL_S + 30)
    after = wait_all("1")
    print(f"rollback visible after {took:.1f} s")
    load.close()
    assert load.failed == [] and load.ok > 0 and load.seen == {"1", "2"}
    print(f"{load.ok} requests from 3 clients across the two swaps, 0 failed")
    assert set(after) == set(before), "a replica was restarted"
    assert all(after[p]["swaps"] == before[p]["swaps"] + 2 for p in after)
    c.delete_registered_model_alias(NAME, "champion")  # deleted: v1 keeps serving
    deadline = time.time() + POLL_S + 30
    while "not set" not in (h := http(app.url + "/health")[1])["registry"]:
        assert time.time() < deadline, h
        time.sleep(0.5)
    assert h["version"] == "1" and http(app.url + "/predict", {"inputs": x})[0] == 200
    c.set_registered_model_alias(NAME, "champion", "2")  # then set again
    wait_version(app.url, x, "2", POLL_S + 30)
    assert set(wait_all("2")) == set(before)


def test_webhook_from_mlflow_triggers_swap(app: SimpleNamespace,
                                           versions: SimpleNamespace) -> None:
    from kd.serve.webhook import signature

    c, x = versions.client, versions.x
    c.create_webhook("kd-serve-test", f"{app.url}/webhook", secret=SECRET,
                     events=["model_version_alias.created", "model_version_alias.deleted"])
    # unsigned or badly signed deliveries are refused
    assert http(app.url + "/webhook", {"entity": "model_version_alias"})[0] == 401
    bad = urllib.request.Request(app.url + "/webhook", data=b"{}", headers={
        "X-MLflow-Signature": signature("wrong", "d", str(int(time.time())), "{}"),
        "X-MLflow-Timestamp": str(int(time.time())), "X-MLflow-Delivery-Id": "d"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(bad, timeout=30)
    assert e.value.code == 401
    time.sleep(1.5)  # the server's webhook list cache (1 s here) has seen the new webhook
    current = http(app.url + "/health")[1]["version"]
    target = "1" if current == "2" else "2"
    while time.time() - http(app.url + "/health")[1]["checked_at"] > 1.0:  # just after a poll
        time.sleep(0.2)
    polled_at = http(app.url + "/health")[1]["checked_at"]
    c.set_registered_model_alias(NAME, "champion", target)
    wait_version(app.url, x, target, POLL_S + 30)
    wait_all(target)
    assert time.time() < polled_at + POLL_S, "the swap came from a poll, not the webhook"


def test_registry_down_keeps_serving(app: SimpleNamespace, versions: SimpleNamespace,
                                     registry: SimpleNamespace) -> None:
    serving = http(app.url + "/health")[1]["version"]
    wait_all(serving)
    registry.proc.terminate()
    registry.proc.wait(timeout=15)
    deadline = time.time() + POLL_S + 60
    while (h := http(app.url + "/health")[1])["registry"] == "ok":
        assert time.time() < deadline, h
        time.sleep(0.5)
    assert "unreachable" in h["registry"] and "\n" not in h["registry"]
    assert h["version"] == serving
    code, out = http(app.url + "/predict", {"inputs": versions.x})
    assert code == 200 and out["version"] == serving
