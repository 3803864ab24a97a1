"""HPA like GKE: no custom metrics adapter -> FailedGetPodsMetric and no scaling on the metric; with the
Custom Metrics Stackdriver Adapter it scales on the model servers' real /metrics (vLLM
num_requests_waiting) under queued load and back down; CPU needs requests; kubectl top via metrics.k8s.io."""

from __future__ import annotations

import threading

import httpx
import pytest
from kubernetes import client

from sandbox.kube import addons
from tests.sandbox.access_support import configuration, httpx_kwargs
from tests.sandbox.kube_support import model_cluster, wait_for

METRIC = "prometheus.googleapis.com|vllm:num_requests_waiting|gauge"


@pytest.fixture
def kube():
    with model_cluster() as (k, runtime):
        for i in range(4):
            k.add_node(f"gpu-{i}", labels={"cloud.google.com/gke-accelerator": "nvidia-l4"},
                       capacity={"nvidia.com/gpu": "1", "cpu": "8", "memory": "32Gi"})
        yield k, runtime


def _deploy(api, *, cpu: str | None = "2") -> None:
    resources: dict = {"limits": {"nvidia.com/gpu": "1"}}
    if cpu:
        resources["requests"] = {"cpu": cpu, "memory": "8Gi"}
    client.AppsV1Api(api).create_namespaced_deployment("default", {
        "metadata": {"name": "llm"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "llm"}},
                 "template": {"metadata": {"labels": {"app": "llm"}}, "spec": {"containers": [{
                     "name": "vllm", "image": "vllm/vllm-openai:v0.6.3",
                     "args": ["--model=facebook/opt-125m", "--port=8000", "--max-num-seqs=2"],
                     "ports": [{"name": "http", "containerPort": 8000}], "resources": resources}]}}}})
    client.CoreV1Api(api).create_namespaced_service("default", {"metadata": {"name": "llm"}, "spec": {
        "selector": {"app": "llm"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})


def _hpa(api, metrics: list[dict], *, lo: int = 1, hi: int = 4) -> None:
    client.AutoscalingV2Api(api).create_namespaced_horizontal_pod_autoscaler("default", {
        "metadata": {"name": "llm"},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm"},
                 "minReplicas": lo, "maxReplicas": hi, "metrics": metrics,
                 "behavior": {"scaleDown": {"stabilizationWindowSeconds": 60}}}})


def _queue_metric(target: str = "2") -> dict:
    return {"type": "Pods", "pods": {"metric": {"name": METRIC},
                                     "target": {"type": "AverageValue", "averageValue": target}}}


def _podmonitoring(api) -> None:
    client.CustomObjectsApi(api).create_namespaced_custom_object("monitoring.googleapis.com", "v1", "default",
                                                                 "podmonitorings", {
        "apiVersion": "monitoring.googleapis.com/v1", "kind": "PodMonitoring", "metadata": {"name": "llm"},
        "spec": {"selector": {"matchLabels": {"app": "llm"}}, "endpoints": [{"port": "http", "interval": "15s"}]}})


def _condition(api, ctype: str):
    hpa = client.AutoscalingV2Api(api).read_namespaced_horizontal_pod_autoscaler("llm", "default")
    return next((c for c in hpa.status.conditions or [] if c.type == ctype), None)


def _replicas(api) -> int:
    return client.AppsV1Api(api).read_namespaced_deployment("llm", "default").spec.replicas


class Load:
    """``n`` slow generations in flight through the Service proxy until stopped."""

    def __init__(self, kube, n: int) -> None:
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._one, args=(kube,), daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()

    def _one(self, kube) -> None:
        with httpx.Client(timeout=60, **httpx_kwargs(kube)) as http:
            while not self.stop.is_set():
                http.post("/api/v1/namespaces/default/services/llm:http/proxy/v1/completions",
                          json={"model": "facebook/opt-125m", "prompt": "Tell me a long story", "max_tokens": 200})

    def end(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


def test_without_an_adapter_the_pods_metric_fails_and_nothing_scales(kube):
    k, runtime = kube
    api = client.ApiClient(configuration(k))
    _deploy(api)
    _hpa(api, [_queue_metric()], lo=2)
    cond = wait_for(lambda: (c := _condition(api, "ScalingActive")) and c.status == "False" and c)
    assert cond.reason == "FailedGetPodsMetric" and "no custom metrics API (custom.metrics.k8s.io)" in cond.message
    events = [e.reason for e in client.CoreV1Api(api).list_namespaced_event("default").items
              if e.involved_object.kind == "HorizontalPodAutoscaler"]
    assert "FailedGetPodsMetric" in events
    # minReplicas is still enforced (the controller does that before reading metrics), nothing beyond it
    wait_for(lambda: _replicas(api) == 2)


def test_with_the_stackdriver_adapter_it_scales_on_queued_requests_and_back_down(kube):
    k, runtime = kube
    api = client.ApiClient(configuration(k))
    addons.install_custom_metrics_adapter(k)
    runtime.behaviors.add(mode="ok", match={"labels": {"app": "llm"}}, tokens_per_s=0.5)
    _deploy(api)
    _hpa(api, [_queue_metric()])
    wait_for(lambda: k.service_backends("default", "llm"), timeout=20)
    # GMP collects only what a PodMonitoring selects: until then the adapter has no data for these pods
    cond = wait_for(lambda: (c := _condition(api, "ScalingActive")) and c.status == "False" and c)
    assert "no metrics returned" in cond.message
    _podmonitoring(api)
    wait_for(lambda: (c := _condition(api, "ScalingActive")) and c.status == "True")
    assert _replicas(api) == 1  # idle: nothing queued

    load = Load(k, 12)
    try:
        wait_for(lambda: _replicas(api) == 4, timeout=30)
        hpa = client.AutoscalingV2Api(api).read_namespaced_horizontal_pod_autoscaler("llm", "default")
        assert hpa.status.current_metrics[0].pods.metric.name == METRIC
    finally:
        load.end()
    wait_for(lambda: _replicas(api) == 1, timeout=30)  # after the scale-down stabilization window
    reasons = [e.message for e in client.CoreV1Api(api).list_namespaced_event("default").items
               if e.reason == "SuccessfulRescale"]
    assert any("above target" in m for m in reasons) and any("below target" in m for m in reasons)


def test_plain_metric_names_are_not_what_the_stackdriver_adapter_serves(kube):
    k, _ = kube
    api = client.ApiClient(configuration(k))
    addons.install_custom_metrics_adapter(k)
    _deploy(api)
    _podmonitoring(api)
    _hpa(api, [{"type": "Pods", "pods": {"metric": {"name": "vllm:num_requests_waiting"},
                                         "target": {"type": "AverageValue", "averageValue": "2"}}}])
    cond = wait_for(lambda: (c := _condition(api, "ScalingActive")) and c.status == "False" and c)
    assert "could not find the metric vllm:num_requests_waiting" in cond.message


def test_cpu_utilization_needs_cpu_requests(kube):
    k, _ = kube
    api = client.ApiClient(configuration(k))
    _deploy(api, cpu=None)
    _hpa(api, [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization",
                                                                            "averageUtilization": 70}}}])
    cond = wait_for(lambda: (c := _condition(api, "ScalingActive")) and "missing request" in c.message and c,
                    timeout=20)
    assert cond.status == "False" and cond.reason == "FailedGetResourceMetric"
    assert "missing request for cpu in container vllm" in cond.message


def test_metrics_api_serves_pod_and_node_usage(kube):
    k, _ = kube
    api = client.ApiClient(configuration(k))
    _deploy(api)
    wait_for(lambda: k.service_backends("default", "llm"), timeout=20)
    with httpx.Client(**httpx_kwargs(k)) as http:
        pods = http.get("/apis/metrics.k8s.io/v1beta1/namespaces/default/pods").json()
        assert pods["kind"] == "PodMetricsList" and pods["items"][0]["containers"][0]["usage"]["cpu"].endswith("n")
        nodes = http.get("/apis/metrics.k8s.io/v1beta1/nodes").json()
        assert {n["metadata"]["name"] for n in nodes["items"]} == {"gpu-0", "gpu-1", "gpu-2", "gpu-3"}
