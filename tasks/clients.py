"""The one place that makes clients. The sandbox and real GCP differ only in the settings used here."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import google.auth.exceptions
import httpx
import requests
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry

from manifests import yamlio
from manifests.errors import FleetError
from tasks.credfiles import ca_file, kubeconfig_path, write_private
from tasks.settings import Settings, get_settings

# Transient for Google APIs: retried with backoff. 400/403/404/409 and quota errors are not.
# The REST transport raises requests' own exceptions for resets, timeouts and cut-off bodies: those
# are OSErrors, not builtin ConnectionErrors, so they are listed by name; httpx's for Compute's.
GOOGLE_TRANSIENT = (gexc.TooManyRequests, gexc.ServiceUnavailable, gexc.InternalServerError,
                    gexc.BadGateway, gexc.GatewayTimeout, gexc.DeadlineExceeded, ConnectionError, TimeoutError,
                    requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                    requests.exceptions.ChunkedEncodingError, google.auth.exceptions.TransportError,
                    httpx.TransportError)
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
    """The configured Google credentials: one object per key source, shared by every client.

    Parsing a service-account key is tens of milliseconds of RSA work, and a shared object fetches one
    token for all clients and refreshes it once (google-auth credentials are safe to share across
    threads). A changed key file (new path or mtime) gives new credentials.
    """
    s = settings or get_settings()
    return _gcp_credentials(s.gcp_auth, s.gcp_credentials_block, *_adc_source())


def _adc_source() -> tuple[str, float]:
    """The file google.auth.default reads (the env var's, else gcloud's ADC file) and its mtime."""
    import os

    path = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS") or str(
        Path(os.environ.get("CLOUDSDK_CONFIG") or "~/.config/gcloud").expanduser()
        / "application_default_credentials.json")
    try:
        return path, os.stat(path).st_mtime
    except OSError:
        return path, 0.0


@lru_cache(maxsize=8)
def _gcp_credentials(auth: str, block: str | None, adc_path: str, adc_mtime: float):
    if auth == "anonymous":
        from google.auth.credentials import AnonymousCredentials

        return AnonymousCredentials()
    if auth == "block":
        # prefect-gcp is optional and slow to import: only here, only when asked for.
        from prefect_gcp import GcpCredentials

        return GcpCredentials.load(block).get_credentials_from_service_account()
    import google.auth

    creds, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    return creds


def _options(endpoint: str | None) -> dict[str, Any] | None:
    return {"api_endpoint": endpoint} if endpoint else None


def google_client(cls: type, endpoint: str | None, settings: Settings | None = None, **kwargs: Any):
    """One client of ``cls`` per (credentials, endpoint, options) in a process, made on first use.

    A Google client is made to be kept: each new one copies the credentials
    (``with_always_use_jwt_access``), and each copy signs its own JWT and looks up its regional access
    boundary (an HTTPS call to iamcredentials) and opens its own connections. A task that made one per
    call paid all of that every call (184 boundary lookups in one test module of 21 deploys). The
    clients are thread-safe; new credentials (a rotated key) or another endpoint give a new client.
    """
    return _google_client(cls, gcp_credentials(settings), endpoint, tuple(sorted(kwargs.items())))


@lru_cache(maxsize=32)
def _google_client(cls: type, creds: Any, endpoint: str | None, kwargs: tuple[tuple[str, Any], ...]):
    return cls(credentials=creds, client_options=_options(endpoint), **dict(kwargs))


def cluster_manager(settings: Settings | None = None):
    from google.cloud import container_v1

    s = settings or get_settings()
    # REST, sync: the async REST transport is broken, and REST works through plain HTTP proxies.
    return google_client(container_v1.ClusterManagerClient, s.gke_endpoint, s, transport="rest")


def storage_client(*, project: str, settings: Settings | None = None):
    """google-cloud-storage's client (JSON API over requests); its uploads retry by their own policy."""
    from google.cloud import storage

    s = settings or get_settings()
    return google_client(storage.Client, s.storage_endpoint, s, project=project)


