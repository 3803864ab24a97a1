"""A parked model meets what a GKE cluster does on its own — and stays parked.

The model is rendered from a bundled spec with its default PodMonitoring and a GCE Ingress, deployed the way
``deploy_model`` leaves it (so GKE infers the load balancer's health check from the model's readiness probe),
then parked the way ``park_model`` leaves it: the live Service on the hold proxy (a real process, ``python -m
servers.holdproxy``), the model at 0 replicas, no GPU node. For two hours of cloud time (scaled clock) the
sandbox's Managed Prometheus scrapes every PodMonitoring target, Google's health checkers probe the Ingress
backends and the kubelet probes the proxy. No request asks for the model, so nothing may ask for a wake.
No Prefect server: the proxy's wake events go to a recorder standing in for ``$PREFECT_API_URL/events``.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from manifests import names
from manifests import park as P
from manifests.render import render
from manifests.spec import parse_spec
from sandbox.core import Clock, Faults
from sandbox.kube import KubeCluster
from sandbox.kube import resources as res
from sandbox.kube.controllers import NODES, PODS
from tests.sandbox.kube_support import StubRuntime, wait_for

SCALE = 0.001  # two cloud hours = 7.2 s
ROOT = Path(__file__).resolve().parents[2]
HOURS = 2


class _Events(BaseHTTPRequestHandler):
    """Stands in for the Prefect API's ``POST /events``: keeps every event the hold proxy posts."""

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.events.extend(json.loads(body or b"[]"))  # type: ignore[attr-defined]
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def prefect_events():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Events)
    srv.events = []  # type: ignore[attr-defined]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()


@pytest.fixture
def kube():
    k = KubeCluster(clock=Clock(SCALE), faults=Faults(), runtime=StubRuntime(Clock(SCALE)))
    k.start()
    k.add_node("cpu-1", labels={}, capacity={"cpu": "8", "memory": "32Gi"})  # CPU only: the GPU pool is at 0
    yield k
    k.stop()


def _apply(kube: KubeCluster, obj: dict) -> None:
    t = res.BY_KIND[(obj["apiVersion"], obj["kind"])]
    ns = obj["metadata"].get("namespace") if t.namespaced else None
    if kube.store.get(t, ns or "", obj["metadata"]["name"]) is None:
        kube.api.create(t, ns, copy.deepcopy(obj))
    else:
        kube.store.replace(t, copy.deepcopy({**kube.store.get(t, ns or "", obj["metadata"]["name"]), **obj}))


def _spec():
    data = yaml.safe_load((ROOT / "deployments" / "gemma2-2b-it-vllm-l4.yaml").read_text())
    data["expose"]["ingress"] = {"class": "gce"}
    data["hold"] = {"image": "local/llm-fleet"}
    return parse_spec(data)


def _gpu_pods(kube: KubeCluster) -> list[str]:
    return [p["metadata"]["name"] for p in kube.store.list(PODS, None)[0]
            if "nvidia.com/gpu" in json.dumps(p["spec"].get("containers"))]


def _gpu_nodes(kube: KubeCluster) -> list[str]:
    return [n["metadata"]["name"] for n in kube.store.list(NODES, None)[0]
            if "nvidia.com/gpu" in (n.get("status") or {}).get("capacity", {})]


