"""The scheduler: place pending pods on nodes that fit, or say why none does; bind.

Mirrors kube-scheduler ``pkg/scheduler``: the filter plugins NodeAffinity (``nodeSelector`` and
required node affinity), TaintToleration, NodeResourcesFit (GPU, cpu, memory, pods) and
VolumeBinding (``sandbox.kube.storage``), a ``FailedScheduling`` event and a ``PodScheduled=False
Unschedulable`` condition worded like ``framework.FitError`` ("0/N nodes are available: …"), then
the binding. A pod that fits nowhere may trigger Autopilot provisioning (``autopilot.py``). Pod IPs
(the node's CNI IPAM upstream) are handed out at bind time.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from sandbox.core import now_rfc3339
from sandbox.kube.controllers.base import ControllerBase
from sandbox.kube.controllers.common import NODES, PODS, Obj, pod_gpus, pod_requests, set_condition
from sandbox.kube.defaults import GPU, parse_quantity

if TYPE_CHECKING:
    from sandbox.kube.cluster import KubeCluster


class Scheduler(ControllerBase):
    """``schedule()`` places every pending pod; ``bind(pod, node)`` then starts the kubelet's image pull."""

    def __init__(self, cluster: KubeCluster) -> None:
        super().__init__(cluster)
        self._ip = 0

    # ---- scheduler --------------------------------------------------------------------------
    @staticmethod
    def _selector_ok(pod: Obj, node: Obj) -> bool:
        labels = node["metadata"].get("labels") or {}
        spec = pod.get("spec") or {}
        for k, v in (spec.get("nodeSelector") or {}).items():
            if labels.get(k) != v:
                return False
        req = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
               .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
        terms = req.get("nodeSelectorTerms") or []
        if not terms:
            return True
        for term in terms:
            ok = True
            for expr in term.get("matchExpressions") or []:
                key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
                val = labels.get(key)
                if op == "In":
                    ok = val in values
                elif op == "NotIn":
                    ok = val not in values
                elif op == "Exists":
                    ok = key in labels
                elif op == "DoesNotExist":
                    ok = key not in labels
                elif op in ("Gt", "Lt"):
                    try:
                        ok = (int(val) > int(values[0])) if op == "Gt" else (int(val) < int(values[0]))
                    except (TypeError, ValueError, IndexError):
                        ok = False
                if not ok:
                    break
            for expr in term.get("matchFields") or []:
                if expr.get("key") == "metadata.name":
                    inside = node["metadata"]["name"] in (expr.get("values") or [])
                    ok = ok and (inside if expr.get("operator") == "In" else not inside)
            if ok:
                return True
        return False

    @staticmethod
    def _untolerated(pod: Obj, node: Obj) -> Obj | None:
        tolerations = (pod.get("spec") or {}).get("tolerations") or []
        for taint in (node.get("spec") or {}).get("taints") or []:
            if taint.get("effect") not in ("NoSchedule", "NoExecute"):
                continue
            tolerated = False
            for tol in tolerations:
                if tol.get("effect") and tol.get("effect") != taint.get("effect"):
                    continue
                op = tol.get("operator", "Equal")
                any_key = not tol.get("key") and op == "Exists"
                same = tol.get("key") == taint.get("key") and (
                    op == "Exists" or tol.get("value", "") == taint.get("value", ""))
                tolerated = any_key or same
                if tolerated:
                    break
            if not tolerated:
                return taint
        return None

    def schedule(self) -> None:
        nodes, _ = self.store.list(NODES)
        pods, _ = self.store.list(PODS)
        used: dict[str, dict[str, float]] = {n["metadata"]["name"]: {"gpu": 0.0, "cpu": 0.0, "memory": 0.0,
                                                                      "pods": 0.0} for n in nodes}
        pending = []
        for p in pods:
            node = (p.get("spec") or {}).get("nodeName")
            if node:
                if node in used and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                    u = used[node]
                    u["gpu"] += pod_gpus(p)
                    u["cpu"] += pod_requests(p, "cpu")
                    u["memory"] += pod_requests(p, "memory")
                    u["pods"] += 1
            elif not p["metadata"].get("deletionTimestamp"):
                pending.append(p)
        self._track_idle(nodes, used)
        pending.sort(key=lambda p: (p["metadata"].get("creationTimestamp", ""), p["metadata"]["name"]))
        schedulable = [n for n in nodes if not (n.get("spec") or {}).get("unschedulable") and any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in (n.get("status") or {}).get("conditions")
            or [])]
        for pod in pending:
            gpu, cpu, mem = pod_gpus(pod), pod_requests(pod, "cpu"), pod_requests(pod, "memory")
            volumes = self.cluster.storage.blocked(pod) if hasattr(self.cluster, "storage") else None
            if volumes:  # the VolumeBinding plugin: no node fits a pod whose claims cannot bind
                self._unschedulable(pod, f"0/{len(nodes)} nodes are available: {volumes}.")
                continue
            reasons: Counter[str] = Counter()
            fits = []
            for n in schedulable:
                nname = n["metadata"]["name"]
                alloc = (n.get("status") or {}).get("allocatable") or (n.get("status") or {}).get("capacity") or {}
                if not self._selector_ok(pod, n):
                    reasons["node(s) didn't match Pod's node affinity/selector"] += 1
                    continue
                taint = self._untolerated(pod, n)
                if taint is not None:
                    reasons[f"node(s) had untolerated taint {{{taint.get('key')}: {taint.get('value', '')}}}"] += 1
                    continue
                u = used[nname]
                short = False
                if gpu and (parse_quantity(alloc.get(GPU, 0)) or 0) - u["gpu"] < gpu:
                    reasons[f"Insufficient {GPU}"] += 1
                    short = True
                if cpu and "cpu" in alloc and (parse_quantity(alloc["cpu"]) or 0) - u["cpu"] < cpu:
                    reasons["Insufficient cpu"] += 1
                    short = True
                if mem and "memory" in alloc and (parse_quantity(alloc["memory"]) or 0) - u["memory"] < mem:
                    reasons["Insufficient memory"] += 1
                    short = True
                if "pods" in alloc and (parse_quantity(alloc["pods"]) or 0) - u["pods"] < 1:
                    reasons["Too many pods"] += 1
                    short = True
                if not short:
                    free = (parse_quantity(alloc.get(GPU, 0)) or 0) - u["gpu"]
                    fits.append((-(free - gpu), u["pods"], nname, n))
            if fits:
                fits.sort(key=lambda f: (f[0], f[1], f[2]))
                node = fits[0][3]
                nname = node["metadata"]["name"]
                u = used[nname]
                u["gpu"] += gpu
                u["cpu"] += cpu
                u["memory"] += mem
                u["pods"] += 1
                self._idle_since.pop(nname, None)
                if hasattr(self.cluster, "storage") and not self.cluster.storage.bind_for(pod):
                    continue  # PreBind: its WaitForFirstConsumer volumes are still being provisioned
                self.bind(pod, node)
            else:
                if not nodes:
                    message = "no nodes available to schedule pods"
                else:
                    detail = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
                    message = f"0/{len(nodes)} nodes are available: {detail}."
                    if len(schedulable) < len(nodes):
                        message = (f"0/{len(nodes)} nodes are available: "
                                   + ", ".join(filter(None, [detail, f"{len(nodes) - len(schedulable)} node(s) were "
                                                             "unschedulable"])) + ".")
                self._unschedulable(pod, message)
                self._maybe_autopilot(pod, gpu)

    def _unschedulable(self, pod: Obj, message: str) -> None:
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        changed = []

        def fn(p: Obj) -> Obj | None:
            if (p.get("spec") or {}).get("nodeName"):
                return None
            conds = (p.get("status") or {}).get("conditions") or []
            cur = next((c for c in conds if c.get("type") == "PodScheduled"), {})
            if cur.get("status") == "False" and cur.get("message") == message:
                return None
            p["status"]["conditions"] = set_condition(conds, "PodScheduled", "False", "Unschedulable", message)
            changed.append(True)
            return p

        out = self.store.mutate(PODS, ns, name, fn)
        if changed and out is not None:
            self.event(out, "Warning", "FailedScheduling", message, component="default-scheduler")

    def _next_ip(self) -> str:
        self._ip += 1
        n = self._ip
        return f"10.{8 + (n >> 16) % 240}.{(n >> 8) & 255}.{n & 255}"

    def bind(self, pod: Obj, node: Obj) -> None:
        ns, name, uid = pod["metadata"]["namespace"], pod["metadata"]["name"], pod["metadata"]["uid"]
        nname = node["metadata"]["name"]
        host_ip = next((a["address"] for a in (node.get("status") or {}).get("addresses") or []
                        if a.get("type") == "InternalIP"), "10.128.0.2")
        pod_ip = self._next_ip()
        now = now_rfc3339()

        def fn(p: Obj) -> Obj | None:
            if p["metadata"]["uid"] != uid or (p.get("spec") or {}).get("nodeName"):
                return None
            p["spec"]["nodeName"] = nname
            st = p.setdefault("status", {})
            conds = st.get("conditions") or []
            conds = set_condition(conds, "PodReadyToStartContainers", "True", now=now)
            conds = set_condition(conds, "Initialized", "True", now=now)
            conds = set_condition(conds, "Ready", "False", "ContainersNotReady",
                                  f"containers with unready status: [{self._names(p)}]", now)
            conds = set_condition(conds, "ContainersReady", "False", "ContainersNotReady",
                                  f"containers with unready status: [{self._names(p)}]", now)
            conds = set_condition(conds, "PodScheduled", "True", now=now)
            st["conditions"] = conds
            st.update(phase="Pending", hostIP=host_ip, hostIPs=[{"ip": host_ip}], podIP=pod_ip,
                      podIPs=[{"ip": pod_ip}], startTime=now)
            st["containerStatuses"] = [self._cstatus(c, {"waiting": {"reason": "ContainerCreating"}})
                                       for c in p["spec"]["containers"]]
            return p

        out = self.store.mutate(PODS, ns, name, fn)
        if out is None or out["spec"].get("nodeName") != nname:
            return
        self.event(out, "Normal", "Scheduled", f"Successfully assigned {ns}/{name} to {nname}",
                   component="default-scheduler")
        self.begin_pull(out)
