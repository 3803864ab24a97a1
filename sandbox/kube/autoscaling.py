"""The HorizontalPodAutoscaler controller and the metrics APIs it reads, as on GKE.

* ``metrics.k8s.io`` (metrics-server, on in every GKE cluster): pod/node CPU and memory, which
  ``kubectl top`` and ``Resource`` metrics use. A pod's CPU grows with the requests its model server
  is working on; a ``Utilization`` target needs the containers to request CPU, else
  ``FailedGetResourceMetric: missing request for cpu``.
* ``custom.metrics.k8s.io`` exists only once an adapter registers it (an ``APIService``
  ``v1beta1.custom.metrics.k8s.io``). Without one, a ``Pods`` metric reports ``FailedGetPodsMetric``
  and the HPA does not scale on it (min/max replicas are still enforced, like the real controller).
  The adapter GKE documents for Managed Service for Prometheus is the Custom Metrics Stackdriver
  Adapter: it serves ``prometheus.googleapis.com|<metric>|gauge`` for metrics that GMP collects, i.e.
  from pods selected by a ``PodMonitoring`` (prometheus.io annotations are not scraped by GMP).
  prometheus-adapter (APIService backed by a Service named ``prometheus-adapter``) serves plain names.
* Replica count: ``ceil(current * value / target)`` outside a 10% tolerance, max over metrics,
  clamped to min/max, scale-down held by ``behavior.scaleDown.stabilizationWindowSeconds`` (default
  300 s) and up/down limited by the behavior policies; synced every 15 s (kube-controller-manager
  ``--horizontal-pod-autoscaler-sync-period``), cloud time.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from sandbox.core import now_rfc3339
from sandbox.kube import resources as res
from sandbox.kube.selectors import match_label_selector

if TYPE_CHECKING:
    from sandbox.kube.controllers import Controller

Obj = dict[str, Any]
HPAS = res.BY_KEY[("autoscaling", "horizontalpodautoscalers")]
DEPLOYS = res.BY_KEY[("apps", "deployments")]
PODS = res.BY_KEY[("", "pods")]
SVCS = res.BY_KEY[("", "services")]
APISERVICES = res.BY_KEY.get(("apiregistration.k8s.io", "apiservices"))
PODMONS = res.BY_KEY[("monitoring.googleapis.com", "podmonitorings")]
SYNC_PERIOD = 15.0  # cloud seconds
TOLERANCE = 0.1
GMP = "prometheus.googleapis.com"


def _q(value: Any) -> float:
    from sandbox.kube.defaults import parse_quantity

    return parse_quantity(value) or 0.0


def _milli(v: float) -> str:
    return f"{int(round(v * 1000))}m"


# ---- metrics sources -------------------------------------------------------------------------------
def pod_usage(cluster: Any, pod: Obj) -> dict[str, float]:
    """CPU cores and memory bytes a pod uses now: idle serving plus a share per in-flight request."""
    with cluster.controller.runs_lock:
        run = cluster.controller.runs.get(pod["metadata"]["uid"])
    server = getattr(run, "server", None)
    busy = (getattr(server, "running", 0) or 0) + (getattr(server, "waiting", 0) or 0)
    return {"cpu": 0.2 + 0.35 * min(busy, 16), "memory": (2.0 + 0.05 * busy) * 2**30}


def adapter(cluster: Any) -> str | None:
    """Which custom metrics adapter is registered: "stackdriver", "prometheus-adapter" or None."""
    if APISERVICES is None:
        return None
    for version in ("v1beta1", "v1beta2"):
        svc = cluster.store.get(APISERVICES, "", f"{version}.custom.metrics.k8s.io")
        if svc is not None:
            backend = ((svc.get("spec") or {}).get("service") or {}).get("name", "")
            return "prometheus-adapter" if "prometheus-adapter" in backend else "stackdriver"
    return None


def _gmp_scraped(cluster: Any, pod: Obj) -> bool:
    mons, _ = cluster.store.list(PODMONS, pod["metadata"]["namespace"])
    return any(match_label_selector((m.get("spec") or {}).get("selector") or {}, pod["metadata"].get("labels"))
               for m in mons)


def engine_gauge(cluster: Any, pod: Obj, name: str) -> float | None:
    """The value of gauge ``name`` on the pod's own /metrics page (None: the server does not export it)."""
    with cluster.controller.runs_lock:
        run = cluster.controller.runs.get(pod["metadata"]["uid"])
    server = getattr(run, "server", None)
    text = server.metrics_text() if server is not None and hasattr(server, "metrics_text") else ""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == name or key.startswith(name + "{"):
            total += float(value)
            found = True
    return total if found else None


