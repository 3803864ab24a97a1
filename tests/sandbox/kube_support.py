"""Shared helpers for the kube emulator tests: a stand-in model runtime and client builders.

``StubRuntime`` follows the runtime contract of docs/sandbox-contract.md (``start(pod, on_ready,
on_exit) -> PodServer``, ``behavior_for(pod)``) with a trivial HTTP server per pod, so these tests do
not depend on the real model servers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sandbox.core import Clock, Faults, JsonHandler, route, serve
from sandbox.kube import KubeCluster

ROUTES: list = []


@route(ROUTES, "GET", r"/health")
def _health(h: JsonHandler) -> Any:
    srv = h.server.state
    srv.requests_served += 1
    return (200, {"status": "ok"}) if srv.ready else (503, {"status": "loading"})


@route(ROUTES, "GET", r"/whoami")
def _whoami(h: JsonHandler) -> Any:
    srv = h.server.state
    srv.requests_served += 1
    return {"pod": srv.pod_name, "port": srv.port}


@route(ROUTES, "POST", r"/echo")
def _echo(h: JsonHandler) -> Any:
    h.server.state.requests_served += 1
    return {"got": h.json_body(), "query": h.url.query}


class _Handler(JsonHandler):
    service = "model"
    routes = ROUTES


class StubServer:
    def __init__(self, pod: dict, on_ready: Any, on_exit: Any, *, load_s: float, mode: str) -> None:
        self.pod_name = pod["metadata"]["name"]
        self.ready = False
        self.requests_served = 0
        self._logs = [f"INFO starting stub server for {self.pod_name}", "INFO loading weights"]
        self._server = serve(_Handler, state=self, faults=None)
        self.port = self._server.port
        self._stopped = threading.Event()

        def finish() -> None:
            if self._stopped.is_set():
                return
            if mode == "crash_loop":
                self._logs.append("ERROR ValueError: bad engine args")
                on_exit(1, "Error")
            elif mode == "oom":
                self._logs.append("ERROR torch.OutOfMemoryError: CUDA out of memory")
                on_exit(137, "OOMKilled")
            else:
                self.ready = True
                self._logs.append("INFO Application startup complete.")
                on_ready()

        if load_s <= 0:
            finish()
        else:
            t = threading.Timer(load_s, finish)
            t.daemon = True
            t.start()

    def logs(self) -> list[str]:
        return list(self._logs)

    def stop(self) -> None:
        self._stopped.set()
        self.ready = False
        self._server.stop()


class StubRuntime:
    """Modes per pod (by the ``mode`` label, else ``default_mode``): ok, crash_loop, crash_once (the pod's first
    container exits, later ones run), oom, image_pull_error."""

    def __init__(self, clock: Clock, load_s: float = 20.0, default_mode: str = "ok") -> None:
        self.clock = clock
        self.load_s = load_s
        self.default_mode = default_mode
        self.started: list[StubServer] = []
        self._crashed: set[str] = set()  # pods whose crash_once container has exited

    def behavior_for(self, pod: dict) -> Any:
        return SimpleNamespace(mode=(pod["metadata"].get("labels") or {}).get("mode", self.default_mode))

    def start(self, pod: dict, *, on_ready: Any, on_exit: Any) -> StubServer:
        mode = self.behavior_for(pod).mode
        if mode == "crash_once":
            uid = pod["metadata"]["uid"]
            mode = "ok" if uid in self._crashed else "crash_loop"
            self._crashed.add(uid)
        server = StubServer(pod, on_ready, on_exit, load_s=self.clock.scaled(self.load_s), mode=mode)
        self.started.append(server)
        return server


@contextmanager
def model_cluster(scale: float = 0.002) -> Iterator[tuple[KubeCluster, Any]]:
    """A started KubeCluster whose pods run the real model servers (``sandbox.engines.ModelRuntime``) on one
    clock at ``scale``, with no nodes yet; the cluster and the runtime stopped after the block."""
    from sandbox.engines import ModelRuntime
    from sandbox.hub import Hub

    clock, faults = Clock(scale), Faults()
    runtime = ModelRuntime(clock=clock, faults=faults, hub=Hub(faults=faults))
    k = KubeCluster(clock=clock, faults=faults, runtime=runtime)
    k.start()
    try:
        yield k, runtime
    finally:
        k.stop()
        runtime.stop()


def wait_for(pred: Any, timeout: float = 10.0, interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def process_gone(pid: int, *, within: float = 0.0) -> bool:
    """Whether process ``pid`` has exited (a zombie not yet reaped by its parent counts as gone), waiting up to
    ``within`` seconds for it."""
    import os

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        stat = Path(f"/proc/{pid}/stat")
        return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"

    deadline = time.monotonic() + within
    while not gone():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def deployment(name: str, *, replicas: int = 1, image: str = "vllm/vllm-openai:v0.6.3", gpus: int = 0,
               labels: dict | None = None, node_selector: dict | None = None, tolerations: list | None = None,
               strategy: dict | None = None, progress_deadline: int | None = None,
               args: list[str] | None = None) -> dict:
    labels = labels or {"app": name}
    container: dict = {"name": "server", "image": image, "ports": [{"name": "http", "containerPort": 8000}]}
    if args:
        container["args"] = args
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    pod_spec: dict = {"containers": [container]}
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if tolerations:
        pod_spec["tolerations"] = tolerations
    spec: dict = {"replicas": replicas, "selector": {"matchLabels": {"app": labels["app"]}},
                  "template": {"metadata": {"labels": labels}, "spec": pod_spec}}
    if strategy:
        spec["strategy"] = strategy
    if progress_deadline is not None:
        spec["progressDeadlineSeconds"] = progress_deadline
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name}, "spec": spec}


# ---- clients of a sandbox KubeCluster: https with its CA, a bearer token ---------------------------

def google_token(kube: Any, email: str = "tester@example.com") -> str:
    """A Google access token the cluster accepts (issued by its Google identity: project owner)."""
    return kube.auth.google.issue(email, scaled=False)[0]  # a real hour, whatever the time scale


def ca_file(kube: Any) -> str:
    """The cluster's CA as a PEM file (urllib3 reads a CA from a file only)."""
    import tempfile

    with tempfile.NamedTemporaryFile("wb", prefix="tests-sandbox-ca-", suffix=".crt", delete=False) as f:
        f.write(kube.tls.ca_pem)
    return f.name


