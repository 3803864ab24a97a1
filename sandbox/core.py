"""Shared plumbing for the loopback emulators: scaled time, fault injection, a JSON HTTP handler.

Every emulator is a stdlib ``ThreadingHTTPServer`` on 127.0.0.1 with a port picked by the OS. The
real client libraries talk to these servers over real HTTP; nothing here is imported by ``flows/``
or ``tasks/``.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import selectors
import socket
import struct
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

_HANDED_OUT: dict[int, float] = {}  # port -> when free_port() gave it (monotonic)
_HANDED_OUT_LOCK = threading.Lock()
_HOLD_S = 120.0  # a program binds the port it was given within this (else it has failed anyway)


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A free loopback port for a program that binds it itself, later (a local container, ``prefect server
    start --port``, ``kubectl port-forward``).

    Not ``bind(0)``: that port is from the kernel's ephemeral range, and between the pick and the program's
    bind (a second or more of a Python server's imports on a loaded machine) any ``bind(0)`` or outgoing
    connection on the machine may take it, and the program exits "address already in use" (a crash no pod
    sees on GKE, where each has its own network namespace). The kernel never hands out a port outside the
    ephemeral range, so this picks one there at random, free now and not given out by this process in the
    last two minutes; two processes picking the same one at the same moment is the remaining (1 in ~20,000)
    chance."""
    lo, hi = _ephemeral_range()
    spans = [(max(10000, lo - 20000), lo - 1), (hi + 1, 65535)]
    spans = [(a, b) for a, b in spans if b - a >= 1000]
    now = time.monotonic()
    with _HANDED_OUT_LOCK:
        for port, at in list(_HANDED_OUT.items()):
            if now - at > _HOLD_S:
                del _HANDED_OUT[port]
        for _ in range(200 if spans else 0):
            a, b = random.choice(spans)
            port = random.randint(a, b)
            if port in _HANDED_OUT:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _HANDED_OUT[port] = now
            return port
    with socket.socket() as s:  # no room outside the ephemeral range: the kernel's pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Clock:
    """Cloud delays expressed in real-world seconds, scaled for the sandbox.

    ``time_scale=1.0`` waits as long as GCP would; ``0.01`` makes a 5-minute cluster create take 3 s.
    """

    def __init__(self, time_scale: float = 1.0, *, min_deadline_s: float = 0.0) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.time_scale = time_scale
        self._epoch = (time.time(), time.monotonic())
        # Real seconds a cloud-side deadline (a Deployment's progressDeadlineSeconds) is never shorter than: on
        # a tiny time scale a loaded test machine's stall of a few real seconds is thousands of cloud seconds,
        # and the product's own waits have the same floor there (LLM_FLEET_MIN_LOAD_TIMEOUT_S). 0: none.
        self.min_deadline_s = min_deadline_s

    def now(self) -> float:
        """Cloud time (unix seconds): the wall clock when this clock was made, plus real time elapsed since,
        unscaled — so a 30 s scrape interval is 30 s apart here whatever ``time_scale`` is."""
        wall, mono = self._epoch
        return wall + (time.monotonic() - mono) / self.time_scale

    def scaled(self, cloud_seconds: float) -> float:
        return max(0.0, cloud_seconds * self.time_scale)

    def deadline(self, cloud_seconds: float) -> float:
        """A cloud-side deadline in real seconds: scaled, never below ``min_deadline_s``."""
        return max(self.scaled(cloud_seconds), self.min_deadline_s)

    def sleep(self, cloud_seconds: float, stop: threading.Event | None = None) -> bool:
        """Sleep a scaled cloud duration; returns False if ``stop`` was set meanwhile."""
        delay = self.scaled(cloud_seconds)
        if stop is None:
            time.sleep(delay)
            return True
        return not stop.wait(delay)

    def call_later(self, cloud_seconds: float, fn: Callable[[], Any]) -> threading.Timer:
        timer = threading.Timer(self.scaled(cloud_seconds), fn)
        timer.daemon = True
        timer.start()
        return timer


