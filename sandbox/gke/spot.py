"""Capacity as Compute Engine has it at the moment a VM is asked for (issue 23): what GCE answers a
managed instance group growing by one VM — a zone's stockout (spot capacity goes first), a quota wall — and
the preemption of a Spot VM. Mixed into :class:`~sandbox.gke.service.Gke`; the cluster autoscaler
(:mod:`~sandbox.gke.autoscaler`) probes with ``_capacity_error`` before a node boots, the control API and
``SandboxClient.preempt_node`` call ``preempt_node``.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
from typing import Any

from sandbox.compute import QuotaExceeded
from sandbox.gke.common import _err
from sandbox.gke.state import _Cluster, _Pool


class CapacityMixin:
    """GCE's answers at scale-up time, and Spot preemption, of :class:`~sandbox.gke.service.Gke`."""

    def _capacity_error(self, cluster: _Cluster, pool: _Pool, zone: str) -> str | None:
        """What GCE would answer the MIG asking for one more VM of ``pool`` in ``zone`` now (a stockout,
        spot capacity gone, a quota wall), or None; holds nothing."""
        acc, _, spot, _ = self._pool_shape(pool.data)
        name = f"{pool.base}-{secrets.token_hex(2)}"
        if self.compute.stocked_out(zone, acc, spot=spot):
            return (f"[ZONE_RESOURCE_POOL_EXHAUSTED]: Instance '{name}' creation failed: "
                    f"{self.compute.stockout_message(cluster.project, zone)}")
        amounts = self._node_quota(pool.data)
        try:
            self.compute.reserve_many(cluster.region, amounts, project=cluster.project)
        except QuotaExceeded as exc:
            return f"[QUOTA_EXCEEDED]: Instance '{name}' creation failed: {exc.compute_message}"
        self.compute.release_many(cluster.region, amounts, project=cluster.project)
        return None

    # ---- spot preemption ------------------------------------------------------------------------
    def preempt_node(self, name: str) -> dict[str, Any]:
        """Compute Engine preempts the Spot (or preemptible) VM behind node ``name``: the ~30 s notice
        (``spot_preemption_notice``) starts at once — GKE taints the node
        ``cloud.google.com/impending-node-termination:NoSchedule`` and the kubelet's graceful node shutdown
        gives its pods 15 s (system pods the rest) — then the VM stops: the Node and its pods are gone,
        its quota is released, and the pods' owners make replacements that the cluster autoscaler places
        (through their ComputeClass: on the next priority when spot capacity is gone). Returns
        ``{"node", "cluster", "pool", "zone"}``; 404 for an unknown node, 400 for an on-demand one."""
        with self._lock:
            found = [(c, p, z) for c in self._clusters.values() for p in c.pools.values()
                     for z, names in p.nodes.items() if name in names]
        if not found:
            raise _err(404, "NOT_FOUND", f"The resource 'node {name}' was not found")
        cluster, pool, zone = found[0]
        if not self._pool_shape(pool.data)[2]:
            raise _err(400, "FAILED_PRECONDITION", f"Node {name} is not a Spot or preemptible VM: only those "
                                                   "are preempted")
        kube = cluster.kube
        notice = self.delays["spot_preemption_notice"]

        def run() -> None:
            store = getattr(kube, "store", None)
            if store is not None:
                from sandbox.kube.controllers.common import NODES, PODS

                def taint(node: dict[str, Any]) -> dict[str, Any]:
                    spec = node.setdefault("spec", {})
                    spec["taints"] = [*spec.get("taints", []), {"key": "cloud.google.com/impending-node-termination",
                                                                "effect": "NoSchedule"}]
                    return node

                with contextlib.suppress(Exception):
                    store.mutate(NODES, "", name, taint)
                pods, _ = store.list(PODS, None, lambda p: (p.get("spec") or {}).get("nodeName") == name)
                for pod in pods:
                    meta = pod["metadata"]
                    grace = min(15, int((pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30)))
                    with contextlib.suppress(Exception):
                        kube.controller.delete_pod(meta["namespace"], meta["name"], grace=grace)
            if not self.clock.sleep(notice, self._stop):
                return
            with self._lock:
                names = pool.nodes.get(zone, [])
                if name not in names:
                    return
                names.remove(name)
                names.append(name)  # _remove_nodes takes from the end
            self._remove_nodes(cluster, pool, zone, 1)

        threading.Thread(target=run, name=f"gke-preempt-{name}", daemon=True).start()
        return {"node": name, "cluster": cluster.name, "pool": pool.name, "zone": zone}

