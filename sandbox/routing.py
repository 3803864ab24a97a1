"""Service routing for the sandbox: forward one HTTP request to one Ready backend, chosen per request.

* :func:`proxy` forwards the request a handler is serving (method, headers, body, query) to one of
  ``ports`` on 127.0.0.1 (round robin, skipping backends that refuse or drop the connection) and
  streams the reply back as it comes (fixed-length bodies copied, chunked and SSE bodies re-chunked
  piece by piece), over pooled keep-alive connections, so routing adds well under 2 ms per request.
  The kube API server's service proxy (``/api/v1/namespaces/N/services/S:P/proxy/...``) calls it.
* :class:`ServicePorts` gives each Service its own loopback port whose handler calls ``resolve(namespace,
  name)`` at every request (``KubeCluster.routed_backends``: kube-proxy's programmed view, the Endpoints of
  ``endpoint_propagation`` cloud seconds ago — ``sandbox.kube.kubeproxy``) and proxies there: patching a
  Service's selector moves the traffic once that lag has passed. No Ready backend: no HTTP answer at all.
  kube-proxy programs a Service without endpoints as a REJECT (iptables ``KUBE-SERVICES ... has no
  endpoints -j REJECT``, icmp-port-unreachable; nftables/IPVS the same), so new connections are refused
  (ECONNREFUSED): the request that finds no backend is reset before any byte (a flow already open when
  the endpoints went) and the port stops listening until a backend is routed again, then listens on the
  same port. (The API server's service proxy, ``sandbox.kube.cluster``, is different: it really answers
  503 "no endpoints available for service".)
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

from sandbox.core import Faults, HttpError, JsonHandler, SandboxHTTPServer, route, serve

# Hop-by-hop headers (RFC 9110 §7.6.1) and the ones we set ourselves.
_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
                  "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length", "server", "date"})
READ_CHUNK = 65536
BACKEND_TIMEOUT = 300.0  # a hung model server holds the request this long at most


class _Conn(http.client.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class ConnectionPool:
    """Idle keep-alive connections to loopback backends, per port (LIFO, bounded)."""

    def __init__(self, max_idle_per_port: int = 64, timeout: float = BACKEND_TIMEOUT) -> None:
        self.max_idle = max_idle_per_port
        self.timeout = timeout
        self._idle: dict[int, list[_Conn]] = {}
        self._lock = threading.Lock()

    def get(self, port: int) -> tuple[_Conn, bool]:
        """A connection to ``port`` and whether it was reused (reused ones may have been closed meanwhile)."""
        with self._lock:
            idle = self._idle.get(port)
            if idle:
                return idle.pop(), True
        return _Conn("127.0.0.1", port, timeout=self.timeout), False

    def put(self, port: int, conn: _Conn) -> None:
        with self._lock:
            idle = self._idle.setdefault(port, [])
            if len(idle) < self.max_idle:
                idle.append(conn)
                return
        conn.close()

    def discard(self, port: int) -> None:
        with self._lock:
            idle = self._idle.pop(port, [])
        for conn in idle:
            conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()


POOL = ConnectionPool()
_RR = itertools.count()


class NoBackend(Exception):
    """No backend accepted the request."""


def _body(handler: BaseHTTPRequestHandler) -> bytes:
    fn = getattr(handler, "body_bytes", None)
    if callable(fn):
        return fn()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def _status(handler: BaseHTTPRequestHandler, code: int, message: str) -> None:
    """A Kubernetes ``Status`` error, like the API server's proxy sends."""
    reason = {503: "ServiceUnavailable", 502: "BadGateway", 504: "Timeout"}.get(code, "InternalError")
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
    send = getattr(handler, "send_json", None)
    if callable(send):
        send(code, body)
        return
    import json

    data = json.dumps(body).encode()
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def proxy(handler: BaseHTTPRequestHandler, ports: list[int], path: str, *, service: str | None = None,
          pool: ConnectionPool | None = None, headers: dict[str, str] | None = None,
          drop_headers: tuple[str, ...] = (), failover: bool = True) -> None:
    """Forward ``handler``'s current request to one of ``ports`` (127.0.0.1) at ``path``, reply streamed.

    ``path`` may carry its own query string; otherwise the handler's query is appended. ``headers``
    are added to (or replace) the forwarded ones; ``drop_headers`` are not forwarded (the real API
    server's service proxy drops ``Authorization``). With no port, or none answering: a 503 ``Status``
    (``service`` names the Service in its message); a backend that accepted the request but never
    answers within the pool's timeout: 504 (never resent elsewhere). ``failover=False`` is kube-proxy:
    the connection goes to the one endpoint picked, and if that pod refuses it (its server has exited
    while kube-proxy still routes to it) the client's connection is reset — no other endpoint is tried.
    """
    pool = pool or POOL
    body = _body(handler)
    if "?" not in path:
        query = urlsplit(handler.path).query
        if query:
            path = f"{path}?{query}"
    if not path.startswith("/"):
        path = "/" + path
    dropped = _HOP | {h.lower() for h in drop_headers}
    fwd = {k: v for k, v in handler.headers.items() if k.lower() not in dropped}
    fwd.update(headers or {})
    client = handler.client_address[0] if handler.client_address else "127.0.0.1"
    prior = handler.headers.get("X-Forwarded-For")
    fwd["X-Forwarded-For"] = f"{prior}, {client}" if prior else client
    if body or handler.command in ("POST", "PUT", "PATCH"):
        fwd["Content-Length"] = str(len(body))
    what = f'service "{service}"' if service else "service"
    if not ports:
        _status(handler, 503, f"no endpoints available for {what}")
        return
    start = next(_RR) % len(ports)
    order = list(ports[start:]) + list(ports[:start])
    last_error = ""
    for port in order:
        for attempt in (0, 1):
            conn, reused = pool.get(port)
            try:
                conn.putrequest(handler.command, path, skip_host=True, skip_accept_encoding=True)
                conn.putheader("Host", f"127.0.0.1:{port}")
                for k, v in fwd.items():
                    conn.putheader(k, v)
                conn.endheaders(body or None)
                resp = conn.getresponse()
            except ConnectionRefusedError:
                conn.close()
                pool.discard(port)
                last_error = f"dial tcp 127.0.0.1:{port}: connect: connection refused"
                if not failover:  # kube-proxy DNAT'd this connection to a dead pod: the client sees it fail
                    breaker = getattr(handler, "_break_connection", None)
                    if callable(breaker):
                        breaker("reset")
                    else:
                        _status(handler, 503, f"error trying to reach {what}: {last_error}")
                    return
                break  # dead backend: next one
            except TimeoutError:
                conn.close()  # the request may have been processed: never resend it elsewhere
                _status(handler, 504, f"error trying to reach {what}: 127.0.0.1:{port}: timeout awaiting response")
                return
            except (http.client.RemoteDisconnected, http.client.BadStatusLine, ConnectionError, OSError) as exc:
                conn.close()
                last_error = f"127.0.0.1:{port}: {exc.__class__.__name__}: {exc}"
                if reused and attempt == 0:
                    continue  # a stale pooled connection: once more on a fresh one
                pool.discard(port)
                break
            _relay(handler, resp, conn, port, pool)
            return
    _status(handler, 503, f"error trying to reach {what}: {last_error or 'no backend answered'}")