class MetricError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def pods_metric(cluster: Any, pods: list[Obj], name: str) -> list[float]:
    kind = adapter(cluster)
    if kind is None:
        raise MetricError("FailedGetPodsMetric", f"unable to get metric {name}: unable to fetch metrics from custom "
                          "metrics API: no custom metrics API (custom.metrics.k8s.io) registered")
    if kind == "stackdriver":
        parts = name.split("|")
        if len(parts) != 3 or parts[0] != GMP:
            raise MetricError("FailedGetPodsMetric", f"unable to get metric {name}: unable to fetch metrics from "
                              f"custom metrics API: the server could not find the metric {name} for pods")
        raw = parts[1]
        pods = [p for p in pods if _gmp_scraped(cluster, p)]
    else:
        raw = name
    values = [v for p in pods if (v := engine_gauge(cluster, p, raw)) is not None]
    if not values:
        raise MetricError("FailedGetPodsMetric", f"unable to get metric {name}: no metrics returned from custom "
                          "metrics API")
    return values


def cpu_utilization(cluster: Any, pods: list[Obj]) -> tuple[float, float]:
    """(average utilization in percent, average usage in cores) over ``pods``."""
    used = requested = 0.0
    for p in pods:
        for c in (p.get("spec") or {}).get("containers") or []:
            req = ((c.get("resources") or {}).get("requests") or {}).get("cpu")
            if req is None:
                raise MetricError("FailedGetResourceMetric", "failed to get cpu utilization: missing request for "
                                  f"cpu in container {c.get('name')} of Pod {p['metadata']['name']}")
            requested += _q(req)
        used += pod_usage(cluster, p)["cpu"]
    if not pods or not requested:
        raise MetricError("FailedGetResourceMetric", "failed to get cpu utilization: did not receive metrics for "
                          "targeted pods (pods might be unready)")
    return 100.0 * used / requested, used / len(pods)


