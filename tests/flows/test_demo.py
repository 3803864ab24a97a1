"""The README's main command: sandbox + Prefect server + deployed flows + a lifecycle, end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from manifests.fleet import deployment_name
from tests.flows.conftest import ROOT


@pytest.mark.long
@pytest.mark.timeout(600)
def test_demo_runs_the_lifecycle_through_a_prefect_worker(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "LLM_FLEET_", "HF_", "SLACK_"))}
    res = subprocess.run([sys.executable, "-m", "llm_fleet.cli", "demo", "--state-dir", str(tmp_path / "demo"),
                          "--time-scale", "0.005"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=560)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
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
