"""provision_cluster against the sandbox: real Prefect, real google-cloud clients, real HTTP."""

from __future__ import annotations

import copy

import pytest

from tests.flows.conftest import spec_dict

pytestmark = pytest.mark.usefixtures("prefect_server")


def clusters(project: str) -> list[dict]:
    """What GKE holds for ``project``, read back through the real client."""
    from tasks.clients import cluster_manager
    from tasks.gke import _to_dict

    client = cluster_manager()
    resp = client.list_clusters(parent=f"projects/{project}/locations/-", retry=None, timeout=10)
    return [_to_dict(c) for c in resp.clusters]


def pools(project: str, location: str, cluster: str) -> list[dict]:
    from tasks.clients import cluster_manager
    from tasks.gke import _to_dict

    resp = cluster_manager().list_node_pools(parent=f"projects/{project}/locations/{location}/clusters/{cluster}",
                                             retry=None, timeout=10)
    return [_to_dict(p) for p in resp.node_pools]


def gpu_pools(project: str, location: str, cluster: str) -> list[dict]:
    return [p for p in pools(project, location, cluster) if p["name"] != "default-pool"]


def quota_usage(project: str, region: str, metric: str) -> float:
    from tasks.clients import compute_http

    info = compute_http().get(f"projects/{project}/regions/{region}", timeout=10).raise_for_status().json()
    return next((q["usage"] for q in info["quotas"] if q["metric"] == metric), 0.0)


def run(spec, **kw):
    from flows.provision_cluster import provision_cluster

    return provision_cluster(spec=spec, **kw)


@pytest.fixture(scope="module")
def qwen(prefect_server, sandbox):
    """The smallest spec's cluster, provisioned once (reporting to Slack) for the tests of what a run on
    an existing cluster does: rerun, Slack thread, Slack down. Each test gets a copy of the spec."""
    from sandbox.client import SandboxClient

    spec = spec_dict("qwen2.5-7b-sglang.yaml", slack_channel="#prov-ok")
    run(spec)
    # the thread of that first run (the create steps), read before any other test posts
    msgs = SandboxClient(sandbox.env()["LLM_FLEET_SANDBOX_URL"]).slack_messages(channel="#prov-ok")
    return lambda: copy.deepcopy(spec), msgs


def test_standard_cluster_and_l4_pool(sbc):
    # min_nodes 1: an idle min-0 pool is scaled down by the sandbox's cluster autoscaler, as on GKE.
    spec = spec_dict("gemma2-2b-it-vllm-l4.yaml", accelerator__pool__min_nodes=1)
    project = spec["cluster"]["project"]
    result = run(spec)
    (cluster,) = clusters(project)
    assert cluster["name"] == "vllm-cluster" and cluster["status"] == "RUNNING"
    assert cluster["release_channel"]["channel"] == "RAPID"
    assert cluster["workload_identity_config"]["workload_pool"] == f"{project}.svc.id.goog"
    (pool,) = gpu_pools(project, "europe-west1", "vllm-cluster")
    assert pool["name"] == "gpupool" and pool["status"] == "RUNNING"
    assert pool["config"]["machine_type"] == "g2-standard-8"
    assert pool["config"]["accelerators"][0]["accelerator_type"] == "nvidia-l4"
    assert pool["autoscaling"]["min_node_count"] == 1 and pool["autoscaling"]["max_node_count"] == 2
    assert pool["locations"] == ["europe-west1-b"]
    # One node booted (initial_nodes: 1) holds one L4 of the regional quota.
    assert quota_usage(project, "europe-west1", "NVIDIA_L4_GPUS") == 1
    assert result["kubeconfig"].endswith(".yaml")


def test_autopilot_cluster(sbc):
    spec = spec_dict("paligemma2-tgi-autopilot.yaml")
    project = spec["cluster"]["project"]
    run(spec)
    (cluster,) = clusters(project)
    assert cluster["status"] == "RUNNING" and cluster["autopilot"]["enabled"] is True
    assert cluster["release_channel"]["channel"] == "STABLE"
    assert not gpu_pools(project, "us-central1", cluster["name"])



