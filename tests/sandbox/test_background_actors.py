"""What a GKE cluster does on its own: Managed Prometheus scrapes, Google's load-balancer health checks,
kube-proxy's programming delay — each as real HTTP to the pods' servers, on the scaled clock."""

from __future__ import annotations

import copy
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest

from sandbox.core import Clock, Faults, PromptHTTPServer
from sandbox.kube import KubeCluster
from sandbox.kube import resources as res
from sandbox.kube.controllers import PODS, SVCS
from tests.sandbox.kube_support import wait_for

SCALE = 0.002


class _Server:
    """A pod's server that records who asked what: /metrics in Prometheus text, /health 200 until broken."""

    def __init__(self, pod: dict, on_ready: Any) -> None:
        self.pod = pod["metadata"]["name"]
        self.seen: list[tuple[str, str]] = []
        self.healthy = True
        self.alive = True
        self.requests_total = 3
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - stdlib name
                outer.seen.append((self.path, self.headers.get("User-Agent", "")))
                if self.path == "/metrics":
                    body, code = (f'demo_requests_total{{pod="{outer.pod}"}} {outer.requests_total}\n'
                                  'demo_up 1\n').encode(), 200
                elif self.path == "/health":
                    body, code = b"ok", 200 if outer.healthy else 500
                elif self.path == "/alive":
                    body, code = b"ok", 200 if outer.alive else 500
                else:
                    body, code = outer.pod.encode(), 200
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._srv = PromptHTTPServer(("127.0.0.1", 0), H)
        self.port = self._srv.server_address[1]
        self.ready = True
        self._srv.start_serving("fake-pod")
        on_ready()

    def agents(self, path: str) -> set[str]:
        return {ua for p, ua in list(self.seen) if p == path}

    def logs(self) -> list[str]:
        return []

    def stop(self) -> None:
        self.ready = False
        self._srv.shutdown()
        self._srv.server_close()


class _Runtime:
    def __init__(self) -> None:
        self.servers: dict[str, _Server] = {}

    def behavior_for(self, pod: dict) -> Any:
        return {"mode": "ok"}

    def start(self, pod: dict, *, on_ready: Any, on_exit: Any) -> _Server:
        srv = self.servers[pod["metadata"]["name"]] = _Server(pod, on_ready)
        return srv


@pytest.fixture
def kube():
    rt = _Runtime()
    k = KubeCluster(clock=Clock(SCALE), faults=Faults(), runtime=rt)
    k.runtime_servers = rt.servers
    k.start()
    k.add_node("cpu-1", labels={}, capacity={"cpu": "8", "memory": "32Gi"})
    yield k
    k.stop()


def _create(kube: KubeCluster, obj: dict, ns: str | None = "default") -> dict:
    t = res.BY_KIND[(obj["apiVersion"], obj["kind"])]
    return kube.api.create(t, ns if t.namespaced else None, copy.deepcopy(obj))


def _pod(name: str, labels: dict, *, port_name: str = "http", probe: str | None = "/health") -> dict:
    c: dict = {"name": "server", "image": "example/server:1", "ports": [{"name": port_name, "containerPort": 8000}]}
    if probe:
        c["readinessProbe"] = {"httpGet": {"path": probe, "port": port_name}, "periodSeconds": 5, "timeoutSeconds": 2}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
            "spec": {"containers": [c]}}


def _ready(kube: KubeCluster, ns: str, *names: str) -> None:
    wait_for(lambda: all(kube.pod_port(ns, n) for n in names), timeout=20)


