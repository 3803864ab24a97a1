"""The GKE emulator through the real google-cloud-container REST client over HTTP.

The Kubernetes side is a recorder here (the real kube emulator is exercised in test_app.py): the
tests assert which Node objects GKE asks for and what Compute quota they hold.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry, if_exception_type
from google.auth.credentials import AnonymousCredentials
from google.cloud import container_v1

from sandbox.compute import Compute
from sandbox.core import Clock, Faults
from sandbox.gke import Gke

P = "sandbox-project"
REGION = f"projects/{P}/locations/us-central1"
ZONE = f"projects/{P}/locations/us-central1-a"
Status = container_v1.Operation.Status


class RecordingKube:
    """Stands in for sandbox.kube.KubeCluster: just the node hooks GKE calls."""

    url = "http://127.0.0.1:6443"

    def __init__(self) -> None:
        self.nodes: dict[str, dict] = {}
        self.autopilot_clusters: set[str] = set()
        self.pods: list[dict] = []
        self._lock = threading.Lock()

    def add_node(self, name, *, labels, capacity, taints=(), version=None):
        with self._lock:
            assert name not in self.nodes
            self.nodes[name] = {"labels": dict(labels), "capacity": dict(capacity), "taints": list(taints),
                                "version": version}

    def remove_node(self, name):
        with self._lock:
            del self.nodes[name]

    def list_pods(self) -> list[dict]:
        with self._lock:
            return [dict(p) for p in self.pods]

    def pool_nodes(self, pool: str) -> dict[str, dict]:
        with self._lock:
            return {n: v for n, v in self.nodes.items() if v["labels"]["cloud.google.com/gke-nodepool"] == pool}


class Env:
    def __init__(self) -> None:
        self.faults = Faults()
        clock = Clock(0.001)
        self.compute = Compute(clock=clock, faults=self.faults, project=P)
        self.kube = RecordingKube()
        self.gke = Gke(clock=clock, faults=self.faults, compute=self.compute, kube=self.kube)
        self.compute.start()
        self.gke.start()
        self.client = container_v1.ClusterManagerClient(
            credentials=AnonymousCredentials(), transport="rest", client_options={"api_endpoint": self.gke.url})

    def wait(self, op: container_v1.Operation, location: str = REGION) -> container_v1.Operation:
        """Poll like the product does (GET operations/OP), with a short sleep."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            got = self.client.get_operation(name=f"{location}/operations/{op.name}", retry=None)
            if got.status == Status.DONE:
                return got
            time.sleep(0.01)
        raise AssertionError(f"operation {op.name} not done")

    def used(self, metric: str, region: str | None = "us-central1") -> float:
        return self.compute.quota(region, metric)["usage"]

    def stop(self) -> None:
        self.faults.stop.set()
        stoppers = [threading.Thread(target=part.stop) for part in (self.gke, self.compute)]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()


@pytest.fixture
def env():
    e = Env()
    yield e
    e.stop()


def _zonal_cluster(env: Env, name: str = "c1") -> container_v1.Cluster:
    op = env.client.create_cluster(parent=ZONE, cluster=container_v1.Cluster(name=name, initial_node_count=1),
                                   retry=None)
    assert not env.wait(op, ZONE).error.message
    return env.client.get_cluster(name=f"{ZONE}/clusters/{name}", retry=None)


def _gpu_pool(name: str = "gpu", *, count: int = 1, spot: bool = False, zone: str = "us-central1-a",
              machine: str = "g2-standard-8", accelerator: str = "nvidia-l4", gpus: int = 1,
              autoscaling: tuple[int, int] | None = None) -> container_v1.NodePool:
    pool = container_v1.NodePool(
        name=name, initial_node_count=count, locations=[zone],
        config=container_v1.NodeConfig(
            machine_type=machine, spot=spot, labels={"team": "ml"},
            accelerators=[container_v1.AcceleratorConfig(
                accelerator_count=gpus, accelerator_type=accelerator,
                gpu_driver_installation_config=container_v1.GPUDriverInstallationConfig(
                    gpu_driver_version=container_v1.GPUDriverInstallationConfig.GPUDriverVersion.LATEST))]),
    )
    if autoscaling:
        pool.autoscaling = container_v1.NodePoolAutoscaling(enabled=True, min_node_count=autoscaling[0],
                                                            max_node_count=autoscaling[1])
    return pool


def _size(env: Env, pool: str, n: int, location: str = ZONE, cluster: str = "c1") -> container_v1.Operation:
    op = env.client.set_node_pool_size(request=container_v1.SetNodePoolSizeRequest(
        name=f"{location}/clusters/{cluster}/nodePools/{pool}", node_count=n), retry=None)
    return env.wait(op, location)


# ---- clusters ----------------------------------------------------------------------------------

