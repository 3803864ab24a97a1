"""Autopilot clusters (``autopilot.enabled``): GKE manages their nodes, so they have no node pools; the
kube emulator, told the cluster is Autopilot, provisions a node for pods that need one (in a Standard
cluster, for the pods that select an Autopilot ComputeClass). How long such a GPU node takes to boot,
fast-starting nodes included, is ``sandbox/gke/fast_nodes.py``. GKE pays for
them here: each Autopilot node holds Compute quota of its cluster's project (the GPU metric,
``PREEMPTIBLE_*`` for Spot, plus ``CPUS``) while it exists; one that cannot start (stockout, quota)
is taken away again, so its pod stays Pending as on GKE; a deleted cluster's Autopilot nodes give
their quota back at once.
"""

from __future__ import annotations

import contextlib
from typing import Any

from sandbox.compute import ACCELERATOR_TYPES, QuotaExceeded, accelerator_metric
from sandbox.gke.autoscaler import parse_quantity
from sandbox.gke.state import _Cluster


class AutopilotMixin:
    """Autopilot node provisioning hooks of :class:`~sandbox.gke.service.Gke`."""

    def _kube_autopilot(self, cluster: _Cluster, enabled: bool) -> None:
        """Tell the cluster's kube emulator that it is Autopilot (it then provisions nodes for pods)."""
        kube = cluster.kube
        if kube is None:
            return
        method = getattr(kube, "enable_autopilot" if enabled else "disable_autopilot", None)
        if callable(method):
            method(cluster.name)
            return
        clusters = getattr(kube, "autopilot_clusters", None)
        if clusters is not None:
            if enabled:
                clusters.add(cluster.name)
            else:
                clusters.discard(cluster.name)

    # ---- Autopilot nodes (provisioned by the kube emulator, paid for here) -----------------------
    def autopilot_node_event(self, kube: Any, event_type: str, name: str, cluster_name: str,
                             labels: dict[str, str], capacity: dict[str, Any]) -> None:
        """Autopilot nodes of ``kube`` hold Compute quota of its cluster's project like any VM; one that
        cannot start (stockout, quota) is taken away again, so its pod stays Pending as on GKE."""
        key = (id(kube), name)
        if event_type == "DELETED":
            with self._lock:
                held = self._autopilot_nodes.pop(key, None)
            if held is not None:
                self.compute.release_many(held["region"], held["quota"], project=held["project"])
            return
        if event_type != "ADDED":
            return
        with self._lock:
            if key in self._autopilot_nodes:
                return
            # an Autopilot cluster's node, or one GKE made for an Autopilot-mode pod of a Standard cluster
            # (a ComputeClass with spec.autopilot.enabled): both are paid for the same way
            matches = [c for c in self._clusters.values() if c.kube is kube and
                       c.name == cluster_name and not c.deleting]
            cluster = matches[-1] if matches else None
        if cluster is None:
            return
        acc = labels.get("cloud.google.com/gke-accelerator")
        acc = acc if acc in ACCELERATOR_TYPES else None
        gpus = int(parse_quantity(capacity.get("nvidia.com/gpu", 0)))
        spot = labels.get("cloud.google.com/gke-spot") == "true" or \
            labels.get("cloud.google.com/gke-provisioning") == "spot"
        amounts: dict[str, float] = {"CPUS": parse_quantity(capacity.get("cpu", 0))}
        if acc and gpus:
            amounts[accelerator_metric(acc, spot=spot)] = float(gpus)
        zones = [z for z in cluster.data.get("locations", []) if acc is None or self.compute.offers(z, acc)]
        zone = labels.get("topology.kubernetes.io/zone") or (zones[0] if zones else cluster.location)
        problem = None
        if self.compute.stocked_out(zone, acc):
            problem = self.compute.stockout_message(cluster.project, zone)
        else:
            try:
                self.compute.reserve_many(cluster.region, amounts, project=cluster.project)
            except QuotaExceeded as exc:
                problem = exc.compute_message
        if problem is None:
            with self._lock:
                if not cluster.deleting:  # else the cluster's teardown has begun: give it back at once
                    self._autopilot_nodes[key] = {"kube": kube, "project": cluster.project,
                                                  "location": cluster.location, "region": cluster.region,
                                                  "cluster": cluster.name, "quota": amounts}
                    return
            self.compute.release_many(cluster.region, amounts, project=cluster.project)
            return
        self.autoscaler._record("autopilot_scale_up_failed", "", name, problem)
        self._kube_remove(kube, name)

    def _remove_autopilot_nodes(self, cluster: _Cluster) -> None:
        """Give back the quota of the cluster's Autopilot nodes now (not when the node events arrive:
        a per-cluster API server is stopped right after) and remove the nodes."""
        kube = cluster.kube
        with self._lock:
            mine = [k for k, rec in self._autopilot_nodes.items()
                    if rec["kube"] is kube and (rec["project"], rec["location"], rec["cluster"]) == cluster.key]
            held = [(k[1], self._autopilot_nodes.pop(k)) for k in mine]
        for name, rec in held:
            self.compute.release_many(rec["region"], rec["quota"], project=rec["project"])
            with contextlib.suppress(Exception):
                self._kube_remove(kube, name)
