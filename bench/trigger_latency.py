"""How long from a commit on the Hub to a scheduled release run: the webhook path vs waiting for a scan.

Starts the sandbox and a Prefect test server (events, triggers and actions services on), deploys
release_model from prefect.yaml to a pool no worker polls, runs `llm-fleet webhook`'s server, registers
it as a Hub webhook, then pushes N commits to a tracked branch and times push → flow run created (by
the deployment trigger, with that commit as `revision`). Prints the spread and the ratio to
watch_revisions' expected wait (half its 10-minute interval).

    uv run python bench/trigger_latency.py [--pushes 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
MODEL = "Qwen/Qwen2.5-7B-Instruct"
SCAN_INTERVAL_S = 600


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pushes", type=int, default=10)
    args = parser.parse_args()

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL

    from bench._support import prefect_server
    from sandbox.app import Sandbox
    from servers.webhook import make_server

    tmp = Path(tempfile.mkdtemp(prefix="trigger-bench-"))
    with Sandbox(time_scale=0.01, state_dir=tmp / "sandbox") as sb, prefect_server():
        os.environ.update(sb.env())
        from tasks.settings import reload_settings

        reload_settings()
        api = PREFECT_API_URL.value()
        with get_client(sync_client=True) as client:
            client.create_work_pool(WorkPoolCreate(name="bench-no-worker", type="process"))
        subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--name", "release_model/blue-green",
                        "--pool", "bench-no-worker"], cwd=ROOT, env={**os.environ, "PREFECT_API_URL": api},
                       check=True, capture_output=True)
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name("release_model/blue-green")

        branch = "bench"
        sb.hub.push_revision(MODEL, branch)
        spec = yaml.safe_load((ROOT / "deployments" / "qwen2.5-7b-sglang.yaml").read_text())
        spec["model"] = {"id": MODEL, "revision": branch}
        spec["cluster"]["project"] = "trigger-bench"
        spec_path = tmp / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(spec))
        server = make_server(secret="bench-secret", specs=[str(spec_path)])
        threading.Thread(target=server.serve_forever, daemon=True).start()
        sb.hub.webhooks.add(server.url, secret="bench-secret", repos=[MODEL])

        def run_for(sha: str) -> bool:
            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
            return any(r.parameters.get("revision") == sha for r in runs)

        latencies, answered = [], []
        for i in range(args.pushes):
            t0, wall0 = time.perf_counter(), time.time()
            sha = sb.hub.push_revision(MODEL, branch)
            while not run_for(sha):
                if time.perf_counter() - t0 > 60:
                    raise SystemExit(f"no release run for {sha} after 60 s")
                time.sleep(0.02)
            latencies.append(time.perf_counter() - t0)
            sb.hub.webhooks.wait_idle()
            (hook,) = sb.hub.webhooks.list()
            sent = hook["deliveries"][i]
            answered.append(sent["at"] + sent["seconds"] - wall0)  # when the receiver's 200 came back
        server.shutdown()

    mean = statistics.mean(latencies)
    print(f"Hub push -> release_model run created (webhook -> event -> trigger), {len(latencies)} pushes:")
    print(f"  mean {mean * 1000:.0f} ms, p50 {statistics.median(latencies) * 1000:.0f} ms, "
          f"max {max(latencies) * 1000:.0f} ms")
    print(f"  of which the receiver (secret check, Variable read/write, emit): mean "
          f"{statistics.mean(answered) * 1000:.0f} ms; the rest is Prefect's events -> triggers -> actions")
    expected_scan = SCAN_INTERVAL_S / 2
    print(f"  watch_revisions alone: a commit waits {expected_scan:.0f} s on average for the next scan "
          f"-> the webhook is {expected_scan / mean:.0f}x sooner")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
