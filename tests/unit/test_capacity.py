"""Capacity options (issue 23): the spec's ordered list, its checks per option, the ComputeClass and the
pools it renders to, and the per-option preflight."""

from __future__ import annotations

import pytest

from manifests import names
from manifests.provision import QuotaReading, check_options, option_pool_body
from manifests.spec import SpecError, check_fit_all, parse_spec

L4_SPOT = {"gpu": "nvidia-l4", "machine_type": "g2-standard-8", "provisioning": "spot",
           "zones": ["us-central1-a", "us-central1-b"]}
L4_OD = {**L4_SPOT, "provisioning": "on-demand"}
A100_OD = {"gpu": "nvidia-tesla-a100", "provisioning": "on-demand", "zones": ["us-central1-b"]}


def _base() -> dict:
    return {"name": "m7b", "model": "mistralai/Mistral-7B-v0.1", "namespace": "vllm",
            "cluster": {"project": "llm-fleet-demo", "location": "us-central1",
                        "zones": ["us-central1-a", "us-central1-b"]},
            "accelerator": {"pool": {"name": "gpu-pool", "max_nodes": 2}},
            "capacity": [L4_SPOT, L4_OD, A100_OD],
            "on_spot_preemption": "accept_gap"}  # one spot replica, as seed 004


def _spec(**over):
    data = _base()
    data.update(over)
    return parse_spec(data)


def test_capacity_list_in_order_and_first_option_is_the_accelerator():
    spec = _spec()
    assert [o.label() for o in spec.capacity_options] == [
        "1× nvidia-l4 spot in us-central1-a, us-central1-b",
        "1× nvidia-l4 on-demand in us-central1-a, us-central1-b",
        "1× nvidia-tesla-a100 on-demand in us-central1-b"]
    assert (spec.accelerator.type, spec.accelerator.spot, spec.accelerator.pool.name) == ("nvidia-l4", True, "gpu-pool")
    assert [spec.option_pool(i) for i in range(3)] == ["gpu-pool", "gpu-pool-1", "gpu-pool-2"]
    assert spec.capacity_options[0].quota_metric == "PREEMPTIBLE_NVIDIA_L4_GPUS"
    assert spec.capacity_options[2].quota_metric == "NVIDIA_A100_GPUS"


def test_fit_is_checked_per_option_at_validate_time_naming_the_option_and_the_fix():
    data = _base()
    data["engine"] = {"kind": "vllm", "dtype": "float32"}  # 7B × 4 bytes: fits an A100-40GB, not one L4
    data["capacity"] = [A100_OD, L4_OD]
    with pytest.raises(SpecError) as err:
        parse_spec(data)
    msg = str(err.value)
    assert msg.startswith("capacity[1]: mistralai/Mistral-7B-v0.1 needs ~32.3 GiB")
    assert "1 × nvidia-l4 has 24 GiB" in msg and "set capacity[1].count: 2" in msg and "drop this option" in msg
    # the HF preflight's real count runs the same check per option
    spec = _spec()
    assert [r.fits for _, _, r in check_fit_all(spec, 7_241_732_096)] == [True, True, True]


@pytest.mark.parametrize(("change", "field", "words"), [
    ({"accelerator": "nvidia-l4"}, "accelerator.type", "move it into the first capacity option"),
    ({"capacity": [L4_SPOT, {"gpu": "nvidia-l4", "provisioning": "reservation"}]}, "capacity[1].reservation",
     "reservation: NAME"),
    ({"capacity": [{**L4_SPOT, "count": 2, "machine_type": None}, L4_OD]}, "capacity[1].count",
     "could never start there"),
    ({"capacity": [L4_SPOT, {**L4_OD, "zones": ["us-east1-b"]}]}, "capacity[1].zones[0]", "not in region"),
    ({"capacity": [L4_SPOT, {**A100_OD, "gpu": "nvidia-a100"}]}, "capacity[1].gpu", "nvidia-a100-80gb"),
    ({"capacity": [L4_SPOT, {**L4_OD, "name": "gpu-pool"}]}, "capacity[1].name", "its own name"),
    ({"capacity": []}, "capacity", "at least 1"),
])
def test_bad_options_are_one_clear_error(change, field, words):
    data = _base()
    data.update(change)
    with pytest.raises(SpecError) as err:
        parse_spec(data)
    assert err.value.field == field and words in str(err.value)


