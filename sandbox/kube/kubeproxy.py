"""kube-proxy's view of each Service: the Endpoints as they were ``lag_s`` cloud seconds ago.

On a real node nothing routes from the Endpoints object directly: kube-proxy (or GKE Dataplane V2's
anetd) watches EndpointSlices and reprograms iptables/eBPF after the change — at least its
``minSyncPeriod`` (1 s) later, and under load much longer (Kubernetes' network-programming-latency SLO
allows 30 s at the 99th percentile). Until then a Service still sends new connections to the pods it
listed before: a pod removed too early after a selector switch drops requests, the reason for Argo
Rollouts' 30 s ``scaleDownDelaySeconds``. (The API server's own service proxy reads Endpoints directly and
has no such lag; ``KubeCluster.service_backends`` stays that view.)

:class:`KubeProxy` records every Endpoints change of its cluster with the time it happened, and
``backends(ns, name)`` answers with the ready addresses of the newest version at least ``lag_s`` cloud
seconds old (nothing before the Service's first programming), mapped to the pods' current loopback ports.
``lag_s = 0`` is the Endpoints of now. Set it per cluster (``kube.kube_proxy.lag_s``), per sandbox
(``Sandbox(endpoint_lag_s=...)``) or at run time (``SandboxClient.set_endpoint_lag(seconds)``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from sandbox.core import DEFAULT_DELAYS

if TYPE_CHECKING:
    from sandbox.kube.cluster import KubeCluster

Obj = dict[str, Any]
HISTORY = 64  # Endpoints versions kept per Service (far more than any lag needs)


class KubeProxy:
    def __init__(self, cluster: KubeCluster, lag_s: float | None = None) -> None:
        self.cluster = cluster
        self.lag_s = DEFAULT_DELAYS["endpoint_propagation"] if lag_s is None else float(lag_s)
        self._history: dict[tuple[str, str], deque[tuple[float, tuple[str, ...]]]] = {}
        self._lock = threading.Lock()
        cluster.subscribe(self._on_event)

    def _on_event(self, etype: str, obj: Obj) -> None:
        if obj.get("kind") != "Endpoints":
            return
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", "default"), meta.get("name", ""))
        uids: tuple[str, ...] = ()
        if etype != "DELETED":
            uids = tuple(sorted(
                (a.get("targetRef") or {}).get("uid", "") for s in obj.get("subsets") or []
                for a in s.get("addresses") or [] if (a.get("targetRef") or {}).get("uid")))
        with self._lock:
            hist = self._history.setdefault(key, deque(maxlen=HISTORY))
            if not hist or hist[-1][1] != uids:
                hist.append((time.monotonic(), uids))

    def pods(self, namespace: str, name: str) -> tuple[str, ...]:
        """Uids of the pods the Service's programmed rules send to now."""
        cut = time.monotonic() - self.cluster.clock.scaled(self.lag_s)
        with self._lock:
            hist = self._history.get((namespace, name))
            if not hist:
                return ()
            chosen: tuple[str, ...] = ()
            for at, uids in hist:
                if at > cut:
                    break
                chosen = uids
            return chosen

    def backends(self, namespace: str, name: str) -> list[int]:
        """Loopback ports of those pods' servers, a deleted pod's until its server exits (one that has exited,
        or crashed, has no port left to send to: skipped — kept lenient, see docs/sandbox-contract.md)."""
        if self.lag_s <= 0:
            return self.cluster.service_backends(namespace, name)
        ctl = self.cluster.controller
        ports = []
        with ctl.runs_lock:
            runs = [ctl.runs.get(uid) for uid in self.pods(namespace, name)]
        for run in runs:
            # a deleted pod's server until it exits (preStop, then draining after SIGTERM: it refuses new
            # connections then, and the client's is reset)
            server = None if run is None else (run.draining if run.stopped else run.server)
            if server is None:
                continue
            port = getattr(server, "port", None)
            if port:
                ports.append(int(port))
        return ports
