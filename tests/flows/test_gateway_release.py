"""The Gateway path through the flows on the sandbox: provision_cluster turns the Gateway API on, deploy_model's
preflight names the missing Inference Extension CRDs with the command that installs them, then serves through
the Gateway; release_model with strategy canary under load through the Gateway's address promotes a good
candidate step by step and stops a candidate bad on real traffic only at its first step, weight back on the
live color; rollback_model moves the route's weight back to the warm color too."""

from __future__ import annotations

import copy
import threading
import time

import httpx
import pytest

from tests.flows.conftest import spec_dict

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.long]

GW, IE = "gateway.networking.k8s.io", "inference.networking.k8s.io"
LONG = " ".join(["Summarise the following log line carefully please."] * 40)


def _spec() -> dict:
    # the hold proxy as the sandbox runs the product's image (a parked model's requests are held)
    spec = spec_dict("qwen2.5-7b-sglang.yaml", name="qwen-gw", hold__image="local/llm-fleet", hold__timeout=60)
    spec["engine"] = {"kind": "vllm"}
    spec["accelerator"] = {"type": "nvidia-l4", "pool": {"max_nodes": 3, "min_nodes": 0, "initial_nodes": 1}}
    spec["expose"] = {"gateway": {"class": "gke-l7-regional-external-managed"}}
    spec["release"] = {"strategy": "canary", "steps": [{"weight": 20, "hold": "1500s"}, {"weight": 100, "hold": "1500s"}],
                       "scale_down_delay": "600s"}
    return spec


def _custom(spec: dict):
    from kubernetes import client

    from tasks.clients import kube_client
    from tasks.gke import get_credentials

    c = spec["cluster"]
    return client.CustomObjectsApi(kube_client(get_credentials.fn(project=c["project"], location=c["location"],
                                                                 name=c.get("name", "llm-fleet"))))


def _weights(spec: dict) -> dict[str, int]:
    route = _custom(spec).get_namespaced_custom_object(GW, "v1", "default", "httproutes", spec["name"])
    return {r["name"]: r["weight"] for r in route["spec"]["rules"][0]["backendRefs"]}


