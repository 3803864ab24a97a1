"""The README's main command: sandbox + Prefect server + deployed flows + a lifecycle, end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llm_fleet import localpg
from manifests.fleet import deployment_name
from tests.flows.conftest import ROOT, TIME_SCALE


def assert_lifecycle(out: str) -> None:
    """What the demo's lifecycle must have printed."""
    assert "✓ flows deployed" in out
    # Each lifecycle step ran as a flow run of its deployment in the worker.
    for flow in ("provision_cluster", "deploy_model", "release_model", "park_model", "gpu_report", "teardown"):
        assert f"▶ {deployment_name(flow)} " in out, flow
    assert out.count("✗") == 0, out[-3000:]
    # The good release promoted green; the broken revision was rolled back automatically, traffic kept.
    assert "as rehearsed — cause:" in out and "bad answer" in out
    assert '"llm-fleet.dev/color":"green"' in out  # the live Service routes to the released color
    # A request sent while parked was held and answered after the wake the hold proxy asked for.
    assert "answered 200 after" in out and "wake_model run" in out


def assert_block_catalog_without_the_collections(ui: str, state) -> None:
    """The UI offers the GCP blocks (LLM_FLEET_GCP_CREDENTIALS_BLOCK names a GcpCredentials block), from Prefect's
    bundled catalog: the server never imported the installed collections to register them (prefect_gcp brings
    google.cloud.aiplatform and grpc, ~4 CPU-s of the server's start; llm_fleet/demo.py)."""
    import httpx

    slugs = {b["slug"] for b in httpx.post(f"{ui}/api/block_types/filter", json={}, timeout=30).json()}
    assert {"gcp-credentials", "gcs-bucket", "secret", "slack-webhook"} <= slugs, sorted(slugs)
    server = next(int(line.split()[1]) for line in (state / "pids").read_text().splitlines()
                  if line.startswith("prefect-server "))
    loaded = [line for line in Path(f"/proc/{server}/maps").read_text().splitlines() if "grpc" in line]
    assert not loaded, f"the demo's Prefect server imported the collections (grpc loaded): {loaded[:1]}"


BY_HAND = [  # the README's "Then run the steps by hand", in order
    ("provision_cluster", {"spec": "{S}"}),
    ("deploy_model", {"spec": "{S}"}),
    ("release_model", {"spec": "{S}", "revision": "main"}),
    ("park_model", {"spec": "{S}"}),
    ("wake_model", {"spec": "{S}"}),
    ("gpu_report", {"start": "{START}"}),
    ("teardown", {"spec": "{S}", "cluster": "true", "dry_run": "false"}),
]


@pytest.mark.long
@pytest.mark.timeout(1500)
def test_demo_runs_the_lifecycle_then_the_readmes_steps_by_hand_succeed(tmp_path):
    """The README's main command runs the whole lifecycle through a Prefect worker, and leaves the next user
    a working setup: with --keep-running, the README's `prefect deployment run` lines (provision, deploy,
    release of main, park, wake, report, teardown) each finish Completed; Ctrl-C then stops everything and
    the demo exits 0. (One demo for both: a second one costs minutes and checks nothing more.)"""
    import re
    import shlex
    import signal
    import time
    from datetime import UTC, datetime

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "LLM_FLEET_", "HF_", "SLACK_"))}
    state = tmp_path / "demo"
    demo = subprocess.Popen([sys.executable, "-m", "llm_fleet.cli", "demo", "--state-dir", str(state),
                             "--time-scale", str(TIME_SCALE), "--keep-running"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    out: list[str] = []
    try:
        for line in demo.stdout:  # type: ignore[union-attr]
            out.append(line)
            if "Left running until Ctrl-C" in line:
                break
        text = "".join(out)
        assert "Left running until Ctrl-C" in text, text[-3000:]
        assert_lifecycle(text)
        # the server's database: PostgreSQL where it is installed (no SQLite stall)
        assert ("✓ PostgreSQL for the Prefect server" in text) == (localpg.bin_dir() is not None), text[:1000]
        for line in demo.stdout:  # type: ignore[union-attr]
            text += line
            if "park_idle:" in line:
                break
        assert "demo-broken-weights" in text and "park_idle: paused" in text, text[-2000:]
        ui = re.search(r"Prefect server \+ UI\s+(http://127\.0\.0\.1:\d+)", text).group(1)  # type: ignore[union-attr]
        assert_block_catalog_without_the_collections(ui, state)
        run_env = {**env, "PREFECT_API_URL": f"{ui}/api"}
        for line in (state / "env").read_text().splitlines():
            words = shlex.split(line, comments=True)
            if words and "=" in words[-1]:
                key, _, value = words[-1].partition("=")
                run_env[key] = value
        spec = "deployments/gemma2-2b-it-vllm-l4.yaml"
        start = datetime.now(UTC).isoformat()
        run_ids = {}
        for flow, params in BY_HAND:
            args = [a for k, v in params.items()
                    for a in ("--param", f"{k}={v.replace('{S}', spec).replace('{START}', start)}")]
            res = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", deployment_name(flow), *args,
                                  "--watch", "--watch-timeout", "600"], cwd=ROOT, env=run_env, capture_output=True,
                                 text=True, timeout=700)
            assert res.returncode == 0, f"{flow}: {res.stdout[-2000:]}{res.stderr[-2000:]}"
            run_ids[flow] = re.search(r"UUID: ([0-9a-f-]{36})", res.stdout).group(1)  # type: ignore[union-attr]
            time.sleep(0.5)
        # The demo's worker logs at INFO: `prefect flow-run logs` of a good run tells what each step did
        # (the demo ran with PREFECT_LOGGING_LEVEL=WARNING, and a good run's logs were empty).
        logs = subprocess.run([sys.executable, "-m", "prefect", "flow-run", "logs", run_ids["deploy_model"]],
                              cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=120)
        assert logs.returncode == 0 and re.search(r"\| INFO +\| Flow run ", logs.stdout), logs.stdout[-2000:]
    finally:
        os.killpg(demo.pid, signal.SIGINT)
        try:
            rest = demo.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGUSR1)  # the demo's faulthandler prints where each thread is stuck
            time.sleep(2)
            os.killpg(demo.pid, signal.SIGKILL)
            stuck = demo.communicate()[0]
            raise AssertionError(f"Ctrl-C did not stop the demo within 60 s; its threads:\n{stuck[-6000:]}") from None
    # Ctrl-C on a demo whose lifecycle succeeded: everything it started is stopped, and it exits 0.
    assert demo.returncode == 0, rest[-2000:]
    assert "✓ stopped: Prefect server, worker and sandbox" in rest and not (state / "pids").exists()
