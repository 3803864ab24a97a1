"""``projects.locations.clusters``: create (Standard with its default pool from ``initialNodeCount`` /
``nodeConfig`` or explicit ``nodePools``, or Autopilot -- regional only, no pools; release channel and
version; quota checked up front; its own Kubernetes API started before the reply), get and list
(location ``-`` = every location), delete (pre-empts the cluster's running operations, then removes
its nodes, instance groups, Autopilot nodes and API server before the operation is DONE), update
(``desired*``: master/node versions, release channel, addons -- e.g. the Filestore CSI driver's
StorageClasses --, logging/monitoring, a pool's autoscaling, ...) and the small setters (labels,
maintenance policy) as short operations. Duplicate create -> 409 ALREADY_EXISTS, missing -> 404
NOT_FOUND, bad input -> 400 INVALID_ARGUMENT.
"""

from __future__ import annotations

import base64
import contextlib
import re
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from google.cloud import container_v1

from sandbox.compute import REGIONS, region_of, zones_of
from sandbox.gke.common import API_BASE, _bad, _err, _now, normalize
from sandbox.gke.state import _Cluster, _Op, _OpFailed
from sandbox.gke.versions import CHANNELS, DEFAULT_CHANNEL, _version_key
from sandbox.kube import addons

NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")


FAKE_CA = base64.b64encode(
    b"-----BEGIN CERTIFICATE-----\nMIIC/zCCAeegAwIBAgIRAK sandbox not a real certificate\n"
    b"-----END CERTIFICATE-----\n").decode()


