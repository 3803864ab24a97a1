"""What the benchmarks share: a sandbox started in this process, with the product's settings pointed at it."""

from __future__ import annotations

import os

from sandbox.app import Sandbox


def start_sandbox(time_scale: float) -> Sandbox:
    """Start a sandbox and point this process's product settings at it (as `source <state-dir>/env` does)."""
    from tasks.settings import reload_settings

    sb = Sandbox(time_scale=time_scale)
    sb.start()
    os.environ.update(sb.env())
    os.environ["LLM_FLEET_TIME_SCALE"] = str(time_scale)
    reload_settings()
    return sb