# Realistic defaults, in cloud seconds (scaled by Clock.time_scale).
DEFAULT_DELAYS: dict[str, float] = {
    "cluster_create": 300.0,
    "cluster_delete": 180.0,
    "node_pool_create": 120.0,
    "node_pool_delete": 60.0,
    "node_pool_resize": 30.0,
    # an explicit override of the node boot (tests); by default sandbox/coldstart.py times it per machine
    # family and GPU driver, and the image pull by size and path, the weights by bytes and source
    "node_boot": 60.0,
    "autopilot_node_provision": 90.0,
    "image_pull": 45.0,  # a plain pull of the 9 GB vLLM image (coldstart.image_pull); bench/release_swap reads it
    # kube-proxy / the GKE dataplane programs a Service's new endpoints this long after the Endpoints change
    # (kube-proxy's minSyncPeriod is 1 s; see docs/sandbox-contract.md)
    "endpoint_propagation": 1.0,
}


@dataclass
class FaultRule:
    """Make matching requests fail (or slow down) ``count`` times; ``count=None`` means forever."""

    service: str  # "gke", "compute", "kube", "hub", "slack", "model", "gcs", "control" or "*"
    method: str = "*"  # HTTP method or "*"
    path: str = ".*"  # regex searched in the request path (without query)
    status: int | None = None  # HTTP status to return; None = pass through after latency
    count: int | None = 1
    latency: float = 0.0  # real seconds added before answering (not scaled)
    hang: bool = False  # never answer (until the sandbox stops)
    body: dict[str, Any] | None = None  # custom JSON body for the error
    headers: dict[str, str] = field(default_factory=dict)  # e.g. {"Retry-After": "1"}
    # What the network or server does instead of answering (see ACTIONS); None = the status/latency above.
    action: str | None = None
    after: float = 0.0  # watch actions: real seconds of normal streaming before the fault hits
    query: str = ""  # regex searched in the query string, e.g. "watch=(1|true|True)"
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    hits: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


# reset: the TCP connection is reset (RST) before any reply, as a crashed proxy or LB does.
# truncate: a 200 whose body stops short of its Content-Length (the client sees a broken read).
# watch_expire: a watch streams normally for ``after`` s, then gets the 410 Expired ERROR event the API
#   server sends when etcd has compacted past the watch's resourceVersion (old versions stay gone).
# watch_drop: a watch streams for ``after`` s, then the connection closes mid-stream (API server restart).
ACTIONS = ("reset", "truncate", "watch_expire", "watch_drop")


class Faults:
    """Thread-safe registry of fault rules, consulted by every handler before it answers."""

    def __init__(self) -> None:
        self._rules: list[FaultRule] = []
        self._lock = threading.Lock()
        self.stop = threading.Event()

    def add(self, rule: FaultRule | None = None, **kwargs: Any) -> FaultRule:
        rule = rule or FaultRule(**kwargs)
        re.compile(rule.path)  # fail early on a bad pattern
        re.compile(rule.query)
        if rule.action is not None and rule.action not in ACTIONS:
            raise ValueError(f"unknown fault action {rule.action!r}; valid: {', '.join(ACTIONS)}")
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self, service: str | None = None) -> None:
        with self._lock:
            self._rules = [r for r in self._rules if service is not None and r.service != service]

    def remove(self, rule_id: str) -> bool:
        """Drop one rule by id; False if there was none."""
        with self._lock:
            before = len(self._rules)
            self._rules = [r for r in self._rules if r.id != rule_id]
            return len(self._rules) < before

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.to_dict() for r in self._rules]

    def take(self, service: str, method: str, path: str, *, exact: bool = False, query: str = "") -> FaultRule | None:
        """The first live rule matching this request, with one use consumed (``exact``: ignore "*" rules)."""
        with self._lock:
            for rule in self._rules:
                if rule.service not in ((service,) if exact else ("*", service)):
                    continue
                if rule.method not in ("*", method.upper()):
                    continue
                if not re.search(rule.path, path):
                    continue
                if rule.query and not re.search(rule.query, query):
                    continue
                if rule.count is not None and rule.hits >= rule.count:
                    continue
                rule.hits += 1
                return rule
        return None


