"""The `kd serve` Ray Serve application and its builder, `build(args)`.

``serve run kd.serve.app:build name=NAME alias=champion`` or a RayService
``import_path: kd.serve.app:build`` with ``args:``. Two deployments:

- ``Model`` (``num_replicas``): holds one `Served` version; requests are batched
  server-side (`serve.batch`); ``reconfigure(user_config)`` loads the version named in
  ``user_config["version"]`` completely, then swaps the reference (requests in flight
  finish on the old one, so a swap fails none), without restarting the replica.
- ``Ingress`` (one replica): ``POST /predict``, ``GET /health``, ``POST /webhook``
  (docs/serving.md#kd-serve) and the `AliasWatcher` that moves ``user_config``.

`build` resolves the alias once, so every replica starts on the same version.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from kd.errors import InputError
from kd.registry.loader import PRECISIONS
from kd.serve.model import MAX_ROWS, RequestError, Served, answer, load_version, parse_rows, parse_texts
from kd.serve.watch import AliasWatcher, apply_user_config, resolve_alias
from kd.serve.webhook import WebhookRejected, is_alias_event, verify

DEFAULTS: dict[str, Any] = {"alias": "champion", "poll_interval_s": 10.0, "tracking_uri": None,
                            "max_batch_size": 64, "batch_wait_timeout_s": 0.01,
                            "num_replicas": 1, "num_cpus": 1.0, "webhook_secret_env": None,
                            "max_rows": MAX_ROWS, "precision": "fp32"}


@serve.deployment(name="Model")
class Model:
    """One version of the model; swapped in place by ``reconfigure``."""

    def __init__(self, name: str, tracking_uri: str, threads: int, max_batch_size: int,
                 batch_wait_timeout_s: float, precision: str = "fp32") -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self._batched.set_max_batch_size(int(max_batch_size))
        self._batched.set_batch_wait_timeout_s(float(batch_wait_timeout_s))
        self.name, self.tracking_uri, self.precision = name, tracking_uri, precision
        self.served: Served | None = None
        self.swaps = 0
        self.error: str | None = None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load ``user_config["version"]`` fully, then replace the served reference. A
        failed load keeps the current version (and is reported by `info`); with none
        loaded yet it fails the replica's start."""
        version = str(user_config["version"])
        if self.served is not None and self.served.version == version:
            return
        try:
            new = await asyncio.to_thread(load_version, self.name, version, self.tracking_uri,
                                          self.precision)
        except Exception as e:
            if self.served is None:
                raise
            self.error = f"could not load version {version}: {' '.join(str(e).split())[:300]}"
            return
        self.served, self.error = new, None
        self.swaps += 1

    def info(self) -> dict[str, Any]:
        """The served version, its precision, this replica's pid, how many swaps it made,
        the last error."""
        return {"version": self.served.version if self.served else None, "pid": os.getpid(),
                "swaps": self.swaps, "error": self.error, "precision": self.precision}

    async def predict(self, inputs: Any, max_rows: int) -> dict[str, Any]:
        """The /predict body for ``inputs`` (a dict with ``status`` and ``error`` for a bad
        request), computed by one version."""
        served = self.served
        assert served is not None  # reconfigure ran before the replica took traffic
        try:
            x = (parse_texts(inputs, max_rows) if served.student.task == "embed" else
                 parse_rows(inputs, served.input_shape, served.student.integer, max_rows))
        except RequestError as e:
            return {"status": e.status, "error": e.reason}
        probs = await self._batched((served, x))
        return answer(served, probs)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01)
    async def _batched(self, items: list[tuple[Served, np.ndarray]]) -> list[np.ndarray]:
        """Run the requests of one batch, grouped by the version each was parsed for."""
        out: list[np.ndarray | None] = [None] * len(items)
        for served in {id(s): s for s, _ in items}.values():
            idx = [i for i, (s, _) in enumerate(items) if s is served]
            xs = [items[i][1] for i in idx]
            probs = served.student.predict(np.concatenate(xs))
            start = 0
            for i, x in zip(idx, xs, strict=True):
                out[i] = probs[start:start + len(x)]
                start += len(x)
        return out  # type: ignore[return-value]


def _reply(body: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status)


INGRESS_IN_FLIGHT = 1000  # requests the one Ingress replica holds at once


