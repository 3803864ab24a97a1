"""What the benchmarks share: a sandbox started in this process, with the product's settings pointed at it; the
model Deployment the scale benchmarks apply; this process's resident memory."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from sandbox.app import Sandbox

ROOT = Path(__file__).resolve().parents[1]


def start_sandbox(time_scale: float) -> Sandbox:
    """Start a sandbox and point this process's product settings at it (as `source <state-dir>/env` does)."""
    from tasks.settings import reload_settings

    sb = Sandbox(time_scale=time_scale)
    sb.start()
    os.environ.update(sb.env())
    os.environ["LLM_FLEET_TIME_SCALE"] = str(time_scale)
    reload_settings()
    return sb


@contextlib.contextmanager
def prefect_server() -> Iterator[str]:
    """The benchmarks' Prefect server for this process: the flow tests' (tests/flows/harness.py), PostgreSQL
    when the machine has it (what the README runs in production), else Prefect's SQLite harness with the
    server services no benchmark reads turned off. On SQLite every write queues on its single writer: a
    benchmark's concurrent flows then wait on the server, by seconds that swing with the machine's load, and
    now and then a request fails with 503 after the client's retries (bench/prefect_server_load.py: 36 flows
    of 20 tasks, SQLite 42-140 s and one failed flow run in four runs, PostgreSQL 11-12 s, none). Prefect 3.8
    already keeps its retryable "database is locked" errors out of the server's log. Yields the database."""
    from tests.flows.harness import prefect_test_server

    with prefect_test_server() as database:
        yield database


def rss_mib() -> float:
    """This process's resident memory in MiB (NaN where /proc does not say: never a pass by default)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scale_deployment(name: str, replicas: int) -> dict:
    """What deploy_model applies for the bundled SGLang spec, renamed: the product's own rendering."""
    from manifests.render import model_deployment
    from manifests.spec import load_spec, parse_spec

    data = load_spec(ROOT / "deployments/qwen2.5-7b-sglang.yaml").model_dump(mode="json", by_alias=True)
    data["accelerator"]["pool"] = {"max_nodes": 100}
    # No cache claim: the spec's is one ReadWriteOnce disk, which pods on other nodes cannot attach (as on GKE)
    # and which nothing here provisions; the scale benchmarks measure the sandbox, not storage.
    data["cache"] = {"enabled": False}
    return model_deployment(parse_spec({**data, "name": name, "replicas": replicas}), "blue")