class HttpError(Exception):
    """Raised by route handlers; rendered by the emulator's ``error_body``."""

    def __init__(self, status: int, message: str, *, reason: str = "", headers: dict[str, str] | None = None,
                 body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason or HTTPStatus(status).phrase
        self.headers = headers or {}
        self.body = body


Route = tuple[str, re.Pattern[str], Callable[..., Any]]


class JsonHandler(BaseHTTPRequestHandler):
    """Base request handler: routing by (method, regex), JSON in/out, faults, request log.

    Subclasses set ``service`` and ``routes`` (built with :func:`route`) and may override
    ``error_body`` to shape errors the way their real API does. Route functions are called as
    ``fn(handler, **path_groups)`` and return a JSON-able value (200), a ``(status, value)`` tuple,
    or ``None`` when they wrote the response themselves (streams, watches).
    """

    service = "?"
    routes: list[Route] = []
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else every small reply stalls ~40 ms (delayed ACK)
    server: SandboxHTTPServer

    # ---- helpers for route functions -------------------------------------------------
    @property
    def url(self):
        return urlsplit(self.path)

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(self.url.query, keep_blank_values=True)

    def q(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def body_bytes(self) -> bytes:
        if not hasattr(self, "_body"):
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self._body = self.rfile.read(length)
            elif self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self._body = b"".join(chunks)
            else:
                self._body = b""
        return self._body

    def json_body(self) -> Any:
        raw = self.body_bytes()
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise HttpError(400, f"request body is not JSON: {exc}") from exc

    def send_json(self, status: int, value: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(value).encode() if not isinstance(value, bytes | bytearray) else bytes(value)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_text(self, status: int, text: str | bytes, content_type: str = "text/plain; charset=utf-8",
                  headers: dict[str, str] | None = None) -> None:
        data = text.encode() if isinstance(text, str) else text
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def start_chunked(self, status: int = 200, content_type: str = "application/json",
                      headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()

    def write_chunk(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        if not data:
            return
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # ---- to override -----------------------------------------------------------------
    def error_body(self, err: HttpError) -> Any:
        return err.body if err.body is not None else {"error": {"code": err.status, "message": err.message}}

    # ---- dispatch --------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # requests are recorded in server.requests instead of stderr

    def _dispatch(self) -> None:
        # One handler instance serves every request of a keep-alive connection: forget the last body.
        self.__dict__.pop("_body", None)
        self.fault: FaultRule | None = None  # a watch action, carried out by the route that streams
        path = self.url.path
        self.server.record(self.command, path)
        rule = (self.server.faults.take(self.service, self.command, path, query=self.url.query)
                if self.server.faults else None)
        if rule is not None and rule.action in ("reset", "truncate"):
            self._break_connection(rule.action)
            return
        if rule is not None and rule.action is not None:
            self.fault, rule = rule, None
        if rule is not None:
            if rule.hang:
                self.server.faults.stop.wait()
                self.close_connection = True
                return
            if rule.latency:
                time.sleep(rule.latency)
            if rule.status is not None:
                self.body_bytes()  # drain so keep-alive stays in sync
                err = HttpError(rule.status, f"injected fault {rule.id}", headers=rule.headers, body=rule.body)
                self.send_json(err.status, self.error_body(err), headers=err.headers)
                return
        for method, pattern, fn in type(self).routes:
            if method != self.command and not (method == "GET" and self.command == "HEAD"):
                continue
            m = pattern.fullmatch(path)
            if not m:
                continue
            try:
                result = fn(self, **m.groupdict())
            except HttpError as err:
                self.body_bytes()
                self.send_json(err.status, self.error_body(err), headers=err.headers)
                return
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
                return
            if result is None:
                return
            status, value = result if isinstance(result, tuple) else (200, result)
            self.send_json(status, value)
            return
        self.body_bytes()
        err = HttpError(404, f"no route for {self.command} {path}", reason="NotFound")
        self.send_json(404, self.error_body(err))

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _dispatch

    def _break_connection(self, action: str) -> None:
        self.body_bytes()
        self.close_connection = True
        if action == "truncate":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "4096")
            self.end_headers()
            self.wfile.write(b'{"partial": ')
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()


def route(routes: list[Route], method: str, pattern: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn`` for ``method`` and a full-match path regex with named groups."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        routes.append((method, re.compile(pattern), fn))
        return fn

    return deco


# Every listening sandbox server by its loopback port: a Service port hands a connection straight to the
# in-process server kube-proxy picked (sandbox.routing), as a DNAT'd connection reaches the pod itself.
LISTENING: weakref.WeakValueDictionary[int, SandboxHTTPServer] = weakref.WeakValueDictionary()
_LISTENING_LOCK = threading.Lock()


class PromptStop:
    """A socketserver loop that ``shutdown()`` ends at once, and that never wakes up for nothing. The stdlib's
    ``serve_forever`` polls (0.2 s here) to notice a shutdown: dozens of idle servers woke five times a
    second, and as a sandbox stops its servers one after another each stop waited ~0.15 s for the next poll.
    Here the loop selects, without a timeout, on the listening socket and a socket pair ``shutdown()`` writes
    to. Mix in before the socketserver class; start it with ``start_serving``."""

    def serve_forever(self, poll_interval: float | None = None) -> None:
        wake, self._waker = socket.socketpair()
        self._stopping, self._stopped = False, threading.Event()
        if (started := getattr(self, "_started", None)) is not None:
            started.set()
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(self, selectors.EVENT_READ)  # type: ignore[arg-type]
                sel.register(wake, selectors.EVENT_READ)
                while not self._stopping:
                    ready = sel.select(poll_interval)
                    if self._stopping:
                        break
                    if any(key.fileobj is self for key, _ in ready):
                        self._handle_request_noblock()  # type: ignore[attr-defined]
                    self.service_actions()  # type: ignore[attr-defined]
        finally:
            wake.close()
            self._waker.close()
            self._stopped.set()

    def start_serving(self, name: str) -> threading.Thread:
        """The serving thread, returned once its loop can be stopped."""
        self._started = threading.Event()
        thread = threading.Thread(target=self.serve_forever, name=name, daemon=True)
        thread.start()
        self._started.wait()
        return thread

    def shutdown(self) -> None:
        if getattr(self, "_stopped", None) is None:
            return  # never served
        self._stopping = True
        with contextlib.suppress(OSError):
            self._waker.send(b"x")
        self._stopped.wait()


class PromptHTTPServer(PromptStop, ThreadingHTTPServer):
    """A plain threading HTTP server that stops at once: the tests' stand-ins (Prefect's API, a model, a pod)."""

    daemon_threads = True


class SandboxHTTPServer(PromptStop, ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, handler: type[JsonHandler], *, state: Any, faults: Faults | None, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), handler)
        self.state = state
        self.faults = faults
        self.request_count = 0
        self._count_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        with _LISTENING_LOCK:
            LISTENING[self.port] = self

    def adopt(self, request: socket.socket, client_address: Any) -> bool:
        """Serve a connection accepted on another port (a Service's, whose kube-proxy picked this server) as
        if it had been accepted here; False when this server no longer listens (the connection is refused)."""
        if self._closed:
            return False
        self.process_request(request, client_address)
        return True

    def server_close(self) -> None:
        self._closed = True
        with _LISTENING_LOCK:
            if LISTENING.get(self.port) is self:
                del LISTENING[self.port]
        super().server_close()

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def record(self, method: str, path: str) -> None:
        with self._count_lock:
            self.request_count += 1

    def start(self) -> SandboxHTTPServer:
        self._thread = self.start_serving(f"sandbox-{self.RequestHandlerClass.service}-{self.port}")
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class Emulator:
    """start/stop/url for an emulator served by one handler class (set ``_handler`` in ``__init__``)."""

    _handler: type[JsonHandler]
    faults: Faults
    _server: SandboxHTTPServer | None = None

    def start(self) -> None:
        if self._server is None:
            self._server = serve(self._handler, state=self, faults=self.faults)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} emulator is not started")
        return self._server.url


def serve(handler: type[JsonHandler], *, state: Any, faults: Faults | None, port: int = 0) -> SandboxHTTPServer:
    """Start ``handler`` on 127.0.0.1 in a daemon thread and return the running server."""
    return SandboxHTTPServer(handler, state=state, faults=faults, port=port).start()


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
