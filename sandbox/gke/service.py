"""``Gke``, the GKE control plane (service name ``"gke"``), assembled from one mixin per API area:
clusters (:mod:`~sandbox.gke.clusters`), node pools (:mod:`~sandbox.gke.node_pools`), their nodes,
instance groups and quota (:mod:`~sandbox.gke.nodes`), Autopilot (:mod:`~sandbox.gke.autopilot`),
each cluster's Kubernetes API (:mod:`~sandbox.gke.cluster_kube`), operations
(:mod:`~sandbox.gke.operations`) and versions / serverConfig (:mod:`~sandbox.gke.versions`). This
class holds the state they share (set in ``__init__``: ``clock``, ``faults``, ``compute``, ``kube``,
``delays``, ``_lock`` / ``_changed``, ``_clusters``, ``_ops``, ``_autopilot_nodes``), serves
:class:`~sandbox.gke.rest.GkeHandler`, runs the :class:`~sandbox.gke.autoscaler.ClusterAutoscaler`
and offers the sandbox's own views (``snapshot``, ``cluster``, ``cluster_kube``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from sandbox.compute import Compute
from sandbox.core import DEFAULT_DELAYS, Clock, Faults, HttpError, SandboxHTTPServer, serve
from sandbox.gke.autopilot import AutopilotMixin
from sandbox.gke.autoscaler import ClusterAutoscaler
from sandbox.gke.cluster_kube import ClusterKubeMixin
from sandbox.gke.clusters import ClustersMixin
from sandbox.gke.fast_nodes import PreInitialized
from sandbox.gke.node_pools import NodePoolsMixin
from sandbox.gke.nodes import NodesMixin
from sandbox.gke.operations import OperationsMixin
from sandbox.gke.rest import GkeHandler
from sandbox.gke.spot import CapacityMixin
from sandbox.gke.state import _Cluster, _Op
from sandbox.gke.versions import VersionsMixin

# extra delays (cloud seconds) not in core.DEFAULT_DELAYS
GKE_DELAYS: dict[str, float] = {
    "operation_pending": 2.0,
    "cluster_update": 60.0,
    "master_upgrade": 600.0,
    "node_pool_update": 90.0,
    "quick_update": 5.0,
    # cluster autoscaler (Standard pools with autoscaling.enabled)
    "autoscaler_scan": 10.0,  # how often it looks at pending pods and idle nodes
    "autoscaler_scale_down_unneeded": 600.0,  # a node must be empty this long before it is removed
    "autoscaler_backoff": 300.0,  # after a failed scale-up (stockout, quota) the pool is left alone
    # GCE answers a VM it cannot start (ZONE_RESOURCE_POOL_EXHAUSTED, QUOTA_EXCEEDED) this soon after the
    # MIG asks; the autoscaler then tries the next zone / ComputeClass priority
    "autoscaler_scale_up_error": 20.0,
    # a Spot VM's preemption notice (ACPI G2 soft off) before Compute Engine stops it
    "spot_preemption_notice": 30.0,
}


class Gke(ClustersMixin, NodePoolsMixin, NodesMixin, AutopilotMixin, ClusterKubeMixin, OperationsMixin,
          VersionsMixin, CapacityMixin):
    """GKE control plane over REST (service name ``"gke"``)."""

    def __init__(self, *, clock: Clock, faults: Faults, compute: Compute, kube: Any = None,
                 kube_factory: Callable[[str, str, str], Any] | None = None,
                 kube_release: Callable[[str, str, str, Any], Any] | None = None,
                 delays: dict[str, float] | None = None) -> None:
        self.clock = clock
        self.faults = faults
        self.compute = compute
        self.kube = kube  # shared by every cluster when there is no kube_factory
        self.kube_factory = kube_factory
        self.kube_release = kube_release
        self.delays = {**DEFAULT_DELAYS, **GKE_DELAYS, **(delays or {})}
        self.wait_timeout = 60.0  # real seconds an ``:wait`` may block at most
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._clusters: dict[tuple[str, str, str], _Cluster] = {}
        self._ops: dict[str, _Op] = {}
        self._stop = threading.Event()
        self._server: SandboxHTTPServer | None = None
        self.autoscaler = ClusterAutoscaler(self)
        # GKE's pre-initialized capacity for fast-starting nodes, per zone and machine family (fast_nodes.py)
        self.fast_nodes = PreInitialized(clock)
        # (id(kube), Autopilot node) -> what it holds: {"kube", "project", "location", "region", "cluster",
        # "quota"} (the record keeps the kube alive, so its id cannot be reused meanwhile)
        self._autopilot_nodes: dict[tuple[int, str], dict[str, Any]] = {}

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._server is None:
            self._stop.clear()
            self._server = serve(GkeHandler, state=self, faults=self.faults)
            self.autoscaler.start()

    def stop(self) -> None:
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        self.autoscaler.stop()
        if self._server is not None:
            self._server.stop()
            self._server = None
        # the clusters' own API servers go too (side by side: each takes a poll interval to stop)
        with self._lock:
            owned = [c for c in self._clusters.values() if c.owns_kube and c.kube is not None]
        stoppers = [threading.Thread(target=self._close_kube, args=(c,), daemon=True) for c in owned]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(timeout=10)

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("GKE emulator is not started")
        return self._server.url

    # ---- sandbox views ---------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            clusters = [self._render_cluster(c) for c in self._clusters.values()]
            pools = [
                {"project": c.project, "location": c.location, "cluster": c.name, "name": p.name,
                 "status": p.data.get("status"), "nodes": {z: list(n) for z, n in p.nodes.items() if n},
                 "node_count": p.node_count(), "autoscaling": p.data.get("autoscaling", {}),
                 "spot": bool(p.data.get("config", {}).get("spot") or p.data.get("config", {}).get("preemptible")),
                 "accelerators": p.data.get("config", {}).get("accelerators", [])}
                for c in self._clusters.values() for p in c.pools.values()
            ]
            ops = [dict(o.data) for o in self._ops.values()]
            autopilot = [{"node": n, **{k: v for k, v in rec.items() if k != "kube"}}
                         for (_, n), rec in self._autopilot_nodes.items()]
        return {"clusters": clusters, "node_pools": pools, "operations": ops, "autopilot_nodes": autopilot,
                "autoscaler": self.autoscaler.snapshot()}

    def cluster_kube(self, name: str, location: str = "-", project: str | None = None) -> Any:
        """The Kubernetes API object of a cluster (``None`` if there is no such cluster)."""
        with self._lock:
            try:
                return self._get_cluster(project or self.compute.project, location, name).kube
            except HttpError:
                return None

    def cluster(self, name: str, location: str = "-", project: str | None = None) -> dict[str, Any] | None:
        """The cluster as the API would return it (``None`` if absent)."""
        with self._lock:
            try:
                return self._render_cluster(self._get_cluster(project or self.compute.project, location, name))
            except HttpError:
                return None
