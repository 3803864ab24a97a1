"""A blue-green release under constant load: failed requests, stale answers, switch latency, overhead.

Deploys the SGLang spec on the sandbox, drives constant load through the live Service's own address
(what clients of a ClusterIP/LoadBalancer hit), and runs the product's release_model to a new Hub
revision in the middle of it. Prints, from one run:

* failed requests across the swap (target 0),
* requests that arrived at an old-revision pod after the selector switched on a connection opened once
  kube-proxy had caught up (switch + endpoint propagation lag) — target 0 — read from the sandbox model
  servers' own arrival times and each request's connection open time. Requests on connections opened
  before the switch keep reaching the old pods (kube-proxy routes a connection once; conntrack keeps it)
  until the old color drains at its scale-down and those connections close: counted apart, expected,
  with how long after the switch the last one came,
* time from "analysis passed" to "selector switched" (target ≤ 1 s),
* release wall time ÷ its critical path (target ≤ 1.10): the critical path is what no control plane can
  skip — the candidate pod's image pull + weight load (from the sandbox's own pod record) plus the
  analyses' own run time (pre-promotion requests, post-promotion window). Wall time is release_model's
  start to its record step; the scale-down delay after promotion is policy, not work, and is excluded.

    uv run python bench/release_swap.py [--time-scale 0.25] [--threads 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Load:
    def __init__(self, port: int, threads: int, model: str) -> None:
        import httpx

        self.clients = [httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) for _ in range(threads)]
        self.model = model
        self.ok = 0
        self.failed: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(c,), daemon=True) for c in self.clients]

    def run(self, http) -> None:
        while not self.stop.is_set():
            try:
                r = http.post("/v1/completions", json={"model": self.model, "prompt": "Hi", "max_tokens": 2})
                if r.status_code == 200 and r.json()["choices"][0]["text"].strip():
                    self.ok += 1
                else:
                    self.failed.append(f"HTTP {r.status_code}")
            except Exception as exc:  # noqa: BLE001 - every failure counts
                self.failed.append(type(exc).__name__)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-scale", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--min-requests", type=int, default=2000)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                       "LLM_FLEET_POLL_INITIAL_S": "0.05", "LLM_FLEET_POLL_MAX_S": "0.2"})
    from bench._support import prefect_server, start_sandbox
    from sandbox.client import SandboxClient

    sb = start_sandbox(args.time_scale)
    import yaml

    from flows.deploy_model import deploy_model
    from flows.provision_cluster import provision_cluster
    from flows.release_model import release_model

    spec = yaml.safe_load((ROOT / "deployments/qwen2.5-7b-sglang.yaml").read_text())
    spec["cluster"]["project"] = f"bench-{uuid.uuid4().hex[:8]}"
    spec["accelerator"] = {"type": "nvidia-l4", "pool": {"min_nodes": 2, "max_nodes": 2, "initial_nodes": 2}}
    spec["release"] = {"pre_promotion": {"requests": 20, "concurrency": 4},
                       "post_promotion": {"requests": 20, "window": "60s", "interval": "10s"},
                       "scale_down_delay": "30s"}
    model = spec["model"] if isinstance(spec["model"], str) else spec["model"]["id"]
    try:
        with prefect_server():
            provision_cluster(spec=spec)
            deploy_model(spec=spec)
            state = SandboxClient(sb.env()["LLM_FLEET_SANDBOX_URL"]).state()
            port = next(p["port"] for c in _clusters(state) for key, p in c.get("service_ports", {}).items()
                        if key == f"default/{spec['name']}")
            old_pods = {s.name for s in sb.runtime.servers() if s.name.startswith(f"{spec['name']}-blue")}
            sha = sb.hub.push_revision(model, title="bench: new weights")
            load = Load(port, args.threads, model)
            for t in load.threads:
                t.start()
            time.sleep(1.0)
            start = time.time()
            result = release_model(spec=spec, revision=sha)
            # Keep the load going until enough requests crossed the swap.
            while load.ok + len(load.failed) < args.min_requests:
                time.sleep(0.2)
            load.stop.set()
            for t in load.threads:
                t.join(timeout=30)
            times = result["times"]
            switched = times["switched"]
            from sandbox.core import DEFAULT_DELAYS

            caught_up = switched + DEFAULT_DELAYS["endpoint_propagation"] * args.time_scale
            after = [(t, opened) for s in sb.runtime.servers() if s.name in old_pods for t, opened in s.arrivals
                     if t > switched]
            stale = sum(1 for _, opened in after if opened > caught_up)
            kept = [t for t, opened in after if opened <= caught_up]
            new = [s for s in sb.runtime.servers() if s.name.startswith(f"{spec['name']}-green")]
            load_s = max((s.ready_at or 0) - s.started_at for s in new) if new else float("nan")
            pull_s = _pull_seconds(sb, args.time_scale)
            pre = result["figures"]["pre"]
            # The analysis itself: the smoke prompts, then the pre-promotion requests (4 at a time).
            pre_s = sum(r["latency_s"] for r in result["smoke"]) + pre["requests"] / 4 * pre["p50_s"]
            post_window_s = 60 * args.time_scale
            critical = pull_s + load_s + pre_s + post_window_s
            wall = times["post_analysis_done"] - start
            rows = [
                ("requests across the swap", f"{load.ok + len(load.failed)}", "≥ 2000"),
                ("failed requests", f"{len(load.failed)}", "0"),
                ("new connection at an old-revision pod after the switch", f"{stale}", "0"),
                ("requests on pre-switch connections at old pods after it",
                 f"{len(kept)} (last {max(kept) - switched if kept else 0:.2f} s after)", "expected"),
                ("analysis passed → selector switched", f"{switched - times['analysis_passed']:.3f} s", "≤ 1 s"),
                ("release wall (start → post-analysis done)", f"{wall:.2f} s", ""),
                ("critical path (pull + load + analyses)",
                 f"{critical:.2f} s = {pull_s:.2f} + {load_s:.2f} + {pre_s:.2f} + {post_window_s:.2f}", ""),
                ("release wall ÷ critical path", f"{wall / critical:.2f}", "≤ 1.10"),
            ]
            print(f"\nrelease_model under load (time scale {args.time_scale}, {args.threads} client threads)")
            width = max(len(r[0]) for r in rows)
            for name, value, target in rows:
                print(f"  {name:<{width}}  {value:>24}   {target}")
            if load.failed:
                print("  failures:", sorted(set(load.failed))[:5])
    finally:
        sb.stop()
    return 0


def _clusters(state: dict) -> list[dict]:
    """The Kubernetes API of every sandbox GKE cluster (each with its Services' loopback ports)."""
    return [*(state.get("clusters_kube") or {}).values(), state.get("kube", {})]


def _pull_seconds(sb, time_scale: float) -> float:
    from sandbox.core import DEFAULT_DELAYS

    return float(DEFAULT_DELAYS.get("image_pull", 0.0)) * time_scale


if __name__ == "__main__":
    raise SystemExit(main())
