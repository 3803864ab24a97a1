"""A wake, phase by phase (pure): node, image, weights, engine, smoke — from what the cluster says about the
pod (the kubelet's ``Pulled`` event, the engine's own start-up log lines) and the wake's own step timings.
``wake_model`` reports it in Slack and its artifact; ``gpu_report`` shows p50/p95 per model; the prewarm
before a scheduled wake leads by the p95 of the measured wakes (``manifests.park.prewarm_s``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

PHASES = ("node", "image", "weights", "engine", "smoke")


@dataclass(frozen=True)
class WakePhases:
    """Cloud seconds of each phase of a wake."""

    node: float
    image: float
    weights: float
    engine: float  # engine start: init, CUDA graphs, until the pod is Ready
    smoke: float

    @property
    def total(self) -> float:
        return self.node + self.image + self.weights + self.engine + self.smoke

    def line(self) -> str:
        return " · ".join(f"{p} {getattr(self, p):.0f} s" for p in PHASES)

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in asdict(self).items()}


def pulled_seconds(events: Iterable[dict[str, Any]]) -> float | None:
    """The kubelet's ``Successfully pulled image "X" in 12.3s`` (0 for ``already present on machine``)."""
    for e in events:
        if e.get("reason") != "Pulled":
            continue
        msg = e.get("message") or ""
        if "already present on machine" in msg:
            return 0.0
        if m := re.search(r" in ([\d.]+)(ms|s)\b", msg):
            return float(m.group(1)) / (1000.0 if m.group(2) == "ms" else 1.0)
    return None


def weight_seconds(log_lines: Iterable[str]) -> float:
    """What the engine says its weights took: vLLM's download and load lines, TGI's shard, SGLang's load."""
    download = load = 0.0
    for line in log_lines:
        if m := re.search(r"Time spent downloading weights for \S+: ([\d.]+) seconds", line):
            download = float(m.group(1))
        elif m := re.search(r"Loading weights took ([\d.]+) seconds", line):
            load = float(m.group(1))
    return download + load


def phases(*, node_s: float, ready_s: float, smoke_s: float, pulled_s: float | None,
           weights_s: float) -> WakePhases:
    """``ready_s``: from the node being there to the pod answering (pull + engine start); the engine's part
    is what the pull and the weights leave of it."""
    image = max(0.0, pulled_s or 0.0)
    weights = max(0.0, min(weights_s, ready_s - image))
    return WakePhases(node=max(0.0, node_s), image=image, weights=weights,
                      engine=max(0.0, ready_s - image - weights), smoke=max(0.0, smoke_s))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]
