"""Client settings for a sandbox KubeCluster, plain HTTP or HTTPS + bearer token (whichever it serves)."""

from __future__ import annotations

import ssl
import tempfile
from typing import Any

from kubernetes import client

ADMIN = "sandbox-admin@llm-fleet-demo.iam.gserviceaccount.com"


def admin_token(kube: Any) -> str | None:
    auth = getattr(kube, "auth", None)
    return auth.google.issue(ADMIN, scaled=False)[0] if auth is not None else None  # real hour, not scaled


def ca_file(kube: Any) -> str | None:
    tls = getattr(kube, "tls", None)
    if tls is None or not kube.url.startswith("https"):
        return None
    f = tempfile.NamedTemporaryFile("wb", prefix="tests-ca-", suffix=".crt", delete=False)  # noqa: SIM115 - lives for the test run
    f.write(tls.ca_pem() if callable(tls.ca_pem) else tls.ca_pem)
    f.close()
    return f.name


def configuration(kube: Any) -> client.Configuration:
    cfg = client.Configuration(host=kube.url)
    if (ca := ca_file(kube)) is not None:
        cfg.ssl_ca_cert = ca
    if (token := admin_token(kube)) is not None:
        cfg.api_key = {"authorization": f"Bearer {token}"}
    return cfg


def kubeconfig(kube: Any) -> dict[str, Any]:
    cluster: dict[str, Any] = {"server": kube.url}
    tls = getattr(kube, "tls", None)
    if tls is not None and kube.url.startswith("https"):
        cluster["certificate-authority-data"] = tls.ca_b64() if callable(tls.ca_b64) else tls.ca_b64
    return {"apiVersion": "v1", "kind": "Config", "current-context": "sandbox",
            "clusters": [{"name": "sandbox", "cluster": cluster}],
            "users": [{"name": "sandbox", "user": {"token": admin_token(kube) or "sandbox"}}],
            "contexts": [{"name": "sandbox", "context": {"cluster": "sandbox", "user": "sandbox"}}]}


def httpx_kwargs(kube: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"base_url": kube.url}
    if (ca := ca_file(kube)) is not None:
        out["verify"] = ssl.create_default_context(cafile=ca)
    if (token := admin_token(kube)) is not None:
        out["headers"] = {"Authorization": f"Bearer {token}"}
    return out