def test_fast_starting_nodes_refused_before_anything_then_a_cluster_without_a_gpu_pool(sbc):
    """startup.nodes: fast-start on Standard: the preflight refuses the Rapid channel's default version (the
    sandbox's 1.30, older than Autopilot ComputeClasses in Standard need) naming the fix, before anything is
    created; pinned to 1.33 the cluster is made and no GPU pool (GKE makes the nodes in Autopilot mode)."""
    from manifests.errors import PreflightError

    spec = spec_dict("gemma2-2b-it-vllm-l4.yaml", startup={"nodes": "fast-start"})
    project = spec["cluster"]["project"]
    with pytest.raises(PreflightError, match="1.33.1-gke.1107000") as err:
        run(spec)
    assert 'cluster.version: "1.33"' in str(err.value)
    assert clusters(project) == []  # nothing was created or paid for
    spec["cluster"]["version"] = "1.33"
    out = run(spec)
    (cluster,) = clusters(project)
    assert cluster["current_master_version"].startswith("1.33.") and cluster["release_channel"]["channel"] == "RAPID"
    assert gpu_pools(project, "europe-west1", "vllm-cluster") == [] and out["node_pool"] is None
    assert "no GPU pool" in out["attempts"][0]["detail"]

def test_rerun_changes_nothing(sbc, qwen):
    spec = qwen[0]()
    project = spec["cluster"]["project"]

    def desired_state():
        # What the flow controls; node counts move with the cluster autoscaler, as on GKE.
        # (Status may pass through RECONCILING while the autoscaler moves nodes.)
        keep = ("name", "config", "autoscaling", "locations", "self_link", "create_time")
        return ([{k: c.get(k) for k in ("name", "self_link", "create_time", "release_channel")}
                 for c in clusters(project)],
                [{k: p.get(k) for k in keep} for p in gpu_pools(project, "us-central1", "llm-fleet")])

    def operations():
        return [op for op in sbc.state()["gke"]["operations"] if f"/projects/{project}/" in op["selfLink"]]

    before, ops_before = desired_state(), operations()
    out = run(spec)
    assert out["result"] == "exists" and [a["result"] for a in out["attempts"]] == ["exists"]  # not "created"
    assert desired_state() == before
    assert operations() == ops_before  # no create or update was issued


def test_crash_after_cluster_create_then_rerun_converges(sbc):
    spec = spec_dict("gemma2-2b-it-vllm-l4.yaml")
    project = spec["cluster"]["project"]
    # A permanent error right after the cluster exists: the run dies there (not retried).
    sbc.add_fault(service="gke", method="POST", path=f"/projects/{project}/.*/nodePools$", status=403, count=1)
    with pytest.raises(Exception, match="403|denied|Forbidden"):
        run(spec)
    assert len(clusters(project)) == 1 and not gpu_pools(project, "europe-west1", "vllm-cluster")
    run(spec)
    assert len(clusters(project)) == 1
    assert [p["name"] for p in gpu_pools(project, "europe-west1", "vllm-cluster")] == ["gpupool"]


def test_short_quota_fails_before_anything_exists(sbc):
    spec = spec_dict("gemma2-2b-it-vllm-l4.yaml")
    project = spec["cluster"]["project"]
    sbc.set_quota(project=project, region="europe-west1", metric="NVIDIA_L4_GPUS", limit=1)
    from manifests.errors import QuotaError

    with pytest.raises(QuotaError) as info:
        run(spec)
    text = str(info.value)
    assert "1 GPU(s) missing in NVIDIA_L4_GPUS for region europe-west1" in text
    assert "quotas" in info.value.fix
    assert clusters(project) == []


def test_accelerator_missing_in_zone_fails_before_anything_exists(sbc):
    spec = spec_dict("gemma2-2b-it-vllm-l4.yaml", cluster__zones=["europe-west1-d"])
    project = spec["cluster"]["project"]
    from manifests.errors import PreflightError

    offered = sbc.state()["compute"]
    with pytest.raises(PreflightError, match="europe-west1-d"):
        run(spec)
    assert clusters(project) == []
    assert offered  # the catalogue is real data, not empty


def _single_spot_pool(**overrides) -> dict:
    """Seed 004 as one spot pool (no capacity list) with a failover region: provision's own zone walk."""
    spec = spec_dict("mistral-7b-vllm-spot.yaml", **overrides)
    first = spec.pop("capacity")[0]
    spec["accelerator"].update({"type": first["gpu"], "machine_type": first["machine_type"], "spot": True})
    spec["cluster"]["failover_regions"] = ["us-east1"]
    return spec


