"""The GKE emulator's in-memory resources: an operation (``_Op``: its ``Operation`` JSON, the cluster
it runs on, cancel/done events), a node pool (``_Pool``: its ``NodePool`` JSON, node names per zone,
the operation holding it, its instance base name), a cluster (``_Cluster``: its ``Cluster`` JSON,
pools, the operation holding it, its own Kubernetes API) and ``_OpFailed``, how an operation's work
ends DONE with an ``error``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from sandbox.compute import REGIONS, region_of


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
