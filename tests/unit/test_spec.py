"""The spec: bundled seeds load, bad input gets one clear error naming the field and the fix."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from manifests.spec import SpecError, check_fit, fit_fix, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = sorted((ROOT / "deployments").glob("*.yaml"))

BASE = {
    "name": "demo",
    "model": {"id": "google/gemma-2-2b-it"},
    "engine": {"kind": "vllm"},
    "cluster": {"project": "my-project", "location": "us-central1"},
    "accelerator": {"type": "nvidia-l4"},
}


def with_(path: str, value):
    data = copy.deepcopy(BASE)
    *parents, leaf = path.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return data


def test_every_seed_scenario_is_bundled():
    names = {p.name for p in BUNDLED}
    assert {"paligemma2-tgi-autopilot.yaml", "gemma2-2b-it-vllm-l4.yaml", "gemma-vertex.yaml",
            "llama2-7b-tgi-nginx.yaml", "mistral-7b-vllm-spot.yaml", "qwen2.5-7b-sglang.yaml"} <= names


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.name)
def test_bundled_specs_load(path):
    spec = load_spec(path)
    assert spec.name and spec.model.id


def test_smallest_spec_is_six_lines():
    text = (ROOT / "deployments/qwen2.5-7b-sglang.yaml").read_text()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(lines) <= 6
    spec = load_spec(ROOT / "deployments/qwen2.5-7b-sglang.yaml")
    assert spec.engine.kind == "sglang" and spec.accelerator.type == "nvidia-l4" and spec.replicas == 1


def test_seed_settings_carried():
    pali = load_spec(ROOT / "deployments/paligemma2-tgi-autopilot.yaml")
    assert pali.cluster.mode == "autopilot" and pali.cluster.release_channel == "stable"
    assert pali.model.is_vision and pali.engine.kind == "tgi"
    gemma = load_spec(ROOT / "deployments/gemma2-2b-it-vllm-l4.yaml")
    assert gemma.cluster.release_channel == "rapid" and gemma.accelerator.machine == "g2-standard-8"
    assert gemma.secret.key == "hf_api_token"
    mistral = load_spec(ROOT / "deployments/mistral-7b-vllm-spot.yaml")
    assert mistral.accelerator.spot and mistral.cluster.zones == ["us-central1-a", "us-central1-b"]
    assert mistral.accelerator.pool.min_nodes == 0 and mistral.accelerator.pool.max_nodes == 2
    llama = load_spec(ROOT / "deployments/llama2-7b-tgi-nginx.yaml")
    assert llama.autoscaling and llama.autoscaling.max_replicas == 10
    assert llama.expose.ingress and llama.expose.ingress.rate_limit_rps == 10
    vertex = load_spec(ROOT / "deployments/gemma-vertex.yaml")
    assert vertex.target == "vertex" and vertex.vertex and vertex.vertex.accelerator_type == "NVIDIA_L4"


# (data, field named in the error, words the fix must contain)
BAD = [
    (with_("accelerator.type", "nvidia-l5"), "accelerator.type", "nvidia-l4"),
    (with_("engine.tensor_parallel", 2), "engine.tensor_parallel", "accelerator.count"),
    ({**with_("model.task", "image-text-to-text"), "model": {"id": "google/paligemma2-3b-pt-224",
      "task": "image-text-to-text"}, "engine": {"kind": "sglang"}}, "engine.kind", "tgi"),
    (with_("schedule", {"park": "every evening", "wake": "0 8 * * *"}), "schedule.park", "five fields"),
    (with_("schedule", {"park": "0 20 * * *"}), "schedule.wake", "wake"),
    (with_("schedule", {"timezone": "Mars/Olympus", "idle_after": "30m"}), "schedule.timezone", "IANA"),
    (with_("expose.ingress", {"class": "nginx", "tls_secret": "tls"}), "expose.ingress.host", "host"),
    (with_("expose.ingress", {"class": "gce", "rate_limit_rps": 5}), "expose.ingress.rate_limit_rps", "nginx"),
    (with_("expose.ingress", {"class": "nginx", "static_ip_name": "ip"}), "expose.ingress.static_ip_name", "gce"),
    (with_("expose.ingress", {"class": "gce", "static_ip_name": "My IP"}), "expose.ingress.static_ip_name",
     "addresses create"),
    (with_("expose.ingress", {"class": "nginx", "host": "a.b", "cluster_issuer": "le"}),
     "expose.ingress.tls_secret", "tls_secret"),
    (with_("expose.ingress", {"class": "traefik"}), "expose.ingress.class", "gce"),
    (with_("expose.ingress", {"class": "gce", "auth_secret": "users"}), "expose.ingress.auth_secret", "nginx"),
    (with_("engine.kind", "ollama"), "engine.kind", "vllm"),
    (with_("engine.tensor_paralel", 1), "engine.tensor_paralel", "tensor_parallel"),
    (with_("replica", 2), "replica", "replicas"),
    (with_("name", "My_Model"), "name", "DNS label"),
    ({k: v for k, v in BASE.items() if k != "cluster"}, "cluster", "add it"),
    (with_("cluster.location", "Iowa"), "cluster.location", "region"),
    (with_("cluster.project", "x"), "cluster.project", "project id"),
    (with_("cluster.zones", ["europe-west1-b"]), "cluster.zones[0]", "us-central1-a"),
    (with_("accelerator.count", 3), "accelerator.count", "machine_type"),
    (with_("accelerator.pool", {"min_nodes": 3, "max_nodes": 2}), "accelerator.pool.min_nodes", "max_nodes"),
    (with_("accelerator.pool", {"initial_nodes": 5, "max_nodes": 2}), "accelerator.pool.initial_nodes", "between"),
    (with_("replicas", 5), "replicas", "max_nodes"),
    (with_("autoscaling", {"min_replicas": 4, "max_replicas": 2}), "autoscaling.min_replicas", "max_replicas"),
    (with_("autoscaling", {"max_replicas": 8}), "autoscaling.max_replicas", "max_nodes"),
    (with_("target", "vertex"), "vertex", "endpoint_display_name"),
    (with_("cache.size", "a lot"), "cache.size", "pattern"),
    (with_("release.expect", "(unclosed"), "release.expect", "regular expression"),
    (with_("gcp_service_account", "sa@p.iam.gserviceaccount.com"), "service_account", "service_account"),
    (with_("engine.dtype", "fp4"), "engine.dtype", "bfloat16"),
    (with_("model.id", "gemma"), "model.id", "repo id"),
    ({**BASE, "cluster": {"project": "my-project", "location": "us-central1-a", "failover_regions": ["us-east1"]}},
     "cluster.failover_regions", "region"),
]


@pytest.mark.parametrize(("data", "field", "fix"), BAD, ids=[b[1] for b in BAD])
def test_bad_spec_gives_one_clear_error(data, field, fix):
    with pytest.raises(SpecError) as info:
        parse_spec(data, source="spec.yaml")
    err = info.value
    assert err.field == field, str(err)
    text = str(err)
    assert text.startswith(f"spec.yaml: {field}: ")
    assert fix.lower() in text.lower()
    assert "Traceback" not in text and "pydantic" not in text.lower() and "\n" not in text


def test_at_least_twenty_bad_cases():
    assert len(BAD) >= 20


def test_yaml_syntax_and_missing_file_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n  model: [\n")
    with pytest.raises(SpecError, match=r"bad.yaml: \(yaml\): not valid YAML at line"):
        load_spec(bad)
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "nope.yaml")


def test_shorthands_and_durations():
    spec = parse_spec({**BASE, "model": "Qwen/Qwen2.5-7B-Instruct", "engine": "tgi", "accelerator": "nvidia-tesla-t4",
                       "schedule": {"idle_after": "30m"}, "release": {"scale_down_delay": 90}})
    assert spec.model.id == "Qwen/Qwen2.5-7B-Instruct" and spec.engine.kind == "tgi"
    assert spec.accelerator.machine == "n1-standard-8"
    assert spec.schedule.idle_after.total_seconds() == 1800
    assert spec.release.scale_down_delay.total_seconds() == 90


@pytest.mark.parametrize(("params", "fmt", "count", "fits"), [
    (2_614_341_888, "auto", 1, True),        # gemma-2-2b on one L4
    (7_241_732_096, "auto", 1, True),        # mistral 7B fp16: 13.5 GiB weights, ~17 GiB needed
    (70_553_706_496, "auto", 1, False),      # llama 70B: 131 GiB
    (70_553_706_496, "awq", 4, True),        # 4-bit on 4 L4
    (13_015_864_320, "auto", 1, False),      # 13B fp16 does not fit 24 GiB
])
def test_fit_check(params, fmt, count, fits):
    engine = {"kind": "vllm", "tensor_parallel": count} | ({"quantization": fmt} if fmt != "auto" else {})
    spec = parse_spec({**BASE, "engine": engine, "accelerator": {"type": "nvidia-l4", "count": count,
                                                                  "pool": {"max_nodes": 2}}})
    report = check_fit(spec, params)
    assert report.fits is fits
    if not fits:
        assert "GiB" in report.message(spec)
        assert "accelerator" in fit_fix(spec, report) or "quantiz" in fit_fix(spec, report)


def test_validate_cli_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "llm_fleet.cli", "validate", *map(str, BUNDLED)],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_("engine.tensor_parallel", 4)))
    res = subprocess.run([sys.executable, "-m", "llm_fleet.cli", "validate", str(bad)],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 1
    assert "engine.tensor_parallel" in res.stderr and "Traceback" not in res.stderr


def test_gke_flows_refuse_vertex_specs_clearly():
    from manifests.spec import resolve_gke_spec

    with pytest.raises(SpecError, match="target: .*target: vertex runs through deploy_model"):
        resolve_gke_spec(ROOT / "deployments/gemma-vertex.yaml", flow="deploy_model")
    assert resolve_gke_spec(ROOT / "deployments/gemma2-2b-it-vllm-l4.yaml", flow="x").target == "gke"


def test_the_load_timeout_waited_for_is_the_specs_on_the_sandbox_clock_and_never_under_the_floor():
    """One rule for both targets' waits (tasks.settings.Settings.load_timeout_s): the spec's timeout (its own, or
    the one derived from the model's size) times the sandbox's time scale, at least the floor."""
    from datetime import timedelta

    from tasks.settings import Settings

    gke = load_spec(ROOT / "deployments" / "gemma2-2b-it-vllm-l4.yaml")
    derived = gke.default_load_timeout(2_610_000_000)  # 600 s + 60 s per billion parameters
    assert derived == timedelta(seconds=600 + 60 * 2.61)
    assert Settings(time_scale=1.0).load_timeout_s(derived) == derived.total_seconds()  # GCP: as the spec says
    assert Settings(time_scale=0.002, min_load_timeout_s=10).load_timeout_s(derived) == 10  # scaled 1.5 s: floor
    assert Settings(time_scale=0.002, min_load_timeout_s=10).load_timeout_s(timedelta(hours=8)) == 57.6
