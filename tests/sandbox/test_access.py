"""How a user reaches a model on the sandbox: real ``kubectl port-forward`` (SPDY/3.1), then the tutorials' curl.

kubectl 1.30 (the minor the sandbox reports) speaks SPDY/3.1 ``portforward.k8s.io`` on
``POST .../pods/P/portforward``; ``service/X`` is resolved by kubectl itself to a Running pod and its
target container port. ``kubectl exec`` gets a clear refusal instead of a 404.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import httpx
import pytest
import yaml

from sandbox.core import free_port
from tests.sandbox.access_support import httpx_kwargs, kubeconfig
from tests.sandbox.kube_support import model_cluster, wait_for

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")

MANIFEST = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: tgi, namespace: default}
spec:
  replicas: 1
  selector: {matchLabels: {app: tgi}}
  template:
    metadata: {labels: {app: tgi}}
    spec:
      containers:
      - name: tgi
        image: ghcr.io/huggingface/text-generation-inference:2.0
        env: [{name: MODEL_ID, value: facebook/opt-125m}, {name: PORT, value: "80"}]
        ports: [{name: http, containerPort: 80}]
        resources: {limits: {nvidia.com/gpu: "1"}}
      tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: vllm, namespace: default}
spec:
  replicas: 1
  selector: {matchLabels: {app: vllm}}
  template:
    metadata: {labels: {app: vllm}}
    spec:
      containers:
      - name: vllm
        image: vllm/vllm-openai:v0.6.3
        args: ["--model=facebook/opt-125m", "--port=8000"]
        ports: [{name: http, containerPort: 8000}]
        resources: {limits: {nvidia.com/gpu: "1"}}
      tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
---
apiVersion: v1
kind: Service
metadata: {name: tgi, namespace: default}
spec:
  selector: {app: tgi}
  ports: [{name: http, port: 8080, targetPort: http}]
"""


@pytest.fixture(scope="module")
def kube():
    with model_cluster() as (k, _):
        k.add_node("gpu-1", labels={"cloud.google.com/gke-accelerator": "nvidia-l4"}, capacity={"nvidia.com/gpu": "4"},
                   taints=[{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}])
        yield k


@pytest.fixture(scope="module")
def kubectl(kube, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    config = home / "kubeconfig"
    config.write_text(yaml.safe_dump(kubeconfig(kube)))
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "KUBECONFIG": str(config)}
    base = ["kubectl", f"--cache-dir={home / 'cache'}"]

    def run(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([*base, *args], input=stdin, text=True, capture_output=True, env=env, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    run.popen = lambda *args: subprocess.Popen([*base, *args], env=env, stdout=subprocess.PIPE,  # type: ignore[attr-defined]
                                               stderr=subprocess.PIPE, text=True)
    run("apply", "-f", "-", stdin=MANIFEST)
    run("wait", "--for=condition=Available", "deploy/tgi", "deploy/vllm", "--timeout=30s")
    return run


class Forward:
    def __init__(self, kubectl, target: str, remote: int) -> None:
        self.local = free_port()
        self.proc = kubectl.popen("port-forward", target, f"{self.local}:{remote}")
        line = self.proc.stdout.readline()  # "Forwarding from 127.0.0.1:L -> R"
        assert line.startswith(f"Forwarding from 127.0.0.1:{self.local} -> "), (line, self.proc.stderr.read())
        self.remote_shown = int(line.strip().rsplit(" ", 1)[-1])

    def __enter__(self) -> Forward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.stderr = self.proc.stderr.read()


def test_port_forward_service_then_the_tutorial_curl_lines(kubectl):
    with Forward(kubectl, "service/tgi", 8080) as fw:
        assert fw.remote_shown == 80  # kubectl maps the Service port to the pod's target container port
        url = f"http://localhost:{fw.local}"
        with httpx.Client(timeout=30) as http:
            assert http.get(f"{url}/health").status_code == 200
            out = http.post(f"{url}/generate", json={"inputs": "What is Kubernetes?",
                                                      "parameters": {"max_new_tokens": 20}})
            assert out.status_code == 200 and out.json()["generated_text"]
            # several connections through one port-forward, each its own stream pair
            for _ in range(3):
                with httpx.Client(timeout=30) as fresh:
                    assert fresh.get(f"{url}/info").json()["model_id"] == "facebook/opt-125m"
        curl = shutil.which("curl")
        if curl:  # the tutorials' own line
            body = subprocess.run([curl, "-s", f"{url}/generate", "-X", "POST", "-H", "Content-Type: application/json",
                                   "-d", '{"inputs":"Hello","parameters":{"max_new_tokens":8}}'],
                                  capture_output=True, text=True, timeout=30).stdout
            assert "generated_text" in body


def test_port_forward_pod_to_vllm_openai_route(kubectl):
    pod = kubectl("get", "pods", "-l", "app=vllm", "-o", "jsonpath={.items[0].metadata.name}").stdout
    with Forward(kubectl, f"pod/{pod}", 8000) as fw, httpx.Client(timeout=30) as http:
        out = http.post(f"http://localhost:{fw.local}/v1/completions",
                        json={"model": "facebook/opt-125m", "prompt": "Hello", "max_tokens": 8})
        assert out.status_code == 200 and out.json()["choices"][0]["text"]


def test_port_forward_to_a_port_nothing_listens_on_fails_like_the_kubelet(kubectl):
    pod = kubectl("get", "pods", "-l", "app=vllm", "-o", "jsonpath={.items[0].metadata.name}").stdout
    with Forward(kubectl, f"pod/{pod}", 9999) as fw:
        with pytest.raises(httpx.HTTPError), httpx.Client(timeout=10) as http:
            http.get(f"http://localhost:{fw.local}/health")
        time.sleep(0.2)
    assert "connection refused" in fw.stderr


def test_port_forward_refuses_a_pod_that_is_not_running(kubectl, kube):
    kubectl("apply", "-f", "-", stdin=yaml.safe_dump({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "stuck", "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "vllm/vllm-openai:v0.6.3",
                                 "resources": {"limits": {"nvidia.com/gpu": "9"}}}]}}))
    out = kubectl("port-forward", "pod/stuck", "18080:8000", check=False)
    assert out.returncode != 0 and "pod is not running" in out.stderr


