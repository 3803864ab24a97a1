"""park_model / wake_model / park_idle / sync_schedules against the sandbox and a real Prefect server.

One model (Gemma 2 on vLLM, Standard cluster with an L4 pool) is provisioned and deployed once; the
tests then walk it through park → held request → automatic wake → idle decision → park with a short
hold timeout → wake again (the hold proxy back at 0 each time), then share the GPU pool with a second
model, asserting what the sandbox holds (pods, nodes, pool settings, what the Service routes to) over
real HTTP. The hold proxy runs as a real process (the sandbox runs `local/...` images locally).
"""

from __future__ import annotations

import copy
import threading
import time

import httpx
import pytest
import yaml

from tests.flows.conftest import ROOT, spec_dict

pytestmark = pytest.mark.usefixtures("prefect_server")

FILE = "gemma2-2b-it-vllm-l4.yaml"
EVENT = "llm-fleet.model.wake-requested"


def _spec(**overrides) -> dict:
    return spec_dict(FILE, hold__image="local/llm-fleet", hold__timeout=60, **overrides)


@pytest.fixture(scope="module")
def model(prefect_server, tmp_path_factory):
    """(spec dict, spec file, kubeconfig, pool settings before any park) of a deployed model."""
    from flows.deploy_model import deploy_model
    from flows.provision_cluster import provision_cluster

    data = _spec(schedule__idle_after="1s", schedule__idle_in_awake_window=True)
    path = tmp_path_factory.mktemp("park") / "gemma.yaml"
    path.write_text(yaml.safe_dump(data))
    provision_cluster(spec=data)
    out = deploy_model(spec=data)
    return data, str(path), out["kubeconfig"], pool_settings(data, out["kubeconfig"])


def pool_settings(spec: dict, kubeconfig: str) -> dict:
    """The GPU pool as GKE reports it, plus its nodes as Kubernetes lists them."""
    from tasks import gke, k8s

    c, pool = spec["cluster"], spec["accelerator"]["pool"]["name"]
    got = gke.get_node_pool.fn(project=c["project"], location=c["location"], cluster=c["name"], name=pool)
    nodes = k8s.list_objects.fn(kubeconfig=kubeconfig, api_version="v1", kind="Node",
                                label_selector=f"cloud.google.com/gke-nodepool={pool}")
    auto = got.get("autoscaling") or {}
    return {"enabled": bool(auto.get("enabled")), "min": int(auto.get("min_node_count") or 0),
            "max": int(auto.get("max_node_count") or 0), "nodes": len(nodes)}


def gpu_pods(spec: dict, kubeconfig: str) -> list[str]:
    from tasks import k8s

    return [p["metadata"]["name"] for p in k8s.list_objects.fn(
        kubeconfig=kubeconfig, api_version="v1", kind="Pod", namespace="default",
        label_selector=f"app.kubernetes.io/instance={spec['name']},app.kubernetes.io/component=model-server")]


def hold_state(spec: dict, kubeconfig: str, *, settle_s: float = 10) -> tuple[int | None, list[str]]:
    """(the hold proxy Deployment's replicas or None if absent, its pods once none is on its way out)."""
    from tasks import k8s

    dep = k8s.get_object.fn(kubeconfig=kubeconfig, api_version="apps/v1", kind="Deployment",
                            name=f"{spec['name']}-hold", namespace="default")
    deadline = time.monotonic() + settle_s
    while True:
        pods = k8s.list_objects.fn(kubeconfig=kubeconfig, api_version="v1", kind="Pod", namespace="default",
                                   label_selector=f"app.kubernetes.io/instance={spec['name']},"
                                                  "app.kubernetes.io/component=hold-proxy")
        if not any(p["metadata"].get("deletionTimestamp") for p in pods) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return (None if dep is None else dep["spec"]["replicas"]), [p["metadata"]["name"] for p in pods]


