"""Requests lost while release_model moves a Vertex AI endpoint to a new model, under constant load.

Deploys deployments/gemma-vertex.yaml on the sandbox's Vertex AI emulator, then runs the Vertex release
(new model at 0 %, one traffic-split update to 100 %, analysis, old model undeployed after the delay)
while client threads send predict requests back to back — the seed's own call path (aiplatform_v1
PredictionServiceClient over REST). Prints the failed/total figure, the share the new model served,
and the release's wall time against the model's weight-load time.

    uv run python bench/vertex_release.py [--clients 4] [--time-scale 0.005]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--time-scale", type=float, default=0.005)
    args = parser.parse_args()

    for k, v in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                 "LLM_FLEET_POLL_INITIAL_S": "0.01", "LLM_FLEET_POLL_MAX_S": "0.05",
                 "LLM_FLEET_RETRY_INITIAL_S": "0.01", "LLM_FLEET_MIN_LOAD_TIMEOUT_S": "5"}.items():
        os.environ.setdefault(k, v)
    import yaml
    from prefect import flow

    from bench._support import prefect_server, start_sandbox

    sb = start_sandbox(args.time_scale)
    from manifests.vertex import smoke_instance
    from targets.vertex.deploy import deploy
    from targets.vertex.release import release
    from tasks import vertex as tv

    spec = yaml.safe_load((ROOT / "deployments/gemma-vertex.yaml").read_text())
    spec["cluster"]["project"] = f"bench-{uuid.uuid4().hex[:8]}"
    spec["secret"] = {"prefect_block": None}
    try:
        with prefect_server():
            deployed = flow(name="deploy_model")(deploy)(spec)
            endpoint = deployed["endpoint"]
            new_sha = sb.hub.push_revision(spec["model"]["id"])
            stop = threading.Event()
            served: Counter[str] = Counter()
            failures: list[str] = []
            lock = threading.Lock()

            def load() -> None:
                while not stop.is_set():
                    try:
                        got = tv.predict_once(endpoint=endpoint, instances=[smoke_instance("Hi", 2)])
                        with lock:
                            served[got["deployed_model_id"]] += 1
                    except Exception as exc:  # noqa: BLE001 - every failure counts
                        with lock:
                            failures.append(repr(exc)[:160])

            threads = [threading.Thread(target=load, daemon=True) for _ in range(args.clients)]
            for t in threads:
                t.start()
            time.sleep(0.5)
            t0 = time.perf_counter()
            released = flow(name="release_model")(release)(spec, revision=new_sha)
            took = time.perf_counter() - t0
            time.sleep(0.5)
            stop.set()
            for t in threads:
                t.join(10)
    finally:
        sb.stop()
    total = sum(served.values()) + len(failures)
    new_share = served[released["deployed_model_id"]] / max(1, sum(served.values()))
    load_s = sb.runtime.load_seconds({"spec": {"containers": [{"image": "vllm/vllm-openai",
                                                               "args": [f"--model={spec['model']['id']}"]}]}})
    print(f"requests during the release: {total} from {args.clients} clients, failed {len(failures)} "
          f"({len(failures) / max(1, total):.4%})")
    print(f"served by the old model {sum(served.values()) - served[released['deployed_model_id']]}, "
          f"by the new one {served[released['deployed_model_id']]} ({new_share:.0%} of answers)")
    from sandbox.vertex import VERTEX_DELAYS

    # what the release must wait for anyway: provisioning, weight load, the scale-down delay (5 min default)
    path = (VERTEX_DELAYS["deploy_provision"] + load_s + 300) * args.time_scale
    print(f"release wall time {took:.2f} s; the cloud's own critical path (provision "
          f"{VERTEX_DELAYS['deploy_provision']:.0f} s + weight load {load_s:.0f} s + scale-down delay 300 s) is "
          f"{path:.2f} s at time scale {args.time_scale}: {took / path:.2f}x (the rest is the flow's own work)")
    if failures:
        print("first failures:", *failures[:3], sep="\n  ")
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
