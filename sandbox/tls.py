"""TLS for the sandbox's Kubernetes API servers: a CA per cluster and a server certificate it signs.

GKE serves each cluster's control plane over HTTPS with a certificate signed by that cluster's own CA,
and returns the CA in ``masterAuth.clusterCaCertificate`` (base64 PEM); clients trust only that CA.
The sandbox does the same per ``KubeCluster``: :class:`ClusterCA` makes the CA and a server certificate
for ``127.0.0.1`` (IP SAN, as GKE's certificates name the endpoint IP), and :class:`TLSHTTPServer`
serves a handler over it. The TLS handshake runs in the request's thread, so one slow client cannot
stall the accept loop.

EC P-256 keys: generating one takes about a millisecond (an RSA-2048 key takes ~100 ms), and clusters
come and go by the dozen in tests. Clients do not care which key type the CA uses.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
import socket
import ssl
import tempfile
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sandbox.core import SandboxHTTPServer

HANDSHAKE_TIMEOUT_S = 10.0


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class ClusterCA:
    """A cluster's CA and the API server's certificate (SAN ``IP:127.0.0.1``, ``DNS:localhost``,
    ``DNS:kubernetes.default...`` like a real API server's)."""

    def __init__(self, common_name: str = "sandbox-cluster-ca", *, dns_names: tuple[str, ...] = ()) -> None:
        now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = _name(common_name)
        self.ca_cert = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
            .public_key(self.ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=365 * 5))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(self.ca_key, hashes.SHA256()))
        self.server_key = ec.generate_private_key(ec.SECP256R1())
        sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"),
                x509.DNSName("kubernetes"), x509.DNSName("kubernetes.default"),
                x509.DNSName("kubernetes.default.svc"), x509.DNSName("kubernetes.default.svc.cluster.local"),
                *(x509.DNSName(n) for n in dns_names)]  # another Google host this CA stands in for
        self.server_cert = (
            x509.CertificateBuilder().subject_name(_name("kube-apiserver")).issuer_name(ca_name)
            .public_key(self.server_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.ca_key, hashes.SHA256()))
        self._context: ssl.SSLContext | None = None

    @property
    def ca_pem(self) -> bytes:
        return self.ca_cert.public_bytes(serialization.Encoding.PEM)

    @property
    def ca_b64(self) -> str:
        """What GKE puts in ``masterAuth.clusterCaCertificate`` (and kubeconfigs in
        ``certificate-authority-data``)."""
        return base64.b64encode(self.ca_pem).decode()

    def server_context(self) -> ssl.SSLContext:
        if self._context is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            # ssl loads a chain only from files: write it to a private temp file for the call
            chain = self.server_cert.public_bytes(serialization.Encoding.PEM) + self.server_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            fd, path = tempfile.mkstemp(prefix="sandbox-apiserver-", suffix=".pem")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(chain)
                ctx.load_cert_chain(path)
            finally:
                os.unlink(path)
            ctx.set_alpn_protocols(["http/1.1"])
            self._context = ctx
        return self._context

    def client_context(self) -> ssl.SSLContext:
        """An SSL context that trusts only this CA (for sandbox-side callers and tests)."""
        return ssl.create_default_context(cadata=self.ca_pem.decode())


class TLSHTTPServer(SandboxHTTPServer):
    """A :class:`SandboxHTTPServer` that speaks HTTPS with ``context``."""

    def __init__(self, handler: Any, *, state: Any, faults: Any, context: ssl.SSLContext, port: int = 0) -> None:
        self.ssl_context = context
        super().__init__(handler, state=state, faults=faults, port=port)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        return self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(HANDSHAKE_TIMEOUT_S)
            request.do_handshake()
            request.settimeout(None)
        except (OSError, ssl.SSLError):  # plain http to an https port, a client that gave up, bad CA
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)


def serve_tls(handler: Any, *, state: Any, faults: Any, context: ssl.SSLContext, port: int = 0) -> TLSHTTPServer:
    """Start ``handler`` over HTTPS on 127.0.0.1 in a daemon thread and return the running server."""
    server = TLSHTTPServer(handler, state=state, faults=faults, context=context, port=port)
    server.start()
    return server
