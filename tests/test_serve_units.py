"""The parts of `kd serve` that need no server: request rows, the answer, MLflow's webhook
signature (checked against MLflow's own signer) and the ``data.class_names`` field."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from conftest import CONFIGS

from kd.errors import InputError
from kd.serve.model import RequestError, parse_rows
from kd.serve.webhook import WebhookRejected, is_alias_event, verify


def test_parse_rows_shapes_and_dtypes() -> None:
    flat = [[float(i) for i in range(64)]] * 3
    assert parse_rows(flat, (1, 8, 8), False).shape == (3, 1, 8, 8)
    nested = np.zeros((2, 1, 8, 8)).tolist()
    assert parse_rows(nested, (1, 8, 8), False).dtype == np.float32
    assert parse_rows([[1, 2, 3]], (3,), True).dtype == np.int64
    cases = [({"a": 1}, 422, "list of rows"), ([], 422, "no rows"),
             ([[0.0] * 64] * 5, 413, "limit of 4"), ([[1, 2]], 422, "64 numbers"),
             ([["x"] * 64], 422, "string"), ([[True] * 64], 422, "boolean"),
             ([[1.0] * 64, [1.0]], 422, "same shape"), ([[float("nan")] * 64], 422, "finite")]
    for rows, status, reason in cases:
        with pytest.raises(RequestError) as e:
            parse_rows(rows, (1, 8, 8), False, max_rows=4)
        assert e.value.status == status and reason in e.value.reason, (rows, e.value.reason)
    with pytest.raises(RequestError, match="integers"):
        parse_rows([[1.5, 2, 3]], (3,), True)


def test_webhook_signature_matches_mlflow() -> None:
    from mlflow.webhooks.delivery import _generate_hmac_signature

    body = json.dumps({"entity": "model_version_alias", "action": "created",
                       "data": {"name": "m", "alias": "champion", "version": "3"}})
    ts = str(int(time.time()))
    headers = {"x-mlflow-signature": _generate_hmac_signature("k", "id-1", ts, body),
               "x-mlflow-timestamp": ts, "x-mlflow-delivery-id": "id-1"}
    payload = verify(headers, body.encode(), "k")
    assert is_alias_event(payload, "m", "champion")
    assert not is_alias_event(payload, "m", "staging") and not is_alias_event(payload, "n", "champion")
    for bad, reason in (({**headers, "x-mlflow-signature": "v1,AAAA"}, "does not match"),
                        ({k: v for k, v in headers.items() if k != "x-mlflow-timestamp"},
                         "missing")):
        with pytest.raises(WebhookRejected, match=reason):
            verify(bad, body.encode(), "k")
    with pytest.raises(WebhookRejected, match="old"):
        verify(headers, body.encode(), "k", now=time.time() + 3600)
    assert verify({}, body.encode(), None)["entity"] == "model_version_alias"  # no secret set
    with pytest.raises(WebhookRejected, match="not JSON"):
        verify({}, b"nope", None)


def test_class_names_field() -> None:
    from kd.config import load_experiment

    names = [f"c{i}" for i in range(10)]
    exp = load_experiment(CONFIGS / "digits-kd.yaml", [f"data.class_names=[{', '.join(names)}]"])
    assert exp.data.class_names == names
    plain = load_experiment(CONFIGS / "digits-kd.yaml")
    assert plain.data.class_names is None
    with pytest.raises(InputError, match="data.class_names"):
        load_experiment(CONFIGS / "digits-kd.yaml", ["data.class_names=[a, a]"])


def test_class_names_count_must_match() -> None:
    from kd.config import DataConfig
    from kd.data import class_names

    cfg = DataConfig(source="builtin:digits", class_names=["a", "b"])
    assert class_names(cfg, [], 2) == ["a", "b"]
    assert class_names(DataConfig(source="x/"), ["cat", "dog"], 2) == ["cat", "dog"]
    assert class_names(DataConfig(source="x/"), [], 10) == []
    assert class_names(DataConfig(source="x/"), ["cat", "dog"], 3) == []  # declared 3 classes
    with pytest.raises(InputError, match="data.class_names: 2 names for 10 classes"):
        class_names(cfg, [], 10)
