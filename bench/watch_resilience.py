"""How long a change takes to reach a wait when its watch is healthy, expired (410) or dropped.

    uv run --frozen python bench/watch_resilience.py [--rounds 20]

Against the sandbox's default Kubernetes API, an Informer (tasks/watching.py) watches ConfigMaps;
each round starts an informer, and 80 ms later creates one and times "created -> the informer has
it". With a fault, the informer's watch was expired (410 Gone, history compacted) or dropped 50 ms
in, so the change arrives through the relist. Prints mean/p50/max per case and the ratio to the healthy case.
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()

    import yaml
    from kubernetes import client

    from sandbox import fault_presets as fp
    from sandbox.app import Sandbox
    from sandbox.client import SandboxClient

    state = Path(tempfile.mkdtemp(prefix="bench-watch-"))
    sb = Sandbox(time_scale=0.01, state_dir=state)
    sb.start()
    os.environ.update(sb.env())
    from tasks.clients import kube_client
    from tasks.settings import reload_settings
    from tasks.watching import Informer

    reload_settings()
    config = yaml.safe_load(Path(sb.env()["KUBECONFIG"]).read_text())
    config["current-context"] = "sandbox"
    (state / "kc.yaml").write_text(yaml.safe_dump(config))
    core = client.CoreV1Api(kube_client(str(state / "kc.yaml")))
    sbc = SandboxClient(sb.url)
    results: dict[str, list[float]] = {}
    try:
        for case in ("healthy", "watch_expire", "watch_drop"):
            ns = f"b-{uuid.uuid4().hex[:6]}"
            core.create_namespace({"metadata": {"name": ns}})
            times = []
            for i in range(args.rounds):
                if case != "healthy":  # the informer's first watch breaks 50 ms in
                    sbc.add_fault(**getattr(fp, case)(path=f"/namespaces/{ns}/configmaps$", after=0.05))
                inf = Informer(core.api_client, core.list_namespaced_config_map, queue.Queue(), namespace=ns)
                inf.start()
                inf.synced.wait(10)
                time.sleep(0.08)  # past the fault: the change below must come through a relist
                name = f"c{i}"
                start = time.perf_counter()
                core.create_namespaced_config_map(ns, {"metadata": {"name": name}})
                while name not in inf.items:
                    time.sleep(0.0005)
                times.append(time.perf_counter() - start)
                inf.stop()
            sbc.clear_faults()
            results[case] = times
    finally:
        sb.stop()
    base = statistics.mean(results["healthy"])
    print(f"{'case':<14}{'mean ms':>9}{'p50 ms':>9}{'max ms':>9}{'x healthy':>11}")
    for case, times in results.items():
        ms = [t * 1000 for t in times]
        print(f"{case:<14}{statistics.mean(ms):>9.1f}{statistics.median(ms):>9.1f}{max(ms):>9.1f}"
              f"{statistics.mean(times) / base:>11.2f}")


if __name__ == "__main__":
    main()
