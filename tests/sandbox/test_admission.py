"""Admission and defaults like GKE: GPU toleration added, Autopilot's rules, claims that cannot bind stay Pending,
only the CRDs and IngressClasses GKE ships, EndpointSlices served. Real kubernetes client over HTTP."""

from __future__ import annotations

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from sandbox.core import Clock, Faults
from sandbox.kube import KubeCluster, addons
from tests.sandbox.access_support import configuration
from tests.sandbox.kube_support import StubRuntime, wait_for

GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


@pytest.fixture
def kube():
    clock = Clock(0.002)
    k = KubeCluster(clock=clock, faults=Faults(), runtime=StubRuntime(clock))
    k.start()
    k.add_node("gpu-1", labels={"cloud.google.com/gke-accelerator": "nvidia-l4"}, capacity={"nvidia.com/gpu": "1"},
               taints=[GPU_TAINT])
    yield k
    k.stop()


@pytest.fixture
def api(kube):
    return client.ApiClient(configuration(kube))


def _pod(name: str, *, gpus: int = 1, claim: str | None = None, selector: dict | None = None) -> dict:
    c = {"name": "server", "image": "vllm/vllm-openai:v0.6.3"}
    if gpus:
        c["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    spec: dict = {"containers": [c]}
    if claim:
        spec["volumes"] = [{"name": "cache", "persistentVolumeClaim": {"claimName": claim}}]
        c["volumeMounts"] = [{"name": "cache", "mountPath": "/cache"}]
    if selector:
        spec["nodeSelector"] = selector
    return {"metadata": {"name": name}, "spec": spec}


def _claim(name: str, *, sc: str | None, mode: str = "ReadWriteOnce", size: str = "100Gi") -> dict:
    spec: dict = {"accessModes": [mode], "resources": {"requests": {"storage": size}}}
    if sc is not None:
        spec["storageClassName"] = sc
    return {"metadata": {"name": name}, "spec": spec}


def _events(core, name: str) -> list[tuple[str, str]]:
    return [(e.reason, e.message) for e in core.list_namespaced_event("default").items
            if e.involved_object.name == name]


def _pending_reason(core, name: str) -> str:
    def cond():
        p = core.read_namespaced_pod(name, "default")
        c = next((c for c in p.status.conditions or [] if c.type == "PodScheduled"), None)
        return c.message if c is not None and c.status == "False" else None
    return wait_for(cond)


def test_gpu_pod_without_toleration_gets_it_and_schedules_on_the_tainted_node(api):
    core = client.CoreV1Api(api)
    created = core.create_namespaced_pod("default", _pod("gpu"))
    assert ("nvidia.com/gpu", "Exists", "NoSchedule") in [(t.key, t.operator, t.effect)
                                                          for t in created.spec.tolerations]
    assert wait_for(lambda: core.read_namespaced_pod("gpu", "default").spec.node_name) == "gpu-1"
    # a CPU-only pod gets no GPU toleration and cannot land on the GPU node
    cpu = core.create_namespaced_pod("default", _pod("cpu", gpus=0))
    assert "nvidia.com/gpu" not in [t.key for t in cpu.spec.tolerations or []]
    assert "untolerated taint" in _pending_reason(core, "cpu")


def test_claim_on_a_missing_storage_class_stays_pending_with_the_real_event(api, kube):
    core = client.CoreV1Api(api)
    core.create_namespaced_persistent_volume_claim("default", _claim("cache", sc="standard-rwx",
                                                                     mode="ReadWriteMany"))
    wait_for(lambda: ("ProvisioningFailed", 'storageclass.storage.k8s.io "standard-rwx" not found')
             in _events(core, "cache"))
    core.create_namespaced_pod("default", _pod("user", claim="cache"))
    assert 'storageclass.storage.k8s.io "standard-rwx" not found' in _pending_reason(core, "user")
    assert core.read_namespaced_persistent_volume_claim("cache", "default").status.phase == "Pending"
    # the Filestore CSI add-on creates the class: the claim binds when its pod is scheduled, rounded up to 1 TiB
    addons.set_filestore(kube, True)
    pvc = wait_for(lambda: (c := core.read_namespaced_persistent_volume_claim("cache", "default")).status.phase
                   == "Bound" and c)
    assert pvc.status.capacity == {"storage": "1Ti"} and pvc.status.access_modes == ["ReadWriteMany"]
    reasons = [r for r, _ in _events(core, "cache")]  # the Filestore instance is created first (minutes on GCP)
    assert reasons.index("Provisioning") < reasons.index("ProvisioningSucceeded")
    assert wait_for(lambda: core.read_namespaced_pod("user", "default").spec.node_name) == "gpu-1"
    sc = client.StorageV1Api(api).read_storage_class("standard-rwx")
    assert sc.provisioner == "filestore.csi.storage.gke.io"


def test_read_write_many_on_persistent_disk_is_refused(api):
    core = client.CoreV1Api(api)
    core.create_namespaced_persistent_volume_claim("default", _claim("shared", sc="standard-rwo",
                                                                     mode="ReadWriteMany"))
    core.create_namespaced_pod("default", _pod("user", claim="shared"))
    assert "specified multi writer with mount access type" in _pending_reason(core, "user")
    assert core.read_namespaced_persistent_volume_claim("shared", "default").status.phase == "Pending"


def test_claim_without_class_gets_the_default_and_waits_for_its_first_consumer(api):
    core = client.CoreV1Api(api)
    created = core.create_namespaced_persistent_volume_claim("default", _claim("c", sc=None))
    assert created.spec.storage_class_name == "standard-rwo" and created.status.phase == "Pending"
    wait_for(lambda: any(r == "WaitForFirstConsumer" for r, _ in _events(core, "c")))
    assert core.read_namespaced_persistent_volume_claim("c", "default").status.phase == "Pending"
    core.create_namespaced_pod("default", _pod("user", claim="c"))
    wait_for(lambda: core.read_namespaced_persistent_volume_claim("c", "default").status.phase == "Bound")


def test_missing_claim_blocks_scheduling(api):
    core = client.CoreV1Api(api)
    core.create_namespaced_pod("default", _pod("orphan", claim="nope"))
    assert 'persistentvolumeclaim "nope" not found' in _pending_reason(core, "orphan")


def test_only_the_crds_and_ingress_classes_gke_ships(api):
    custom = client.CustomObjectsApi(api)
    with pytest.raises(ApiException) as info:
        custom.list_namespaced_custom_object("monitoring.coreos.com", "v1", "default", "prometheusrules")
    assert info.value.status == 404
    assert custom.list_namespaced_custom_object("monitoring.googleapis.com", "v1", "default", "rules")["items"] == []
    classes = {c.metadata.name for c in client.NetworkingV1Api(api).list_ingress_class().items}
    assert "nginx" not in classes


def test_endpoint_slices_mirror_the_service_endpoints(api, kube):
    core = client.CoreV1Api(api)
    apps = client.AppsV1Api(api)
    from tests.sandbox.kube_support import deployment

    apps.create_namespaced_deployment("default", deployment("web", gpus=1))
    core.create_namespaced_service("default", {"metadata": {"name": "web"}, "spec": {
        "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
    disc = client.DiscoveryV1Api(api)

    def ready_slice():
        items = disc.list_namespaced_endpoint_slice("default", label_selector="kubernetes.io/service-name=web").items
        return items and items[0].endpoints and items[0].endpoints[0].conditions.ready and items[0]

    s = wait_for(ready_slice)
    assert s.ports[0].port == 8000 and s.address_type == "IPv4"
    assert s.endpoints[0].target_ref.kind == "Pod"


def test_autopilot_refuses_gpu_pods_without_the_accelerator_selector_and_fills_requests(api, kube):
    kube.enable_autopilot("ap")
    core = client.CoreV1Api(api)
    with pytest.raises(ApiException) as info:
        core.create_namespaced_pod("default", _pod("nosel"))
    assert info.value.status == 403 and "cloud.google.com/gke-accelerator" in info.value.body
    pod = core.create_namespaced_pod("default", _pod("sel", selector={"cloud.google.com/gke-accelerator":
                                                                        "nvidia-l4"}))
    res = pod.spec.containers[0].resources
    assert res.requests == {"cpu": "2", "memory": "7Gi", "ephemeral-storage": "1Gi", "nvidia.com/gpu": "1"}
    assert res.limits["cpu"] == "2" and res.limits["memory"] == "7Gi"
    assert "autopilot.gke.io/resource-adjustment" in pod.metadata.annotations
