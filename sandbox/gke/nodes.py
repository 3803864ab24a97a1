"""Node-pool nodes as Compute Engine VMs: each node is a ``Node`` object in the cluster's Kubernetes API
with the labels, capacity and taints GKE gives it (``cloud.google.com/gke-nodepool``,
``gke-accelerator``, ``gke-spot``, the ``nvidia.com/gpu=present:NoSchedule`` taint, the pool's own
labels and taints), holds Compute quota (the GPU metric -- ``PREEMPTIBLE_*`` for spot/preemptible --
plus ``CPUS``, and the project-wide ``GPUS_ALL_REGIONS`` / ``CPUS_ALL_REGIONS``) for as long as it
exists, and belongs to the pool's managed instance group in its zone (``<base>-grp``). Node counts
are per zone. A resize that runs out of quota or meets a stocked-out zone keeps the nodes that could
start and leaves the pool ERROR (or RUNNING_WITH_ERROR when some nodes run) with GKE's "Not all
instances running in IGM" message. Creating a cluster or pool checks the initial nodes' quota up
front: a shortfall is a synchronous 403 with GKE's "Insufficient regional quota" text.
"""

from __future__ import annotations

import secrets
from typing import Any

from sandbox.compute import QuotaExceeded, accelerator_metric
from sandbox.gke import fast_start
from sandbox.gke.common import _err
from sandbox.gke.machines import machine_shape
from sandbox.gke.state import _Cluster, _Pool