@pytest.mark.long
def test_a_parked_model_stays_parked_under_scrapes_and_health_checks_for_two_hours(kube, prefect_events):
    spec = _spec()
    ns = spec.namespace
    objs = {(o["kind"], o["metadata"]["name"]): o for o in render(spec, rbac=False)}
    # deploy_model: Deployment, Services, BackendConfig, Ingress, PodMonitoring; the load balancer checks the
    # path the BackendConfig names (with or without the model's pod at the Ingress's creation)
    for o in objs.values():
        if o["kind"] not in ("Namespace", "ServiceAccount"):
            _apply(kube, o)
    hc = wait_for(lambda: kube.ingress.health.health(ns, names.service(spec)), timeout=30)
    assert hc["check"]["source"] == "BackendConfig" and hc["check"]["path"] == "/health"

    # park_model: the hold proxy in front (Ready first), the live Service on it, the model to 0
    url = f"http://127.0.0.1:{prefect_events.server_address[1]}"
    _apply(kube, P.awake_service(spec, "blue"))
    hold = P.hold_proxy_deployment(spec, prefect_api_url=url)
    _apply(kube, hold)

    def ready_hold_pods() -> list[str] | None:
        names_ = [p["metadata"]["name"] for p in kube.store.list(PODS, ns)[0]
                  if p["metadata"]["labels"].get("app.kubernetes.io/component") == "hold-proxy"
                  and kube.pod_port(ns, p["metadata"]["name"]) and any(
                      c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or [])]
        return names_ if len(names_) == hold["spec"]["replicas"] else None  # park waits for the rollout

    hold_pods = wait_for(ready_hold_pods, timeout=60)
    live = copy.deepcopy(kube.store.get(res.BY_KEY[("", "services")], ns, names.service(spec)))
    live["spec"]["selector"] = P.hold_selector(spec)
    kube.store.replace(res.BY_KEY[("", "services")], live)
    dep = copy.deepcopy(kube.store.get(res.BY_KEY[("apps", "deployments")], ns, names.deployment(spec, "blue")))
    dep["spec"]["replicas"] = 0
    kube.store.replace(res.BY_KEY[("apps", "deployments")], dep)
    wait_for(lambda: not _gpu_pods(kube), timeout=30)

    # two hours of cloud time with nobody asking for the model
    start = kube.clock.now()
    time.sleep(kube.clock.scaled(HOURS * 3600))
    assert kube.clock.now() - start >= HOURS * 3600

    assert prefect_events.events == [], "a probe or scrape asked for a wake"
    assert _gpu_pods(kube) == [] and _gpu_nodes(kube) == []
    # the background actors really ran against the proxy's pods
    scraped = {p: kube.gmp.scrapes(namespace=ns, pod=p) for p in hold_pods}
    assert all(n >= 10 for n in scraped.values()), scraped
    # every scrape of the proxy answered. The model's own pod may show one up=0 here: Prometheus's discovery
    # lags a deleted pod by seconds and a scrape in flight then finds no container (real GMP does the same).
    ups = [s for s in kube.gmp.series({"__name__": "up", "namespace": ns, "job": spec.name}, start=start)
           if s["labels"]["pod"] in hold_pods]
    failed = [(s["labels"]["pod"], t) for s in ups for t, v in s["samples"] if v != 1.0]
    assert {s["labels"]["pod"] for s in ups} == set(hold_pods) and not failed, (failed, kube.gmp.targets())
    health = kube.ingress.health.health(ns, names.service(spec))
    assert health["endpoints"] and all(e["healthy"] and e["checks"] >= 10 for e in health["endpoints"].values())
    # the proxy's own metrics: valid Prometheus text, nothing held or asked for, the probes counted
    port = kube.pod_port(ns, hold_pods[0])
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("llm_fleet_hold_wake_requests_total", ())] == 0
    assert samples[("llm_fleet_hold_requests_held_total", ())] == 0
    assert samples[("llm_fleet_hold_probe_requests_total", (("agent", "Prometheus"),))] > 0
    assert samples[("llm_fleet_hold_probe_requests_total", (("agent", "GoogleHC"),))] > 0
    assert samples[("llm_fleet_hold_probe_requests_total", (("agent", "kube-probe"),))] > 0  # the kubelet's
    # and the load balancer still routes to the proxy: a client is held, not answered 502
    assert kube.ingress.health.healthy_ports(ns, names.service(spec))


def test_the_load_balancer_checks_the_engines_health_path_when_the_ingress_comes_before_the_pods(kube):
    """GKE infers a backend's health check from the readiness probe of the pods that exist when it creates the
    backend, once; an Ingress whose backend appeared before the Deployment's first pod got ``GET /``, which no
    engine answers with 200 (no healthy backend: 502 for every client). The rendered BackendConfig names the
    engines' health path, so the order deploy_model's apply happens to land in does not matter. (Failed before:
    source "default", path "/".)"""
    spec = _spec()
    for o in render(spec, rbac=False):
        if o["kind"] not in ("Namespace", "ServiceAccount", "Deployment"):
            _apply(kube, o)
    hc = wait_for(lambda: kube.ingress.health.health(spec.namespace, names.service(spec)), timeout=30)
    assert not [p for p in kube.store.list(PODS, spec.namespace)[0]]  # no pod when the backend was made
    assert hc["check"]["source"] == "BackendConfig" and hc["check"]["path"] == "/health", hc["check"]