def test_standard_regional_cluster_lifecycle(env):
    cluster = container_v1.Cluster(
        name="std", initial_node_count=1,
        release_channel=container_v1.ReleaseChannel(channel=container_v1.ReleaseChannel.Channel.RAPID),
        workload_identity_config=container_v1.WorkloadIdentityConfig(workload_pool=f"{P}.svc.id.goog"),
        logging_config=container_v1.LoggingConfig(component_config=container_v1.LoggingComponentConfig(
            enable_components=[container_v1.LoggingComponentConfig.Component.WORKLOADS])),
        node_pool_defaults=container_v1.NodePoolDefaults(node_config_defaults=container_v1.NodeConfigDefaults(
            gcfs_config=container_v1.GcfsConfig(enabled=True))),
    )
    op = env.client.create_cluster(parent=REGION, cluster=cluster, retry=None)
    assert op.operation_type == container_v1.Operation.Type.CREATE_CLUSTER
    assert op.status in (Status.PENDING, Status.RUNNING)
    assert env.client.get_cluster(name=f"{REGION}/clusters/std", retry=None).status == \
        container_v1.Cluster.Status.PROVISIONING

    done = env.wait(op)
    assert not done.error.message and done.end_time
    got = env.client.get_cluster(name=f"{REGION}/clusters/std", retry=None)
    assert got.status == container_v1.Cluster.Status.RUNNING
    assert got.endpoint == "127.0.0.1:6443" and got.master_auth.cluster_ca_certificate
    assert got.location == "us-central1" and list(got.locations) == ["us-central1-a", "us-central1-b",
                                                                     "us-central1-c"]
    assert got.release_channel.channel == container_v1.ReleaseChannel.Channel.RAPID
    assert got.current_master_version == "1.30.14-gke.1009000"  # RAPID's default
    # kept as sent
    assert got.workload_identity_config.workload_pool == f"{P}.svc.id.goog"
    assert list(got.logging_config.component_config.enable_components) == [
        container_v1.LoggingComponentConfig.Component.WORKLOADS]
    assert got.node_pool_defaults.node_config_defaults.gcfs_config.enabled
    # initial_node_count is per zone: one default-pool node in each of the three zones
    assert [p.name for p in got.node_pools] == ["default-pool"] and got.current_node_count == 3
    zones = sorted(n["labels"]["topology.kubernetes.io/zone"] for n in env.kube.nodes.values())
    assert zones == ["us-central1-a", "us-central1-b", "us-central1-c"]
    assert all(n["capacity"]["cpu"] == "2" and "nvidia.com/gpu" not in n["capacity"] and not n["taints"]
               for n in env.kube.nodes.values())
    assert env.used("CPUS") == 6 and env.used("CPUS_ALL_REGIONS", None) == 6

    listed = env.client.list_clusters(parent=f"projects/{P}/locations/-", retry=None).clusters
    assert [c.name for c in listed] == ["std"]
    assert env.client.list_clusters(parent=f"projects/{P}/locations/europe-west1", retry=None).clusters == []

    op = env.client.delete_cluster(name=f"{REGION}/clusters/std", retry=None)
    assert env.client.get_cluster(name=f"{REGION}/clusters/std", retry=None).status == \
        container_v1.Cluster.Status.STOPPING
    env.wait(op)
    with pytest.raises(gexc.NotFound):
        env.client.get_cluster(name=f"{REGION}/clusters/std", retry=None)
    assert env.kube.nodes == {} and env.compute.quota_used() == {"project": {}, "regions": {}}


def test_autopilot_cluster(env):
    op = env.client.create_cluster(parent=REGION, cluster=container_v1.Cluster(
        name="auto", autopilot=container_v1.Autopilot(enabled=True)), retry=None)
    env.wait(op)
    got = env.client.get_cluster(name=f"{REGION}/clusters/auto", retry=None)
    assert got.autopilot.enabled and got.status == container_v1.Cluster.Status.RUNNING
    assert not got.node_pools and got.release_channel.channel == container_v1.ReleaseChannel.Channel.REGULAR
    assert env.kube.autopilot_clusters == {"auto"}
    with pytest.raises(gexc.BadRequest, match="Autopilot"):
        env.client.create_node_pool(parent=f"{REGION}/clusters/auto", node_pool=_gpu_pool(), retry=None)
    with pytest.raises(gexc.BadRequest, match="regional"):
        env.client.create_cluster(parent=ZONE, cluster=container_v1.Cluster(
            name="auto-zonal", autopilot=container_v1.Autopilot(enabled=True)), retry=None)
    env.wait(env.client.delete_cluster(name=f"{REGION}/clusters/auto", retry=None))
    assert env.kube.autopilot_clusters == set()


def test_create_errors_duplicate_missing_bad_input(env):
    _zonal_cluster(env)
    with pytest.raises(gexc.Conflict, match="Already exists"):
        env.client.create_cluster(parent=ZONE, cluster=container_v1.Cluster(name="c1", initial_node_count=1),
                                  retry=None)
    with pytest.raises(gexc.NotFound):
        env.client.get_cluster(name=f"{ZONE}/clusters/nope", retry=None)
    with pytest.raises(gexc.NotFound):
        env.client.delete_node_pool(name=f"{ZONE}/clusters/c1/nodePools/nope", retry=None)
    with pytest.raises(gexc.BadRequest, match="initial_node_count"):
        env.client.create_cluster(parent=ZONE, cluster=container_v1.Cluster(name="no-nodes"), retry=None)
    with pytest.raises(gexc.BadRequest, match="name"):
        env.client.create_cluster(parent=ZONE, cluster=container_v1.Cluster(name="Bad_Name", initial_node_count=1),
                                  retry=None)
    with pytest.raises(gexc.BadRequest, match="unsupported"):
        env.client.create_cluster(parent=ZONE, cluster=container_v1.Cluster(
            name="old", initial_node_count=1, initial_cluster_version="1.25"), retry=None)
    body = httpx.get(f"{env.gke.url}/v1/{ZONE}/clusters/nope").json()
    assert body == {"error": {"code": 404, "message": f"Not found: {ZONE}/clusters/nope.", "status": "NOT_FOUND"}}
    assert [c.name for c in env.client.list_clusters(parent=ZONE, retry=None).clusters] == ["c1"]


