"""What does a GKE cluster cost the sandbox, now that each has its own Kubernetes API server?

Creates ``--clusters`` GKE clusters (each with one L4 node pool) through the real container_v1 client,
then ``--deployments`` vLLM Deployments of ``--replicas`` pods spread over them through each cluster's
own endpoint (real kubernetes client, real model servers of the shared ModelRuntime), waits for every
pod to be Ready, then deletes every cluster. Prints per-cluster start time (the KubeCluster start inside
the create call) and memory, and the process RSS with everything running (target: well under 1 GiB).

    uv run python bench/sandbox_clusters.py [--clusters 10 --deployments 50 --replicas 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", type=int, default=10)
    parser.add_argument("--deployments", type=int, default=50)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--time-scale", type=float, default=0.002)
    args = parser.parse_args()

    import httpx
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import container_v1
    from kubernetes import client as k8s

    from bench._support import rss_mib, scale_deployment
    from sandbox.app import Sandbox
    from tests.sandbox.kube_support import api_client

    sb = Sandbox(time_scale=args.time_scale)
    sb.start()
    try:
        gke = container_v1.ClusterManagerClient(credentials=AnonymousCredentials(), transport="rest",
                                                client_options={"api_endpoint": sb.gke.url})
        for i in range(args.clusters):  # every project has its own quotas
            for region, metric in (("us-central1", "NVIDIA_L4_GPUS"), (None, "GPUS_ALL_REGIONS"),
                                   ("us-central1", "CPUS"), (None, "CPUS_ALL_REGIONS")):
                sb.compute.set_quota(region, metric, 100_000, project=f"bench-{i}")
        per_cluster_pods = -(-args.deployments * args.replicas // args.clusters)

        # warm up (imports, first server): not part of the per-cluster cost
        warm = sb._kube_class(clock=sb.clock, faults=sb.faults, runtime=sb.runtime)
        warm.start()
        warm.stop()
        base = rss_mib()
        create_ms, parents = [], []
        for i in range(args.clusters):
            parent = f"projects/bench-{i}/locations/us-central1-a"
            t0 = time.perf_counter()
            op = gke.create_cluster(parent=parent, cluster=container_v1.Cluster(name="bench", initial_node_count=1),
                                    retry=None)
            create_ms.append((time.perf_counter() - t0) * 1000)
            parents.append((parent, op))
        clusters_rss = rss_mib()
        for parent, op in parents:
            httpx.post(f"{sb.gke.url}/v1/{parent}/operations/{op.name}:wait", timeout=60)
        start_ms = []
        for _ in range(args.clusters):  # the KubeCluster start alone (what the create call adds)
            k = sb._kube_class(clock=sb.clock, faults=sb.faults, runtime=sb.runtime)
            t0 = time.perf_counter()
            k.start()
            start_ms.append((time.perf_counter() - t0) * 1000)
            k.stop()
        pool = container_v1.NodePool(name="gpu-pool", initial_node_count=per_cluster_pods, config=container_v1.NodeConfig(
            machine_type="g2-standard-8",
            accelerators=[container_v1.AcceleratorConfig(accelerator_count=1, accelerator_type="nvidia-l4")]))
        ops = [(parent, gke.create_node_pool(parent=f"{parent}/clusters/bench", node_pool=pool, retry=None))
               for parent, _ in parents]
        for parent, op in ops:
            done = httpx.post(f"{sb.gke.url}/v1/{parent}/operations/{op.name}:wait", timeout=60).json()
            assert "error" not in done, done
        nodes_rss = rss_mib()

        apis = []
        for parent, _ in parents:
            project, location = parent.split("/")[1], parent.split("/")[3]
            kube = sb.cluster_kube("bench", location, project)  # https + its CA + a Google token
            apis.append(k8s.AppsV1Api(api_client(kube)))
        t0 = time.perf_counter()
        for d in range(args.deployments):
            apis[d % len(apis)].create_namespaced_deployment("default", scale_deployment(f"m{d}", args.replicas))
        want = args.deployments * args.replicas
        ready = 0
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            ready = sum(1 for e in list(sb.cluster_kubes.values())
                        for p in e.kube.snapshot()["pods"] if p["ready"] and p["port"])
            if ready >= want:
                break
            time.sleep(0.2)
        ready_s = time.perf_counter() - t0
        full_rss = rss_mib()

        t0 = time.perf_counter()
        dels = [(parent, gke.delete_cluster(name=f"{parent}/clusters/bench", retry=None)) for parent, _ in parents]
        for parent, op in dels:
            httpx.post(f"{sb.gke.url}/v1/{parent}/operations/{op.name}:wait", timeout=60)
        delete_s = time.perf_counter() - t0
        left = len(sb.runtime.snapshot()["pods"])
        after_rss = rss_mib()

        print(f"clusters: {args.clusters}, deployments: {args.deployments} x {args.replicas} replicas "
              f"= {want} pods ({ready} Ready in {ready_s:.1f} s)")
        print(f"KubeCluster start: median {statistics.median(start_ms):.1f} ms, max {max(start_ms):.1f} ms; "
              f"create_cluster call (incl. start): median {statistics.median(create_ms):.1f} ms")
        print(f"RSS per empty cluster: {(clusters_rss - base) / args.clusters:.2f} MiB "
              f"(base {base:.0f} MiB -> {clusters_rss:.0f} MiB with {args.clusters} cluster APIs)")
        print(f"RSS with nodes: {nodes_rss:.0f} MiB; with {ready}/{want} pods Ready: {full_rss:.0f} MiB "
              f"(target < 1024 MiB with every pod Ready: "
              f"{'not measured' if ready < want else 'ok' if full_rss < 1024 else 'OVER'})")
        print(f"delete every cluster: {delete_s:.1f} s (time-scaled cluster_delete included); model servers "
              f"left running: {left}; RSS after: {after_rss:.0f} MiB")
        return 0 if ready >= want and full_rss < 1024 and left == 0 else 1
    finally:
        sb.stop()


if __name__ == "__main__":
    raise SystemExit(main())