class NodesMixin:
    """Nodes, instance groups and node quota of :class:`~sandbox.gke.service.Gke`."""

    @staticmethod
    def _pool_shape(pool_data: dict[str, Any]) -> tuple[str | None, int, bool, str]:
        config = pool_data.get("config", {})
        accs = config.get("accelerators") or []
        acc = accs[0].get("acceleratorType") if accs else None
        count = int(accs[0].get("acceleratorCount", 0)) if accs else 0
        spot = bool(config.get("spot") or config.get("preemptible"))
        return acc, count, spot, config.get("machineType", "e2-medium")

    def _node_quota(self, pool_data: dict[str, Any]) -> dict[str, float]:
        acc, count, spot, machine = self._pool_shape(pool_data)
        vcpus, _, _ = machine_shape(machine)
        amounts: dict[str, float] = {"CPUS": float(vcpus)}
        if acc:
            amounts[accelerator_metric(acc, spot=spot)] = float(count)
        return amounts

    def _node_spec(self, cluster: _Cluster, pool: _Pool, zone: str, name: str
                   ) -> tuple[dict[str, str], dict[str, str], list[dict[str, str]]]:
        config = pool.data.get("config", {})
        acc, count, spot, machine = self._pool_shape(pool.data)
        vcpus, mem_gib, _ = machine_shape(machine)
        family = machine.split("-")[0]
        labels = {
            "cloud.google.com/gke-nodepool": pool.name,
            "cloud.google.com/gke-os-distribution": "ubuntu" if "UBUNTU" in config.get("imageType", "") else "cos",
            "cloud.google.com/gke-boot-disk": config.get("diskType", "pd-balanced"),
            "cloud.google.com/gke-container-runtime": "containerd",
            "cloud.google.com/gke-cpu-scaling-level": str(vcpus),
            "cloud.google.com/gke-logging-variant": "DEFAULT",
            "cloud.google.com/gke-max-pods-per-node": "110",
            "cloud.google.com/gke-provisioning": "spot" if config.get("spot") else
            ("preemptible" if config.get("preemptible") else "standard"),
            "cloud.google.com/gke-stack-type": "IPV4",
            "cloud.google.com/machine-family": family,
            "cloud.google.com/private-node": "false",
            "beta.kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux",
            "beta.kubernetes.io/instance-type": machine,
            "kubernetes.io/arch": "amd64", "kubernetes.io/os": "linux", "kubernetes.io/hostname": name,
            "node.kubernetes.io/instance-type": machine,
            "topology.kubernetes.io/region": cluster.region, "topology.kubernetes.io/zone": zone,
            "failure-domain.beta.kubernetes.io/region": cluster.region,
            "failure-domain.beta.kubernetes.io/zone": zone,
            "topology.gke.io/zone": zone,
        }
        if config.get("spot"):
            labels["cloud.google.com/gke-spot"] = "true"
        if config.get("preemptible"):
            labels["cloud.google.com/gke-preemptible"] = "true"
        if cluster.data.get("workloadIdentityConfig", {}).get("workloadPool"):
            labels["iam.gke.io/gke-metadata-server-enabled"] = "true"
        capacity = {
            "cpu": str(vcpus),
            "memory": f"{int(mem_gib * 1024 * 1024 * 0.96)}Ki",
            "pods": "110",
            "ephemeral-storage": f"{int(config.get('diskSizeGb', 100) * 1024 * 1024 * 0.94)}Ki",
        }
        taints: list[dict[str, str]] = []
        if acc:
            labels["cloud.google.com/gke-accelerator"] = acc
            labels["cloud.google.com/gke-accelerator-count"] = str(count)
            labels["cloud.google.com/gke-gpu"] = "true"
            driver = config["accelerators"][0].get("gpuDriverInstallationConfig", {}).get("gpuDriverVersion")
            if driver and driver != "INSTALLATION_DISABLED":
                labels["cloud.google.com/gke-gpu-driver-version"] = driver.lower()
            capacity["nvidia.com/gpu"] = str(count)
            taints.append({"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"})
        effects = {"NO_SCHEDULE": "NoSchedule", "PREFER_NO_SCHEDULE": "PreferNoSchedule",
                   "NO_EXECUTE": "NoExecute"}
        for t in config.get("taints", []):
            taints.append({"key": t.get("key", ""), "value": t.get("value", ""),
                           "effect": effects.get(t.get("effect", ""), "NoSchedule")})
        labels.update(fast_start.node_labels(cluster, config))
        labels.update(config.get("labels", {}))
        return labels, capacity, taints

    def _add_nodes(self, cluster: _Cluster, pool: _Pool, zone: str, n: int) -> str | None:
        """Start ``n`` nodes in ``zone``; returns an error message for the ones that could not start."""
        acc, _, spot, _ = self._pool_shape(pool.data)
        started: list[str] = []
        error = None
        for _ in range(n):
            name = f"{pool.base}-{secrets.token_hex(2)}"
            if self.compute.stocked_out(zone, acc, spot=spot):
                error = (f"[ZONE_RESOURCE_POOL_EXHAUSTED]: Instance '{name}' creation failed: "
                         f"{self.compute.stockout_message(cluster.project, zone)}")
                break
            try:
                self.compute.reserve_many(cluster.region, self._node_quota(pool.data), project=cluster.project)
            except QuotaExceeded as exc:
                error = f"[QUOTA_EXCEEDED]: Instance '{name}' creation failed: {exc.compute_message}"
                break
            labels, capacity, taints = self._node_spec(cluster, pool, zone, name)
            self._kube_add(cluster, name, labels, capacity, taints, pool.data.get("version"))
            fast_start.preload(self, cluster, pool, name)
            started.append(name)
        with self._lock:
            pool.nodes.setdefault(zone, []).extend(started)
            self._sync_mig(cluster, pool, zone)
        if error:
            total = len(pool.nodes.get(zone, []))
            return (f"Google Compute Engine: Not all instances running in IGM after 1m0s. Expected "
                    f"{total + n - len(started)}, running {total}, transitioning 0. Current errors: {error}")
        return None

    def _remove_nodes(self, cluster: _Cluster, pool: _Pool, zone: str, n: int | None = None) -> None:
        with self._lock:
            names = pool.nodes.get(zone, [])
            keep = 0 if n is None else max(0, len(names) - n)
            victims = names[keep:]
            pool.nodes[zone] = names[:keep]
        for name in reversed(victims):
            self._kube_remove(cluster.kube, name)
            self.compute.release_many(cluster.region, self._node_quota(pool.data), project=cluster.project)
        with self._lock:
            self._sync_mig(cluster, pool, zone)

    def _mig_name(self, pool: _Pool, zone: str) -> str:
        return f"{pool.base}-grp"

    def _sync_mig(self, cluster: _Cluster, pool: _Pool, zone: str) -> None:
        self.compute.set_mig(zone, self._mig_name(pool, zone), instances=pool.nodes.get(zone, []),
                             base_instance_name=pool.base, project=cluster.project)

    def _resize(self, cluster: _Cluster, pool: _Pool, per_zone: int) -> list[str]:
        """Move every pool zone to ``per_zone`` nodes; returns per-zone errors."""
        errors = []
        for zone in pool.data.get("locations", []):
            have = len(pool.nodes.get(zone, []))
            if per_zone > have:
                msg = self._add_nodes(cluster, pool, zone, per_zone - have)
                if msg:
                    errors.append(msg)
            elif per_zone < have:
                self._remove_nodes(cluster, pool, zone, have - per_zone)
        return errors

    def _pool_status_after(self, pool: _Pool, errors: list[str]) -> None:
        if not errors:
            pool.data["status"] = "RUNNING"
            pool.data.pop("statusMessage", None)
            pool.data.pop("conditions", None)
            return
        pool.data["status"] = "RUNNING_WITH_ERROR" if pool.node_count() else "ERROR"
        pool.data["statusMessage"] = errors[0]
        pool.data["conditions"] = [{"code": "GCE_STOCKOUT" if "POOL_EXHAUSTED" in errors[0] else "GCE_QUOTA_EXCEEDED",
                                    "message": errors[0],
                                    "canonicalCode": "RESOURCE_EXHAUSTED"}]

    # ---- quota -----------------------------------------------------------------------------------
    def _check_pool_quota(self, cluster: _Cluster, pools: list[_Pool]) -> None:
        """GKE refuses a create whose initial nodes do not fit the quota (403)."""
        amounts: dict[str, float] = {}
        for pool in pools:
            n = int(pool.data.get("initialNodeCount", 0) or 0) * len(pool.data["locations"])
            for m, v in self._node_quota(pool.data).items():
                amounts[m] = amounts.get(m, 0.0) + v * n
        amounts = {m: v for m, v in amounts.items() if v > 0}
        if not amounts:
            return
        try:
            self.compute.reserve_many(cluster.region, amounts, project=cluster.project)
        except QuotaExceeded as exc:
            raise _err(403, "PERMISSION_DENIED", str(exc)) from None
        self.compute.release_many(cluster.region, amounts, project=cluster.project)

    def _check_quota_delta(self, cluster: _Cluster, pool: _Pool, new: dict[str, Any]) -> None:
        per_zone = max((len(v) for v in pool.nodes.values()), default=0)
        n = per_zone * len(new.get("locations", []))
        old_n = pool.node_count()
        old = self._node_quota(pool.data)
        want = self._node_quota(new)
        delta = {m: want.get(m, 0.0) * n - old.get(m, 0.0) * old_n for m in set(old) | set(want)}
        delta = {m: v for m, v in delta.items() if v > 0}
        if delta:
            try:
                self.compute.reserve_many(cluster.region, delta, project=cluster.project)
            except QuotaExceeded as exc:
                raise _err(403, "PERMISSION_DENIED", str(exc)) from None
            self.compute.release_many(cluster.region, delta, project=cluster.project)
