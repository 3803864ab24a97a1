"""The Vertex AI target's pure core (manifests/vertex.py): no I/O."""

from __future__ import annotations

from pathlib import Path

import pytest

from manifests import vertex as vx
from manifests.errors import PreflightError
from manifests.spec import check_fit, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def spec():
    return load_spec(ROOT / "deployments/gemma-vertex.yaml")


def _with(spec, **vertex):
    data = spec.model_dump(mode="json", by_alias=True)
    data["vertex"].update(vertex)
    return parse_spec(data)


@pytest.mark.parametrize(("acc", "metric", "quota_id"), [
    ("NVIDIA_L4", "custom_model_serving_nvidia_l4_gpus", "CustomModelServingL4GPUsPerProjectPerRegion"),
    ("NVIDIA_TESLA_T4", "custom_model_serving_nvidia_t4_gpus", "CustomModelServingT4GPUsPerProjectPerRegion"),
    ("NVIDIA_TESLA_A100", "custom_model_serving_nvidia_a100_gpus", "CustomModelServingA100GPUsPerProjectPerRegion"),
    ("NVIDIA_H100_80GB", "custom_model_serving_nvidia_h100_gpus", "CustomModelServingH100GPUsPerProjectPerRegion"),
])
def test_quota_names_are_vertex_serving_ones(spec, acc, metric, quota_id):
    s = _with(spec, accelerator_type=acc)
    assert (vx.quota_metric(s), vx.quota_id(s)) == (metric, quota_id)


def test_quota_check_names_metric_region_and_fix(spec):
    vx.check_quota(spec, limit=2, used=1, adding=1)
    with pytest.raises(PreflightError) as err:
        vx.check_quota(spec, limit=1, used=1, adding=1)
    assert "custom_model_serving_nvidia_l4_gpus in us-central1: 1 of 1" in str(err.value)
    assert "request more" in err.value.fix


def test_deployed_gpus_counts_min_replicas_of_the_accelerator():
    eps = [{"deployedModels": [
        {"dedicatedResources": {"machineSpec": {"acceleratorType": "NVIDIA_L4", "acceleratorCount": 2},
                                "minReplicaCount": 3}},
        {"dedicatedResources": {"machineSpec": {"acceleratorType": "NVIDIA_TESLA_T4", "acceleratorCount": 1},
                                "minReplicaCount": 1}}]}, {"deployedModels": []}]
    assert vx.deployed_gpus(eps, "NVIDIA_L4") == 6 and vx.deployed_gpus(eps, "NVIDIA_TESLA_T4") == 1


def test_labels_are_valid_vertex_labels(spec):
    labels = vx.model_labels(spec, "3a3400bfc195" * 3)
    assert labels["hf-model"] == "google_gemma-2-9b-it"
    assert all(len(v) <= 63 and v == v.lower() for v in labels.values())
    assert vx.label_filter({"b": "2", "a": "1"}, "ep") == 'display_name="ep" AND labels.a="1" AND labels.b="2"'


def test_model_garden_container_and_token(spec):
    body = vx.model_body(spec, revision="abc123", hf_token="hf_secret")
    cs = body["container_spec"]
    assert cs["command"] == ["python", "-m", "vllm.entrypoints.api_server"]
    assert "--model=google/gemma-2-9b-it" in cs["args"] and "--revision=abc123" in cs["args"]
    assert (cs["predict_route"], cs["health_route"], cs["ports"]) == ("/generate", "/ping", [{"container_port": 8080}])
    assert {"name": "HF_TOKEN", "value": "hf_secret"} in cs["env"]
    assert not any(e["name"] == "HF_TOKEN" for e in vx.container_spec(spec, revision="x", hf_token=None)["env"])


def test_fit_uses_the_vertex_machines_gpus(spec):
    params = 9_241_705_984  # gemma-2-9b-it
    assert check_fit(vx.fit_spec(spec), params).fits
    assert not check_fit(vx.fit_spec(_with(spec, accelerator_type="NVIDIA_TESLA_T4", machine_type="n1-standard-8")),
                         params).fits


def test_release_splits():
    assert vx.zero_split({"111": 100}) == {"111": 100, "0": 0}
    assert vx.promote_split("222") == {"222": 100}
