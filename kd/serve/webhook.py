"""MLflow registry webhooks (MLflow >= 3.3, SQL backend stores) as `kd serve` receives them.

MLflow POSTs ``{"entity", "action", "timestamp", "data"}`` with the headers
``X-MLflow-Delivery-Id``, ``X-MLflow-Timestamp`` (unix seconds) and, when the webhook has
a secret, ``X-MLflow-Signature: v1,<base64 HMAC-SHA256(secret, "ID.TIMESTAMP.BODY")>``
(mlflow/webhooks/delivery.py). `verify` checks that signature and the timestamp's age;
`is_alias_event` says whether a payload moves the alias `kd serve` follows.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

SIGNATURE = "x-mlflow-signature"
TIMESTAMP = "x-mlflow-timestamp"
DELIVERY = "x-mlflow-delivery-id"
MAX_AGE_S = 300  # older deliveries are refused (replay protection)
ALIAS_ENTITY = "model_version_alias"


class WebhookRejected(ValueError):
    """A webhook delivery that is unsigned, badly signed, stale or not JSON (one line)."""


def signature(secret: str, delivery_id: str, timestamp: str, body: str) -> str:
    """MLflow's ``v1,<base64>`` signature of a delivery."""
    mac = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.{body}".encode(), hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def verify(headers: dict[str, str], body: bytes, secret: str | None,
           now: float | None = None) -> dict[str, Any]:
    """The payload of a delivery; with a ``secret``, only when its signature and timestamp
    check out (`WebhookRejected` otherwise). ``headers`` keys are lower case."""
    text = body.decode("utf-8", errors="replace")
    if secret:
        sig, ts, did = headers.get(SIGNATURE), headers.get(TIMESTAMP), headers.get(DELIVERY)
        if not (sig and ts and did):
            raise WebhookRejected("webhook: missing X-MLflow-Signature / -Timestamp / "
                                  "-Delivery-Id headers")
        if not hmac.compare_digest(sig, signature(secret, did, ts, text)):
            raise WebhookRejected("webhook: signature does not match the configured secret")
        try:
            age = abs((now or time.time()) - int(ts))
        except ValueError:
            raise WebhookRejected(f"webhook: X-MLflow-Timestamp {ts!r} is not unix "
                                  "seconds") from None
        if age > MAX_AGE_S:
            raise WebhookRejected(f"webhook: timestamp is {age:.0f} s old (limit {MAX_AGE_S} s)")
    try:
        payload = json.loads(text)
    except ValueError:
        raise WebhookRejected("webhook: body is not JSON") from None
    if not isinstance(payload, dict):
        raise WebhookRejected("webhook: body is not a JSON object")
    return payload


def is_alias_event(payload: dict[str, Any], name: str, alias: str) -> bool:
    """True for ``model_version_alias.created`` / ``.deleted`` on ``name``'s ``alias``
    (the payload's ``data`` holds ``name``, ``alias``, ``version``)."""
    data = payload.get("data") or {}
    return (payload.get("entity") == ALIAS_ENTITY and isinstance(data, dict)
            and data.get("name") == name and data.get("alias", alias) == alias)
