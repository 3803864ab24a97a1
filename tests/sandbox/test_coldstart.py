"""The cold-start clock (sandbox/coldstart.py) in the composed sandbox: node pools with image streaming and a
secondary boot disk as GKE validates and labels them, and the kubelet pulling by size and path with the
events a real kubelet writes (``Pulling``, ``Pulled ... in Xs``, ``already present on machine``)."""

from __future__ import annotations

import time

import httpx
import pytest
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import container_v1

from sandbox import coldstart
from sandbox.app import Sandbox
from sandbox.disk_images import add_disk_image
from sandbox.gke.fast_start import IMAGE_STREAMING_LABEL, SECONDARY_DISK_LABEL

PROJECT = "cold-project"
LOC = f"projects/{PROJECT}/locations/us-central1-a"
AR_IMAGE = "us-docker.pkg.dev/cold-project/serving/vllm-openai:v0.10.2"
DRIVER = container_v1.GPUDriverInstallationConfig.GPUDriverVersion


def test_clock_figures():
    vllm = coldstart.image_bytes("vllm/vllm-openai:v0.10.2")
    plain = coldstart.image_pull("vllm/vllm-openai:v0.10.2", "registry")
    assert plain.seconds == pytest.approx(vllm / coldstart.PULL_BPS)
    assert coldstart.image_pull(AR_IMAGE, "secondary-boot-disk").seconds == pytest.approx(plain.seconds / 29)
    assert coldstart.image_pull(AR_IMAGE, "present").seconds == 0
    streamed = coldstart.image_pull(AR_IMAGE, "streaming")
    assert streamed.seconds + streamed.start_penalty_s < plain.seconds / 3
    assert coldstart.is_artifact_registry(AR_IMAGE) and not coldstart.is_artifact_registry("vllm/vllm-openai:x")
    with_driver = coldstart.node_boot_s("g2-standard-8", accelerator="nvidia-l4", driver="LATEST")
    manual = coldstart.node_boot_s("g2-standard-8", accelerator="nvidia-l4", driver=None)
    assert coldstart.node_boot_s("e2-standard-4") < with_driver < manual
    assert coldstart.node_boot_s("a3-highgpu-8g", accelerator="nvidia-h100-80gb", driver="LATEST") > with_driver
    hub = coldstart.weight_load(5e9, "hub")
    assert hub.download_s == pytest.approx(50.0) and hub.seconds > hub.floor_s
    gcs = coldstart.weight_load(5e9, "gcs", streamer=True)
    assert gcs.seconds == pytest.approx(gcs.floor_s) == pytest.approx(5.0)
    assert coldstart.engine_warmup("vllm", cuda_graphs=False).graphs_s == 0


@pytest.fixture(scope="module")
def sb(tmp_path_factory):
    with Sandbox.running(time_scale=0.002, state_dir=tmp_path_factory.mktemp("cold")) as sandbox:
        sandbox.artifact_registry.add_repository(PROJECT, "us", "serving")  # nodes pull AR_IMAGE from it
        sandbox.artifact_registry.push(AR_IMAGE)
        yield sandbox


def _gke(sb: Sandbox) -> container_v1.ClusterManagerClient:
    return container_v1.ClusterManagerClient(credentials=AnonymousCredentials(), transport="rest",
                                             client_options={"api_endpoint": sb.env()["LLM_FLEET_GKE_ENDPOINT"]})


def _wait(sb: Sandbox, op: container_v1.Operation) -> dict:
    return httpx.post(f"{sb.gke.url}/v1/{LOC}/operations/{op.name}:wait", timeout=20).json()


def _pool(name: str, *, streaming: bool, disk: str | None = None) -> container_v1.NodePool:
    config = container_v1.NodeConfig(
        machine_type="g2-standard-8", gcfs_config=container_v1.GcfsConfig(enabled=streaming),
        accelerators=[container_v1.AcceleratorConfig(
            accelerator_count=1, accelerator_type="nvidia-l4",
            gpu_driver_installation_config=container_v1.GPUDriverInstallationConfig(gpu_driver_version=DRIVER.LATEST))])
    if disk:
        config.secondary_boot_disks = [container_v1.SecondaryBootDisk(
            disk_image=f"global/images/{disk}", mode=container_v1.SecondaryBootDisk.Mode.CONTAINER_IMAGE_CACHE)]
    return container_v1.NodePool(name=name, initial_node_count=0, config=config, locations=["us-central1-a"])