@serve.deployment(name="Ingress", num_replicas=1)
class Ingress:
    """The HTTP routes and the alias watcher (one replica, so one watcher)."""

    def __init__(self, model: Any, args: dict[str, Any], version: str) -> None:
        self.model, self.args = model, args
        self.name, self.alias = args["name"], args["alias"]
        env = args.get("webhook_secret_env")
        self.secret = os.environ.get(env) if env else None
        app = serve.get_replica_context().app_name
        uri = args["tracking_uri"]
        self.watcher = AliasWatcher(
            lambda: resolve_alias(self.name, self.alias, uri),
            lambda v: apply_user_config(app, {"version": v}, args),
            version, float(args["poll_interval_s"])).start()

    async def __call__(self, request: Request) -> JSONResponse:
        path, method = request.url.path.rstrip("/").rsplit("/", 1)[-1], request.method
        if path == "predict" and method == "POST":
            return await self._predict(request)
        if path == "health" and method == "GET":
            return await self._health()
        if path == "webhook" and method == "POST":
            return await self._webhook(request)
        return _reply({"error": f"no route {method} {request.url.path}; use POST /predict, "
                                "GET /health, POST /webhook"}, 404)

    async def _predict(self, request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except Exception:
            return _reply({"error": "body is not JSON"}, 400)
        if not isinstance(body, dict) or "inputs" not in body:
            return _reply({"error": 'body must be a JSON object with "inputs": [row, ...]'}, 400)
        out = await self.model.predict.remote(body["inputs"], int(self.args["max_rows"]))
        if "error" in out:
            return _reply({"error": out["error"]}, out["status"])
        return _reply(out)

    async def _health(self) -> JSONResponse:
        info = await self.model.info.remote()
        status = self.watcher.status()
        if info.get("error") and status["registry"] == "ok":
            status["registry"] = info["error"]
        return _reply({"model": self.name, "alias": self.alias, "version": info["version"],
                       "precision": info["precision"], **status})

    async def _webhook(self, request: Request) -> JSONResponse:
        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            payload = verify(headers, body, self.secret)
        except WebhookRejected as e:
            return _reply({"error": str(e)}, 401 if "signature" in str(e) or "headers" in
                          str(e) else 400)
        hit = is_alias_event(payload, self.name, self.alias)
        if hit:
            self.watcher.trigger()
        return _reply({"ok": True, "rechecking": hit})


def build(args: dict[str, Any]) -> serve.Application:
    """The application for builder ``args`` (docs/serving.md#kd-serve): ``name``
    (required), ``alias``, ``poll_interval_s``, ``tracking_uri`` (default
    ``$MLFLOW_TRACKING_URI``), ``max_batch_size``, ``batch_wait_timeout_s``,
    ``num_replicas``, ``num_cpus`` (per Model replica; 0 is allowed), ``webhook_secret_env``,
    ``max_rows``, ``precision`` (fp32 or bf16, `kd.registry.loader.PRECISIONS`).
    Resolves the alias once: every replica starts on that version."""
    a = resolve_args(args)
    version = resolve_alias(a["name"], a["alias"], a["tracking_uri"])
    model = Model.options(
        num_replicas=int(a["num_replicas"]), user_config={"version": version},
        ray_actor_options={"num_cpus": float(a["num_cpus"])},
        # Serve's default (5 in flight per replica) would cap a batch at 5 requests.
        max_ongoing_requests=4 * int(a["max_batch_size"]),
    ).bind(a["name"], a["tracking_uri"], max(1, int(float(a["num_cpus"]))),
           int(a["max_batch_size"]), float(a["batch_wait_timeout_s"]), a["precision"])
    # One Ingress replica awaits the Model for every request in flight: no cap of its own.
    return Ingress.options(ray_actor_options={"num_cpus": 0},
                           max_ongoing_requests=INGRESS_IN_FLIGHT).bind(model, a, version)


def resolve_args(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` over `DEFAULTS`, checked: an `InputError` names a missing or unknown key."""
    from kd.tracking import tracking_uri

    unknown = sorted(set(args) - set(DEFAULTS) - {"name"})
    if unknown:
        raise InputError(f"kd.serve.app:build args: unknown {', '.join(unknown)} (known: "
                         f"name, {', '.join(DEFAULTS)})")
    if not args.get("name"):
        raise InputError("kd.serve.app:build args: name (the registered model) is required")
    a = {**DEFAULTS, **{k: v for k, v in args.items() if v is not None}}
    a["tracking_uri"] = a["tracking_uri"] or tracking_uri()
    if a["precision"] not in PRECISIONS:
        raise InputError(f"kd.serve.app:build args: precision must be one of "
                         f"{', '.join(PRECISIONS)}; got {a['precision']!r}")
    for key in ("poll_interval_s", "batch_wait_timeout_s", "num_cpus"):
        try:
            if float(a[key]) < 0:
                raise ValueError
        except (TypeError, ValueError):
            raise InputError(f"kd.serve.app:build args: {key} must be a number >= 0; "
                             f"got {a[key]!r}") from None
    return a
