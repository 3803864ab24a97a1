"""GPU usage, pure: node lifetimes from the VMs' own operations and GKE's, GPU-hours in a window.

Kubernetes keeps no history: a deleted Node is gone, and ``creationTimestamp`` has whole seconds. Compute
Engine does: every node is a VM of the pool's managed instance group, and each VM's insert and delete is an
operation with millisecond times (the cluster autoscaler's too) -- the exact life of every node, sighted or
not (:func:`node_spans`). For what GCE no longer lists, the product keeps a ledger (one record per GPU node:
first creation time, last time seen, first time seen missing) and refines both ends with the node pool's GKE
operations (the pool changes size when a create/resize/delete operation finishes); a node the autoscaler
removed between sightings ends halfway between the last sighting and the first miss.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
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
    # Python parses at most 6 fractional digits (GKE sends 9); the offset after them stays (GCE: -08:00)
    text = re.sub(r"\.(\d+)", lambda m: "." + m.group(1)[:6], text, count=1)
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


@dataclass
class VmOp:
    """A VM's own Compute Engine operation: ``insert`` (the node's VM exists from ``at``) or ``delete``."""
    name: str
    kind: str  # "insert" | "delete"
    at: float  # the operation's endTime (milliseconds)


def vm_spans(ops: list[VmOp], *, gpus: int) -> dict[str, NodeSpan]:
    """Each VM's life from its insert/delete operations, by name (a reused name: its last life). A VM whose
    insert is no longer listed gets ``start = -inf`` (the caller takes it from the ledger or the window)."""
    out: dict[str, NodeSpan] = {}
    for op in sorted(ops, key=lambda o: o.at):
        if op.kind == "insert":
            out[op.name] = NodeSpan(op.name, gpus, op.at, None)
        elif op.kind == "delete":
            span = out.get(op.name)
            if span is None:
                out[op.name] = NodeSpan(op.name, gpus, -math.inf, op.at)
            elif span.end is None:
                span.end = op.at
    return out


def node_spans(ledger: dict[str, Any], ops: list[Op], vm_ops: list[VmOp], *, gpus: int, now: float) -> list[NodeSpan]:
    """Every GPU node of the pool: the VMs' own operations where GCE still lists them (exact, and a node
    no sighting ever saw is counted too), else the ledger's sightings refined by GKE's operation times."""
    seen = {n.name: n for n in spans(ledger, ops, now)}
    exact = vm_spans(vm_ops, gpus=gpus)
    out = []
    for name, span in exact.items():
        sighted = seen.pop(name, None)
        if sighted is not None:
            span.gpus = sighted.gpus
            if span.start == -math.inf:
                span.start = sighted.start
        if span.start != -math.inf:
            out.append(span)
    return out + list(seen.values())


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


def report_window(day: date | str | None, start: datetime | str | float | None,
                  end: datetime | str | float | None, now: float) -> tuple[float, float]:
    """[start, end) in epoch seconds: explicit bounds (datetimes, ISO strings or epoch seconds; naive = UTC),
    else the given UTC day, else yesterday (UTC)."""
    def at(v: datetime | str | float) -> float:
        if isinstance(v, datetime):
            return (v if v.tzinfo else v.replace(tzinfo=UTC)).timestamp()
        if isinstance(v, str):
            parsed = datetime.fromisoformat(v.replace("Z", "+00:00")) if not re.fullmatch(r"[\d.]+", v) else None
            return at(parsed) if parsed is not None else float(v)
        return float(v)

    if start is not None or end is not None:
        lo = at(start) if start is not None else now - 86400
        hi = at(end) if end is not None else now
        return lo, hi
    if isinstance(day, str):
        day = date.fromisoformat(day)
    d = datetime(day.year, day.month, day.day, tzinfo=UTC) if day else \
        datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
    return d.timestamp(), (d + timedelta(days=1)).timestamp()


def _r(x: float, digits: int) -> float:
    """Rounded, without a negative zero (-0.0 prints as "-0.00")."""
    return round(x, digits) + 0.0


def human_duration(seconds: float) -> str:
    """42 s, 12 min, 3.4 h: a parked stretch of a 2-minute window does not print as "0.0 h"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def usage_row(*, model: str, accelerator: str, spans: list[NodeSpan], lo: float, hi: float, share: int,
              replicas: int, gpus_per_replica: int, usd_per_gpu_hour: float, time_scale: float = 1.0
              ) -> dict[str, Any]:
    """One model's figures in [lo, hi): GPU-hours used (its share of the pool), time parked (no GPU node
    since the model's first node), and what always-on would have used: the same plus the parked time at
    ``replicas`` x GPUs -- so the saving is what parking avoided, never negative."""
    used_s = gpu_seconds(spans, lo, hi) / share
    first = min((s.start for s in spans), default=None)
    since = max(lo, first) if first is not None else None
    parked_s = zero_seconds(spans, lo, hi, since=since) if since is not None else 0.0
    avoided_s = parked_s * replicas * gpus_per_replica
    always_on_s = used_s + avoided_s
    cost, always_cost = used_s / 3600 * usd_per_gpu_hour, always_on_s / 3600 * usd_per_gpu_hour
    row = {"model": model, "accelerator": accelerator, "gpu_hours": _r(used_s / 3600, 6),
           "parked_hours": _r(parked_s / 3600, 6), "parked": human_duration(parked_s),
           "always_on_gpu_hours": _r(always_on_s / 3600, 6), "usd_per_gpu_hour": _r(usd_per_gpu_hour, 4),
           "cost": _r(cost, 4), "always_on_cost": _r(always_cost, 4), "saving": _r(always_cost - cost, 4),
           "saving_pct": _r(100 * avoided_s / always_on_s, 1) if always_on_s else 0.0,
           "shared_pool_with": share - 1}
    if time_scale != 1.0:  # the sandbox's clock runs fast: the same figures in cloud time
        row["cloud_gpu_hours"] = _r(used_s / time_scale / 3600, 3)
    return row
