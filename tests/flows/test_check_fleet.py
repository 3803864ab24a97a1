"""check_fleet against the sandbox: one Slack alert per incident, edited while it lasts, one all-clear."""

from __future__ import annotations

import copy

import pytest

from tests.flows.conftest import spec_dict
from tests.sandbox.kube_support import wait_for

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def cluster(prefect_server):
    """One cluster for the file (check_fleet reads models, not clusters): each test deploys its own model
    into it, on the same L4 pool (max 4 so they fit side by side)."""
    from flows.provision_cluster import provision_cluster

    spec = spec_dict("qwen2.5-7b-sglang.yaml", accelerator={"type": "nvidia-l4", "pool": {"max_nodes": 4}})
    provision_cluster(spec=spec)
    return {"cluster": spec["cluster"], "accelerator": spec["accelerator"]}


def _in(cluster: dict, spec: dict) -> dict:
    return {**spec, **copy.deepcopy(cluster)}


def _kill_pods(spec: dict) -> None:
    from kubernetes import client

    from tasks.clients import kube_client
    from tasks.gke import get_credentials

    c = spec["cluster"]
    core = client.CoreV1Api(kube_client(get_credentials.fn(project=c["project"], location=c["location"],
                                                           name=c.get("name", "llm-fleet"))))
    ns = spec.get("namespace", "default")
    for pod in core.list_namespaced_pod(ns, label_selector=f"app.kubernetes.io/instance={spec['name']}").items:
        core.delete_namespaced_pod(pod.metadata.name, ns, grace_period_seconds=0)


def _wait_ready(spec: dict) -> None:
    from tasks.gke import get_credentials
    from tasks.k8s import wait_pods_ready

    c = spec["cluster"]
    kubeconfig = get_credentials.fn(project=c["project"], location=c["location"], name=c.get("name", "llm-fleet"))
    wait_pods_ready.fn(kubeconfig=kubeconfig, namespace=spec.get("namespace", "default"),
                       selector={"app.kubernetes.io/instance": spec["name"]}, desired=1, timeout_s=60)


def _alerts(sbc, name: str) -> list[dict]:
    return [m for m in sbc.slack_messages() if f"`{name}`" in (m.get("text") or "")
            and ("unhealthy" in m["text"] or "resolved" in m["text"]) and m.get("thread_ts") in (None, m["ts"])]


def _replies(sbc, ts: str) -> list[dict]:
    return [m for m in sbc.slack_messages() if m.get("thread_ts") == ts and m["ts"] != ts]