def api_client(kube: Any, *, token: str | None = None, url: str | None = None) -> Any:
    """A kubernetes ApiClient for ``kube`` (default token: a Google one, i.e. allowed everything)."""
    from kubernetes import client

    cfg = client.Configuration(host=url or kube.url)
    cfg.ssl_ca_cert = ca_file(kube)
    cfg.api_key["BearerToken"] = token or google_token(kube)
    cfg.api_key_prefix["BearerToken"] = "Bearer"
    return client.ApiClient(cfg)


def http_client(kube: Any, *, token: str | None = None, headers: dict | None = None, **kwargs: Any) -> Any:
    """An httpx client for ``kube``'s API (trusting only its CA; ``token=""`` sends none)."""
    import httpx

    auth = {} if token == "" else {"Authorization": f"Bearer {token or google_token(kube)}"}
    return httpx.Client(base_url=kube.url, verify=kube.tls.client_context(), headers={**auth, **(headers or {})},
                        **kwargs)


def kubeconfig_entry(kube: Any, name: str = "sandbox", *, token: str | None = None) -> dict:
    """A kubeconfig (dict) for real kubectl: the cluster's CA and a static bearer token."""
    return {"apiVersion": "v1", "kind": "Config", "current-context": name,
            "clusters": [{"name": name, "cluster": {"server": kube.url,
                                                     "certificate-authority-data": kube.tls.ca_b64}}],
            "users": [{"name": name, "user": {"token": token or google_token(kube)}}],
            "contexts": [{"name": name, "context": {"cluster": name, "user": name}}]}


def write_kubeconfig(kube: Any, path: Any, *, token: str | None = None) -> str:
    """:func:`kubeconfig_entry` written to ``path`` as YAML; returns the path as a string (what tasks take)."""
    import yaml

    Path(path).write_text(yaml.safe_dump(kubeconfig_entry(kube, token=token)))
    return str(path)
