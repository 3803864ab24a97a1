"""Which capacity option served a model's pods, and why the better ones were skipped — read from what the
cluster says (the pods' nodes, the cluster autoscaler's events), decided here without I/O.

The cluster autoscaler tells each pod it could not place why (GKE, as upstream):
``FailedScaleUp`` "Node scale up in zones Z associated with this pod failed: GCE out of resources …",
``NotTriggerScaleUp`` "pod didn't trigger scale-up: 3 in backoff after failed scale-up, …",
``TriggeredScaleUp`` "pod triggered scale-up: [{…/instanceGroups/MIG 0->1 (max: 2)}]".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from manifests.errors import FleetError
from manifests.spec import DeploymentSpec

POOL_LABEL = "cloud.google.com/gke-nodepool"
_FAILED = re.compile(r"Node scale up in zones (?P<zones>\S+) associated with this pod failed: (?P<why>[^.]+)\.")
_NOT_TRIGGERED = re.compile(r"pod didn't trigger scale-up: (?P<why>.*)$")


class CapacityExhausted(FleetError):
    """Every capacity option refused a node: nothing started, nothing is paid for."""


@dataclass
class OptionOutcome:
    index: int
    label: str
    pool: str
    served: int = 0  # pods running on it
    refused: list[str] = field(default_factory=list)  # "us-central1-a: GCE out of resources (…)"


@dataclass
class Placement:
    """Where a color's pods run, per capacity option, and what the autoscaler said about the others."""
    options: list[OptionOutcome]
    pending: int = 0
    # the autoscaler's latest word on these pods: "" (none), "triggered", or a NotTriggerScaleUp reason
    last_decision: str = ""

    @property
    def served_by(self) -> list[OptionOutcome]:
        return [o for o in self.options if o.served]

    @property
    def exhausted(self) -> bool:
        """Pods wait and the autoscaler has no option left to try: its latest word is that every node group
        is in backoff or at its maximum, and each option without room refused these pods (a backoff left
        by an earlier failure is waited out: the autoscaler tries again when it ends)."""
        why = self.last_decision
        if not (self.pending > 0 and not self.served_by and re.search(
                r"in backoff after failed scale-up|max node group size reached", why)):
            return False
        if re.search(r"didn't match|Insufficient|untolerated", why):
            return False
        return "in backoff" not in why or all(o.refused for o in self.options)

    def summary(self) -> str:
        """One line for Slack: who served, why the better options were skipped."""
        best = min((o.index for o in self.served_by), default=None)
        parts = []
        if best is not None:
            o = self.options[best]
            parts.append(f"served by option {o.index} ({o.label}, pool {o.pool})"
                         + ("" if best == 0 else " — a fallback"))
        for o in self.options[: best if best is not None else len(self.options)]:
            if o.refused:
                parts.append(f"option {o.index} ({o.label}) skipped: {'; '.join(dict.fromkeys(o.refused))}")
            elif best is not None:
                parts.append(f"option {o.index} ({o.label}) skipped: no scale-up reached it")
        if best is None and self.pending:
            parts.append(f"{self.pending} pod(s) waiting for a node")
        return "; ".join(parts) or "no pods"

    def rows(self) -> list[dict[str, Any]]:
        return [{"option": o.index, "what": o.label, "pool": o.pool, "pods": o.served,
                 "refused": "; ".join(dict.fromkeys(o.refused)) or "-"} for o in self.options]