def test_exec_is_refused_clearly(kubectl):
    pod = kubectl("get", "pods", "-l", "app=vllm", "-o", "jsonpath={.items[0].metadata.name}").stdout
    out = kubectl("exec", pod, "--", "nvidia-smi", check=False)
    assert out.returncode != 0 and "not supported in the sandbox" in out.stderr, out.stderr


def test_websocket_port_forward_is_refused_so_new_kubectl_falls_back(kube):
    from sandbox.kube.controllers import PODS

    pod = wait_for(lambda: next(iter(kube.store.list(PODS, "default")[0]), None))
    name = pod["metadata"]["name"]
    kw = httpx_kwargs(kube)
    r = httpx.Client(**kw).get(f"/api/v1/namespaces/default/pods/{name}/portforward?ports=8000",
                  headers={**kw.get("headers", {}), "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                           "Sec-WebSocket-Protocol": "SPDY/3.1+portforward.k8s.io"})
    assert r.status_code == 400 and r.json()["kind"] == "Status"


def test_kubectl_top_reads_the_metrics_api(kubectl):
    pods = kubectl("top", "pod").stdout
    assert pods.split("\n")[0].split() == ["NAME", "CPU(cores)", "MEMORY(bytes)"] and "vllm-" in pods
    nodes = kubectl("top", "node").stdout
    assert "gpu-1" in nodes and "CPU%" in nodes


def test_load_balancer_service_address_serves(kube, kubectl):
    from sandbox.routing import ServicePorts

    routes = ServicePorts(kube)  # what the Sandbox gives every cluster
    unsubscribe = kube.subscribe(routes.on_event)
    try:
        kubectl("apply", "-f", "-", stdin=yaml.safe_dump({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "vllm-lb", "namespace": "default"},
            "spec": {"type": "LoadBalancer", "selector": {"app": "vllm"},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}))

        def address():
            out = kubectl("get", "svc", "vllm-lb", "-o", "jsonpath={.status.loadBalancer.ingress[0].ip}:"
                          "{.status.loadBalancer.ingress[0].ports[0].port}").stdout
            return out if out.split(":")[-1] else None

        ip_port = wait_for(address)
        assert ip_port.startswith("127.0.0.1:")
        assert httpx.get(f"http://{ip_port}/v1/models", timeout=30).json()["data"][0]["id"] == "facebook/opt-125m"
    finally:
        unsubscribe()
        routes.stop()


def test_addons_install_with_kubectl_apply(kubectl, kube):
    from sandbox.kube import autoscaling

    root = __import__("pathlib").Path(__file__).resolve().parents[2] / "sandbox" / "addons"
    for name in ("ingress-nginx.yaml", "custom-metrics-stackdriver-adapter.yaml"):
        kubectl("apply", "-f", str(root / name))
    assert "nginx" in kubectl("get", "ingressclass", "-o", "name").stdout
    assert autoscaling.adapter(kube) == "stackdriver"
