"""``projects.locations.clusters.nodePools``: create (validated as GKE does: the name, a machine type that
exists, one accelerator type that the machine can carry and every pool zone offers, not both spot and
preemptible, sane autoscaling limits; counts per zone), get and list, delete, ``setSize``,
``setAutoscaling`` (also reached through ``clusters.update(desiredNodePoolAutoscaling)``), ``update``
(a surge upgrade: machine type, accelerators, labels, taints or image type recreate the nodes, the
quota of the difference is checked first; locations move the pool) and ``setManagement``. Autopilot
clusters have no node pools (400).
"""

from __future__ import annotations

import json
import re
import secrets
import zlib
from typing import Any

from google.cloud import container_v1

from sandbox.compute import ACCELERATOR_TYPES
from sandbox.gke import fast_start
from sandbox.gke.common import API_BASE, _bad, _err, normalize
from sandbox.gke.machines import _accepts, machine_shape
from sandbox.gke.state import _Cluster, _Op, _OpFailed, _Pool

POOL_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")


class NodePoolsMixin:
    """The node pools API of :class:`~sandbox.gke.service.Gke`."""

    # ---- helpers ---------------------------------------------------------------------------------
    def _get_pool(self, cluster: _Cluster, name: str) -> _Pool:
        pool = cluster.pools.get(name)
        if pool is None:
            raise _err(404, "NOT_FOUND",
                       f"Not found: {self._cluster_path(cluster.project, cluster.location, cluster.name)}"
                       f"/nodePools/{name}.")
        return pool

    def _render_pool(self, cluster: _Cluster, pool: _Pool) -> dict[str, Any]:
        data = dict(pool.data)
        return data

    # ---- validation ------------------------------------------------------------------------------
    def _validate_pool(self, cluster: _Cluster, data: dict[str, Any], zones: list[str]) -> dict[str, Any]:
        name = data.get("name", "")
        if not POOL_NAME_RE.match(name):
            raise _bad(f"Invalid value for field \"nodePool.name\": \"{name}\". Node pool names must start "
                       f"with a letter, contain only lowercase letters, numbers and hyphens, and be at most 40 "
                       f"characters.")
        config = data.setdefault("config", {})
        config.setdefault("machineType", "e2-medium")
        config.setdefault("diskSizeGb", 100)
        config.setdefault("diskType", "pd-balanced")
        config.setdefault("imageType", "COS_CONTAINERD")
        config.setdefault("serviceAccount", "default")
        config.setdefault("oauthScopes", ["https://www.googleapis.com/auth/cloud-platform"])
        config.setdefault("metadata", {"disable-legacy-endpoints": "true"})
        machine = config["machineType"]
        try:
            _, _, implied = machine_shape(machine)
        except ValueError:
            raise _bad(f"Invalid machine type \"{machine}\": it does not exist in zone {zones[0]}.") from None
        accs = config.get("accelerators") or []
        if not accs and implied is not None:  # GKE attaches the GPUs of accelerator-optimized machines
            accs = config["accelerators"] = [{"acceleratorType": implied[0][0], "acceleratorCount": str(implied[1])}]
        if len(accs) > 1:
            raise _bad("Only one accelerator type per node pool is supported.")
        if accs:
            acc = accs[0].get("acceleratorType", "")
            count = int(accs[0].get("acceleratorCount", 0) or 0)
            if acc not in ACCELERATOR_TYPES:
                raise _bad(f"Accelerator type \"{acc}\" does not exist. Valid types: "
                           f"{', '.join(sorted(ACCELERATOR_TYPES))}.")
            if count < 1 or count > ACCELERATOR_TYPES[acc][1]:
                raise _bad(f"Invalid accelerator count {count} for {acc}: must be between 1 and "
                           f"{ACCELERATOR_TYPES[acc][1]}.")
            problem = _accepts(machine, acc, count)
            if problem:
                raise _bad(problem)
            for zone in zones:
                if not self.compute.offers(zone, acc):
                    raise _bad(f"Accelerator type \"{acc}\" does not exist in zone {zone}. It is offered in: "
                               f"{', '.join(z for z in self.compute.zones(cluster.region) if self.compute.offers(z, acc)) or 'no zone of ' + cluster.region}.")
        if config.get("spot") and config.get("preemptible"):
            raise _bad("Spot and preemptible cannot both be set.")
        count = int(data.get("initialNodeCount", 0) or 0)
        if count < 0:
            raise _bad("Node pool initial_node_count must be non-negative.")
        auto = data.get("autoscaling") or {}
        if auto.get("enabled"):
            lo, hi = int(auto.get("minNodeCount", 0) or 0), int(auto.get("maxNodeCount", 0) or 0)
            if lo < 0 or hi < 1 or lo > hi:
                raise _bad(f"Invalid autoscaling limits: min {lo}, max {hi} (need 0 <= min <= max, max >= 1).")
        fast_start.validate(self, cluster, data)
        return data

    def _zones_for(self, cluster: _Cluster, locations: list[str] | None) -> list[str]:
        zones = list(locations or cluster.data.get("locations") or [])
        region = cluster.region
        for z in zones:
            if z not in self.compute.zones(region):
                raise _bad(f"Location \"{z}\" is not a zone of {region}. Valid zones: "
                           f"{', '.join(self.compute.zones(region))}.")
        if not zones:
            raise _bad("No node locations.")
        return zones

    def _new_pool(self, cluster: _Cluster, data: dict[str, Any]) -> _Pool:
        zones = self._zones_for(cluster, data.get("locations"))
        data = self._validate_pool(cluster, data, zones)
        pool_path = f"{self._cluster_path(cluster.project, cluster.location, cluster.name)}/nodePools/{data['name']}"
        number = self._number(cluster.project)
        data["locations"] = zones
        data["selfLink"] = f"{API_BASE}/projects/{number}/locations/{cluster.location}/clusters/" \
                           f"{cluster.name}/nodePools/{data['name']}"
        data.setdefault("version", cluster.data.get("currentNodeVersion") or cluster.data.get("currentMasterVersion"))
        data.setdefault("management", {"autoUpgrade": True, "autoRepair": True})
        data.setdefault("maxPodsConstraint", {"maxPodsPerNode": "110"})
        data.setdefault("podIpv4CidrSize", 24)
        data.setdefault("upgradeSettings", {"maxSurge": 1, "strategy": "SURGE"})
        data["status"] = "PROVISIONING"
        data["etag"] = secrets.token_hex(8)
        pool = _Pool(data)
        h = format(zlib.crc32(pool_path.encode()), "08x")
        pool.base = f"gke-{cluster.name[:14].rstrip('-')}-{data['name'][:14].rstrip('-')}-{h}"
        data["instanceGroupUrls"] = [
            f"https://www.googleapis.com/compute/v1/projects/{cluster.project}/zones/{z}/instanceGroupManagers/"
            f"{pool.base}-grp" for z in zones]
        return pool

    # ---- API: node pools -------------------------------------------------------------------------
    def create_node_pool(self, project: str, location: str, cluster_name: str, body: dict[str, Any]) -> dict[str, Any]:
        req = normalize(container_v1.CreateNodePoolRequest, body)
        data = req.get("nodePool")
        if not data:
            raise _bad("Required field \"node_pool\" is missing.")
        with self._lock:
            cluster = self._get_cluster(project, location, cluster_name)
            if cluster.autopilot:
                raise _bad("Creating node pools is not supported on Autopilot clusters: GKE manages their nodes.")
            if data.get("name") in cluster.pools:
                raise _err(409, "ALREADY_EXISTS",
                           f"Already exists: {self._cluster_path(cluster.project, cluster.location, cluster.name)}"
                           f"/nodePools/{data['name']}.")
            self._check_busy(cluster)
            pool = self._new_pool(cluster, data)
            initial = int(pool.data.get("initialNodeCount", 0) or 0)
            self._check_pool_quota(cluster, [pool])
            cluster.pools[pool.name] = pool
            op = self._new_op(cluster.project, cluster.location, "CREATE_NODE_POOL",
                              f"clusters/{cluster.name}/nodePools/{pool.name}", cluster)
            pool.busy = op.data["name"]
            cluster.data["etag"] = secrets.token_hex(8)
            self._touch()

        def work(op: _Op) -> None:
            self._sleep(op, "node_pool_create")
            errors = self._resize(cluster, pool, initial)
            with self._lock:
                self._pool_status_after(pool, errors)
            if errors:
                raise _OpFailed("RESOURCE_EXHAUSTED", errors[0])

        def finish() -> None:
            if pool.busy == op.data["name"]:
                pool.busy = None
            if op.cancel.is_set() and pool.data["status"] == "PROVISIONING":
                pool.data["status"] = "ERROR"
                pool.data["statusMessage"] = "Node pool creation was cancelled."

        self._launch(op, work, finish)
        return self._op_reply(op)

    def list_node_pools(self, project: str, location: str, cluster_name: str) -> dict[str, Any]:
        with self._lock:
            cluster = self._get_cluster(project, location, cluster_name)
            pools = [self._render_pool(cluster, p) for p in cluster.pools.values()]
        return {"nodePools": pools} if pools else {}

    def get_node_pool(self, project: str, location: str, cluster_name: str, name: str) -> dict[str, Any]:
        with self._lock:
            cluster = self._get_cluster(project, location, cluster_name)
            return self._render_pool(cluster, self._get_pool(cluster, name))

    def delete_node_pool(self, project: str, location: str, cluster_name: str, name: str) -> dict[str, Any]:
        with self._lock:
            cluster = self._get_cluster(project, location, cluster_name)
            pool = self._get_pool(cluster, name)
            self._check_busy(cluster, pool)
            pool.data["status"] = "STOPPING"
            op = self._new_op(cluster.project, cluster.location, "DELETE_NODE_POOL",
                              f"clusters/{cluster.name}/nodePools/{name}", cluster)
            pool.busy = op.data["name"]
            self._touch()

        def work(op: _Op) -> None:
            self._sleep(op, "node_pool_delete")
            for zone in list(pool.nodes):
                self._remove_nodes(cluster, pool, zone)
                self.compute.delete_mig(zone, self._mig_name(pool, zone), project=cluster.project)
            with self._lock:
                if cluster.pools.get(name) is pool:
                    del cluster.pools[name]
                cluster.data["etag"] = secrets.token_hex(8)

        self._launch(op, work, lambda: self._release_pool(pool, op))
        return self._op_reply(op)

    def set_node_pool_size(self, project: str, location: str, cluster_name: str, name: str,
                           body: dict[str, Any]) -> dict[str, Any]:
        req = normalize(container_v1.SetNodePoolSizeRequest, body)
        size = int(req.get("nodeCount", 0) or 0)
        if size < 0:
            raise _bad("node_count must be non-negative.")
        with self._lock:
            cluster = self._get_cluster(project, location, cluster_name)
            pool = self._get_pool(cluster, name)
            self._check_busy(cluster, pool)
            op = self._new_op(cluster.project, cluster.location, "SET_NODE_POOL_SIZE",
                              f"clusters/{cluster.name}/nodePools/{name}", cluster)
            pool.busy = op.data["name"]
            pool.data["status"] = "RECONCILING"
            self._touch()
        return self._launch_resize(cluster, pool, op, size)

    @staticmethod
    def _release_pool(pool: _Pool, op: _Op, *, settle: bool = False) -> None:
        """An operation's end: the pool takes new operations again (and a resize settles to RUNNING)."""
        if pool.busy == op.data["name"]:
            pool.busy = None
        if settle and pool.data.get("status") == "RECONCILING":
            pool.data["status"] = "RUNNING"

    def _launch_resize(self, cluster: _Cluster, pool: _Pool, op: _Op, size: int) -> dict[str, Any]:
        def work(op: _Op) -> None:
            grow = any(size > len(pool.nodes.get(z, [])) for z in pool.data["locations"])
            if grow:  # new VMs boot, by machine family and GPU driver install
                self._sleep(op, "node_boot", fast_start.node_boot_s(self, pool.data))
            else:
                self._sleep(op, "node_pool_resize")
            errors = self._resize(cluster, pool, size)
            with self._lock:
                self._pool_status_after(pool, errors)
            if errors:
                raise _OpFailed("RESOURCE_EXHAUSTED", errors[0])

        self._launch(op, work, lambda: self._release_pool(pool, op, settle=True))
        return self._op_reply(op)

    def _set_autoscaling(self, cluster: _Cluster, pool: _Pool, autoscaling: dict[str, Any]) -> dict[str, Any]:
        # caller holds the lock
        if autoscaling.get("enabled"):
            lo, hi = int(autoscaling.get("minNodeCount", 0) or 0), int(autoscaling.get("maxNodeCount", 0) or 0)
            if lo < 0 or hi < 1 or lo > hi:
                raise _bad(f"Invalid autoscaling limits: min {lo}, max {hi} (need 0 <= min <= max, max >= 1).")
        self._check_busy(cluster, pool)
        pool.data["autoscaling"] = autoscaling
        op = self._new_op(cluster.project, cluster.location, "UPDATE_CLUSTER",
                          f"clusters/{cluster.name}/nodePools/{pool.name}", cluster)
        pool.busy = op.data["name"]
        self._touch()
        # The autoscaler keeps each zone within [min, max]
        sizes = [len(pool.nodes.get(z, [])) for z in pool.data["locations"]]
        target = None
        if autoscaling.get("enabled"):
            lo, hi = int(autoscaling.get("minNodeCount", 0) or 0), int(autoscaling.get("maxNodeCount", 0) or 0)
            if any(s < lo for s in sizes) or any(s > hi for s in sizes):
                target = min(max(max(sizes, default=0), lo), hi)
        if target is None:
            def work(op: _Op) -> None:
                self._sleep(op, "quick_update")

            self._launch(op, work, lambda: self._release_pool(pool, op))
            return self._op_reply(op)
        return self._launch_resize(cluster, pool, op, target)

    def set_node_pool_autoscaling(self, project: str, location: str, cluster_name: str, name: str,
                                  body: dict[str, Any]) -> dict[str, Any]:
        req = normalize(container_v1.SetNodePoolAutoscalingRequest, body)
        with self._lock:
            cluster = self._get_cluster(project, location, cluster_name)
            pool = self._get_pool(cluster, name)
            return self._set_autoscaling(cluster, pool, req.get("autoscaling") or {})

    def update_node_pool(self, project: str, location: str, cluster_name: str, name: str,
                         body: dict[str, Any]) -> dict[str, Any]:
        req = normalize(container_v1.UpdateNodePoolRequest, body)
        with self._lock:
            cluster = self._get_cluster(project, location, cluster_name)
            pool = self._get_pool(cluster, name)
            self._check_busy(cluster, pool)
            version = req.get("nodeVersion")
            if version:
                version = self._resolve_version(version, None)
            new = json.loads(json.dumps(pool.data))
            config = new.setdefault("config", {})
            for key in ("imageType", "machineType", "diskType", "diskSizeGb", "gcfsConfig",
                        "workloadMetadataConfig", "kubeletConfig", "linuxNodeConfig", "gvnic", "fastSocket",
                        "loggingConfig", "resourceLabels", "containerdConfig"):
                if key in req:
                    config[key] = req[key]
            if "labels" in req:
                config["labels"] = req["labels"].get("labels", {})
            if "taints" in req:
                config["taints"] = req["taints"].get("taints", [])
            if "tags" in req:
                config["tags"] = req["tags"].get("tags", [])
            if "accelerators" in req:
                config["accelerators"] = req["accelerators"]
            if req.get("locations"):
                new["locations"] = self._zones_for(cluster, req["locations"])
            recreate = any(k in req for k in ("machineType", "accelerators", "labels", "taints", "imageType"))
            self._validate_pool(cluster, new, new["locations"])
            if recreate:
                self._check_quota_delta(cluster, pool, new)
            op = self._new_op(cluster.project, cluster.location, "UPGRADE_NODES",
                              f"clusters/{cluster.name}/nodePools/{name}", cluster)
            pool.busy = op.data["name"]
            pool.data["status"] = "RECONCILING"
            self._touch()

        def work(op: _Op) -> None:
            self._sleep(op, "node_pool_update")
            per_zone = max((len(v) for v in pool.nodes.values()), default=0)
            old_zones = list(pool.data["locations"])
            if recreate:  # surge upgrade: old nodes go, new ones with the new config come
                for zone in list(pool.nodes):
                    self._remove_nodes(cluster, pool, zone)
            with self._lock:
                pool.data.update({k: v for k, v in new.items() if k not in ("status", "statusMessage")})
                if version:
                    pool.data["version"] = version
                pool.data["instanceGroupUrls"] = [
                    f"https://www.googleapis.com/compute/v1/projects/{cluster.project}/zones/{z}/"
                    f"instanceGroupManagers/{pool.base}-grp" for z in pool.data["locations"]]
            for zone in old_zones:
                if zone not in pool.data["locations"]:
                    self._remove_nodes(cluster, pool, zone)
                    self.compute.delete_mig(zone, self._mig_name(pool, zone), project=cluster.project)
                    with self._lock:
                        pool.nodes.pop(zone, None)
            errors = self._resize(cluster, pool, per_zone)
            with self._lock:
                self._pool_status_after(pool, errors)
                pool.data["etag"] = secrets.token_hex(8)
            if errors:
                raise _OpFailed("RESOURCE_EXHAUSTED", errors[0])

        self._launch(op, work, lambda: self._release_pool(pool, op, settle=True))
        return self._op_reply(op)

    def set_node_pool_management(self, project: str, location: str, cluster_name: str, name: str,
                                 body: dict[str, Any]) -> dict[str, Any]:
        req = normalize(container_v1.SetNodePoolManagementRequest, body)
        with self._lock:
            cluster = self._get_cluster(project, location, cluster_name)
            pool = self._get_pool(cluster, name)
            self._check_busy(cluster, pool)
            pool.data["management"] = req.get("management", {})
            op = self._new_op(cluster.project, cluster.location, "SET_NODE_POOL_MANAGEMENT",
                              f"clusters/{cluster.name}/nodePools/{name}", cluster)

        def work(op: _Op) -> None:
            self._sleep(op, "quick_update")

        self._launch(op, work, None)
        return self._op_reply(op)
