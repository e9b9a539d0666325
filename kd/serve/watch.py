"""Following the alias: a watcher thread resolves ``NAME@ALIAS`` every ``poll_interval_s``
(or at once when a webhook calls `AliasWatcher.trigger`) and, on a change, applies the new
version to the running application as the Model deployment's ``user_config``.

How the new version reaches the replicas (`apply_user_config`): the application's config
as the Serve controller holds it (``get_app_configs``, every declaratively deployed app)
is applied again with only the Model deployment's ``user_config`` changed. The code
version Serve derives from the config (import path, args, runtime env) is unchanged, so
Serve does a lightweight update: it calls ``reconfigure(user_config)`` on every live
replica and restarts none (ray/serve/_private/application_state.py ``apply_app_config``).
An app started imperatively (``serve run kd.serve.app:build ...``) has no such config:
it is re-applied as a config app with the same import path and args, which replaces its
replicas once (a rolling update); later swaps are in place.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

MODEL_DEPLOYMENT = "Model"
IMPORT_PATH = "kd.serve.app:build"


def one_line(e: BaseException) -> str:
    """An exception as one short line."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300]


def resolve_alias(name: str, alias: str, tracking_uri: str) -> str:
    """The version ``models:/name@alias`` points at (an `InputError` when it cannot say)."""
    from kd.registry.store import ModelRef, get_version, registry_client

    return get_version(registry_client(tracking_uri), ModelRef(name, alias=alias)).version


def _controller() -> Any:
    """The Serve controller actor of this Ray cluster."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)


def apply_user_config(app_name: str, user_config: dict[str, Any],
                      builder_args: dict[str, Any], route_prefix: str | None = "/") -> None:
    """Give the Model deployment of ``app_name`` the new ``user_config`` (see module doc)."""
    import ray
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    ctl = _controller()
    apps: dict[str, ServeApplicationSchema] = ray.get(ctl.get_app_configs.remote())
    app = apps.get(app_name)
    if app is None:  # deployed imperatively: becomes a config app (one rolling update)
        app = ServeApplicationSchema(name=app_name, import_path=IMPORT_PATH,
                                     args=builder_args, route_prefix=route_prefix)
    deployments = [d for d in app.deployments if d.name != MODEL_DEPLOYMENT]
    mine = next((d for d in app.deployments if d.name == MODEL_DEPLOYMENT), None)
    opts = mine.model_dump(exclude_unset=True) if mine is not None else {"name": MODEL_DEPLOYMENT}
    opts["user_config"] = user_config
    app = app.model_copy(update={"deployments": [*deployments, DeploymentSchema(**opts)]})
    apps[app_name] = app
    details = ray.get(ctl.get_serve_instance_details.remote())
    ray.get(ctl.apply_config.remote(ServeDeploySchema(
        applications=list(apps.values()), target_capacity=details.get("target_capacity"))))


class AliasWatcher:
    """A daemon thread that keeps the served version equal to what the alias points at.

    ``resolve()`` returns the alias's version (or raises); ``apply(version)`` makes the
    application serve it. An error (registry unreachable, alias deleted) leaves the
    current version serving; `status` reports it as one line with the check's time.
    """

    def __init__(self, resolve: Callable[[], str], apply: Callable[[str], None],
                 version: str, poll_interval_s: float) -> None:
        self._resolve, self._apply = resolve, apply
        self.target = version  # the version last applied
        self.error: str | None = None
        self.checked_at = time.time()
        self.interval = float(poll_interval_s)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kd-alias-watcher", daemon=True)

    def start(self) -> AliasWatcher:
        """Start polling; returns self."""
        self._thread.start()
        return self

    def trigger(self) -> None:
        """Check the alias now (a webhook said it moved)."""
        self._wake.set()

    def stop(self) -> None:
        """Stop the thread (at the next wake-up)."""
        self._stop.set()
        self._wake.set()

    def status(self) -> dict[str, Any]:
        """``registry`` ("ok" or the last error, one line) and ``checked_at`` (unix s)."""
        return {"registry": self.error or "ok", "checked_at": self.checked_at}

    def check(self) -> bool:
        """Resolve the alias once and apply a new version; True when it changed."""
        try:
            version = self._resolve()
            if version != self.target:
                self._apply(version)
                self.target = version
                self.error = None
                return True
            self.error = None
            return False
        except Exception as e:  # keep serving what we have; report why we could not check
            self.error = one_line(e)
            return False
        finally:
            self.checked_at = time.time()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if not self._stop.is_set():
                self.check()
