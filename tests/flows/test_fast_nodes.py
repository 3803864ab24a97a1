"""wake_model with GKE fast-starting nodes (startup.nodes: fast-start) on the sandbox, real Prefect: the seed-001
model on a Standard cluster runs in Autopilot mode through its ComputeClass — provisioned with no GPU pool,
deployed, parked (the GPU node goes with the pods) and woken, its node started by GKE from pre-initialized
capacity (the sandbox's record; GKE shows nothing for it) and the model answering again."""

from __future__ import annotations

import time

import pytest

from tests.flows.conftest import spec_dict

pytestmark = pytest.mark.usefixtures("prefect_server")


def _boots(sb, cluster: str) -> list[str]:
    nodes = {n["node"] for n in sb.gke.snapshot()["autopilot_nodes"] if n["cluster"] == cluster}
    return [e["detail"].split(" ")[0] for e in sb.gke.autoscaler.events
            if e["kind"] == "autopilot_node_boot" and e["node"] in nodes]


@pytest.mark.long  # provision + deploy + park + wake: ~21 s under load
def test_park_then_wake_on_fast_starting_nodes(sandbox):
    from flows.deploy_model import deploy_model
    from flows.park import park_model, wake_model
    from flows.provision_cluster import provision_cluster
    from manifests import names
    from manifests.spec import parse_spec
    from tasks import k8s

    data = spec_dict("gemma2-2b-it-vllm-l4.yaml", startup={"nodes": "fast-start"}, cluster__version="1.33",
                     hold__image="local/llm-fleet", hold__timeout=60)
    data.pop("schedule")
    spec = parse_spec(data)
    assert provision_cluster(spec=data)["node_pool"] is None
    kubeconfig = deploy_model(spec=data)["kubeconfig"]
    sel = f"{names.COMPUTE_CLASS_LABEL}={names.compute_class(spec)}"

    def gpu_nodes() -> list[dict]:
        return k8s.list_objects.fn(kubeconfig=kubeconfig, api_version="v1", kind="Node", label_selector=sel)

    (node,) = gpu_nodes()  # GKE made it for the class (Autopilot mode), no pool label of ours
    assert node["metadata"]["labels"]["cloud.google.com/gke-accelerator"] == "nvidia-l4"
    assert _boots(sandbox, spec.cluster.name) == ["fast"]

    parked = park_model(spec=data, reason="test")
    assert parked["parked"] is True
    deadline = time.monotonic() + 30  # the idle Autopilot node goes (GKE's scale-down), nothing to resize
    while gpu_nodes():
        assert time.monotonic() < deadline, "the idle Autopilot node was never removed"
        time.sleep(0.1)

    woke = wake_model(spec=data, reason="test")
    assert woke["woken"] is True
    (node,) = gpu_nodes()
    # the second node came from the zone's pre-initialized capacity too (2 per zone in the sandbox)
    assert _boots(sandbox, spec.cluster.name)[-1:] == ["fast"]
    pods = k8s.list_objects.fn(kubeconfig=kubeconfig, api_version="v1", kind="Pod", namespace="default",
                               label_selector=f"app.kubernetes.io/instance={spec.name},"
                                              "app.kubernetes.io/component=model-server")
    assert [p["spec"]["nodeName"] for p in pods] == [node["metadata"]["name"]]
