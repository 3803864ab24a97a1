"""Long-running operations (``projects.locations.operations``): every mutation replies at once with an
``Operation`` that goes PENDING -> RUNNING -> DONE after time-scaled cloud delays; ``get`` / ``list``
/ ``cancel`` and the sandbox-only ``POST .../operations/OP:wait`` (bounded). Work that fails ends
DONE with ``error`` (a google.rpc code), ``statusMessage`` and ``clusterConditions`` /
``nodepoolConditions`` (GCE_STOCKOUT for a zone resource pool exhausted). A mutation while another
operation holds the cluster or pool, or while the cluster is being deleted, is 400
FAILED_PRECONDITION, as on GKE.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from sandbox.gke.common import API_BASE, _err, _now
from sandbox.gke.state import _Cluster, _Op, _OpFailed, _Pool

_RPC = {"CANCELLED": 1, "INVALID_ARGUMENT": 3, "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7,
        "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9, "ABORTED": 10, "INTERNAL": 13, "UNAVAILABLE": 14}


class OperationsMixin:
    """Operations of :class:`~sandbox.gke.service.Gke`: launching, waiting, the operations API."""

    def _sleep(self, op: _Op, key: str, cloud_seconds: float | None = None) -> None:
        """Sleep a named cloud delay (or ``cloud_seconds`` for it); abort the operation if it was cancelled or
        the sandbox stops."""
        delay = self.clock.scaled(self.delays.get(key, 0.0) if cloud_seconds is None else cloud_seconds)
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