def test_option_pools_are_labelled_and_tainted_for_the_class():
    spec = _spec()
    body = option_pool_body(spec, 2, zones=["us-central1-b"])
    cfg = body["config"]
    assert body["name"] == "gpu-pool-2" and body["locations"] == ["us-central1-b"]
    assert body["initial_node_count"] == 0 and body["autoscaling"]["max_node_count"] == 2
    assert body["autoscaling"]["location_policy"] == "ANY"
    assert cfg["machine_type"] == "a2-highgpu-1g" and cfg["spot"] is False
    assert cfg["accelerators"][0]["accelerator_type"] == "nvidia-tesla-a100"
    assert cfg["labels"][names.COMPUTE_CLASS_LABEL] == "m7b-vllm"
    assert cfg["taints"] == [{"key": names.COMPUTE_CLASS_LABEL, "value": "m7b-vllm", "effect": "NO_SCHEDULE"}]
    assert option_pool_body(spec, 0, zones=["us-central1-a"])["config"]["spot"] is True


def test_preflight_says_which_options_are_usable_now():
    spec = _spec()
    quotas = {"PREEMPTIBLE_NVIDIA_L4_GPUS": QuotaReading("PREEMPTIBLE_NVIDIA_L4_GPUS", "us-central1", 0, 0),
              "NVIDIA_L4_GPUS": QuotaReading("NVIDIA_L4_GPUS", "us-central1", 8, 1),
              "NVIDIA_A100_GPUS": QuotaReading("NVIDIA_A100_GPUS", "us-central1", 8, 0)}
    offered = {"nvidia-l4": ["us-central1-a", "us-central1-b", "us-central1-c"],
               "nvidia-tesla-a100": ["us-central1-c"]}
    check, status = check_options(spec, quotas=quotas, offered=offered)
    assert check.ok
    assert [s.usable for s in status] == [False, True, False]
    assert "PREEMPTIBLE_NVIDIA_L4_GPUS" in status[0].why and "0 free" in status[0].why
    assert status[2].why == "no zone of us-central1 offers nvidia-tesla-a100"
    assert "[1] 1× nvidia-l4 on-demand" in check.detail
    quotas["NVIDIA_L4_GPUS"] = QuotaReading("NVIDIA_L4_GPUS", "us-central1", 1, 1)
    check, _ = check_options(spec, quotas=quotas, offered=offered)
    assert not check.ok and "raise a quota" in check.fix


# ---- which option served, read from the cluster (manifests/capacity.py) ------------------------------

def _pod(name: str, node: str | None = None) -> dict:
    return {"metadata": {"name": name}, "spec": {"nodeName": node} if node else {}}


def _ev(pod: str, reason: str, message: str, t: str) -> dict:
    return {"involvedObject": {"name": pod}, "reason": reason, "message": message, "lastTimestamp": t}


def _mig(pool: str, zone: str) -> str:
    return (f"{{https://www.googleapis.com/compute/v1/projects/p/zones/{zone}/instanceGroups/"
            f"gke-llm-fleet-{pool}-0af51b58-grp 0->1 (max: 2)}}")


