"""Sandbox start time and memory with 50 model deployments / 100 live model-server pods.

Targets (issue: the sandbox): start < 3 s; 50 deployments with 100 pods in < 1 GiB resident memory.
Pods are real: each Ready pod is a live model server on its own loopback port.

    uv run python bench/sandbox_scale.py [--deployments 50] [--replicas 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deployments", type=int, default=50)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--time-scale", type=float, default=0.001)
    args = parser.parse_args()

    from kubernetes import client

    from bench._support import rss_mib, scale_deployment
    from sandbox.app import Sandbox
    from tests.sandbox.kube_support import api_client

    base_rss = rss_mib()
    t0 = time.perf_counter()
    sb = Sandbox(time_scale=args.time_scale)
    sb.start()
    start_s = time.perf_counter() - t0
    pods = args.deployments * args.replicas
    try:
        for i in range(pods):
            sb.kube.add_node(f"gpu-node-{i}", labels={"cloud.google.com/gke-nodepool": "gpu-pool",
                                                      "cloud.google.com/gke-accelerator": "nvidia-l4"},
                             capacity={"nvidia.com/gpu": "1", "cpu": "8", "memory": "32Gi"},
                             taints=[{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}])
        apps = client.AppsV1Api(api_client(sb.kube))  # https + the cluster's CA + a Google token
        t1 = time.perf_counter()
        for i in range(args.deployments):
            apps.create_namespaced_deployment("default", scale_deployment(f"scale-{i}", args.replicas))
        deadline = time.monotonic() + 120
        ready = 0
        while time.monotonic() < deadline:
            ready = sum(d.status.ready_replicas or 0 for d in apps.list_namespaced_deployment("default").items)
            if ready >= pods:
                break
            time.sleep(0.2)
        ready_s = time.perf_counter() - t1
        live = len([s for s in sb.runtime.servers() if s.ready])
        rss = rss_mib()
    finally:
        sb.stop()
    print(f"sandbox start: {start_s * 1000:.0f} ms (target < 3000 ms)")
    print(f"{args.deployments} deployments, {ready}/{pods} pods Ready ({live} live model servers) in {ready_s:.1f} s")
    print(f"resident memory: {rss:.0f} MiB total, {rss - base_rss:.0f} MiB above the interpreter with its imports "
          f"(target < 1024 MiB); ratio to target {rss / 1024:.2f}")
    ok = start_s < 3 and rss < 1024 and ready >= pods
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
