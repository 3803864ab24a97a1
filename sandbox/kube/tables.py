"""``as=Table`` replies: the columns ``kubectl get`` prints, computed server-side like the real printers."""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable
from typing import Any

from sandbox.kube.selectors import selector_string

Obj = dict[str, Any]
Column = tuple[str, str, int]  # name, type, priority (1 = only with -o wide)


def parse_time(ts: str | None) -> float | None:
    if not ts:
        return None
    try:
        return calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def human_duration(seconds: float) -> str:
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m" if s % 60 == 0 else f"{m}m{s % 60}s"
    if m < 180:
        return f"{m}m"
    h = m // 60
    if h < 8:
        return f"{h}h" if m % 60 == 0 else f"{h}h{m % 60}m"
    if h < 48:
        return f"{h}h"
    d = h // 24
    if h < 24 * 8:
        return f"{d}d" if h % 24 == 0 else f"{d}d{h % 24}h"
    if d < 365 * 2:
        return f"{d}d"
    y = d // 365
    if d < 365 * 8:
        return f"{y}y" if d % 365 == 0 else f"{y}y{d % 365}d"
    return f"{y}y"


def age(ts: str | None) -> str:
    t = parse_time(ts)
    return "<unknown>" if t is None else human_duration(time.time() - t)


def _age(o: Obj) -> str:
    return age(o["metadata"].get("creationTimestamp"))


def pod_status_reason(pod: Obj) -> str:
    status = pod.get("status") or {}
    reason = status.get("reason") or status.get("phase") or "Pending"
    for cs in status.get("initContainerStatuses") or []:
        w = (cs.get("state") or {}).get("waiting")
        if w and w.get("reason") not in (None, "PodInitializing"):
            return f"Init:{w['reason']}"
    for cs in reversed(status.get("containerStatuses") or []):
        state = cs.get("state") or {}
        if state.get("waiting", {}).get("reason"):
            reason = state["waiting"]["reason"]
        elif state.get("terminated", {}).get("reason"):
            reason = state["terminated"]["reason"]
    if pod["metadata"].get("deletionTimestamp"):
        reason = "Terminating"
    return reason


def _pod_row(p: Obj) -> list[Any]:
    status = p.get("status") or {}
    css = status.get("containerStatuses") or []
    total = len((p.get("spec") or {}).get("containers") or [])
    ready = sum(1 for cs in css if cs.get("ready"))
    restarts = sum(int(cs.get("restartCount") or 0) for cs in css)
    last = max((parse_time((cs.get("lastState") or {}).get("terminated", {}).get("finishedAt")) or 0 for cs in css),
               default=0)
    restart_cell = f"{restarts} ({human_duration(time.time() - last)} ago)" if restarts and last else str(restarts)
    return [p["metadata"]["name"], f"{ready}/{total}", pod_status_reason(p), restart_cell, _age(p),
            status.get("podIP") or "<none>", (p.get("spec") or {}).get("nodeName") or "<none>", "<none>", "<none>"]


def _containers(tmpl_spec: Obj) -> tuple[str, str]:
    cs = tmpl_spec.get("containers") or []
    return ",".join(c.get("name", "") for c in cs), ",".join(c.get("image", "") for c in cs)


def _deploy_row(d: Obj) -> list[Any]:
    spec, st = d.get("spec") or {}, d.get("status") or {}
    names, images = _containers(((spec.get("template") or {}).get("spec")) or {})
    return [d["metadata"]["name"], f"{st.get('readyReplicas', 0)}/{spec.get('replicas', 0)}",
            st.get("updatedReplicas", 0), st.get("availableReplicas", 0), _age(d), names, images,
            selector_string(spec.get("selector"))]


def _rs_row(r: Obj) -> list[Any]:
    spec, st = r.get("spec") or {}, r.get("status") or {}
    names, images = _containers(((spec.get("template") or {}).get("spec")) or {})
    return [r["metadata"]["name"], spec.get("replicas", 0), st.get("replicas", 0), st.get("readyReplicas", 0),
            _age(r), names, images, selector_string(spec.get("selector"))]