def assert_serving_with_no_hold_proxy_running(spec: dict, kubeconfig: str) -> None:
    """The end state of a wake: the live Service on the model, the proxy kept at 0 for the next park."""
    from manifests import park as P
    from tasks import k8s

    svc = live_service(spec, kubeconfig)
    assert svc["spec"]["selector"] == {"app.kubernetes.io/instance": spec["name"], "llm-fleet.dev/color": "blue"}
    assert P.read_record(svc) is None
    assert hold_state(spec, kubeconfig) == (0, [])
    awake = k8s.get_object.fn(kubeconfig=kubeconfig, api_version="v1", kind="Service", name=f"{spec['name']}-awake",
                              namespace="default")
    assert awake["spec"]["selector"] == svc["spec"]["selector"]  # CPU-free; the proxy's upstream at the next park


def live_service(spec: dict, kubeconfig: str) -> dict:
    from tasks import k8s

    return k8s.get_object.fn(kubeconfig=kubeconfig, api_version="v1", kind="Service", name=spec["name"],
                             namespace="default")


def http(kubeconfig: str, timeout: float = 90) -> httpx.Client:
    from tasks.clients import kube_client, kube_http

    return kube_http(kube_client(kubeconfig), timeout=timeout)


def complete(spec: dict, kubeconfig: str, timeout: float = 90) -> httpx.Response:
    """A completion request through the live Service (the API server's service proxy)."""
    return http(kubeconfig, timeout).post(f"/api/v1/namespaces/default/services/{spec['name']}:http/proxy/v1/completions",
                                          json={"model": spec["model"]["id"], "prompt": "What is a GPU?",
                                                "max_tokens": 8})


def wake_events(spec: dict) -> list[dict]:
    from prefect.settings import PREFECT_API_URL

    body = {"filter": {"event": {"name": [EVENT]},
                       "resource": {"id": [f"llm-fleet.model.{spec['name']}"]},
                       "occurred": {"since": "2020-01-01T00:00:00Z"}}, "limit": 50}
    resp = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json=body, timeout=10)
    resp.raise_for_status()
    return resp.json().get("events", [])


def slack_heads(sbc, flow: str, name: str) -> list[str]:
    return [m["text"] for m in sbc.slack_messages() if f"*{flow}* `{name}" in m.get("text", "")]


def test_park_waits_for_a_held_lock_then_leaves_no_gpu_pod_or_node_and_records_the_pool(model, sbc):
    from flows.park import park_model
    from manifests import park as P
    from manifests.spec import parse_spec
    from tasks.locks import model_lock

    spec, path, kubeconfig, before = model
    assert before["nodes"] == 1 and gpu_pods(spec, kubeconfig)
    result: dict = {}
    with model_lock(parse_spec(spec), purpose="release", kubeconfig=kubeconfig):  # a release in flight
        t = threading.Thread(target=lambda: result.update(park_model(spec=spec, reason="test")))
        t.start()
        deadline = time.monotonic() + 60
        while not any("✅ Get cluster credentials" in h for h in slack_heads(sbc, "park_model", spec["name"])):
            assert time.monotonic() < deadline, "park_model never got its credentials"
            time.sleep(0.1)
        time.sleep(1.0)  # park now waits for the lock: it has changed nothing
        assert t.is_alive()
        assert len(gpu_pods(spec, kubeconfig)) == 1
        assert P.read_record(live_service(spec, kubeconfig)) is None
    t.join(120)
    assert result.get("parked") is True

    assert gpu_pods(spec, kubeconfig) == []
    after = pool_settings(spec, kubeconfig)
    assert after["nodes"] == 0 and after["min"] == 0
    svc = live_service(spec, kubeconfig)
    record = P.read_record(svc)
    assert record is not None and record.color == "blue" and record.replicas == 1
    assert record.pool is not None and (record.pool.min_nodes, record.pool.max_nodes, record.pool.nodes_per_zone) == (
        before["min"], before["max"], before["nodes"])
    assert svc["spec"]["selector"] == P.hold_selector(parse_spec(spec))  # requests now go to the hold proxy
    # two proxy pods hold, and a drain may take only one of them at a time
    replicas, pods = hold_state(spec, kubeconfig)
    assert replicas == 2 and len(pods) == 2
    from tasks import k8s

    pdb = k8s.get_object.fn(kubeconfig=kubeconfig, api_version="policy/v1", kind="PodDisruptionBudget",
                            name=f"{spec['name']}-hold", namespace="default")
    assert pdb is not None and pdb["spec"]["maxUnavailable"] == 1


