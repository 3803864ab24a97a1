"""The one place that makes clients. The sandbox and real GCP differ only in the settings used here."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import google.auth.exceptions
import requests
import yaml
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry

from tasks.settings import Settings, get_settings

# Transient for Google APIs: retried with backoff. 400/403/404/409 and quota errors are not.
# The REST transport raises requests' own exceptions for resets, timeouts and cut-off bodies: those
# are OSErrors, not builtin ConnectionErrors, so they are listed by name.
GOOGLE_TRANSIENT = (gexc.TooManyRequests, gexc.ServiceUnavailable, gexc.InternalServerError,
                    gexc.BadGateway, gexc.GatewayTimeout, gexc.DeadlineExceeded, ConnectionError, TimeoutError,
                    requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                    requests.exceptions.ChunkedEncodingError, google.auth.exceptions.TransportError)
# GKE runs one mutating operation per cluster: others get 400 FAILED_PRECONDITION until it is done
# ("Cluster is running incompatible operation operation-…", reason CLUSTER_ALREADY_HAS_OPERATION, or
# "Operation operation-… is currently upgrading cluster C. Please wait and try again once it is done.").
_GKE_BUSY = re.compile(r"incompatible operation|is currently .*please wait and try again", re.I | re.S)


def gke_busy(exc: BaseException) -> bool:
    """GKE said another operation holds the cluster: wait and retry, the request itself is fine."""
    if not isinstance(exc, gexc.BadRequest | gexc.FailedPrecondition):
        return False
    return getattr(exc, "reason", None) == "CLUSTER_ALREADY_HAS_OPERATION" or bool(_GKE_BUSY.search(str(exc)))


def google_transient(exc: BaseException) -> bool:
    return isinstance(exc, GOOGLE_TRANSIENT) or gke_busy(exc)


def google_retry(settings: Settings | None = None) -> Retry:
    """Explicit retry for every Google call: the library defaults retry 503 for 20 s to 10 min."""
    s = settings or get_settings()
    return Retry(predicate=google_transient, initial=s.retry_initial_s,
                 maximum=s.retry_max_s, multiplier=2.0, timeout=s.retry_deadline_s)


def gcp_credentials(settings: Settings | None = None):
    s = settings or get_settings()
    if s.gcp_auth == "anonymous":
        from google.auth.credentials import AnonymousCredentials

        return AnonymousCredentials()
    if s.gcp_auth == "block":
        # prefect-gcp is optional and slow to import: only here, only when asked for.
        from prefect_gcp import GcpCredentials

        return GcpCredentials.load(s.gcp_credentials_block).get_credentials_from_service_account()
    import google.auth

    creds, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    return creds


def _options(endpoint: str | None) -> dict[str, Any] | None:
    return {"api_endpoint": endpoint} if endpoint else None


def cluster_manager(settings: Settings | None = None):
    from google.cloud import container_v1

    s = settings or get_settings()
    # REST, sync: the async REST transport is broken, and REST works through plain HTTP proxies.
    return container_v1.ClusterManagerClient(credentials=gcp_credentials(s), transport="rest",
                                             client_options=_options(s.gke_endpoint))


def addresses_client(settings: Settings | None = None):
    """Compute GlobalAddressesClient: the static IPs an Ingress names (kubernetes.io/ingress.global-static-ip-name)."""
    from google.cloud import compute_v1

    s = settings or get_settings()
    return compute_v1.GlobalAddressesClient(credentials=gcp_credentials(s), transport="rest",
                                            client_options=_options(s.compute_endpoint))


def compute_clients(settings: Settings | None = None):
    """(regions, projects, accelerator types) Compute clients."""
    from google.cloud import compute_v1

    s = settings or get_settings()
    creds, opts = gcp_credentials(s), _options(s.compute_endpoint)
    return (compute_v1.RegionsClient(credentials=creds, transport="rest", client_options=opts),
            compute_v1.ProjectsClient(credentials=creds, transport="rest", client_options=opts),
            compute_v1.AcceleratorTypesClient(credentials=creds, transport="rest", client_options=opts))


def google_access_token(settings: Settings | None = None) -> str | None:
    """A bearer token for the GKE master (what gke-gcloud-auth-plugin would fetch)."""
    s = settings or get_settings()
    creds = gcp_credentials(s)
    if s.gcp_auth == "anonymous":
        return None
    import google.auth.transport.requests

    creds.refresh(google.auth.transport.requests.Request())
    return creds.token


def kubeconfig_path(*, project: str, location: str, cluster: str, settings: Settings | None = None) -> Path:
    s = settings or get_settings()
    return s.kube_dir / f"{project}_{location}_{cluster}.yaml"


def write_kubeconfig(*, project: str, location: str, cluster: str, endpoint: str, ca_cert_b64: str,
                     token: str | None, settings: Settings | None = None) -> Path:
    """Like `gcloud container clusters get-credentials`, but with a token instead of the auth plugin."""
    s = settings or get_settings()
    name = f"gke_{project}_{location}_{cluster}"
    server = endpoint if "://" in endpoint else f"{s.cluster_scheme}://{endpoint}"
    cluster_entry: dict[str, Any] = {"server": server}
    if server.startswith("https://") and ca_cert_b64:
        cluster_entry["certificate-authority-data"] = ca_cert_b64
    user: dict[str, Any] = {"token": token} if token else {}
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": name,
        "clusters": [{"name": name, "cluster": cluster_entry}],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
    }
    from tasks.credfiles import write_private

    path = kubeconfig_path(project=project, location=location, cluster=cluster, settings=s)
    return write_private(path, yaml.safe_dump(config, sort_keys=False))  # 0600, atomic


def kube_client(kubeconfig: Path | str | None = None):
    """A kubernetes ApiClient for a kubeconfig file (default: $KUBECONFIG / ~/.kube/config).

    Cached per file and modification time: building one parses YAML and opens a connection pool,
    which would otherwise sit on the path between "pod Ready" and "flow knows".
    """
    import os

    path = str(kubeconfig) if kubeconfig else os.environ.get("KUBECONFIG", str(Path.home() / ".kube/config"))
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        mtime = 0
    return _kube_client(path, mtime)


@lru_cache(maxsize=32)
def _kube_client(path: str, mtime: int):
    from kubernetes import config

    return config.new_client_from_config(config_file=path)


def kube_http(api_client, *, timeout: float = 30.0):
    """An httpx client that talks to the API server with the same credentials (service proxy, streams).

    Cached with its ApiClient: building an SSL context per call costs tens of milliseconds.
    """
    return _kube_http(api_client, timeout)


@lru_cache(maxsize=32)
def _kube_http(api_client, timeout: float):
    import httpx

    cfg = api_client.configuration
    headers = {}
    auth = cfg.get_api_key_with_prefix("authorization") or cfg.get_api_key_with_prefix("BearerToken")
    if auth:
        headers["Authorization"] = auth
    verify: Any = False  # plain http (the sandbox): no TLS context to build
    if cfg.host.startswith("https://"):
        verify = cfg.ssl_ca_cert or cfg.verify_ssl
    cert = (cfg.cert_file, cfg.key_file) if cfg.cert_file else None
    return httpx.Client(base_url=cfg.host, headers=headers, verify=verify, cert=cert, timeout=timeout)


@dataclass(frozen=True)
class VertexClients:
    models: Any  # aiplatform_v1.ModelServiceClient
    endpoints: Any  # aiplatform_v1.EndpointServiceClient
    predictions: Any  # aiplatform_v1.PredictionServiceClient
    session: Any  # google.auth AuthorizedSession: rawPredict's raw body and Cloud Quotas (no GAPIC client)
    base_url: str  # the regional Vertex endpoint, with scheme
    quotas_url: str


def vertex_clients(region: str, settings: Settings | None = None) -> VertexClients:
    """Vertex AI clients of one region (the API is regional), REST like the GKE/Compute clients."""
    s = settings or get_settings()
    return _vertex_clients(region, s.vertex_endpoint, s.cloudquotas_endpoint, s.gcp_auth, s.gcp_credentials_block)


@lru_cache(maxsize=16)
def _vertex_clients(region: str, endpoint: str | None, quotas: str, auth: str, block: str | None) -> VertexClients:
    # aiplatform is big: imported here, so `import flows` stays fast.
    from google.auth.transport.requests import AuthorizedSession
    from google.cloud import aiplatform_v1

    creds = gcp_credentials()
    host = endpoint or f"https://{region}-aiplatform.googleapis.com"
    kw: dict[str, Any] = {"credentials": creds, "transport": "rest", "client_options": {"api_endpoint": host}}
    return VertexClients(models=aiplatform_v1.ModelServiceClient(**kw),
                         endpoints=aiplatform_v1.EndpointServiceClient(**kw),
                         predictions=aiplatform_v1.PredictionServiceClient(**kw),
                         session=AuthorizedSession(creds), base_url=host.rstrip("/"), quotas_url=quotas.rstrip("/"))


def hf_api(token: str | None, settings: Settings | None = None):
    from huggingface_hub import HfApi

    s = settings or get_settings()
    return HfApi(endpoint=s.hf_endpoint, token=token or False)


def slack_client(settings: Settings | None = None):
    """A Slack WebClient that waits out 429s, or None when no token is configured."""
    from slack_sdk import WebClient
    from slack_sdk.http_retry.builtin_handlers import ConnectionErrorRetryHandler, RateLimitErrorRetryHandler

    s = settings or get_settings()
    if s.slack_token is None:
        return None
    client = WebClient(token=s.slack_token.get_secret_value(), base_url=s.slack_api_url, timeout=10)
    client.retry_handlers.extend([RateLimitErrorRetryHandler(max_retry_count=2), ConnectionErrorRetryHandler()])
    return client


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