def _relay(handler: BaseHTTPRequestHandler, resp: http.client.HTTPResponse, conn: _Conn, port: int,
           pool: ConnectionPool) -> None:
    no_body = handler.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
    length = resp.getheader("Content-Length")
    try:
        handler.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP:
                handler.send_header(k, v)
        if no_body:
            if length is not None:
                handler.send_header("Content-Length", length)
            handler.end_headers()
            resp.read()
        elif length is not None:
            handler.send_header("Content-Length", length)
            handler.end_headers()
            remaining = int(length)
            while remaining > 0:
                data = resp.read(min(READ_CHUNK, remaining))
                if not data:
                    raise ConnectionResetError("backend closed the connection mid-body")
                handler.wfile.write(data)
                remaining -= len(data)
            resp.read()  # nothing left: marks the response complete so the connection can be reused
        else:
            handler.send_header("Transfer-Encoding", "chunked")
            handler.end_headers()
            while True:
                data = resp.read1(READ_CHUNK)
                if not data:
                    break
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                handler.wfile.flush()
            handler.wfile.write(b"0\r\n\r\n")
        handler.wfile.flush()
    except BaseException:
        conn.close()  # half-read: never reuse
        raise
    if resp.will_close or not resp.isclosed():
        conn.close()
    else:
        pool.put(port, conn)