def test_park_rerun_is_a_no_op(model):
    from flows.park import park_model

    spec, _, kubeconfig, _ = model
    svc = live_service(spec, kubeconfig)
    again = park_model(spec=spec, reason="rerun")
    assert again["changed"] == [] and "already parked" in again["outcome"]
    assert live_service(spec, kubeconfig)["metadata"]["annotations"] == svc["metadata"]["annotations"]


def test_a_request_while_parked_is_held_and_answered_after_the_automatic_wake(model, sbc):
    from flows.park import wake_model
    from manifests import park as P

    spec, path, kubeconfig, before = model
    seen = {e["id"] for e in wake_events(spec)}
    answer: dict = {}
    sent = time.time()
    t = threading.Thread(target=lambda: answer.update(resp=complete(spec, kubeconfig)))
    t.start()
    # the hold proxy asks for a wake with a real Prefect event; the test plays the deployment trigger
    deadline = time.monotonic() + 30
    while not (new := [e for e in wake_events(spec) if e["id"] not in seen]):
        assert time.monotonic() < deadline, "the hold proxy emitted no wake event"
        time.sleep(0.2)
    assert new[0]["payload"]["model"] == spec["name"] and new[0]["payload"]["held"] >= 1
    assert t.is_alive()  # still held, not answered with an error
    time.sleep(0.5)  # the automation's trigger and the worker's start: part of what the held client waits
    # the deployment trigger's parameters (prefect.yaml): the event's own time
    woke = wake_model(spec=spec, reason="event", requested_at=new[0]["occurred"])
    returned = time.time()
    t.join(60)
    resp = answer["resp"]
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"].strip()
    assert woke["woken"] and "serving again after" in woke["outcome"]
    # the figure is the held client's wait (from the event, trigger and worker included), not the run's own:
    # at least this run's part plus the 0.5 s before it, at most from the request's sending to the run's end
    assert woke["answering_s"] + 0.5 <= woke["waited_s"] <= returned - sent, woke
    assert f"serving again after {woke['waited_s']:.1f} s from the first held request" in woke["outcome"]

    assert pool_settings(spec, kubeconfig) == before  # autoscaling bounds and node count as before park
    svc = live_service(spec, kubeconfig)
    assert svc["spec"]["selector"] == {"app.kubernetes.io/instance": spec["name"], "llm-fleet.dev/color": "blue"}
    assert P.read_record(svc) is None
    assert complete(spec, kubeconfig, timeout=30).status_code == 200  # straight to the model now
    assert_serving_with_no_hold_proxy_running(spec, kubeconfig)
    assert "Scale the hold proxy to 0 once the switch has settled" in slack_heads(sbc, "wake_model", spec["name"])[-1]
    assert any("serving again after" in m["text"] for m in sbc.slack_messages() if "wake_model" in m["text"])
    assert woke["wake_history"][-1] > 0
    # the wake phase by phase, from the kubelet's Pulled event and the engine's weight lines (cloud seconds)
    phases = woke["phases"]
    assert set(phases) == {"node", "image", "weights", "engine", "smoke"} and phases["weights"] > 0
    assert phases["engine"] > 0 and phases["smoke"] > 0 and all(v >= 0 for v in phases.values())
    assert "Measure the wake phase by phase" in slack_heads(sbc, "wake_model", spec["name"])[-1]


