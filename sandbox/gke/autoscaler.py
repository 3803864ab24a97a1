"""GKE's cluster autoscaler for Standard node pools with ``autoscaling.enabled`` (see
:class:`ClusterAutoscaler`), and the scheduling predicates it simulates with, as the real
autoscaler runs the scheduler's: Kubernetes quantities, a pod's requests (limits stand in for missing
requests), node selectors and required node affinity, taints and tolerations (with GKE's
ExtendedResourceToleration for pods asking for GPUs) and cpu / memory / GPU capacity.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sandbox.gke.state import _Cluster, _Pool

if TYPE_CHECKING:
    from sandbox.gke.service import Gke


AUTOPILOT_NODE_LABEL = "sandbox.llm-fleet.dev/autopilot"  # set by the kube emulator on the nodes it provisions


_UNITS = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
          "m": 1e-3}


def parse_quantity(value: Any) -> float:
    """A Kubernetes quantity ("500m", "16Gi", "1", 2) as a float (cpu in cores, memory in bytes)."""
    if isinstance(value, int | float):
        return float(value)
    m = re.fullmatch(r"\s*([0-9.]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2) not in _UNITS:
        return 0.0
    return float(m.group(1)) * _UNITS[m.group(2)]


def pod_requests(pod: dict[str, Any]) -> dict[str, float]:
    """Summed container requests (limits stand in for missing requests, as the API server defaults them)."""
    total: dict[str, float] = {}
    for c in (pod.get("spec") or {}).get("containers") or []:
        res = c.get("resources") or {}
        merged = {**(res.get("limits") or {}), **(res.get("requests") or {})}
        for k, v in merged.items():
            total[k] = total.get(k, 0.0) + parse_quantity(v)
    return total


def _match_expr(expr: dict[str, Any], labels: dict[str, str]) -> bool:
    key, op, values = expr.get("key", ""), expr.get("operator", "In"), expr.get("values") or []
    have = labels.get(key)
    if op == "In":
        return have in values
    if op == "NotIn":
        return have not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    if op in ("Gt", "Lt") and have is not None and values:
        try:
            return int(have) > int(values[0]) if op == "Gt" else int(have) < int(values[0])
        except ValueError:
            return False
    return False


def _tolerates(tolerations: list[dict[str, Any]], taint: dict[str, str]) -> bool:
    for t in tolerations:
        if t.get("effect") and t.get("effect") != taint.get("effect"):
            continue
        if t.get("operator") == "Exists":
            if not t.get("key") or t.get("key") == taint.get("key"):
                return True
        elif t.get("key") == taint.get("key") and (t.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


def pod_fits_template(pod: dict[str, Any], labels: dict[str, str], capacity: dict[str, str],
                      taints: list[dict[str, str]]) -> bool:
    """Would ``pod`` schedule on a fresh node with these labels, capacity and taints?"""
    spec = pod.get("spec") or {}
    if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
        return False
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms") or []
    if required and not any(all(_match_expr(e, labels) for e in term.get("matchExpressions") or [])
                            for term in required):
        return False
    wants = pod_requests(pod)
    tolerations = list(spec.get("tolerations") or [])
    if wants.get("nvidia.com/gpu"):
        # GKE's ExtendedResourceToleration: pods asking for GPUs tolerate the GPU taint
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists"})
    for taint in taints:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not _tolerates(tolerations, taint):
            return False
    for resource, amount in wants.items():
        if resource in ("cpu", "memory", "nvidia.com/gpu", "ephemeral-storage") and amount > parse_quantity(
                capacity.get(resource, 0)) + 1e-9:
            return False
    return True


class ClusterAutoscaler:
    """GKE's cluster autoscaler for Standard node pools with ``autoscaling.enabled``.

    Every ``autoscaler_scan`` (cloud seconds) it looks at the pods of the sandbox Kubernetes API:
    pods that are Pending without a node and would fit a fresh node of a pool (node selector, required
    node affinity, taints/tolerations, cpu/memory/GPU requests) make that pool grow, up to
    ``maxNodeCount`` per zone (nodes appear after ``node_boot``; a stockout or quota shortfall backs the
    pool off for ``autoscaler_backoff``). Nodes of an autoscaled pool with no pods on them for
    ``autoscaler_scale_down_unneeded`` are removed, down to ``minNodeCount`` per zone. Neither creates
    a GKE operation, as in GKE. Autopilot node provisioning belongs to the kube emulator.

    It looks at each cluster's own Kubernetes API: a pending pod grows a pool of its own cluster only
    (clusters that share one kube, as in unit tests, are scanned together). Set ``enabled = False`` to
    turn the autoscaler off.
    """

    def __init__(self, gke: Gke) -> None:
        self.gke = gke
        self.enabled = True
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._seen_pending: set[tuple[int, str, str]] = set()  # (id(kube), namespace, name)
        self._unneeded_since: dict[str, float] = {}
        self._backoff_until: dict[int, float] = {}
        self._busy: dict[int, int] = {}  # id(pool) -> scale-ups in flight
        self._unsubscribe: Any = None
        self.events: list[dict[str, Any]] = []  # what it did, for snapshot() and tests

    def start(self) -> None:
        kube = self.gke.kube
        if self._thread is not None or (kube is None and self.gke.kube_factory is None):
            return
        self._stop.clear()
        if kube is not None:  # the shared kube; per-cluster kubes are subscribed by Gke._attach_kube
            subscribe = getattr(kube, "subscribe", None)
            if callable(subscribe) and self._unsubscribe is None:
                with contextlib.suppress(Exception):
                    self._unsubscribe = subscribe(lambda t, o: self.on_kube_event(kube, t, o))
            if self.gke.kube_factory is None and self._pods_source(kube) is None:
                return
        self._thread = threading.Thread(target=self._loop, name="gke-autoscaler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if callable(self._unsubscribe):
            with contextlib.suppress(Exception):
                self._unsubscribe()
        self._unsubscribe = None
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    def on_kube_event(self, kube: Any, event_type: str, obj: Any) -> None:
        """A subscriber of ``kube`` (a cluster's Kubernetes API): pods wake the scan, Autopilot nodes
        are paid for by that cluster."""
        if not isinstance(obj, dict):
            return
        if obj.get("kind") == "Pod" or "containers" in (obj.get("spec") or {}):
            self._wake.set()
        elif obj.get("kind") == "Node":
            meta = obj.get("metadata") or {}
            cluster = (meta.get("labels") or {}).get(AUTOPILOT_NODE_LABEL)
            if cluster:
                self.gke.autopilot_node_event(kube, event_type, meta.get("name", ""), cluster,
                                              meta.get("labels") or {},
                                              (obj.get("status") or {}).get("capacity") or {})

    # ---- reading the kube emulator ---------------------------------------------------------------
    @staticmethod
    def _pods_source(kube: Any) -> Callable[[], list[dict[str, Any]]] | None:
        if kube is None:
            return None
        fn = getattr(kube, "list_pods", None)
        if callable(fn):
            return fn
        store = getattr(kube, "store", None)
        if store is not None and hasattr(store, "list"):
            def from_store() -> list[dict[str, Any]]:
                from sandbox.kube.controllers import PODS

                items = store.list(PODS)
                return items[0] if isinstance(items, tuple) else items

            return from_store
        return None

    def _pods(self, kube: Any) -> list[dict[str, Any]]:
        source = self._pods_source(kube)
        if source is None:
            return []
        try:
            return [p for p in source() if isinstance(p, dict)]
        except ImportError:
            raise  # a broken import must not look like "no pods" (pools would silently never grow)
        except Exception:  # a cluster's API going away mid-scan: nothing to scale this round
            return []

    # ---- the loop --------------------------------------------------------------------------------
    def _interval(self) -> float:
        return min(max(self.gke.clock.scaled(self.gke.delays["autoscaler_scan"]), 0.01), 1.0)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval())
            self._wake.clear()
            if self._stop.is_set():
                return
            if self.enabled:
                try:
                    self.scan()
                except Exception as exc:  # pragma: no cover - never kill the loop
                    self._record("error", "", "", repr(exc))
            self._stop.wait(self._interval() / 2)

    def _record(self, kind: str, pool: str, node: str, detail: str) -> None:
        last = self.events[-1] if self.events else {}
        if kind == "max_reached" and last.get("kind") == kind and last.get("pool") == pool:
            return
        self.events.append({"time": time.time(), "kind": kind, "pool": pool, "node": node, "detail": detail})
        del self.events[:-200]

    def _pools(self) -> list[tuple[_Cluster, _Pool]]:
        with self.gke._lock:
            return [(c, p) for c in self.gke._clusters.values() if not c.autopilot and not c.deleting and
                    c.data.get("status") == "RUNNING"
                    for p in c.pools.values() if (p.data.get("autoscaling") or {}).get("enabled") and
                    p.busy is None and p.data.get("status") in ("RUNNING", "RUNNING_WITH_ERROR")]

    def scan(self) -> None:
        now = time.monotonic()
        by_kube: dict[int, tuple[Any, list[tuple[_Cluster, _Pool]]]] = {}
        for cluster, pool in self._pools():
            if cluster.kube is not None:
                by_kube.setdefault(id(cluster.kube), (cluster.kube, []))[1].append((cluster, pool))
        seen: set[tuple[int, str, str]] = set()
        for kid, (kube, pools) in by_kube.items():  # each cluster's pods grow that cluster's pools only
            if self._pods_source(kube) is None:
                continue
            pods = self._pods(kube)
            pending = [p for p in pods if _is_unschedulable(p)]
            keys = {(kid, p["metadata"].get("namespace", ""), p["metadata"].get("name", "")) for p in pending}
            # a pod must be seen pending on two scans in a row: the scheduler gets a chance first
            confirmed = [p for p in pending if (kid, p["metadata"].get("namespace", ""),
                                                p["metadata"].get("name", "")) in self._seen_pending]
            seen |= keys
            self._scale_up(confirmed, pools, now, all_pods=pods)
            self._scale_down(pods, pending, pools, now)
        self._seen_pending = seen

    def _template(self, cluster: _Cluster, pool: _Pool) -> tuple[dict[str, str], dict[str, str], list[dict]]:
        zone = (pool.data.get("locations") or [cluster.location])[0]
        return self.gke._node_spec(cluster, pool, zone, f"{pool.base}-xxxx")

    def _scale_up(self, pending: list[dict[str, Any]], pools: list[tuple[_Cluster, _Pool]], now: float,
                  all_pods: list[dict[str, Any]] | None = None) -> None:
        # nodes of a pool with nothing on them yet (typically just booted: the scheduler has not bound
        # the pod that asked for them) count as room, as the real autoscaler's scheduling simulation does
        used = {(p.get("spec") or {}).get("nodeName") for p in all_pods or []
                if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed") and not _is_daemon(p)}
        wants: dict[int, tuple[_Cluster, _Pool, list[dict[str, Any]]]] = {}
        for pod in pending:
            for cluster, pool in pools:
                if self._backoff_until.get(id(pool), 0) > now:
                    continue
                if pod_fits_template(pod, *self._template(cluster, pool)):
                    wants.setdefault(id(pool), (cluster, pool, []))[2].append(pod)
                    break
        for cluster, pool, pods in wants.values():
            _, capacity, _ = self._template(cluster, pool)
            per_node = 1000
            for pod in pods:
                req = pod_requests(pod)
                for resource in ("nvidia.com/gpu", "cpu"):
                    if req.get(resource):
                        per_node = min(per_node, max(1, int(parse_quantity(capacity.get(resource, 0)) //
                                                            req[resource])))
            with self.gke._lock:
                empty = sum(1 for names in pool.nodes.values() for n in names if n not in used)
            needed = -(-len(pods) // per_node) - self._busy.get(id(pool), 0) - empty
            if needed <= 0:
                continue
            self._grow(cluster, pool, needed)

    def _grow(self, cluster: _Cluster, pool: _Pool, needed: int) -> None:
        gke = self.gke
        hi = int((pool.data.get("autoscaling") or {}).get("maxNodeCount", 0) or 0)
        with gke._lock:
            sizes = {z: len(pool.nodes.get(z, [])) for z in pool.data.get("locations", [])}
        plan: list[str] = []
        for _ in range(needed):
            zone = min((z for z in sizes if sizes[z] < hi), key=lambda z: sizes[z], default=None)
            if zone is None:
                break
            sizes[zone] += 1
            plan.append(zone)
        if not plan:
            self._record("max_reached", pool.name, "", f"pool {pool.name} is at maxNodeCount {hi} per zone")
            return
        self._busy[id(pool)] = self._busy.get(id(pool), 0) + len(plan)

        def boot() -> None:
            try:
                if not gke.clock.sleep(gke.delays["node_boot"], self._stop):
                    return
                for zone in plan:
                    with gke._lock:
                        alive = pool.data.get("status") in ("RUNNING", "RUNNING_WITH_ERROR") and not cluster.deleting
                    if not alive:
                        return
                    error = gke._add_nodes(cluster, pool, zone, 1)
                    if error:
                        self._backoff_until[id(pool)] = time.monotonic() + gke.clock.scaled(
                            gke.delays["autoscaler_backoff"])
                        self._record("scale_up_failed", pool.name, "", error)
                    else:
                        self._record("scale_up", pool.name, pool.nodes[zone][-1], zone)
            finally:
                self._busy[id(pool)] = max(0, self._busy.get(id(pool), 0) - len(plan))
                self._wake.set()

        threading.Thread(target=boot, name=f"gke-ca-{pool.name}", daemon=True).start()

    def _scale_down(self, pods: list[dict[str, Any]], pending: list[dict[str, Any]],
                    pools: list[tuple[_Cluster, _Pool]], now: float) -> None:
        used = {(p.get("spec") or {}).get("nodeName") for p in pods
                if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed") and not _is_daemon(p)}
        gke = self.gke
        for cluster, pool in pools:
            if self._busy.get(id(pool)):
                continue
            template = self._template(cluster, pool)
            if any(pod_fits_template(p, *template) for p in pending):
                continue  # it may be needed right now
            lo = int((pool.data.get("autoscaling") or {}).get("minNodeCount", 0) or 0)
            with gke._lock:
                zones = {z: list(names) for z, names in pool.nodes.items()}
            for zone, names in zones.items():
                spare = len(names) - lo
                for name in reversed(names):
                    if name in used:
                        self._unneeded_since.pop(name, None)
                        continue
                    since = self._unneeded_since.setdefault(name, now)
                    if spare > 0 and now - since >= gke.clock.scaled(gke.delays["autoscaler_scale_down_unneeded"]):
                        with gke._lock:
                            if name not in pool.nodes.get(zone, []):
                                continue
                            pool.nodes[zone].remove(name)
                            pool.nodes[zone].append(name)  # _remove_nodes takes from the end
                        gke._remove_nodes(cluster, pool, zone, 1)
                        self._unneeded_since.pop(name, None)
                        self._record("scale_down", pool.name, name, zone)
                        spare -= 1

    def snapshot(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "events": list(self.events[-50:])}


def _is_unschedulable(pod: dict[str, Any]) -> bool:
    if (pod.get("spec") or {}).get("nodeName") or (pod.get("status") or {}).get("phase", "Pending") != "Pending":
        return False
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled":
            return cond.get("status") == "False"
    return True


def _is_daemon(pod: dict[str, Any]) -> bool:
    return any(o.get("kind") == "DaemonSet" for o in (pod.get("metadata") or {}).get("ownerReferences") or [])