def _pod(name: str, image: str, pool: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": {"nodeSelector": {"cloud.google.com/gke-nodepool": pool},
                     "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                     "containers": [{"name": "c", "image": image, "args": ["--model=google/gemma-2-2b-it"],
                                     "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}


def _events(kube, name: str) -> list[tuple[str, str]]:
    from sandbox.kube.resources import BY_KEY

    items, _ = kube.store.list(BY_KEY[("", "events")], "default")
    return [(e["reason"], e["message"]) for e in sorted(items, key=lambda e: e["metadata"]["resourceVersion"])
            if e["involvedObject"]["name"] == name]


def _core(sb: Sandbox, cluster: container_v1.Cluster):
    """A CoreV1Api the way gcloud's kubeconfig reaches a cluster (https, its CA, a Google token)."""
    import base64
    import tempfile

    from kubernetes import client as k8s

    with tempfile.NamedTemporaryFile("wb", prefix="tests-ca-", suffix=".crt", delete=False) as f:
        f.write(base64.b64decode(cluster.master_auth.cluster_ca_certificate))
    cfg = k8s.Configuration(host=f"https://{cluster.endpoint}")
    cfg.ssl_ca_cert = f.name
    cfg.api_key["BearerToken"] = sb.env()["CLOUDSDK_AUTH_ACCESS_TOKEN"]
    cfg.api_key_prefix["BearerToken"] = "Bearer"
    return k8s.CoreV1Api(k8s.ApiClient(cfg))


def _until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_fast_start_pools_and_pulls(sb):
    gke = _gke(sb)
    op = gke.create_cluster(parent=LOC, cluster=container_v1.Cluster(
        name="cold", initial_node_count=1, release_channel=container_v1.ReleaseChannel(
            channel=container_v1.ReleaseChannel.Channel.RAPID)), retry=None)
    assert "error" not in _wait(sb, op)
    parent = f"{LOC}/clusters/cold"
    # GKE's checks: the disk image must exist, and CONTAINER_IMAGE_CACHE needs image streaming
    with pytest.raises(gexc.BadRequest, match="global/images/serving-cache' was not found"):
        gke.create_node_pool(parent=parent, node_pool=_pool("fast", streaming=True, disk="serving-cache"), retry=None)
    add_disk_image(sb.compute, PROJECT, "serving-cache", [AR_IMAGE])
    with pytest.raises(gexc.BadRequest, match="requires image streaming"):
        gke.create_node_pool(parent=parent, node_pool=_pool("fast", streaming=False, disk="serving-cache"), retry=None)
    got = httpx.get(f"{sb.compute.url}/compute/v1/projects/{PROJECT}/global/images/serving-cache").json()
    assert got["status"] == "READY"
    for pool in (_pool("fast", streaming=True, disk="serving-cache"), _pool("stream", streaming=True)):
        assert "error" not in _wait(sb, gke.create_node_pool(parent=parent, node_pool=pool, retry=None))
    for name in ("fast", "stream"):
        assert "error" not in _wait(sb, gke.set_node_pool_size(request=container_v1.SetNodePoolSizeRequest(
            name=f"{parent}/nodePools/{name}", node_count=1), retry=None))
    kube = sb.cluster_kube("cold", project=PROJECT)
    core = _core(sb, gke.get_cluster(name=parent, retry=None))
    from sandbox.kube.controllers import NODES, PODS

    nodes = {n["metadata"]["labels"]["cloud.google.com/gke-nodepool"]: n for n in kube.store.list(NODES)[0]}
    fast = nodes["fast"]
    assert fast["metadata"]["labels"][IMAGE_STREAMING_LABEL] == "true"
    assert fast["metadata"]["labels"][SECONDARY_DISK_LABEL + "serving-cache"] == f"CONTAINER_IMAGE_CACHE.{PROJECT}"
    assert [i["names"] for i in fast["status"]["images"]] == [[AR_IMAGE]]

    def running(name: str) -> bool:
        p = kube.store.get(PODS, "default", name)
        return bool(p and p["status"].get("phase") == "Running")

    # preloaded on the secondary boot disk: no pull, as a kubelet with the image in its store says
    core.create_namespaced_pod("default", _pod("on-disk", AR_IMAGE, "fast"))
    assert _until(lambda: running("on-disk"))
    reasons = _events(kube, "on-disk")
    assert ("Pulled", f'Container image "{AR_IMAGE}" already present on machine') in reasons
    assert "Pulling" not in [r for r, _ in reasons]
    # the streaming node: Artifact Registry image the streaming backend has seen -> pulled in ~2 s
    core.create_namespaced_pod("default", _pod("streamed", AR_IMAGE, "stream"))
    assert _until(lambda: running("streamed"))
    pulled = [m for r, m in _events(kube, "streamed") if r == "Pulled"]
    assert pulled and f"in {coldstart.STREAM_MOUNT_S:.3g}s" in pulled[0]
    # a Docker Hub image is not streamed: a full pull by size, then the node keeps it (status.images)
    hub_image = "vllm/vllm-openai:v0.10.2"
    core.delete_namespaced_pod("on-disk", "default", grace_period_seconds=0)  # its GPU for the next pod
    assert _until(lambda: kube.store.get(PODS, "default", "on-disk") is None)
    core.create_namespaced_pod("default", _pod("plain", hub_image, "fast"))
    assert _until(lambda: running("plain"))
    secs = coldstart.image_pull(hub_image, "registry").seconds
    assert ("Pulling", f'Pulling image "{hub_image}"') in _events(kube, "plain")
    assert any(r == "Pulled" and f"in {secs:.3g}s" in m for r, m in _events(kube, "plain"))
    node = kube.store.get(NODES, "", kube.store.get(PODS, "default", "plain")["spec"]["nodeName"])
    assert any(hub_image in i["names"] for i in node["status"]["images"])


def test_compute_images_get_through_the_real_client(sb):
    """The preflight's images.get (google-cloud-compute ImagesClient over REST): 404 NotFound, then the image."""
    from google.cloud import compute_v1

    images = compute_v1.ImagesClient(credentials=AnonymousCredentials(), transport="rest",
                                     client_options={"api_endpoint": sb.compute.url})
    with pytest.raises(gexc.NotFound):
        images.get(project=PROJECT, image="nothing-here", retry=None)
    add_disk_image(sb.compute, PROJECT, "cache-2", [AR_IMAGE])
    got = images.get(project=PROJECT, image="cache-2", retry=None)
    assert got.name == "cache-2" and got.status == "READY"