def test_server_config_and_version_resolution(env):
    cfg = env.client.get_server_config(name=REGION, retry=None)
    channels = {container_v1.ReleaseChannel.Channel(c.channel).name: c for c in cfg.channels}
    assert set(channels) == {"RAPID", "REGULAR", "STABLE"}
    assert channels["STABLE"].default_version.startswith("1.29.")
    assert any(v.startswith("1.28.") for v in channels["STABLE"].valid_versions)
    assert cfg.default_cluster_version == channels["REGULAR"].default_version
    assert "COS_CONTAINERD" in cfg.valid_image_types

    op = env.client.create_cluster(parent=REGION, cluster=container_v1.Cluster(
        name="pinned", autopilot=container_v1.Autopilot(enabled=True), initial_cluster_version="1.30",
        release_channel=container_v1.ReleaseChannel(channel=container_v1.ReleaseChannel.Channel.STABLE)), retry=None)
    env.wait(op)
    assert env.client.get_cluster(name=f"{REGION}/clusters/pinned", retry=None).current_master_version.startswith(
        "1.30.")
    with pytest.raises(gexc.BadRequest, match="RAPID"):
        env.client.create_cluster(parent=REGION, cluster=container_v1.Cluster(
            name="pinned2", autopilot=container_v1.Autopilot(enabled=True), initial_cluster_version="1.28",
            release_channel=container_v1.ReleaseChannel(channel=container_v1.ReleaseChannel.Channel.RAPID)),
            retry=None)


def test_mutation_while_cluster_is_busy_is_failed_precondition(env):
    op = env.client.create_cluster(parent=ZONE, cluster=container_v1.Cluster(name="c1", initial_node_count=1),
                                   retry=None)
    with pytest.raises(gexc.BadRequest, match="currently running") as err:
        env.client.create_node_pool(parent=f"{ZONE}/clusters/c1", node_pool=_gpu_pool(), retry=None)
    assert err.value.response.json()["error"]["status"] == "FAILED_PRECONDITION"
    env.wait(op, ZONE)
    env.wait(env.client.create_node_pool(parent=f"{ZONE}/clusters/c1", node_pool=_gpu_pool(), retry=None), ZONE)


def test_update_cluster_and_node_pool(env):
    _zonal_cluster(env)
    op = env.client.update_cluster(name=f"{ZONE}/clusters/c1", update=container_v1.ClusterUpdate(
        desired_master_version="1.30.14", desired_logging_service="none"), retry=None)
    assert op.operation_type == container_v1.Operation.Type.UPGRADE_MASTER
    env.wait(op, ZONE)
    got = env.client.get_cluster(name=f"{ZONE}/clusters/c1", retry=None)
    assert got.current_master_version == "1.30.14-gke.1009000" and got.logging_service == "none"

    op = env.client.update_node_pool(request=container_v1.UpdateNodePoolRequest(
        name=f"{ZONE}/clusters/c1/nodePools/default-pool", node_version="1.30.12", image_type="UBUNTU_CONTAINERD"),
        retry=None)
    env.wait(op, ZONE)
    pool = env.client.get_node_pool(name=f"{ZONE}/clusters/c1/nodePools/default-pool", retry=None)
    assert pool.version == "1.30.12-gke.1086000" and pool.config.image_type == "UBUNTU_CONTAINERD"
    assert [n["labels"]["cloud.google.com/gke-os-distribution"] for n in env.kube.nodes.values()] == ["ubuntu"]


# ---- node pools, quota, stockouts ----------------------------------------------------------------

