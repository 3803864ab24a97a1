"""What every controller of the sandbox cluster shares: the resource types they watch and small pod helpers.

``set_condition`` is the status-condition update of every controller here (upstream
``deploymentutil.SetDeploymentCondition``, ``podutil.UpdatePodCondition`` and kin);
``int_or_percent`` scales ``maxSurge`` / ``maxUnavailable`` / ``minAvailable`` like
``intstr.GetScaledValueFromIntOrPercent``.
"""

from __future__ import annotations

from typing import Any

from sandbox.core import now_rfc3339
from sandbox.kube import resources as res
from sandbox.kube.defaults import GPU, parse_quantity

Obj = dict[str, Any]
T = res.BY_KEY
PODS, NODES, NS = T[("", "pods")], T[("", "nodes")], T[("", "namespaces")]
SVCS, EPS, EVENTS, SAS = T[("", "services")], T[("", "endpoints")], T[("", "events")], T[("", "serviceaccounts")]
DEPLOYS, RSS = T[("apps", "deployments")], T[("apps", "replicasets")]
HPAS, PDBS = T[("autoscaling", "horizontalpodautoscalers")], T[("policy", "poddisruptionbudgets")]


def pod_gpus(pod: Obj) -> float:
    total = 0.0
    for c in (pod.get("spec") or {}).get("containers") or []:
        r = c.get("resources") or {}
        v = (r.get("requests") or {}).get(GPU, (r.get("limits") or {}).get(GPU))
        if v is not None:
            total += parse_quantity(v) or 0.0
    return total


def pod_requests(pod: Obj, resource: str) -> float:
    total = 0.0
    for c in (pod.get("spec") or {}).get("containers") or []:
        v = ((c.get("resources") or {}).get("requests") or {}).get(resource)
        if v is not None:
            total += parse_quantity(v) or 0.0
    return total


def owner_name(obj: Obj, kind: str) -> str | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("kind") == kind and ref.get("controller"):
            return ref.get("name")
    return None


def owned_by(obj: Obj, uid: str) -> bool:
    return any(r.get("uid") == uid and r.get("controller") for r in obj["metadata"].get("ownerReferences") or [])


def is_ready(pod: Obj) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def int_or_percent(value: Any, total: int, round_up: bool) -> int:
    if isinstance(value, int):
        return value
    text = str(value or "0")
    if text.endswith("%"):
        pct = int(text[:-1] or 0)
        raw = pct * total / 100
        return int(-(-raw // 1)) if round_up else int(raw // 1)
    try:
        return int(text)
    except ValueError:
        return 0


def set_condition(conds: list[Obj], ctype: str, status: str, reason: str = "", message: str = "",
                  now: str | None = None, probe: bool = True, update_time: bool = False) -> list[Obj]:
    now = now or now_rfc3339()
    out = [dict(c) for c in conds]
    cur = next((c for c in out if c.get("type") == ctype), None)
    if cur is None:
        cur = {"type": ctype}
        if probe:
            cur["lastProbeTime"] = None
        out.append(cur)
    if cur.get("status") != status:
        cur["lastTransitionTime"] = now
    if update_time and (cur.get("status") != status or cur.get("reason") != reason):
        cur["lastUpdateTime"] = now
    cur["status"] = status
    if reason:
        cur["reason"] = reason
    else:
        cur.pop("reason", None)
    if message:
        cur["message"] = message
    else:
        cur.pop("message", None)
    return out