def test_placement_names_the_option_that_served_and_why_better_ones_were_skipped():
    from manifests.capacity import placement

    spec = _spec()
    out = "GCE out of resources (ZONE_RESOURCE_POOL_EXHAUSTED)"
    events = [
        _ev("m-1", "TriggeredScaleUp", f"pod triggered scale-up: [{_mig('gpu-pool', 'us-central1-a')}]", "t1"),
        _ev("m-1", "FailedScaleUp", f"Node scale up in zones us-central1-a associated with this pod failed: {out}. "
            "Pod is at risk of not being scheduled.", "t2"),
        _ev("m-1", "TriggeredScaleUp", f"pod triggered scale-up: [{_mig('gpu-pool', 'us-central1-b')}]", "t3"),
        _ev("m-1", "FailedScaleUp", f"Node scale up in zones us-central1-b associated with this pod failed: {out}. "
            "Pod is at risk of not being scheduled.", "t4"),
        _ev("m-1", "TriggeredScaleUp", f"pod triggered scale-up: [{_mig('gpu-pool-1', 'us-central1-a')}]", "t5"),
        _ev("other", "FailedScaleUp", "Node scale up in zones us-central1-c associated with this pod failed: x.", "t6"),
    ]
    found = placement(spec, pods=[_pod("m-1", "n1")], node_pools={"n1": "gpu-pool-1"}, events=events)
    assert [o.served for o in found.options] == [0, 1, 0]
    assert found.options[0].refused == [f"us-central1-a: {out}", f"us-central1-b: {out}"]
    assert not found.exhausted
    assert found.summary() == (
        "served by option 1 (1× nvidia-l4 on-demand in us-central1-a, us-central1-b, pool gpu-pool-1) — a fallback; "
        f"option 0 (1× nvidia-l4 spot in us-central1-a, us-central1-b) skipped: us-central1-a: {out}; "
        f"us-central1-b: {out}")


def test_placement_sees_when_every_option_is_exhausted():
    from manifests.capacity import CapacityExhausted, exhausted_error, placement

    spec = _spec()
    out = ("Node scale up in zones {} associated with this pod failed: GCE out of resources "
           "(ZONE_RESOURCE_POOL_EXHAUSTED). Pod is at risk of not being scheduled.")
    backoff = _ev("m-1", "NotTriggerScaleUp", "pod didn't trigger scale-up: 3 in backoff after failed scale-up", "t2")
    # every node group in backoff from an earlier failure, nothing tried for this pod yet: wait it out
    assert not placement(spec, pods=[_pod("m-1")], node_pools={}, events=[backoff]).exhausted
    events = [_ev("m-1", "TriggeredScaleUp", "pod triggered scale-up: [" + " ".join(
        _mig(p, z) for p, z in [("gpu-pool", "us-central1-a"), ("gpu-pool-1", "us-central1-b"),
                                ("gpu-pool-2", "us-central1-b")]) + "]", "t0"),
              _ev("m-1", "FailedScaleUp", out.format("us-central1-a"), "t1"),
              _ev("m-1", "FailedScaleUp", out.format("us-central1-b"), "t1"), backoff]
    found = placement(spec, pods=[_pod("m-1")], node_pools={}, events=events)
    assert found.pending == 1 and found.exhausted
    err = exhausted_error(spec, found)
    assert isinstance(err, CapacityExhausted)
    assert "option 0 (1× nvidia-l4 spot" in str(err) and "option 2 (1× nvidia-tesla-a100 on-demand" in str(err)
    assert "us-central1-a: GCE out of resources (ZONE_RESOURCE_POOL_EXHAUSTED)" in str(err)
    # a scale-up after the backoff (capacity back) is not exhaustion
    events.append(_ev("m-1", "TriggeredScaleUp", f"pod triggered scale-up: [{_mig('gpu-pool', 'us-central1-a')}]",
                      "t3"))
    assert not placement(spec, pods=[_pod("m-1")], node_pools={}, events=events).exhausted
    # pods that fit no pool at all are not a capacity problem
    odd = [_ev("m-1", "NotTriggerScaleUp", "pod didn't trigger scale-up: 3 node(s) didn't match Pod's node "
               "affinity/selector", "t9")]
    assert not placement(spec, pods=[_pod("m-1")], node_pools={}, events=odd).exhausted


def test_each_option_is_priced_so_a_fallback_shows_its_surcharge():
    from manifests.prices import load_prices, option_rates

    spec = _spec(capacity=[L4_SPOT, L4_OD, {**L4_OD, "provisioning": "flex-start"}, A100_OD])
    rows = option_rates(load_prices(), spec)
    assert [r["usd_per_node_hour"] for r in rows] == [0.34, 0.85, 0.40, 3.67]
    assert [r["vs_first_pct"] for r in rows] == [0.0, 150.0, 17.6, 979.4]