def _svc_row(s: Obj) -> list[Any]:
    spec = s.get("spec") or {}
    ports = ",".join(f"{p['port']}:{p['nodePort']}/{p.get('protocol', 'TCP')}" if p.get("nodePort")
                     else f"{p['port']}/{p.get('protocol', 'TCP')}" for p in spec.get("ports") or [])
    lb = [i.get("ip") or i.get("hostname") for i in ((s.get("status") or {}).get("loadBalancer") or {}).get(
        "ingress") or []]
    external = ",".join(x for x in lb if x) or ("<pending>" if spec.get("type") == "LoadBalancer" else "<none>")
    selector = ",".join(f"{k}={v}" for k, v in sorted((spec.get("selector") or {}).items())) or "<none>"
    return [s["metadata"]["name"], spec.get("type", "ClusterIP"), spec.get("clusterIP") or "<none>", external,
            ports or "<none>", _age(s), selector]


def _node_row(n: Obj) -> list[Any]:
    st = n.get("status") or {}
    ready = next((c for c in st.get("conditions") or [] if c.get("type") == "Ready"), {})
    status = "Ready" if ready.get("status") == "True" else "NotReady"
    if (n.get("spec") or {}).get("unschedulable"):
        status += ",SchedulingDisabled"
    roles = sorted(k.split("/", 1)[1] for k in (n["metadata"].get("labels") or {})
                   if k.startswith("node-role.kubernetes.io/")) or ["<none>"]
    addr = {a.get("type"): a.get("address") for a in st.get("addresses") or []}
    info = st.get("nodeInfo") or {}
    return [n["metadata"]["name"], status, ",".join(roles), _age(n), info.get("kubeletVersion", ""),
            addr.get("InternalIP", "<none>"), addr.get("ExternalIP", "<none>"), info.get("osImage", ""),
            info.get("kernelVersion", ""), info.get("containerRuntimeVersion", "")]


def _event_row(e: Obj) -> list[Any]:
    io = e.get("involvedObject") or {}
    last = e.get("lastTimestamp") or e.get("eventTime") or e["metadata"].get("creationTimestamp")
    return [age(last), e.get("type", ""), e.get("reason", ""), f"{(io.get('kind') or '').lower()}/{io.get('name', '')}",
            e.get("message", "")]


def _more(items: list[str], limit: int, sep: str, empty: str = "") -> str:
    """printers.go ``listWithMoreString``: the first ``limit`` items, then `` + N more...``."""
    text = sep.join(items[:limit])
    if len(items) > limit:
        return f"{text} + {len(items) - limit} more..."
    return text or empty


def _hpa_targets(specs: list[Obj], statuses: list[Obj]) -> str:
    """printers.go ``formatHPAMetrics`` (1.30): ``current/target`` per metric, matched by index with
    ``status.currentMetrics``, ``<unknown>`` where there is no current value yet."""
    if not specs:
        return "<none>"
    out = []
    for i, spec in enumerate(specs):
        kind = spec.get("type", "")
        key = kind[:1].lower() + kind[1:]  # Resource -> resource, ContainerResource -> containerResource
        target = (spec.get(key) or {}).get("target") or {}
        current = ((statuses[i] if i < len(statuses) else {}).get(key) or {}).get("current") or {}
        if kind in ("Resource", "ContainerResource") and "averageValue" not in target:
            cur = f"{current['averageUtilization']}%" if "averageUtilization" in current else "<unknown>"
            tgt = f"{target['averageUtilization']}%" if "averageUtilization" in target else "<auto>"
            out.append(f"{cur}/{tgt}")
        elif kind in ("Pods", "Resource", "ContainerResource"):
            out.append(f"{current.get('averageValue', '<unknown>')}/{target.get('averageValue')}")
        elif kind in ("Object", "External"):
            field = "averageValue" if "averageValue" in target else "value"
            out.append(f"{current.get(field, '<unknown>')}/{target.get(field)}" + (" (avg)" if field ==
                                                                                   "averageValue" else ""))
        else:
            out.append("<unknown type>")
    return _more(out, 2, ", ")


