"""`kd serve` under load across a promotion and a rollback (a short `bench/serve_load.py`).

A real `mlflow server` (the session fixture), two students trained and registered through
kdflow (v1 champion; v2 differs from v1 on the probe row that starts every request), a
real `kd serve` child process with its own local Ray polling every `POLL_S` seconds, and
4 client threads. v2 is promoted, then rolled back, through kdflow's API while the
clients run. Asserted: no failed request at all; from one poll interval (+ `SLACK_S` for
the swap itself on a loaded 2-core machine) after each alias move until the next, every
response carries the new version (by the body's ``version`` and by the probe row's
prediction), and `/health` names the version served. No speed is asserted.
"""

from __future__ import annotations

import http.client
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _serve_load as sl  # noqa: E402

pytestmark = pytest.mark.slow

POLL_S = 2.0
SLACK_S = 8.0
CLIENTS = 4


def _health(url: str) -> dict:
    host, port = url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.request("GET", "/health")
    r = c.getresponse()
    assert r.status == 200
    return json.loads(r.read())


def _window(recs: list[sl.Rec], start: float, end: float) -> list[sl.Rec]:
    return [r for r in recs if start <= r.t + r.latency < end]


def test_kd_serve_follows_promotion_and_rollback_without_failures(
        mlflow_server: str, ray_session: None, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from kd.registry.promote import promote, rollback

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.chdir(tmp_path)
    m = sl.setup_models(tmp_path, "serve-swap", batch_rows=4)
    assert m.probe["1"] != m.probe["2"]
    proc, url = sl.start_kd_serve(m.name, POLL_S, mlflow_server, tmp_path / "kd-serve.log")
    watch = sl.AliasWatch(mlflow_server, m.name)
    try:
        assert _health(url)["version"] == "1"
        recs, (up, down) = sl.run_timeline(
            sl.Load(url, "/predict", m, CLIENTS), watch, 15.0,
            [(3.0, sl.Event("promote", "2"), lambda: promote(m.name, version="2")),
             (6.0, sl.Event("rollback", "1"), lambda: rollback(m.name))],
            settle=POLL_S + SLACK_S + 3.0)
        health = _health(url)
    finally:
        watch.close()
        sl.stop(proc)
    log = (tmp_path / "kd-serve.log").read_text()[-3000:]
    failed = [r for r in recs if r.status != 200]
    assert not failed, f"{len(failed)} of {len(recs)} failed, e.g. {failed[:3]}\n{log}"
    assert all(r.version == r.by_probe for r in recs), "body version != probe row's version"
    before = _window(recs, 0.0, up.moved)
    assert before and {r.served for r in before} == {"1"}
    after_up = _window(recs, up.moved + POLL_S + SLACK_S, down.moved)
    assert after_up, f"no responses between promotion + {POLL_S + SLACK_S}s and rollback"
    assert {r.served for r in after_up} == {"2"}, sl.convergence(recs, up, down.moved)
    after_down = _window(recs, down.moved + POLL_S + SLACK_S, float("inf"))
    assert after_down and {r.served for r in after_down} == {"1"}, \
        sl.convergence(recs, down, float("inf"))
    assert health["version"] == "1" and health["model"] == m.name
    assert health["alias"] == "champion" and health["registry"] == "ok"
