"""Pure parts of fleet operations: usage ledger and spans, prices, fleet files, incidents."""

from __future__ import annotations

import pytest

from manifests import usage as U


def test_ledger_records_first_creation_last_sighting_and_first_miss():
    led = U.observe({}, [{"name": "a", "created": 100.0, "gpus": 1}], now=110.0)
    led = U.observe(led, [{"name": "a", "created": 100.0, "gpus": 1}, {"name": "b", "created": 115.0, "gpus": 2}],
                    now=120.0)
    led = U.observe(led, [{"name": "b", "created": 115.0, "gpus": 2}], now=130.0)
    assert led["nodes"]["a"] == [100.0, 120.0, 130.0, 1]
    assert led["nodes"]["b"] == [115.0, 130.0, None, 2]
    assert list(U.prune(led, before=131.0)["nodes"]) == ["b"]


def test_operation_times_refine_whole_second_timestamps():
    led = {"nodes": {"a": [100.0, 120.0, 130.0, 1], "b": [200.0, 210.0, None, 1]}}
    ops = [U.Op("SET_NODE_POOL_SIZE", 99.0, 100.73), U.Op("UPDATE_CLUSTER", 121.0, 122.0),  # min→0 removes nothing
           U.Op("SET_NODE_POOL_SIZE", 124.0, 125.25), U.Op("SET_NODE_POOL_SIZE", 199.0, 201.1)]
    spans = {s.name: s for s in U.spans(led, ops, now=300.0)}
    assert (spans["a"].start, spans["a"].end) == (100.73, 125.25)
    assert (spans["b"].start, spans["b"].end) == (201.1, None)
    assert U.gpu_seconds(list(spans.values()), 0, 300) == pytest.approx(24.52 + 98.9)
    assert U.zero_seconds(list(spans.values()), 0, 300, since=100.73) == pytest.approx(201.1 - 125.25)


def test_without_an_operation_a_node_ends_between_sighting_and_miss():
    spans = U.spans({"nodes": {"a": [100.0, 120.0, 130.0, 1]}}, [], now=200.0)
    assert (spans[0].start, spans[0].end) == (100.5, 125.0)


def test_rfc3339_with_nanoseconds_and_sparkline():
    assert U.ts("2026-12-01T00:00:01.123456789Z") == pytest.approx(U.ts("2026-12-01T00:00:00Z") + 1.123456)
    line = U.sparkline([U.NodeSpan("a", 1, 0, 12), U.NodeSpan("b", 1, 6, None)], 0, 24)
    assert len(line) == 24 and line == "▅" * 6 + "█" * 6 + "▅" * 12


def test_rfc3339_with_an_offset_as_gce_writes_it():
    assert U.ts("2026-12-05T16:00:01.250-08:00") == U.ts("2026-12-06T00:00:01.25Z")


def test_vm_operations_count_nodes_no_sighting_saw():
    """The ledger saw only the node of the wake (b); the VMs' own operations also give the node parked away (a),
    exactly, and the ledger still covers what GCE no longer lists (c)."""
    led = {"nodes": {"b": [150.0, 160.0, None, 1], "c": [10.0, 20.0, 30.0, 1]}}
    vm = [U.VmOp("a", "insert", 40.25), U.VmOp("a", "delete", 100.5), U.VmOp("b", "insert", 150.75)]
    spans = {s.name: s for s in U.node_spans(led, [], vm, gpus=1, now=200.0)}
    assert (spans["a"].start, spans["a"].end) == (40.25, 100.5) and spans["b"].start == 150.75
    assert spans["c"].end == 25.0  # halfway between last sighting and miss
    assert U.gpu_seconds(list(spans.values()), 0, 200) == pytest.approx(14.5 + 60.25 + 49.25)
    # a delete whose insert aged out takes its start from the ledger, or is left out
    gone = U.node_spans({"nodes": {"d": [5.0, 6.0, None, 2]}}, [], [U.VmOp("d", "delete", 9.0),
                                                                     U.VmOp("e", "delete", 9.0)], gpus=1, now=10.0)
    assert [(s.name, s.gpus, s.start, s.end) for s in gone] == [("d", 2, 5.5, 9.0)]


