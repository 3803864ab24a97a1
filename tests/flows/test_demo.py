"""The README's main command: sandbox + Prefect server + deployed flows + a lifecycle, end to end."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.flows.conftest import ROOT


def test_demo_runs_the_lifecycle_through_a_prefect_worker(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "LLM_FLEET_", "HF_", "SLACK_"))}
    res = subprocess.run([sys.executable, "-m", "llm_fleet.cli", "demo", "--state-dir", str(tmp_path / "demo"),
                          "--time-scale", "0.005"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    assert "✓ flows deployed" in out
    assert out.count(": Completed in") == 2  # provision_cluster and deploy_model ran in the worker
    # What the real CLIs saw afterwards: a running cluster, a Ready pod, the Service on blue.
    assert "RUNNING" in out and "1/1     Running" in out
    assert '"llm-fleet.dev/color":"blue"' in out
    assert '"id": "google/gemma-2-2b-it"' in out
