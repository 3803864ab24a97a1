"""Pure decisions: quota math, zone candidates, version checks, drift, pod diagnosis."""

from __future__ import annotations

from pathlib import Path

import pytest

from manifests import provision as prov
from manifests.rollout import diagnose
from manifests.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[2]
GEMMA = load_spec(ROOT / "deployments/gemma2-2b-it-vllm-l4.yaml")
SEED_004 = load_spec(ROOT / "deployments/mistral-7b-vllm-spot.yaml")
# Seed 004 as one spot pool with a failover region (the single-pool zone walk; the bundled spec has a
# capacity list, tests/unit/test_capacity.py)
MISTRAL = parse_spec({**SEED_004.model_dump(mode="json", exclude={"capacity"}, by_alias=True),
                      "cluster": {**SEED_004.cluster.model_dump(mode="json"), "failover_regions": ["us-east1"]}})


def test_quota_short_names_metric_region_missing_and_fix():
    check = prov.check_quota(GEMMA, prov.QuotaReading("NVIDIA_L4_GPUS", "europe-west1", 4, 3), need=2)
    assert not check.ok
    assert "1 GPU(s) missing in NVIDIA_L4_GPUS for region europe-west1" in check.detail
    assert "NVIDIA_L4_GPUS ≥ 5" in check.fix and "console.cloud.google.com/iam-admin/quotas" in check.fix
    assert prov.check_quota(GEMMA, prov.QuotaReading("NVIDIA_L4_GPUS", "europe-west1", 4, 2), need=2).ok


def test_spot_uses_preemptible_metric_and_max_gpus():
    assert prov.quota_metric(MISTRAL) == "PREEMPTIBLE_NVIDIA_L4_GPUS"
    assert prov.quota_metric(GEMMA) == "NVIDIA_L4_GPUS"
    assert GEMMA.max_gpus == 2  # pool max 2 × 1 GPU


def test_zone_candidates_order_and_failover_regions():
    offered = {"us-central1": ["us-central1-a", "us-central1-b", "us-central1-c"], "us-east1": ["us-east1-c",
                                                                                                "us-east1-b"]}
    assert prov.zone_candidates(MISTRAL, offered) == [
        ("us-central1", "us-central1-a"), ("us-central1", "us-central1-b"),
        ("us-east1", "us-east1-b"), ("us-east1", "us-east1-c")]


def test_zone_not_offering_accelerator_fails_with_alternatives():
    check, _ = prov.check_zones(GEMMA, {"europe-west1": ["europe-west1-c", "europe-west1-d"]})
    assert not check.ok and "europe-west1-b" in check.detail and "europe-west1-d" in check.fix


def test_version_check():
    cfg = {"channels": [{"channel": "STABLE", "default_version": "1.30.5-gke.1", "valid_versions": ["1.30.5-gke.1"]},
                        {"channel": "RAPID", "default_version": "1.33.1-gke.1", "valid_versions": ["1.33.1-gke.1"]}]}
    pali = load_spec(ROOT / "deployments/paligemma2-tgi-autopilot.yaml")
    assert prov.check_version(pali, cfg).ok
    bad = parse_spec({**pali.model_dump(mode="json", by_alias=True),
                      "cluster": {**pali.cluster.model_dump(), "version": "1.27"}})
    check = prov.check_version(bad, cfg)
    assert not check.ok and "1.30" in check.fix


def test_bodies_carry_seed_settings():
    body = prov.cluster_body(MISTRAL, location="us-central1", zones=["us-central1-a"])
    assert body["workload_identity_config"]["workload_pool"] == "llm-fleet-demo.svc.id.goog"
    assert body["node_pool_defaults"]["node_config_defaults"]["gcfs_config"]["enabled"] is True
    pool = prov.node_pool_body(MISTRAL, zone="us-central1-b")
    assert pool["config"]["spot"] is True and pool["locations"] == ["us-central1-b"]
    assert pool["config"]["accelerators"][0] == {"accelerator_count": 1, "accelerator_type": "nvidia-l4",
                                                 "gpu_driver_installation_config": {"gpu_driver_version": "LATEST"}}
    assert pool["autoscaling"] == {"enabled": True, "min_node_count": 0, "max_node_count": 2}
    auto = prov.cluster_body(load_spec(ROOT / "deployments/paligemma2-tgi-autopilot.yaml"), location="us-central1",
                             zones=[])
    assert auto["autopilot"] == {"enabled": True} and "node_pools" not in auto


def test_drift_updatable_and_not():
    live = prov.node_pool_body(GEMMA, zone="europe-west1-b")
    assert prov.pool_drift(GEMMA, live) == []
    live["autoscaling"]["max_node_count"] = 5
    live["config"]["machine_type"] = "g2-standard-4"
    drift = {d.field: d.updatable for d in prov.pool_drift(GEMMA, live)}
    assert drift == {"accelerator.pool.max_nodes": True, "accelerator.machine_type": False}


def pod(name, *, ready=False, phase="Running", waiting=None, last=None, unsched=None, restarts=None):
    conds = [{"type": "Ready", "status": "True" if ready else "False"}]
    if unsched:
        conds.append({"type": "PodScheduled", "status": "False", "message": unsched})
    cs = {"state": {"waiting": {"reason": waiting}} if waiting else {"running": {}}, "restartCount": restarts if restarts is not None else (2 if last else 0)}
    if last:
        cs["lastState"] = {"terminated": {"reason": last}}
    return {"metadata": {"name": name}, "status": {"phase": phase, "conditions": conds, "containerStatuses": [cs]}}


@pytest.mark.parametrize(("pods", "state", "reason"), [
    ([pod("a", ready=True)], "ready", ""),
    ([pod("a", ready=True), pod("b")], "waiting", "Loading"),
    ([pod("a", phase="Pending", unsched="0/3 nodes are available: 3 Insufficient nvidia.com/gpu")], "waiting",
     "Unschedulable"),
    ([pod("a", phase="Pending", waiting="ImagePullBackOff")], "failed", "ImagePullBackOff"),
    ([pod("a", waiting="CrashLoopBackOff", last="Error")], "failed", "CrashLoopBackOff"),
    ([pod("a", waiting="CrashLoopBackOff", last="OOMKilled")], "failed", "OOMKilled"),
    # between two crashes (restarted, back-off over): still the crash loop, not a model that is loading
    ([pod("a", last="Error")], "failed", "CrashLoopBackOff"),
    ([pod("a", ready=True, last="Error")], "ready", ""),
    # one restart (a liveness kill of a slow start on a loaded node) is not yet a loop: still loading
    ([pod("a", last="Error", restarts=1)], "waiting", "Loading"),
    ([], "waiting", "NoPods"),
])
def test_diagnose(pods, state, reason):
    progress = diagnose(pods, desired=len(pods) or 1)
    assert progress.state == state and progress.reason == reason
    if state == "failed":
        assert progress.fix


def test_plan_says_why_the_gpu_pool_has_one_zone():
    """cluster.zones is a failover order: the plan and the field's description say so (a pool's min/max count
    per zone), so nobody expects a pool spread over them."""
    from manifests.spec import ClusterSpec

    pre = prov.Preflight(candidates=[("us-central1", "us-central1-a"), ("us-central1", "us-central1-b")])
    (pool,) = [a for a in prov.plan_provision(MISTRAL, cluster=None, pool=None, preflight=pre)
               if a.target.startswith("node pool")]
    assert pool.verb == "create" and "us-central1-a, us-central1-b" in pool.why
    assert "one zone at a time" in pool.why and "per zone" in pool.why
    assert "failover order" in ClusterSpec.model_fields["zones"].description
