"""The object store: one lock, dicts, a global resourceVersion, watch fan-out with per-watcher queues.

Stored objects are never mutated in place: every write stores a new dict, so readers (watch
streams, the controller, ``snapshot()``) may hold references without copying.
"""

from __future__ import annotations

import os
import queue
import random
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sandbox.core import HttpError
from sandbox.kube.resources import RType

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace or "", name)
_rng = random.Random()
# A process forked from one that imported this module (a fork server's child) draws its own names and uids,
# as the standard library reseeds its own generator after a fork: otherwise every child gives the same ones.
os.register_at_fork(after_in_child=_rng.seed)


def clone(o: Any) -> Any:
    """Deep copy of JSON-like data (several times faster than copy.deepcopy)."""
    if isinstance(o, dict):
        return {k: clone(v) for k, v in o.items()}
    if isinstance(o, list):
        return [clone(v) for v in o]
    return o


def new_uid() -> str:
    """A random v4 UUID (os.urandom per call is slow under load; these need not be secret)."""
    n = _rng.getrandbits(128)
    n = (n & ~(0xF000 << 64)) | (0x4000 << 64)
    n = (n & ~(0xC000 << 48)) | (0x8000 << 48)
    h = f"{n:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def rand_hex(n: int) -> str:
    return f"{_rng.getrandbits(4 * n):0{n}x}"


def status_error(code: int, reason: str, message: str, *, name: str | None = None, group: str | None = None,
                 kind: str | None = None, causes: list[Obj] | None = None, retry_after: int | None = None
                 ) -> HttpError:
    """An HttpError whose body is a real ``metav1.Status``."""
    details: Obj = {}
    if name is not None:
        details["name"] = name
    if group:
        details["group"] = group
    if kind:
        details["kind"] = kind
    if causes:
        details["causes"] = causes
    if retry_after is not None:
        details["retryAfterSeconds"] = retry_after
    body: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
                 "reason": reason, "code": code}
    if details:
        body["details"] = details
    return HttpError(code, message, reason=reason, body=body)


def not_found(t: RType, name: str) -> HttpError:
    return status_error(404, "NotFound", f'{t.qualified} "{name}" not found', name=name, group=t.group,
                        kind=t.plural)


def already_exists(t: RType, name: str) -> HttpError:
    return status_error(409, "AlreadyExists", f'{t.qualified} "{name}" already exists', name=name, group=t.group,
                        kind=t.plural)


def conflict(t: RType, name: str) -> HttpError:
    return status_error(409, "Conflict", f'Operation cannot be fulfilled on {t.qualified} "{name}": the object '
                        "has been modified; please apply your changes to the latest version and try again",
                        name=name, group=t.group, kind=t.plural)


def invalid(t: RType, name: str, causes: list[tuple[str, str, str]]) -> HttpError:
    """causes: (field, reason e.g. FieldValueRequired, message)."""
    kind = f"{t.kind}.{t.group}" if t.group else t.kind
    text = ", ".join(f"{f}: {m}" for f, _, m in causes)
    return status_error(422, "Invalid", f'{kind} "{name}" is invalid: {text}', name=name, group=t.group,
                        kind=t.kind, causes=[{"reason": r, "message": m, "field": f} for f, r, m in causes])


@dataclass
class Event:
    rv: int
    type: str  # ADDED | MODIFIED | DELETED
    rkey: tuple[str, str]
    obj: Obj
    old: Obj | None


@dataclass
class Watcher:
    rkey: tuple[str, str]
    namespace: str | None
    pred: Callable[[Obj], bool]
    queue: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    closed: bool = False

    def offer(self, ev: Event) -> None:
        """Queue (type, obj) if the event concerns this watcher, turning selector edges into ADDED/DELETED."""
        if ev.rkey != self.rkey:
            return
        if self.namespace is not None and ev.obj["metadata"].get("namespace", "") != self.namespace:
            return
        if ev.type == "MODIFIED":
            now, before = self.pred(ev.obj), ev.old is not None and self.pred(ev.old)
            if now and before:
                self.queue.put(("MODIFIED", ev.obj, ev.rv))
            elif now:
                self.queue.put(("ADDED", ev.obj, ev.rv))
            elif before:
                self.queue.put(("DELETED", ev.obj, ev.rv))
        elif self.pred(ev.obj):
            self.queue.put((ev.type, ev.obj, ev.rv))


class Gone(Exception):
    pass


