"""GKE fast-starting nodes on the sandbox: a node GKE makes for an Autopilot-mode GPU pod (a Standard
cluster's Autopilot ComputeClass) boots in a quarter of the normal time when the workload is compatible and
pre-initialized capacity is left in the zone; a Spot VM, or a surge past that capacity, boots at the normal
time. GKE shows nothing on the node or pod that says which: the decision is read from the sandbox's own
record (``autopilot_node_boot``), and the times are cloud seconds on the sandbox clock (never wall clock).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from google.cloud import container_v1
from kubernetes import client as k8s

from sandbox import coldstart
from sandbox.app import Sandbox
from sandbox.gke import fast_nodes
from tests.sandbox.test_app import _gke, _kube_core

P, REGION, ZONE = "fast-project", "us-central1", "us-central1-a"
LOC = f"projects/{P}/locations/{REGION}"
NORMAL = coldstart.node_boot_s("g2-standard-4", accelerator="nvidia-l4", driver="LATEST")


def _class(name: str, **rule) -> dict:
    return {"apiVersion": "cloud.google.com/v1", "kind": "ComputeClass", "metadata": {"name": name},
            "spec": {"autopilot": {"enabled": True}, "whenUnsatisfiable": "DoNotScaleUp", "priorities": [
                {"gpu": {"type": "nvidia-l4", "count": 1, "driverVersion": "latest"}, **rule}]}}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with Sandbox.running(time_scale=0.002, state_dir=tmp_path_factory.mktemp("fast")) as sb:
        gke = _gke(sb)
        op = gke.create_cluster(parent=LOC, cluster=container_v1.Cluster(
            name="fast", initial_node_count=1, locations=[ZONE], initial_cluster_version="1.33",
            release_channel=container_v1.ReleaseChannel(channel=container_v1.ReleaseChannel.Channel.RAPID)),
            retry=None)
        httpx.post(f"{sb.gke.url}/v1/{LOC}/operations/{op.name}:wait", timeout=20)
        cluster = gke.get_cluster(name=f"{LOC}/clusters/fast", retry=None)
        core = _kube_core(sb, cluster.endpoint, cluster.master_auth.cluster_ca_certificate)
        custom = k8s.CustomObjectsApi(core.api_client)
        custom.create_cluster_custom_object("cloud.google.com", "v1", "computeclasses", _class("l4"))
        custom.create_cluster_custom_object("cloud.google.com", "v1", "computeclasses", _class("l4-spot", spot=True))
        yield sb, core


def _gpu_pod(core, name: str, cls: str) -> None:
    core.create_namespaced_pod("default", {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {
        "nodeSelector": {"cloud.google.com/compute-class": cls},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "containers": [{"name": "m", "image": "busybox:1.36", "command": ["sleep", "inf"],
                        "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}})


def _boot_of(sb, core, pod: str) -> str:
    """The sandbox's record of how the pod's node booted, once the pod is on it."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        node = core.read_namespaced_pod(pod, "default").spec.node_name
        if node:
            (rec,) = [e for e in sb.gke.autoscaler.events if e["kind"] == "autopilot_node_boot" and e["node"] == node]
            labels = core.read_node(node).metadata.labels
            assert labels["cloud.google.com/gke-accelerator"] == "nvidia-l4"
            return rec["detail"]
        time.sleep(0.02)
    raise AssertionError(f"{pod} got no node")


def test_compatible_pod_boots_fast_spot_and_a_surge_past_the_pool_boot_normally(env):
    sb, core = env
    sb.gke.fast_nodes.set(ZONE, "g2", 2)
    _gpu_pod(core, "fast-1", "l4")
    assert _boot_of(sb, core, "fast-1") == f"fast {NORMAL / 4:g} s in {ZONE}"
    # a Spot VM is incompatible with fast-starting nodes: the normal boot, though capacity is left
    _gpu_pod(core, "spot-1", "l4-spot")
    assert _boot_of(sb, core, "spot-1") == f"normal {NORMAL:g} s in {ZONE}: Spot VMs"
    # best effort: the pool had two; a surge of two more gets one fast node, the other boots normally
    _gpu_pod(core, "fast-2", "l4")
    _gpu_pod(core, "fast-3", "l4")
    got = sorted(_boot_of(sb, core, p) for p in ("fast-2", "fast-3"))
    assert got == [f"fast {NORMAL / 4:g} s in {ZONE}",
                   f"normal {NORMAL:g} s in {ZONE}: no pre-initialized g2 capacity left in {ZONE} (best effort)"]
    # each node is billed like any VM (one L4 each, on-demand or preemptible quota)
    held = [n for n in sb.gke.snapshot()["autopilot_nodes"] if n["cluster"] == "fast"]
    assert len(held) == 4
    for p in ("fast-1", "spot-1", "fast-2", "fast-3"):
        core.delete_namespaced_pod(p, "default", grace_period_seconds=0)