# ---- controller --------------------------------------------------------------------------------------
class HpaController:
    """One per cluster controller; ``sync(ns, name)`` is called from the work queue, and every sync period."""

    def __init__(self, controller: Controller) -> None:
        self.c = controller
        self.history: dict[tuple[str, str], list[tuple[float, int]]] = {}  # recommendations (cloud time)
        self.scale_events: dict[tuple[str, str], list[tuple[float, int]]] = {}
        self.due: dict[tuple[str, str], float] = {}

    def _now(self) -> float:
        return time.monotonic() / max(self.c.clock.time_scale, 1e-9)  # cloud seconds

    def _pods(self, target: Obj) -> list[Obj]:
        sel = (target.get("spec") or {}).get("selector") or {}
        ns = target["metadata"]["namespace"]
        from sandbox.kube.controllers import is_ready

        pods, _ = self.c.store.list(PODS, ns, lambda p: match_label_selector(sel, p["metadata"].get("labels"))
                                    and not p["metadata"].get("deletionTimestamp") and is_ready(p))
        return pods

    def _metric(self, m: Obj, pods: list[Obj], current: int) -> tuple[int, Obj]:
        if m.get("type") == "Pods":
            spec = m["pods"]
            name = spec["metric"]["name"]
            target = _q(spec["target"].get("averageValue", 0)) or 1.0
            values = pods_metric(self.c.cluster, pods, name)
            avg = sum(values) / len(values)
            ratio = avg / target
            status = {"type": "Pods", "pods": {"metric": {"name": name},
                                               "current": {"averageValue": _milli(avg) if avg % 1 else str(int(avg))}}}
        elif m.get("type") == "Resource" and m["resource"]["name"] == "cpu":
            tgt = m["resource"]["target"]
            util, cores = cpu_utilization(self.c.cluster, pods)
            ratio = util / float(tgt.get("averageUtilization") or 100)
            status = {"type": "Resource", "resource": {"name": "cpu", "current": {
                "averageUtilization": int(util), "averageValue": _milli(cores)}}}
        else:
            raise MetricError("FailedGetExternalMetric" if m.get("type") == "External" else "InvalidMetricSourceType",
                              f"unable to get metric of type {m.get('type')}: no external metrics API "
                              "(external.metrics.k8s.io) registered")
        desired = current if abs(ratio - 1.0) <= TOLERANCE else math.ceil(ratio * len(pods) if pods else current)
        return desired, status

    def _limit(self, key: tuple[str, str], spec: Obj, current: int, desired: int) -> int:
        behavior = spec.get("behavior") or {}
        now = self._now()
        hist = [(t, r) for t, r in self.history.get(key, []) if now - t < 3600]
        hist.append((now, desired))
        self.history[key] = hist
        down = behavior.get("scaleDown") or {}
        up = behavior.get("scaleUp") or {}
        if desired < current:
            window = float(down.get("stabilizationWindowSeconds", 300))
            desired = min(current, max(r for t, r in hist if now - t <= window))
        elif desired > current:
            window = float(up.get("stabilizationWindowSeconds", 0))
            desired = max(current, min(r for t, r in hist if now - t <= window))
        rules = up if desired > current else down
        policies = rules.get("policies") or []
        if desired != current and policies:
            changes = [(t, n) for t, n in self.scale_events.get(key, []) if now - t < 1800]
            allowed = []
            for p in policies:
                period = float(p.get("periodSeconds", 15))
                moved = sum(n for t, n in changes if now - t < period and (n > 0) == (desired > current))
                base = current - moved
                step = math.ceil(base * p["value"] / 100) if p.get("type") == "Percent" else int(p["value"])
                allowed.append(max(0, step - abs(moved)))
            pick = min if rules.get("selectPolicy") == "Min" else max
            room = pick(allowed)
            desired = min(desired, current + room) if desired > current else max(desired, current - room)
        return desired

    def sync(self, ns: str, name: str) -> None:
        from sandbox.kube.controllers import set_condition

        c = self.c
        hpa = c.store.get(HPAS, ns, name)
        key = (ns, name)
        if hpa is None:
            self.history.pop(key, None)
            self.due.pop(key, None)
            return
        due, mono, period = self.due.get(key), time.monotonic(), c.clock.scaled(SYNC_PERIOD)
        if due is None or mono >= due - period / 2:  # timers may fire a little early  # the controller resyncs every HPA each period (one timer each)
            self.due[key] = mono + period
            c.after(SYNC_PERIOD, ("hpa", ns, name))
        spec = hpa.get("spec") or {}
        ref = spec.get("scaleTargetRef") or {}
        target = c.store.get(DEPLOYS, ns, ref.get("name", "")) if ref.get("kind") == "Deployment" else None
        lo, hi = int(spec.get("minReplicas", 1)), int(spec.get("maxReplicas", 1))
        now = now_rfc3339()
        conds: list[Obj] = list((hpa.get("status") or {}).get("conditions") or [])
        current_metrics: list[Obj] | None = None
        reason_text = ""
        if target is None:
            conds = set_condition(conds, "AbleToScale", "False", "FailedGetScale",
                                  "the HPA controller was unable to get the target's current scale: deployments.apps "
                                  f'"{ref.get("name")}" not found', now, probe=False)
            current = desired = 0
        else:
            current = int(target["spec"].get("replicas", 1))
            conds = set_condition(conds, "AbleToScale", "True", "SucceededGetScale",
                                  "the HPA controller was able to get the target's current scale", now, probe=False)
            if current == 0:
                desired = 0
                conds = set_condition(conds, "ScalingActive", "False", "ScalingDisabled",
                                      "scaling is disabled since the replica count of the target is zero", now,
                                      probe=False)
            elif current > hi or current < lo:
                desired = hi if current > hi else lo
                reason_text = ("Current number of replicas above Spec.MaxReplicas" if current > hi else
                               "Current number of replicas below Spec.MinReplicas")
            else:
                desired, reason_text, current_metrics, conds = self._from_metrics(hpa, target, current, conds, now)
            if current:
                limited = desired < lo or desired > hi
                clamped = max(lo, min(hi, desired))
                conds = set_condition(conds, "ScalingLimited", "True" if limited else "False",
                                      ("TooFewReplicas" if desired < lo else "TooManyReplicas") if limited
                                      else "DesiredWithinRange",
                                      ("the desired replica count is less than the minimum replica count"
                                       if desired < lo else "the desired replica count is more than the maximum "
                                       "replica count") if limited else "the desired count is within the acceptable "
                                      "range", now, probe=False)
                desired = clamped
            if desired != current and current:
                c.cluster.api.set_scale(DEPLOYS, ns, ref["name"], {"spec": {"replicas": desired}},
                                        manager="horizontal-pod-autoscaler")
                self.scale_events.setdefault(key, []).append((self._now(), desired - current))
                c.event(hpa, "Normal", "SuccessfulRescale", f"New size: {desired}; reason: {reason_text}",
                        component="horizontal-pod-autoscaler")

        def fn(h: Obj) -> Obj | None:
            st: Obj = {"currentReplicas": int((target or {}).get("status", {}).get("replicas", 0) or 0),
                       "desiredReplicas": desired, "currentMetrics": current_metrics, "conditions": conds}
            if target is not None and desired != current:
                st["lastScaleTime"] = now
            elif (h.get("status") or {}).get("lastScaleTime"):
                st["lastScaleTime"] = h["status"]["lastScaleTime"]
            if h.get("status") == st:
                return None
            h["status"] = st
            return h

        c.store.mutate(HPAS, ns, name, fn)

    def _from_metrics(self, hpa: Obj, target: Obj, current: int, conds: list[Obj],
                      now: str) -> tuple[int, str, list[Obj] | None, list[Obj]]:
        from sandbox.kube.controllers import set_condition

        pods = self._pods(target)
        proposals, statuses, errors = [], [], []
        # no metrics given: the API default, 80% CPU utilization
        default = [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization",
                                                                                "averageUtilization": 80}}}]
        for m in (hpa.get("spec") or {}).get("metrics") or default:
            try:
                desired, status = self._metric(m, pods, current)
                proposals.append((desired, m))
                statuses.append(status)
            except MetricError as err:
                errors.append(err)
                self.c.event(hpa, "Warning", err.reason, err.message, component="horizontal-pod-autoscaler")
        if errors and not proposals:
            err = errors[0]
            conds = set_condition(conds, "ScalingActive", "False", err.reason,
                                  f"the HPA was unable to compute the replica count: {err.message}", now, probe=False)
            return current, "", statuses or None, conds
        conds = set_condition(conds, "ScalingActive", "True", "ValidMetricFound",
                              "the HPA was able to successfully calculate a replica count from "
                              f"{'pods metric ' + proposals[0][1]['pods']['metric']['name'] if proposals[0][1].get('type') == 'Pods' else 'cpu resource utilization (percentage of request)'}",
                              now, probe=False)
        desired, m = max(proposals, key=lambda p: p[0])
        if errors and desired < current:
            desired = current  # like the real controller: never scale down while some metric is missing
        key = (hpa["metadata"]["namespace"], hpa["metadata"]["name"])
        limited = self._limit(key, hpa.get("spec") or {}, current, desired)
        what = (f"pods metric {m['pods']['metric']['name']}" if m.get("type") == "Pods" else
                "cpu resource utilization (percentage of request)")
        reason = f"{what} {'above' if limited > current else 'below'} target"
        return limited, reason, statuses, conds


