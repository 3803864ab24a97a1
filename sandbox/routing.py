"""Service routing for the sandbox: L7 forwarding (the API server's service proxy, ingress-nginx) and the
Services' own loopback ports (kube-proxy: L4, one endpoint per connection).

* :func:`proxy` forwards the request a handler is serving (method, headers, body, query) to one of
  ``ports`` on 127.0.0.1 (round robin, skipping backends that refuse or drop the connection) and
  streams the reply back as it comes (fixed-length bodies copied, chunked and SSE bodies re-chunked
  piece by piece), over pooled keep-alive connections, so routing adds well under 2 ms per request.
  The kube API server's service proxy (``/api/v1/namespaces/N/services/S:P/proxy/...``) and the
  ingress controllers call it: they are L7 proxies that pick a backend per request.
* :class:`ServicePorts` gives each Service its own loopback port (a ClusterIP's, a LoadBalancer's). Like
  kube-proxy (iptables/IPVS: one DNAT per connection, kept by conntrack), it picks the endpoint once, when
  a connection opens — ``resolve(namespace, name)`` (``KubeCluster.routed_backends``: kube-proxy's
  programmed view, the Endpoints of ``endpoint_propagation`` cloud seconds ago, ``sandbox.kube.kubeproxy``)
  — and the connection is that endpoint's for its whole life: an in-process server (a model pod's) is
  handed the accepted socket itself (no relay, nothing added per request); a local process gets an L4
  splice. So a client's keep-alive connection keeps talking to the pod it first reached after a selector
  switch, until that pod (or the client) closes it; what the pod's server does at SIGTERM decides what the
  client sees then. A picked endpoint that no longer listens resets the connection (never another pod).
  No backend at all: no HTTP answer. kube-proxy programs a Service without endpoints as a REJECT (iptables
  ``KUBE-SERVICES ... has no endpoints -j REJECT``, icmp-port-unreachable; nftables/IPVS the same), so new
  connections are refused (ECONNREFUSED): the connection that finds no backend is reset before any byte
  and the port stops listening until a backend is routed again, then listens on the same port. Meanwhile
  the port stays bound, never listening (a ClusterIP stays its Service's): no other program on the machine
  may take it, another sandbox's Service included. (The API
  server's service proxy, ``sandbox.kube.cluster``, is different: it really answers 503 "no endpoints
  available for service".)
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import selectors
import socket
import socketserver
import struct
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

from urllib3.util import wait_for_read

from sandbox.core import LISTENING, Faults, PromptStop

# Hop-by-hop headers (RFC 9110 §7.6.1) and the ones we set ourselves.
_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
                  "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length", "server", "date"})
READ_CHUNK = 65536
BACKEND_TIMEOUT = 300.0  # a hung model server holds the request this long at most


class _Conn(http.client.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _open(conn: _Conn) -> bool:
    """Whether an idle connection is still open: nothing to read on it (a close, or bytes nobody asked for,
    would be readable)."""
    sock = conn.sock
    if sock is None:
        return False
    try:  # urllib3's wait polls (select() fails past FD_SETSIZE, 1024 descriptors: a busy sandbox has more)
        return not wait_for_read(sock, timeout=0)
    except (OSError, ValueError):
        return False


class ConnectionPool:
    """Idle keep-alive connections to loopback backends, per port (LIFO, bounded)."""

    def __init__(self, max_idle_per_port: int = 64, timeout: float = BACKEND_TIMEOUT) -> None:
        self.max_idle = max_idle_per_port
        self.timeout = timeout
        self._idle: dict[int, list[_Conn]] = {}
        self._lock = threading.Lock()

    def get(self, port: int, *, fresh: bool = False) -> tuple[_Conn, bool]:
        """A connection to ``port`` and whether it was reused (one may still close in the instant between).

        Idle connections the backend has closed are dropped here, as Envoy drops them when its event loop
        sees the close: the backend's keep-alive timeout never turns into a 503."""
        while not fresh:
            with self._lock:
                idle = self._idle.get(port)
                conn = idle.pop() if idle else None
            if conn is None:
                break
            if _open(conn):
                return conn, True
            conn.close()
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
          drop_headers: tuple[str, ...] = ()) -> None:
    """Forward ``handler``'s current request to one of ``ports`` (127.0.0.1) at ``path``, reply streamed.

    ``path`` may carry its own query string; otherwise the handler's query is appended. ``headers``
    are added to (or replace) the forwarded ones; ``drop_headers`` are not forwarded (the real API
    server's service proxy drops ``Authorization``). With no port, or none answering: a 503 ``Status``
    (``service`` names the Service in its message); a backend that accepted the request but never
    answers within the pool's timeout: 504 (never resent elsewhere). A refused backend is skipped for the
    next one, as the API server's proxy and nginx (``proxy_next_upstream error``) do; kube-proxy does not
    (:class:`ServicePorts`).
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
            conn, reused = pool.get(port, fresh=attempt > 0)
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


# ---- one loopback port per Service: kube-proxy's DNAT, one endpoint per connection ---------------------

Resolver = Callable[[str, str], list[int]]


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): what a client gets from a refused or dead DNAT target."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _splice(client: socket.socket, port: int) -> None:
    """An L4 relay to a backend outside this process (a local subprocess pod)."""
    try:
        backend = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:  # refused: the pod's server is gone while kube-proxy still sends there
        _reset(client)
        return
    backend.settimeout(None)
    for s_ in (client, backend):
        with contextlib.suppress(OSError):
            s_.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    relay(client, backend)


def relay(a: socket.socket, b: socket.socket, *, idle_s: float | None = None) -> None:
    """Bytes both ways between two connected sockets, a FIN passed on as a half-close, a reset as a reset,
    until both directions are done (or nothing came for ``idle_s``); both are closed then. A selector, not
    select(): that refuses descriptors past FD_SETSIZE (1024), and a busy sandbox has more."""
    peer = {a: b, b: a}
    sel = selectors.DefaultSelector()
    for s_ in peer:
        sel.register(s_, selectors.EVENT_READ)
    open_ = 2
    try:
        while open_:
            ready = sel.select(idle_s)
            if not ready:
                return
            for key, _ in ready:
                src: socket.socket = key.fileobj  # type: ignore[assignment]
                dst = peer[src]
                try:
                    data = src.recv(READ_CHUNK)
                except OSError:  # reset by that side: the other side is reset too
                    _reset(dst)
                    return
                if not data:
                    sel.unregister(src)
                    open_ -= 1
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    continue
                try:
                    dst.sendall(data)
                except OSError:
                    _reset(src)
                    return
    finally:
        sel.close()
        for s_ in peer:
            with contextlib.suppress(OSError):
                s_.close()


def hand_off(sock: socket.socket, client_address: Any, port: int) -> None:
    """The connection goes to the backend on ``port`` for its whole life, as a DNAT'd one: served by the
    in-process server listening there (no relay at all), spliced to a local process, reset when nothing
    listens there any more (the pod's server has exited or stopped accepting at SIGTERM)."""
    local = LISTENING.get(port)
    if local is not None:
        if not local.adopt(sock, client_address):
            _reset(sock)
        return
    threading.Thread(target=_splice, args=(sock, port), name=f"service-splice-{port}", daemon=True).start()


class _ServicePort(PromptStop, socketserver.TCPServer):
    """A Service's loopback port. Each accepted connection is routed once, when it opens (kube-proxy's
    DNAT on the SYN; conntrack keeps it), and stays with that endpoint until either side closes it."""

    allow_reuse_address = True
    allow_reuse_port = True  # its port is held beside it while it does not listen (ServicePorts.reject)
    request_queue_size = 128

    def __init__(self, routes: ServicePorts, namespace: str, name: str, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), socketserver.BaseRequestHandler)
        self.routes, self.namespace, self.name = routes, namespace, name
        self._thread = self.start_serving(f"service-{name}-{self.port}")

    @property
    def port(self) -> int:
        return self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        self.routes._route(self, request, client_address)

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def _hold(port: int) -> socket.socket | None:
    """A Service's ``port`` bound and never listening, beside its listener (SO_REUSEPORT, which both set: Linux
    lets sockets of one user share a port so): once the listener closes, connections are refused, no ``bind(0)``
    on the machine is given the port and no other program can bind it (a server's SO_REUSEADDR shares a port
    only with sockets that set it too). None if the port cannot be shared (nothing held: as before)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    return sock


class ServicePorts:
    """A loopback port per Service, routing every new connection to one of the Service's backends.

    ``resolve(namespace, name) -> list[int]`` (or an object with ``routed_backends``/``service_backends``,
    e.g. the ``KubeCluster``) is called once per connection; the connection keeps that backend.
    """

    def __init__(self, resolve: Resolver | Any, *, faults: Faults | None = None) -> None:
        fn = getattr(resolve, "routed_backends", None) or getattr(resolve, "service_backends", None)
        self.resolve: Resolver = fn if callable(fn) else resolve
        self.kube = resolve if hasattr(resolve, "store") else None  # to publish LoadBalancer addresses
        self.faults = faults  # HTTP faults belong to the servers behind: this port is L4, like kube-proxy
        self._servers: dict[tuple[str, str], _ServicePort] = {}
        self.connections: dict[tuple[str, str], int] = {}
        self.refused: dict[tuple[str, str], int] = {}  # connections reset for want of a Ready endpoint
        self._rejecting: dict[tuple[str, str], _ServicePort] = {}  # not listening: no endpoint routed
        # a rejecting Service whose listener has closed: its port, bound and not listening (None: could not)
        self._held: dict[tuple[str, str], socket.socket | None] = {}
        self._rr = itertools.count()
        self._stopped = threading.Event()
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Nothing to start: ports open per Service."""

    def _route(self, srv: _ServicePort, sock: socket.socket, client_address: Any) -> None:
        """One new connection: kube-proxy's pick among the programmed endpoints (round robin, as IPVS'
        default; iptables picks at random), then the connection is that endpoint's."""
        key = (srv.namespace, srv.name)
        try:
            backends = list(self.resolve(*key) or [])
        except Exception:  # noqa: BLE001 - the service vanished meanwhile: kube-proxy has no rule left either
            backends = []
        if not backends:  # kube-proxy's REJECT: a refused connection, never an HTTP answer (module doc)
            self.reject(*key)
            _reset(sock)
            return
        with self._lock:
            self.connections[key] = self.connections.get(key, 0) + 1
        hand_off(sock, client_address, backends[next(self._rr) % len(backends)])

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
        threading.Thread(target=self._stop_listening, args=(key, srv), name=f"service-reject-{name}",
                         daemon=True).start()

    def _stop_listening(self, key: tuple[str, str], srv: _ServicePort) -> None:
        """Close the listener (connections are refused), its port held first: never free in between. The
        Service may listen again once this is done (both listening would share the port's connections)."""
        held = _hold(srv.port)
        srv.stop()
        with self._lock:
            if self._rejecting.get(key) is srv and key not in self._held:
                self._held[key], held = held, None
        if held is not None:  # closed meanwhile
            held.close()

    def _release(self, key: tuple[str, str]) -> None:
        with self._lock:
            held = self._held.pop(key, None)
        if held is not None:
            held.close()

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
                with self._lock:
                    stopped = key in self._held
                if not routed or not stopped:
                    continue
                try:
                    srv: _ServicePort | None = _ServicePort(self, *key, port=old.port)
                except OSError:  # the port is busy a moment longer (the old listener closing): next period
                    continue
                self._release(key)  # listening: the port is the listener's again
                with self._lock:
                    if self._rejecting.get(key) is old and self._servers.get(key) is old:
                        self._servers[key] = srv  # type: ignore[assignment]
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
                srv = self._servers[key] = _ServicePort(self, namespace, name, port=port)
            return srv.port

    def close(self, namespace: str, name: str) -> bool:
        with self._lock:
            srv = self._servers.pop((namespace, name), None)
            self.connections.pop((namespace, name), None)
            self.refused.pop((namespace, name), None)
            rejecting = self._rejecting.pop((namespace, name), None) is not None
        self._release((namespace, name))
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
            held, self._held = list(self._held.values()), {}
        for sock in held:
            if sock is not None:
                sock.close()
        for srv in servers:
            with contextlib.suppress(Exception):
                srv.stop()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {f"{ns}/{n}": {"port": srv.port, "connections": self.connections.get((ns, n), 0),
                                  "refused": self.refused.get((ns, n), 0)}
                    for (ns, n), srv in self._servers.items()}