class GatewayLoad:
    """Clients through the Gateway's address, routed by the model field; every answer counted."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(2)]

    def _run(self, i: int) -> None:
        n = i
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self._stop.is_set():
                n += 1
                try:
                    self.statuses.append(c.post("/v1/completions", json={
                        "model": self.model, "prompt": LONG if n % 5 == 0 else "Hi", "max_tokens": 4}).status_code)
                except httpx.HTTPError:
                    self.statuses.append(0)
                # ~100 requests/s in all: each canary step (20 %, min_requests 20) sees ~75. Without the pause
                # the two clients sent 450/s and spent a core of the suite's two on answers nobody judged.
                self._stop.wait(0.01)

    def __enter__(self) -> GatewayLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)


def _proxy_only_subnet(project: str, region: str) -> None:
    """gcloud compute networks subnets create proxy-only-REGION --purpose=REGIONAL_MANAGED_PROXY ..."""
    from tasks.clients import compute_http

    resp = compute_http().post(f"projects/{project}/regions/{region}/subnetworks", json={
        "name": f"proxy-only-{region}", "purpose": "REGIONAL_MANAGED_PROXY", "role": "ACTIVE", "network": "default",
        "ipCidrRange": "10.129.0.0/23"})
    assert resp.status_code == 200 and resp.json()["status"] == "DONE", resp.text


@pytest.fixture(scope="module")
def gw_served(sandbox):
    from flows.deploy_model import deploy_model
    from flows.provision_cluster import provision_cluster
    from sandbox.kube import addons
    from sandbox.kube.gateway import gateway_url

    spec = _spec()
    provision_cluster(spec=spec)
    kube = sandbox.cluster_kube(spec["cluster"].get("name", "llm-fleet"), project=spec["cluster"]["project"])
    assert "httproutes.gateway.networking.k8s.io" in kube.installed_crds()  # --gateway-api=standard
    with pytest.raises(Exception) as err:
        deploy_model(spec=spec)
    assert "inferencepools.inference.networking.k8s.io" in str(err.value) and "kubectl apply -f" in str(err.value)
    assert "no proxy-only subnet in us-central1" in str(err.value) and "REGIONAL_MANAGED_PROXY" in str(err.value)
    addons.install_inference_extension(kube)  # what the named commands do
    _proxy_only_subnet(spec["cluster"]["project"], "us-central1")
    deploy_model(spec=spec)
    gw = _custom(spec).get_namespaced_custom_object(GW, "v1", "default", "gateways", f"{spec['name']}-gateway")
    deadline = time.monotonic() + 30
    while gateway_url(gw) is None and time.monotonic() < deadline:
        time.sleep(0.1)
        gw = _custom(spec).get_namespaced_custom_object(GW, "v1", "default", "gateways", f"{spec['name']}-gateway")
    yield spec, gateway_url(gw)
    _teardown_leaves_nothing(spec, kube)


def _teardown_leaves_nothing(spec: dict, kube) -> None:
    """teardown of the Gateway model: the flow verifies by label, and the sandbox's own store has nothing of
    the spec left either (a pod without the instance label, e.g. an endpoint picker's, included)."""
    from flows.teardown import teardown
    from sandbox.kube import resources as res

    teardown(spec=spec)
    name, left = spec["name"], []
    for rtype in res.BY_KEY.values():
        if not rtype.namespaced or rtype.kind == "Event":  # events stay their hour, as on any cluster
            continue
        for obj in kube.store.list(rtype, "default")[0]:
            meta = obj["metadata"]
            if (meta["name"].startswith(name) or (meta.get("labels") or {}).get("app.kubernetes.io/instance") == name) \
                    and not meta.get("deletionTimestamp"):
                left.append(f"{rtype.kind}/{meta['name']}")
    assert left == [], left


def _route(spec: dict) -> dict:
    return _custom(spec).get_namespaced_custom_object(GW, "v1", "default", "httproutes", spec["name"])


def test_a_request_to_the_parked_model_through_the_gateway_is_held_and_answered_after_the_wake(gw_served, sandbox):
    """park moves the HTTPRoute's backend to the live Service (which selects the hold proxy while parked) and
    scales the pools' endpoint pickers to 0, a request through the Gateway's address is held (the proxy asks
    for a wake) and answered once, after the wake brought the pickers back Ready and then put the route back
    on the pools exactly as park found them."""
    from flows.park import park_model, wake_model
    from manifests import park as P
    from manifests.spec import parse_spec
    from sandbox.kube import resources as res
    from sandbox.kube.controllers.common import is_ready
    from tests.flows.test_park import wake_events
    from tests.sandbox.kube_support import wait_for

    spec, url = gw_served
    kube = sandbox.cluster_kube(spec["cluster"].get("name", "llm-fleet"), project=spec["cluster"]["project"])
    deps, pods = res.BY_KEY[("apps", "deployments")], res.BY_KEY[("", "pods")]
    pickers = {f"{spec['name']}-{c}-epp" for c in ("blue", "green")}

    def picker_pods() -> list[dict]:
        return kube.store.list(pods, "default", lambda p: (p["metadata"].get("labels") or {}).get("app") in pickers)[0]

    before = _route(spec)["spec"]["rules"][0]["backendRefs"]
    assert [r["kind"] for r in before] == ["InferencePool", "InferencePool"]
    park_model(spec=spec)
    rule = _route(spec)["spec"]["rules"][0]
    port = parse_spec(spec).expose.port  # the live Service's, which selects the hold proxy while parked
    assert rule["backendRefs"] == [{"group": "", "kind": "Service", "name": spec["name"], "port": port, "weight": 1}]
    assert rule["timeouts"]["request"] == "360s"  # hold.timeout + the generation's 300 s
    # the endpoint pickers are at 0 while parked, their replicas in the park record for the wake
    assert {n: kube.store.get(deps, "default", n)["spec"]["replicas"] for n in pickers} == dict.fromkeys(pickers, 0)
    wait_for(lambda: not picker_pods(), timeout=60)
    record = P.read_record(kube.store.get(res.BY_KEY[("", "services")], "default", spec["name"]))
    assert record.pickers == dict.fromkeys(pickers, 1)
    # what the cluster saw, in order: which pickers had a Ready pod when the route went back to the pools
    ready: dict[str, str] = {}
    at_route_back: list[set[str]] = []

    def on_event(etype: str, obj: dict) -> None:
        meta = obj["metadata"]
        app = (meta.get("labels") or {}).get("app")
        if obj.get("kind") == "Pod" and app in pickers:
            if etype != "DELETED" and is_ready(obj) and not meta.get("deletionTimestamp"):
                ready[meta["name"]] = app
            else:
                ready.pop(meta["name"], None)
        elif obj.get("kind") == "HTTPRoute" and meta["name"] == spec["name"] and not at_route_back and any(
                r.get("kind") == "InferencePool" for r in obj["spec"]["rules"][0]["backendRefs"]):
            at_route_back.append(set(ready.values()))

    unsubscribe = kube.subscribe(on_event)
    seen = {e["id"] for e in wake_events(spec)}
    answer: dict = {}

    def ask() -> None:
        answer["resp"] = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "Qwen/Qwen2.5-7B-Instruct", "prompt": "Hello", "max_tokens": 4})

    t = threading.Thread(target=ask)
    t.start()
    deadline = time.monotonic() + 30
    while not [e for e in wake_events(spec) if e["id"] not in seen]:
        assert time.monotonic() < deadline, "no wake event: the request through the Gateway was not held"
        time.sleep(0.2)
    assert t.is_alive()  # held, not answered with the endpoint picker's 503
    try:
        woke = wake_model(spec=spec, reason="event")
    finally:
        unsubscribe()
    t.join(90)
    assert at_route_back == [pickers]  # every picker Ready before the route returned to its pool
    assert {n: kube.store.get(deps, "default", n)["spec"]["replicas"] for n in pickers} == dict.fromkeys(pickers, 1)
    assert answer["resp"].status_code == 200, answer["resp"].text
    assert answer["resp"].json()["choices"][0]["text"].strip()
    assert woke["woken"]
    assert _route(spec)["spec"]["rules"][0]["backendRefs"] == before  # the pools, weights as park found them
    assert _route(spec)["spec"]["rules"][0]["timeouts"]["request"] == "300s"
    assert httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": "Qwen/Qwen2.5-7B-Instruct", "prompt": "Hi", "max_tokens": 4}).status_code == 200