# ---- metrics.k8s.io (metrics-server) for kubectl top ---------------------------------------------------
def pod_metrics(cluster: Any, pod: Obj) -> Obj:
    usage = pod_usage(cluster, pod)
    containers = (pod.get("spec") or {}).get("containers") or []
    share = max(1, len(containers))
    return {"kind": "PodMetrics", "apiVersion": "metrics.k8s.io/v1beta1",
            "metadata": {"name": pod["metadata"]["name"], "namespace": pod["metadata"]["namespace"],
                         "creationTimestamp": now_rfc3339(), "labels": pod["metadata"].get("labels") or {}},
            "timestamp": now_rfc3339(), "window": "15s",
            "containers": [{"name": c.get("name"), "usage": {"cpu": f"{int(usage['cpu'] / share * 1e9)}n",
                                                              "memory": f"{int(usage['memory'] / share / 1024)}Ki"}}
                           for c in containers]}


def node_metrics(cluster: Any, node: Obj) -> Obj:
    name = node["metadata"]["name"]
    pods, _ = cluster.store.list(PODS, None, lambda p: (p.get("spec") or {}).get("nodeName") == name)
    cpu = 0.1 + sum(pod_usage(cluster, p)["cpu"] for p in pods)
    mem = 2**30 + sum(pod_usage(cluster, p)["memory"] for p in pods)
    return {"kind": "NodeMetrics", "apiVersion": "metrics.k8s.io/v1beta1",
            "metadata": {"name": name, "creationTimestamp": now_rfc3339(),
                         "labels": node["metadata"].get("labels") or {}},
            "timestamp": now_rfc3339(), "window": "20s",
            "usage": {"cpu": f"{int(cpu * 1e9)}n", "memory": f"{int(mem / 1024)}Ki"}}