class GoogleToken:
    """A Google access token of the configured credentials, for REST APIs without a client library
    (``get(force=True)`` after a 401); None when the settings say anonymous."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self._request: Any = None

    def get(self, *, force: bool = False) -> str | None:
        if self.settings.gcp_auth == "anonymous":
            return None
        creds = gcp_credentials(self.settings)
        if force or not creds.valid:
            import google.auth.transport.requests

            self._request = self._request or google.auth.transport.requests.Request()
            creds.refresh(self._request)
        return creds.token


def artifact_registry_http(settings: Settings | None = None):
    """httpx client of Artifact Registry's REST API (v1), with the product's Google credentials."""
    s = settings or get_settings()
    return _google_rest(s.artifactregistry_endpoint.rstrip("/") + "/v1/", s.gcp_auth, s.gcp_credentials_block)


COMPUTE_ENDPOINT = "https://compute.googleapis.com"


def compute_http(settings: Settings | None = None):
    """httpx client of Compute Engine's REST API (v1), with the product's Google credentials.

    The product only reads Compute (quotas, accelerator types, a static IP, subnets, images, VM operations):
    plain JSON, as for Artifact Registry. google-cloud-compute's clients import ~1,000 message classes first,
    ~2 CPU-s in every process that made one (each flow run that provisions, the worker's fork server)."""
    s = settings or get_settings()
    endpoint = (s.compute_endpoint or COMPUTE_ENDPOINT).rstrip("/")
    base = endpoint if "://" in endpoint else f"https://{endpoint}"
    return _google_rest(base + "/compute/v1/", s.gcp_auth, s.gcp_credentials_block)


@lru_cache(maxsize=8)
def _google_rest(base_url: str, auth: str, block: str | None):
    """One httpx client per Google REST API and credentials source (``auth``, ``block``: the cache key; a
    changed source gives a new client), sending the current token (:class:`GoogleToken`)."""
    return httpx.Client(base_url=base_url, auth=_bearer_auth(GoogleToken()), timeout=30.0)


def compute_get(*segments: str, **params: str) -> dict[str, Any]:
    """GET ``projects/…`` from Compute (path segments, each URL-quoted as the client library quoted them),
    retried as every Google call is (:func:`google_retry`). An error is google.api_core's exception for its
    status (NotFound, Forbidden, ServiceUnavailable…), as the client library raised it, with Compute's message."""
    s = get_settings()
    path = "/".join(quote(segment, safe="") for segment in segments)

    def call() -> dict[str, Any]:
        resp = compute_http(s).get(path, params=params or None, timeout=s.call_timeout_s)
        if resp.is_error:
            raise _google_error(resp)
        return resp.json()

    return google_retry(s)(call)()


def compute_aggregated(project: str, kind: str, **params: str):
    """(scope, items) of ``projects/P/aggregated/KIND``, every page (``nextPageToken`` → ``pageToken``):
    ``("zones/us-central1-a", [...])``; scopes with no KIND (Compute sends a warning there) are skipped."""
    while True:
        page = compute_get("projects", project, "aggregated", kind, **params)
        for scope, scoped in (page.get("items") or {}).items():
            if scoped.get(kind):
                yield scope, scoped[kind]
        if not page.get("nextPageToken"):
            return
        params = {**params, "pageToken": page["nextPageToken"]}


def _google_error(resp) -> gexc.GoogleAPICallError:
    try:
        error = resp.json()["error"]
        message, errors = str(error.get("message", "")), list(error.get("errors") or [])
    except (ValueError, KeyError, TypeError, AttributeError):
        message, errors = resp.text[:300], []
    return gexc.from_http_status(resp.status_code, f"{resp.request.method} {resp.request.url}: {message}",
                                 errors=errors, response=resp)


class KubeToken:
    """The bearer token the product presents to a cluster's API server, refreshed before it expires.

    A Google access token from the configured credentials (what ``gke-gcloud-auth-plugin`` fetches
    for kubectl; GKE maps it to the IAM identity), or, with ``kube_token_file`` set, a Kubernetes
    ServiceAccount token read from that file (as in-cluster clients read their projected token,
    which the kubelet rotates on disk).
    """

    def __init__(self, settings: Settings | None = None) -> None:
        import threading

        self.settings = settings or get_settings()
        self._lock = threading.Lock()
        self._creds: Any = None
        self._request: Any = None
        self._lifetime_s = float("inf")  # of the last token fetched

    def get(self, *, force: bool = False) -> str | None:
        """The current token; ``force`` fetches a new one (after a 401)."""
        s = self.settings
        if s.kube_token_file is not None:
            return Path(s.kube_token_file).read_text().strip() or None
        if s.gcp_auth == "anonymous":
            return None
        with self._lock:
            if self._creds is None:
                self._creds = gcp_credentials(s)
            if force or self._due():
                import google.auth.transport.requests

                if self._request is None:  # one session: refreshes reuse its connection
                    self._request = google.auth.transport.requests.Request()
                self._creds.refresh(self._request)
                self._lifetime_s = self._left_s()
            return self._creds.token

    def _left_s(self) -> float:
        import datetime as dt

        expiry = getattr(self._creds, "expiry", None)
        if expiry is None:
            return float("inf")
        return (expiry - dt.datetime.now(dt.UTC).replace(tzinfo=None)).total_seconds()

    def _due(self) -> bool:
        """Refresh ahead of expiry: google-auth's margin (3 min 45 s), or a quarter of the token's
        lifetime when tokens are shorter than that (the sandbox's scaled time), not on every call."""
        if not getattr(self._creds, "token", None):
            return True
        return self._left_s() <= min(225.0, self._lifetime_s / 4)


def google_access_token(settings: Settings | None = None) -> str | None:
    """A fresh bearer token for the GKE control plane (fails clearly when credentials are missing)."""
    return KubeToken(settings).get(force=True)


AUTH_PLUGIN = {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": "gke-gcloud-auth-plugin",
               "installHint": "Install gke-gcloud-auth-plugin for use with kubectl by following "
                              "https://cloud.google.com/kubernetes-engine/docs/how-to/cluster-access-for-kubectl"
                              "#install_plugin",
               "provideClusterInfo": True}


def write_kubeconfig(*, project: str, location: str, cluster: str, endpoint: str, ca_cert_b64: str,
                     settings: Settings | None = None) -> Path:
    """What `gcloud container clusters get-credentials` writes: https, the cluster's CA, and the
    gke-gcloud-auth-plugin exec credential (so kubectl always gets a fresh token; nothing expires in
    the file)."""
    s = settings or get_settings()
    name = f"gke_{project}_{location}_{cluster}"
    server = endpoint if "://" in endpoint else f"https://{endpoint}"
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": name, "preferences": {},
        "clusters": [{"name": name, "cluster": {"certificate-authority-data": ca_cert_b64, "server": server}}],
        "users": [{"name": name, "user": {"exec": dict(AUTH_PLUGIN)}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
    }
    path = kubeconfig_path(project=project, location=location, cluster=cluster, settings=s)
    text = yamlio.dump(config, sort_keys=False)
    try:  # unchanged (the usual case): keep the file, and with its mtime the cached client and its connections
        if path.read_text() == text and path.stat().st_mode & 0o777 == 0o600:
            return path
    except OSError:
        pass
    return write_private(path, text)  # 0600, atomic


def kube_client(kubeconfig: Path | str | None = None):
    """A kubernetes ApiClient for a kubeconfig file (default: $KUBECONFIG / ~/.kube/config).

    Cached per file, modification time and credential settings: building one parses YAML and opens a
    connection pool, which would otherwise sit on the path between "pod Ready" and "flow knows".
    """
    import os

    path = str(kubeconfig) if kubeconfig else os.environ.get("KUBECONFIG", str(Path.home() / ".kube/config"))
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        mtime = 0
    s = get_settings()
    return _kube_client(path, mtime, s.gcp_auth, str(s.kube_token_file or ""))


def _current(config: dict[str, Any], section: str, name: str) -> dict[str, Any]:
    for entry in config.get(section) or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry.get(section[:-1]) or {}
    return {}


@lru_cache(maxsize=32)
def _kube_client(path: str, mtime: int, gcp_auth: str, token_file: str):
    from kubernetes import client
    from kubernetes import config as kconfig

    try:
        config = yamlio.load(Path(path).read_text()) or {}
    except OSError as exc:
        raise FleetError(f"kubeconfig {path} cannot be read: {exc.strerror}",
                         "run provision_cluster (it writes the cluster's kubeconfig) or set KUBECONFIG") from None
    context = _current(config, "contexts", config.get("current-context") or "")
    cluster = _current(config, "clusters", context.get("cluster", ""))
    user = _current(config, "users", context.get("user", ""))
    plugin = (user.get("exec") or {}).get("command", "").rsplit("/", 1)[-1] == "gke-gcloud-auth-plugin"
    if not (plugin or user.get("token") or token_file):
        return kconfig.new_client_from_config(config_file=path)  # client certificates, other exec plugins
    server = cluster.get("server", "")
    if not server.startswith("https://"):
        raise FleetError(f"kubeconfig {path}: server {server!r} is not https",
                         "GKE control planes speak https only: rerun provision_cluster to rewrite the kubeconfig")
    cfg = client.Configuration()
    cfg.host = server
    cfg.verify_ssl = not cluster.get("insecure-skip-tls-verify", False)
    if cluster.get("certificate-authority-data"):
        # urllib3 reads a CA from a file only: one per CA (named by its hash) beside the kubeconfigs, written once
        cfg.ssl_ca_cert = str(ca_file(base64.b64decode(cluster["certificate-authority-data"])))
    elif cluster.get("certificate-authority"):
        cfg.ssl_ca_cert = cluster["certificate-authority"]
    source = KubeToken() if token_file or plugin else _StaticToken(user["token"])
    if not (plugin and not token_file and gcp_auth == "anonymous"):  # (anonymous: no credential at all)
        cfg.api_key["BearerToken"] = ""  # (auth_settings() looks for the key before the hook fills it)
        cfg.api_key_prefix["BearerToken"] = "Bearer"
        # called before every request: the token is refreshed ahead of its expiry, never sent stale
        cfg.refresh_api_key_hook = lambda c: c.api_key.__setitem__("BearerToken", source.get() or "")
    api = client.ApiClient(cfg)
    api.fleet_token = source
    _retry_401(api, source)
    return api


class _StaticToken:
    def __init__(self, token: str) -> None:
        self.token = token

    def get(self, *, force: bool = False) -> str:
        return self.token


class KubeForbidden(FleetError):
    """The cluster's RBAC refused a request: names the missing permission and where to grant it."""

    def __init__(self, message: str, *, url: str = "") -> None:
        missing = "missing permission"
        denied = re.search(r'cannot (\S+) resource "([^"]+)" in API group "([^"]*)"(?: in the namespace "([^"]+)")?',
                           message)
        # RBAC's escalation check: a Role may only grant what its writer already holds
        held = re.search(r'APIGroups:\["([^"]*)"\], Resources:\["([^"]+)"\], Verbs:\["([^"]+)"\]', message)
        fields = None
        if denied:
            fields = denied.groups()
        elif held:
            in_ns = re.search(r"/namespaces/([^/]+)/", url)
            fields = (held.group(3), held.group(2), held.group(1), in_ns.group(1) if in_ns else None)
        if fields:
            verb, resource, group, ns = fields
            where = f'in namespace "{ns}"' if ns else "at the cluster scope"
            missing = f'missing permission: {verb} {resource} (API group "{group}") {where}'
        super().__init__(f"the cluster refused the request ({missing}): {message}",
                         "grant it in the operator Role (manifests/render.py operator_rbac), applied by a "
                         "cluster admin: `llm-fleet render SPEC | kubectl apply -f -`; or run as an identity "
                         "that holds it")
        self.message = message


def _retry_401(api: Any, source: Any) -> None:
    """A 401 (token expired or revoked between refresh and use) is retried once with a fresh token; a
    403 becomes a KubeForbidden naming the permission (never retried: it will not change by itself)."""
    import json

    rest = api.rest_client
    send = rest.request

    def request(method, url, headers=None, body=None, post_params=None, _request_timeout=None):
        resp = send(method, url, headers=headers, body=body, post_params=post_params,
                    _request_timeout=_request_timeout)
        if resp.status == 401:
            resp.response.drain_conn()
            resp.response.release_conn()
            fresh = {k: v for k, v in (headers or {}).items() if k.lower() != "authorization"}
            fresh["authorization"] = f"Bearer {source.get(force=True)}"
            resp = send(method, url, headers=fresh, body=body, post_params=post_params,
                        _request_timeout=_request_timeout)
        if resp.status == 403:
            try:
                message = json.loads(resp.read()).get("message") or ""
            except (ValueError, AttributeError):
                message = ""
            raise KubeForbidden(message or f"{method} {url}: 403 Forbidden", url=url)
        return resp

    rest.request = request


def kube_http(api_client, *, timeout: float = 30.0):
    """An httpx client that talks to the API server with the same credentials (service proxy, streams).

    Cached with its ApiClient: building an SSL context per call costs tens of milliseconds.
    """
    return _kube_http(api_client, timeout)


def _bearer_auth(source: Any):
    class BearerAuth(httpx.Auth):
        """The current token on every request; one retry with a fresh token after a 401."""

        def auth_flow(self, request):
            token = source.get()
            if token:
                request.headers["Authorization"] = f"Bearer {token}"
            response = yield request
            if response.status_code == 401 and token:
                request.headers["Authorization"] = f"Bearer {source.get(force=True)}"
                yield request

    return BearerAuth()


@lru_cache(maxsize=32)
def _kube_http(api_client, timeout: float):
    import ssl

    cfg = api_client.configuration
    source = getattr(api_client, "fleet_token", None)
    auth = _bearer_auth(source) if source is not None else None
    headers = {}
    if auth is None:
        static = cfg.get_api_key_with_prefix("BearerToken", alias="authorization")
        if static:
            headers["Authorization"] = static
    verify: Any = cfg.verify_ssl
    if cfg.verify_ssl and cfg.ssl_ca_cert:
        verify = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
    cert = (cfg.cert_file, cfg.key_file) if cfg.cert_file else None
    return httpx.Client(base_url=cfg.host, headers=headers, auth=auth, verify=verify, cert=cert, timeout=timeout)


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
    return _vertex_clients(region, s.vertex_endpoint, s.cloudquotas_endpoint, gcp_credentials(s))


@lru_cache(maxsize=16)
def _vertex_clients(region: str, endpoint: str | None, quotas: str, creds: Any) -> VertexClients:
    # aiplatform is big: imported here, so `import flows` stays fast.
    from google.auth.transport.requests import AuthorizedSession
    from google.cloud import aiplatform_v1

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
    from tasks.secrets import slack_token

    s = settings or get_settings()
    token = s.slack_token if settings is not None else slack_token()  # env, else the Secret block (run time)
    if token is None:
        return None
    return _slack_client(token.get_secret_value(), s.slack_api_url)


@lru_cache(maxsize=4)
def _slack_client(token: str, base_url: str):
    """One WebClient per token and URL: it is safe to share, and each new one builds its SSL context."""
    from slack_sdk import WebClient
    from slack_sdk.http_retry.builtin_handlers import ConnectionErrorRetryHandler, RateLimitErrorRetryHandler

    client = WebClient(token=token, base_url=base_url, timeout=10)
    client.retry_handlers.extend([RateLimitErrorRetryHandler(max_retry_count=2), ConnectionErrorRetryHandler()])
    return client


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
