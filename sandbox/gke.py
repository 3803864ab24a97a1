"""GKE emulator: the container v1 REST API as ``google.cloud.container_v1`` (``transport="rest"``) and
``gcloud container`` send it.

Clusters and node pools are long-running operations with realistic (time-scaled) durations. Nodes
are real ``Node`` objects in the cluster's Kubernetes API (``kube.add_node`` / ``kube.remove_node``),
and every node holds Compute quota (the GPU metric — ``PREEMPTIBLE_*`` for spot/preemptible — plus
``CPUS``, and the project-wide ``GPUS_ALL_REGIONS`` / ``CPUS_ALL_REGIONS``) for as long as it exists.

Semantics mirrored from GKE:

* create replies at once with an ``Operation`` (PENDING → RUNNING → DONE); ``GET .../operations/OP``
  polls it and the sandbox-only ``POST .../operations/OP:wait`` blocks until it is done (bounded).
* duplicate create → 409 ALREADY_EXISTS, missing → 404 NOT_FOUND, bad input → 400 INVALID_ARGUMENT,
  a mutation while another operation holds the cluster/pool → 400 FAILED_PRECONDITION.
* quota is checked when a cluster or node pool is created: a shortfall is a synchronous 403 with GKE's
  "Insufficient regional quota to satisfy request: resource "NVIDIA_L4_GPUS" ..." text. A resize that
  runs out of quota, and any create/resize in a stocked-out zone, finishes the operation DONE with an
  ``error`` ("... [ZONE_RESOURCE_POOL_EXHAUSTED] ..." / "... [QUOTA_EXCEEDED] ..."); the nodes that
  could start exist, the pool is ERROR (or RUNNING_WITH_ERROR when some zones worked).
* an accelerator a zone does not offer, or a machine type that cannot carry it → 400.
* node counts (``initialNodeCount``, ``setSize``, autoscaling bounds) are per zone, as in GKE.
* Autopilot clusters have no node pools; the kube emulator provisions their nodes itself.

Each cluster has its own Kubernetes API server, as on GKE: with ``kube_factory`` (what the composed
sandbox passes) ``kube_factory(project, location, name)`` builds and starts one when the cluster is
created (before the create call returns, so ``endpoint`` is set from the first reply on), node pools
add and remove their nodes there, Autopilot provisioning and the cluster autoscaler act on it alone, and
deleting the cluster releases it (``kube_release(project, location, name, kube)``, default
``kube.stop()``) before the delete operation is DONE: its API server refuses connections and its model
servers are gone. Without a factory every cluster shares the one ``kube`` given (unit tests).

The cluster ``endpoint`` is that Kubernetes API as ``127.0.0.1:PORT``, served over HTTPS with a
certificate signed by the cluster's own CA, which ``masterAuth.clusterCaCertificate`` returns (base64
PEM), as on GKE; it wants a bearer token (``sandbox.kube.auth``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import secrets
import threading
import time
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from google.cloud import container_v1

from sandbox.compute import (
    ACCELERATOR_TYPES,
    REGIONS,
    Compute,
    QuotaExceeded,
    accelerator_metric,
    region_of,
    zones_of,
)
from sandbox.core import (
    DEFAULT_DELAYS,
    Clock,
    Faults,
    HttpError,
    JsonHandler,
    SandboxHTTPServer,
    route,
    serve,
)
from sandbox.kube import addons

API_BASE = "https://container.googleapis.com/v1"

# ---- versions (serverConfig) ---------------------------------------------------------------
VERSIONS = [
    "1.33.2-gke.1240000", "1.33.1-gke.1584000", "1.32.6-gke.1013000", "1.32.4-gke.1415000",
    "1.31.10-gke.1040000", "1.31.9-gke.1044000", "1.30.14-gke.1009000",
]
CHANNELS: dict[str, tuple[str, list[str]]] = {
    "RAPID": ("1.33.2-gke.1240000", ["1.33.2-gke.1240000", "1.33.1-gke.1584000", "1.32.6-gke.1013000"]),
    "REGULAR": ("1.32.6-gke.1013000", ["1.33.1-gke.1584000", "1.32.6-gke.1013000", "1.32.4-gke.1415000",
                                       "1.31.10-gke.1040000"]),
    "STABLE": ("1.31.10-gke.1040000", ["1.32.4-gke.1415000", "1.31.10-gke.1040000", "1.31.9-gke.1044000",
                                       "1.30.14-gke.1009000"]),
}
DEFAULT_CHANNEL = "REGULAR"
IMAGE_TYPES = ["COS_CONTAINERD", "UBUNTU_CONTAINERD", "WINDOWS_LTSC_CONTAINERD"]

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
}

NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")
POOL_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")

FAKE_CA = base64.b64encode(
    b"-----BEGIN CERTIFICATE-----\nMIIC/zCCAeegAwIBAgIRAK sandbox not a real certificate\n"
    b"-----END CERTIFICATE-----\n").decode()

_RPC = {"CANCELLED": 1, "INVALID_ARGUMENT": 3, "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7,
        "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9, "ABORTED": 10, "INTERNAL": 13, "UNAVAILABLE": 14}
_STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 409: "ALREADY_EXISTS", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL",
                 501: "UNIMPLEMENTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def _err(status: int, code: str, message: str) -> HttpError:
    return HttpError(status, message, reason=code)


def _bad(message: str) -> HttpError:
    return _err(400, "INVALID_ARGUMENT", message)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def to_dict(cls: Any, msg: Any) -> dict[str, Any]:
    return json.loads(cls.to_json(msg, use_integers_for_enums=False, always_print_fields_with_no_presence=False,
                                  indent=None))


def normalize(cls: Any, value: Any) -> dict[str, Any]:
    """Any JSON the clients send (enums as ints or names) -> canonical proto JSON (enum names)."""
    try:
        msg = cls.from_json(json.dumps(value), ignore_unknown_fields=True)
    except Exception as exc:  # json_format.ParseError and friends
        raise _bad(f"Invalid JSON payload received. {exc}") from exc
    return to_dict(cls, msg)


# ---- machine types ---------------------------------------------------------------------------
_GPU_FAMILIES = {"g2": ("nvidia-l4", "nvidia-l4-vws"), "a2-highgpu": ("nvidia-tesla-a100",),
                 "a2-megagpu": ("nvidia-tesla-a100",), "a2-ultragpu": ("nvidia-a100-80gb",),
                 "a3-highgpu": ("nvidia-h100-80gb",)}
_G2_GPUS = {4: 1, 8: 1, 12: 1, 16: 1, 32: 1, 24: 2, 48: 4, 96: 8}


def machine_shape(machine_type: str) -> tuple[int, float, tuple[tuple[str, ...], int] | None]:
    """``(vCPUs, memory GiB, (allowed accelerators, implied count) | None)``; ValueError if unknown."""
    fixed = {"e2-micro": (2, 1.0), "e2-small": (2, 2.0), "e2-medium": (2, 4.0), "f1-micro": (1, 0.6),
             "g1-small": (1, 1.7)}
    if machine_type in fixed:
        return (*fixed[machine_type], None)
    m = re.fullmatch(r"(a2|a3)-(highgpu|megagpu|ultragpu)-(\d+)g", machine_type)
    if m:
        family = f"{m.group(1)}-{m.group(2)}"
        gpus = int(m.group(3))
        if family not in _GPU_FAMILIES or gpus not in (1, 2, 4, 8, 16):
            raise ValueError(machine_type)
        per_gpu = {"a2-highgpu": (12, 85.0), "a2-megagpu": (6, 85.0), "a2-ultragpu": (12, 170.0),
                   "a3-highgpu": (26, 234.0)}[family]
        return per_gpu[0] * gpus, per_gpu[1] * gpus, (_GPU_FAMILIES[family], gpus)
    m = re.fullmatch(r"([a-z][a-z0-9]*)-(standard|highmem|highcpu)-(\d+)", machine_type)
    if not m:
        raise ValueError(machine_type)
    family, kind, n = m.group(1), m.group(2), int(m.group(3))
    if family == "g2":
        if kind != "standard" or n not in _G2_GPUS:
            raise ValueError(machine_type)
        return n, 4.0 * n, (_GPU_FAMILIES["g2"], _G2_GPUS[n])
    if family not in ("n1", "n2", "n2d", "e2", "c2", "c2d", "c3", "c3d", "n4", "t2d"):
        raise ValueError(machine_type)
    per_cpu = {"standard": 3.75 if family == "n1" else 4.0, "highmem": 6.5 if family == "n1" else 8.0,
               "highcpu": 0.9 if family == "n1" else 1.0}[kind]
    return n, per_cpu * n, None


def _accepts(machine_type: str, accelerator: str, count: int) -> str | None:
    """An error message if ``machine_type`` cannot carry ``count`` × ``accelerator``."""
    _, _, implied = machine_shape(machine_type)
    if implied is not None:
        allowed, n = implied
        if accelerator not in allowed:
            return (f"Accelerator type \"{accelerator}\" is not supported with machine type {machine_type} "
                    f"(it comes with {n} x {allowed[0]}).")
        if count != n:
            return (f"Machine type {machine_type} comes with {n} x {allowed[0]}; accelerator count {count} "
                    f"is not compatible.")
        return None
    if machine_type.startswith("n1-") and accelerator.startswith(("nvidia-tesla-t4", "nvidia-tesla-p100")):
        if count not in (1, 2, 4):
            return f"Accelerator count {count} of type {accelerator} is not supported; use 1, 2 or 4."
        return None
    return f"Machine type {machine_type} does not support accelerators of type {accelerator}."


# ---- state -----------------------------------------------------------------------------------
class _Op:
    def __init__(self, data: dict[str, Any], key: tuple[str, str, str]) -> None:
        self.data = data
        self.key = key  # (project, location, cluster)
        self.cancel = threading.Event()
        self.done = threading.Event()


class _Pool:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.nodes: dict[str, list[str]] = {}  # zone -> node names
        self.busy: str | None = None  # name of the operation holding this pool
        self.base = ""  # base instance name

    @property
    def name(self) -> str:
        return self.data["name"]

    def node_count(self) -> int:
        return sum(len(v) for v in self.nodes.values())


class _Cluster:
    def __init__(self, project: str, location: str, data: dict[str, Any]) -> None:
        self.project = project
        self.location = location
        self.data = data
        self.pools: dict[str, _Pool] = {}
        self.busy: str | None = None  # cluster-level operation in flight
        self.deleting = False
        self.kube: Any = None  # this cluster's Kubernetes API (KubeCluster), or the shared one
        self.owns_kube = False  # built by Gke.kube_factory: released when the cluster is deleted
        self.unsubscribe: Callable[[], Any] | None = None  # the autoscaler's kube subscription

    @property
    def key(self) -> tuple[str, str, str]:
        return self.project, self.location, self.name

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def autopilot(self) -> bool:
        return bool(self.data.get("autopilot", {}).get("enabled"))

    @property
    def region(self) -> str:
        return self.location if self.location in REGIONS else region_of(self.location)


class _OpFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Gke:
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
        # (id(kube), Autopilot node) -> what it holds: {"kube", "project", "location", "region", "cluster",
        # "quota"} (the record keeps the kube alive, so its id cannot be reused meanwhile)
        self._autopilot_nodes: dict[tuple[int, str], dict[str, Any]] = {}

    # ---- lifecycle -----------------------------------------------------------------------
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

    # ---- helpers ---------------------------------------------------------------------------
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

    def _get_pool(self, cluster: _Cluster, name: str) -> _Pool:
        pool = cluster.pools.get(name)
        if pool is None:
            raise _err(404, "NOT_FOUND",
                       f"Not found: {self._cluster_path(cluster.project, cluster.location, cluster.name)}"
                       f"/nodePools/{name}.")
        return pool

    def _sleep(self, op: _Op, key: str) -> None:
        """Sleep a named cloud delay; abort the operation if it was cancelled or the sandbox stops."""
        delay = self.clock.scaled(self.delays.get(key, 0.0))
        deadline = time.monotonic() + delay
        while True:
            left = deadline - time.monotonic()
            if op.cancel.is_set():
                raise _OpFailed("CANCELLED", "Operation was cancelled.")
            if self._stop.is_set():
                raise _OpFailed("ABORTED", "The sandbox is shutting down.")
            if left <= 0:
                return
            op.cancel.wait(min(left, 0.05))

    def _touch(self) -> None:
        self._changed.notify_all()

    # ---- rendering -------------------------------------------------------------------------
    def _render_pool(self, cluster: _Cluster, pool: _Pool) -> dict[str, Any]:
        data = dict(pool.data)
        return data

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

    # ---- operations ------------------------------------------------------------------------
    def _new_op(self, project: str, location: str, op_type: str, target: str, cluster: _Cluster) -> _Op:
        name = f"operation-{int(time.time() * 1000)}-{secrets.token_hex(4)}"
        number = self._number(project)
        data = {
            "name": name, "zone": location, "location": location, "operationType": op_type,
            "status": "PENDING", "selfLink": f"{API_BASE}/projects/{number}/locations/{location}/operations/{name}",
            "targetLink": f"{API_BASE}/projects/{number}/locations/{location}/{target}", "startTime": _now(),
        }
        op = _Op(data, (project, location, cluster.name))
        self._ops[name] = op
        return op

    def _launch(self, op: _Op, work: Callable[[_Op], None], on_finish: Callable[[], None] | None = None) -> None:
        def run() -> None:
            error: _OpFailed | None = None
            try:
                self._sleep(op, "operation_pending")
                with self._lock:
                    op.data["status"] = "RUNNING"
                    self._touch()
                work(op)
            except _OpFailed as exc:
                error = exc
            except Exception as exc:  # pragma: no cover - a bug in the emulator
                error = _OpFailed("INTERNAL", f"sandbox GKE internal error: {exc!r}")
            with self._lock:
                if on_finish is not None:
                    on_finish()
                if error is not None and error.code == "ABORTED" and self._stop.is_set():
                    return  # the sandbox is stopping: leave the operation as it was
                op.data["status"] = "DONE"
                op.data["endTime"] = _now()
                if error is not None:
                    op.data["error"] = {"code": _RPC.get(error.code, 2), "message": error.message}
                    op.data["statusMessage"] = error.message
                    field = "nodepoolConditions" if "/nodePools/" in op.data["targetLink"] else "clusterConditions"
                    op.data[field] = [{"code": "GCE_STOCKOUT" if "POOL_EXHAUSTED" in error.message else
                                       "UNKNOWN", "message": error.message, "canonicalCode": error.code}]
                op.done.set()
                self._touch()

        threading.Thread(target=run, name=f"gke-{op.data['name']}", daemon=True).start()

    def _op_reply(self, op: _Op) -> dict[str, Any]:
        return dict(op.data)

    def wait_operation(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        """Block until operation ``name`` is DONE (or ``timeout`` real seconds pass); returns it."""
        deadline = time.monotonic() + (self.wait_timeout if timeout is None else timeout)
        with self._changed:
            op = self._ops.get(name)
            if op is None:
                raise KeyError(name)
            while op.data["status"] != "DONE" and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(min(left, 0.5))
            return dict(op.data)

    def _check_busy(self, cluster: _Cluster, pool: _Pool | None = None, *, cluster_level: bool = False) -> None:
        holder = cluster.busy
        if holder is None and pool is not None:
            holder = pool.busy
        if holder is None and cluster_level:
            holder = next((p.busy for p in cluster.pools.values() if p.busy), None)
        if cluster.deleting:
            raise _err(400, "FAILED_PRECONDITION",
                       f"Cluster {cluster.name} is being deleted and cannot be modified.")
        if holder is not None:
            op = self._ops[holder]
            what = op.data["operationType"].lower().replace("_", " ")
            raise _err(400, "FAILED_PRECONDITION",
                       f"Operation {holder} ({what}) is currently running on cluster {cluster.name}. "
                       f"Please wait and try again once it is done.")

    # ---- kube ------------------------------------------------------------------------------
    @staticmethod
    def _kube_endpoint(kube: Any) -> str:
        url = getattr(kube, "url", None) if kube is not None else None
        if not url:
            return "127.0.0.1"
        return url.split("://", 1)[-1].rstrip("/")

    def _open_kube(self, project: str, location: str, name: str) -> tuple[Any, bool]:
        """``(kube, owned)``: a fresh started API server from the factory, else the shared one."""
        if self.kube_factory is None:
            return self.kube, False
        try:
            return self.kube_factory(project, location, name), True
        except Exception as exc:
            raise _err(500, "INTERNAL", f"sandbox: could not start the cluster's Kubernetes API: {exc!r}") from exc

    def _release_kube(self, project: str, location: str, name: str, kube: Any) -> None:
        try:
            if self.kube_release is not None:
                self.kube_release(project, location, name, kube)
            elif hasattr(kube, "stop"):
                kube.stop()
        except Exception:  # pragma: no cover - a broken release must not fail the operation
            import traceback

            traceback.print_exc()

    def _attach_kube(self, cluster: _Cluster, kube: Any, owned: bool) -> None:
        """Caller holds the lock. Per-cluster kubes feed this cluster's autoscaler/Autopilot hooks."""
        cluster.kube, cluster.owns_kube = kube, owned
        subscribe = getattr(kube, "subscribe", None)
        if owned and callable(subscribe):
            with contextlib.suppress(Exception):
                cluster.unsubscribe = subscribe(lambda t, o: self.autoscaler.on_kube_event(kube, t, o))

    def _close_kube(self, cluster: _Cluster) -> None:
        """Drop the cluster's hooks and, if it owns its API server, release (stop) it."""
        with self._lock:
            kube, owned, unsubscribe = cluster.kube, cluster.owns_kube, cluster.unsubscribe
            cluster.unsubscribe = None
            if owned:
                cluster.kube, cluster.owns_kube = None, False
        if callable(unsubscribe):
            with contextlib.suppress(Exception):
                unsubscribe()
        if owned and kube is not None:
            self._release_kube(cluster.project, cluster.location, cluster.name, kube)

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

    @staticmethod
    def _kube_add(cluster: _Cluster, name: str, labels: dict[str, str], capacity: dict[str, str],
                  taints: list[dict[str, str]]) -> None:
        if cluster.kube is not None:
            cluster.kube.add_node(name, labels=labels, capacity=capacity, taints=taints)

    @staticmethod
    def _kube_remove(kube: Any, name: str) -> None:
        if kube is not None:
            kube.remove_node(name)

    # ---- Autopilot nodes (provisioned by the kube emulator, paid for here) ------------------
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
            matches = [c for c in self._clusters.values() if c.kube is kube and c.autopilot and
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

    # ---- nodes -----------------------------------------------------------------------------
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
        labels.update(config.get("labels", {}))
        return labels, capacity, taints

    def _add_nodes(self, cluster: _Cluster, pool: _Pool, zone: str, n: int) -> str | None:
        """Start ``n`` nodes in ``zone``; returns an error message for the ones that could not start."""
        acc, _, _, _ = self._pool_shape(pool.data)
        started: list[str] = []
        error = None
        for _ in range(n):
            name = f"{pool.base}-{secrets.token_hex(2)}"
            if self.compute.stocked_out(zone, acc):
                error = (f"[ZONE_RESOURCE_POOL_EXHAUSTED]: Instance '{name}' creation failed: "
                         f"{self.compute.stockout_message(cluster.project, zone)}")
                break
            try:
                self.compute.reserve_many(cluster.region, self._node_quota(pool.data), project=cluster.project)
            except QuotaExceeded as exc:
                error = f"[QUOTA_EXCEEDED]: Instance '{name}' creation failed: {exc.compute_message}"
                break
            labels, capacity, taints = self._node_spec(cluster, pool, zone, name)
            self._kube_add(cluster, name, labels, capacity, taints)
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

    # ---- validation --------------------------------------------------------------------------
    def _resolve_version(self, requested: str | None, channel: str | None) -> str:
        valid = CHANNELS[channel][1] if channel in CHANNELS else VERSIONS
        default = CHANNELS[channel or DEFAULT_CHANNEL][0] if (channel or DEFAULT_CHANNEL) in CHANNELS else \
            CHANNELS[DEFAULT_CHANNEL][0]
        if not requested or requested == "-":
            return default
        if requested == "latest":
            return max(valid, key=_version_key)
        matches = [v for v in valid if v == requested or v.startswith(requested + ".") or
                   v.startswith(requested + "-")]
        if not matches:
            where = f" in channel {channel}" if channel in CHANNELS else ""
            raise _bad(f"Master version \"{requested}\" is unsupported{where}.")
        return max(matches, key=_version_key)

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

    # ---- API: clusters -------------------------------------------------------------------------
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
                self._remove_autopilot_nodes(cluster)
            # its API server goes with it (model servers stopped, ports closed) before the op is DONE
            self._close_kube(cluster)
            with self._lock:
                self._clusters.pop((cluster.project, cluster.location, name), None)

        self._launch(op, work, None)
        return self._op_reply(op)

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
                if "desiredGcfsConfig" in update:
                    d.setdefault("nodePoolDefaults", {}).setdefault("nodeConfigDefaults", {})["gcfsConfig"] = \
                        update["desiredGcfsConfig"]
                if "desiredImageType" in update:
                    for p in [pool] if pool else list(cluster.pools.values()):
                        p.data.setdefault("config", {})["imageType"] = update["desiredImageType"]
                d["etag"] = secrets.token_hex(8)
            if "desiredAddonsConfig" in update:
                addons.sync(cluster.kube, cluster.data)

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

    # ---- API: node pools -----------------------------------------------------------------------
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
            self._sleep(op, "node_boot" if grow else "node_pool_resize")
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

    # ---- API: operations -------------------------------------------------------------------------
    def get_operation(self, project: str, location: str, name: str) -> dict[str, Any]:
        with self._lock:
            op = self._ops.get(name)
            if op is None or op.key[0] != project or (location != "-" and op.key[1] != location):
                raise _err(404, "NOT_FOUND", f"Not found: projects/{project}/locations/{location}/operations/{name}.")
            return dict(op.data)

    def list_operations(self, project: str, location: str) -> dict[str, Any]:
        with self._lock:
            ops = [dict(o.data) for o in self._ops.values()
                   if o.key[0] == project and (location == "-" or o.key[1] == location)]
        return {"operations": ops} if ops else {}

    def cancel_operation(self, project: str, location: str, name: str) -> dict[str, Any]:
        with self._lock:
            self.get_operation(project, location, name)
            op = self._ops[name]
            if op.data["status"] == "DONE":
                raise _err(400, "FAILED_PRECONDITION", f"Operation {name} is already done.")
            op.data["status"] = "ABORTING"
            op.cancel.set()
            self._touch()
        return {}

    def server_config(self, project: str, location: str) -> dict[str, Any]:
        msg = container_v1.ServerConfig(
            default_cluster_version=CHANNELS[DEFAULT_CHANNEL][0],
            valid_node_versions=VERSIONS, valid_master_versions=VERSIONS,
            default_image_type="COS_CONTAINERD", valid_image_types=IMAGE_TYPES,
            channels=[container_v1.ServerConfig.ReleaseChannelConfig(
                channel=container_v1.ReleaseChannel.Channel[ch], default_version=default,
                valid_versions=valid, upgrade_target_version=valid[0]) for ch, (default, valid) in CHANNELS.items()],
        )
        return to_dict(container_v1.ServerConfig, msg)


# ---- cluster autoscaler ----------------------------------------------------------------------

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
                from sandbox.kube.controller import PODS

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
        except Exception:
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


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


# ---- REST handler ----------------------------------------------------------------------------

_ROUTES: list = []
_L = r"/v1/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"
_Z = r"/v1/projects/(?P<project>[^/]+)/zones/(?P<location>[^/]+)"  # legacy zonal paths (gcloud, old clients)
_C = r"/clusters/(?P<cluster>[^/:]+)"
_NP = r"/nodePools/(?P<pool>[^/:]+)"
_OP = r"/operations/(?P<op>[^/:]+)"


class GkeHandler(JsonHandler):
    service = "gke"
    routes = _ROUTES
    server: SandboxHTTPServer

    @property
    def gke(self) -> Gke:
        return self.server.state

    def error_body(self, err: HttpError) -> Any:
        if err.body is not None:
            return err.body
        status = err.reason if err.reason and err.reason.isupper() else _STATUS_NAMES.get(err.status, "UNKNOWN")
        return {"error": {"code": err.status, "message": err.message, "status": status}}


def _both(method: str, suffix: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        route(_ROUTES, method, _L + suffix)(fn)
        route(_ROUTES, method, _Z + suffix)(fn)
        return fn

    return deco


@_both("GET", "/clusters")
def _list_clusters(h: GkeHandler, project: str, location: str):
    return h.gke.list_clusters(project, location)


@_both("POST", "/clusters")
def _create_cluster(h: GkeHandler, project: str, location: str):
    return h.gke.create_cluster(project, location, h.json_body())


@_both("GET", _C)
def _get_cluster(h: GkeHandler, project: str, location: str, cluster: str):
    return h.gke.get_cluster(project, location, cluster)


@_both("DELETE", _C)
def _delete_cluster(h: GkeHandler, project: str, location: str, cluster: str):
    return h.gke.delete_cluster(project, location, cluster)


@_both("PUT", _C)
def _update_cluster(h: GkeHandler, project: str, location: str, cluster: str):
    return h.gke.update_cluster(project, location, cluster, h.json_body())


@route(_ROUTES, "POST", _L + _C + r":setResourceLabels")
def _set_labels(h: GkeHandler, project: str, location: str, cluster: str):
    req = normalize(container_v1.SetLabelsRequest, h.json_body())

    def apply(c: _Cluster) -> None:
        c.data["resourceLabels"] = req.get("resourceLabels", {})
        c.data["labelFingerprint"] = secrets.token_hex(4)

    return h.gke.quick_cluster_op(project, location, cluster, "SET_LABELS", apply)


@route(_ROUTES, "POST", _L + _C + r":setMaintenancePolicy")
def _set_maintenance(h: GkeHandler, project: str, location: str, cluster: str):
    req = normalize(container_v1.SetMaintenancePolicyRequest, h.json_body())

    def apply(c: _Cluster) -> None:
        c.data["maintenancePolicy"] = req.get("maintenancePolicy", {})

    return h.gke.quick_cluster_op(project, location, cluster, "SET_MAINTENANCE_POLICY", apply)


@_both("GET", _C + r"/nodePools")
def _list_pools(h: GkeHandler, project: str, location: str, cluster: str):
    return h.gke.list_node_pools(project, location, cluster)


@_both("POST", _C + r"/nodePools")
def _create_pool(h: GkeHandler, project: str, location: str, cluster: str):
    return h.gke.create_node_pool(project, location, cluster, h.json_body())


@_both("GET", _C + _NP)
def _get_pool(h: GkeHandler, project: str, location: str, cluster: str, pool: str):
    return h.gke.get_node_pool(project, location, cluster, pool)


@_both("DELETE", _C + _NP)
def _delete_pool(h: GkeHandler, project: str, location: str, cluster: str, pool: str):
    return h.gke.delete_node_pool(project, location, cluster, pool)


@route(_ROUTES, "PUT", _L + _C + _NP)
def _update_pool(h: GkeHandler, project: str, location: str, cluster: str, pool: str):
    return h.gke.update_node_pool(project, location, cluster, pool, h.json_body())


@route(_ROUTES, "POST", _Z + _C + _NP + r"/update")
def _update_pool_zonal(h: GkeHandler, project: str, location: str, cluster: str, pool: str):
    return h.gke.update_node_pool(project, location, cluster, pool, h.json_body())


@route(_ROUTES, "POST", _L + _C + _NP + r":setSize")
@route(_ROUTES, "POST", _Z + _C + _NP + r"/setSize")
def _set_size(h: GkeHandler, project: str, location: str, cluster: str, pool: str):
    return h.gke.set_node_pool_size(project, location, cluster, pool, h.json_body())


@route(_ROUTES, "POST", _L + _C + _NP + r":setAutoscaling")
@route(_ROUTES, "POST", _Z + _C + _NP + r"/autoscaling")
def _set_autoscaling(h: GkeHandler, project: str, location: str, cluster: str, pool: str):
    return h.gke.set_node_pool_autoscaling(project, location, cluster, pool, h.json_body())


@route(_ROUTES, "POST", _L + _C + _NP + r":setManagement")
@route(_ROUTES, "POST", _Z + _C + _NP + r"/setManagement")
def _set_management(h: GkeHandler, project: str, location: str, cluster: str, pool: str):
    return h.gke.set_node_pool_management(project, location, cluster, pool, h.json_body())


@_both("GET", r"/operations")
def _list_ops(h: GkeHandler, project: str, location: str):
    return h.gke.list_operations(project, location)


@_both("GET", _OP)
def _get_op(h: GkeHandler, project: str, location: str, op: str):
    return h.gke.get_operation(project, location, op)


@route(_ROUTES, "POST", _L + _OP + r":wait")
def _wait_op(h: GkeHandler, project: str, location: str, op: str):
    """Sandbox extension (like Compute's ``operations.wait``): block until DONE, at most ``timeout`` s."""
    body = h.json_body() if h.body_bytes() else {}
    raw = h.q("timeout") or (body.get("timeout") if isinstance(body, dict) else None)
    timeout = None
    if raw is not None:
        try:
            timeout = float(str(raw).rstrip("s"))
        except ValueError:
            raise _bad(f"Invalid timeout {raw!r}.") from None
    h.gke.get_operation(project, location, op)  # 404 check
    return h.gke.wait_operation(op, timeout)


@route(_ROUTES, "POST", _L + _OP + r":cancel")
@route(_ROUTES, "POST", _Z + _OP + r":cancel")
def _cancel_op(h: GkeHandler, project: str, location: str, op: str):
    h.body_bytes()
    return h.gke.cancel_operation(project, location, op)


@route(_ROUTES, "GET", _L + r"/serverConfig")
@route(_ROUTES, "GET", _Z + r"/serverconfig")
def _server_config(h: GkeHandler, project: str, location: str):
    if location not in REGIONS and location not in {z for r in REGIONS for z in zones_of(r)}:
        raise _bad(f"Location \"{location}\" is not a valid region or zone.")
    return h.gke.server_config(project, location)


@route(_ROUTES, "GET", r"/v1/projects/(?P<project>[^/]+)/services/(?P<service>[^/:]+)")
def _service_usage(h: GkeHandler, project: str, service: str):
    """Service Usage ``services.get`` (``gcloud container clusters create`` checks the API is enabled):
    served here so ``CLOUDSDK_API_ENDPOINT_OVERRIDES_SERVICEUSAGE`` can point at the GKE emulator."""
    number = h.gke._number(project)
    return {"name": f"projects/{number}/services/{service}", "parent": f"projects/{number}",
            "config": {"name": service, "title": service.split(".")[0].title() + " API"}, "state": "ENABLED"}