def serve_metrics_api(h: Any, cluster: Any, path: str) -> Any:
    """GET /apis/metrics.k8s.io/v1beta1/[namespaces/NS/]pods[/NAME] and .../nodes[/NAME]."""
    from sandbox.kube.selectors import object_filter
    from sandbox.kube.store import status_error

    parts = path.strip("/").split("/")[3:]
    ns = None
    if parts[:1] == ["namespaces"] and len(parts) >= 3:
        ns, parts = parts[1], parts[2:]
    if not parts or parts[0] not in ("pods", "nodes"):
        raise status_error(404, "NotFound", "the server could not find the requested resource")
    kind = parts[0]
    pred = object_filter(h.q("labelSelector"), h.q("fieldSelector"))
    if kind == "pods":
        items, _ = cluster.store.list(PODS, ns, lambda p: pred(p) and (p.get("status") or {}).get("phase") == "Running")
        render = pod_metrics
    else:
        items, _ = cluster.store.list(res.BY_KEY[("", "nodes")], None, pred)
        render = node_metrics
    if len(parts) > 1:
        one = next((o for o in items if o["metadata"]["name"] == parts[1]), None)
        if one is None:
            raise status_error(404, "NotFound", f'{kind}.metrics.k8s.io "{parts[1]}" not found')
        return render(cluster, one)
    return {"kind": "PodMetricsList" if kind == "pods" else "NodeMetricsList", "apiVersion": "metrics.k8s.io/v1beta1",
            "metadata": {}, "items": [render(cluster, o) for o in items]}