# ---- one loopback port per Service -----------------------------------------------------------------

Resolver = Callable[[str, str], list[int]]
_ROUTES: list = []


class ServiceHandler(JsonHandler):
    service = "route"
    routes = _ROUTES
    server: SandboxHTTPServer

    def error_body(self, err: HttpError) -> Any:
        return err.body if err.body is not None else {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": err.message,
            "reason": err.reason.replace(" ", ""), "code": err.status}


def _forward(h: ServiceHandler):
    ports_: ServicePorts
    ports_, namespace, name = h.server.state
    try:
        backends = list(ports_.resolve(namespace, name) or [])
    except Exception:  # noqa: BLE001 - the service vanished meanwhile: kube-proxy has no rule left either
        backends = []
    if not backends:  # kube-proxy's REJECT: a refused connection, never an HTTP answer (module doc)
        ports_.reject(namespace, name)
        h._break_connection("reset")
        return
    proxy(h, backends, h.path, service=name, pool=ports_.pool, failover=False)
    with ports_._lock:
        ports_.requests[(namespace, name)] = ports_.requests.get((namespace, name), 0) + 1


for _m in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
    route(_ROUTES, _m, r"/.*")(_forward)
ServiceHandler.do_OPTIONS = ServiceHandler._dispatch  # type: ignore[attr-defined]