class ClustersMixin:
    """The clusters API of :class:`~sandbox.gke.service.Gke`."""

    # ---- helpers ---------------------------------------------------------------------------------
    def _number(self, project: str) -> str:
        return self.compute.project_number if project == self.compute.project else project

    def _cluster_path(self, project: str, location: str, name: str) -> str:
        return f"projects/{project}/locations/{location}/clusters/{name}"

    def _get_cluster(self, project: str, location: str, name: str) -> _Cluster:
        cluster = self._clusters.get((project, location, name))
        if cluster is None and location == "-":
            matches = [c for (p, _, n), c in self._clusters.items() if p == project and n == name]
            cluster = matches[0] if len(matches) == 1 else None
        if cluster is None:
            raise _err(404, "NOT_FOUND", f"Not found: {self._cluster_path(project, location, name)}.")
        return cluster

    # ---- rendering -------------------------------------------------------------------------------
    def _render_cluster(self, cluster: _Cluster) -> dict[str, Any]:
        data = dict(cluster.data)
        if cluster.pools:
            data["nodePools"] = [self._render_pool(cluster, p) for p in cluster.pools.values()]
        else:
            data.pop("nodePools", None)
        count = sum(p.node_count() for p in cluster.pools.values())
        if count:
            data["currentNodeCount"] = count
        else:
            data.pop("currentNodeCount", None)
        urls = [u for p in cluster.pools.values() for u in p.data.get("instanceGroupUrls", [])]
        if urls:
            data["instanceGroupUrls"] = urls
        else:
            data.pop("instanceGroupUrls", None)
        return data

    # ---- API: clusters ---------------------------------------------------------------------------
    def create_cluster(self, project: str, location: str, body: dict[str, Any]) -> dict[str, Any]:
        req = normalize(container_v1.CreateClusterRequest, body)
        data = req.get("cluster")
        if not data:
            raise _bad("Required field \"cluster\" is missing.")
        name = data.get("name", "")
        if not NAME_RE.match(name):
            raise _bad(f"Invalid value for field \"cluster.name\": \"{name}\". Cluster names must start with a "
                       f"letter, contain only lowercase letters, numbers and hyphens, and be at most 40 "
                       f"characters.")
        if location not in REGIONS and not self.compute.is_zone(location):
            raise _bad(f"Location \"{location}\" is not a valid region or zone.")
        autopilot = bool(data.get("autopilot", {}).get("enabled"))
        if autopilot and location not in REGIONS:
            raise _bad("Autopilot clusters must be regional clusters.")
        region = location if location in REGIONS else region_of(location)
        zones = data.get("locations") or ([location] if location not in REGIONS else zones_of(region)[:3])
        for z in zones:
            if z not in zones_of(region):
                raise _bad(f"Location \"{z}\" is not a zone of {region}.")
        initial = int(data.pop("initialNodeCount", 0) or 0)
        pools_in = data.pop("nodePools", []) or []
        node_config = data.pop("nodeConfig", None)
        if autopilot:
            # gcloud create-auto sends a template "default-pool"; Autopilot provisions nodes itself
            initial, pools_in = 0, []
        if not autopilot:
            if initial and pools_in:
                raise _bad("Cannot specify both cluster.initial_node_count and cluster.node_pools.")
            if not initial and not pools_in:
                raise _bad("Cluster.initial_node_count must be greater than zero.")
            if initial:
                pools_in = [{"name": "default-pool", "initialNodeCount": initial,
                             "config": node_config or {}}]
        channel = data.get("releaseChannel", {}).get("channel") or DEFAULT_CHANNEL
        if channel not in CHANNELS and channel != "UNSPECIFIED":
            raise _bad(f"Release channel {channel} is not supported.")
        if channel != "UNSPECIFIED":
            data["releaseChannel"] = {"channel": channel}
        version = self._resolve_version(data.get("initialClusterVersion"),
                                        channel if channel in CHANNELS else None)
        number = self._number(project)
        with self._lock:
            if (project, location, name) in self._clusters:
                raise _err(409, "ALREADY_EXISTS", f"Already exists: {self._cluster_path(project, location, name)}.")
            data.update({
                "location": location, "zone": location, "locations": zones,
                "selfLink": f"{API_BASE}/projects/{number}/locations/{location}/clusters/{name}",
                "id": secrets.token_hex(16), "endpoint": "",
                "initialClusterVersion": data.get("initialClusterVersion") or version,
                "currentMasterVersion": version, "currentNodeVersion": version,
                "createTime": _now(), "status": "PROVISIONING",
                "network": data.get("network", "default"), "subnetwork": data.get("subnetwork", "default"),
                "clusterIpv4Cidr": data.get("clusterIpv4Cidr", "10.96.0.0/14"),
                "servicesIpv4Cidr": "34.118.224.0/20",
                "masterAuth": {"clusterCaCertificate": FAKE_CA},
                "loggingService": data.get("loggingService", "logging.googleapis.com/kubernetes"),
                "monitoringService": data.get("monitoringService", "monitoring.googleapis.com/kubernetes"),
                "labelFingerprint": "a9dc16a7", "etag": secrets.token_hex(8),
            })
            if autopilot:
                data.setdefault("verticalPodAutoscaling", {"enabled": True})
                data.setdefault("shieldedNodes", {"enabled": True})
                data.setdefault("autoscaling", {"enableNodeAutoprovisioning": True,
                                                "autoscalingProfile": "OPTIMIZE_UTILIZATION"})
            cluster = _Cluster(project, location, data)
            pools = []
            for p in pools_in:
                pdata = normalize(container_v1.NodePool, p)
                pdata.setdefault("version", version)
                pool = self._new_pool(cluster, pdata)
                if pool.name in {q.name for q in pools}:
                    raise _bad(f"Duplicate node pool name {pool.name}.")
                pools.append(pool)
            self._check_pool_quota(cluster, pools)
        # the cluster's own API server, started outside the lock (a few ms) before the reply names it
        kube, owned = self._open_kube(project, location, name)
        with self._lock:
            clash = (project, location, name) in self._clusters
            if clash or self._stop.is_set():
                if owned:  # lost a race with an identical create: its API server is not needed
                    threading.Thread(target=self._release_kube, args=(project, location, name, kube),
                                     daemon=True).start()
                if not clash:
                    raise _err(503, "UNAVAILABLE", "The sandbox is shutting down.")
                raise _err(409, "ALREADY_EXISTS", f"Already exists: {self._cluster_path(project, location, name)}.")
            self._attach_kube(cluster, kube, owned)
            data["endpoint"] = self._kube_endpoint(kube)
            # the CA that signed that API server's certificate, as GKE returns it
            data["masterAuth"] = {"clusterCaCertificate": getattr(getattr(kube, "tls", None), "ca_b64", FAKE_CA)}
            for pool in pools:
                cluster.pools[pool.name] = pool
            self._clusters[(project, location, name)] = cluster
            op = self._new_op(project, location, "CREATE_CLUSTER", f"clusters/{name}", cluster)
            cluster.busy = op.data["name"]
            for pool in pools:
                pool.busy = op.data["name"]
            self._touch()

        def work(op: _Op) -> None:
            if autopilot:
                self._kube_autopilot(cluster, True)
            self._sleep(op, "cluster_create")
            addons.sync(cluster.kube, cluster.data)  # e.g. Filestore CSI -> the *-rwx StorageClasses
            errors = []
            for pool in list(cluster.pools.values()):
                errs = self._resize(cluster, pool, int(pool.data.get("initialNodeCount", 0) or 0))
                with self._lock:
                    self._pool_status_after(pool, errs)
                errors.extend(errs)
            with self._lock:
                if errors and not any(p.node_count() for p in cluster.pools.values()):
                    cluster.data["status"] = "ERROR"
                    cluster.data["statusMessage"] = errors[0]
                else:
                    cluster.data["status"] = "RUNNING"
            if errors:
                raise _OpFailed("RESOURCE_EXHAUSTED", errors[0])

        def finish() -> None:
            if cluster.busy == op.data["name"]:
                cluster.busy = None
            for pool in cluster.pools.values():
                if pool.busy == op.data["name"]:
                    pool.busy = None
            if op.cancel.is_set() and cluster.data["status"] == "PROVISIONING":
                cluster.data["status"] = "ERROR"
                cluster.data["statusMessage"] = "Cluster creation was cancelled."

        self._launch(op, work, finish)
        return self._op_reply(op)

    def list_clusters(self, project: str, location: str) -> dict[str, Any]:
        with self._lock:
            clusters = [self._render_cluster(c) for (p, loc, _), c in sorted(self._clusters.items())
                        if p == project and (location == "-" or loc == location)]
        return {"clusters": clusters} if clusters else {}

    def get_cluster(self, project: str, location: str, name: str) -> dict[str, Any]:
        with self._lock:
            return self._render_cluster(self._get_cluster(project, location, name))

    def delete_cluster(self, project: str, location: str, name: str) -> dict[str, Any]:
        with self._lock:
            cluster = self._get_cluster(project, location, name)
            if cluster.deleting:
                holder = cluster.busy
                raise _err(400, "FAILED_PRECONDITION",
                           f"Operation {holder} is currently deleting cluster {name}. Please wait and try "
                           f"again once it is done.")
            # a delete pre-empts whatever else runs on the cluster
            for o in self._ops.values():
                if o.key == (cluster.project, cluster.location, name) and o.data["status"] != "DONE":
                    o.cancel.set()
            cluster.deleting = True
            cluster.data["status"] = "STOPPING"
            for pool in cluster.pools.values():
                pool.data["status"] = "STOPPING"
            op = self._new_op(cluster.project, cluster.location, "DELETE_CLUSTER", f"clusters/{name}", cluster)
            cluster.busy = op.data["name"]
            self._touch()

        def work(op: _Op) -> None:
            # wait for the pre-empted operations to settle, then tear down
            for o in list(self._ops.values()):
                if o is not op and o.key == op.key:
                    o.done.wait(5)
            self._sleep(op, "cluster_delete")
            for pool in list(cluster.pools.values()):
                for zone in list(pool.nodes):
                    self._remove_nodes(cluster, pool, zone)
                    self.compute.delete_mig(zone, self._mig_name(pool, zone), project=cluster.project)
            if cluster.autopilot:
                self._kube_autopilot(cluster, False)
            self._remove_autopilot_nodes(cluster)  # Autopilot-mode nodes of a Standard cluster too
            # its API server goes with it (model servers stopped, ports closed) before the op is DONE
            self._close_kube(cluster)
            with self._lock:
                self._clusters.pop((cluster.project, cluster.location, name), None)

        self._launch(op, work, None)
        return self._op_reply(op)

    def cluster_keys(self) -> set[tuple[str, str, str]]:
        """(project, location, name) of every cluster that exists now."""
        with self._lock:
            return set(self._clusters)

    def delete_clusters(self, *, keep: set[tuple[str, str, str]], timeout_s: float = 60.0) -> list[str]:
        """Delete every cluster but ``keep`` as ``clusters.delete`` does (nodes, MIGs, its API server and
        everything running on it), and wait until they are gone; the names deleted. The test suite ends
        each module's clusters with it: a cluster left running keeps its kubelet probes, scrapes and health
        checks going for the rest of the session (measured: 0.86 of a core idle after two modules)."""
        with self._lock:
            doomed = [k for k, c in self._clusters.items() if k not in keep and not c.deleting]
        for project, location, name in doomed:
            with contextlib.suppress(Exception):
                self.delete_cluster(project, location, name)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not any(k in self._clusters for k in doomed):
                    break
            time.sleep(0.02)
        return [name for _, _, name in doomed]

    def update_cluster(self, project: str, location: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        req = normalize(container_v1.UpdateClusterRequest, body)
        update = req.get("update") or {}
        if not update:
            raise _bad("Required field \"update\" is missing or empty.")
        with self._lock:
            cluster = self._get_cluster(project, location, name)
            pool_id = update.get("desiredNodePoolId")
            pool = self._get_pool(cluster, pool_id) if pool_id else None
            if "desiredNodePoolAutoscaling" in update:
                if pool is None:
                    raise _bad("desired_node_pool_id is required with desired_node_pool_autoscaling.")
                return self._set_autoscaling(cluster, pool, update["desiredNodePoolAutoscaling"])
            channel = (update.get("desiredReleaseChannel") or {}).get("channel") or \
                cluster.data.get("releaseChannel", {}).get("channel")
            master = update.get("desiredMasterVersion")
            if master:
                master = self._resolve_version(master, None)
            node_version = update.get("desiredNodeVersion")
            if node_version:
                node_version = self._resolve_version(node_version, None)
            self._check_busy(cluster, pool, cluster_level=pool is None)
            op_type = "UPGRADE_MASTER" if master else ("UPGRADE_NODES" if node_version else "UPDATE_CLUSTER")
            target = f"clusters/{name}" + (f"/nodePools/{pool.name}" if pool and node_version else "")
            op = self._new_op(cluster.project, cluster.location, op_type, target, cluster)
            if pool is not None:
                pool.busy = op.data["name"]
            else:
                cluster.busy = op.data["name"]
            cluster.data["status"] = "RECONCILING"
            self._touch()

        def work(op: _Op) -> None:
            self._sleep(op, "master_upgrade" if master else ("node_pool_update" if node_version else "cluster_update"))
            with self._lock:
                d = cluster.data
                if master:
                    d["currentMasterVersion"] = master
                if node_version:
                    for p in [pool] if pool else list(cluster.pools.values()):
                        p.data["version"] = node_version
                    d["currentNodeVersion"] = min((p.data.get("version", node_version)
                                                   for p in cluster.pools.values()), key=_version_key,
                                                  default=node_version)
                if channel and channel in CHANNELS:
                    d["releaseChannel"] = {"channel": channel}
                simple = {"desiredLoggingConfig": "loggingConfig", "desiredMonitoringConfig": "monitoringConfig",
                          "desiredLoggingService": "loggingService", "desiredMonitoringService": "monitoringService",
                          "desiredWorkloadIdentityConfig": "workloadIdentityConfig",
                          "desiredAddonsConfig": "addonsConfig", "desiredVerticalPodAutoscaling":
                              "verticalPodAutoscaling", "desiredShieldedNodes": "shieldedNodes",
                          "desiredClusterAutoscaling": "autoscaling", "desiredLocations": "locations",
                          "desiredCostManagementConfig": "costManagementConfig",
                          "desiredNotificationConfig": "notificationConfig"}
                for src, dst in simple.items():
                    if src in update:
                        d[dst] = update[src]
                if "desiredGatewayApiConfig" in update:  # gcloud ... update --gateway-api=standard
                    d.setdefault("networkConfig", {})["gatewayApiConfig"] = update["desiredGatewayApiConfig"]
                if "desiredGcfsConfig" in update:
                    d.setdefault("nodePoolDefaults", {}).setdefault("nodeConfigDefaults", {})["gcfsConfig"] = \
                        update["desiredGcfsConfig"]
                if "desiredImageType" in update:
                    for p in [pool] if pool else list(cluster.pools.values()):
                        p.data.setdefault("config", {})["imageType"] = update["desiredImageType"]
                d["etag"] = secrets.token_hex(8)
            if "desiredAddonsConfig" in update or "desiredGatewayApiConfig" in update:
                addons.sync(cluster.kube, cluster.data)
            if cluster.owns_kube and cluster.kube is not None:  # upgraded API server / kubelets report it
                if master:
                    cluster.kube.set_version(master)
                if node_version:
                    for p in [pool] if pool else list(cluster.pools.values()):
                        cluster.kube.set_node_version([n for ns in p.nodes.values() for n in ns], node_version)

        def finish() -> None:
            if pool is not None and pool.busy == op.data["name"]:
                pool.busy = None
            if cluster.busy == op.data["name"]:
                cluster.busy = None
            if not cluster.deleting:
                cluster.data["status"] = "RUNNING"

        self._launch(op, work, finish)
        return self._op_reply(op)

    def quick_cluster_op(self, project: str, location: str, name: str, op_type: str,
                         apply: Callable[[_Cluster], None]) -> dict[str, Any]:
        """Small mutations (labels, maintenance policy, ...): applied at once, short operation."""
        with self._lock:
            cluster = self._get_cluster(project, location, name)
            self._check_busy(cluster, cluster_level=True)
            apply(cluster)
            cluster.data["etag"] = secrets.token_hex(8)
            op = self._new_op(cluster.project, cluster.location, op_type, f"clusters/{name}", cluster)

        def work(op: _Op) -> None:
            self._sleep(op, "quick_update")

        self._launch(op, work, None)
        return self._op_reply(op)