def test_gpu_node_pool_lifecycle_moves_quota(env):
    # This test counts nodes after each GKE call; the cluster autoscaler (min 0, a scale-down delay of
    # well under a second at this clock, no pods) would remove idle nodes between two reads.
    env.gke.autoscaler.enabled = False
    _zonal_cluster(env)

    def l4_usage() -> float:  # what the product reads (compute_v1 is parsed in test_compute.py)
        region = httpx.get(f"{env.compute.url}/compute/v1/projects/{P}/regions/us-central1").json()
        return next(q["usage"] for q in region["quotas"] if q["metric"] == "PREEMPTIBLE_NVIDIA_L4_GPUS")

    op = env.client.create_node_pool(parent=f"{ZONE}/clusters/c1", node_pool=_gpu_pool(spot=True, autoscaling=(0, 3)),
                                     retry=None)
    assert op.operation_type == container_v1.Operation.Type.CREATE_NODE_POOL
    assert not env.wait(op, ZONE).error.message
    pool = env.client.get_node_pool(name=f"{ZONE}/clusters/c1/nodePools/gpu", retry=None)
    assert pool.status == container_v1.NodePool.Status.RUNNING and pool.config.spot
    assert pool.autoscaling.enabled and pool.autoscaling.max_node_count == 3
    assert pool.config.accelerators[0].accelerator_count == 1
    (name, node), = env.kube.pool_nodes("gpu").items()
    assert name.startswith("gke-c1-gpu-")
    labels = node["labels"]
    assert labels["cloud.google.com/gke-accelerator"] == "nvidia-l4"
    assert labels["cloud.google.com/gke-spot"] == "true"
    assert labels["topology.kubernetes.io/zone"] == "us-central1-a"
    assert labels["node.kubernetes.io/instance-type"] == "g2-standard-8" and labels["team"] == "ml"
    assert node["capacity"]["nvidia.com/gpu"] == "1" and node["capacity"]["cpu"] == "8"
    assert node["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    assert l4_usage() == 1 and env.used("NVIDIA_L4_GPUS") == 0 and env.used("GPUS_ALL_REGIONS", None) == 1
    # the pool's managed instance group is visible in Compute with its size
    mig_path = pool.instance_group_urls[0].split("/compute/v1/", 1)[1]
    assert httpx.get(f"{env.compute.url}/compute/v1/{mig_path}").json()["targetSize"] == 1

    assert _size(env, "gpu", 3).operation_type == container_v1.Operation.Type.SET_NODE_POOL_SIZE
    assert len(env.kube.pool_nodes("gpu")) == 3 and l4_usage() == 3

    op = env.client.set_node_pool_autoscaling(request=container_v1.SetNodePoolAutoscalingRequest(
        name=f"{ZONE}/clusters/c1/nodePools/gpu",
        autoscaling=container_v1.NodePoolAutoscaling(enabled=True, min_node_count=0, max_node_count=2)), retry=None)
    env.wait(op, ZONE)
    assert len(env.kube.pool_nodes("gpu")) == 2 and l4_usage() == 2  # shrunk to the new max

    _size(env, "gpu", 0)  # scale to zero releases the GPUs
    assert env.kube.pool_nodes("gpu") == {} and l4_usage() == 0 and env.used("GPUS_ALL_REGIONS", None) == 0
    assert env.client.get_node_pool(name=f"{ZONE}/clusters/c1/nodePools/gpu", retry=None).status == \
        container_v1.NodePool.Status.RUNNING
    _size(env, "gpu", 1)
    assert l4_usage() == 1

    op = env.client.delete_node_pool(name=f"{ZONE}/clusters/c1/nodePools/gpu", retry=None)
    assert env.client.get_node_pool(name=f"{ZONE}/clusters/c1/nodePools/gpu", retry=None).status == \
        container_v1.NodePool.Status.STOPPING
    env.wait(op, ZONE)
    with pytest.raises(gexc.NotFound):
        env.client.get_node_pool(name=f"{ZONE}/clusters/c1/nodePools/gpu", retry=None)
    assert env.kube.pool_nodes("gpu") == {} and l4_usage() == 0
    assert [p.name for p in env.client.list_node_pools(parent=f"{ZONE}/clusters/c1", retry=None).node_pools] == [
        "default-pool"]


def test_duplicate_node_pool_is_409(env):
    _zonal_cluster(env)
    env.wait(env.client.create_node_pool(parent=f"{ZONE}/clusters/c1", node_pool=_gpu_pool(), retry=None), ZONE)
    with pytest.raises(gexc.Conflict):
        env.client.create_node_pool(parent=f"{ZONE}/clusters/c1", node_pool=_gpu_pool(), retry=None)


def test_quota_exceeded_at_create_is_403_and_creates_nothing(env):
    _zonal_cluster(env)
    env.compute.set_quota("us-central1", "NVIDIA_L4_GPUS", 1)
    with pytest.raises(gexc.Forbidden) as err:
        env.client.create_node_pool(parent=f"{ZONE}/clusters/c1", node_pool=_gpu_pool(count=2), retry=None)
    assert 'Insufficient regional quota to satisfy request: resource "NVIDIA_L4_GPUS"' in err.value.message
    assert "short '1.0'" in err.value.message
    with pytest.raises(gexc.NotFound):
        env.client.get_node_pool(name=f"{ZONE}/clusters/c1/nodePools/gpu", retry=None)
    assert env.used("NVIDIA_L4_GPUS") == 0 and env.kube.pool_nodes("gpu") == {}

    env.compute.set_quota(None, "GPUS_ALL_REGIONS", 0)  # spot has its own regional metric, not the global one
    with pytest.raises(gexc.Forbidden, match="GPUS_ALL_REGIONS"):
        env.client.create_node_pool(parent=f"{ZONE}/clusters/c1", node_pool=_gpu_pool(spot=True), retry=None)


def test_quota_exceeded_on_resize_fails_the_operation(env):
    _zonal_cluster(env)
    env.compute.set_quota("us-central1", "NVIDIA_L4_GPUS", 2)
    env.wait(env.client.create_node_pool(parent=f"{ZONE}/clusters/c1", node_pool=_gpu_pool(), retry=None), ZONE)
    done = _size(env, "gpu", 4)
    assert "QUOTA_EXCEEDED" in done.error.message and "NVIDIA_L4_GPUS" in done.error.message
    assert done.error.code == 8  # RESOURCE_EXHAUSTED
    assert len(env.kube.pool_nodes("gpu")) == 2 and env.used("NVIDIA_L4_GPUS") == 2
    pool = env.client.get_node_pool(name=f"{ZONE}/clusters/c1/nodePools/gpu", retry=None)
    assert pool.status == container_v1.NodePool.Status.RUNNING_WITH_ERROR


def test_stockout_fails_create_and_leaves_error_pool(env):
    _zonal_cluster(env)
    env.compute.set_stockout("us-central1-a", "nvidia-l4")
    op = env.client.create_node_pool(parent=f"{ZONE}/clusters/c1", node_pool=_gpu_pool(), retry=None)
    done = env.wait(op, ZONE)
    assert done.status == Status.DONE
    assert "ZONE_RESOURCE_POOL_EXHAUSTED" in done.error.message
    assert "does not have enough resources available to fulfill the request" in done.error.message
    pool = env.client.get_node_pool(name=f"{ZONE}/clusters/c1/nodePools/gpu", retry=None)
    assert pool.status == container_v1.NodePool.Status.ERROR and "ZONE_RESOURCE_POOL_EXHAUSTED" in pool.status_message
    assert env.kube.pool_nodes("gpu") == {} and env.used("NVIDIA_L4_GPUS") == 0
    # other accelerators and plain VMs in the zone are unaffected
    env.wait(env.client.create_node_pool(parent=f"{ZONE}/clusters/c1", node_pool=_gpu_pool(
        "t4", machine="n1-standard-8", accelerator="nvidia-tesla-t4"), retry=None), ZONE)
    assert len(env.kube.pool_nodes("t4")) == 1

    # the product's recovery: delete the ERROR pool, capacity comes back, create again
    env.wait(env.client.delete_node_pool(name=f"{ZONE}/clusters/c1/nodePools/gpu", retry=None), ZONE)
    env.compute.set_stockout("us-central1-a", "nvidia-l4", on=False)
    done = env.wait(env.client.create_node_pool(parent=f"{ZONE}/clusters/c1", node_pool=_gpu_pool(), retry=None),
                    ZONE)
    assert not done.error.message and len(env.kube.pool_nodes("gpu")) == 1


def test_accelerator_not_offered_or_wrong_machine_is_400(env):
    op = env.client.create_cluster(parent=REGION, cluster=container_v1.Cluster(
        name="c1", initial_node_count=1, locations=["us-central1-f"]), retry=None)
    env.wait(op)
    parent = f"{REGION}/clusters/c1"
    with pytest.raises(gexc.BadRequest, match="us-central1-f"):
        env.client.create_node_pool(parent=parent, node_pool=_gpu_pool(zone="us-central1-f"), retry=None)
    with pytest.raises(gexc.BadRequest, match="n1-standard-8"):
        env.client.create_node_pool(parent=parent, node_pool=_gpu_pool(machine="n1-standard-8"), retry=None)
    with pytest.raises(gexc.BadRequest, match="count"):
        env.client.create_node_pool(parent=parent, node_pool=_gpu_pool(machine="g2-standard-24", gpus=1), retry=None)
    with pytest.raises(gexc.BadRequest, match="europe-west1-b"):
        env.client.create_node_pool(parent=parent, node_pool=_gpu_pool(zone="europe-west1-b"), retry=None)
    # a regional cluster's pool may use any zone of its region that offers the GPU
    env.wait(env.client.create_node_pool(parent=parent, node_pool=_gpu_pool(machine="g2-standard-24", gpus=2,
                                                                            zone="us-central1-b"), retry=None))
    (node,) = env.kube.pool_nodes("gpu").values()
    assert node["capacity"]["nvidia.com/gpu"] == "2" and env.used("NVIDIA_L4_GPUS") == 2


# ---- operations --------------------------------------------------------------------------------

def test_wait_endpoint_blocks_until_done_and_cancel(env):
    env.gke.delays["cluster_create"] = 500.0  # 0.5 s at this time scale
    op = env.client.create_cluster(parent=ZONE, cluster=container_v1.Cluster(name="c1", initial_node_count=1),
                                   retry=None)
    quick = httpx.post(f"{env.gke.url}/v1/{ZONE}/operations/{op.name}:wait", params={"timeout": "0.05"})
    assert quick.status_code == 200 and quick.json()["status"] in ("PENDING", "RUNNING")
    t0 = time.monotonic()
    done = httpx.post(f"{env.gke.url}/v1/{ZONE}/operations/{op.name}:wait", timeout=10).json()
    assert done["status"] == "DONE" and "error" not in done and time.monotonic() - t0 < 2
    assert httpx.post(f"{env.gke.url}/v1/{ZONE}/operations/nope:wait").status_code == 404
    ops = env.client.list_operations(parent=ZONE, retry=None).operations
    assert [o.name for o in ops] == [op.name]

    op = env.client.create_node_pool(parent=f"{ZONE}/clusters/c1", node_pool=_gpu_pool(), retry=None)
    env.client.cancel_operation(name=f"{ZONE}/operations/{op.name}", retry=None)
    done = env.wait(op, ZONE)
    assert done.error.code == 1 and "cancel" in done.error.message.lower()
    assert env.kube.pool_nodes("gpu") == {}


def test_legacy_zonal_paths(env):
    _zonal_cluster(env)
    got = httpx.get(f"{env.gke.url}/v1/projects/{P}/zones/us-central1-a/clusters/c1").json()
    assert got["name"] == "c1" and got["zone"] == "us-central1-a" and got["status"] == "RUNNING"
    pools = httpx.get(f"{env.gke.url}/v1/projects/{P}/zones/us-central1-a/clusters/c1/nodePools").json()
    assert [p["name"] for p in pools["nodePools"]] == ["default-pool"]


# ---- faults ------------------------------------------------------------------------------------

def test_fault_status_n_times_then_success(env):
    rule = env.faults.add(service="gke", method="POST", path=r"/clusters$", status=503, count=2)
    cluster = container_v1.Cluster(name="c1", initial_node_count=1)
    with pytest.raises(gexc.ServiceUnavailable):
        env.client.create_cluster(parent=ZONE, cluster=cluster, retry=None)
    retry = Retry(predicate=if_exception_type(gexc.ServiceUnavailable), initial=0.01, maximum=0.02, timeout=5)
    env.wait(env.client.create_cluster(parent=ZONE, cluster=cluster, retry=retry), ZONE)
    assert rule.hits == 2
    assert [c.name for c in env.client.list_clusters(parent=ZONE, retry=None).clusters] == ["c1"]  # exactly one

    env.faults.add(service="gke", method="GET", status=429, count=1, headers={"Retry-After": "1"})
    with pytest.raises(gexc.TooManyRequests):
        env.client.list_clusters(parent=ZONE, retry=None)
    env.faults.add(service="gke", method="GET", status=403, count=1)
    with pytest.raises(gexc.Forbidden):
        env.client.list_clusters(parent=ZONE, retry=None)
    env.faults.add(service="gke", method="GET", status=500, count=1, body={"error": {"code": 500, "message": "boom"}})
    with pytest.raises(gexc.InternalServerError, match="boom"):
        env.client.list_clusters(parent=ZONE, retry=None)


def test_fault_latency_and_hang(env):
    env.faults.add(service="gke", path=r"/serverConfig", latency=0.3, count=1)
    t0 = time.monotonic()
    env.client.get_server_config(name=ZONE, retry=None)
    assert time.monotonic() - t0 >= 0.3

    env.faults.add(service="gke", path=r"/clusters$", hang=True, count=1)
    t0 = time.monotonic()
    with pytest.raises(Exception) as err:
        env.client.list_clusters(parent=ZONE, retry=None, timeout=0.3)
    assert "timed out" in str(err.value).lower() or "timeout" in type(err.value).__name__.lower()
    assert time.monotonic() - t0 < 2
    env.client.list_clusters(parent=ZONE, retry=None, timeout=2)  # count=1: the next call answers


def test_snapshot(env):
    _zonal_cluster(env)
    env.wait(env.client.create_node_pool(parent=f"{ZONE}/clusters/c1", node_pool=_gpu_pool(), retry=None), ZONE)
    snap = env.gke.snapshot()
    assert [c["name"] for c in snap["clusters"]] == ["c1"]
    gpu = next(p for p in snap["node_pools"] if p["name"] == "gpu")
    assert gpu["node_count"] == 1 and gpu["status"] == "RUNNING" and list(gpu["nodes"]) == ["us-central1-a"]
    assert {o["operationType"] for o in snap["operations"]} == {"CREATE_CLUSTER", "CREATE_NODE_POOL"}
    assert all(o["status"] == "DONE" for o in snap["operations"])


def test_replies_parse_strictly_as_container_v1(env):
    _zonal_cluster(env)
    env.compute.set_stockout("us-central1-a", "nvidia-l4")
    op = env.client.create_node_pool(parent=f"{ZONE}/clusters/c1", node_pool=_gpu_pool(), retry=None)
    env.wait(op, ZONE)
    base = f"{env.gke.url}/v1/{ZONE}"
    cases = {
        "/clusters/c1": container_v1.Cluster, "/clusters": container_v1.ListClustersResponse,
        "/clusters/c1/nodePools/gpu": container_v1.NodePool, "/clusters/c1/nodePools":
            container_v1.ListNodePoolsResponse, f"/operations/{op.name}": container_v1.Operation,
        "/operations": container_v1.ListOperationsResponse, "/serverConfig": container_v1.ServerConfig,
    }
    for path, cls in cases.items():
        resp = httpx.get(base + path)
        assert resp.status_code == 200, path
        assert cls.to_dict(cls.from_json(resp.text, ignore_unknown_fields=False)), path


# ---- cluster autoscaler ----------------------------------------------------------------------------

def _pod(name: str, *, gpus: int = 1, selector: dict | None = None, node: str | None = None) -> dict:
    return {"kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": {"nodeSelector": selector if selector is not None else
                     {"cloud.google.com/gke-accelerator": "nvidia-l4"}, "nodeName": node,
                     "containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": str(gpus)},
                                                                "requests": {"cpu": "2", "memory": "8Gi"}}}]},
            "status": {"phase": "Running" if node else "Pending",
                       "conditions": [] if node else [{"type": "PodScheduled", "status": "False",
                                                       "reason": "Unschedulable"}]}}


