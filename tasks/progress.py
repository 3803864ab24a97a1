"""Progress of the long waits (cluster create, node pool, model load) as a Prefect progress artifact.

Nobody should stare at a silent UI or terminal for ten minutes: each long wait keeps one progress
artifact of its flow run current (the Prefect UI shows it; ``llm-fleet demo`` prints it as one line).
GKE and the model servers report no percentage, so progress is elapsed time against the typical
duration of the step (capped at 99 % until the step really finishes), with the latest status text
in the description. An artifact that cannot be written never fails the wait.
"""

from __future__ import annotations

import re
import time
from typing import Any

from tasks.log import logger
from tasks.settings import get_settings

# Typical real-GKE durations in seconds, by operation type (the sandbox's defaults are the same).
TYPICAL_OPERATION_S = {"CREATE_CLUSTER": 300.0, "DELETE_CLUSTER": 180.0, "CREATE_NODE_POOL": 120.0,
                       "DELETE_NODE_POOL": 60.0, "SET_NODE_POOL_SIZE": 30.0, "UPGRADE_MASTER": 600.0}
MIN_INTERVAL_S = 1.0  # at most one artifact update per second per wait


class WaitProgress:
    def __init__(self, what: str, *, expected_s: float) -> None:
        self.what = what
        self.expected_s = max(expected_s, 1e-3)
        self.started = time.monotonic()
        self.artifact_id: Any = None
        self._sent = (-1.0, 0.0)  # (percent, monotonic time) of the last update
        try:
            from prefect.artifacts import create_progress_artifact

            # a key makes it show on the UI's Artifacts page too (lowercase letters, digits, dashes)
            key = re.sub(r"[^a-z0-9]+", "-", f"progress-{what}".lower()).strip("-")[:100]
            self.artifact_id = create_progress_artifact(progress=0.0, key=key, description=what)
        except Exception as exc:  # noqa: BLE001 - progress is a courtesy, never a failure
            logger().debug("no progress artifact for %s: %s", what, exc)

    def percent(self) -> float:
        return min(99.0, 100.0 * (time.monotonic() - self.started) / self.expected_s)

    def update(self, detail: str = "", *, percent: float | None = None) -> None:
        pct = round(self.percent() if percent is None else percent, 1)
        now = time.monotonic()
        last_pct, last_at = self._sent
        if self.artifact_id is None or (pct - last_pct < 1.0 and pct < 100.0) or (
                now - last_at < MIN_INTERVAL_S and pct < 100.0):
            return
        self._sent = (pct, now)
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.artifact_id, pct,
                                     description=f"{self.what}: {detail}" if detail else self.what)
        except Exception as exc:  # noqa: BLE001
            logger().debug("progress artifact update failed: %s", exc)

    def done(self, detail: str = "done") -> None:
        self.update(detail, percent=100.0)


def operation_progress(operation_type: str, target: str) -> WaitProgress:
    """For a GKE operation: 'create cluster llm-fleet', expected from its type (sandbox: time-scaled)."""
    expected = TYPICAL_OPERATION_S.get(operation_type, 60.0) * get_settings().time_scale
    what = f"GKE {operation_type.lower().replace('_', ' ')} {target}".strip()
    return WaitProgress(what, expected_s=expected)