def test_usage_row_never_negative_and_windows_as_datetimes():
    from datetime import UTC, date, datetime

    # a release surge (two nodes for a while) is no negative saving: always-on would have surged too
    spans = [U.NodeSpan("a", 1, 0, 100), U.NodeSpan("b", 1, 50, 160), U.NodeSpan("c", 1, 220, None)]
    row = U.usage_row(model="m", accelerator="1x nvidia-l4", spans=spans, lo=0, hi=240, share=1, replicas=1,
                      gpus_per_replica=1, usd_per_gpu_hour=0.85)
    assert row["parked_hours"] == pytest.approx(60 / 3600, abs=1e-6) and row["parked"] == "60 s"
    assert row["saving"] == pytest.approx(60 / 3600 * 0.85, abs=1e-4) and row["saving_pct"] == pytest.approx(
        100 * 60 / (230 + 60), abs=0.1)
    idle = U.usage_row(model="m", accelerator="x", spans=[U.NodeSpan("a", 1, 0, 1e-9)], lo=0, hi=1e-9, share=1,
                       replicas=1, gpus_per_replica=1, usd_per_gpu_hour=0.85)
    assert all(str(v) != "-0.0" for v in idle.values()) and idle["saving"] >= 0
    assert U.report_window(None, datetime(2026, 12, 6, 1, 0), "2026-12-06T01:02:00Z", now=0) == (
        datetime(2026, 12, 6, 1, 0, tzinfo=UTC).timestamp(), datetime(2026, 12, 6, 1, 2, tzinfo=UTC).timestamp())
    assert U.report_window(date(2026, 12, 5), None, None, now=0)[1] - U.report_window(
        "2026-12-05", None, None, now=0)[0] == 86400
    assert U.report_window(None, 100.0, "160.5", now=0) == (100.0, 160.5)
    assert U.human_duration(42) == "42 s" and U.human_duration(720) == "12 min" and U.human_duration(3.4 * 3600) == \
        "3.4 h"


def test_prices_bundled_and_overridden(tmp_path, monkeypatch):
    from manifests.prices import load_prices
    from manifests.spec import SpecError

    p = load_prices()
    assert p.node_hour(accelerator="nvidia-l4", gpus=1, machine="g2-standard-8", spot=False) == 0.85
    assert p.node_hour(accelerator="nvidia-h100-80gb", gpus=2, machine=None, spot=True) == pytest.approx(8.84)
    own = tmp_path / "prices.yaml"
    own.write_text("gpus: {nvidia-l4: {on_demand: 0.5, spot: 0.2}}\nmachines: {g2-standard-8: {on_demand: 0.7, spot: 0.3}}\n")
    monkeypatch.setenv("LLM_FLEET_PRICES", str(own))
    q = load_prices()
    assert q.machines["g2-standard-8"].on_demand == 0.7 and q.gpus["nvidia-a100-80gb"].on_demand == 3.93
    own.write_text("gpus: {nvidia-l4: {on_demand: -1, spot: 0.2}}\n")
    with pytest.raises(SpecError, match="gpus.nvidia-l4"):
        load_prices()


def test_fleet_file_and_spec_picker(tmp_path):
    import typing

    from manifests.fleet import SpecPath, bundled_specs, load_fleet
    from manifests.spec import SpecError

    assert "deployments/qwen2.5-7b-sglang.yaml" in typing.get_args(SpecPath) == tuple(bundled_specs())
    assert [p.name for p in load_fleet("deployments/fleets/demo.yaml")][:2] == ["gemma2-2b-it-vllm-l4.yaml",
                                                                                "qwen2.5-7b-sglang.yaml"]
    bad = tmp_path / "f.yaml"
    bad.write_text("specs: [nope.yaml]\n")
    with pytest.raises(SpecError, match=r"specs\[0\]: nope.yaml does not exist"):
        load_fleet(bad)


def test_incident_opens_updates_and_resolves_once():
    from flows.check_fleet import Check, incident_step

    sick, well = Check("m", status="unhealthy", problems=["CrashLoopBackOff"]), Check("m")
    action, state = incident_step(None, well, 0)
    assert (action, state) == ("none", None)
    action, state = incident_step(None, sick, 1)
    assert action == "open" and state["checks"] == 1
    action, state = incident_step(state, sick, 2)
    assert action == "update" and state["checks"] == 2 and state["started"] == 1
    assert incident_step(state, well, 3) == ("resolve", None)
