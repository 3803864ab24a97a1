"""Cluster API authentication like GKE: HTTPS with the cluster's own CA, bearer tokens that expire,
anonymous requests limited to the health/version endpoints, gcloud's kubeconfig used unchanged."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from google.auth.credentials import AnonymousCredentials
from google.cloud import container_v1

from sandbox.app import Sandbox
from sandbox.tls import ClusterCA


@pytest.fixture(scope="module")
def sb(tmp_path_factory):
    with Sandbox.running(time_scale=0.001, state_dir=tmp_path_factory.mktemp("auth")) as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def cluster(sb):
    """A GKE cluster (its own API server), as GKE describes it: endpoint + masterAuth CA."""
    gke = container_v1.ClusterManagerClient(credentials=AnonymousCredentials(), transport="rest",
                                            client_options={"api_endpoint": sb.gke.url})
    parent = f"projects/{sb.project}/locations/us-central1-a"
    op = gke.create_cluster(parent=parent, cluster=container_v1.Cluster(name="auth", initial_node_count=1),
                            retry=None)
    httpx.post(f"{sb.gke.url}/v1/{parent}/operations/{op.name}:wait", timeout=10)
    return gke.get_cluster(name=f"{parent}/clusters/auth", retry=None)


def _client(cluster, **kw) -> httpx.Client:
    import base64

    ctx = ssl.create_default_context(cadata=base64.b64decode(cluster.master_auth.cluster_ca_certificate).decode())
    return httpx.Client(base_url=f"https://{cluster.endpoint}", verify=ctx, timeout=10, **kw)


def test_https_with_the_clusters_own_ca(sb, cluster):
    kube = sb.cluster_kube("auth")
    assert kube.url == f"https://{cluster.endpoint}"
    assert cluster.master_auth.cluster_ca_certificate == kube.tls.ca_b64 != sb.kube.tls.ca_b64
    with _client(cluster) as http:  # trusting only masterAuth's CA, checking the 127.0.0.1 SAN
        assert http.get("/version").status_code == 200
    with pytest.raises(httpx.ConnectError):  # the system trust store does not know it
        httpx.get(f"https://{cluster.endpoint}/version")
    other = ClusterCA().client_context()  # another cluster's CA
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"https://{cluster.endpoint}/version", verify=other)
    with pytest.raises(httpx.RemoteProtocolError):  # no plain http on the https port
        httpx.get(f"http://{cluster.endpoint}/version")


def test_anonymous_reads_only_health_and_version(cluster):
    with _client(cluster) as http:
        for path in ("/version", "/healthz", "/livez", "/readyz"):
            assert http.get(path).status_code == 200, path
        r = http.get("/api")
        assert r.status_code == 403
        assert r.json()["message"] == 'forbidden: User "system:anonymous" cannot get path "/api"'
        r = http.get("/api/v1/namespaces/default/pods")
        assert r.status_code == 403 and r.json()["reason"] == "Forbidden"
        assert r.json()["message"] == ('pods is forbidden: User "system:anonymous" cannot list resource "pods" in '
                                       'API group "" in the namespace "default"')


def test_unknown_or_expired_tokens_get_401(sb, cluster):
    unauthorized = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": "Unauthorized", "reason": "Unauthorized", "code": 401}
    good, _ = sb.tokens.issue(sb.google_account, lifetime_s=60, scaled=False)
    short, _ = sb.tokens.issue(sb.google_account, lifetime_s=0.2, scaled=False)
    with _client(cluster) as http:
        def get(token: str) -> httpx.Response:
            return http.get("/api/v1/namespaces", headers={"Authorization": f"Bearer {token}"})

        assert get(good).status_code == 200
        assert get(short).status_code == 200
        time.sleep(0.3)
        assert get(short).json() == unauthorized  # expired
        assert get("ya29.made-up").json() == unauthorized
        assert http.get("/version", headers={"Authorization": "Bearer nope"}).status_code == 401  # even /version
        assert http.get("/api/v1/namespaces", headers={"Authorization": "Basic dTpw"}).status_code == 401


def test_adc_tokens_come_from_the_sandbox_token_endpoint_and_expire(sb, cluster, monkeypatch):
    import google.auth
    import google.auth.transport.requests
    from google.auth.exceptions import RefreshError

    env = sb.env()
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", env["GOOGLE_APPLICATION_CREDENTIALS"])
    creds, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    creds.refresh(google.auth.transport.requests.Request())
    assert creds.service_account_email == sb.google_account and creds.token.startswith("ya29.")
    # the configured lifetime, scaled like every cloud delay (3600 s x 0.001)
    assert 1 <= (creds.expiry - creds.expiry.utcnow()).total_seconds() <= 5
    with _client(cluster) as http:
        r = http.get("/api/v1/namespaces", headers={"Authorization": f"Bearer {creds.token}"})
        assert r.status_code == 200
    # a key the endpoint never issued is refused the way Google refuses it
    forged = json.loads(Path(env["GOOGLE_APPLICATION_CREDENTIALS"]).read_text())
    forged["private_key_id"] = "0" * 40
    from google.oauth2 import service_account

    bad = service_account.Credentials.from_service_account_info(
        forged, scopes=["https://www.googleapis.com/auth/cloud-platform"])
    with pytest.raises(RefreshError, match="invalid_grant"):
        bad.refresh(google.auth.transport.requests.Request())


needs_tools = pytest.mark.skipif(not (shutil.which("gcloud") and shutil.which("kubectl")
                                      and shutil.which("gke-gcloud-auth-plugin")),
                                 reason="needs gcloud, kubectl and gke-gcloud-auth-plugin")


@needs_tools
def test_gcloud_get_credentials_then_kubectl_unchanged(sb, cluster, tmp_path):
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **sb.env(),
           "KUBECONFIG": str(tmp_path / "config")}
    run = {"capture_output": True, "text": True, "timeout": 120}
    out = subprocess.run(["gcloud", "container", "clusters", "get-credentials", "auth", "--zone", "us-central1-a"],
                         env=env, **run)
    assert out.returncode == 0, out.stderr
    written = (tmp_path / "config").read_text()
    config = yaml.safe_load(written)
    assert config["users"][0]["user"]["exec"]["command"] == "gke-gcloud-auth-plugin"
    assert config["clusters"][0]["cluster"] == {"certificate-authority-data": cluster.master_auth.cluster_ca_certificate,
                                                "server": f"https://{cluster.endpoint}"}
    kubectl = ["kubectl", f"--cache-dir={tmp_path / 'cache'}"]
    out = subprocess.run([*kubectl, "get", "pods", "-A"], env=env, **run)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([*kubectl, "auth", "whoami", "-o", "json"], env=env, **run)
    assert json.loads(out.stdout)["status"]["userInfo"]["username"] == sb.google_account
    assert (tmp_path / "config").read_text() == written  # nobody rewrote the user's kubeconfig
    # the plugin hands kubectl gcloud's token: a token the cluster does not know is refused
    out = subprocess.run([*kubectl, "get", "pods"], env={**env, "CLOUDSDK_AUTH_ACCESS_TOKEN": "ya29.stale"}, **run)
    assert out.returncode != 0 and "Unauthorized" in out.stderr


@needs_tools
def test_kubectl_create_token_for_a_service_account(sb, cluster, tmp_path):
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **sb.env(),
           "KUBECONFIG": str(tmp_path / "config")}
    run = {"capture_output": True, "text": True, "timeout": 120}
    subprocess.run(["gcloud", "container", "clusters", "get-credentials", "auth", "--zone", "us-central1-a"],
                   env=env, check=True, **run)
    kubectl = ["kubectl", f"--cache-dir={tmp_path / 'cache'}"]
    subprocess.run([*kubectl, "create", "serviceaccount", "bot"], env=env, check=True, **run)
    token = subprocess.run([*kubectl, "create", "token", "bot", "--duration=1h"], env=env, check=True,
                           **run).stdout.strip()
    with _client(cluster, headers={"Authorization": f"Bearer {token}"}) as http:
        review = http.post("/apis/authentication.k8s.io/v1/selfsubjectreviews",
                           json={"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).json()
        assert review["status"]["userInfo"]["username"] == "system:serviceaccount:default:bot"
        assert http.get("/api/v1/namespaces/default/pods").status_code == 403  # no role bound yet
        # TokenRequest refuses lifetimes under 10 minutes
        r = http.post("/api/v1/namespaces/default/serviceaccounts/bot/token", json={"spec": {"expirationSeconds": 60}})
        assert r.status_code == 403  # (the SA itself may not request tokens)
    out = subprocess.run([*kubectl, "create", "token", "bot", "--duration=5m"], env=env, **run)
    assert out.returncode != 0 and "may not specify a duration less than 10 minutes" in out.stderr
    # a bound token dies with its ServiceAccount
    subprocess.run([*kubectl, "delete", "serviceaccount", "bot"], env=env, check=True, **run)
    with _client(cluster, headers={"Authorization": f"Bearer {token}"}) as http:
        assert http.get("/api").status_code == 401


def test_google_auths_regional_access_boundary_lookup_is_answered(sb, monkeypatch, caplog):
    """google-auth asks iamcredentials.googleapis.com for the service account's allowed locations after a
    token refresh; with the env file's proxy and CA bundle it gets an answer (no urllib3 retry warnings, no
    delay), and the API's 401 without a token."""
    import logging

    import requests
    from google.auth import default
    from google.auth._regional_access_boundary_utils import get_service_account_rab_endpoint
    from google.auth.transport.requests import Request
    from google.oauth2 import _client

    for key, value in sb.env().items():
        monkeypatch.setenv(key, value)
    creds, _ = default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    creds.refresh(Request())
    url = get_service_account_rab_endpoint(creds.service_account_email)
    with caplog.at_level(logging.WARNING, logger="urllib3"):
        got = _client._lookup_regional_access_boundary(Request(), url,
                                                       headers={"authorization": f"Bearer {creds.token}"})
    assert got and got["encodedLocations"].startswith("0x") and "us-central1" in got["locations"]
    assert not [r for r in caplog.records if "iamcredentials" in r.getMessage()]
    assert requests.get(url, timeout=10).status_code == 401
    # only that host is tunnelled: the proxy refuses every other (nothing leaves the machine)
    with pytest.raises(requests.exceptions.ProxyError):
        requests.get("https://storage.googleapis.com/", timeout=10)


def test_the_lookup_tunnel_serves_connections_on_descriptors_past_fd_setsize(sb, monkeypatch):
    """The tunnel relays both ways of a CONNECT; a busy sandbox holds more than 1024 descriptors, where
    select() refuses a socket and the lookup's connection would be dropped. The API's 401 still arrives."""
    import requests

    for key, value in sb.env().items():
        monkeypatch.setenv(key, value)
    padding = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # the next sockets land past 1024
    try:
        r = requests.get("https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/"
                         "x@y.iam.gserviceaccount.com/allowedLocations", timeout=10)
        assert r.status_code == 401
    finally:
        for fd in padding:
            os.close(fd)
