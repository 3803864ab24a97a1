"""The controller manager's plumbing: one work queue, delayed work on the sandbox clock, event routing.

Mirrors client-go ``util/workqueue`` (a de-duplicating queue: a key waiting to be processed is
queued once; ``AddAfter`` for delayed work) fed by informer event handlers, as every
kube-controller-manager controller is. Here one worker thread drains one queue for all controllers
(no polling); cloud delays (image pull, crash back-off, Autopilot node provisioning, progress
deadlines) are timers on the sandbox ``Clock`` (one timer thread and a heap) that enqueue keys.
A key is a tuple: its first item names the sync it runs (``_sync``).
"""

from __future__ import annotations

import heapq
import itertools
import queue
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from sandbox.core import HttpError
from sandbox.kube.controllers.common import HPAS, SVCS, owner_name
from sandbox.kube.store import Event

if TYPE_CHECKING:
    from sandbox.kube.cluster import KubeCluster


class ControllerBase:
    """Work queue, timers and event routing; each component mixin adds its syncs and its own state."""

    def __init__(self, cluster: KubeCluster) -> None:
        self.cluster = cluster
        self.store = cluster.store
        self.clock = cluster.clock
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        self._pending: set[tuple[Any, ...]] = set()
        self._plock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._timers: list[tuple[float, int, tuple[Any, ...]]] = []
        self._tcond = threading.Condition()
        self._tseq = itertools.count()
        self._timer_thread: threading.Thread | None = None
        # work done off the controller thread (stopping model servers, finishing terminated pods)
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kube-stop")
        self.idle = threading.Event()

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="kube-controller", daemon=True)
        self._thread.start()
        self._timer_thread = threading.Thread(target=self._timer_loop, name="kube-timers", daemon=True)
        self._timer_thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)
        with self._tcond:
            self._timers.clear()
            self._tcond.notify_all()
        if self._timer_thread is not None:
            self._timer_thread.join(timeout=2)
        self._stop_pods()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kube-stop")

    def _stop_pods(self) -> None:
        """Hook for ``stop()``: the kubelet stops its model servers and drains ``_executor`` here."""
        self._executor.shutdown(wait=True, cancel_futures=False)

    def after(self, cloud_seconds: float, key: tuple[Any, ...]) -> None:
        """Enqueue ``key`` after a scaled cloud delay."""
        self.after_real(self.clock.scaled(cloud_seconds), key)

    def after_real(self, seconds: float, key: tuple[Any, ...]) -> None:
        """Enqueue ``key`` after ``seconds`` (one timer thread and a heap, not a thread per timer)."""
        if self._stop.is_set():
            return
        with self._tcond:
            heapq.heappush(self._timers, (time.monotonic() + max(0.0, seconds), next(self._tseq), key))
            self._tcond.notify()

    def _timer_loop(self) -> None:
        while True:
            with self._tcond:
                while not self._stop.is_set():
                    now = time.monotonic()
                    if self._timers and self._timers[0][0] <= now:
                        break
                    self._tcond.wait(self._timers[0][0] - now if self._timers else None)
                if self._stop.is_set():
                    return
                due = []
                while self._timers and self._timers[0][0] <= time.monotonic():
                    due.append(heapq.heappop(self._timers)[2])
            for key in due:
                self.enqueue(key)

    def enqueue(self, key: tuple[Any, ...]) -> None:
        with self._plock:
            if key in self._pending:
                return
            self._pending.add(key)
            self.idle.clear()
        self._queue.put(key)

    def _loop(self) -> None:
        while not self._stop.is_set():
            key = self._queue.get()
            if key is None:
                break
            with self._plock:
                self._pending.discard(key)
            try:
                self._sync(key)
            except HttpError as err:
                if err.status not in (404, 409, 403):
                    print(f"kube controller: {key}: {err.status} {err.message}", file=sys.stderr)
                if err.status == 409:
                    self.enqueue(key)
            except Exception:
                traceback.print_exc(file=sys.stderr)
            with self._plock:
                if not self._pending:
                    self.idle.set()

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Tests: wait until the work queue is drained (timers may still add work later)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.idle.wait(0.01):
                with self._plock:
                    if not self._pending:
                        return True
        return False

    # ---- event routing (runs under the store lock: only enqueue) -----------------------------
    def on_event(self, ev: Event) -> None:
        obj, meta = ev.obj, ev.obj["metadata"]
        ns, name = meta.get("namespace", ""), meta["name"]
        group, plural = ev.rkey
        if plural == "pods" and group == "":
            rs = owner_name(obj, "ReplicaSet")
            if rs:
                self.enqueue(("rs", ns, rs))
            self.enqueue(("svc-ns", ns))
            self.enqueue(("pdb-ns", ns))
            bound = bool((obj.get("spec") or {}).get("nodeName"))
            if ev.type == "ADDED" and not bound:
                self.enqueue(("schedule",))
            elif ev.type == "DELETED":
                self.enqueue(("pod-gone", meta["uid"]))
                if bound:
                    self.enqueue(("schedule",))
            elif meta.get("deletionTimestamp") and not (ev.old or {}).get("metadata", {}).get("deletionTimestamp"):
                self.enqueue(("terminate", ns, name, meta["uid"]))
        elif plural == "replicasets":
            self.enqueue(("rs", ns, name))
            d = owner_name(obj, "Deployment")
            if d:
                self.enqueue(("deploy", ns, d))
        elif plural == "deployments":
            self.enqueue(("deploy", ns, name))
            self.enqueue(("hpa-ns", ns))
        elif plural == "services" and group == "":
            self.enqueue(("svc", ns, name))
        elif plural == "nodes":
            self.enqueue(("schedule",))
        elif plural == "namespaces":
            self.enqueue(("ns", name))
        elif plural == "horizontalpodautoscalers":
            self.enqueue(("hpa", ns, name))
        elif plural == "poddisruptionbudgets":
            self.enqueue(("pdb-ns", ns))

    def _sync(self, key: tuple[Any, ...]) -> None:
        kind = key[0]
        if kind == "deploy":
            self.sync_deployment(key[1], key[2])
        elif kind == "rs":
            self.sync_replicaset(key[1], key[2])
        elif kind == "schedule":
            self.schedule()
        elif kind == "start":
            self.start_container(*key[1:])
        elif kind == "pull-failed":
            self.pull_failed(*key[1:])
        elif kind == "terminate":
            self.terminate(*key[1:])
        elif kind == "pod-gone":
            self.forget_pod(key[1])
        elif kind == "svc":
            self.sync_endpoints(key[1], key[2])
        elif kind == "svc-ns":
            svcs, _ = self.store.list(SVCS, key[1])
            for s in svcs:
                self.sync_endpoints(key[1], s["metadata"]["name"])
        elif kind == "ns":
            self.sync_namespace(key[1])
        elif kind == "hpa":
            self.sync_hpa(key[1], key[2])
        elif kind == "hpa-ns":
            hpas, _ = self.store.list(HPAS, key[1])
            for h in hpas:
                self.sync_hpa(key[1], h["metadata"]["name"])
        elif kind == "pdb-ns":
            self.sync_pdbs(key[1])
        elif kind == "autopilot-node":
            self.provision_autopilot_node(*key[1:])
        elif kind == "autopilot-gc":
            self.autopilot_gc()