def _events(name: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    with get_client(sync_client=True) as client:
        resp = client.request("POST", "/events/filter", json={"filter": EventFilter(
            event=EventNameFilter(prefix=["llm-fleet.model."]),
            resource=EventResourceFilter(id_prefix=["llm-fleet.model."])).model_dump(mode="json"), "limit": 50})
        events = resp.json()["events"]
    return [e["event"] for e in sorted(events, key=lambda e: e["occurred"])
            if e["resource"].get("prefect.resource.name") == name and e["event"].endswith(("unhealthy", "recovered"))]


def test_one_alert_per_incident_updated_then_resolved(sandbox, sbc, cluster):
    from flows.check_fleet import check_fleet
    from flows.deploy_model import deploy_model

    spec = _in(cluster, spec_dict("qwen2.5-7b-sglang.yaml"))
    deploy_model(spec=spec)
    posted = len(sbc.slack_messages())

    # A healthy fleet posts nothing (twice, so it is not just the first run).
    for _ in range(2):
        out = check_fleet(specs=[spec])
        assert [c["status"] for c in out["checks"]] == ["healthy"], out
        assert out["checks"][0]["latency_ms"] is not None and out["checks"][0]["queue"] is not None
    assert len(sbc.slack_messages()) == posted

    # The pods crash: one alert when it starts, edited (never re-posted) while it lasts.
    sbc.add_behavior(mode="crash_loop", labels={"app.kubernetes.io/instance": spec["name"]})
    _kill_pods(spec)
    first = check_fleet(specs=[spec])
    assert first["unhealthy"] == [spec["name"]], first
    assert first["checks"][0]["alert"] == "open"
    alerts = _alerts(sbc, spec["name"])
    assert len(alerts) == 1 and "unhealthy" in alerts[0]["text"]
    for _ in range(2):
        assert check_fleet(specs=[spec])["checks"][0]["alert"] == "update"
    alerts = _alerts(sbc, spec["name"])
    assert len(alerts) == 1 and len(alerts[0]["edits"]) >= 2 and "3 checks" in alerts[0]["text"]
    assert _replies(sbc, alerts[0]["ts"]) == []

    # It recovers: the same message says resolved, one all-clear reply; the next runs are silent again.
    sbc.clear_behaviors()
    _kill_pods(spec)
    _wait_ready(spec)
    assert check_fleet(specs=[spec])["checks"][0]["alert"] == "resolve"
    after = len(sbc.slack_messages())
    assert check_fleet(specs=[spec])["checks"][0]["alert"] == "none"
    assert len(sbc.slack_messages()) == after
    alerts = _alerts(sbc, spec["name"])
    assert len(alerts) == 1 and "resolved" in alerts[0]["text"]
    replies = _replies(sbc, alerts[0]["ts"])
    assert len(replies) == 1 and "all clear" in replies[0]["text"]
    # Prefect persists events in batches (every 5 s, or 20 events): read until both are in, then exactly them.
    events = wait_for(lambda: len(got := _events(spec["name"])) >= 2 and got, timeout=30, interval=0.2)
    assert events == ["llm-fleet.model.unhealthy", "llm-fleet.model.recovered"]


def test_drift_and_metrics_are_reported_without_an_alert(sandbox, sbc, cluster):
    from kubernetes import client

    from flows.check_fleet import check_fleet
    from flows.deploy_model import deploy_model
    from tasks.clients import kube_client
    from tasks.gke import get_credentials

    # Gemma on vLLM (its KV-cache metric) beside the other test's model, in the file's cluster.
    # (A namespace of its own: its Secret has another key than the other model's.)
    spec = _in(cluster, spec_dict("gemma2-2b-it-vllm-l4.yaml", namespace="drift"))
    deploy_model(spec=spec)
    c = spec["cluster"]
    apps = client.AppsV1Api(kube_client(get_credentials.fn(project=c["project"], location=c["location"],
                                                           name=c.get("name", "llm-fleet"))))
    # A hand edit: someone adds an env var to the live Deployment.
    name = f"{spec['name']}-blue"
    dep = apps.read_namespaced_deployment(name, "drift")
    dep.spec.template.spec.containers[0].env.append(client.V1EnvVar(name="DEBUG", value="1"))
    apps.replace_namespaced_deployment(name, "drift", dep)
    _wait_ready(spec)
    posted = len(sbc.slack_messages())
    row = check_fleet(specs=[spec])["checks"][0]
    assert row["status"] == "healthy" and "hand edit" in row["drift"] and "env" in row["drift"], row
    assert row["kv_cache"] is not None
    assert len(sbc.slack_messages()) == posted


def test_live_color_at_zero_without_a_park_record_is_unhealthy_not_parked(sandbox, sbc, cluster):
    """What the release bug left behind (the live color scaled to 0 by a failed rollback) is an incident.
    Failed before the fix: check_fleet reported it as "parked"."""
    from kubernetes import client

    from flows.check_fleet import check_fleet
    from flows.deploy_model import deploy_model
    from tasks.clients import kube_client
    from tasks.gke import get_credentials

    spec = _in(cluster, spec_dict("qwen2.5-7b-sglang.yaml", name="zeroed", namespace="zeroed"))
    deploy_model(spec=spec)
    c = spec["cluster"]
    apps = client.AppsV1Api(kube_client(get_credentials.fn(project=c["project"], location=c["location"],
                                                           name=c.get("name", "llm-fleet"))))
    apps.patch_namespaced_deployment_scale(f"{spec['name']}-blue", "zeroed", {"spec": {"replicas": 0}})
    row = check_fleet(specs=[spec])["checks"][0]
    assert row["status"] == "unhealthy", row
    assert "0 replicas" in row["problems"] and "no park record" in row["problems"]
    assert _alerts(sbc, spec["name"])
