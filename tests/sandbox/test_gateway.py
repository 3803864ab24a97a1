"""The GKE Inference Gateway on the sandbox: CRDs served only once installed, a Gateway address that serves,
HTTPRoute weights honoured, body-based routing by the OpenAI ``model`` field, and the endpoint picker
favouring the less loaded pod."""

from __future__ import annotations

import concurrent.futures as cf
import http.server
import re
import threading
import time

import httpx
import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from sandbox.kube import addons
from sandbox.kube.controllers import PODS as _PODS
from sandbox.kube.gateway import SCRAPE_EVERY_S, _Picker, gateway_url
from tests.sandbox.access_support import configuration
from tests.sandbox.kube_support import model_cluster, wait_for

GW, IE = "gateway.networking.k8s.io", "inference.networking.k8s.io"
EPP_IMAGE = "registry.k8s.io/gateway-api-inference-extension/epp:v1.0.1"


def _vllm(name: str, model: str, labels: dict, *, replicas: int = 1, max_seqs: int = 256) -> dict:
    return {"metadata": {"name": name}, "spec": {
        "replicas": replicas, "selector": {"matchLabels": labels},
        "template": {"metadata": {"labels": labels}, "spec": {"containers": [{
            "name": "vllm", "image": "vllm/vllm-openai:v0.10.2",
            "args": ["--model", model, "--port", "8000", "--max-num-seqs", str(max_seqs)],
            "ports": [{"name": "http", "containerPort": 8000}],
            "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}}}


def _pool(api, name: str, labels: dict) -> None:
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    epp = {"app": f"{name}-epp"}
    apps.create_namespaced_deployment("default", {"metadata": {"name": f"{name}-epp"}, "spec": {
        "replicas": 1, "selector": {"matchLabels": epp}, "template": {"metadata": {"labels": epp}, "spec": {
            "containers": [{"name": "epp", "image": EPP_IMAGE, "ports": [{"containerPort": 9002}]}]}}}})
    core.create_namespaced_service("default", {"metadata": {"name": f"{name}-epp"}, "spec": {
        "selector": epp, "ports": [{"name": "grpc-ext-proc", "port": 9002, "appProtocol": "http2"}]}})
    client.CustomObjectsApi(api).create_namespaced_custom_object(IE, "v1", "default", "inferencepools", {
        "apiVersion": f"{IE}/v1", "kind": "InferencePool", "metadata": {"name": name},
        "spec": {"selector": {"matchLabels": labels}, "targetPorts": [{"number": 8000}],
                 "endpointPickerRef": {"name": f"{name}-epp", "port": {"number": 9002}}}})


def _route(name: str, model: str, backends: list[tuple[str, int]]) -> dict:
    return {"apiVersion": f"{GW}/v1", "kind": "HTTPRoute", "metadata": {"name": name}, "spec": {
        "parentRefs": [{"name": "inference"}],
        "rules": [{"matches": [{"headers": [{"name": "X-Gateway-Model-Name", "value": model}],
                                "path": {"type": "PathPrefix", "value": "/"}}],
                   "backendRefs": [{"group": IE, "kind": "InferencePool", "name": n, "weight": w}
                                   for n, w in backends]}]}}


@pytest.fixture(scope="module")
def kube():
    with model_cluster() as (k, _):
        for i in range(6):
            k.add_node(f"gpu-{i}", capacity={"nvidia.com/gpu": "1"})
        api = client.ApiClient(configuration(k))
        yield k, api


def test_gateway_kinds_are_served_only_once_their_crds_are_installed(kube):
    k, api = kube
    custom = client.CustomObjectsApi(api)
    with pytest.raises(ApiException) as err:
        custom.list_namespaced_custom_object(GW, "v1", "default", "httproutes")
    assert err.value.status == 404
    addons.install_gateway_api(k)
    addons.install_inference_extension(k)
    assert custom.list_namespaced_custom_object(GW, "v1", "default", "httproutes")["items"] == []
    classes = {c["metadata"]["name"] for c in custom.list_cluster_custom_object(GW, "v1", "gatewayclasses")["items"]}
    assert {"gke-l7-regional-external-managed", "gke-l7-rilb"} <= classes
    rilb = wait_for(lambda: (custom.get_cluster_custom_object(GW, "v1", "gatewayclasses", "gke-l7-rilb").get(
        "status") or {}).get("conditions"))
    assert [(c["type"], c["status"]) for c in rilb] == [("Accepted", "True")]
    # the CRD's schema is enforced (and its defaults applied), as by the real API server
    with pytest.raises(ApiException) as err:
        custom.create_namespaced_custom_object(IE, "v1", "default", "inferencepools", {
            "apiVersion": f"{IE}/v1", "kind": "InferencePool", "metadata": {"name": "bad"},
            "spec": {"selector": {"matchLabels": {"app": "x"}}, "targetPorts": [{"number": 8000}]}})
    assert err.value.status == 422 and "endpointPickerRef" in err.value.body


@pytest.fixture(scope="module")
def served(kube):
    k, api = kube
    addons.install_gateway_api(k)
    addons.install_inference_extension(k)
    apps = client.AppsV1Api(api)
    apps.create_namespaced_deployment("default", _vllm("mistral-blue", "mistralai/Mistral-7B-Instruct-v0.3",
                                                       {"app": "mistral", "color": "blue"}))
    apps.create_namespaced_deployment("default", _vllm("mistral-green", "mistralai/Mistral-7B-Instruct-v0.3",
                                                       {"app": "mistral", "color": "green"}))
    apps.create_namespaced_deployment("default", _vllm("qwen", "Qwen/Qwen2.5-0.5B-Instruct", {"app": "qwen"},
                                                       replicas=2, max_seqs=2))
    _pool(api, "mistral-blue", {"app": "mistral", "color": "blue"})
    _pool(api, "mistral-green", {"app": "mistral", "color": "green"})
    _pool(api, "qwen", {"app": "qwen"})
    custom = client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(GW, "v1", "default", "gateways", {
        "apiVersion": f"{GW}/v1", "kind": "Gateway", "metadata": {"name": "inference"},
        "spec": {"gatewayClassName": "gke-l7-regional-external-managed",
                 "listeners": [{"name": "http", "protocol": "HTTP", "port": 80}]}})
    custom.create_namespaced_custom_object(GW, "v1", "default", "httproutes", _route(
        "mistral", "mistralai/Mistral-7B-Instruct-v0.3", [("mistral-blue", 75), ("mistral-green", 25)]))
    custom.create_namespaced_custom_object(GW, "v1", "default", "httproutes", _route(
        "qwen", "Qwen/Qwen2.5-0.5B-Instruct", [("qwen", 1)]))
    wait_for(lambda: len(k.ready_pod_ports("default", {"app": "mistral"})) == 2 and
             len(k.ready_pod_ports("default", {"app": "qwen"})) == 2, timeout=60)

    def address():
        gw = custom.get_namespaced_custom_object(GW, "v1", "default", "gateways", "inference")
        pool = custom.get_namespaced_custom_object(IE, "v1", "default", "inferencepools", "qwen")
        ok = all(c["status"] == "True" for p in (pool.get("status") or {}).get("parents") or []
                 for c in p["conditions"]) and (pool.get("status") or {}).get("parents")
        return gateway_url(gw) if ok else None
    return k, api, wait_for(address, timeout=30)


def test_gateway_status_as_gke_writes_it(served):
    k, api, url = served
    custom = client.CustomObjectsApi(api)
    gw = custom.get_namespaced_custom_object(GW, "v1", "default", "gateways", "inference")
    conds = {c["type"]: c["status"] for c in gw["status"]["conditions"]}
    assert conds == {"Accepted": "True", "Programmed": "True"}
    assert gw["status"]["listeners"][0]["attachedRoutes"] == 2
    route = custom.get_namespaced_custom_object(GW, "v1", "default", "httproutes", "mistral")
    parent = route["status"]["parents"][0]
    assert parent["controllerName"] == "networking.gke.io/gateway"
    assert {c["type"]: c["status"] for c in parent["conditions"]} == {"Accepted": "True", "ResolvedRefs": "True"}
    # defaults from the CRD schema, applied by the API server
    assert route["spec"]["parentRefs"][0]["kind"] == "Gateway"


def test_route_weights_split_traffic_by_the_pods_own_counts(served):
    k, api, url = served
    before = {c: sum(_arrivals_by(k, "mistral", c)) for c in ("blue", "green")}
    n = 200
    with httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(n):
            r = c.post("/v1/completions", json={"model": "mistralai/Mistral-7B-Instruct-v0.3",
                                                "prompt": "hi", "max_tokens": 1})
            assert r.status_code == 200, r.text
    green = sum(_arrivals_by(k, "mistral", "green")) - before["green"]
    blue = sum(_arrivals_by(k, "mistral", "blue")) - before["blue"]
    assert blue + green == n
    assert abs(100 * green / n - 25) <= 3


def _arrivals_by(k, app, color):
    out = []
    for p in k.store.list(_PODS, "default")[0]:
        labels = p["metadata"].get("labels") or {}
        if labels.get("app") == app and labels.get("color") == color:
            text = httpx.get(f"http://127.0.0.1:{k.pod_port('default', p['metadata']['name'])}/metrics").text
            out.append(sum(float(v) for v in re.findall(r'^vllm:request_success_total\{[^}]*\} (\S+)$', text, re.M)))
    return out


def test_two_models_share_one_gateway_routed_by_the_model_field(served):
    from openai import OpenAI

    k, api, url = served
    oai = OpenAI(base_url=f"{url}/v1", api_key="unused")
    a = oai.completions.create(model="Qwen/Qwen2.5-0.5B-Instruct", prompt="Hello", max_tokens=4)
    b = oai.chat.completions.create(model="mistralai/Mistral-7B-Instruct-v0.3",
                                    messages=[{"role": "user", "content": "Hello"}], max_tokens=4)
    assert a.model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert b.model == "mistralai/Mistral-7B-Instruct-v0.3"
    r = httpx.post(f"{url}/v1/completions", json={"model": "nobody/unknown", "prompt": "x"})
    assert r.status_code == 404  # no route matches that model


def test_endpoint_picker_favours_the_less_loaded_pod(served):
    k, api, url = served
    pods = sorted(p["metadata"]["name"] for p in k.store.list(_PODS, "default")[0]
                  if (p["metadata"].get("labels") or {}).get("app") == "qwen")
    busy, idle = pods
    busy_port = k.pod_port("default", busy)
    before = {p: sum(_counts(k, p)) for p in pods}
    stop = threading.Event()

    def saturate() -> None:  # max-num-seqs 2: six clients keep requests waiting in its queue
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                c.post(f"http://127.0.0.1:{busy_port}/v1/completions",
                       json={"model": "Qwen/Qwen2.5-0.5B-Instruct", "prompt": "x", "max_tokens": 300})

    with cf.ThreadPoolExecutor(6) as pool:
        load = [pool.submit(saturate) for _ in range(6)]
        try:
            wait_for(lambda: re.search(r"^vllm:num_requests_waiting\{[^}]*\} ([1-9])", httpx.get(
                f"http://127.0.0.1:{busy_port}/metrics").text, re.M), timeout=20)
            with httpx.Client(base_url=url, timeout=120) as c:
                for _ in range(20):
                    r = c.post("/v1/completions", json={"model": "Qwen/Qwen2.5-0.5B-Instruct", "prompt": "hi",
                                                        "max_tokens": 1})
                    assert r.status_code == 200, r.text  # which 503 (picker down, no pod) when it fails
            got_idle = sum(_counts(k, idle)) - before[idle]
        finally:
            stop.set()
            cf.wait(load)
    assert got_idle >= 18, got_idle


def _counts(k, pod):
    text = httpx.get(f"http://127.0.0.1:{k.pod_port('default', pod)}/metrics").text
    return [float(v) for v in re.findall(r'^vllm:request_success_total\{[^}]*\} (\S+)$', text, re.M)]


def test_a_failed_scrape_keeps_a_busy_pods_last_signals():
    """Upstream's refreshMetrics stores nothing when a pod's /metrics fails: a busy engine that misses a scrape
    (a 500, an answer that is not HTTP, a closed port) is still busy to the picker, not suddenly idle."""
    pages = {"busy": "vllm:num_requests_waiting{model_name=\"m\"} 5\n",
             "idle": "vllm:num_requests_waiting{model_name=\"m\"} 0\n"}
    failure: list[str] = []  # how the busy pod's /metrics fails now, once it does

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.server.which == "busy" and failure == ["garbage"]:
                self.wfile.write(b"not an HTTP status line\r\n\r\n")  # http.client: BadStatusLine
                return
            status = 500 if self.server.which == "busy" and failure else 200
            body = pages[self.server.which].encode() if status == 200 else b"scrape failed"
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    servers = []
    for which in ("busy", "idle"):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
        srv.which = which
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    busy, idle = (s.server_address[1] for s in servers)
    picker = _Picker()
    picks = []

    def pick_five() -> None:
        for _ in range(5):
            time.sleep(SCRAPE_EVERY_S)  # every pick scrapes again
            picks.append(picker.pick([busy, idle]))
            picker.done(picks[-1])

    try:
        assert picker.pick([busy, idle]) == idle
        picker.done(idle)
        for mode in ("500", "garbage"):
            failure[:] = [mode]
            pick_five()
        servers[0].shutdown()
        servers[0].server_close()  # and then a closed port: refused
        pick_five()
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
    assert len(picks) == 15 and picks.count(busy) == 0, picks