class Store:
    def __init__(self, history: int = 10000) -> None:
        self.lock = threading.RLock()
        self._rv = 1000
        self._objects: dict[tuple[str, str], dict[Key, Obj]] = {}
        self._history: deque[Event] = deque(maxlen=history)
        self._compacted = 0  # the rv of the newest event dropped from history
        self._watchers: list[Watcher] = []
        self._hooks: list[Callable[[Event], None]] = []

    # ---- reads ----------------------------------------------------------------------------------
    @property
    def resource_version(self) -> int:
        with self.lock:
            return self._rv

    def get(self, t: RType, namespace: str, name: str) -> Obj | None:
        with self.lock:
            return self._objects.get(t.key, {}).get((namespace if t.namespaced else "", name))

    def list(self, t: RType, namespace: str | None = None, pred: Callable[[Obj], bool] | None = None
             ) -> tuple[list[Obj], int]:
        with self.lock:
            items = [o for (ns, _), o in self._objects.get(t.key, {}).items()
                     if (namespace is None or ns == namespace) and (pred is None or pred(o))]
            rv = self._rv
        items.sort(key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))
        return items, rv

    def count(self, t: RType) -> int:
        with self.lock:
            return len(self._objects.get(t.key, {}))

    def all_objects(self) -> dict[tuple[str, str], list[Obj]]:
        with self.lock:
            return {k: list(v.values()) for k, v in self._objects.items()}

    # ---- writes ---------------------------------------------------------------------------------
    def add_hook(self, fn: Callable[[Event], None]) -> None:
        """``fn(event)`` runs under the store lock for every change: it must only enqueue work."""
        self._hooks.append(fn)

    def _key(self, t: RType, obj: Obj) -> Key:
        meta = obj["metadata"]
        return (meta.get("namespace", "") if t.namespaced else "", meta["name"])

    def _emit(self, t: RType, etype: str, obj: Obj, old: Obj | None) -> None:
        ev = Event(self._rv, etype, t.key, obj, old)
        if len(self._history) == self._history.maxlen:
            self._compacted = self._history[0].rv
        self._history.append(ev)
        for w in self._watchers:
            w.offer(ev)
        for hook in self._hooks:
            hook(ev)

    def create(self, t: RType, obj: Obj) -> Obj:
        with self.lock:
            bucket = self._objects.setdefault(t.key, {})
            key = self._key(t, obj)
            if key in bucket:
                raise already_exists(t, key[1])
            self._rv += 1
            obj["metadata"]["resourceVersion"] = str(self._rv)
            bucket[key] = obj
            self._emit(t, "ADDED", obj, None)
            return obj

    def replace(self, t: RType, obj: Obj, *, expect_rv: str | None = None) -> Obj:
        """Store ``obj`` over the live one; ``expect_rv`` guards against lost updates (409)."""
        with self.lock:
            bucket = self._objects.setdefault(t.key, {})
            key = self._key(t, obj)
            old = bucket.get(key)
            if old is None:
                raise not_found(t, key[1])
            if expect_rv and expect_rv != old["metadata"]["resourceVersion"]:
                raise conflict(t, key[1])
            if _same(old, obj):
                return old
            self._rv += 1
            obj["metadata"]["resourceVersion"] = str(self._rv)
            bucket[key] = obj
            self._emit(t, "MODIFIED", obj, old)
            return obj

    def mutate(self, t: RType, namespace: str, name: str, fn: Callable[[Obj], Obj | None]) -> Obj | None:
        """Atomic read-modify-write: ``fn`` gets a deep copy and returns the new object (or None: no change).

        Returns the stored object afterwards, or None when it does not exist.
        """
        with self.lock:
            old = self.get(t, namespace, name)
            if old is None:
                return None
            new = fn(clone(old))
            if new is None:
                return old
            return self.replace(t, new)

    def delete(self, t: RType, namespace: str, name: str) -> Obj:
        with self.lock:
            bucket = self._objects.get(t.key, {})
            key = (namespace if t.namespaced else "", name)
            old = bucket.pop(key, None)
            if old is None:
                raise not_found(t, name)
            self._rv += 1
            gone = dict(old)
            gone["metadata"] = dict(old["metadata"], resourceVersion=str(self._rv))
            self._emit(t, "DELETED", gone, old)
            return gone

    # ---- watches --------------------------------------------------------------------------------
    def watch(self, t: RType, namespace: str | None, pred: Callable[[Obj], bool], since: int | None
              ) -> tuple[Watcher, list[tuple[str, Obj, int]]]:
        """Register a watcher; returns it and the events to send first (initial state or replay)."""
        with self.lock:
            w = Watcher(t.key, namespace, pred)
            initial: list[tuple[str, Obj, int]] = []
            if not since:
                items, _ = self.list(t, namespace, pred)
                initial = [("ADDED", o, int(o["metadata"]["resourceVersion"])) for o in items]
            else:
                if since < self._compacted:
                    raise Gone(f"too old resource version: {since} ({self._compacted + 1})")
                replay = Watcher(t.key, namespace, pred)
                for ev in self._history:
                    if ev.rv > since:
                        replay.offer(ev)
                while not replay.queue.empty():
                    initial.append(replay.queue.get())
            self._watchers.append(w)
            return w, initial

    def compact(self) -> int:
        """Forget the event history, as etcd compaction does: a watch from an older version gets 410."""
        with self.lock:
            self._history.clear()
            self._compacted = self._rv
            return self._rv

    def unwatch(self, w: Watcher) -> None:
        with self.lock:
            w.closed = True
            if w in self._watchers:
                self._watchers.remove(w)

    def close_watchers(self) -> None:
        with self.lock:
            for w in self._watchers:
                w.closed = True
                w.queue.put(None)
            self._watchers.clear()


def _same(old: Obj, new: Obj) -> bool:
    """Equal apart from resourceVersion (no-op writes do not bump it, like the real API server)."""
    a = dict(old, metadata={k: v for k, v in old["metadata"].items() if k not in ("resourceVersion",
                                                                                     "managedFields")})
    b = dict(new, metadata={k: v for k, v in new["metadata"].items() if k not in ("resourceVersion",
                                                                                     "managedFields")})
    return a == b