def test_a_release_candidate_may_use_any_option_with_room():
    from manifests.capacity import OptionRoom, release_room

    spot = OptionRoom(0, "1× nvidia-l4 spot", max_nodes=4, nodes=1, quota_metric="PREEMPTIBLE_NVIDIA_L4_GPUS",
                      quota_free=0, gpus_per_node=1)  # a spot quota wall
    od = OptionRoom(1, "1× nvidia-l4 on-demand", max_nodes=4, nodes=0, quota_metric="NVIDIA_L4_GPUS",
                    quota_free=8, gpus_per_node=1)
    ok, detail, _ = release_room(live_replicas=1, candidate_replicas=1, options=[spot, od])
    assert ok and "[0] 0 (1/4 nodes, 0 PREEMPTIBLE_NVIDIA_L4_GPUS free)" in detail and "[1] 4" in detail
    short = OptionRoom(1, "1× nvidia-l4 on-demand", max_nodes=4, nodes=0, quota_metric="NVIDIA_L4_GPUS",
                       quota_free=1, gpus_per_node=1)
    ok, _, fix = release_room(live_replicas=1, candidate_replicas=2, options=[spot, short])
    assert not ok and "add a capacity option" in fix
    assert release_room(live_replicas=1, candidate_replicas=9, options=[spot], strategy="recreate")[0]


def test_a_node_is_told_to_its_option_by_its_pool_stem():
    from manifests.capacity import option_of_node

    spec = _spec()
    assert option_of_node(spec, "gke-llm-fleet-gpu-pool-0af51b58-1bcc") == 0
    assert option_of_node(spec, "gke-llm-fleet-gpu-pool-1-0af51b58-1bcc") == 1
    assert option_of_node(spec, "gke-llm-fleet-gpu-pool-2-9e3b1c2d-77aa") == 2
    assert option_of_node(spec, "gke-llm-fleet-default-pool-0af51b58-1bcc") is None


def test_pools_named_alike_are_told_apart_by_their_vm_base_names():
    from manifests.capacity import option_of_node

    spec = _spec(capacity=[{**L4_SPOT, "name": "g2-standard-8"}, {**L4_OD, "name": "g2-standard-8-od"}])
    a, b = "gke-llm-fleet-g2-standard-8-0af51b58", "gke-llm-fleet-g2-standard-8-9e3b1c2d"  # GKE cuts at 14 chars
    bases = {0: {a}, 1: {b}}
    assert option_of_node(spec, f"{a}-1bcc", bases) == 0 and option_of_node(spec, f"{b}-77aa", bases) == 1


def _placement(spec, served: int | None, refused: dict[int, list[str]] | None = None):
    from manifests.capacity import OptionOutcome, Placement

    return Placement([OptionOutcome(i, o.label(), spec.option_pool(i), served=int(i == served),
                                    refused=(refused or {}).get(i, [])) for i, o in enumerate(spec.capacity_options)])


def test_migrate_back_is_decided_from_the_cluster_alone():
    from manifests.capacity import migrate_back_decision

    spec = _spec()
    go = dict(parked=False, live="blue", live_replicas=1, other_replicas=0, live_matches_spec=True)
    d = migrate_back_decision(spec, placement=_placement(spec, 1), **go)
    assert d.migrate and d.serving_option == 1 and "option 1 (1× nvidia-l4 on-demand" in d.reason
    assert not migrate_back_decision(spec, placement=_placement(spec, 0), **go).migrate  # already first
    for over, why in [({"parked": True}, "parked"), ({"other_replicas": 1}, "other color is up"),
                      ({"live_matches_spec": False}, "release's change"), ({"live": None}, "no color serves")]:
        d = migrate_back_decision(spec, placement=_placement(spec, 2), **{**go, **over})
        assert not d.migrate and why in d.reason, (over, d.reason)
    two = _spec(replicas=2, on_spot_preemption="keep_serving")
    d = migrate_back_decision(two, placement=_placement(two, 1), **go)
    assert not d.migrate and "active migration" in d.reason  # GKE moves >= 2 replicas itself


def test_a_migration_candidate_must_land_on_a_better_option():
    from manifests.capacity import landed_better

    spec = _spec()
    assert landed_better(_placement(spec, 0), than=1)[0]
    ok, why = landed_better(_placement(spec, 1, {0: ["us-central1-a: GCE out of resources"]}), than=1)
    assert not ok and "no better than option 1" in why and "option 0: us-central1-a: GCE out of resources" in why
