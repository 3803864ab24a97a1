"""A spot model keeps serving through a preemption (issue 19's campaign, I3): one replica on spot is refused
at validate time unless the spec accepts the gap; two or more are spread over zones under a PDB."""

from __future__ import annotations

import pytest

from manifests.render import model_budget, model_deployment, render
from manifests.spec import SpecError, parse_spec


def _data(**over) -> dict:
    data = {"name": "g2b", "model": "google/gemma-2-2b-it", "namespace": "llm",
            "cluster": {"project": "llm-fleet-demo", "location": "us-central1", "zones": ["us-central1-a", "us-central1-b"]},
            "accelerator": {"type": "nvidia-l4", "spot": True, "pool": {"max_nodes": 4}}}
    data.update(over)
    return data


@pytest.mark.parametrize(("over", "field", "where"), [
    ({}, "replicas", "accelerator.spot"),
    ({"autoscaling": {"min_replicas": 1, "max_replicas": 4}}, "autoscaling.min_replicas", "accelerator.spot"),
    ({"accelerator": {"pool": {"max_nodes": 4}}, "capacity": [
        {"gpu": "nvidia-l4", "provisioning": "on-demand"}, {"gpu": "nvidia-l4", "provisioning": "spot"}]},
     "replicas", "capacity[1]"),
])
def test_one_spot_replica_is_refused_naming_the_field_and_the_fix(over, field, where):
    with pytest.raises(SpecError) as err:
        parse_spec(_data(**over))
    text = str(err.value)
    assert text.startswith(f"{field}: 1 replica on spot capacity ({where})")
    assert f"set {field}: 2" in text and "on_spot_preemption: accept_gap" in text


def test_the_gap_can_be_accepted_and_on_demand_is_not_concerned():
    spec = parse_spec(_data(on_spot_preemption="accept_gap"))
    assert not spec.keeps_serving_through_preemption and model_budget(spec) is None
    assert "topologySpreadConstraints" not in model_deployment(spec, "blue")["spec"]["template"]["spec"]
    parse_spec(_data(accelerator={"type": "nvidia-l4"}))  # on demand, one replica: as before
    parse_spec(_data(replicas=0))  # nothing served yet: nothing to lose
    with pytest.raises(SpecError) as err:
        parse_spec(_data(on_spot_preemption="sometimes"))
    assert str(err.value).startswith("on_spot_preemption:")


def test_two_spot_replicas_are_spread_over_zones_under_a_budget():
    spec = parse_spec(_data(replicas=2))
    assert spec.keeps_serving_through_preemption
    pod = model_deployment(spec, "green")["spec"]["template"]["spec"]
    assert pod["topologySpreadConstraints"] == [
        {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway",
         "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "g2b", "llm-fleet.dev/color": "green"}}}]
    pdb = model_budget(spec)
    assert pdb is not None and pdb["spec"]["maxUnavailable"] == 1
    assert pdb in render(spec, color="blue")
