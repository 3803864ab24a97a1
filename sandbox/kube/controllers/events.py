"""core/v1 Events that every component records about the objects it acts on.

Mirrors client-go ``tools/record``: the ``EventRecorder`` each component holds (``source.component``
= ``deployment-controller``, ``default-scheduler``, ``kubelet`` …) and its ``EventCorrelator``, which
folds a repeat of the same reason and message into ``count`` / ``lastTimestamp`` of one Event.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import TYPE_CHECKING

from sandbox.core import HttpError, now_rfc3339
from sandbox.kube.controllers.base import ControllerBase
from sandbox.kube.controllers.common import EVENTS, NS, Obj
from sandbox.kube.store import new_uid

if TYPE_CHECKING:
    from sandbox.kube.cluster import KubeCluster

MAX_EVENTS = 3000


class EventRecorder(ControllerBase):
    """``event(obj, type, reason, message, component=, host=)``; the newest ``MAX_EVENTS`` are kept."""

    def __init__(self, cluster: KubeCluster) -> None:
        super().__init__(cluster)
        self._events: dict[tuple[str, str, str], str] = {}  # (uid, reason, message) -> event name
        self._event_order: list[tuple[str, str]] = []
        self._elock = threading.Lock()
        self._event_seq = 0

    # ---- events -----------------------------------------------------------------------------
    def event(self, obj: Obj, etype: str, reason: str, message: str, component: str = "kubelet",
              host: str = "") -> None:
        """Record a core/v1 Event about ``obj``, aggregating repeats (count, lastTimestamp)."""
        meta = obj["metadata"]
        ns = meta.get("namespace") or "default"
        nso = self.store.get(NS, "", ns)
        if nso is None or nso["metadata"].get("deletionTimestamp"):
            return
        now = now_rfc3339()
        key = (meta.get("uid", ""), reason, message)
        with self._elock:
            existing = self._events.get(key)
        if existing:
            def bump(e: Obj) -> Obj:
                e["count"] = int(e.get("count", 1)) + 1
                e["lastTimestamp"] = now
                return e

            if self.store.mutate(EVENTS, ns, existing, bump) is not None:
                return
        with self._elock:  # names sort by time, like the real ones (kubectl lists them in name order)
            self._event_seq = max(self._event_seq + 1, time.time_ns())
            name = f"{meta['name']}.{self._event_seq:x}"
        ev = {"apiVersion": "v1", "kind": "Event",
              "metadata": {"name": name, "namespace": ns, "uid": new_uid(),
                           "creationTimestamp": now},
              "involvedObject": {"kind": obj.get("kind"), "namespace": meta.get("namespace"), "name": meta["name"],
                                 "uid": meta.get("uid"), "apiVersion": obj.get("apiVersion"),
                                 "resourceVersion": meta.get("resourceVersion")},
              "reason": reason, "message": message, "source": {"component": component, **({"host": host} if host
                                                                                            else {})},
              "firstTimestamp": now, "lastTimestamp": now, "count": 1, "type": etype, "eventTime": None,
              "reportingComponent": component, "reportingInstance": host}
        if obj.get("kind") == "Pod" and component == "kubelet" and reason in ("Pulling", "Pulled", "Created",
                                                                               "Started", "BackOff", "Failed"):
            ev["involvedObject"]["fieldPath"] = f"spec.containers{{{self._main_container(obj)}}}"
        try:
            self.store.create(EVENTS, ev)
        except HttpError:
            return
        with self._elock:
            self._events[key] = name
            self._event_order.append((ns, name))
            victims = []
            while len(self._event_order) > MAX_EVENTS:
                victims.append(self._event_order.pop(0))
            if victims:
                gone = set(victims)
                self._events = {k: v for k, v in self._events.items() if (ns, v) not in gone}
        for vns, vname in victims:
            with contextlib.suppress(HttpError):
                self.store.delete(EVENTS, vns, vname)

    @staticmethod
    def _main_container(pod: Obj) -> str:
        cs = (pod.get("spec") or {}).get("containers") or [{}]
        return cs[0].get("name", "")
