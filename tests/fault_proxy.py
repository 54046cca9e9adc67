"""A fault-injecting HTTP proxy for tests: it sits on 127.0.0.1 in front of an S3 endpoint (moto's server) and,
for a seeded share of requests, answers 500 InternalError or 503 SlowDown, or resets the connection halfway
through the request body or halfway through the response body. Faults are bounded in number, every one is
logged, and the proxy stops itself at a deadline if a test forgets to.
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("500", "503", "reset_request", "reset_response")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}
S3_ERRORS = {
    "500": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
}


@dataclass(frozen=True)
class Injected:
    """One fault the proxy injected."""

    kind: str
    method: str
    path: str


@dataclass
class _Rule:
    kind: str
    method: str | None
    path: re.Pattern | None
    times: int


class FaultProxy:
    """Forward every request to ``upstream``; inject a fault into about ``rate`` of them (seeded)."""

    def __init__(self, upstream: str, rate: float = 0.1, seed: int = 0, kinds: tuple[str, ...] = FAULTS,
                 max_faults: int = 100, deadline_s: float = 300):
        self.upstream = urlsplit(upstream)
        self.rate, self.kinds, self.max_faults = rate, kinds, max_faults
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.requests: Counter[str] = Counter()  # by method
        self.injected: list[Injected] = []
        self.rules: list[_Rule] = []
        self.connections: set[socket.socket] = set()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.proxy = self
        self.thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)
        self.deadline = threading.Timer(deadline_s, self.stop)
        self.deadline.daemon = True
        self._stopped = False

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self.thread.start()
        self.deadline.start()
        return self

    def stop(self) -> None:
        with self.lock:
            if self._stopped:
                return
            self._stopped = True
        self.deadline.cancel()
        self.server.shutdown()
        self.server.server_close()
        with self.lock:
            open_connections = list(self.connections)
        for conn in open_connections:  # kept-alive client connections would otherwise go on being served
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                continue  # already closed by its client

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def inject(self, kind: str, method: str | None = None, path: str | None = None, times: int = 1) -> None:
        """Inject ``kind`` into the next ``times`` requests matching ``method`` and the ``path`` regex."""
        with self.lock:
            self.rules.append(_Rule(kind, method, re.compile(path) if path else None, times))

    def clear_rules(self) -> None:
        with self.lock:
            self.rules.clear()

    def counts(self) -> Counter[str]:
        with self.lock:
            return Counter(f.kind for f in self.injected)

    def decide(self, method: str, path: str) -> str | None:
        """The fault for this request, if any (targeted rules first, then the seeded draw)."""
        with self.lock:
            self.requests[method] += 1
            kind = None
            for rule in self.rules:
                if rule.times and (rule.method in (None, method)) and (not rule.path or rule.path.search(path)):
                    rule.times -= 1
                    kind = rule.kind
                    break
            draw = self.rng.random()
            choice = self.rng.choice(self.kinds)
            if kind is None and draw < self.rate and len(self.injected) < self.max_faults:
                kind = choice
            if kind:
                self.injected.append(Injected(kind, method, path))
            return kind


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def setup(self) -> None:
        super().setup()
        with self.server.proxy.lock:
            self.server.proxy.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.proxy.lock:
            self.server.proxy.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args) -> None:  # quiet: the proxy keeps its own record
        return

    def do_GET(self) -> None:
        self._proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _proxy(self) -> None:
        proxy: FaultProxy = self.server.proxy
        fault = proxy.decide(self.command, self.path)
        length = int(self.headers.get("Content-Length") or 0)
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        if fault == "reset_request":  # read half the body, then drop the connection: upstream never sees it
            self.rfile.read(length // 2)
            return self._reset()
        body = self._read_chunked() if chunked else self.rfile.read(length)
        if fault in S3_ERRORS:
            return self._s3_error(*S3_ERRORS[fault])
        status, reason, headers, data = self._forward(proxy, body)
        self.send_response(status, reason)
        for name, value in headers:
            if name.lower() not in HOP_BY_HOP and not (name.lower() == "content-length" and self.command != "HEAD"):
                self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fault == "reset_response" and self.command != "HEAD":  # half the body, then drop the connection
            self.wfile.write(data[: len(data) // 2])
            return self._reset()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _read_chunked(self) -> bytes:
        parts = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline()

    def _forward(self, proxy: FaultProxy, body: bytes):
        upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            return response.status, response.reason, response.getheaders(), response.read()
        finally:
            upstream.close()

    def _s3_error(self, status: int, reason: str, code: str, message: str) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<RequestId>fault-proxy</RequestId></Error>").encode()
        self.send_response(status, reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reset(self) -> None:
        """Close with RST (linger 0), as a crashed server or a load balancer would."""
        self.wfile.flush()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True