def test_managed_prometheus_scrapes_what_podmonitorings_select(kube):
    _create(kube, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}}, None)
    _create(kube, _pod("a", {"app": "m"}))
    _create(kube, _pod("b", {"app": "m"}, port_name="web"))  # no port named http: not a target
    _create(kube, _pod("c", {"app": "m"}), "other")  # another namespace: only the ClusterPodMonitoring's
    _create(kube, _pod("d", {"app": "x"}))  # not selected
    _ready(kube, "default", "a", "b", "d")
    _ready(kube, "other", "c")
    _create(kube, {"apiVersion": "monitoring.googleapis.com/v1", "kind": "PodMonitoring", "metadata": {"name": "m"},
                   "spec": {"selector": {"matchLabels": {"app": "m"}},
                            "endpoints": [{"port": "http", "path": "/metrics", "interval": "30s"}]}})
    _create(kube, {"apiVersion": "monitoring.googleapis.com/v1", "kind": "ClusterPodMonitoring",
                   "metadata": {"name": "everywhere"},
                   "spec": {"selector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["m"]}]},
                            "endpoints": [{"port": 8000, "interval": "1m"}]}})
    gmp = kube.gmp
    start = gmp.now()
    wait_for(lambda: gmp.scrapes(namespace="default", pod="a") >= 5 and gmp.scrapes(namespace="other", pod="c") >= 2,
             timeout=30)
    servers = kube.runtime_servers
    assert servers["a"].agents("/metrics") == {"Prometheus/2.45.3"}
    assert not servers["d"].agents("/metrics")
    assert servers["c"].agents("/metrics")  # through the ClusterPodMonitoring (numeric port)
    assert {t["job"] for t in gmp.targets() if t["pod"] == "b"} == {"everywhere"}  # port "http" undeclared on b

    series = gmp.series({"__name__": "demo_requests_total", "job": "m"})
    (s,) = series
    assert s["labels"] == {"__name__": "demo_requests_total", "namespace": "default", "job": "m",
                           "instance": "a:http", "pod": "a", "container": "server"}  # target labels win over pod=
    times = [t for t, _ in s["samples"]]
    assert all(v == 3.0 for _, v in s["samples"]) and all(t >= start for t in times)
    steps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert steps and min(steps) >= 30 * 0.8  # cloud seconds: the interval, whatever the time scale
    (up,) = gmp.series({"__name__": "up", "job": "m"})
    assert {v for _, v in up["samples"]} == {1.0}


def test_an_unchanged_metrics_page_is_parsed_once_and_still_sampled_at_every_scrape(kube, monkeypatch):
    """An idle engine serves the same /metrics page scrape after scrape: the collector parses a page once, and
    every scrape still adds its samples (rate(), staleness and `up` read them); a changed page is parsed again.
    (Before: every scrape of every pod ran prometheus_client's parser, ~2 ms for vLLM's page, 4 times a
    second per pod in the suite: most of the sandbox's idle CPU.)"""
    from sandbox.kube import gmp as gmp_module

    parsed: list[str] = []
    parse = gmp_module._parse
    monkeypatch.setattr(gmp_module, "_parse", lambda text, ctype: parsed.append(text) or parse(text, ctype))
    _create(kube, _pod("a", {"app": "m"}))
    _ready(kube, "default", "a")
    _create(kube, {"apiVersion": "monitoring.googleapis.com/v1", "kind": "PodMonitoring", "metadata": {"name": "m"},
                   "spec": {"selector": {"matchLabels": {"app": "m"}},
                            "endpoints": [{"port": "http", "path": "/metrics", "interval": "30s"}]}})
    gmp = kube.gmp
    wait_for(lambda: gmp.scrapes(namespace="default", pod="a") >= 5, timeout=30)
    assert len(parsed) == 1

    def values() -> list[float]:
        (s,) = gmp.series({"__name__": "demo_requests_total", "job": "m"})
        return [v for _, v in s["samples"]]

    kube.runtime_servers["a"].requests_total = 4
    wait_for(lambda: values()[-3:] == [4.0] * 3, timeout=30)
    assert len(parsed) == 2 and values().count(3.0) >= 4  # one sample per scrape, parsed or not


