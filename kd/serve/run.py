"""`kd serve NAME`: start (or join, ``RAY_ADDRESS``) Ray, start Serve's HTTP proxy on
``host:port``, deploy `kd.serve.app:build` from a config (like ``serve deploy`` and a
RayService do, so every alias swap is an in-place ``reconfigure``), print one line and
block until SIGINT / SIGTERM; then delete the application.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any

from kd.errors import InputError
from kd.serve.watch import IMPORT_PATH

DEPLOY_TIMEOUT_S = 300.0


def deploy(app_name: str, args: dict[str, Any], route_prefix: str = "/",
           runtime_env: dict[str, Any] | None = None, timeout_s: float = DEPLOY_TIMEOUT_S) -> str:
    """Deploy ``kd.serve.app:build`` with ``args`` as application ``app_name`` from a config
    (other config apps are kept; ``runtime_env`` is the app's, e.g. the webhook secret's
    env var on a cluster started elsewhere) and wait until it runs; returns the version."""
    import ray
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    from kd.serve.app import resolve_args
    from kd.serve.watch import _controller, resolve_alias

    a = resolve_args(args)  # a bad argument or an unset alias is one line here, not a
    resolve_alias(a["name"], a["alias"], a["tracking_uri"])  # failed build inside Serve
    ctl = _controller()
    apps = ray.get(ctl.get_app_configs.remote())
    apps[app_name] = ServeApplicationSchema(name=app_name, import_path=IMPORT_PATH, args=args,
                                            route_prefix=route_prefix,
                                            runtime_env=runtime_env or {})
    ray.get(ctl.apply_config.remote(ServeDeploySchema(applications=list(apps.values()))))
    return wait_running(app_name, timeout_s)


def wait_running(app_name: str, timeout_s: float) -> str:
    """Block until ``app_name`` is RUNNING; its version (an `InputError` when the build
    failed, e.g. the alias is not set or the registry is unreachable)."""
    from ray import serve

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        st = serve.status().applications.get(app_name)
        if st is not None and st.status == "RUNNING":
            break
        if st is not None and st.status == "DEPLOY_FAILED":
            raise InputError(f"kd serve {app_name}: {_last_line(st.message)}")
        time.sleep(0.5)
    else:
        raise InputError(f"kd serve {app_name}: not running after {timeout_s:.0f} s")
    return _served_version(app_name)


def _served_version(app_name: str) -> str:
    """The version the Model deployment reports."""
    from ray import serve

    h = serve.get_deployment_handle("Model", app_name=app_name)
    return str(h.info.remote().result(timeout_s=60)["version"])


def _last_line(message: str) -> str:
    """The useful line of a Serve build traceback (the exception's own line)."""
    lines = [s.strip() for s in (message or "").splitlines() if s.strip()]
    for s in reversed(lines):
        if "Error" in s or "error" in s:
            return s[:400]
    return lines[-1][:400] if lines else "deploy failed"


def _http_address(host: str, port: int) -> tuple[str, int]:
    """Where Serve's proxy listens: a Serve already running on a joined cluster keeps its
    own address (``serve.start`` only warns), and that is the one to print."""
    import ray

    from kd.serve.watch import _controller

    cfg = ray.get(_controller().get_http_config.remote())
    if (cfg.host, cfg.port) != (host, port):
        print(f"[kd] Serve already runs on this cluster at {cfg.host}:{cfg.port}; using it",
              file=sys.stderr, flush=True)
    return cfg.host, cfg.port


def serve_forever(name: str, alias: str, host: str, port: int, poll_interval_s: float,
                  replicas: int, num_cpus: float | None = None, precision: str = "fp32") -> int:
    """What `kd serve` does (module docstring); returns 0 after a signal."""
    from ray import serve

    from kd.runtime import ensure_ray
    from kd.serve.app import resolve_args
    from kd.serve.watch import resolve_alias
    from kd.tracking import tracking_uri

    args: dict[str, Any] = {"name": name, "alias": alias, "poll_interval_s": poll_interval_s,
                            "tracking_uri": tracking_uri(), "num_replicas": replicas,
                            "precision": precision}
    if num_cpus is not None:
        args["num_cpus"] = num_cpus
    resolve_alias(name, alias, resolve_args(args)["tracking_uri"])  # before starting anything
    ensure_ray()
    serve.start(http_options={"host": host, "port": port})
    host, port = _http_address(host, port)
    version = deploy(name, args)
    note = "" if precision == "fp32" else f" in {precision}"  # the fp32 line is unchanged
    print(f"serving models:/{name}@{alias} version {version} at http://{host}:{port}{note}",
          flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.delete(name)
    return 0