def test_canary_release_promotes_a_good_candidate_under_load(gw_served, sandbox):
    from flows.release_model import release_model

    spec, url = gw_served
    live = "green" if _weights(spec)["qwen-gw-green"] == 100 else "blue"
    candidate = "blue" if live == "green" else "green"
    assert _weights(spec) == {f"qwen-gw-{live}": 100, f"qwen-gw-{candidate}": 0}
    sha = sandbox.hub.push_revision("Qwen/Qwen2.5-7B-Instruct", title="new weights")
    with GatewayLoad(url, "Qwen/Qwen2.5-7B-Instruct") as load:
        result = release_model(spec=spec, revision=sha)
    assert result["color"] == candidate
    assert _weights(spec) == {f"qwen-gw-{live}": 0, f"qwen-gw-{candidate}": 100}
    assert [s["weight"] for s in result["figures"]["canary"]] == [20, 100]
    assert load.statuses and all(s == 200 for s in load.statuses), sorted(set(load.statuses))


def test_canary_stops_a_candidate_bad_on_real_traffic_only(gw_served, sandbox, sbc):
    from flows.release_model import release_model

    spec, url = gw_served
    live = "green" if _weights(spec)["qwen-gw-green"] == 100 else "blue"
    candidate = "blue" if live == "green" else "green"
    rule = sbc.add_behavior(mode="long_prompt_errors", labels={"llm-fleet.dev/color": candidate,
                                                               "app.kubernetes.io/instance": spec["name"]})
    sha = sandbox.hub.push_revision("Qwen/Qwen2.5-7B-Instruct", title="bad on long prompts")
    try:
        with GatewayLoad(url, "Qwen/Qwen2.5-7B-Instruct") as load, pytest.raises(Exception) as err:
            release_model(spec=copy.deepcopy(spec), revision=sha)
    finally:
        sbc.remove_behavior(rule["id"])
    assert "canary stopped at 20%" in str(err.value) and "error_rate" in str(err.value)
    assert _weights(spec)[f"qwen-gw-{live}"] == 100
    failed = sum(1 for s in load.statuses if s != 200)
    assert 0 < failed <= 0.2 * len(load.statuses)  # at most the step's share was affected


def test_rollback_model_moves_the_routes_weight_back(gw_served, sandbox):
    """A release, then rollback_model: the previous revision serves again and the HTTPRoute sends it all
    traffic (the old color was retired after scale_down_delay, so this is a release of it, through the
    Gateway strategy — and every request through the Gateway is answered meanwhile)."""
    from flows.release_model import release_model, rollback_model

    spec, url = gw_served
    sha = sandbox.hub.push_revision("Qwen/Qwen2.5-7B-Instruct", title="to be rolled back")
    with GatewayLoad(url, "Qwen/Qwen2.5-7B-Instruct") as load:  # a canary needs traffic to judge
        release_model(spec=spec, revision=sha)
        live = "green" if _weights(spec)["qwen-gw-green"] == 100 else "blue"
        result = rollback_model(spec=spec)
    back = "blue" if live == "green" else "green"
    assert result["color"] == back and result["revision"] != sha
    assert _weights(spec) == {f"qwen-gw-{back}": 100, f"qwen-gw-{live}": 0}
    assert load.statuses and all(s == 200 for s in load.statuses), sorted(set(load.statuses))