def test_stockout_fails_over_to_next_zone(sbc):
    spec = _single_spot_pool(accelerator__pool__min_nodes=1)
    project = spec["cluster"]["project"]
    sbc.set_stockout(zone="us-central1-a", on=True)
    try:
        result = run(spec)
    finally:
        sbc.set_stockout(zone="us-central1-a", on=False)
    (pool,) = gpu_pools(project, "us-central1", "vllm-serving-cluster")
    assert pool["locations"] == ["us-central1-b"] and pool["status"] == "RUNNING"
    assert [a["result"] for a in result["attempts"]] == ["stockout", "created"]
    assert quota_usage(project, "us-central1", "PREEMPTIBLE_NVIDIA_L4_GPUS") == 1


def test_transient_errors_are_retried(sbc):
    spec = spec_dict("qwen2.5-7b-sglang.yaml")
    project = spec["cluster"]["project"]
    sbc.add_fault(service="gke", method="POST", path=f"/projects/{project}/locations/[^/]+/clusters$", status=503,
                  count=3)
    sbc.add_fault(service="gke", method="GET", path=f"/projects/{project}/locations/[^/]+/clusters/llm-fleet$",
                  status=429, count=1)
    run(spec)
    (cluster,) = clusters(project)
    assert cluster["status"] == "RUNNING"
    hits = {f["status"]: f["hits"] for f in sbc.faults()}
    assert hits == {503: 3, 429: 1}


def test_slack_thread_shows_steps(sbc, qwen):
    msgs = qwen[1]  # the thread of the run that created the cluster
    head = msgs[0]
    assert "provision_cluster" in head["text"] and "succeeded" in head["text"]
    for step in ("Preflight", "Create the GKE cluster", "Get cluster credentials"):
        assert step in head["text"]


def test_slack_down_never_fails_the_flow(sbc, qwen):
    spec = {**qwen[0](), "slack_channel": "#prov-down"}
    sbc.add_fault(service="slack", status=500, count=None)
    run(spec)
    assert sbc.faults()[0]["hits"] > 0  # the run did try to post
    assert clusters(spec["cluster"]["project"])[0]["status"] == "RUNNING"


def test_dry_run_touches_nothing(sbc):
    spec = spec_dict("gemma2-2b-it-vllm-l4.yaml")
    result = run(spec, dry_run=True)
    assert result["dry_run"] and any(a["verb"] == "create" for a in result["plan"])
    assert clusters(spec["cluster"]["project"]) == []


def test_get_cluster_does_not_exist_is_none(sandbox):
    from tasks.gke import get_cluster

    assert get_cluster.fn(project="t-nothing-here", location="us-central1", name="nope") is None


def test_pool_drift_is_updated_where_gke_allows_and_refused_otherwise(sbc):
    from manifests.errors import DriftError

    spec = spec_dict("qwen2.5-7b-sglang.yaml")
    project = spec["cluster"]["project"]
    run(spec)
    spec["accelerator"] = {"type": "nvidia-l4", "pool": {"max_nodes": 4}}
    run(spec)  # autoscaling bounds: updated in place
    (pool,) = gpu_pools(project, "us-central1", "llm-fleet")
    assert pool["autoscaling"]["max_node_count"] == 4
    spec["accelerator"] = {"type": "nvidia-l4", "machine_type": "g2-standard-12", "pool": {"max_nodes": 4}}
    with pytest.raises(DriftError, match="accelerator.machine_type") as info:
        run(spec)
    assert "g2-standard-8" in str(info.value)
    (pool,) = gpu_pools(project, "us-central1", "llm-fleet")
    assert pool["config"]["machine_type"] == "g2-standard-8"  # nothing was changed behind the user's back


def test_every_zone_stocked_out_moves_to_the_failover_region(sbc):
    spec = _single_spot_pool(accelerator__pool__min_nodes=1)
    project = spec["cluster"]["project"]
    for zone in ("us-central1-a", "us-central1-b"):
        sbc.set_stockout(zone=zone, on=True)
    result = run(spec)
    assert result["location"] == "us-east1"
    (cluster,) = clusters(project)  # the first region's cluster was removed, not left behind
    assert cluster["location"] == "us-east1" and cluster["status"] == "RUNNING"
    (pool,) = gpu_pools(project, "us-east1", "vllm-serving-cluster")
    assert pool["locations"][0].startswith("us-east1-")
    assert [a["result"] for a in result["attempts"]] == ["stockout", "stockout", "cluster removed", "created"]
    assert quota_usage(project, "us-central1", "PREEMPTIBLE_NVIDIA_L4_GPUS") == 0
