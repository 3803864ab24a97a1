"""How long do 20 models take in one deploy_fleet run, against one model? (target: ≤ 1.5 × one model)

Runs the product's deploy_fleet flow (a real Prefect server, the real clients) against the sandbox:
first one model (provision its cluster, deploy it), then 20 models on 4 clusters (5 models sharing
each cluster's GPU pool, each cluster in its own project), all from fresh clusters. Prints both wall
times and their ratio. The sandbox's clock is compressed (--time-scale): at 0.02 a 5-minute cluster
create takes 6 s, so cloud delays stay the critical path as they are on GKE.

    uv run python bench/fleet.py [--models 20] [--per-cluster 5] [--time-scale 0.02]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGET = 1.5


def spec(name: str, project: str, pool_nodes: int) -> dict:
    data = yaml.safe_load((ROOT / "deployments" / "qwen2.5-7b-sglang.yaml").read_text())
    data["name"] = name
    data["cluster"]["project"] = project
    data["accelerator"] = {"type": "nvidia-l4", "pool": {"max_nodes": pool_nodes, "initial_nodes": pool_nodes,
                                                         "min_nodes": 0}}
    return data


def run(specs: list[dict], label: str) -> float:
    from prefect.artifacts import Artifact

    from flows.deploy_fleet import deploy_fleet

    start = time.perf_counter()
    state = deploy_fleet(specs=specs, max_parallel=len(specs) + 8, return_state=True)
    took = time.perf_counter() - start
    rows = yaml.safe_load(Artifact.get("deploy-fleet").data)
    deployed = sum(r["status"] == "deployed" for r in rows)
    print(f"  {label}: {deployed}/{len(specs)} deployed in {took:.1f} s"
          + ("" if state.is_completed() else f" — {state.message[:300]}"), flush=True)
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--per-cluster", type=int, default=5)
    parser.add_argument("--time-scale", type=float, default=0.02)
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="postgres",
                        help="the Prefect server's database: the embedded SQLite, or PostgreSQL as in production")
    args = parser.parse_args()

    os.environ.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "ERROR",
                       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                       "LLM_FLEET_POLL_INITIAL_S": "0.05", "LLM_FLEET_POLL_MAX_S": "0.2",
                       "LLM_FLEET_RETRY_INITIAL_S": "0.05", "PREFECT_CLIENT_MAX_RETRIES": "10"})
    import tempfile

    from prefect.testing.utilities import prefect_test_harness

    from sandbox.app import Sandbox

    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    sb = Sandbox(time_scale=args.time_scale, state_dir=tmp / "sandbox")
    sb.start()
    os.environ.update(sb.env())
    os.environ["LLM_FLEET_TIME_SCALE"] = str(args.time_scale)
    from tasks.settings import reload_settings

    reload_settings()
    stack = contextlib.ExitStack()
    try:
        if args.db == "postgres":
            from tests.flows.server_support import postgres_server, prefect_server

            url = stack.enter_context(postgres_server())
            api, _ = stack.enter_context(prefect_server(tmp / "prefect", PREFECT_API_DATABASE_CONNECTION_URL=url))
            from prefect.settings import PREFECT_API_URL, temporary_settings

            stack.enter_context(temporary_settings(updates={PREFECT_API_URL: api}))
        else:
            stack.enter_context(prefect_test_harness(server_startup_timeout=120))
        with stack:
            print(f"deploy_fleet on the sandbox (time scale {args.time_scale}; Prefect server on {args.db}; "
                  "2 shared cores)", flush=True)
            one = run([spec("solo", f"b-{uuid.uuid4().hex[:10]}", 1)], "1 model")
            clusters = max(1, args.models // args.per_cluster)
            projects = [f"b-{uuid.uuid4().hex[:10]}" for _ in range(clusters)]
            for p in projects:  # 5 L4s per cluster (the default quota fits fewer)
                for metric in ("NVIDIA_L4_GPUS", "CPUS"):
                    sb.client().set_quota("us-central1", metric, 1000, project=p)
            many = [spec(f"m{i:02d}", projects[i % clusters], args.per_cluster) for i in range(args.models)]
            n = run(many, f"{args.models} models on {clusters} clusters")
    finally:
        sb.stop()
    ratio = n / one
    print(f"\n{args.models} models ÷ 1 model wall time: {ratio:.2f}  (target ≤ {TARGET}: "
          f"{'met' if ratio <= TARGET else 'NOT met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
