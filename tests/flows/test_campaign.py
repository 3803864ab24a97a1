"""A short seeded fault campaign (bench/campaign.py): invariants I1-I5 hold under random operations and
faults. The long one is the benchmark; a failure here prints the seed and the operation log to replay."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("LLM_FLEET_CAMPAIGN_SEED", "7"))


@pytest.mark.long
@pytest.mark.timeout(1500)  # its own sandbox, Prefect server and a process per operation: minutes
def test_short_seeded_campaign_has_no_violations():
    # Its own sandbox and Prefect server (the campaign restarts the server and kills flow processes).
    done = subprocess.run([sys.executable, str(ROOT / "bench/campaign.py"), "--seed", str(SEED), "--ops", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    out = done.stdout + done.stderr[-3000:]
    assert "violations: 0" in done.stdout and done.returncode == 0, f"campaign seed {SEED} failed:\n{out}"
