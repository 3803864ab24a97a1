"""Each cluster's own Kubernetes API server, as on GKE: with ``kube_factory`` one is built and started
when the cluster is created (before the create call returns: ``endpoint`` is its ``127.0.0.1:PORT``,
``masterAuth.clusterCaCertificate`` the CA that signed its certificate), subscribed so the cluster
autoscaler and Autopilot billing see its pods and nodes, and released when the cluster is deleted
(``kube_release(project, location, name, kube)``, default ``kube.stop()``) before the delete
operation is DONE. Without a factory every cluster shares the one ``kube`` (unit tests). Node pools'
``Node`` objects are added and removed there.
"""

from __future__ import annotations

import contextlib
from typing import Any

from sandbox.gke.common import _err
from sandbox.gke.fast_nodes import FastNodes
from sandbox.gke.state import _Cluster


class ClusterKubeMixin:
    """Per-cluster Kubernetes APIs of :class:`~sandbox.gke.service.Gke`."""

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
        if owned:  # its API server and nodes report this cluster's version and project, as on GKE
            with contextlib.suppress(AttributeError):
                kube.set_version(cluster.data["currentMasterVersion"])
                kube.project = cluster.project
            # the nodes GKE makes for its Autopilot-mode pods: their boot time (fast-starting nodes)
            kube.gke_nodes = FastNodes(self, cluster)
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

    @staticmethod
    def _kube_add(cluster: _Cluster, name: str, labels: dict[str, str], capacity: dict[str, str],
                  taints: list[dict[str, str]], version: str | None = None) -> None:
        if cluster.kube is not None:
            cluster.kube.add_node(name, labels=labels, capacity=capacity, taints=taints, version=version)

    @staticmethod
    def _kube_remove(kube: Any, name: str) -> None:
        if kube is not None:
            kube.remove_node(name)
