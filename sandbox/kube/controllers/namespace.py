"""The namespace controller: a deleted namespace stays Terminating while its contents go, then it goes.

Mirrors kube-controller-manager ``pkg/controller/namespace`` (``deletion/namespaced_resources_deleter.go``:
delete every namespaced resource, retry while some remain, then drop the namespace) and the
serviceaccounts controller (``pkg/controller/serviceaccount``) that gives every live namespace its
``default`` ServiceAccount.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

from sandbox.core import HttpError
from sandbox.kube import resources as res
from sandbox.kube.controllers.base import ControllerBase
from sandbox.kube.controllers.common import DEPLOYS, NS, PODS, RSS, SAS

if TYPE_CHECKING:
    from sandbox.kube.cluster import KubeCluster

NAMESPACE_FINALIZE = 5.0  # cloud seconds a deleted namespace stays Terminating (at least 0.1 s real)


class NamespaceController(ControllerBase):
    """``sync_namespace(name)``; pods go through the kubelet's ``delete_pod`` so their servers stop."""

    def __init__(self, cluster: KubeCluster) -> None:
        super().__init__(cluster)
        self._ns_terminating: dict[str, float] = {}

    # ---- namespaces -------------------------------------------------------------------------
    def sync_namespace(self, name: str) -> None:
        ns = self.store.get(NS, "", name)
        if ns is None:
            return
        if not ns["metadata"].get("deletionTimestamp"):
            if self.store.get(SAS, name, "default") is None:
                with contextlib.suppress(HttpError):
                    self.cluster.api.create(SAS, name, {"metadata": {"name": "default"}})
            return
        since = self._ns_terminating.setdefault(name, time.monotonic())
        wait = max(self.clock.scaled(NAMESPACE_FINALIZE), 0.1) - (time.monotonic() - since)
        if wait > 0:  # the namespace controller is not instant: Terminating is visible for a moment
            self.after_real(wait, ("ns", name))
            return
        api = self.cluster.api
        order = [DEPLOYS, RSS] + [t for t in res.TYPES if t.namespaced and t not in (DEPLOYS, RSS, PODS)] + [PODS]
        for t in order:
            items, _ = self.store.list(t, name)
            for o in items:
                with contextlib.suppress(HttpError):
                    if t is PODS:
                        self.delete_pod(name, o["metadata"]["name"], grace=0)
                    else:
                        api.delete(t, name, o["metadata"]["name"], grace=0)
        leftover = any(self.store.list(t, name)[0] for t in res.TYPES if t.namespaced)
        if leftover:
            self.after(1.0, ("ns", name))
            return
        with contextlib.suppress(HttpError):
            self.store.delete(NS, "", name)
        self._ns_terminating.pop(name, None)