def placement(spec: DeploymentSpec, *, pods: list[dict[str, Any]], node_pools: dict[str, str],
              events: list[dict[str, Any]]) -> Placement:
    """``pods``: a color's pods; ``node_pools``: node name -> its pool (the ``gke-nodepool`` label);
    ``events``: the namespace's events (only those about ``pods`` count), oldest first."""
    opts = spec.capacity_options
    by_pool = {spec.option_pool(i): i for i in range(len(opts))}
    out = [OptionOutcome(i, o.label(), spec.option_pool(i)) for i, o in enumerate(opts)]
    names = {p["metadata"]["name"] for p in pods}
    pending = 0
    for p in pods:
        if (p.get("metadata") or {}).get("deletionTimestamp"):
            continue
        node = (p.get("spec") or {}).get("nodeName")
        if node and node_pools.get(node) in by_pool:
            out[by_pool[node_pools[node]]].served += 1
        elif not node:
            pending += 1
    migs = {i: re.compile(rf"/zones/(?P<zone>[^/]+)/instanceGroups/gke-{re.escape(spec.cluster.name[:14].rstrip('-'))}-"
                          rf"{re.escape(out[i].pool[:14].rstrip('-'))}-[0-9a-f]{{8}}-grp ") for i in range(len(out))}
    tried: dict[int, list[str]] = {}
    refusals: dict[str, str] = {}  # zone -> the autoscaler's reason
    last = ""
    for ev in sorted(events, key=lambda e: e.get("lastTimestamp") or e.get("firstTimestamp") or ""):
        if (ev.get("involvedObject") or {}).get("name") not in names:
            continue
        msg = ev.get("message") or ""
        if ev.get("reason") == "TriggeredScaleUp":
            last = "triggered"
            for i, rx in migs.items():
                tried.setdefault(i, []).extend(m.group("zone") for m in rx.finditer(msg))
        elif ev.get("reason") == "FailedScaleUp" and (m := _FAILED.search(msg)):
            for zone in m.group("zones").split(","):
                refusals[zone] = m.group("why")
        elif ev.get("reason") == "NotTriggerScaleUp" and (m := _NOT_TRIGGERED.search(msg)):
            last = m.group("why")
    for i, zones in tried.items():
        if not out[i].served:
            out[i].refused = [f"{z}: {refusals[z]}" for z in dict.fromkeys(zones) if z in refusals]
    return Placement(out, pending, last)


def exhausted_error(spec: DeploymentSpec, found: Placement) -> CapacityExhausted:
    tried = "; ".join(f"option {o.index} ({o.label}): {'; '.join(dict.fromkeys(o.refused)) or 'not reached'}"
                      for o in found.options)
    return CapacityExhausted(f"no capacity option could start a node for {spec.name} — {tried}",
                             "add an option (another zone, GPU type or provisioning) to capacity:, raise the "
                             "quota named above, or retry later; the model stays parked meanwhile")