def test_wake_rerun_is_a_no_op_and_park_idle_decides_from_metrics_through_the_service(model):
    from flows.park import park_idle, wake_model

    spec, path, kubeconfig, _ = model
    assert wake_model(spec=spec)["woken"] is False
    first = park_idle(specs=[path], dry_run=True)
    assert first[0]["action"] == "keep" and "first observation" in first[0]["reason"]
    time.sleep(1.2)  # idle_after: 1s
    second = park_idle(specs=[path], dry_run=True)
    assert second[0]["action"] == "park" and "idle_after" in second[0]["reason"], second
    assert complete(spec, kubeconfig, timeout=30).status_code == 200
    third = park_idle(specs=[path], dry_run=True)  # the request moved the counter: idle clock restarted
    assert third[0]["action"] == "keep", third
    assert len(gpu_pods(spec, kubeconfig)) == 1
    # the learned arrivals per hour of the day live on the live Service (the counter saw the request)
    from manifests.park import ARRIVALS, Arrivals

    learned = Arrivals.from_annotation(live_service(spec, kubeconfig)["metadata"]["annotations"][ARRIVALS])
    assert learned.requests >= 1 and sum(learned.counts) >= 1 and sum(learned.hours) > 0


def test_a_request_past_the_hold_timeout_gets_503_with_retry_after(model):
    from flows.park import park_model

    spec, _, kubeconfig, _ = model
    short = {**spec, "hold": {**spec["hold"], "timeout": 2, "retry_after": 7}}
    park_model(spec=short, reason="test")  # the second park: the proxy a wake scaled to 0 comes back
    from manifests.park import HOLD_REPLICAS

    replicas, pods = hold_state(spec, kubeconfig)
    assert replicas == HOLD_REPLICAS and len(pods) == HOLD_REPLICAS  # two: one may go while the other holds
    assert live_service(spec, kubeconfig)["spec"]["selector"]["llm-fleet.dev/color"] == "hold"
    resp = complete(short, kubeconfig, timeout=30)  # a hang would raise ReadTimeout, a reset an error
    assert resp.status_code == 503, resp.text
    assert resp.headers.get("Retry-After") == "7"
    assert "hold.timeout" in resp.json()["error"]["message"]


def test_the_second_wake_leaves_the_same_end_state_and_a_rerun_changes_nothing(model):
    """park → wake → park → wake: what exists and what the Service selects is the same after each wake."""
    from flows.park import wake_model

    spec, _, kubeconfig, before = model
    assert wake_model(spec=spec, reason="test")["woken"]
    assert_serving_with_no_hold_proxy_running(spec, kubeconfig)
    assert pool_settings(spec, kubeconfig) == before
    assert complete(spec, kubeconfig, timeout=30).status_code == 200
    again = wake_model(spec=spec, reason="rerun")
    assert again["woken"] is False and again["changed"] == []


def test_park_idle_reads_every_replica_so_two_replicas_can_be_idle(model):
    """With two replicas, each serving a different number of requests, park_idle must see the model's
    counters, not one random pod's per read. Failed before the fix: reads through the Service alternated
    between the pods' counters, so the idle clock restarted on a read and the model was never idle."""
    from flows.park import park_idle, wake_model
    from tasks import k8s

    spec, path, kubeconfig, _ = model
    wake_model(spec=spec, reason="test: awake first")
    color = live_service(spec, kubeconfig)["spec"]["selector"]["llm-fleet.dev/color"]
    name = f"{spec['name']}-{color}"
    k8s.scale_deployment.fn(kubeconfig=kubeconfig, namespace="default", name=name, replicas=2)
    try:
        k8s.wait_rollout.fn(kubeconfig=kubeconfig, namespace="default", name=name, timeout_s=120)
        park_idle(specs=[path], dry_run=True)  # first observation
        decisions = []
        for _ in range(4):
            time.sleep(1.2)  # idle_after: 1s
            decisions.append(park_idle(specs=[path], dry_run=True)[0])
        assert all(d["action"] == "park" for d in decisions), decisions
    finally:
        k8s.scale_deployment.fn(kubeconfig=kubeconfig, namespace="default", name=name, replicas=1)


def test_rollback_of_a_parked_model_says_it_is_parked(model):
    """Found by the campaign (seed 2): rollback_model on a parked model said "does not serve yet — run
    deploy_model" (the Service selects the hold proxy); it is parked, and the fix is a wake."""
    from flows.park import park_model, wake_model
    from flows.release_model import rollback_model
    from manifests.errors import FleetError

    spec, _, _, _ = model
    park_model(spec=spec, reason="test: parked")
    try:
        with pytest.raises(FleetError, match="is parked") as err:
            rollback_model(spec=spec)
        assert "wake_model" in err.value.fix
    finally:
        wake_model(spec=spec, reason="test: leave it serving")