def test_each_incompatibility_means_the_normal_boot():
    ok = {"currentMasterVersion": "1.33.5-gke.2019000", "currentNodeVersion": "1.33.5-gke.2019000",
          "releaseChannel": {"channel": "RAPID"}}
    l4 = fast_nodes.Shape(accelerator="nvidia-l4", gpus=1, rule={"gpu": {"type": "nvidia-l4", "driverVersion": "latest"}})
    assert fast_nodes.incompatibility(ok, l4) is None

    def why(cluster=None, **rule) -> str | None:
        shape = fast_nodes.Shape(accelerator=rule.pop("acc", "nvidia-l4"), gpus=1, spot=rule.pop("spot_sel", False),
                                 rule={**l4.rule, **rule}, annotations=rule.pop("ann", None))
        return fast_nodes.incompatibility({**ok, **(cluster or {})}, shape)

    old = {"currentMasterVersion": "1.30.14-gke.1009000", "currentNodeVersion": "1.30.14-gke.1009000"}
    assert "< 1.31" in why(old)
    assert "Rapid" in why({"releaseChannel": {"channel": "REGULAR"}})
    assert "DEFAULT GPU driver" in why({"currentNodeVersion": "1.32.4-gke.1000000"},
                                       gpu={"type": "nvidia-l4", "driverVersion": "default"})
    assert "secondary boot disks" in why({"currentNodeVersion": "1.33.1-gke.1000000"},
                                         storage={"secondaryBootDisks": [{"diskImageName": "x"}]})
    assert why(spot=True) == "Spot VMs" and why(spot_sel=True) == "Spot VMs"
    assert "CMEK" in why(storage={"bootDiskKMSKey": "projects/p/locations/l/keyRings/r/cryptoKeys/k"})
    assert why(storage={"localSSDCount": 1}) == "local SSDs"
    assert why(placement={"policyName": "compact"}) == "a placement policy"
    assert why(ann={"networking.gke.io/interfaces": "[]"}) == "multi-network"
    assert "pd-ssd" in why(storage={"bootDiskType": "pd-ssd"})
    assert "600 GiB" in why(storage={"bootDiskSize": 600})
    assert "a2" in why(acc="nvidia-tesla-a100", gpu={"type": "nvidia-tesla-a100"})
    # Standard clusters run Autopilot ComputeClasses from 1.33.1-gke.1107000 in Rapid (1.34.1-gke.1829001 in any)
    assert fast_nodes.autopilot_class_problem(ok) is None
    assert "1.33.1-gke.1107000" in fast_nodes.autopilot_class_problem({**ok, **old})
    assert fast_nodes.autopilot_class_problem({**ok, "releaseChannel": {"channel": "REGULAR"}})


def test_the_products_fast_start_spec_gets_a_fast_node(env):
    """What startup.nodes: fast-start renders (its Autopilot ComputeClass, the pod's placement) is what GKE
    starts from pre-initialized capacity."""
    import yaml

    from manifests.render import compute_class, model_deployment
    from manifests.spec import parse_spec

    sb, core = env
    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "deployments/gemma2-2b-it-vllm-l4.yaml").read_text())
    data["cluster"] = {**data["cluster"], "project": P, "location": REGION, "zones": [ZONE], "version": "1.33"}
    spec = parse_spec({**data, "startup": {"nodes": "fast-start"}})
    cls = compute_class(spec)
    k8s.CustomObjectsApi(core.api_client).create_cluster_custom_object("cloud.google.com", "v1", "computeclasses", cls)
    sb.gke.fast_nodes.set(ZONE, "g2", 1)
    placement = model_deployment(spec, "blue", revision="abc")["spec"]["template"]["spec"]
    core.create_namespaced_pod("default", {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "product"}, "spec": {
        "nodeSelector": placement["nodeSelector"], "tolerations": placement["tolerations"],
        "containers": [{"name": "m", "image": "busybox:1.36", "command": ["sleep", "inf"],
                        "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}})
    assert _boot_of(sb, core, "product") == f"fast {NORMAL / 4:g} s in {ZONE}"
    core.delete_namespaced_pod("product", "default", grace_period_seconds=0)
