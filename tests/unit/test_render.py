"""Rendering: every built-in object passes kubernetes-validate and carries the seeds' essentials."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from manifests import names
from manifests.render import model_deployment, render, spec_hash
from manifests.spec import SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[2]
GKE_SPECS = [p for p in sorted((ROOT / "deployments").glob("*.yaml")) if load_spec(p).target == "gke"]
K8S_VERSION = "1.33.0"
CRD_GROUPS = ("cloud.google.com/", "monitoring.googleapis.com/", "monitoring.coreos.com/")


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def model_deployments(objs):
    """The model's Deployment(s): not the playground's (expose.playground, on in seed 004)."""
    return [d for d in by_kind(objs, "Deployment")
            if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "model-server"]


def container(objs):
    (dep,) = model_deployments(objs)
    return dep, dep["spec"]["template"]["spec"], dep["spec"]["template"]["spec"]["containers"][0]


def env_of(c):
    return {e["name"]: e for e in c["env"]}


@pytest.mark.parametrize("path", GKE_SPECS, ids=lambda p: p.name)
@pytest.mark.parametrize("color", ["blue", "green"])
def test_rendered_objects_pass_kubernetes_validate(path, color):
    objs = render(load_spec(path), color=color)
    checked = 0
    for obj in objs:
        if obj["apiVersion"].startswith(CRD_GROUPS):
            continue  # CRDs: no upstream schema offline
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        checked += 1
    assert checked >= 7
    # The token is referenced, never rendered.
    assert not by_kind(objs, "Secret")
    text = yaml.safe_dump_all(objs)
    assert "hf_sandbox" not in text


@pytest.mark.parametrize("path", GKE_SPECS, ids=lambda p: p.name)
def test_common_shape(path):
    spec = load_spec(path)
    objs = render(spec, color="green", revision="abc123")
    dep, pod, c = container(objs)
    assert dep["metadata"]["name"] == f"{spec.name}-green"
    assert dep["spec"]["selector"]["matchLabels"] == names.selector(spec, "green")
    tmpl_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert names.selector(spec, "green").items() <= tmpl_labels.items()
    live, preview = [o for o in by_kind(objs, "Service") if o["metadata"]["name"] in (
        names.service(spec), names.preview_service(spec))]
    assert live["spec"]["selector"] == preview["spec"]["selector"] == names.selector(spec, "green")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == str(spec.accelerator.count)
    assert "startupProbe" in c and c["livenessProbe"].get("initialDelaySeconds", 0) == 0
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 600
    secret_env = env_of(c)[spec.secret.env]["valueFrom"]["secretKeyRef"]
    assert secret_env == {"name": spec.secret.name, "key": spec.secret.key}
    assert dep["metadata"]["annotations"][names.REVISION_ANNOTATION] == "abc123"
    for obj in objs:
        labels = obj["metadata"].get("labels", {})
        if obj["kind"] != "Namespace":
            assert labels["app.kubernetes.io/instance"] == spec.name, obj["kind"]


def test_seed_000_paligemma_autopilot():
    objs = render(load_spec(ROOT / "deployments/paligemma2-tgi-autopilot.yaml"))
    dep, pod, c = container(objs)
    assert c["image"].endswith("huggingface-text-generation-inference-gpu.3.0.1")
    env = env_of(c)
    assert env["MODEL_ID"]["value"] == "google/paligemma2-3b-pt-224"
    assert env["NUM_SHARD"]["value"] == "1" and env["PORT"]["value"] == "8080"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-secret", "key": "hf_token"}
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert "tolerations" not in pod  # Autopilot adds them itself
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}} in pod["volumes"]
    assert c["ports"][0]["containerPort"] == 8080
    (ing,) = by_kind(objs, "Ingress")
    assert ing["metadata"]["annotations"]["kubernetes.io/ingress.class"] == "gce"
    assert not by_kind(objs, "PersistentVolumeClaim")


def test_seed_001_gemma_vllm_standard():
    objs = render(load_spec(ROOT / "deployments/gemma2-2b-it-vllm-l4.yaml"))
    dep, pod, c = container(objs)
    assert c["image"].startswith("vllm/vllm-openai")
    assert "--model=google/gemma-2-2b-it" in c["args"] and "--tensor-parallel-size=1" in c["args"]
    assert env_of(c)["HUGGING_FACE_HUB_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-secret",
                                                                                 "key": "hf_api_token"}
    assert pod["nodeSelector"]["cloud.google.com/gke-nodepool"] == "gpupool"
    assert pod["nodeSelector"]["cloud.google.com/gke-accelerator"] == "nvidia-l4"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    (svc, _) = by_kind(objs, "Service")
    assert svc["spec"]["ports"][0]["port"] == 8000


def test_seed_003_llama_tgi_cache_hpa_ingress_monitoring():
    objs = render(load_spec(ROOT / "deployments/llama2-7b-tgi-nginx.yaml"))
    dep, pod, c = container(objs)
    # with an HPA the applied Deployment leaves spec.replicas to it (an apply would reset the HPA's count)
    assert dep["metadata"]["namespace"] == "llm-inference" and "replicas" not in dep["spec"]
    assert c["resources"]["requests"] == c["resources"]["limits"] == {"nvidia.com/gpu": "1", "cpu": "6.5",
                                                                      "memory": "25Gi"}  # g2-standard-8
    env = env_of(c)
    assert env["MODEL_ID"]["value"] == "meta-llama/Llama-2-7b-chat-hf"
    assert env["MAX_TOTAL_TOKENS"]["value"] == "4096" and env["MAX_CONCURRENT_REQUESTS"]["value"] == "128"
    assert env["HUGGINGFACE_HUB_CACHE"]["value"] == "/cache"
    assert env["HUGGING_FACE_HUB_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "huggingface-token", "key": "token"}
    (pvc,) = by_kind(objs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["resources"]["requests"]["storage"] == "100Gi"
    assert {"name": "cache", "persistentVolumeClaim": {"claimName": "llama2-tgi-cache"}} in pod["volumes"]
    (hpa,) = by_kind(objs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] == 2 and hpa["spec"]["maxReplicas"] == 10
    metric_names = [m.get("pods", {}).get("metric", {}).get("name") for m in hpa["spec"]["metrics"]]
    assert "prometheus.googleapis.com|tgi_queue_size|gauge" in metric_names  # the Stackdriver adapter's form
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    (ing,) = by_kind(objs, "Ingress")
    ann = ing["metadata"]["annotations"]
    assert ing["spec"]["ingressClassName"] == "nginx" and ann["nginx.ingress.kubernetes.io/limit-rps"] == "10"
    assert ing["spec"]["tls"] == [{"hosts": ["llm.example.com"], "secretName": "llm-tls"}]
    assert ann["cert-manager.io/cluster-issuer"] == "letsencrypt-prod"
    assert ann["nginx.ingress.kubernetes.io/auth-type"] == "basic"
    assert ann["nginx.ingress.kubernetes.io/auth-secret"] == "tgi-api-users"
    (mon,) = by_kind(objs, "PodMonitoring")  # GMP scrapes only what a PodMonitoring selects
    assert mon["spec"]["endpoints"][0]["port"] == "http"
    (rule,) = by_kind(objs, "Rules")  # GMP's CRD: GKE has no PrometheusRule
    exprs = " ".join(r["expr"] for r in rule["spec"]["groups"][0]["rules"])
    assert "tgi_queue_size" in exprs and "tgi_request_duration_bucket" in exprs


def test_seed_004_mistral_vllm_spot():
    objs = render(load_spec(ROOT / "deployments/mistral-7b-vllm-spot.yaml"))
    dep, pod, c = container(objs)
    assert c["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert "--model=mistralai/Mistral-7B-v0.1" in c["args"] and "--gpu-memory-utilization=0.95" in c["args"]
    assert "--trust-remote-code" in c["args"]
    # spot L4 first, on-demand L4 when spot is gone: the pods select the spec's ComputeClass
    assert pod["nodeSelector"] == {names.COMPUTE_CLASS_LABEL: names.compute_class(load_spec(
        ROOT / "deployments/mistral-7b-vllm-spot.yaml"))}
    (cc,) = by_kind(objs, "ComputeClass")
    assert [r.get("spot", False) for r in cc["spec"]["priorities"]] == [True, False]
    assert pod["serviceAccountName"] == "vllm"
    (sa,) = [o for o in by_kind(objs, "ServiceAccount") if o["metadata"]["name"] == "vllm"]
    assert sa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith("gserviceaccount.com")
    live = by_kind(objs, "Service")[0]
    assert live["spec"]["type"] == "NodePort"
    assert live["metadata"]["annotations"]["cloud.google.com/neg"] == '{"ingress": true}'
    (ing,) = by_kind(objs, "Ingress")
    assert ing["metadata"]["annotations"]["kubernetes.io/ingress.global-static-ip-name"] == "ingress-vllm"


def test_sglang_example():
    objs = render(load_spec(ROOT / "deployments/qwen2.5-7b-sglang.yaml"))
    _, _, c = container(objs)
    assert c["command"] == ["python3", "-m", "sglang.launch_server"]
    assert c["args"][:2] == ["--model-path", "Qwen/Qwen2.5-7B-Instruct"]
    assert c["ports"][0]["containerPort"] == 30000
    assert by_kind(objs, "PodMonitoring")


def test_vertex_has_no_kubernetes_objects():
    with pytest.raises(SpecError, match="target"):
        render(load_spec(ROOT / "deployments/gemma-vertex.yaml"))


def test_replicas_override_and_hash_changes_with_revision():
    spec = load_spec(ROOT / "deployments/gemma2-2b-it-vllm-l4.yaml")
    a = model_deployment(spec, "blue", revision="aaa", replicas=0)
    b = model_deployment(spec, "blue", revision="bbb")
    assert a["spec"]["replicas"] == 0
    assert a["metadata"]["annotations"][names.SPEC_HASH_ANNOTATION] != b["metadata"]["annotations"][
        names.SPEC_HASH_ANNOTATION]


def test_render_cli_yaml_stream():
    res = subprocess.run([sys.executable, "-m", "llm_fleet.cli", "render", "deployments/mistral-7b-vllm-spot.yaml",
                          "--color", "green"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    docs = list(yaml.safe_load_all(res.stdout))
    assert any(d["kind"] == "Deployment" and d["metadata"]["name"] == "mistral-7b-green" for d in docs)


def _variant(path: str, **changes):
    data = yaml.safe_load((ROOT / path).read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return parse_spec(data)


@pytest.mark.parametrize("change", [
    {"load_timeout": "45m"},  # the startupProbe's failureThreshold
    {"service_account": "vllm"},  # serviceAccountName
    {"monitoring__scrape": "annotations"},  # pod annotations
    {"engine__env": {"VLLM_LOGGING_LEVEL": "DEBUG"}},
])
def test_spec_hash_follows_the_rendered_pod_template(change):
    """Anything the pods run is in the hash, so deploy_model makes a new color instead of applying the live
    Deployment in place. Failed before the hash covered the rendered template (it hashed chosen sections:
    load_timeout, service_account and monitoring were missing)."""
    path = "deployments/gemma2-2b-it-vllm-l4.yaml"
    base, changed = _variant(path), _variant(path, **change)
    a, b = (model_deployment(s, "blue", revision="abc") for s in (base, changed))
    assert a["spec"]["template"] != b["spec"]["template"]
    assert spec_hash(base, "abc") != spec_hash(changed, "abc")


def test_spec_hash_ignores_color_and_what_the_pods_do_not_run():
    path = "deployments/gemma2-2b-it-vllm-l4.yaml"
    spec = load_spec(ROOT / path)
    blue, green = (model_deployment(spec, c, revision="abc") for c in ("blue", "green"))
    key = names.SPEC_HASH_ANNOTATION
    assert blue["spec"]["template"]["metadata"]["annotations"][key] == \
        green["spec"]["template"]["metadata"]["annotations"][key] == spec_hash(spec, "abc")
    # replicas and the Service's port are not in the pod template
    assert spec_hash(_variant(path, replicas=2, expose__port=9000), "abc") == spec_hash(spec, "abc")
