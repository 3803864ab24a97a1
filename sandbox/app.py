"""The whole sandbox in one process: every emulator, a control API, the env file and a kubeconfig.

    with Sandbox.running(time_scale=0.01) as sb:
        env = sb.env()            # LLM_FLEET_*, HF_*, SLACK_*, KUBECONFIG, CLOUDSDK_* for the product
        sb.compute.set_stockout("us-central1-a", "nvidia-l4")
        SandboxClient(sb.url).add_fault(service="gke", method="POST", status=503, count=2)

``llm-fleet sandbox up`` calls :func:`main`, which writes ``<state-dir>/env`` and
``<state-dir>/kubeconfig`` and serves until SIGINT/SIGTERM.

Kubernetes APIs, one per cluster as on GKE:

* ``sb.kube`` is the default ``KubeCluster`` (context ``sandbox`` of the kubeconfig written at start-up,
  so ``kubectl`` works right after ``sandbox up``); no GKE cluster uses it.
* every GKE cluster gets its own ``KubeCluster`` (own API server port, store, controller, nodes and
  Service ports) when it is created; the cluster's ``endpoint`` is that API server's ``127.0.0.1:PORT``.
  Deleting the cluster stops it: connections are refused, its model servers and Service ports close.
  ``sb.cluster_kube(name, location, project)`` finds one; ``sb.cluster_kubes`` holds them all.
* the ModelRuntime (model servers of every pod), Hub, Slack, Compute and faults are shared; a fault with
  ``service="kube"`` applies to every Kubernetes API.
* every kubeconfig :meth:`Sandbox.write_env` wrote (``<state-dir>/kubeconfig``) is kept up to date: a
  context (and cluster and user of the same name) ``gke_<project>_<location>_<name>`` per GKE cluster,
  as ``gcloud container clusters get-credentials`` names and writes them (https with the cluster's CA,
  user ``exec: gke-gcloud-auth-plugin``). ``current-context``
  stays ``sandbox`` until a cluster is created, then moves to the newest cluster; when the current
  cluster is deleted it moves to the newest remaining one (or back to ``sandbox``). Entries gcloud
  writes for a sandbox cluster are the same entries: nothing needs repairing.
* each Service of each API gets a loopback port (``sandbox.routing.ServicePorts``) that routes to its
  Ready pods at every request, shown under ``service_ports`` in the state.

``GET /sandbox/state`` shape (the parts about Kubernetes)::

    {"urls": {"kube": <default API url>, ...},
     "kube": {<KubeCluster.snapshot() of the default API>, "context": "sandbox",
              "service_ports": {"ns/svc": {"port", "requests"}}},
     "clusters_kube": {"<project>/<location>/<name>": {<KubeCluster.snapshot()>, "project", "location",
                                                      "cluster", "context": "gke_<p>_<l>_<n>",
                                                      "service_ports": {...}}},
     "kube_contexts": {"current": <current-context of the state-dir kubeconfig>,
                       "contexts": {<context>: <server url>}},
     "gke": ..., "runtime": <every model server, of every cluster>, ...}

Control API (``service="control"``; only fault rules naming ``"control"`` explicitly apply to it, so
a ``"*"`` rule can never lock you out of clearing faults):

=======================================  ============================================================
``GET  /healthz``                        ``{"ok": true}``
``GET  /sandbox/state``                  urls, env, quota used, faults and every emulator's snapshot
``GET  /sandbox/faults``                 fault rules (FaultRule JSON, with ``hits``)
``POST /sandbox/faults``                 add a rule: ``{"service", "method", "path", "status", "count",
                                         "latency", "hang", "body", "headers", "action", "after",
                                         "query"}`` → the rule with its id (``action``: reset, truncate,
                                         watch_expire, watch_drop — see ``sandbox.core.ACTIONS``)
``DELETE /sandbox/faults[?service=S]``   clear all rules (or one service's)
``DELETE /sandbox/faults/{id}``          remove one rule
``GET/POST/DELETE /sandbox/stockouts``   list / ``{"zone", "accelerator": type|null (every GPU)|"*"
                                         (every VM), "on": true, "spot": false}`` / clear
``POST /sandbox/nodes/{name}/preempt``   Compute Engine preempts a Spot node (~30 s notice, then gone)
``GET/POST /sandbox/quota``              quota used (``?project=P``) / ``{"region": null|R, "metric",
                                         "limit", "project": null|P}``
``GET/POST/DELETE /sandbox/behaviors``   model-server behaviors (the runtime's Behaviors: ``{"mode",
                                         "match", "load_seconds", "count", ...}``); ``DELETE .../{id}``
``GET  /sandbox/slack/messages``         messages posted to the Slack emulator (``?channel=C``)
``POST /sandbox/hub/revisions``          a new commit ``{"repo", "branch": "main", "title"}`` → its sha;
                                         the repo's Hub webhooks are notified
``GET/POST/DELETE .../hub/webhooks``     Hub repo webhooks ``{"url", "secret", "repos": [...]}`` and
                                         their deliveries; ``DELETE .../{id}``
=======================================  ============================================================
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from manifests import yamlio
from sandbox.accounting import Accounting
from sandbox.artifact_registry import ArtifactRegistry
from sandbox.client import SandboxClient
from sandbox.compute import Compute
from sandbox.core import Clock, FaultRule, Faults, HttpError, JsonHandler, SandboxHTTPServer, route, serve
from sandbox.gcs import Gcs
from sandbox.gke import Gke
from sandbox.iamcredentials import IamCredentials
from sandbox.kube import localproc
from sandbox.routing import ServicePorts
from sandbox.tokens import DEFAULT_LIFETIME_S, GoogleTokens, OAuth

HF_TOKEN = "hf_sandbox_read"
# The product's own image as the README builds it (docker build -t us-docker.pkg.dev/PROJECT/llm-fleet/flows:TAG .),
# named in the env file as LLM_FLEET_IMAGE: its pods (hold proxy, playground) run as local processes of this
# checkout, for `llm-fleet sandbox up` and the demo alike.
FLOWS_IMAGE = "us-docker.pkg.dev/{project}/llm-fleet/flows:sandbox"
SLACK_TOKEN = "xoxb-sandbox-token"
GCLOUD_TOKEN_LIFETIME_S = 12 * 3600.0  # real seconds: the longest access-token lifetime Google allows
AUTH_PLUGIN_HINT = ("Install gke-gcloud-auth-plugin for use with kubectl by following "
                    "https://cloud.google.com/kubernetes-engine/docs/how-to/cluster-access-for-kubectl#install_plugin")
KUBE_CONTEXT = "sandbox"


def gke_context(project: str, location: str, name: str) -> str:
    """The kubeconfig context gcloud names a GKE cluster by."""
    return f"gke_{project}_{location}_{name}"


@dataclasses.dataclass
class ClusterKube:
    """The Kubernetes API of one GKE cluster, and what the sandbox wired to it."""

    project: str
    location: str
    name: str
    kube: Any  # sandbox.kube.KubeCluster
    routes: ServicePorts
    unsubscribe: Any
    created: float = dataclasses.field(default_factory=time.time)

    @property
    def key(self) -> str:
        return f"{self.project}/{self.location}/{self.name}"

    @property
    def context(self) -> str:
        return gke_context(self.project, self.location, self.name)

    @property
    def url(self) -> str:
        return self.kube.url


class _ControlFaults:
    """The fault view of the control server: only rules that name ``"control"`` apply."""

    def __init__(self, faults: Faults) -> None:
        self._faults = faults

    @property
    def stop(self) -> threading.Event:
        return self._faults.stop

    def take(self, service: str, method: str, path: str, *, query: str = "") -> FaultRule | None:
        return self._faults.take("control", method, path, exact=True, query=query)


def _quiet_stop(part: Any) -> None:
    if hasattr(part, "stop"):
        with contextlib.suppress(Exception):
            part.stop()


class Sandbox:
    """Every emulator plus the control API, as threads of this process on 127.0.0.1."""

    def __init__(self, *, time_scale: float = 1.0, state_dir: str | os.PathLike[str] | None = None,
                 project: str = "llm-fleet-demo", token_lifetime_s: float = DEFAULT_LIFETIME_S,
                 endpoint_lag_s: float | None = None, min_deadline_s: float = 0.0) -> None:
        """``token_lifetime_s``: cloud seconds a Google access token from the sandbox's token endpoint
        lives (GCP: 3,600); after it the cluster APIs answer 401 to it. ``endpoint_lag_s``: cloud seconds
        between an Endpoints change and Services routing by it (kube-proxy; default
        ``DEFAULT_DELAYS["endpoint_propagation"]``; ``set_endpoint_lag`` changes it while running).
        ``min_deadline_s``: real seconds a cloud-side deadline (a Deployment's progress deadline) is never
        shorter than (``Clock.min_deadline_s``)."""
        # The kube/engines/hub/slack emulators are built by their own modules; imported here so a
        # missing one fails with a clear ImportError when the sandbox is built, not at import time.
        from sandbox.engines import ModelRuntime
        from sandbox.hub import Hub
        from sandbox.kube import KubeCluster
        from sandbox.slack import Slack
        from sandbox.vertex import Vertex

        self.project = project
        self.flows_image = FLOWS_IMAGE.format(project=project)
        # the identity of the env file's credentials (ADC key and gcloud token); project owner
        self.google_account = f"llm-fleet@{project}.iam.gserviceaccount.com"
        self.clock = Clock(time_scale, min_deadline_s=min_deadline_s)
        self.faults = Faults()
        self.hub = Hub(faults=self.faults, clock=self.clock)
        self.runtime = ModelRuntime(clock=self.clock, faults=self.faults, hub=self.hub)
        self.accounting = Accounting()  # node/pod lifetimes by the emulator's own clock
        self._kube_class = KubeCluster
        # Google's token endpoint and the access tokens it issued, checked by every cluster's API
        self.tokens = GoogleTokens(clock=self.clock, lifetime_s=token_lifetime_s)
        self.oauth = OAuth(tokens=self.tokens, faults=self.faults)
        # google-auth's Regional Access Boundary lookup, answered behind a proxy (sandbox/iamcredentials.py)
        self.iam = IamCredentials(faults=self.faults, tokens=self.tokens)
        self._gcloud_token = ""
        # the default API (context "sandbox"); every GKE cluster gets its own (see _new_cluster_kube)
        self.kube = KubeCluster(clock=self.clock, faults=self.faults, runtime=self.runtime, google_tokens=self.tokens)
        self.endpoint_lag_s = self.kube.kube_proxy.lag_s if endpoint_lag_s is None else float(endpoint_lag_s)
        self.kube.kube_proxy.lag_s = self.endpoint_lag_s
        self.kube_routes = ServicePorts(self.kube, faults=self.faults)
        self._kube_routes_unsubscribe: Any = None
        self.cluster_kubes: dict[tuple[str, str, str], ClusterKube] = {}
        self.compute = Compute(clock=self.clock, faults=self.faults, project=project)
        self.gke = Gke(clock=self.clock, faults=self.faults, compute=self.compute,
                       kube_factory=self._new_cluster_kube, kube_release=self._drop_cluster_kube)
        self.slack = Slack(faults=self.faults, clock=self.clock, token=SLACK_TOKEN)
        self.vertex = Vertex(clock=self.clock, faults=self.faults, runtime=self.runtime, project=project)
        # Cloud Storage (JSON API): mirror_model's bucket; the env file's identity owns the project's buckets
        self.gcs = Gcs(clock=self.clock, faults=self.faults, tokens=self.tokens, project=project)
        # Artifact Registry (repositories API + what nodes pull from *-docker.pkg.dev): the image's mirror.
        # The flows image lives in the project's `us` llm-fleet repository, as the README pushes it.
        self.artifact_registry = ArtifactRegistry(clock=self.clock, faults=self.faults, tokens=self.tokens,
                                                  project=project, admins=frozenset({self.google_account}))
        self.artifact_registry.add_repository(project, "us", "llm-fleet")
        self.artifact_registry.push(self.flows_image)
        self.kube.controller.registry = self.artifact_registry.pull  # its nodes pull from the sandbox's registry
        self._given_state_dir = Path(state_dir) if state_dir is not None else None
        self.state_dir: Path | None = self._given_state_dir
        self._tmp_dir: Path | None = None
        self._control: SandboxHTTPServer | None = None
        self._started = False
        self._stopping = False
        self._stop_event = threading.Event()
        self._kc_lock = threading.RLock()  # cluster_kubes and the kubeconfig files
        self._kubeconfigs: dict[Path, int] = {}  # kubeconfigs to keep up to date -> mtime_ns we wrote
        self._managed_contexts: set[str] = {KUBE_CONTEXT}  # every context this sandbox ever wrote
        self._out: Any = None  # run_forever's stream: cluster APIs coming and going are announced there

    # ---- lifecycle -----------------------------------------------------------------------------
    def _parts(self) -> list[Any]:
        """Start order: things others depend on first."""
        return [self.oauth, self.iam, self.hub, self.runtime, self.kube, self.compute, self.gke, self.slack,
                self.vertex, self.gcs, self.artifact_registry]

    def start(self) -> Sandbox:
        if self._started:
            return self
        self.faults.stop.clear()
        self._stop_event.clear()
        localproc.REGISTERED.add(self.flows_image)  # the product image runs here, whoever started the sandbox
        started: list[Any] = []
        try:
            for part in self._parts():
                if hasattr(part, "start"):
                    part.start()
                started.append(part)
            self._kube_routes_unsubscribe = self.kube.subscribe(self.kube_routes.on_event)
            self._control = serve(ControlHandler, state=self, faults=_ControlFaults(self.faults))  # type: ignore[arg-type]
        except BaseException:
            for part in reversed(started):
                with contextlib.suppress(Exception):
                    part.stop()
            raise
        self._started = True
        self._stopping = False
        # gcloud cannot refresh a CLOUDSDK_AUTH_ACCESS_TOKEN: mint it for Google's longest lifetime
        self._gcloud_token, _ = self.tokens.issue(self.google_account, lifetime_s=GCLOUD_TOKEN_LIFETIME_S, scaled=False,
                                                  endpoint=False)
        if self.state_dir is None:
            self._tmp_dir = Path(tempfile.mkdtemp(prefix="llm-fleet-sandbox-"))
            self.state_dir = self._tmp_dir
        self.state_dir = self.state_dir.resolve()
        self.write_env(self.state_dir)
        return self

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self._stopping = True  # cluster APIs released from now on leave the kubeconfig alone
        self.faults.stop.set()  # release requests held by "hang" faults
        self._stop_event.set()
        if callable(self._kube_routes_unsubscribe):
            self._kube_routes_unsubscribe()
            self._kube_routes_unsubscribe = None
        # each server's shutdown waits out its poll interval: stop them side by side (Gke.stop stops
        # the clusters' APIs, side by side too)
        stoppers = [threading.Thread(target=_quiet_stop, args=(part,), daemon=True)
                    for part in [self._control, self.kube_routes, *reversed(self._parts())] if part is not None]
        self._control = None
        for t in stoppers:
            t.start()
        deadline = time.monotonic() + 10  # one bound for all: joined one by one, ten 10 s waits could add up
        for t in stoppers:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._kc_lock:
            leftovers = list(self.cluster_kubes.values())  # (only if Gke.stop timed out)
            self.cluster_kubes.clear()
            self._kubeconfigs.clear()
        for entry in leftovers:
            _quiet_stop(entry.kube)
            _quiet_stop(entry.routes)
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None
            self.state_dir = self._given_state_dir

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @classmethod
    @contextlib.contextmanager
    def running(cls, **kwargs: Any) -> Iterator[Sandbox]:
        """``with Sandbox.running(time_scale=0.01) as sb: ...`` — started, and stopped afterwards."""
        sb = cls(**kwargs)
        sb.start()
        try:
            yield sb
        finally:
            sb.stop()

    # ---- endpoints -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The control API."""
        if self._control is None:
            raise RuntimeError("sandbox is not started")
        return self._control.url

    def client(self) -> SandboxClient:
        """A :class:`~sandbox.client.SandboxClient` of this sandbox's control API."""
        return SandboxClient(self.url)

    def urls(self) -> dict[str, str]:
        return {
            "control": self.url,
            "gke": self.gke.url,
            "compute": self.compute.url,
            "kube": self.kube.url,
            "hub": self.hub.url,
            "slack": self.slack.url,
            "vertex": self.vertex.url,
            "gcs": self.gcs.url,
            "artifactregistry": self.artifact_registry.url,
            "oauth": self.oauth.url,
        }

    def env(self, directory: str | os.PathLike[str] | None = None) -> dict[str, str]:
        """What the product (and users' gcloud/kubectl/huggingface-cli) need to use the sandbox.

        File paths (KUBECONFIG, CLOUDSDK_CONFIG, LLM_FLEET_KUBE_DIR) point into ``directory``
        (default: the state dir, where :meth:`start` writes them).
        """
        if not self._started:
            raise RuntimeError("sandbox is not started")
        d = Path(directory) if directory is not None else self.state_dir
        assert d is not None
        return {
            "LLM_FLEET_SANDBOX_URL": self.url,
            "LLM_FLEET_GKE_ENDPOINT": self.gke.url,
            "LLM_FLEET_COMPUTE_ENDPOINT": self.compute.url,
            # Managed Prometheus' PromQL query API, for every cluster's GMP collector (control endpoint)
            "LLM_FLEET_MONITORING_ENDPOINT": self.url,
            # Application Default Credentials, as on GCP: google-auth signs an assertion with the file's
            # service-account key and trades it at the sandbox's token endpoint for access tokens that expire
            "LLM_FLEET_GCP_AUTH": "adc",
            "GOOGLE_APPLICATION_CREDENTIALS": str(d / "application_default_credentials.json"),
            **self.iam.env(d),
            "LLM_FLEET_KUBE_DIR": str(d / "kube"),
            "LLM_FLEET_TIME_SCALE": repr(self.clock.time_scale),
            "LLM_FLEET_SLACK_API_URL": self.slack.url + "/api/",
            # Vertex AI and the Cloud Quotas quotaInfos it is checked with: one loopback server
            "LLM_FLEET_VERTEX_ENDPOINT": self.vertex.url,
            "LLM_FLEET_CLOUDQUOTAS_ENDPOINT": self.vertex.url,
            # Cloud Storage's JSON API (google-cloud-storage's api_endpoint): the weights' mirror
            "LLM_FLEET_STORAGE_ENDPOINT": self.gcs.url,
            # Artifact Registry's REST API (repositories): the image's mirror
            "LLM_FLEET_ARTIFACTREGISTRY_ENDPOINT": self.artifact_registry.url,
            "SLACK_BOT_TOKEN": self.slack.token,
            "HF_ENDPOINT": self.hub.url,
            "HF_TOKEN": HF_TOKEN,
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "LLM_FLEET_IMAGE": self.flows_image,
            "KUBECONFIG": str(d / "kubeconfig"),
            "GOOGLE_CLOUD_PROJECT": self.project,
            "CLOUDSDK_CORE_PROJECT": self.project,
            # what gcloud (and so gke-gcloud-auth-plugin, kubectl's credential) presents
            "CLOUDSDK_AUTH_ACCESS_TOKEN": self._gcloud_token,
            "CLOUDSDK_CONFIG": str(d / "gcloud"),
            "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_CONTAINER": self.gke.url + "/",
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE": self.compute.url + "/compute/v1/",
            # `gcloud container clusters create` first asks Service Usage whether the API is enabled
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_SERVICEUSAGE": self.gke.url + "/",
        }

    # ---- one Kubernetes API per GKE cluster ----------------------------------------------------------
    def _new_cluster_kube(self, project: str, location: str, name: str) -> Any:
        """Gke's ``kube_factory``: a started KubeCluster for a new cluster, its Service ports, a context."""
        kube = self._kube_class(clock=self.clock, faults=self.faults, runtime=self.runtime, google_tokens=self.tokens)
        kube.kube_proxy.lag_s = self.endpoint_lag_s
        kube.gmp.external_labels = {"project_id": project, "location": location, "cluster": name}  # GMP's
        kube.start()
        # GCE Ingresses may name only static IPs reserved in this project (gcloud compute addresses create)
        kube.ingress.static_ip = lambda ip, p=project: (p, "global", ip) in self.compute.addresses
        kube.controller.registry = self.artifact_registry.pull  # *-docker.pkg.dev images: only if they exist
        self.accounting.attach(f"{project}/{location}/{name}", kube)
        routes = ServicePorts(kube, faults=self.faults)
        entry = ClusterKube(project, location, name, kube, routes, kube.subscribe(routes.on_event))
        with self._kc_lock:
            old = self.cluster_kubes.get((project, location, name))
            self.cluster_kubes[(project, location, name)] = entry
            if not self._stopping:
                self._sync_kubeconfigs(switch_to=entry.context)
        if old is not None:  # pragma: no cover - Gke never builds two for one live cluster
            self._stop_cluster_kube(old)
        self._announce(f"cluster {entry.key}: Kubernetes API {kube.url}; kubectl context {entry.context} "
                       f"(now current)")
        return kube

    def _drop_cluster_kube(self, project: str, location: str, name: str, kube: Any) -> None:
        """Gke's ``kube_release``: the cluster is deleted: stop its API, model servers and Service ports."""
        with self._kc_lock:
            entry = self.cluster_kubes.get((project, location, name))
            if entry is not None and entry.kube is kube:
                del self.cluster_kubes[(project, location, name)]
            else:
                entry = None
        if entry is None:
            _quiet_stop(kube)
            return
        self._stop_cluster_kube(entry)
        with self._kc_lock:
            if not self._stopping:
                self._sync_kubeconfigs()
        if not self._stopping:
            self._announce(f"cluster {entry.key} deleted: its Kubernetes API is stopped")

    @staticmethod
    def _stop_cluster_kube(entry: ClusterKube) -> None:
        with contextlib.suppress(Exception):
            entry.unsubscribe()
        # the API server (and the model servers of its pods) and the Service ports, side by side
        ports = list(entry.routes.ports())
        closers = [threading.Thread(target=_quiet_stop, args=(entry.kube,), daemon=True)]
        closers += [threading.Thread(target=entry.routes.close, args=tuple(key.split("/", 1)), daemon=True)
                    for key in ports]
        for t in closers:
            t.start()
        for t in closers:
            t.join(timeout=10)
        _quiet_stop(entry.routes)

    def cluster_kube(self, name: str, location: str | None = None, project: str | None = None) -> Any:
        """The KubeCluster of GKE cluster ``name`` (``None`` if there is none); ``location`` and
        ``project`` narrow it down (default project: the sandbox's)."""
        project = project or self.project
        with self._kc_lock:
            for (p, loc, n), entry in reversed(self.cluster_kubes.items()):
                if n == name and p == project and (location in (None, "-") or loc == location):
                    return entry.kube
        return None

    def gmp(self, name: str, location: str | None = None, project: str | None = None) -> Any:
        """The Managed Prometheus collector of GKE cluster ``name`` (``sandbox.kube.gmp``), None without one."""
        kube = self.cluster_kube(name, location, project)
        return kube.gmp if kube is not None else None

    def set_endpoint_lag(self, seconds: float) -> None:
        """kube-proxy's programming delay (cloud seconds) on every cluster, now and for clusters made later."""
        if seconds < 0:
            raise ValueError("endpoint lag must be >= 0 seconds")
        self.endpoint_lag_s = float(seconds)
        with self._kc_lock:
            kubes = [self.kube] + [e.kube for e in self.cluster_kubes.values()]
        for kube in kubes:
            kube.kube_proxy.lag_s = self.endpoint_lag_s

    def ca_b64(self, context: str) -> str:
        """The CA of the API a context names (base64 PEM, as in ``masterAuth.clusterCaCertificate``)."""
        with self._kc_lock:
            for entry in self.cluster_kubes.values():
                if entry.context == context:
                    return entry.kube.tls.ca_b64
        return self.kube.tls.ca_b64

    def kube_contexts(self) -> dict[str, str]:
        """``context -> API server url``: ``sandbox`` first, then one per GKE cluster, oldest first."""
        with self._kc_lock:
            out = {KUBE_CONTEXT: self.kube.url}
            for entry in self.cluster_kubes.values():
                with contextlib.suppress(RuntimeError):  # (a stopped one is being dropped)
                    out[entry.context] = entry.url
            return out

    def kubeconfig(self, current: str | None = None) -> dict[str, Any]:
        """A kubeconfig with a context per Kubernetes API; ``current`` defaults to the newest cluster's
        context (``sandbox`` while there is no GKE cluster)."""
        contexts = self.kube_contexts()
        if current not in contexts:
            current = list(contexts)[-1]
        config: dict[str, Any] = {"apiVersion": "v1", "kind": "Config", "preferences": {},
                                  "clusters": [], "users": [], "contexts": [], "current-context": current}
        self._put_contexts(config, contexts)
        return config

    def _put_contexts(self, config: dict[str, Any], contexts: dict[str, str]) -> None:
        """The entries ``gcloud container clusters get-credentials`` writes: https + the cluster's CA, and
        gke-gcloud-auth-plugin as the credential."""
        for name, server in contexts.items():
            config["clusters"].append({"name": name, "cluster": {"certificate-authority-data": self.ca_b64(name),
                                                                 "server": server}})
            config["users"].append({"name": name, "user": {"exec": {
                "apiVersion": "client.authentication.k8s.io/v1beta1", "command": "gke-gcloud-auth-plugin",
                "installHint": AUTH_PLUGIN_HINT, "provideClusterInfo": True}}})
            config["contexts"].append({"name": name, "context": {"cluster": name, "user": name,
                                                                  "namespace": "default"}})

    def _write_kubeconfig(self, path: Path, config: dict[str, Any]) -> None:
        """Caller holds ``_kc_lock``. Atomic (a reader never sees half a file), mode 0600."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(yamlio.dump(config, sort_keys=False))
        tmp.chmod(0o600)
        os.replace(tmp, path)
        self._kubeconfigs[path] = path.stat().st_mtime_ns

    def _sync_kubeconfigs(self, switch_to: str | None = None, only: Path | None = None) -> None:
        """Caller holds ``_kc_lock``. Rewrite the sandbox's contexts in every kubeconfig it wrote, keeping
        entries it does not own (and the user's current-context, unless a cluster was just created)."""
        contexts = self.kube_contexts()
        self._managed_contexts |= set(contexts)
        for path in [only] if only is not None else list(self._kubeconfigs):
            try:
                loaded = yamlio.load(path.read_text()) if path.exists() else None
            except (OSError, yaml.YAMLError):
                loaded = None
            config = loaded if isinstance(loaded, dict) else {"apiVersion": "v1", "kind": "Config"}
            for section in ("clusters", "users", "contexts"):
                entries = config.get(section) if isinstance(config.get(section), list) else []
                config[section] = [e for e in entries if not isinstance(e, dict) or
                                   e.get("name") not in self._managed_contexts]
            self._put_contexts(config, contexts)
            current = switch_to or config.get("current-context")
            names = {e.get("name") for e in config["contexts"] if isinstance(e, dict)}
            if current not in names:
                current = list(contexts)[-1]
            config["current-context"] = current
            config.setdefault("preferences", {})
            with contextlib.suppress(OSError):
                self._write_kubeconfig(path, config)

    def _announce(self, message: str) -> None:
        out = self._out
        if out is not None:
            with contextlib.suppress(Exception):
                print(message, file=out, flush=True)

    def write_env(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``<dir>/env`` (``export K=V``), ``<dir>/kubeconfig`` and a gcloud config dir."""
        d = Path(directory).resolve()
        d.mkdir(parents=True, exist_ok=True)
        env = self.env(d)
        (d / "kube").mkdir(exist_ok=True)
        gcloud = d / "gcloud"
        (gcloud / "configurations").mkdir(parents=True, exist_ok=True)
        (gcloud / "active_config").write_text("default")
        self.oauth.write_adc(d / "application_default_credentials.json", email=self.google_account,
                             project=self.project)
        self.iam.write_bundle(d / "google-ca-bundle.pem")
        (gcloud / "configurations" / "config_default").write_text(
            f"[core]\nproject = {self.project}\ndisable_usage_reporting = True\n"
            "[component_manager]\ndisable_update_check = True\n")
        with self._kc_lock:  # a fresh file; kept up to date as clusters come and go
            self._write_kubeconfig(d / "kubeconfig", self.kubeconfig())
        lines = ["# llm-fleet sandbox: `set -a; . ./env; set +a` (or `source env`) to use it", ""]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
        path = d / "env"
        path.write_text("\n".join(lines) + "\n")
        return path

    # ---- inspection --------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        def snap(part: Any) -> Any:
            fn = getattr(part, "snapshot", None)
            if fn is None:
                return None
            try:
                return fn()
            except Exception as exc:  # one broken snapshot must not hide the others
                return {"error": repr(exc)}

        def kube_snap(kube: Any, routes: ServicePorts, **extra: Any) -> dict[str, Any]:
            got = snap(kube)
            got = got if isinstance(got, dict) else {"error": "no snapshot"}
            # what the cluster does on its own (issue 19): GMP's targets, GCE backends' health, probes sent
            background = {"endpoint_lag_s": kube.kube_proxy.lag_s, "gmp_targets": kube.gmp.targets(),
                          "lb_health": kube.ingress.health.snapshot(), "kubelet_probes": kube.prober.probes}
            return {**got, **extra, "service_ports": snap(routes), "background": background}

        with self._kc_lock:
            entries = list(self.cluster_kubes.values())
        current = None
        if self.state_dir is not None:
            with contextlib.suppress(OSError, yaml.YAMLError, AttributeError):
                current = yamlio.load((self.state_dir / "kubeconfig").read_text()).get("current-context")
        return {
            "project": self.project,
            "time_scale": self.clock.time_scale,
            "state_dir": str(self.state_dir) if self.state_dir else None,
            "urls": self.urls(),
            "env": self.env(),
            "quota_used": self.compute.quota_used(),
            "faults": self.faults.list(),
            "compute": snap(self.compute),
            "gke": snap(self.gke),
            "kube": kube_snap(self.kube, self.kube_routes, context=KUBE_CONTEXT),
            "clusters_kube": {e.key: kube_snap(e.kube, e.routes, project=e.project, location=e.location,
                                               cluster=e.name, context=e.context) for e in entries},
            "kube_contexts": {"current": current, "contexts": self.kube_contexts()},
            "runtime": snap(self.runtime),
            "hub": snap(self.hub),
            "slack": snap(self.slack),
            "vertex": snap(self.vertex),
            "gcs": snap(self.gcs),
            "artifactregistry": snap(self.artifact_registry),
        }

    def banner(self) -> str:
        env_file = (self.state_dir or Path(".")) / "env"
        rows = "\n".join(f"  {k:<8} {v}" for k, v in self.urls().items())
        return (
            f"llm-fleet sandbox is up (project {self.project}, time scale {self.clock.time_scale:g})\n"
            f"{rows}\n\n"
            f"Use it from another shell:\n"
            f"  set -a; . {env_file}; set +a        # or: source {env_file}\n"
            f"  kubectl get pods -A\n"
            f"  gcloud container clusters list\n"
            f"  gcloud compute regions describe us-central1\n"
            f"  curl -s {self.url}/sandbox/state | head\n\n"
            f"Kubernetes: `kubectl` starts on the default API (context {KUBE_CONTEXT}). Every GKE cluster you\n"
            f"  create gets its own API server, and {self.state_dir or '.'}/kubeconfig a context\n"
            f"  gke_<project>_<location>_<name> for it (https + CA + gke-gcloud-auth-plugin, as gcloud\n"
            f"  writes it); the newest cluster becomes the\n"
            f"  current context, a deleted one's context goes. `kubectl config get-contexts` lists them,\n"
            f"  `kubectl config use-context {KUBE_CONTEXT}` returns to the default API. (`gcloud container\n"
            f"  clusters get-credentials` writes the same entries.)\n\n"
            f"Faults:   curl -XPOST {self.url}/sandbox/faults -d '{{\"service\":\"gke\",\"status\":503,\"count\":2}}'\n"
            f"Stockout: curl -XPOST {self.url}/sandbox/stockouts -d '{{\"zone\":\"us-central1-a\",\"accelerator\":\"nvidia-l4\"}}'\n"
            f"Stop with Ctrl-C."
        )

    def run_forever(self, *, out: Any = None) -> int:
        """Start (if needed), print how to use the sandbox, serve until SIGINT/SIGTERM, stop cleanly."""
        out = out or sys.stdout
        self.start()
        self._out = out
        installed: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                installed[sig] = signal.signal(sig, lambda *_: self._stop_event.set())
        try:
            print(self.banner(), file=out, flush=True)
            while not self._stop_event.wait(0.5):
                pass
        finally:
            for sig, handler in installed.items():
                signal.signal(sig, handler)
            self._out = None
            self.stop()
            print("llm-fleet sandbox stopped.", file=out, flush=True)
        return 0

    def request_stop(self) -> None:
        """Make :meth:`run_forever` return (thread-safe)."""
        self._stop_event.set()


# ---- control API ---------------------------------------------------------------------------------

_ROUTES: list = []
_FAULT_FIELDS = {f.name for f in dataclasses.fields(FaultRule)} - {"id", "hits"}


class ControlHandler(JsonHandler):
    service = "control"
    routes = _ROUTES
    server: SandboxHTTPServer

    @property
    def sb(self) -> Sandbox:
        return self.server.state


def _body_dict(h: ControlHandler) -> dict[str, Any]:
    body = h.json_body()
    if not isinstance(body, dict):
        raise HttpError(400, "request body must be a JSON object")
    return body


@route(_ROUTES, "GET", r"/healthz")
def _healthz(h: ControlHandler):
    return {"ok": True}


@route(_ROUTES, "GET", r"/sandbox/state")
def _state(h: ControlHandler):
    return h.sb.state()


@route(_ROUTES, "GET", r"/sandbox/faults")
def _faults(h: ControlHandler):
    return {"faults": h.sb.faults.list()}


@route(_ROUTES, "POST", r"/sandbox/faults")
def _add_fault(h: ControlHandler):
    body = _body_dict(h)
    unknown = set(body) - _FAULT_FIELDS
    if unknown:
        raise HttpError(400, f"unknown fault field(s): {', '.join(sorted(unknown))}; valid: "
                             f"{', '.join(sorted(_FAULT_FIELDS))}")
    if "service" not in body:
        raise HttpError(400, "a fault needs a service: gke, compute, kube, hub, slack, model, gcs, artifactregistry, control or *")
    try:
        rule = h.sb.faults.add(**body)
    except Exception as exc:  # bad regex, bad types
        raise HttpError(400, f"bad fault rule: {exc}") from exc
    return 201, rule.to_dict()


@route(_ROUTES, "DELETE", r"/sandbox/faults")
def _clear_faults(h: ControlHandler):
    h.sb.faults.clear(h.q("service") or None)
    return {"faults": h.sb.faults.list()}


@route(_ROUTES, "DELETE", r"/sandbox/faults/(?P<rule_id>[^/]+)")
def _remove_fault(h: ControlHandler, rule_id: str):
    if not h.sb.faults.remove(rule_id):
        raise HttpError(404, f"no fault rule {rule_id}")
    return {"removed": rule_id}


@route(_ROUTES, "GET", r"/sandbox/endpoint-lag")
def _endpoint_lag(h: ControlHandler):
    return {"seconds": h.sb.endpoint_lag_s}


@route(_ROUTES, "POST", r"/sandbox/endpoint-lag")
def _set_endpoint_lag(h: ControlHandler):
    body = _body_dict(h)
    try:
        h.sb.set_endpoint_lag(float(body["seconds"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise HttpError(400, f"endpoint lag needs seconds >= 0 (cloud seconds), e.g. {{\"seconds\": 5}}: {exc}") from exc
    return {"seconds": h.sb.endpoint_lag_s}


@route(_ROUTES, "GET", r"/sandbox/stockouts")
def _stockouts(h: ControlHandler):
    return {"stockouts": h.sb.compute.snapshot()["stockouts"]}


@route(_ROUTES, "POST", r"/sandbox/stockouts")
def _set_stockout(h: ControlHandler):
    body = _body_dict(h)
    if not body.get("zone"):
        raise HttpError(400, "a stockout needs a zone (and optionally an accelerator)")
    try:
        h.sb.compute.set_stockout(body["zone"], body.get("accelerator"), bool(body.get("on", True)),
                                  spot=bool(body.get("spot", False)))
    except ValueError as exc:
        raise HttpError(400, str(exc)) from exc
    return {"stockouts": h.sb.compute.snapshot()["stockouts"]}


@route(_ROUTES, "POST", r"/sandbox/nodes/(?P<name>[^/]+)/preempt")
def _preempt_node(h: ControlHandler, name: str):
    """Compute Engine preempts a Spot node's VM (GKE's ~30 s notice, then the node is gone)."""
    return h.sb.gke.preempt_node(name)


@route(_ROUTES, "DELETE", r"/sandbox/stockouts")
def _clear_stockouts(h: ControlHandler):
    h.sb.compute.clear_stockouts()
    return {"stockouts": []}


@route(_ROUTES, "GET", r"/sandbox/quota")
def _quota(h: ControlHandler):
    return h.sb.compute.quota_used(project=h.q("project") or None)


@route(_ROUTES, "POST", r"/sandbox/quota")
def _set_quota(h: ControlHandler):
    body = _body_dict(h)
    if not body.get("metric") or "limit" not in body:
        raise HttpError(400, "a quota needs a metric and a limit (and a region, or null for project-wide)")
    project = body.get("project") or None
    try:
        h.sb.compute.set_quota(body.get("region"), body["metric"], float(body["limit"]), project=project)
    except (ValueError, TypeError) as exc:
        raise HttpError(400, str(exc)) from exc
    return {"project": project or h.sb.project, "region": body.get("region"), "metric": body["metric"],
            **h.sb.compute.quota(body.get("region"), body["metric"], project=project)}


def _behaviors(h: ControlHandler) -> Any:
    behaviors = getattr(h.sb.runtime, "behaviors", None)
    if behaviors is None:
        raise HttpError(501, "this model runtime has no behaviors registry")
    return behaviors


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


@route(_ROUTES, "GET", r"/sandbox/behaviors")
def _list_behaviors(h: ControlHandler):
    b = _behaviors(h)
    listing = b.list() if hasattr(b, "list") else getattr(b, "rules", [])
    return {"behaviors": _jsonable(listing)}


@route(_ROUTES, "POST", r"/sandbox/behaviors")
def _add_behavior(h: ControlHandler):
    body = _body_dict(h)
    b = _behaviors(h)
    try:
        added = b.add(**body)
    except (TypeError, ValueError, KeyError) as exc:
        raise HttpError(400, f"bad behavior: {exc}") from exc
    return 201, _jsonable(added) if added is not None else body


@route(_ROUTES, "DELETE", r"/sandbox/behaviors")
def _clear_behaviors(h: ControlHandler):
    b = _behaviors(h)
    b.clear()
    return {"behaviors": []}


@route(_ROUTES, "DELETE", r"/sandbox/behaviors/(?P<rule_id>[^/]+)")
def _remove_behavior(h: ControlHandler, rule_id: str):
    if not _behaviors(h).remove(rule_id):
        raise HttpError(404, f"no behavior {rule_id}")
    return {"removed": rule_id}


@route(_ROUTES, "POST", r"/sandbox/vertex/quota")
def _set_vertex_quota(h: ControlHandler):
    body = _body_dict(h)
    if not body.get("region") or not body.get("accelerator") or "limit" not in body:
        raise HttpError(400, "a Vertex quota needs a region, an accelerator (NVIDIA_L4 ...) and a limit")
    try:
        h.sb.vertex.set_quota(body["region"], body["accelerator"], int(body["limit"]), project=body.get("project"))
    except (ValueError, TypeError) as exc:
        raise HttpError(400, str(exc)) from exc
    return {"quota_limits": h.sb.vertex.snapshot()["quota_limits"]}


@route(_ROUTES, "GET", r"/sandbox/slack/messages")
def _slack_messages(h: ControlHandler):
    return {"messages": h.sb.slack.messages(h.q("channel") or None)}


@route(_ROUTES, "GET", r"/sandbox/accounting")
def _accounting(h: ControlHandler):
    return {"records": h.sb.accounting.records(cluster=h.q("cluster") or None, kind=h.q("kind") or None)}


@route(_ROUTES, "POST", r"/sandbox/hub/revisions")
def _push_revision(h: ControlHandler):
    """A new commit on a branch (as a push to the Hub would make); the repo's webhooks are notified."""
    body = _body_dict(h)
    if not body.get("repo"):
        raise HttpError(400, "a revision needs a repo (and optionally a branch and a title)")
    branch = body.get("branch") or "main"
    try:
        sha = h.sb.hub.push_revision(body["repo"], branch, title=body.get("title") or "Update model weights")
    except KeyError as exc:
        raise HttpError(404, str(exc.args[0]) if exc.args else "no such repo") from exc
    return 201, {"repo": body["repo"], "branch": branch, "sha": sha}


@route(_ROUTES, "GET", r"/sandbox/hub/webhooks")
def _hub_webhooks(h: ControlHandler):
    return {"webhooks": h.sb.hub.webhooks.list()}


@route(_ROUTES, "POST", r"/sandbox/hub/webhooks")
def _add_hub_webhook(h: ControlHandler):
    body = _body_dict(h)
    try:
        hook = h.sb.hub.webhooks.add(str(body.get("url") or ""), secret=body.get("secret"), repos=body.get("repos"))
    except ValueError as exc:
        raise HttpError(400, str(exc)) from exc
    return 201, hook.public()


@route(_ROUTES, "DELETE", r"/sandbox/hub/webhooks/(?P<hook_id>[^/]+)")
def _remove_hub_webhook(h: ControlHandler, hook_id: str):
    if not h.sb.hub.webhooks.remove(hook_id):
        raise HttpError(404, f"no webhook {hook_id}")
    return {"removed": hook_id}


# ---- CLI -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """``llm-fleet sandbox up``: run the sandbox in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="llm-fleet sandbox up",
                                     description="Run the loopback GCP/GKE/Kubernetes/HF/Slack sandbox.")
    parser.add_argument("--state-dir", default=os.environ.get("LLM_FLEET_SANDBOX_DIR", ".llm-fleet/sandbox"),
                        help="where to write env, kubeconfig and the gcloud config (default: %(default)s)")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="cloud delays are multiplied by this (0.01: a 5-minute cluster create takes 3 s)")
    parser.add_argument("--project", default="llm-fleet-demo",
                        help="the env file's GCP project id (the one the bundled specs use)")
    args = parser.parse_args(argv)
    if args.time_scale <= 0:
        parser.error("--time-scale must be > 0")
    t0 = time.monotonic()
    sb = Sandbox(time_scale=args.time_scale, state_dir=args.state_dir, project=args.project)
    sb.start()
    print(f"(started in {time.monotonic() - t0:.2f} s; env written to {Path(args.state_dir).resolve() / 'env'})",
          flush=True)
    return sb.run_forever()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


# ---- Managed Prometheus' query API (PromQL over what each cluster's GMP collector scraped) ----------------
@route(_ROUTES, "GET", r"/v1/projects/(?P<project>[^/]+)/location/global/prometheus/api/v1/(?P<kind>query|query_range)")
@route(_ROUTES, "POST", r"/v1/projects/(?P<project>[^/]+)/location/global/prometheus/api/v1/(?P<kind>query|query_range)")
def _gmp_query(h: ControlHandler, project: str, kind: str):
    """monitoring.googleapis.com's Prometheus HTTP API for ``project``: every cluster of the project
    (series carry ``cluster``/``location`` labels to tell them apart), evaluated by sandbox.kube.promql."""
    from urllib.parse import parse_qs

    from sandbox.kube import promql

    params = {k: v[-1] for k, v in parse_qs(h.url.query).items()}
    if h.command == "POST":
        params |= {k: v[-1] for k, v in parse_qs(h.body_bytes().decode()).items()}
    with h.sb._kc_lock:
        kubes = [e.kube for (p, _, _), e in h.sb.cluster_kubes.items() if p == project]
    return promql.handle(params, kind, [k.gmp for k in kubes if getattr(k, "gmp", None) is not None])
