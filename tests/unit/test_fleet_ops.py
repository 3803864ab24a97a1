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