class ServicePorts:
    """A loopback port per Service, routing every request to the Service's current Ready backends.

    ``resolve(namespace, name) -> list[int]`` (or an object with ``service_backends``, e.g. the
    ``KubeCluster``) is called at every request.
    """

    def __init__(self, resolve: Resolver | Any, *, faults: Faults | None = None,
                 pool: ConnectionPool | None = None) -> None:
        fn = getattr(resolve, "routed_backends", None) or getattr(resolve, "service_backends", None)
        self.resolve: Resolver = fn if callable(fn) else resolve
        self.kube = resolve if hasattr(resolve, "store") else None  # to publish LoadBalancer addresses
        self.faults = faults
        self.pool = pool or ConnectionPool()
        self._servers: dict[tuple[str, str], SandboxHTTPServer] = {}
        self.requests: dict[tuple[str, str], int] = {}
        self.refused: dict[tuple[str, str], int] = {}  # connections reset for want of a Ready endpoint
        self._rejecting: dict[tuple[str, str], SandboxHTTPServer] = {}  # not listening: no endpoint routed
        self._stopped = threading.Event()
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Nothing to start: ports open per Service."""

    # -- kube-proxy's REJECT: a Service with no endpoint refuses connections, its port listens again after
    def reject(self, namespace: str, name: str) -> None:
        """No backend for ``namespace/name``: count it and stop listening (connections are refused) until
        one is routed again."""
        key = (namespace, name)
        with self._lock:
            self.refused[key] = self.refused.get(key, 0) + 1
            srv = self._servers.get(key)
            if srv is None or key in self._rejecting:
                return
            self._rejecting[key] = srv
            if self._watcher is None or not self._watcher.is_alive():
                self._watcher = threading.Thread(target=self._relisten, name="service-reject", daemon=True)
                self._watcher.start()
        threading.Thread(target=srv.stop, name=f"service-reject-{name}", daemon=True).start()

    def _relisten(self, period: float = 0.05) -> None:
        """Listen again, on the same port, once a rejecting Service has a routed backend."""
        while not self._stopped.wait(period):
            with self._lock:
                waiting = dict(self._rejecting)
            if not waiting:
                with self._lock:
                    if not self._rejecting:
                        self._watcher = None
                        return
                continue
            for key, old in waiting.items():
                try:
                    routed = bool(self.resolve(*key))
                except Exception:  # noqa: BLE001 - the Service is gone meanwhile
                    routed = False
                if not routed:
                    continue
                try:
                    srv = serve(ServiceHandler, state=(self, *key), faults=self.faults, port=old.port)
                except OSError:  # the port is busy a moment longer (the old listener closing): next period
                    continue
                with self._lock:
                    if self._rejecting.get(key) is old and self._servers.get(key) is old:
                        self._servers[key] = srv
                        del self._rejecting[key]
                        srv = None
                if srv is not None:  # closed meanwhile
                    srv.stop()

    def open(self, namespace: str, name: str, port: int = 0) -> int:
        """The Service's loopback port (opened on first call; idempotent)."""
        key = (namespace, name)
        with self._lock:
            srv = self._servers.get(key)
            if srv is None:
                srv = serve(ServiceHandler, state=(self, namespace, name), faults=self.faults, port=port)
                self._servers[key] = srv
            return srv.port

    def close(self, namespace: str, name: str) -> bool:
        with self._lock:
            srv = self._servers.pop((namespace, name), None)
            self.requests.pop((namespace, name), None)
            self.refused.pop((namespace, name), None)
            rejecting = self._rejecting.pop((namespace, name), None) is not None
        if srv is None or rejecting:  # not listening already
            return srv is not None
        srv.stop()
        return True

    def port(self, namespace: str, name: str) -> int | None:
        with self._lock:
            srv = self._servers.get((namespace, name))
            return srv.port if srv else None

    def url(self, namespace: str, name: str) -> str | None:
        port = self.port(namespace, name)
        return f"http://127.0.0.1:{port}" if port else None

    def ports(self) -> dict[str, int]:
        """``"namespace/name" -> port`` of every open Service."""
        with self._lock:
            return {f"{ns}/{n}": srv.port for (ns, n), srv in self._servers.items()}

    def on_event(self, event_type: str, obj: dict[str, Any]) -> None:
        """A ``KubeCluster.subscribe`` callback: open on Service ADDED, close on DELETED."""
        if obj.get("kind") not in (None, "Service"):
            return
        meta = obj.get("metadata") or {}
        ns, name = meta.get("namespace", "default"), meta.get("name")
        if not name:
            return
        if event_type in ("ADDED", "MODIFIED"):
            port = self.open(ns, name)
            if (obj.get("spec") or {}).get("type") == "LoadBalancer":
                self._publish(ns, name, port)
        elif event_type == "DELETED":
            self.close(ns, name)

    def _publish(self, namespace: str, name: str, port: int) -> None:
        """A LoadBalancer Service's address: ``status.loadBalancer.ingress[0]`` = 127.0.0.1 with the loopback
        ``ports`` that serve it (the sandbox's stand-in for the external IP; every Service port is routed)."""
        if self.kube is None:
            return
        from sandbox.kube.resources import BY_KEY

        want = {"ingress": [{"ip": "127.0.0.1", "ipMode": "VIP", "ports": [{"port": port, "protocol": "TCP"}]}]}

        def fn(svc: dict[str, Any]) -> dict[str, Any] | None:
            if (svc.get("spec") or {}).get("type") != "LoadBalancer" or \
                    (svc.get("status") or {}).get("loadBalancer") == want:
                return None
            svc["status"] = {"loadBalancer": want}
            return svc

        with contextlib.suppress(Exception):
            self.kube.store.mutate(BY_KEY[("", "services")], namespace, name, fn)

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            servers, self._servers = list(self._servers.values()), {}
            self._rejecting.clear()
        for srv in servers:
            with contextlib.suppress(Exception):
                srv.stop()
        self.pool.close()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {f"{ns}/{n}": {"port": srv.port, "requests": self.requests.get((ns, n), 0),
                                  "refused": self.refused.get((ns, n), 0)}
                    for (ns, n), srv in self._servers.items()}