def test_park_with_a_stray_candidate_parks_both_colors(model):
    """An interrupted release left its candidate color running: park scales it to 0 too and ends with no
    GPU pod. Failed before the fix: only the live color was scaled, and park failed with PodsRemain after
    traffic had already moved to the hold proxy."""
    from flows.park import park_model, wake_model
    from manifests.render import model_deployment
    from manifests.spec import parse_spec
    from tasks import k8s

    spec, _, kubeconfig, _ = model
    wake_model(spec=spec, reason="test: awake first")
    live = live_service(spec, kubeconfig)["spec"]["selector"]["llm-fleet.dev/color"]
    stray = "green" if live == "blue" else "blue"
    k8s.apply_object.fn(kubeconfig=kubeconfig, obj=model_deployment(parse_spec(spec), stray, replicas=1))
    k8s.wait_rollout.fn(kubeconfig=kubeconfig, namespace="default", name=f"{spec['name']}-{stray}", timeout_s=120)
    assert len(gpu_pods(spec, kubeconfig)) == 2
    assert park_model(spec=spec, reason="test: stray candidate")["parked"] is True
    assert gpu_pods(spec, kubeconfig) == []
    wake_model(spec=spec, reason="test: leave it serving")
    assert len(gpu_pods(spec, kubeconfig)) == 1  # the live color only: the stray is not brought back


def pods_of(spec: dict, kubeconfig: str) -> dict[str, str]:
    """The model's GPU pods: uid → node."""
    from tasks import k8s

    return {p["metadata"]["uid"]: p["spec"].get("nodeName") for p in k8s.list_objects.fn(
        kubeconfig=kubeconfig, api_version="v1", kind="Pod", namespace="default",
        label_selector=f"app.kubernetes.io/instance={spec['name']},app.kubernetes.io/component=model-server")}


def test_parking_one_model_on_a_shared_pool_leaves_the_other_serving_from_the_same_pods(model, sbc):
    """A second spec on the same cluster and pool (min 0, max 2, one L4 node per replica): park A → B keeps
    answering from the same pods and its node; park B → the pool is at 0; wake A → the pool has a node
    again (the cluster autoscaler's: A's park changed nothing on the pool) and A answers; wake B."""
    from flows.deploy_model import deploy_model
    from flows.park import park_model, wake_model
    from manifests import park as P
    from tasks import k8s

    a, _, kubeconfig, _ = model
    b = copy.deepcopy(a)
    b["name"] = "gemma2-b"  # same project, cluster and pool
    b["hold"] = {"enabled": False}  # its proxy is not what this test is about (and each one is a process start)
    deploy_model(spec=b)
    b_pods = pods_of(b, kubeconfig)
    assert len(b_pods) == 1 and len(pods_of(a, kubeconfig)) == 1 and pool_settings(a, kubeconfig)["nodes"] == 2

    parked_a = park_model(spec=a, reason="test")
    assert parked_a["shared_pool"] and "left to the cluster autoscaler" in parked_a["outcome"]
    assert pods_of(a, kubeconfig) == {}
    assert pods_of(b, kubeconfig) == b_pods  # same pods, same node: nothing was evicted
    node_b = next(iter(b_pods.values()))
    assert node_b in [n["metadata"]["name"] for n in k8s.list_objects.fn(
        kubeconfig=kubeconfig, api_version="v1", kind="Node",
        label_selector="cloud.google.com/gke-nodepool=gpupool")]
    assert complete(b, kubeconfig, timeout=30).status_code == 200
    record_a = P.read_record(live_service(a, kubeconfig))
    assert record_a.pool_changed == ()  # min was 0 already: park A changed nothing on the pool
    head = slack_heads(sbc, "park_model", a["name"])[-1]
    assert "shared with gemma2-b" in head
    assert any("shared with gemma2-b" in m["text"] and m["is_reply"] for m in sbc.slack_messages())

    parked_b = park_model(spec=b, reason="test")
    assert not parked_b["shared_pool"]
    assert pool_settings(b, kubeconfig)["nodes"] == 0  # the last model out takes the pool to 0
    # ("size",) when B's node was still there; () when the autoscaler had removed it first (1.2 s here)
    assert P.read_record(live_service(b, kubeconfig)).pool_changed in ((), ("size",))

    woke_a = wake_model(spec=a, reason="test")
    assert woke_a["woken"]
    assert pool_settings(a, kubeconfig)["nodes"] >= 1  # the autoscaler brought a node for A's pod
    assert complete(a, kubeconfig, timeout=30).status_code == 200
    assert pods_of(b, kubeconfig) == {}  # A's wake did not touch B

    woke_b = wake_model(spec=b, reason="test")
    assert woke_b["woken"]
    assert complete(b, kubeconfig, timeout=30).status_code == 200
    assert complete(a, kubeconfig, timeout=30).status_code == 200
    settings = pool_settings(a, kubeconfig)
    assert (settings["min"], settings["max"], settings["nodes"]) == (0, 2, 2)


