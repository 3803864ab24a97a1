"""The sandbox's own accounting: when each node and each pod existed, by the emulator's clock.

Independent of everything the product reads (no API, no timestamps with whole seconds): a store hook
stamps ``time.time()`` the moment a Node or Pod is created or deleted, like a cloud's billing meter.
Generic: it knows nodes, pods, their labels and ``nvidia.com/gpu`` counts — nothing of the product.
"""

from __future__ import annotations

import threading
import time
from typing import Any

GPU = "nvidia.com/gpu"


class Accounting:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._closed: list[dict[str, Any]] = []

    def attach(self, cluster: str, kube: Any) -> None:
        """Meter the nodes and pods of ``kube`` (a KubeCluster), under the name ``cluster``."""
        kube.store.add_hook(lambda ev: self._on_event(cluster, ev))

    def _on_event(self, cluster: str, ev: Any) -> None:
        kind = ev.rkey[1] if isinstance(ev.rkey, tuple) else ""
        if kind not in ("nodes", "pods") or ev.type not in ("ADDED", "DELETED"):
            return
        meta = ev.obj.get("metadata") or {}
        key = (cluster, kind, f"{meta.get('namespace', '')}/{meta.get('name')}")
        now = time.time()
        with self._lock:
            if ev.type == "ADDED":
                self._open[key] = {"cluster": cluster, "kind": kind[:-1], "name": meta.get("name"),
                                   "namespace": meta.get("namespace", ""), "labels": dict(meta.get("labels") or {}),
                                   "gpus": _gpus(kind, ev.obj), "start": now, "end": None}
            else:
                rec = self._open.pop(key, None)
                if rec is not None:
                    rec["end"] = now
                    self._closed.append(rec)

    def records(self, *, cluster: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            rows = [dict(r) for r in [*self._closed, *self._open.values()]]
        return [r for r in rows if (cluster is None or r["cluster"] == cluster) and (kind is None or r["kind"] == kind)]

    def gpu_seconds(self, *, start: float, end: float, cluster: str | None = None,
                    labels: dict[str, str] | None = None, kind: str = "node") -> float:
        """GPU-seconds of the matching nodes (or pods) inside [start, end)."""
        total = 0.0
        for r in self.records(cluster=cluster, kind=kind):
            if any(r["labels"].get(k) != v for k, v in (labels or {}).items()):
                continue
            lo, hi = max(start, r["start"]), min(end, r["end"] if r["end"] is not None else end)
            total += r["gpus"] * max(0.0, hi - lo)
        return total


def _gpus(kind: str, obj: dict[str, Any]) -> int:
    if kind == "nodes":
        return int(((obj.get("status") or {}).get("capacity") or {}).get(GPU, 0) or 0)
    total = 0
    for c in (obj.get("spec") or {}).get("containers") or []:
        total += int(((c.get("resources") or {}).get("limits") or {}).get(GPU, 0) or 0)
    return total