def _until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_autoscaler_grows_for_pending_pods_and_shrinks_idle_nodes(env):
    _zonal_cluster(env)
    env.wait(env.client.create_node_pool(parent=f"{ZONE}/clusters/c1", node_pool=_gpu_pool(count=0, autoscaling=(0, 2)),
                                         retry=None), ZONE)
    assert env.kube.pool_nodes("gpu") == {}
    ops_before = len(env.gke.snapshot()["operations"])

    env.kube.pods.append(_pod("blue"))
    assert _until(lambda: len(env.kube.pool_nodes("gpu")) == 1)
    assert env.used("NVIDIA_L4_GPUS") == 1
    (first,) = env.kube.pool_nodes("gpu")
    env.kube.pods[0] = _pod("blue", node=first)  # the scheduler placed it

    env.kube.pods.append(_pod("green"))  # a release brings up a second color
    assert _until(lambda: len(env.kube.pool_nodes("gpu")) == 2)
    second = next(n for n in env.kube.pool_nodes("gpu") if n != first)
    env.kube.pods[1] = _pod("green", node=second)
    env.kube.pods.append(_pod("third"))  # beyond maxNodeCount: stays pending
    time.sleep(0.3)
    assert len(env.kube.pool_nodes("gpu")) == 2
    assert any(e["kind"] == "max_reached" for e in env.gke.autoscaler.events)

    # pods that cannot use the pool never grow it
    env.kube.pods[2] = _pod("t4-pod", selector={"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"})
    # the old color goes away: its node is removed after the unneeded time; the busy one stays
    del env.kube.pods[0]
    assert _until(lambda: list(env.kube.pool_nodes("gpu")) == [second])
    assert env.used("NVIDIA_L4_GPUS") == 1
    env.kube.pods.clear()  # park: replicas 0 -> the pool drains to minNodeCount 0
    assert _until(lambda: env.kube.pool_nodes("gpu") == {})
    assert env.used("NVIDIA_L4_GPUS") == 0 and env.used("GPUS_ALL_REGIONS", None) == 0
    assert len(env.gke.snapshot()["operations"]) == ops_before  # the autoscaler issues no GKE operations
    kinds = [e["kind"] for e in env.gke.autoscaler.events]
    assert kinds.count("scale_up") == 2 and kinds.count("scale_down") == 2