@pytest.fixture(scope="module")
def park_wake_deployments(prefect_server):
    """park_model/park and wake_model/wake-on-request on the local server (what `prefect deploy --all` makes)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for flow, name, entry in (("park_model", "park", "flows/park.py:park_model"),
                                  ("wake_model", "wake-on-request", "flows/park.py:wake_model")):
            client.create_deployment(flow_id=client.create_flow_from_name(flow), name=name, entrypoint=entry)


def schedules_of(name: str) -> dict[str, tuple[str, str, dict]]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(name)
        return {s.slug: (s.schedule.cron, s.schedule.timezone, s.parameters) for s in
                client.read_deployment_schedules(dep.id) if s.slug}


def test_schedules_from_the_bundled_specs_appear_and_follow_spec_changes(park_wake_deployments, tmp_path):
    from flows.park import sync_schedules

    bundled = ["deployments/gemma2-2b-it-vllm-l4.yaml", "deployments/paligemma2-tgi-autopilot.yaml",
               "deployments/mistral-7b-vllm-spot.yaml"]
    sync_schedules(specs=bundled)
    park, wake = schedules_of("park_model/park"), schedules_of("wake_model/wake-on-request")
    assert park["llm-fleet-park-paligemma2"][:2] == ("0 20 * * 1-5", "America/Chicago")
    assert park["llm-fleet-park-gemma2-2b-it"][:2] == ("0 20 * * *", "Europe/Brussels")
    assert park["llm-fleet-park-mistral-7b"][:2] == ("0 20 * * *", "America/Los_Angeles")
    # no wake measured yet: the wake starts schedule.prewarm (5 min) early
    assert wake["llm-fleet-wake-paligemma2"][:2] == ("55 7 * * 1-5", "America/Chicago")
    assert wake["llm-fleet-wake-paligemma2"][2]["spec"] == "deployments/paligemma2-tgi-autopilot.yaml"
    assert {r["action"] for r in sync_schedules(specs=bundled)} == {"unchanged"}  # rerun: nothing to do

    data = yaml.safe_load((ROOT / bundled[1]).read_text())
    data["schedule"].update(wake="30 6 * * 1-5", timezone="Europe/Paris")
    changed = tmp_path / "paligemma2.yaml"
    changed.write_text(yaml.safe_dump(data))
    sync_schedules(specs=[str(changed)])
    wake = schedules_of("wake_model/wake-on-request")
    assert wake["llm-fleet-wake-paligemma2"][:2] == ("25 6 * * 1-5", "Europe/Paris")
    assert schedules_of("park_model/park")["llm-fleet-park-gemma2-2b-it"][0] == "0 20 * * *"  # untouched

    del data["schedule"]
    changed.write_text(yaml.safe_dump(data))
    sync_schedules(specs=[str(changed)])
    assert "llm-fleet-wake-paligemma2" not in schedules_of("wake_model/wake-on-request")
    assert "llm-fleet-park-paligemma2" not in schedules_of("park_model/park")