@dataclass(frozen=True)
class OptionRoom:
    """What one capacity option can still add now: its pool's room and its quota (GPUs free)."""
    index: int
    label: str
    max_nodes: int
    nodes: int
    quota_metric: str
    quota_free: float
    gpus_per_node: int

    @property
    def room(self) -> int:
        return max(0, min(self.max_nodes - self.nodes, int(self.quota_free // max(1, self.gpus_per_node))))


def release_room(*, live_replicas: int, candidate_replicas: int, options: list[OptionRoom],
                 strategy: str = "blue-green") -> tuple[bool, str, str]:
    """(ok, detail, fix) for a release's candidate over capacity options: the ComputeClass places each new
    node on the first option with room, so the options' room adds up (stockouts show only at scale-up)."""
    if strategy == "recreate":
        return True, "recreate: the old color stops first (downtime announced)", ""
    room = sum(o.room for o in options)
    detail = (f"{candidate_replicas} candidate replica(s) beside {live_replicas} live; room per option: "
              + ", ".join(f"[{o.index}] {o.room} ({o.nodes}/{o.max_nodes} nodes, {o.quota_free:g} "
                          f"{o.quota_metric} free)" for o in options))
    if room >= candidate_replicas:
        return True, detail, ""
    return False, detail, ("raise accelerator.pool.max_nodes or capacity[i].max_nodes (then rerun "
                           "provision_cluster) or the quota named above, add a capacity option, or set "
                           "release.strategy: recreate (the model is down while the new one loads)")


def option_of_node(spec: DeploymentSpec, node: str, bases: dict[int, set[str]] | None = None) -> int | None:
    """The capacity option a GKE node belongs to: by its pool's VM base name (``gke-<cluster>-<pool>-<hash>``,
    from the pool's instance group URLs: ``bases`` option -> bases), else by the name's pool stem — which
    GKE truncates to 14 characters, so pools named alike (``g2-standard-8``, ``g2-standard-8-od``) need
    ``bases`` to be told apart."""
    for i, stems in (bases or {}).items():
        if any(node.startswith(b + "-") for b in stems):
            return i
    stem = f"gke-{spec.cluster.name[:14].rstrip('-')}-"
    for i in sorted(range(len(spec.capacity_options)), key=lambda i: -len(spec.option_pool(i))):
        if re.match(rf"{re.escape(stem + spec.option_pool(i)[:14].rstrip('-'))}-[0-9a-f]{{8}}-", node):
            return i
    return None


# ---- back to the preferred option (issue 23) ---------------------------------------------------------
MIGRATE_STEPS = ("capacity", "bring_up", "placement", "preview", "pre_analysis", "switch", "post_analysis",
                 "record", "scale_down")


@dataclass(frozen=True)
class MigrateBack:
    """Whether to move a model serving on a fallback option back toward the first one, and why (pure).

    GKE's ``activeMigration`` drains a fallback node once a better option frees up; for a single replica
    that restarts the only pod (the model is down for a load), so the ComputeClass turns it off
    (``render.migrates_back``) and this does it the blue-green way: a new color beside the live one, placed
    by the autoscaler (the first option with capacity), switched to only if it landed on a better option
    and answers; otherwise it is scaled back to 0 and the live color never noticed."""
    migrate: bool
    reason: str
    serving_option: int | None = None


def migrate_back_decision(spec: DeploymentSpec, *, parked: bool, live: str | None, live_replicas: int,
                          other_replicas: int, live_matches_spec: bool, placement: Placement | None) -> MigrateBack:
    least = spec.autoscaling.min_replicas if spec.autoscaling else spec.replicas
    if not spec.capacity or len(spec.capacity) < 2:
        return MigrateBack(False, "one capacity option: nowhere better to move to")
    if least >= 2:
        return MigrateBack(False, "GKE's active migration moves two or more replicas itself, one at a time "
                                  "under the PodDisruptionBudget")
    if parked:
        return MigrateBack(False, "parked: its next wake starts on the first option with capacity")
    if live is None or live_replicas == 0:
        return MigrateBack(False, "no color serves")
    if other_replicas > 0:
        return MigrateBack(False, "the other color is up (a release, or its scale-down delay): not now")
    if not live_matches_spec:
        return MigrateBack(False, "the live color does not run the spec's pod template: that is a release's "
                                  "change, not a move")
    served = placement.served_by if placement is not None else []
    if not served:
        return MigrateBack(False, "the live pods run on no capacity option's node yet")
    worst = max(o.index for o in served)
    if worst == 0:
        return MigrateBack(False, f"already on the first option ({served[0].label})", 0)
    return MigrateBack(True, f"serving on option {worst} ({placement.options[worst].label}) while option 0 "
                             f"({placement.options[0].label}) is preferred: a new color goes up beside it and is "
                             "switched to only if it lands on a better option", worst)


def landed_better(candidate: Placement, *, than: int) -> tuple[bool, str]:
    """Did the migration's candidate land on an option better than ``than`` (the live color's)?"""
    served = candidate.served_by
    if not served:
        return False, "the candidate runs on no capacity option's node"
    worst = max(o.index for o in served)
    where = ", ".join(f"option {o.index} ({o.label})" for o in served)
    if worst < than:
        return True, f"on {where}, better than option {than}"
    why = "; ".join(f"option {o.index}: {', '.join(o.refused)}" for o in candidate.options[:than] if o.refused)
    return False, (f"the candidate landed on {where}, no better than option {than}: the preferred option has no "
                   f"capacity yet" + (f" ({why})" if why else ""))
