"""GKE custom ComputeClasses as the cluster autoscaler reads them (``cloud.google.com/v1``
``ComputeClass``): which node pools serve a class, in the order of its ``priorities``, and in which zones.

A pod asks for a class with the node selector ``cloud.google.com/compute-class: NAME``. On Standard, a
manually created node pool serves the class when its nodes carry the label (and taint)
``cloud.google.com/compute-class=NAME``; it takes the rank of the first priority rule it matches —
``nodepools`` by name, or the rule's attributes (``machineFamily``, ``machineType``, ``gpu.type`` /
``gpu.count``, ``spot``, ``flexStart``, ``reservations``), restricted to ``location.zones``. A labelled
pool matching no rule is not used; ``whenUnsatisfiable: DoNotScaleUp`` (the default) creates nothing
outside the list. Sources: cloud.google.com/kubernetes-engine/docs/concepts/about-custom-compute-classes
("Choose your fallback compute priorities", "Configure manually created node pools for ComputeClass use",
"Active migration"), .../reference/crds/computeclass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CLASS_LABEL = "cloud.google.com/compute-class"


def class_of(pod: dict[str, Any]) -> str | None:
    return ((pod.get("spec") or {}).get("nodeSelector") or {}).get(CLASS_LABEL)


@dataclass(frozen=True)
class Choice:
    """One node pool serving a class: its priority rank (0 = most preferred) and the zones it may use."""
    rank: int
    pool: Any  # sandbox.gke.state._Pool
    cluster: Any  # sandbox.gke.state._Cluster
    zones: tuple[str, ...]


def _pool_attrs(pool_data: dict[str, Any]) -> dict[str, Any]:
    config = pool_data.get("config") or {}
    accs = config.get("accelerators") or [{}]
    machine = config.get("machineType", "e2-medium")
    affinity = config.get("reservationAffinity") or {}
    return {"machine": machine, "family": machine.split("-")[0], "gpu": accs[0].get("acceleratorType"),
            "count": int(accs[0].get("acceleratorCount", 0) or 0),
            "spot": bool(config.get("spot") or config.get("preemptible")),
            "flex": bool(config.get("flexStart")),
            "reservations": list(affinity.get("values") or [])
            if affinity.get("consumeReservationType") == "SPECIFIC_RESERVATION" else [],
            "class": (config.get("labels") or {}).get(CLASS_LABEL)}


def rule_zones(rule: dict[str, Any], pool_name: str, pool_data: dict[str, Any]) -> tuple[str, ...] | None:
    """The zones of ``pool`` a priority rule may use, or None when the rule does not describe the pool."""
    a = _pool_attrs(pool_data)
    if "nodepools" in rule:
        if pool_name not in (rule.get("nodepools") or []):
            return None
    else:
        gpu = rule.get("gpu") or {}
        checks = [
            "machineType" not in rule or rule["machineType"] == a["machine"],
            "machineFamily" not in rule or rule["machineFamily"] == a["family"],
            not gpu or (gpu.get("type") == a["gpu"] and int(gpu.get("count", a["count"])) == a["count"]),
            bool(rule.get("spot")) == a["spot"],
            bool((rule.get("flexStart") or {}).get("enabled")) == a["flex"],
        ]
        res = rule.get("reservations") or {}
        if res.get("affinity") == "Specific":
            names = {r.get("name") for r in res.get("specific") or []}
            checks.append(bool(names & set(a["reservations"])))
        if not all(checks):
            return None
    zones = list(pool_data.get("locations") or [])
    allowed = ((rule.get("location") or {}).get("zones") or [])
    if allowed:
        zones = [z for z in zones if z in allowed]
    return tuple(zones) or None


def choices(cls: dict[str, Any], pools: list[tuple[Any, Any]]) -> list[Choice]:
    """The pools (of ``pools``: (cluster, pool) pairs) that serve ``cls``, best priority first."""
    name = (cls.get("metadata") or {}).get("name")
    rules = (cls.get("spec") or {}).get("priorities") or []
    out: list[Choice] = []
    for cluster, pool in pools:
        if _pool_attrs(pool.data)["class"] != name:
            continue
        for rank, rule in enumerate(rules):
            zones = rule_zones(rule, pool.name, pool.data)
            if zones:
                out.append(Choice(rank, pool, cluster, zones))
                break
    return sorted(out, key=lambda c: c.rank)


def rank_of_node(cls: dict[str, Any], pools: list[tuple[Any, Any]], pool_name: str) -> int | None:
    for c in choices(cls, pools):
        if c.pool.name == pool_name:
            return c.rank
    return None


def migrates(cls: dict[str, Any]) -> bool:
    return bool(((cls.get("spec") or {}).get("activeMigration") or {}).get("optimizeRulePriority"))


def mig_url(project: str, zone: str, mig: str) -> str:
    return f"https://www.googleapis.com/compute/v1/projects/{project}/zones/{zone}/instanceGroups/{mig}"


def gce_reason(error: str) -> str:
    """The cluster autoscaler's words for a GCE error (its FailedScaleUp event and visibility logs)."""
    if "ZONE_RESOURCE_POOL_EXHAUSTED" in error or "STOCKOUT" in error:
        return "GCE out of resources"
    if "QUOTA" in error:
        return "GCE quota exceeded"
    return "Google Compute Engine error"
