"""gpu_report against the sandbox: a stretch with a park and a wake gives the GPU-hours the sandbox metered."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from tests.flows.conftest import spec_dict

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.timeout(300)]


def test_gpu_hours_match_the_sandbox_meter_across_a_park_and_a_wake(sandbox, sbc):
    from flows.deploy_model import deploy_model
    from flows.gpu_report import gpu_report
    from flows.park import park_model, wake_model
    from flows.provision_cluster import provision_cluster

    # min_nodes 1: on the sandbox's compressed clock the cluster autoscaler's 10 idle minutes are 1.2 s,
    # so it would race park for the empty node; on GKE park's resize comes first.
    spec = spec_dict("gemma2-2b-it-vllm-l4.yaml", hold={"enabled": False})
    spec["accelerator"]["pool"]["min_nodes"] = 1
    c = spec["cluster"]
    provision_cluster(spec=spec)
    deploy_model(spec=spec)
    # No flow sights the nodes before the report (no check_fleet): each node's VM operations time it.
    start = time.time()
    time.sleep(2)
    # ... and once park lowered the minimum, its resize still has to come before the autoscaler's
    # (1.2 s after the last pod went; park first reads who else needs the pool): off while parking.
    sandbox.gke.autoscaler.enabled = False
    try:
        park_model(spec=spec)
    finally:
        sandbox.gke.autoscaler.enabled = True
    time.sleep(2)
    wake_model(spec=spec)
    time.sleep(2)
    end = time.time()
    out = gpu_report(specs=[spec], start=datetime.fromtimestamp(start, UTC), end=datetime.fromtimestamp(end, UTC))

    meter = [r for r in sbc.accounting(cluster=f"{c['project']}/{c['location']}/{c['name']}", kind="node")
             if r["labels"].get("cloud.google.com/gke-nodepool") == spec["accelerator"]["pool"]["name"]]
    assert len(meter) >= 2, meter  # the node parked away and the one the wake brought
    metered = sum(r["gpus"] * max(0.0, min(end, r["end"] or end) - max(start, r["start"])) for r in meter) / 3600
    row = out["models"][0]
    assert row["model"] == spec["name"]
    why = {"report": out["nodes"], "meter": [(r["name"], r["start"], r["end"]) for r in meter], "window": (start, end)}
    assert row["gpu_hours"] == pytest.approx(metered, rel=0.01), why
    # Parked for the time no node existed; always-on would have held the GPU the whole stretch.
    gap = [(a["end"], b["start"]) for a in meter for b in meter if a["end"] and b["start"] > a["end"]]
    parked = min(b - a for a, b in gap) / 3600
    assert row["parked_hours"] == pytest.approx(parked, rel=0.05, abs=2e-5)
    assert row["always_on_gpu_hours"] == pytest.approx((end - start) / 3600, rel=0.01)
    assert 0 < row["saving"] < row["always_on_cost"] and row["usd_per_gpu_hour"] == pytest.approx(0.85)
    assert row["saving_pct"] > 0 and row["parked"].endswith(" s")  # a few seconds, not "0.0 h"
    head = [m for m in sbc.slack_messages() if "gpu_report" in (m.get("text") or "")]
    assert head and spec["name"] in head[-1]["text"]
    # the wake just measured, on the cloud clock: p50/p95 per model in the table and in Slack
    assert row["wakes"] >= 1 and 0 < row["wake_p50_s"] <= row["wake_p95_s"]
    assert "wake p50" in head[-1]["text"]