def test_autoscaler_backs_off_on_stockout(env):
    _zonal_cluster(env)
    env.wait(env.client.create_node_pool(parent=f"{ZONE}/clusters/c1", node_pool=_gpu_pool(count=0, autoscaling=(0, 2)),
                                         retry=None), ZONE)
    env.compute.set_stockout("us-central1-a", "nvidia-l4")
    env.kube.pods.append(_pod("blue"))
    assert _until(lambda: any(e["kind"] == "scale_up_failed" for e in env.gke.autoscaler.events))
    failed = next(e for e in env.gke.autoscaler.events if e["kind"] == "scale_up_failed")
    assert "ZONE_RESOURCE_POOL_EXHAUSTED" in failed["detail"]
    assert env.kube.pool_nodes("gpu") == {} and env.used("NVIDIA_L4_GPUS") == 0
    env.compute.set_stockout("us-central1-a", "nvidia-l4", on=False)
    assert _until(lambda: len(env.kube.pool_nodes("gpu")) == 1)  # after the backoff it tries again


# ---- one Kubernetes API per cluster (kube_factory) ---------------------------------------------------

class ClusterKube(RecordingKube):
    """A per-cluster stand-in: its own url, started/stopped flags and subscribers."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.url = f"http://127.0.0.1:{port}"
        self.started, self.stopped = True, False
        self.subscribers: list = []

    def enable_autopilot(self, name: str) -> None:
        self.autopilot_clusters.add(name)

    def disable_autopilot(self, name: str) -> None:
        self.autopilot_clusters.discard(name)

    def subscribe(self, fn):
        self.subscribers.append(fn)
        return lambda: self.subscribers.remove(fn)

    def emit(self, event_type: str, obj: dict) -> None:
        for fn in list(self.subscribers):
            fn(event_type, obj)

    def stop(self) -> None:
        self.stopped = True


class FactoryEnv(Env):
    def __init__(self) -> None:
        self.faults = Faults()
        clock = Clock(0.001)
        self.compute = Compute(clock=clock, faults=self.faults, project=P)
        self.kubes: dict[tuple[str, str, str], ClusterKube] = {}
        self.released: list[tuple[str, str, str]] = []
        ports = iter(range(7000, 8000))

        def factory(project: str, location: str, name: str) -> ClusterKube:
            kube = self.kubes[(project, location, name)] = ClusterKube(next(ports))
            return kube

        def release(project: str, location: str, name: str, kube: ClusterKube) -> None:
            assert self.kubes[(project, location, name)] is kube
            self.released.append((project, location, name))
            kube.stop()

        self.gke = Gke(clock=clock, faults=self.faults, compute=self.compute, kube_factory=factory,
                       kube_release=release)
        self.compute.start()
        self.gke.start()
        self.client = container_v1.ClusterManagerClient(
            credentials=AnonymousCredentials(), transport="rest", client_options={"api_endpoint": self.gke.url})


@pytest.fixture
def fenv():
    e = FactoryEnv()
    yield e
    e.stop()


def _create(env: Env, project: str, location: str, cluster: container_v1.Cluster) -> container_v1.Operation:
    op = env.client.create_cluster(parent=f"projects/{project}/locations/{location}", cluster=cluster, retry=None)
    return env.wait(op, f"projects/{project}/locations/{location}")


def test_each_cluster_gets_its_own_kube_with_its_own_nodes(fenv):
    loc = "us-central1-a"
    first = fenv.client.create_cluster(parent=f"projects/p-one/locations/{loc}", retry=None,
                                       cluster=container_v1.Cluster(name="llm", initial_node_count=1))
    # the API server exists from the create reply on: the endpoint is known while PROVISIONING
    got = fenv.client.get_cluster(name=f"projects/p-one/locations/{loc}/clusters/llm", retry=None)
    one = fenv.kubes[("p-one", loc, "llm")]
    assert got.endpoint == one.url.removeprefix("http://")
    fenv.wait(first, f"projects/p-one/locations/{loc}")
    _create(fenv, "p-two", loc, container_v1.Cluster(name="llm", initial_node_count=1))
    two = fenv.kubes[("p-two", loc, "llm")]
    endpoints = {fenv.client.get_cluster(name=f"projects/{p}/locations/{loc}/clusters/llm", retry=None).endpoint
                 for p in ("p-one", "p-two")}
    assert endpoints == {one.url.removeprefix("http://"), two.url.removeprefix("http://")} and one is not two
    assert fenv.gke.cluster_kube("llm", loc, "p-two") is two

    pool = f"projects/p-two/locations/{loc}/clusters/llm"
    fenv.wait(fenv.client.create_node_pool(parent=pool, node_pool=_gpu_pool(), retry=None),
              f"projects/p-two/locations/{loc}")
    assert len(two.pool_nodes("gpu")) == 1 and one.pool_nodes("gpu") == {}
    assert len(one.nodes) == 1 and len(two.nodes) == 2  # default-pool + gpu

    op = fenv.client.delete_cluster(name=f"projects/p-two/locations/{loc}/clusters/llm", retry=None)
    fenv.wait(op, f"projects/p-two/locations/{loc}")
    # released before the operation was DONE; the other cluster's API is untouched
    assert fenv.released == [("p-two", loc, "llm")] and two.stopped and two.nodes == {}
    assert not one.stopped and len(one.nodes) == 1
    assert fenv.gke.cluster_kube("llm", loc, "p-two") is None


def test_autopilot_and_autoscaler_act_per_cluster(fenv):
    region = "us-central1"
    for p in ("p-one", "p-two"):  # same name, two projects: Autopilot nodes are paid by their own project
        _create(fenv, p, region, container_v1.Cluster(name="auto", autopilot=container_v1.Autopilot(enabled=True)))
    one, two = fenv.kubes[("p-one", region, "auto")], fenv.kubes[("p-two", region, "auto")]
    assert one.autopilot_clusters == {"auto"} == two.autopilot_clusters and len(one.subscribers) == 1
    node = {"kind": "Node", "metadata": {"name": "gk3-auto-nap-1", "labels": {
        "sandbox.llm-fleet.dev/autopilot": "auto", "cloud.google.com/gke-accelerator": "nvidia-l4"}},
        "status": {"capacity": {"cpu": "4", "nvidia.com/gpu": "1"}}}
    two.emit("ADDED", node)
    assert fenv.compute.quota(region, "NVIDIA_L4_GPUS", project="p-two")["usage"] == 1
    assert fenv.compute.quota(region, "NVIDIA_L4_GPUS", project="p-one")["usage"] == 0
    (held,) = fenv.gke.snapshot()["autopilot_nodes"]
    assert held["project"] == "p-two" and held["cluster"] == "auto" and held["location"] == region
    # deleting the cluster gives the quota back at once and drops its hooks
    fenv.wait(fenv.client.delete_cluster(name=f"projects/p-two/locations/{region}/clusters/auto", retry=None),
              f"projects/p-two/locations/{region}")
    assert fenv.compute.quota(region, "NVIDIA_L4_GPUS", project="p-two")["usage"] == 0
    assert two.subscribers == [] and two.autopilot_clusters == set() and two.stopped
    assert fenv.gke.snapshot()["autopilot_nodes"] == []

    # two Standard clusters with matching autoscaled pools: a pending pod grows its own cluster's pool
    for p in ("p-one", "p-two"):
        _create(fenv, p, "us-central1-a", container_v1.Cluster(name="std", initial_node_count=1))
        fenv.wait(fenv.client.create_node_pool(parent=f"projects/{p}/locations/us-central1-a/clusters/std",
                                               node_pool=_gpu_pool(count=0, autoscaling=(0, 2)), retry=None),
                  f"projects/{p}/locations/us-central1-a")
    std_one, std_two = (fenv.kubes[(p, "us-central1-a", "std")] for p in ("p-one", "p-two"))
    std_two.pods.append(_pod("blue"))
    assert _until(lambda: len(std_two.pool_nodes("gpu")) == 1)
    std_two.pods[0] = _pod("blue", node=next(iter(std_two.pool_nodes("gpu"))))  # the scheduler placed it
    time.sleep(0.2)
    assert std_one.pool_nodes("gpu") == {} and len(std_two.pool_nodes("gpu")) == 1
    assert fenv.compute.quota("us-central1", "NVIDIA_L4_GPUS", project="p-two")["usage"] == 1
    assert fenv.compute.quota("us-central1", "NVIDIA_L4_GPUS", project="p-one")["usage"] == 0


def test_stopping_gke_releases_every_cluster_api(fenv):
    _create(fenv, "p-one", "us-central1-a", container_v1.Cluster(name="a", initial_node_count=1))
    _create(fenv, "p-two", "us-central1-a", container_v1.Cluster(name="b", initial_node_count=1))
    fenv.gke.stop()
    assert sorted(fenv.released) == [("p-one", "us-central1-a", "a"), ("p-two", "us-central1-a", "b")]
    assert all(k.stopped for k in fenv.kubes.values())


def test_the_autoscalers_state_of_a_pool_goes_with_the_pool():
    """The autoscaler's per-pool state (zone backoff, a class's allowed zones, scale-ups in flight) is gone
    with its pool. Keyed by id(pool) it outlived a deleted cluster, and a new pool that CPython placed at the
    freed address inherited it: in a CI run, test_park's pool (europe-west1) got test_capacity's class zones
    and never scaled up ("0/2 nodes are available ... Insufficient nvidia.com/gpu" until the progress
    deadline). Failed before the fix: the backoff entries were still there after the pool was gone."""
    import gc
    import types

    from sandbox.core import DEFAULT_DELAYS, Clock
    from sandbox.gke.autoscaler import ClusterAutoscaler
    from sandbox.gke.service import GKE_DELAYS
    from sandbox.gke.state import _Pool

    gke = types.SimpleNamespace(clock=Clock(1.0), delays={**DEFAULT_DELAYS, **GKE_DELAYS}, _lock=threading.Lock())
    autoscaler = ClusterAutoscaler(gke)  # type: ignore[arg-type]
    pool = _Pool({"name": "gpu", "locations": ["z-a"], "autoscaling": {"maxNodeCount": 2}})
    autoscaler._back_off(pool, "z-a")  # a stockout in the pool's only zone: the pool backs off for 300 s
    choice = types.SimpleNamespace(pool=pool, zones=("z-a",))
    assert autoscaler._room(choice, time.monotonic()) == ((), "in backoff after failed scale-up")
    del pool, choice
    gc.collect()
    assert not autoscaler._zone_backoff and not autoscaler._backoff_until
