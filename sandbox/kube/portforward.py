"""``POST .../pods/NAME/portforward``: the SPDY/3.1 stream protocol kubectl speaks, bridged to the pod's server.

kubectl 1.27–1.30 (the minors this API server reports) speak SPDY/3.1 with the
``portforward.k8s.io`` sub-protocol (client-go ``tools/portforward``); 1.31+ first try a WebSocket
tunnel and fall back to SPDY when the upgrade is refused, which is what a 1.30 API server does.
Per forwarded connection kubectl opens two streams with headers ``streamType: error|data``,
``port: N``, ``requestID: K``; the kubelet dials the pod's port, copies bytes both ways on the data
stream, writes a failure message (if any) on the error stream and closes both (kubelet
``pkg/kubelet/cri/streaming/portforward/httpstream.go``). Here the "pod network namespace" is the
pod's model server on its own loopback port: only the port the container listens on connects.
``exec``/``attach`` answer a clear Status instead (no container shell exists in the sandbox).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import zlib
from typing import TYPE_CHECKING, Any

from sandbox.kube.store import not_found, status_error

if TYPE_CHECKING:
    from sandbox.kube.cluster import KubeCluster

PROTOCOL = "portforward.k8s.io"
SPDY = "SPDY/3.1"

# SPDY/3 header-compression dictionary (draft 3, section 2.6.10.1): length-prefixed words, then a tail.
_NAMES = ("options head post put delete trace accept accept-charset accept-encoding accept-language "
          "accept-ranges age allow authorization cache-control connection content-base content-encoding "
          "content-language content-length content-location content-md5 content-range content-type date etag "
          "expect expires from host if-match if-modified-since if-none-match if-range if-unmodified-since "
          "last-modified location max-forwards pragma proxy-authenticate proxy-authorization range referer "
          "retry-after server te trailer transfer-encoding upgrade user-agent vary via warning www-authenticate "
          "method get status")
_WORDS = [*_NAMES.split(" "), "200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin"]
_TAIL = ("100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
         "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized"
         "403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable"
         "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
         "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
         "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.")
DICTIONARY = b"".join(struct.pack(">I", len(w)) + w.encode() for w in _WORDS) + _TAIL.encode()

SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = 1, 2, 3, 4, 6, 7, 8, 9
FLAG_FIN = 0x01
CHUNK = 32 * 1024


def encode_headers(comp: Any, headers: dict[str, str]) -> bytes:
    raw = struct.pack(">I", len(headers))
    for k, v in headers.items():
        raw += struct.pack(">I", len(k)) + k.lower().encode() + struct.pack(">I", len(v)) + v.encode()
    return comp.compress(raw) + comp.flush(zlib.Z_SYNC_FLUSH)


def decode_headers(decomp: Any, block: bytes) -> dict[str, str]:
    raw = decomp.decompress(block)
    (n,), off, out = struct.unpack_from(">I", raw), 4, {}
    for _ in range(n):
        (kl,) = struct.unpack_from(">I", raw, off)
        key = raw[off + 4:off + 4 + kl].decode()
        off += 4 + kl
        (vl,) = struct.unpack_from(">I", raw, off)
        out[key.lower()] = raw[off + 4:off + 4 + vl].decode().split("\x00")[0]
        off += 4 + vl
    return out


def control_frame(ftype: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">HHI", 0x8003, ftype, (flags << 24) | len(payload)) + payload


def data_frame(stream_id: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">II", stream_id & 0x7FFFFFFF, (flags << 24) | len(payload)) + payload


class _Pair:
    def __init__(self) -> None:
        self.error: int | None = None
        self.data: int | None = None
        self.port = 0
        self.sock: socket.socket | None = None
        self.done = False


class SpdySession:
    """One upgraded connection: many (error, data) stream pairs, one per forwarded local connection."""

    def __init__(self, rfile: Any, wfile: Any, connect: Any) -> None:
        self.rfile, self.wfile, self.connect = rfile, wfile, connect
        self.comp = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY,
                                     zdict=DICTIONARY)
        self.decomp = zlib.decompressobj(zdict=DICTIONARY)
        self.wlock = threading.RLock()  # also orders the shared header compressor
        self.pairs: dict[str, _Pair] = {}
        self.by_stream: dict[int, _Pair] = {}
        self.closed = threading.Event()

    def send(self, frame: bytes) -> None:
        with self.wlock:
            if self.closed.is_set():
                return
            try:
                self.wfile.write(frame)
                self.wfile.flush()
            except OSError:
                self.closed.set()

    def _read(self, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            chunk = self.rfile.read(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    def run(self) -> None:
        try:
            while not self.closed.is_set():
                head = self._read(8)
                if head is None:
                    break
                first, second = struct.unpack(">II", head)
                flags, length = second >> 24, second & 0xFFFFFF
                payload = self._read(length) if length else b""
                if payload is None:
                    break
                if first & 0x80000000:
                    self._control((first & 0xFFFF), flags, payload)
                else:
                    self._data(first & 0x7FFFFFFF, flags, payload)
        except (OSError, ValueError, zlib.error, struct.error):
            pass
        finally:
            self.closed.set()
            for pair in list(self.pairs.values()):
                self._close_backend(pair)

    def _control(self, ftype: int, flags: int, payload: bytes) -> None:
        if ftype == SYN_STREAM:
            (sid,) = struct.unpack_from(">I", payload)
            sid &= 0x7FFFFFFF
            headers = decode_headers(self.decomp, payload[10:])
            with self.wlock:  # the compressor's state is shared by every reply on this connection
                block = encode_headers(self.comp, {})
            self.send(control_frame(SYN_REPLY, 0, struct.pack(">I", sid) + block))
            self._stream(sid, headers)
        elif ftype == PING:
            self.send(control_frame(PING, 0, payload[:4]))
        elif ftype == RST_STREAM:
            (sid,) = struct.unpack_from(">I", payload)
            pair = self.by_stream.get(sid & 0x7FFFFFFF)
            if pair is not None:
                self._close_backend(pair)
        elif ftype == GOAWAY:
            self.closed.set()
        elif ftype == HEADERS:
            with contextlib.suppress(Exception):
                decode_headers(self.decomp, payload[4:])  # keep the shared zlib stream in step

    def _stream(self, sid: int, headers: dict[str, str]) -> None:
        rid = headers.get("requestid", "")
        pair = self.pairs.setdefault(rid, _Pair())
        self.by_stream[sid] = pair
        try:
            pair.port = int(headers.get("port", "0"))
        except ValueError:
            pair.port = 0
        if headers.get("streamtype") == "error":
            pair.error = sid
        elif headers.get("streamtype") == "data":
            pair.data = sid
        if pair.error is not None and pair.data is not None and pair.sock is None and not pair.done:
            self._start(pair)

    def _start(self, pair: _Pair) -> None:
        try:
            pair.sock = self.connect(pair.port)
        except OSError as exc:
            self.send(data_frame(pair.error or 0, 0, str(exc).encode()))
            self._finish(pair)
            return
        threading.Thread(target=self._pump, args=(pair,), name=f"portforward-{pair.port}", daemon=True).start()

    def _pump(self, pair: _Pair) -> None:
        sock = pair.sock
        try:
            while sock is not None:
                chunk = sock.recv(CHUNK)
                if not chunk:
                    break
                self.send(data_frame(pair.data or 0, 0, chunk))
        except OSError:
            pass
        self._finish(pair)

    def _finish(self, pair: _Pair) -> None:
        if pair.done:
            return
        pair.done = True
        if pair.data is not None:
            self.send(data_frame(pair.data, FLAG_FIN, b""))
        if pair.error is not None:
            self.send(data_frame(pair.error, FLAG_FIN, b""))
        self._close_backend(pair)

    def _data(self, sid: int, flags: int, payload: bytes) -> None:
        pair = self.by_stream.get(sid)
        if pair is None or sid != pair.data or pair.sock is None:
            return  # the client's (empty) error stream, or a stream already gone
        try:
            if payload:
                pair.sock.sendall(payload)
            if flags & FLAG_FIN:
                pair.sock.shutdown(socket.SHUT_WR)  # the local side is done sending; the reply may still come
        except OSError:
            self._finish(pair)

    @staticmethod
    def _close_backend(pair: _Pair) -> None:
        if pair.sock is not None:
            with contextlib.suppress(OSError):
                pair.sock.close()


def listen_ports(cluster: KubeCluster, pod: dict[str, Any]) -> set[int]:
    """The ports the pod's container really listens on (the engine's --port/PORT, else its containerPorts)."""
    with cluster.controller.runs_lock:
        run = cluster.controller.runs.get(pod["metadata"]["uid"])
    info = getattr(getattr(run, "server", None), "info", None)
    if info is not None and getattr(info, "port", None):
        return {int(info.port)}
    return {int(p["containerPort"]) for c in (pod.get("spec") or {}).get("containers") or []
            for p in c.get("ports") or [] if p.get("containerPort")}


def serve_portforward(h: Any, cluster: KubeCluster, namespace: str, name: str) -> None:
    from sandbox.kube.controllers import PODS

    pod = cluster.store.get(PODS, namespace, name)
    if pod is None:
        raise not_found(PODS, name)
    upgrade = (h.headers.get("Upgrade") or "").lower()
    if "websocket" in upgrade:
        # A 1.30 API server has no WebSocket port-forward (PortForwardWebsockets is alpha, off):
        # kubectl 1.31+ treats this as an upgrade failure and falls back to SPDY.
        raise status_error(400, "BadRequest", "unable to upgrade connection: websocket port-forward is not "
                           "enabled on this server (PortForwardWebsockets)")
    if h.command != "POST" or SPDY.lower() not in upgrade:
        raise status_error(400, "BadRequest", "Upgrade request required")
    offered = [p.strip() for v in h.headers.get_all("X-Stream-Protocol-Version") or [] for p in v.split(",")]
    if offered and PROTOCOL not in offered:
        raise status_error(403, "Forbidden", f"unable to upgrade: unable to negotiate protocol: client supports "
                           f"{offered}, server accepts [{PROTOCOL}]")
    if not (pod.get("spec") or {}).get("nodeName"):
        raise status_error(400, "BadRequest", f"pod {name} does not have a host assigned")
    uid = pod["metadata"]["uid"]

    def connect(port: int) -> socket.socket:
        live = cluster.store.get(PODS, namespace, name)
        backend = cluster.pod_port(namespace, name) if live is not None else None
        if live is None or backend is None or port not in listen_ports(cluster, live):
            raise OSError(f"error forwarding port {port} to pod {uid}, uid : failed to execute portforward in "
                          f"network namespace: failed to connect to localhost:{port} inside namespace "
                          f"\"{uid}\", IPv4: dial tcp4 127.0.0.1:{port}: connect: connection refused ")
        return socket.create_connection(("127.0.0.1", int(backend)), timeout=None)

    h.body_bytes()
    h.send_response(101, "Switching Protocols")
    h.send_header("Connection", "Upgrade")
    h.send_header("Upgrade", SPDY)
    h.send_header("X-Stream-Protocol-Version", PROTOCOL)
    h.end_headers()
    h.wfile.flush()
    h.close_connection = True
    SpdySession(h.rfile, h.wfile, connect).run()


def refuse_exec(sub: str, name: str) -> None:
    raise status_error(400, "BadRequest", f"{sub} is not supported in the sandbox: pod {name} runs an emulated "
                       "model server, not a container with a shell; use kubectl logs, kubectl port-forward or "
                       "the service proxy instead")
