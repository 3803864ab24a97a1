"""How much each way of reaching a sandbox model costs per request: direct to the pod's server, through the
API server's service proxy, through real `kubectl port-forward` (SPDY), and through an Ingress address.

    uv run --frozen python bench/access_paths.py [-n 200]

Prints mean / p50 / p95 latency of GET /health per path and the ratio to direct (no timing assertions:
the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandbox.core import Clock, Faults  # noqa: E402
from sandbox.engines import ModelRuntime  # noqa: E402
from sandbox.hub import Hub  # noqa: E402
from sandbox.kube import KubeCluster, addons  # noqa: E402
from tests.sandbox.access_support import httpx_kwargs, kubeconfig  # noqa: E402

MANIFEST = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: llm, namespace: default}
spec:
  replicas: 1
  selector: {matchLabels: {app: llm}}
  template:
    metadata: {labels: {app: llm}}
    spec:
      containers:
      - name: vllm
        image: vllm/vllm-openai:v0.10.2
        args: ["--model=facebook/opt-125m", "--port=8000"]
        ports: [{name: http, containerPort: 8000}]
        resources: {limits: {nvidia.com/gpu: "1"}}
---
apiVersion: v1
kind: Service
metadata: {name: llm, namespace: default}
spec:
  selector: {app: llm}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: llm, namespace: default}
spec:
  ingressClassName: nginx
  rules:
  - host: llm.example.com
    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: llm, port: {number: 80}}}}]}
"""


def timed(client: httpx.Client, url: str, n: int, headers: dict | None = None) -> list[float]:
    for _ in range(20):  # warm up: connections, the model server's first request
        client.get(url, headers=headers)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.get(url, headers=headers)
        out.append((time.perf_counter() - t0) * 1000)
        assert r.status_code == 200, (url, r.status_code, r.text[:200])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=200)
    n = ap.parse_args().n
    clock, faults = Clock(0.002), Faults()
    runtime = ModelRuntime(clock=clock, faults=faults, hub=Hub(faults=faults))
    kube = KubeCluster(clock=clock, faults=faults, runtime=runtime)
    kube.start()
    kube.add_node("gpu-1", capacity={"nvidia.com/gpu": "1"})
    addons.install_ingress_nginx(kube)
    home = Path(tempfile.mkdtemp())
    (home / "kubeconfig").write_text(yaml.safe_dump(kubeconfig(kube)))
    env = {**os.environ, "HOME": str(home), "KUBECONFIG": str(home / "kubeconfig")}
    base = ["kubectl", f"--cache-dir={home / 'cache'}"]
    subprocess.run([*base, "apply", "-f", "-"], input=MANIFEST, text=True, env=env, check=True, capture_output=True)
    subprocess.run([*base, "wait", "--for=condition=Available", "deploy/llm", "--timeout=60s"], env=env, check=True,
                   capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        local = s.getsockname()[1]
    pf = subprocess.Popen([*base, "port-forward", "service/llm", f"{local}:80"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    pf.stdout.readline()
    try:
        pod_port = kube.service_backends("default", "llm")[0]
        addr = None
        while addr is None:
            ing = kube.ingress.url("default", "llm")
            addr = ing
            time.sleep(0.05)
        results = {}
        with httpx.Client(timeout=30) as http:
            results["direct to the pod"] = timed(http, f"http://127.0.0.1:{pod_port}/health", n)
            results["kubectl port-forward (SPDY)"] = timed(http, f"http://127.0.0.1:{local}/health", n)
            results["Ingress address"] = timed(http, f"{addr}/health", n, {"Host": "llm.example.com"})
        with httpx.Client(timeout=30, **httpx_kwargs(kube)) as api:
            results["API server service proxy"] = timed(
                api, "/api/v1/namespaces/default/services/llm:http/proxy/health", n)
    finally:
        pf.terminate()
        pf.wait(timeout=10)
        kube.stop()
        runtime.stop()
    direct = statistics.median(results["direct to the pod"])
    print(f"GET /health x {n} per path (ms)")
    for name, xs in results.items():
        xs = sorted(xs)
        print(f"  {name:30s} mean {statistics.mean(xs):6.2f}  p50 {xs[len(xs) // 2]:6.2f}  "
              f"p95 {xs[int(len(xs) * 0.95)]:6.2f}  p50 x{statistics.median(xs) / direct:4.1f} of direct")


if __name__ == "__main__":
    main()