def _hpa_row(h: Obj) -> list[Any]:
    spec, st = h.get("spec") or {}, h.get("status") or {}
    ref = spec.get("scaleTargetRef") or {}
    # autoscaling/v2 defaulting: no metrics = 80 % average CPU utilization (what the controller scales on)
    metrics = spec.get("metrics") or [{"type": "Resource", "resource": {
        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}]
    min_pods = spec.get("minReplicas")
    return [h["metadata"]["name"], f"{ref.get('kind', '')}/{ref.get('name', '')}",
            _hpa_targets(metrics, st.get("currentMetrics") or []), "<unset>" if min_pods is None else str(min_pods),
            spec.get("maxReplicas", 0), st.get("currentReplicas", 0), _age(h)]


def _sc_row(s: Obj) -> list[Any]:
    default = (s["metadata"].get("annotations") or {}).get("storageclass.kubernetes.io/is-default-class") == "true"
    return [s["metadata"]["name"] + (" (default)" if default else ""), s.get("provisioner", ""),
            s.get("reclaimPolicy") or "Delete", s.get("volumeBindingMode") or "Immediate",
            bool(s.get("allowVolumeExpansion")), _age(s)]


def _apiservice_row(a: Obj) -> list[Any]:
    svc = (a.get("spec") or {}).get("service")
    conds = [c for c in (a.get("status") or {}).get("conditions") or [] if c.get("type") == "Available"]
    # the sandbox keeps an installed APIService Available without a status (docs/sandbox-contract.md)
    status = "True" if not conds and svc else "Unknown"
    if conds:
        c = conds[0]
        status = c.get("status", "Unknown")
        if status != "True" and c.get("reason"):
            status = f"{status} ({c['reason']})"
    return [a["metadata"]["name"], f"{svc.get('namespace', '')}/{svc.get('name', '')}" if svc else "Local", status,
            _age(a)]


def _slice_row(e: Obj) -> list[Any]:
    ports = [str(p["port"]) if p.get("port") is not None else p.get("name") or "*" for p in e.get("ports") or []]
    addrs = [a for ep in e.get("endpoints") or [] for a in ep.get("addresses") or []]
    return [e["metadata"]["name"], e.get("addressType", ""), _more(ports, 3, ",", "<unset>"),
            _more(addrs, 3, ",", "<unset>"), _age(e)]


def _ing_row(i: Obj) -> list[Any]:
    spec = i.get("spec") or {}
    hosts = ",".join(r.get("host", "") for r in spec.get("rules") or [] if r.get("host")) or "*"
    addr = ",".join(x.get("ip") or x.get("hostname") or "" for x in
                    ((i.get("status") or {}).get("loadBalancer") or {}).get("ingress") or [])
    cls = spec.get("ingressClassName") or "<none>"  # printers.go: the field only, never the annotation
    return [i["metadata"]["name"], cls, hosts, addr, "80, 443" if spec.get("tls") else "80", _age(i)]


def _pvc_row(p: Obj) -> list[Any]:
    spec, st = p.get("spec") or {}, p.get("status") or {}
    modes = {"ReadWriteOnce": "RWO", "ReadOnlyMany": "ROX", "ReadWriteMany": "RWX", "ReadWriteOncePod": "RWOP"}
    return [p["metadata"]["name"], st.get("phase", "Pending"), spec.get("volumeName", ""),
            (st.get("capacity") or {}).get("storage", ""),
            ",".join(modes.get(m, m) for m in st.get("accessModes") or []),
            spec.get("storageClassName", ""), "<unset>", _age(p)]


def _ns_row(n: Obj) -> list[Any]:
    return [n["metadata"]["name"], (n.get("status") or {}).get("phase", "Active"), _age(n)]


def _secret_row(s: Obj) -> list[Any]:
    return [s["metadata"]["name"], s.get("type", "Opaque"), len(s.get("data") or {}), _age(s)]


def _cm_row(c: Obj) -> list[Any]:
    return [c["metadata"]["name"], len(c.get("data") or {}) + len(c.get("binaryData") or {}), _age(c)]


def _ep_row(e: Obj) -> list[Any]:
    eps = []
    for sub in e.get("subsets") or []:
        for a in sub.get("addresses") or []:
            for p in sub.get("ports") or []:
                eps.append(f"{a['ip']}:{p['port']}")
    text = ",".join(eps[:3]) + (f" + {len(eps) - 3} more..." if len(eps) > 3 else "")
    return [e["metadata"]["name"], text or "<none>", _age(e)]


def _pdb_row(p: Obj) -> list[Any]:
    spec, st = p.get("spec") or {}, p.get("status") or {}
    return [p["metadata"]["name"], spec.get("minAvailable", "N/A"), spec.get("maxUnavailable", "N/A"),
            st.get("disruptionsAllowed", 0), _age(p)]


def _default_row(o: Obj) -> list[Any]:
    return [o["metadata"]["name"], _age(o)]


NAME = ("Name", "string", 0)
AGE = ("Age", "string", 0)
PRINTERS: dict[str, tuple[list[Column], Callable[[Obj], list[Any]]]] = {
    "Pod": ([NAME, ("Ready", "string", 0), ("Status", "string", 0), ("Restarts", "string", 0), AGE,
             ("IP", "string", 1), ("Node", "string", 1), ("Nominated Node", "string", 1),
             ("Readiness Gates", "string", 1)], _pod_row),
    "Deployment": ([NAME, ("Ready", "string", 0), ("Up-to-date", "integer", 0), ("Available", "integer", 0), AGE,
                    ("Containers", "string", 1), ("Images", "string", 1), ("Selector", "string", 1)], _deploy_row),
    "ReplicaSet": ([NAME, ("Desired", "integer", 0), ("Current", "integer", 0), ("Ready", "integer", 0), AGE,
                    ("Containers", "string", 1), ("Images", "string", 1), ("Selector", "string", 1)], _rs_row),
    "Service": ([NAME, ("Type", "string", 0), ("Cluster-IP", "string", 0), ("External-IP", "string", 0),
                 ("Port(s)", "string", 0), AGE, ("Selector", "string", 1)], _svc_row),
    "Node": ([NAME, ("Status", "string", 0), ("Roles", "string", 0), AGE, ("Version", "string", 0),
              ("Internal-IP", "string", 1), ("External-IP", "string", 1), ("OS-Image", "string", 1),
              ("Kernel-Version", "string", 1), ("Container-Runtime", "string", 1)], _node_row),
    "Event": ([("Last Seen", "string", 0), ("Type", "string", 0), ("Reason", "string", 0),
               ("Object", "string", 0), ("Message", "string", 0)], _event_row),
    "HorizontalPodAutoscaler": ([NAME, ("Reference", "string", 0), ("Targets", "string", 0),
                                 ("MinPods", "string", 0), ("MaxPods", "integer", 0), ("Replicas", "integer", 0),
                                 AGE], _hpa_row),
    "StorageClass": ([NAME, ("Provisioner", "string", 0), ("ReclaimPolicy", "string", 0),
                      ("VolumeBindingMode", "string", 0), ("AllowVolumeExpansion", "string", 0), AGE], _sc_row),
    "APIService": ([NAME, ("Service", "string", 0), ("Available", "string", 0), AGE], _apiservice_row),
    "EndpointSlice": ([NAME, ("AddressType", "string", 0), ("Ports", "string", 0), ("Endpoints", "string", 0),
                       AGE], _slice_row),
    "Ingress": ([NAME, ("Class", "string", 0), ("Hosts", "string", 0), ("Address", "string", 0),
                 ("Ports", "string", 0), AGE], _ing_row),
    "PersistentVolumeClaim": ([NAME, ("Status", "string", 0), ("Volume", "string", 0), ("Capacity", "string", 0),
                               ("Access Modes", "string", 0), ("StorageClass", "string", 0),
                               ("VolumeAttributesClass", "string", 0), AGE], _pvc_row),
    "Namespace": ([NAME, ("Status", "string", 0), AGE], _ns_row),
    "Secret": ([NAME, ("Type", "string", 0), ("Data", "string", 0), AGE], _secret_row),
    "ConfigMap": ([NAME, ("Data", "string", 0), AGE], _cm_row),
    "Endpoints": ([NAME, ("Endpoints", "string", 0), AGE], _ep_row),
    "PodDisruptionBudget": ([NAME, ("Min Available", "string", 0), ("Max Unavailable", "string", 0),
                             ("Allowed Disruptions", "integer", 0), AGE], _pdb_row),
}


def _partial(o: Obj) -> Obj:
    meta = {k: v for k, v in o["metadata"].items() if k != "managedFields"}
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta}


def table(kind: str, items: list[Obj], resource_version: str, *, include_object: str = "Metadata") -> Obj:
    columns, row = PRINTERS.get(kind, ([NAME, AGE], _default_row))
    defs = [{"name": n, "type": t, "format": "name" if n == "Name" else "", "description": n, "priority": p}
            for n, t, p in columns]
    rows = []
    for o in items:
        entry: Obj = {"cells": row(o)}
        if include_object == "Object":
            entry["object"] = o
        elif include_object != "None":
            entry["object"] = _partial(o)
        rows.append(entry)
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": resource_version},
            "columnDefinitions": defs, "rows": rows}
