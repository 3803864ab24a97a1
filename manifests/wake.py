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
from datetime import UTC, datetime
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


def held_wait_s(requested_at: datetime | None, *, now: datetime) -> float | None:
    """Seconds from the wake event's ``occurred`` (the hold proxy's first held request) to ``now`` (the model
    answers: the hold proxy forwards what it held): what the held client waited, the trigger and the worker
    included. None for a wake no held request asked for (manual, scheduled)."""
    if requested_at is None:
        return None
    if requested_at.tzinfo is None:  # an ISO time without an offset: Prefect's events are UTC
        requested_at = requested_at.replace(tzinfo=UTC)
    return max(0.0, (now - requested_at).total_seconds())


def outcome(name: str, *, took_s: float, cloud_s: float | None, phases: str, waited_s: float | None = None,
            answering_s: float | None = None) -> str:
    """wake_model's one line. A wake asked for by a held request counts from that request's event to the model
    answering (``waited_s``: the client's wait), split into the part before this run's steps (event →
    automation trigger → worker start → the model's lock) and this run's ``answering_s``; ``took_s`` is the
    run's whole wake (smoke prompts and the switch back included). ``cloud_s``: ``took_s`` on the sandbox's
    cloud clock (None on GCP)."""
    cloud = f" ({cloud_s:.0f} s on the cloud clock)" if cloud_s is not None else ""
    if waited_s is None:
        return f"{name} serving again after {took_s:.1f} s{cloud}: {phases}"
    answering_s = took_s if answering_s is None else answering_s
    return (f"{name} serving again after {waited_s:.1f} s from the first held request "
            f"({max(0.0, waited_s - answering_s):.1f} s event → trigger → worker start, {answering_s:.1f} s until "
            f"the model answered); wake {took_s:.1f} s{cloud}: {phases}")
