"""The IAM Credentials API's Regional Access Boundary lookup, the one Google host the product's own
clients call by a fixed name: google-auth (2.62) asks
``https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/{email}/allowedLocations`` after a
service-account token refresh (no setting turns it off; it is skipped only outside the default universe
domain or for ``*.rep.googleapis.com`` URLs). Without an answer it logs urllib3 retry warnings in every
flow run and tries again after its cooldown.

The sandbox answers it the way a client reaches Google through a corporate proxy: an HTTP CONNECT proxy
(``HTTPS_PROXY`` in the env file; ``NO_PROXY`` keeps loopback direct) that tunnels only
``iamcredentials.googleapis.com:443`` -- every other host gets 403 -- to a TLS server whose certificate for
that name is signed by a CA of the sandbox, trusted through ``REQUESTS_CA_BUNDLE`` (certifi's roots plus it).
The lookup needs the caller's access token (401 otherwise, as the API does) and answers every location.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
from pathlib import Path
from typing import Any

from sandbox.core import HttpError, JsonHandler, PromptStop, route
from sandbox.routing import relay
from sandbox.tls import ClusterCA, serve_tls

HOST = "iamcredentials.googleapis.com"
LOCATIONS = ["us-central1", "us-east1", "us-east4", "us-west1", "us-west4", "europe-west1", "europe-west4",
             "asia-east1", "asia-southeast1"]
_ROUTES: list = []


class IamHandler(JsonHandler):
    service = "iamcredentials"
    routes = _ROUTES


@route(_ROUTES, "GET", r"/v1/projects/-/serviceAccounts/(?P<email>[^/]+)/allowedLocations")
def _allowed_locations(h: IamHandler, email: str) -> dict[str, Any]:
    auth = h.headers.get("Authorization") or ""
    who, expired = h.server.state.tokens.check(auth.removeprefix("Bearer ").strip()) if auth.startswith(
        "Bearer ") else (None, False)
    if who is None or expired:
        raise HttpError(401, "Request had invalid authentication credentials.", reason="UNAUTHENTICATED")
    # every location: the boundary restricts nothing in the sandbox (the header is sent, as on GCP)
    return {"locations": LOCATIONS, "encodedLocations": "0x" + format((1 << len(LOCATIONS)) - 1, "X")}


class _Tunnel(socketserver.BaseRequestHandler):
    """``CONNECT host:443``: only the emulated host, spliced to its TLS server."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(10)
        head = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in head and len(head) < 16384:
                chunk = sock.recv(4096)
                if not chunk:
                    return
                head += chunk
        line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        target = line[1] if len(line) >= 2 and line[0] == "CONNECT" else ""
        if target != f"{HOST}:443":
            with contextlib.suppress(OSError):
                sock.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        upstream = socket.create_connection(("127.0.0.1", self.server.tls_port), timeout=10)  # type: ignore[attr-defined]
        with upstream:
            sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            sock.settimeout(None)
            upstream.settimeout(None)
            relay(sock, upstream, idle_s=30)


class _Proxy(PromptStop, socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class IamCredentials:
    """The lookup endpoint behind its proxy; ``env(state_dir)`` is what the env file adds."""

    def __init__(self, *, faults: Any, tokens: Any) -> None:
        self.faults, self.tokens = faults, tokens
        self.tls = ClusterCA("sandbox-google-ca", dns_names=(HOST,))
        self._server: Any = None
        self._proxy: _Proxy | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._server = serve_tls(IamHandler, state=self, faults=self.faults, context=self.tls.server_context())
        self._proxy = _Proxy(("127.0.0.1", 0), _Tunnel)
        self._proxy.tls_port = self._server.port  # type: ignore[attr-defined]
        self._thread = self._proxy.start_serving("iam-proxy")

    def stop(self) -> None:
        if self._proxy is not None:
            self._proxy.shutdown()
            self._proxy.server_close()
            self._proxy = None
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def proxy_url(self) -> str:
        assert self._proxy is not None
        return f"http://127.0.0.1:{self._proxy.server_address[1]}"

    def write_bundle(self, path: Path) -> Path:
        """certifi's roots plus this CA: what REQUESTS_CA_BUNDLE points at (real hosts still verify)."""
        import certifi

        path.write_bytes(Path(certifi.where()).read_bytes() + b"\n" + self.tls.ca_pem)
        return path

    def env(self, directory: Path) -> dict[str, str]:
        return {"HTTPS_PROXY": self.proxy_url, "https_proxy": self.proxy_url,
                "NO_PROXY": "127.0.0.1,localhost,::1", "no_proxy": "127.0.0.1,localhost,::1",
                "REQUESTS_CA_BUNDLE": str(directory / "google-ca-bundle.pem")}

    def snapshot(self) -> dict[str, Any]:
        return {"proxy": self.proxy_url if self._proxy else None}
