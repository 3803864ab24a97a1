"""The Vertex AI emulator through the real google-cloud-aiplatform clients (aiplatform_v1 REST) over HTTP."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import requests
from google.api_core import exceptions as gexc
from google.api_core.future.polling import DEFAULT_POLLING
from google.auth.credentials import AnonymousCredentials

from sandbox.core import Clock, Faults
from sandbox.engines import ModelRuntime
from sandbox.hub import Hub
from sandbox.vertex import Vertex
from tests.lazy import lazy

v1 = lazy("google.cloud.aiplatform_v1")  # in the worker that runs these tests only (tests/lazy.py)

P, L = "p-vertex", "us-central1"
PARENT = f"projects/{P}/locations/{L}"
# the LRO default polls every 1 s and up; the emulator's operations take milliseconds at this time scale
FAST = DEFAULT_POLLING.with_delay(initial=0.02, maximum=0.1, multiplier=1.5)
MG_IMAGE = "us-docker.pkg.dev/vertex-ai/vertex-vision-model-garden-dockers/pytorch-vllm-serve:20250202_0916_RC00"


@pytest.fixture(scope="module")
def vx():
    clock, faults = Clock(0.001), Faults()
    hub = Hub(faults=faults, clock=clock)
    hub.start()
    runtime = ModelRuntime(clock=clock, faults=faults, hub=hub)
    vertex = Vertex(clock=clock, faults=faults, runtime=runtime, project=P)
    vertex.start()
    yield vertex
    vertex.stop()
    runtime.stop()
    hub.stop()


@pytest.fixture(scope="module")
def clients(vx):
    kw = {"credentials": AnonymousCredentials(), "transport": "rest", "client_options": {"api_endpoint": vx.url}}
    return v1.ModelServiceClient(**kw), v1.EndpointServiceClient(**kw), v1.PredictionServiceClient(**kw)


def _model(clients, *, labels=None, model_id="google/gemma-2-2b-it", health="/ping"):
    ms, _, _ = clients
    spec = v1.ModelContainerSpec(image_uri=MG_IMAGE, command=["python", "-m", "vllm.entrypoints.api_server"],
                                 args=["--host=0.0.0.0", "--port=8080", f"--model={model_id}"],
                                 env=[v1.EnvVar(name="MODEL_ID", value=model_id)], ports=[v1.Port(container_port=8080)],
                                 predict_route="/generate", health_route=health)
    op = ms.upload_model(parent=PARENT, model=v1.Model(display_name="m", labels=labels or {}, container_spec=spec))
    return op.result(timeout=30, polling=FAST).model


def _endpoint(clients, name="ep"):
    _, es, _ = clients
    op = es.create_endpoint(parent=PARENT, endpoint=v1.Endpoint(display_name=name, labels={"k": "v"}))
    return op.result(timeout=30, polling=FAST).name


def _dm(model, machine="g2-standard-12", acc=None, count=1):
    acc = v1.AcceleratorType.NVIDIA_L4 if acc is None else acc
    return v1.DeployedModel(model=model, display_name="d", dedicated_resources=v1.DedicatedResources(
        machine_spec=v1.MachineSpec(machine_type=machine, accelerator_type=acc, accelerator_count=count),
        min_replica_count=1, max_replica_count=1))


def _deploy(clients, ep, model, split):
    _, es, _ = clients
    op = es.deploy_model(endpoint=ep, deployed_model=_dm(model), traffic_split=split)
    return op.result(timeout=60, polling=FAST).deployed_model


def test_deploy_predict_raw_predict_and_the_seeds_endpoint_predict(vx, clients):
    _, es, ps = clients
    model, ep = _model(clients), _endpoint(clients)
    assert ep in [e.name for e in es.list_endpoints(request={"parent": PARENT,
                                                             "filter": 'display_name="ep" AND labels.k="v"'})]
    assert not list(es.list_endpoints(request={"parent": PARENT, "filter": 'labels.k="other"'}))
    dm = _deploy(clients, ep, model, {"0": 100})
    assert dict(es.get_endpoint(name=ep).traffic_split) == {dm.id: 100}
    got = ps.predict(endpoint=ep, instances=[{"prompt": "What is Vertex AI?", "max_tokens": 8, "raw_response": True}])
    assert got.deployed_model_id == dm.id and got.model == model and "Vertex AI" in got.predictions[0]
    # rawPredict: the model's own body in, its own answer out (what curl and Endpoint.raw_predict send)
    raw = requests.post(f"{vx.url}/v1/{ep}:rawPredict", data=json.dumps({"messages": [{"role": "user", "content":
                                                                                       "Say hi"}], "max_tokens": 4}),
                        headers={"Content-Type": "application/json"}, timeout=10)
    assert raw.status_code == 200 and raw.headers["X-Vertex-AI-Deployed-Model-Id"] == dm.id
    assert raw.json()["choices"][0]["message"]["content"]
    from google.cloud import aiplatform

    aiplatform.init(project=P, location=L, api_endpoint=vx.url, api_transport="rest",
                    credentials=AnonymousCredentials())
    seed = aiplatform.Endpoint(ep).predict(instances=[{"prompt": "What is a car?", "max_tokens": 8}])
    assert seed.deployed_model_id == dm.id and seed.predictions[0].startswith("Prompt:\nWhat is a car?\nOutput:\n")


def test_traffic_split_routes_requests_and_guards_undeploy(vx, clients):
    _, es, ps = clients
    model, ep = _model(clients), _endpoint(clients)
    a = _deploy(clients, ep, model, {"0": 100})
    b = _deploy(clients, ep, model, {a.id: 50, "0": 50})
    seen = Counter(ps.predict(endpoint=ep, instances=[{"prompt": "x", "max_tokens": 1}]).deployed_model_id
                   for _ in range(40))
    assert set(seen) == {a.id, b.id}
    with pytest.raises(gexc.BadRequest, match="add up to 100"):
        es.update_endpoint(endpoint=v1.Endpoint(name=ep, traffic_split={a.id: 60, b.id: 60}),
                           update_mask={"paths": ["traffic_split"]})
    with pytest.raises(gexc.BadRequest, match="receives traffic"):
        es.undeploy_model(endpoint=ep, deployed_model_id=a.id)
    es.update_endpoint(endpoint=v1.Endpoint(name=ep, traffic_split={b.id: 100}), update_mask={"paths": ["traffic_split"]})
    assert {ps.predict(endpoint=ep, instances=[{"prompt": "x", "max_tokens": 1}]).deployed_model_id
            for _ in range(10)} == {b.id}
    with pytest.raises(gexc.BadRequest, match="has deployed models"):
        es.delete_endpoint(name=ep)
    es.undeploy_model(endpoint=ep, deployed_model_id=a.id).result(timeout=30, polling=FAST)
    es.undeploy_model(endpoint=ep, deployed_model_id=b.id).result(timeout=30, polling=FAST)
    assert not es.get_endpoint(name=ep).deployed_models
    with pytest.raises(gexc.BadRequest, match="does not have any deployed models"):
        ps.predict(endpoint=ep, instances=[{"prompt": "x"}])
    es.delete_endpoint(name=ep).result(timeout=30, polling=FAST)


def test_machine_accelerator_and_quota_are_checked_at_deploy(vx, clients):
    _, es, _ = clients
    model, ep = _model(clients), _endpoint(clients)
    with pytest.raises(gexc.BadRequest, match="g2-standard-12 requires accelerator_type NVIDIA_L4"):
        es.deploy_model(endpoint=ep, deployed_model=_dm(model, acc=v1.AcceleratorType.NVIDIA_TESLA_T4),
                        traffic_split={"0": 100})
    vx.set_quota(L, "NVIDIA_L4", 0, project=P)
    try:
        with pytest.raises(gexc.TooManyRequests, match="custom_model_serving_nvidia_l4_gpus"):
            es.deploy_model(endpoint=ep, deployed_model=_dm(model), traffic_split={"0": 100})
    finally:
        vx.set_quota(L, "NVIDIA_L4", 8, project=P)
    info = requests.get(f"{vx.url}/v1/projects/{P}/locations/global/services/aiplatform.googleapis.com/quotaInfos/"
                        "CustomModelServingL4GPUsPerProjectPerRegion", timeout=10).json()
    assert info["metric"] == "aiplatform.googleapis.com/custom_model_serving_nvidia_l4_gpus"
    assert {"dimensions": {"region": L}, "applicableLocations": [L], "details": {"value": "8"}} in info[
        "dimensionsInfos"]


def test_unknown_fields_are_refused_like_the_real_api(vx):
    r = requests.post(f"{vx.url}/v1/{PARENT}/endpoints", json={"displayName": "x", "trafficSplitt": {}}, timeout=10)
    assert r.status_code == 400 and "trafficSplitt" in r.json()["error"]["message"]


def test_a_crashing_container_fails_the_deploy_operation(vx, clients):
    _, es, _ = clients
    vx.runtime.behaviors.add(mode="crash_loop", labels={"bad": "yes"})
    try:
        model, ep = _model(clients, labels={"bad": "yes"}), _endpoint(clients)
        with pytest.raises(gexc.GoogleAPICallError, match="Model server exited unexpectedly"):
            _deploy(clients, ep, model, {"0": 100})
        assert not es.get_endpoint(name=ep).deployed_models
    finally:
        vx.runtime.behaviors.clear()


def test_model_garden_ping_waits_for_the_model(vx, clients):
    """Vertex's health route for the Model Garden vLLM image answers only once the weights are loaded."""
    import time

    from sandbox.vertex import _http_status

    model, ep = _model(clients, model_id="Qwen/Qwen2.5-1.5B-Instruct"), _endpoint(clients)
    vx.runtime.behaviors.add(mode="slow_load", load_seconds=600, model="Qwen/Qwen2.5-1.5B-Instruct")
    try:
        _, es, _ = clients
        op = es.deploy_model(endpoint=ep, deployed_model=_dm(model), traffic_split={"0": 100})
        deadline = time.monotonic() + 10
        while not vx.runtime.servers() or not any(s.info.model_id == "Qwen/Qwen2.5-1.5B-Instruct"
                                                  for s in vx.runtime.servers()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        server = next(s for s in vx.runtime.servers() if s.info.model_id == "Qwen/Qwen2.5-1.5B-Instruct")
        assert _http_status(server.url, "/health") == 200 and _http_status(server.url, "/ping") == 503
        assert not op.done()
        op.result(timeout=30, polling=FAST)
        assert _http_status(server.url, "/ping") == 200
    finally:
        vx.runtime.behaviors.clear()


def test_with_a_token_registry_calls_need_a_live_access_token(vx):
    from sandbox.tokens import GoogleTokens

    vx.tokens = GoogleTokens(clock=Clock(1.0))
    try:
        token, _ = vx.tokens.issue("sa@p-vertex.iam.gserviceaccount.com")
        url = f"{vx.url}/v1/{PARENT}/endpoints"
        assert requests.get(url, timeout=10).status_code == 401
        assert requests.get(url, headers={"Authorization": "Bearer nope"}, timeout=10).json()["error"]["status"] == \
            "UNAUTHENTICATED"
        assert requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code == 200
    finally:
        vx.tokens = None
