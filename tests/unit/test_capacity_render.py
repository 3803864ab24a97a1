"""Capacity options rendered (issue 23): the ComputeClass, the pods that select it, Autopilot, seed 004."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from manifests import names
from manifests.render import compute_class, model_deployment, render
from manifests.spec import parse_spec
from tests.unit.test_capacity import L4_OD, _base, _spec

SEED_004 = Path(__file__).parents[2] / "deployments" / "mistral-7b-vllm-spot.yaml"


def test_single_accelerator_is_a_one_option_list():
    data = _base()
    del data["capacity"]
    data["accelerator"] = {"type": "nvidia-l4", "spot": True}
    spec = parse_spec(data)
    (only,) = spec.capacity_options
    assert (only.gpu, only.count, only.provisioning, only.machine) == ("nvidia-l4", 1, "spot", "g2-standard-8")
    assert spec.option_pool(0) == "gpu-pool"
    # today's pods are placed exactly as before: no ComputeClass
    assert compute_class(spec) is None
    sel = model_deployment(spec, "blue")["spec"]["template"]["spec"]["nodeSelector"]
    assert sel["cloud.google.com/gke-nodepool"] == "gpu-pool" and names.COMPUTE_CLASS_LABEL not in sel


def test_compute_class_rendered_the_gke_way_and_pods_select_it():
    spec = _spec()
    objs = render(spec)
    (cc,) = [o for o in objs if o["kind"] == "ComputeClass"]
    assert cc["apiVersion"] == "cloud.google.com/v1" and cc["metadata"]["name"] == "m7b-vllm"
    assert "namespace" not in cc["metadata"]
    # one replica: no active migration (it would restart the only replica); no budget either
    assert cc["spec"]["activeMigration"] == {"optimizeRulePriority": False}
    assert not [o for o in objs if o["kind"] == "PodDisruptionBudget" and o["metadata"]["name"] == "m7b-model"]
    assert cc["spec"]["nodePoolAutoCreation"] == {"enabled": False}
    assert cc["spec"]["whenUnsatisfiable"] == "DoNotScaleUp"
    assert cc["spec"]["priorities"] == [
        {"machineType": "g2-standard-8", "gpu": {"type": "nvidia-l4", "count": 1, "driverVersion": "latest"},
         "spot": True, "location": {"zones": ["us-central1-a", "us-central1-b"]}},
        {"machineType": "g2-standard-8", "gpu": {"type": "nvidia-l4", "count": 1, "driverVersion": "latest"},
         "location": {"zones": ["us-central1-a", "us-central1-b"]}},
        {"machineType": "a2-highgpu-1g", "gpu": {"type": "nvidia-tesla-a100", "count": 1, "driverVersion": "latest"},
         "location": {"zones": ["us-central1-b"]}},
    ]
    pod = model_deployment(spec, "blue")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {names.COMPUTE_CLASS_LABEL: "m7b-vllm"}
    assert {"key": names.COMPUTE_CLASS_LABEL, "operator": "Equal", "value": "m7b-vllm",
            "effect": "NoSchedule"} in pod["tolerations"]
    # sized to fit the smallest option's machine (g2-standard-8), not only the first
    assert pod["containers"][0]["resources"]["requests"]["cpu"] == "6.5"
    # the operator may apply (and delete) this class and no other
    role = next(o for o in objs if o["kind"] == "ClusterRole")
    assert {"apiGroups": ["cloud.google.com"], "resources": ["computeclasses"],
            "resourceNames": ["m7b-vllm"], "verbs": ["get", "patch", "delete"]} in role["rules"]


def test_flex_start_and_reservation_priorities():
    spec = _spec(capacity=[{**L4_OD, "provisioning": "reservation", "reservation": "l4-res"},
                           {**L4_OD, "provisioning": "flex-start"}])
    first, second = compute_class(spec)["spec"]["priorities"]
    assert first["reservations"] == {"affinity": "Specific",
                                     "specific": [{"name": "l4-res", "project": "llm-fleet-demo"}]}
    assert second["flexStart"] == {"enabled": True} and "spot" not in second
    assert spec.capacity_options[1].quota_metric == "PREEMPTIBLE_NVIDIA_L4_GPUS"


def test_autopilot_gets_the_class_alone():
    data = _base()
    data["cluster"] = {**data["cluster"], "mode": "autopilot"}
    spec = parse_spec(data)
    cc = compute_class(spec)
    assert cc["spec"]["nodePoolAutoCreation"] == {"enabled": True}
    pod = model_deployment(spec, "blue")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {names.COMPUTE_CLASS_LABEL: "m7b-vllm"} and "tolerations" not in pod


def test_seed_004_bundles_a_capacity_list_with_an_on_demand_fallback():
    spec = parse_spec(yaml.safe_load(SEED_004.read_text()))
    provs = [o.provisioning for o in spec.capacity_options]
    assert provs[0] == "spot" and "on-demand" in provs[1:]
    assert compute_class(spec) is not None


def test_unchanged_single_accelerator_specs_render_no_class():
    for path in (Path(__file__).parents[2] / "deployments").glob("*.yaml"):
        data = yaml.safe_load(path.read_text())
        if data.get("capacity") or data.get("target") == "vertex":
            continue
        spec = parse_spec(copy.deepcopy(data))
        assert compute_class(spec) is None, path



def test_two_replicas_migrate_back_one_at_a_time():
    spec = _spec(replicas=2)
    objs = render(spec)
    (cc,) = [o for o in objs if o["kind"] == "ComputeClass"]
    assert cc["spec"]["activeMigration"] == {"optimizeRulePriority": True}
    (pdb,) = [o for o in objs if o["kind"] == "PodDisruptionBudget" and o["metadata"]["name"] == "m7b-model"]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/instance": "m7b",
                                                      "app.kubernetes.io/component": "model-server"}
