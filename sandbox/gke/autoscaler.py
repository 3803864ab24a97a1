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
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sandbox.gke import compute_classes as cc
from sandbox.gke import fast_start
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
    return template_misfit(pod, labels, capacity, taints) is None


def template_misfit(pod: dict[str, Any], labels: dict[str, str], capacity: dict[str, str],
                    taints: list[dict[str, str]]) -> str | None:
    """Why ``pod`` would not schedule on a fresh node of this template, in the scheduler's words (None: it
    would) -- what the cluster autoscaler's NotTriggerScaleUp event counts per node group."""
    spec = pod.get("spec") or {}
    if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
        return "node(s) didn't match Pod's node affinity/selector"
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms") or []
    if required and not any(all(_match_expr(e, labels) for e in term.get("matchExpressions") or [])
                            for term in required):
        return "node(s) didn't match Pod's node affinity/selector"
    wants = pod_requests(pod)
    tolerations = list(spec.get("tolerations") or [])
    if wants.get("nvidia.com/gpu"):
        # GKE's ExtendedResourceToleration: pods asking for GPUs tolerate the GPU taint
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists"})
    for taint in taints:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not _tolerates(tolerations, taint):
            return f"node(s) had untolerated taint {{{taint.get('key')}: {taint.get('value', '')}}}"
    for resource, amount in wants.items():
        if resource in ("cpu", "memory", "nvidia.com/gpu", "ephemeral-storage") and amount > parse_quantity(
                capacity.get(resource, 0)) + 1e-9:
            return f"Insufficient {resource}"
    return None


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
        # Per pool, keyed by the pool object and gone with it: keyed by id(pool), a deleted cluster's entries
        # outlived it, and a new pool that CPython gave the same address inherited them (a class pool's
        # allowed zones from test_capacity made test_park's pool, in another region, never scale up).
        self._backoff_until: weakref.WeakKeyDictionary[_Pool, float] = weakref.WeakKeyDictionary()
        # ComputeClasses: a failed scale-up backs off that zone of that pool (GCE's errors are per zone and
        # machine); a class pod then tries the next zone, then the next priority
        self._zone_backoff: weakref.WeakKeyDictionary[_Pool, dict[str, float]] = weakref.WeakKeyDictionary()
        # the zones a class pod's priority may use in that pool
        self._allowed: weakref.WeakKeyDictionary[_Pool, tuple[str, ...]] = weakref.WeakKeyDictionary()
        self._migrating: dict[str, str] = {}  # node being emptied by active migration -> the better node
        self._busy: weakref.WeakKeyDictionary[_Pool, int] = weakref.WeakKeyDictionary()  # scale-ups in flight
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
            # the scheduler's VolumeBinding filter fails on every node, a fresh one too (a missing claim,
            # a missing class, an unbound Immediate claim): those pods never make a pool grow
            storage = getattr(kube, "storage", None)
            blocked = {id(p): why for p in confirmed if storage is not None and (why := storage.blocked(p))}
            for pod in confirmed:
                if id(pod) in blocked:
                    self._pod_event(kube, pod, "NotTriggerScaleUp", "pod didn't trigger scale-up: "
                                    f"{len(pools)} {blocked[id(pod)]}")
            confirmed = [p for p in confirmed if id(p) not in blocked]
            # pods of an Autopilot ComputeClass get GKE-managed nodes (sandbox/kube/controllers/autopilot.py)
            autopilot = {n for n, c in self._classes(kube).items()
                         if ((c.get("spec") or {}).get("autopilot") or {}).get("enabled")}
            confirmed = [p for p in confirmed if cc.class_of(p) not in autopilot]
            self._scale_up(confirmed, pools, now, all_pods=pods, kube=kube)
            self._migrate(kube, pods, pending, pools, now)
            self._scale_down(pods, pending, pools, now)
        self._seen_pending = seen

    def _template(self, cluster: _Cluster, pool: _Pool) -> tuple[dict[str, str], dict[str, str], list[dict]]:
        zone = (pool.data.get("locations") or [cluster.location])[0]
        return self.gke._node_spec(cluster, pool, zone, f"{pool.base}-xxxx")

    @staticmethod
    def _pod_event(kube: Any, pod: dict[str, Any], reason: str, message: str, etype: str = "Normal") -> None:
        """An event on the pod from ``cluster-autoscaler`` (repeats add to its count)."""
        controller = getattr(kube, "controller", None)
        if controller is not None and hasattr(controller, "event"):
            with contextlib.suppress(Exception):
                controller.event(pod, etype, reason, message, component="cluster-autoscaler")

    def _back_off(self, pool: _Pool, zone: str) -> None:
        until = time.monotonic() + self.gke.clock.scaled(self.gke.delays["autoscaler_backoff"])
        zones = self._zone_backoff.setdefault(pool, {})
        zones[zone] = until
        if all(zones.get(z, 0) >= until - 1e-6 for z in pool.data.get("locations", [])):
            self._backoff_until[pool] = until  # every zone failed: the whole node group backs off

    # ---- ComputeClasses ----------------------------------------------------------------------------
    @staticmethod
    def _classes(kube: Any) -> dict[str, dict[str, Any]]:
        """The cluster's ComputeClass objects by name (none when the kube has no such API)."""
        fn = getattr(kube, "compute_classes", None)
        if callable(fn):
            items = fn()
        else:
            store = getattr(kube, "store", None)
            if store is None or not hasattr(store, "list"):
                return {}
            from sandbox.kube.resources import find

            rtype = find("cloud.google.com", "v1", "computeclasses")
            if rtype is None:
                return {}
            try:
                listed = store.list(rtype)
            except Exception:
                return {}
            items = listed[0] if isinstance(listed, tuple) else listed
        return {(o.get("metadata") or {}).get("name"): o for o in items or []}

    def _room(self, choice: cc.Choice, now: float) -> tuple[tuple[str, ...], str | None]:
        """Zones of a class choice that may take a node now, or why none may."""
        hi = int((choice.pool.data.get("autoscaling") or {}).get("maxNodeCount", 0) or 0)
        with self.gke._lock:
            open_zones = tuple(z for z in choice.zones if len(choice.pool.nodes.get(z, [])) < hi)
        if not open_zones:
            return (), "max node group size reached"
        free = tuple(z for z in open_zones if self._zone_backoff.get(choice.pool, {}).get(z, 0) <= now)
        return free, None if free else "in backoff after failed scale-up"

    def _migrate(self, kube: Any, pods: list[dict[str, Any]], pending: list[dict[str, Any]],
                 pools: list[tuple[_Cluster, _Pool]], now: float) -> None:
        """ComputeClass active migration (``activeMigration.optimizeRulePriority``): a pod running on a
        lower priority than its class's best one with room gets a node of the better priority (a normal
        scale-up: a stockout backs it off), then is evicted from the worse node (cordoned first) once
        that node is up — through the Eviction API's rule, so a PodDisruptionBudget is honoured and
        replicas move one at a time; the emptied node is removed. Nothing moves while a pod of the class
        is pending (scale-ups first)."""
        classes = {n: c for n, c in self._classes(kube).items() if cc.migrates(c)} if kube is not None else {}
        if not classes:
            return
        pending_classes = {cc.class_of(p) for p in pending}
        node_pool = {n: (c, pl) for c, pl in pools for names in pl.nodes.values() for n in names}
        used = {(p.get("spec") or {}).get("nodeName") for p in pods
                if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed") and not _is_daemon(p)}
        for pod in pods:
            name, node = cc.class_of(pod), (pod.get("spec") or {}).get("nodeName")
            meta = pod.get("metadata") or {}
            if name not in classes or name in pending_classes or not node or node not in node_pool \
                    or meta.get("deletionTimestamp") or (pod.get("status") or {}).get("phase") != "Running":
                continue
            choices = cc.choices(classes[name], pools)
            rank = next((c.rank for c in choices if c.pool is node_pool[node][1]), None)
            if rank is None or rank == 0:
                continue
            for better in (c for c in choices if c.rank < rank):
                zones, why = self._room(better, now)
                with self.gke._lock:
                    spare = [n for z in better.zones for n in better.pool.nodes.get(z, [])
                             if n not in used and n not in self._migrating.values()]
                if spare:
                    if self._evict(kube, pod, node, spare[0]):
                        used.add(spare[0])
                    break
                if why is None and not self._busy.get(better.pool):
                    self._allowed[better.pool] = zones
                    if self._grow(better.cluster, better.pool, 1, pods=[], kube=kube):
                        self._record("migration_scale_up", better.pool.name, "", f"for {meta.get('name')} on {node}")
                    break

    def _evict(self, kube: Any, pod: dict[str, Any], node: str, target: str) -> bool:
        """Cordon ``node`` and evict ``pod`` (refused, like ``pods/eviction``, when a PodDisruptionBudget
        selecting it allows no disruption now)."""
        meta = pod["metadata"]
        store = getattr(kube, "store", None)
        if store is None:
            return False
        from sandbox.kube.controllers.common import NODES
        from sandbox.kube.resources import find

        pdb_type = find("policy", "v1", "poddisruptionbudgets")
        labels = meta.get("labels") or {}
        listed = store.list(pdb_type, meta.get("namespace")) if pdb_type is not None else ([], "")
        for pdb in listed[0] if isinstance(listed, tuple) else listed:
            sel = ((pdb.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
            if sel and all(labels.get(k) == v for k, v in sel.items()) and \
                    int((pdb.get("status") or {}).get("disruptionsAllowed", 0)) < 1:
                return False

        def cordon(n: dict[str, Any]) -> dict[str, Any] | None:
            if (n.get("spec") or {}).get("unschedulable"):
                return None
            n.setdefault("spec", {})["unschedulable"] = True
            return n

        with contextlib.suppress(Exception):
            store.mutate(NODES, "", node, cordon)
        try:
            kube.controller.delete_pod(meta.get("namespace", ""), meta.get("name", ""))
        except Exception:
            return False
        self._migrating[node] = target
        self._record("migrated", "", node, f"{meta.get('name')} -> {target}")
        return True

    def _candidates(self, pod: dict[str, Any], pools: list[tuple[_Cluster, _Pool]], kube: Any, now: float
                    ) -> tuple[list[tuple[_Cluster, _Pool]], dict[str, int]]:
        """The node groups to try for ``pod``, in order: a ComputeClass pod's class priorities (skipping
        zones in backoff and groups at their max, as GKE's autoscaler falls through to the next priority);
        any other pod, every autoscaled pool."""
        misfits: dict[str, int] = {}
        name = cc.class_of(pod)
        cls = self._classes(kube).get(name) if name and kube is not None else None
        if cls is None:
            return pools, misfits
        out: list[tuple[_Cluster, _Pool]] = []
        for choice in cc.choices(cls, pools):
            zones, why = self._room(choice, now)
            if why:
                misfits[why] = misfits.get(why, 0) + 1
                continue
            self._allowed[choice.pool] = zones
            out.append((choice.cluster, choice.pool))
        return out, misfits

    def _scale_up(self, pending: list[dict[str, Any]], pools: list[tuple[_Cluster, _Pool]], now: float,
                  all_pods: list[dict[str, Any]] | None = None, kube: Any = None) -> None:
        # nodes of a pool with nothing on them yet (typically just booted: the scheduler has not bound
        # the pod that asked for them) count as room, as the real autoscaler's scheduling simulation does
        used = {(p.get("spec") or {}).get("nodeName") for p in all_pods or []
                if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed") and not _is_daemon(p)}
        wants: dict[int, tuple[_Cluster, _Pool, list[dict[str, Any]]]] = {}
        for pod in pending:
            candidates, misfits = self._candidates(pod, pools, kube, now)
            for cluster, pool in candidates:
                if self._backoff_until.get(pool, 0) > now and pool not in self._allowed:
                    misfits["in backoff after failed scale-up"] = misfits.get("in backoff after failed scale-up",
                                                                             0) + 1
                    continue
                why = template_misfit(pod, *self._template(cluster, pool))
                if why is None:
                    wants.setdefault(id(pool), (cluster, pool, []))[2].append(pod)
                    break
                misfits[why] = misfits.get(why, 0) + 1
            else:
                if kube is not None and misfits:
                    self._pod_event(kube, pod, "NotTriggerScaleUp", "pod didn't trigger scale-up: " + ", ".join(
                        f"{n} {why}" for why, n in sorted(misfits.items())))
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
            needed = -(-len(pods) // per_node) - self._busy.get(pool, 0) - empty
            if needed <= 0:
                continue
            grown = self._grow(cluster, pool, needed, pods=pods, kube=kube)
            if grown and kube is not None:
                for pod in pods:
                    self._pod_event(kube, pod, "TriggeredScaleUp", f"pod triggered scale-up: [{grown}]")

    def _grow(self, cluster: _Cluster, pool: _Pool, needed: int, *, pods: list[dict[str, Any]] | None = None,
              kube: Any = None) -> str:
        """Start ``needed`` nodes (balanced over the pool's zones, up to max per zone); returns the scale-up
        as the autoscaler's events name it, ``{<instance group> 1->2 (max: 3)}`` per zone ("" if none)."""
        gke = self.gke
        hi = int((pool.data.get("autoscaling") or {}).get("maxNodeCount", 0) or 0)
        now = time.monotonic()
        allowed = self._allowed.get(pool) or tuple(pool.data.get("locations", []))
        with gke._lock:
            sizes = {z: len(pool.nodes.get(z, [])) for z in pool.data.get("locations", [])
                     if z in allowed and self._zone_backoff.get(pool, {}).get(z, 0) <= now}
        plan: list[str] = []
        for _ in range(needed):
            zone = min((z for z in sizes if sizes[z] < hi), key=lambda z: sizes[z], default=None)
            if zone is None:
                break
            sizes[zone] += 1
            plan.append(zone)
        if not plan:
            self._record("max_reached", pool.name, "", f"pool {pool.name} is at maxNodeCount {hi} per zone")
            return ""
        self._busy[pool] = self._busy.get(pool, 0) + len(plan)
        planned = len(plan)  # plan shrinks when GCE refuses a zone
        with gke._lock:
            before = {z: len(pool.nodes.get(z, [])) for z in set(plan)}
        grown = " ".join(
            f"{{https://www.googleapis.com/compute/v1/projects/{cluster.project}/zones/{z}/instanceGroups/"
            f"{pool.base}-grp {before[z]}->{before[z] + plan.count(z)} (max: {hi})}}" for z in sorted(before))

        def failed(zone: str, error: str) -> None:
            self._back_off(pool, zone)
            self._record("scale_up_failed", pool.name, "", error)
            for pod in pods or []:  # the GCE error reaches the pods that asked (visibility: scale.up.error.*)
                self._pod_event(kube, pod, "FailedScaleUp", f"Node scale up in zones {zone} associated with this "
                                f"pod failed: {cc.gce_reason(error)} ({_gce_code(error)}). Pod is at risk of not "
                                "being scheduled.", etype="Warning")

        def boot() -> None:
            try:
                # GCE refuses a VM it cannot start (stockout, quota) within seconds of the MIG's request,
                # long before a node would have booted: the autoscaler moves on at once
                node_boot = fast_start.node_boot_s(gke, pool.data)  # by machine family and GPU driver
                error_after = min(gke.delays["autoscaler_scale_up_error"], node_boot)
                if not gke.clock.sleep(error_after, self._stop):
                    return
                for zone in list(plan):
                    error = gke._capacity_error(cluster, pool, zone)
                    if error:
                        failed(zone, error)
                        plan.remove(zone)
                if not plan or not gke.clock.sleep(node_boot - error_after, self._stop):
                    return
                for zone in plan:
                    with gke._lock:
                        alive = pool.data.get("status") in ("RUNNING", "RUNNING_WITH_ERROR") and not cluster.deleting
                    if not alive:
                        return
                    error = gke._add_nodes(cluster, pool, zone, 1)
                    if error:
                        failed(zone, error)
                    else:
                        self._record("scale_up", pool.name, pool.nodes[zone][-1], zone)
            finally:
                self._busy[pool] = max(0, self._busy.get(pool, 0) - planned)
                self._wake.set()

        threading.Thread(target=boot, name=f"gke-ca-{pool.name}", daemon=True).start()
        return grown

    def _scale_down(self, pods: list[dict[str, Any]], pending: list[dict[str, Any]],
                    pools: list[tuple[_Cluster, _Pool]], now: float) -> None:
        used = {(p.get("spec") or {}).get("nodeName") for p in pods
                if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed") and not _is_daemon(p)}
        gke = self.gke
        for cluster, pool in pools:
            if self._busy.get(pool):
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
                    migrated = self._migrating.pop(name, None) is not None  # active migration removes it now
                    if spare > 0 and (migrated or now - since >= gke.clock.scaled(
                            gke.delays["autoscaler_scale_down_unneeded"])):
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


def _gce_code(error: str) -> str:
    """``ZONE_RESOURCE_POOL_EXHAUSTED`` / ``QUOTA_EXCEEDED`` out of a GCE instance error."""
    m = re.search(r"\[([A-Z_]+)\]", error)
    return m.group(1) if m else "UNKNOWN"


def _is_daemon(pod: dict[str, Any]) -> bool:
    return any(o.get("kind") == "DaemonSet" for o in (pod.get("metadata") or {}).get("ownerReferences") or [])
