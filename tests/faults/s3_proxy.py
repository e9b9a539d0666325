"""A fault-injecting HTTP proxy in front of the test S3 server (moto_server).

Every request is forwarded unchanged (headers, the signed ``Host`` included; moto does
not check signatures), except those matching a `Rule` while the rule has uses left:
those get an S3-style error status (500 InternalError, 503 SlowDown) without reaching
moto, or are delayed before being forwarded. Each request is recorded (method, path,
time, what was done), so a test can count attempts and measure the backoff between them.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "expect"}
ERRORS = {500: "InternalError", 503: "SlowDown"}


@dataclass
class Rule:
    """Requests with ``method`` whose path contains ``path_part``: the first ``times``
    of them get ``status`` (500/503), or wait ``delay_s`` and are forwarded (status 0)."""

    method: str
    path_part: str
    status: int = 0
    delay_s: float = 0.0
    times: int = 1_000_000


@dataclass
class Seen:
    method: str
    path: str
    at: float
    action: str  # "forwarded", "500", "503", "delayed"


@dataclass
class FaultProxy:
    """The proxy: ``url`` is its endpoint; ``rules`` and ``seen`` are live."""

    target: str
    rules: list[Rule] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    url: str = ""
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _handle(self) -> None:
                body = _read_body(self)
                action = proxy._decide(self.command, self.path)
                if action in ("500", "503"):
                    _reply_error(self, int(action))
                    return
                if action.startswith("delay:"):
                    time.sleep(float(action.split(":", 1)[1]))
                _forward(self, proxy.target, body)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _decide(self, method: str, path: str) -> str:
        with self._lock:
            action = "forwarded"
            for r in self.rules:
                if r.method == method and r.path_part in path and r.times > 0:
                    r.times -= 1
                    action = str(r.status) if r.status else f"delay:{r.delay_s}"
                    break
            self.seen.append(Seen(method, path, time.monotonic(),
                                  "delayed" if action.startswith("delay:") else action))
            return action

    def attempts(self, method: str, path_part: str) -> list[Seen]:
        """The recorded requests with ``method`` whose path contains ``path_part``."""
        with self._lock:
            return [s for s in self.seen if s.method == method and path_part in s.path]


def _read_body(h: BaseHTTPRequestHandler) -> bytes:
    """The request body, de-chunked when sent with ``Transfer-Encoding: chunked``."""
    if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
        out = b""
        while True:
            size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return out
            out += h.rfile.read(size)
            h.rfile.readline()
    n = int(h.headers.get("Content-Length") or 0)
    return h.rfile.read(n) if n else b""


def _reply_error(h: BaseHTTPRequestHandler, status: int) -> None:
    body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{ERRORS[status]}</Code>'
            f"<Message>injected by the fault proxy</Message></Error>").encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/xml")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


def _forward(h: BaseHTTPRequestHandler, target: str, body: bytes) -> None:
    t = urlparse(target)
    conn = http.client.HTTPConnection(t.hostname, t.port, timeout=60)
    conn.putrequest(h.command, h.path, skip_host=True, skip_accept_encoding=True)
    for k, v in h.headers.items():
        if k.lower() not in HOP and k.lower() != "content-length":
            conn.putheader(k, v)
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body or None)
    resp = conn.getresponse()
    data = resp.read()
    h.send_response(resp.status)
    for k, v in resp.getheaders():
        if k.lower() not in HOP and k.lower() != "content-length":
            h.send_header(k, v)
    h.send_header("Content-Length", str(resp.getheader("Content-Length") or len(data))
                  if h.command == "HEAD" else str(len(data)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(data)
    conn.close()