def test_gce_health_checks_take_out_a_failing_backend_and_the_lb_answers_502(kube):
    _create(kube, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                   "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
    pod = _pod("w1", {"app": "web"})
    # the kubelet gives up on readiness only after 1000 failures; the health check does not copy
    # failureThreshold (ingress-gce #771), so the load balancer drops the pod long before Kubernetes does
    pod["spec"]["containers"][0]["readinessProbe"]["failureThreshold"] = 1000
    _create(kube, pod)
    _ready(kube, "default", "w1")
    _create(kube, {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                   "metadata": {"name": "web", "annotations": {"kubernetes.io/ingress.class": "gce"}},
                   "spec": {"defaultBackend": {"service": {"name": "web", "port": {"number": 80}}}}})
    url = wait_for(lambda: kube.ingress.url("default", "web"), timeout=20)
    hc = wait_for(lambda: (kube.ingress.health.health("default", "web") or {}).get("endpoints") and
                  kube.ingress.health.health("default", "web"), timeout=20)
    # inferred from the serving pod's readiness probe (NEG: its period and timeout)
    assert hc["check"] == {"path": "/health", "interval_s": 5.0, "timeout_s": 2.0, "healthy": 1, "unhealthy": 2,
                         "source": "readinessProbe"}
    assert wait_for(lambda: httpx.get(url + "/", timeout=10).text == "w1", timeout=20)
    srv = kube.runtime_servers["w1"]
    assert srv.agents("/health") >= {"GoogleHC/1.0"}

    srv.healthy = False  # the pod stays Ready for Kubernetes; only the load balancer's check fails
    resp = wait_for(lambda: (r := httpx.get(url + "/", timeout=10)).status_code == 502 and r, timeout=20)
    assert "502" in resp.text and "Please try again in 30 seconds" in resp.text
    assert kube.ingress.health.health("default", "web")["endpoints"] and _ready_condition(kube, "w1") == "True"
    srv.healthy = True  # one success (healthy threshold 1) and it serves again
    assert wait_for(lambda: httpx.get(url + "/", timeout=10).status_code == 200, timeout=20)


def test_a_service_routes_by_the_endpoints_of_lag_seconds_ago(kube):
    kube.kube_proxy.lag_s = 300.0  # cloud seconds: 0.6 s real at this scale
    _create(kube, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "svc"},
                   "spec": {"selector": {"app": "a"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
    _create(kube, _pod("a", {"app": "a"}))
    _create(kube, _pod("b", {"app": "b"}))
    _ready(kube, "default", "a", "b")
    pa, pb = kube.pod_port("default", "a"), kube.pod_port("default", "b")
    assert kube.service_backends("default", "svc") == [pa]
    assert wait_for(lambda: kube.routed_backends("default", "svc") == [pa], timeout=20)  # programmed, after the lag

    svc = copy.deepcopy(kube.store.get(SVCS, "default", "svc"))
    svc["spec"]["selector"] = {"app": "b"}
    kube.store.replace(SVCS, svc)
    changed = wait_for(lambda: kube.service_backends("default", "svc") == [pb] and time.monotonic(), timeout=20)
    assert kube.routed_backends("default", "svc") == [pa]  # the old pod still gets new connections
    wait_for(lambda: kube.routed_backends("default", "svc") == [pb], timeout=20)
    assert time.monotonic() - changed >= kube.clock.scaled(300.0) * 0.8

    kube.kube_proxy.lag_s = 0.0  # the Endpoints of now
    kube.store.delete(PODS, "default", "b")
    wait_for(lambda: kube.routed_backends("default", "svc") == [], timeout=20)


def _ready_condition(kube: KubeCluster, name: str) -> str:
    pod = kube.store.get(PODS, "default", name) or {}
    return next((c["status"] for c in (pod.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"), "")


def test_kubelet_probes_drive_readiness_and_restart_a_failing_container(kube):
    """The kubelet probes over HTTP at the probes' periods (kube-probe/1.x): a failing readiness probe takes the
    pod out of the Service's endpoints and back in once it passes; a failing liveness probe restarts it."""
    _create(kube, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "svc"},
                   "spec": {"selector": {"app": "p"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
    pod = _pod("p", {"app": "p"})
    c = pod["spec"]["containers"][0]
    c["readinessProbe"] = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5, "failureThreshold": 2}
    c["livenessProbe"] = {"httpGet": {"path": "/alive", "port": "http"}, "periodSeconds": 10, "failureThreshold": 3}
    _create(kube, pod)
    _ready(kube, "default", "p")
    wait_for(lambda: kube.service_backends("default", "svc"), timeout=20)
    srv = kube.runtime_servers["p"]
    wait_for(lambda: srv.agents("/health") and srv.agents("/alive"), timeout=20)
    assert {ua.split("/")[0] for ua in srv.agents("/health") | srv.agents("/alive")} == {"kube-probe"}
    assert all(ua.startswith("kube-probe/1.") for ua in srv.agents("/health"))

    srv.healthy = False  # /health answers 500: NotReady after 2 failures, out of the endpoints
    wait_for(lambda: _ready_condition(kube, "p") == "False" and not kube.service_backends("default", "svc"),
             timeout=20)
    srv.healthy = True
    wait_for(lambda: _ready_condition(kube, "p") == "True" and kube.service_backends("default", "svc"), timeout=20)
    assert (kube.store.get(PODS, "default", "p")["status"]["containerStatuses"][0]["restartCount"]) == 0

    srv.alive = False  # liveness fails 3 times: the kubelet kills the container, which restarts
    wait_for(lambda: kube.store.get(PODS, "default", "p")["status"]["containerStatuses"][0]["restartCount"] >= 1,
             timeout=30)
    reasons = {e["reason"] for e in kube.store.list(res.BY_KEY[("", "events")], "default")[0]}
    assert {"Unhealthy", "Killing"} <= reasons


def test_a_backendconfig_sets_the_gce_health_check(kube):
    """GKE's BackendConfig (named by the Service's cloud.google.com/backend-config) overrides what its
    spec.healthCheck sets, over the readiness probe's and the defaults."""
    _create(kube, {"apiVersion": "cloud.google.com/v1", "kind": "BackendConfig", "metadata": {"name": "bc"},
                   "spec": {"healthCheck": {"requestPath": "/ping", "checkIntervalSec": 30, "unhealthyThreshold": 4}}})
    _create(kube, {"apiVersion": "v1", "kind": "Service", "metadata": {
        "name": "web", "annotations": {"cloud.google.com/backend-config": '{"default": "bc"}'}},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
    _create(kube, _pod("w1", {"app": "web"}))
    _ready(kube, "default", "w1")
    _create(kube, {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                   "metadata": {"name": "web", "annotations": {"kubernetes.io/ingress.class": "gce"}},
                   "spec": {"defaultBackend": {"service": {"name": "web", "port": {"number": 80}}}}})
    hc = wait_for(lambda: (h := kube.ingress.health.health("default", "web")) and h["check"]["source"] ==
                  "BackendConfig" and h, timeout=20)
    assert hc["check"] == {"path": "/ping", "interval_s": 30.0, "timeout_s": 2.0, "healthy": 1, "unhealthy": 4,
                           "source": "BackendConfig"}
    wait_for(lambda: kube.runtime_servers["w1"].agents("/ping") == {"GoogleHC/1.0"}, timeout=20)


def test_a_selector_switch_behind_a_gce_ingress_moves_once_kube_proxy_lag_passes(kube):
    """The NEG follows the lagged Endpoints; the new pod is checked the moment it joins, so the load balancer
    has no healthy endpoint only for one check, not for a whole health-check interval (here an hour)."""
    kube.kube_proxy.lag_s = 300.0  # 0.6 s real
    _create(kube, {"apiVersion": "cloud.google.com/v1", "kind": "BackendConfig", "metadata": {"name": "slow"},
                   "spec": {"healthCheck": {"checkIntervalSec": 3600}}})
    _create(kube, {"apiVersion": "v1", "kind": "Service", "metadata": {
        "name": "web", "annotations": {"cloud.google.com/backend-config": '{"default": "slow"}'}},
        "spec": {"selector": {"app": "a"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
    _create(kube, _pod("a1", {"app": "a"}))
    _create(kube, _pod("b1", {"app": "b"}))
    _ready(kube, "default", "a1", "b1")
    _create(kube, {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                   "metadata": {"name": "web", "annotations": {"kubernetes.io/ingress.class": "gce"}},
                   "spec": {"defaultBackend": {"service": {"name": "web", "port": {"number": 80}}}}})
    url = wait_for(lambda: kube.ingress.url("default", "web"), timeout=20)
    http = httpx.Client(timeout=10)
    assert wait_for(lambda: http.get(url + "/").text == "a1", timeout=20)

    svc = copy.deepcopy(kube.store.get(SVCS, "default", "web"))
    svc["spec"]["selector"] = {"app": "b"}
    kube.store.replace(SVCS, svc)
    start, seen = time.monotonic(), []
    while time.monotonic() - start < 15 and [b for _, _, b in seen].count("b1") < 5:
        r = http.get(url + "/")
        seen.append((time.monotonic() - start, r.status_code, r.text if r.status_code == 200 else ""))
    first_b = next(t for t, _, b in seen if b == "b1")
    bad = [t for t, code, _ in seen if code != 200]
    assert first_b >= kube.clock.scaled(300.0) * 0.8  # kube-proxy's lag: the old pod served meanwhile
    assert {b for t, _, b in seen if t < first_b and b} == {"a1"}, seen[:20]
    assert not bad or max(bad) - min(bad) < 0.2, bad  # at most one check's worth of 502 (before: ~0.4 s of them)
