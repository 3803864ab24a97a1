"""GPU usage, pure: node lifetimes from observations refined by GKE operation times, GPU-hours in a window.

Kubernetes keeps no history: a deleted Node is gone, and ``creationTimestamp`` has whole seconds. So the
product keeps a ledger (one record per GPU node: first creation time, last time seen, first time seen
missing) and refines both ends with the node pool's GKE operations, whose start/end times are precise
(the pool changes size when a create/resize/delete/autoscaling operation finishes). A node the cluster
autoscaler removed (no operation) ends halfway between the last sighting and the first miss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# Operations that add nodes to a pool when they finish, and those that take nodes away. Raising
# autoscaling's minimum adds nodes; lowering it does not remove any (the cluster autoscaler does, later,
# with no operation of its own).
ADDING_OPS = {"CREATE_NODE_POOL", "SET_NODE_POOL_SIZE", "UPGRADE_NODES", "UPDATE_CLUSTER"}
REMOVING_OPS = {"SET_NODE_POOL_SIZE", "DELETE_NODE_POOL", "DELETE_CLUSTER", "UPGRADE_NODES"}
SPARK = "▁▂▃▄▅▆▇█"


def ts(value: str | float | None) -> float | None:
    """RFC 3339 (any precision, Z or offset) → epoch seconds."""
    if value is None or isinstance(value, int | float):
        return value
    text = value.replace("Z", "+00:00")
    if "." in text:  # Python parses at most 6 fractional digits (GKE sends 9)
        head, rest = text.split(".", 1)
        digits = "".join(ch for ch in rest if ch.isdigit())
        tz = rest[len(digits):]
        text = f"{head}.{digits[:6]}{tz}"
    return datetime.fromisoformat(text).timestamp()


@dataclass
class Op:
    type: str
    start: float
    end: float | None


@dataclass
class NodeSpan:
    name: str
    gpus: int
    start: float
    end: float | None  # None: still running


def observe(ledger: dict[str, Any], live: list[dict[str, Any]], now: float) -> dict[str, Any]:
    """Fold one sighting of the pool's GPU nodes into the ledger (JSON-able, returned as a new dict).

    ``live``: ``{"name", "created" (epoch s), "gpus"}`` per node now. Records: ``[created, last_seen,
    missing_since | None, gpus]``.
    """
    nodes = {k: list(v) for k, v in (ledger.get("nodes") or {}).items()}
    seen = {n["name"] for n in live}
    for n in live:
        rec = nodes.get(n["name"])
        if rec is None or rec[2] is not None:  # new (or a name reused after it had gone)
            nodes[n["name"]] = [n["created"], now, None, int(n["gpus"])]
        else:
            rec[1] = now
    for name, rec in nodes.items():
        if name not in seen and rec[2] is None:
            rec[2] = now
    return {"nodes": nodes, "observed": now}


def prune(ledger: dict[str, Any], *, before: float) -> dict[str, Any]:
    """Drop nodes that were gone before ``before`` (already reported)."""
    nodes = {k: v for k, v in (ledger.get("nodes") or {}).items() if v[2] is None or v[2] >= before}
    return {**ledger, "nodes": nodes}


def spans(ledger: dict[str, Any], ops: list[Op], now: float) -> list[NodeSpan]:
    """Each recorded node's [start, end) with the operation times laid over the observation bounds."""
    done = sorted((o for o in ops if o.end is not None), key=lambda o: o.end)
    out = []
    for name, (created, last_seen, missing, gpus) in (ledger.get("nodes") or {}).items():
        # creationTimestamp has whole seconds: the operation that finished right after it started it
        # (nodes join while their operation runs; it ends moments later, possibly in the next second).
        start = next((o.end for o in done if o.type in ADDING_OPS and created <= o.end < created + 2.0),
                     created + 0.5)
        end = None
        if missing is not None:
            end = next((o.end for o in done if o.type in REMOVING_OPS and last_seen < o.end <= missing),
                       (last_seen + missing) / 2)
        out.append(NodeSpan(name, int(gpus), start, end))
    return out


def overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def gpu_seconds(nodes: list[NodeSpan], start: float, end: float) -> float:
    return sum(n.gpus * overlap(n.start, n.end if n.end is not None else end, start, end) for n in nodes)


def zero_seconds(nodes: list[NodeSpan], start: float, end: float, *, since: float | None = None) -> float:
    """Time in [max(start, since), end) with no GPU node at all (parked, or scaled to zero)."""
    lo = max(start, since) if since is not None else start
    if lo >= end:
        return 0.0
    cuts = sorted({lo, end, *[t for n in nodes for t in (n.start, n.end) if t is not None and lo < t < end]})
    zero = 0.0
    for a, b in zip(cuts, cuts[1:], strict=False):
        mid = (a + b) / 2
        if not any(n.start <= mid < (n.end if n.end is not None else math.inf) for n in nodes):
            zero += b - a
    return zero


def sparkline(nodes: list[NodeSpan], start: float, end: float, buckets: int = 24) -> str:
    """Average GPUs in each of ``buckets`` slices of the window (hours, for a day), as ▁..█."""
    width = (end - start) / buckets
    values = [gpu_seconds(nodes, start + i * width, start + (i + 1) * width) / width for i in range(buckets)]
    top = max(values) or 1.0
    return "".join(" " if v == 0 else SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1) + 0.5))]
                   for v in values)
