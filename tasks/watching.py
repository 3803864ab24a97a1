"""Waits that survive the API server: list, watch from the list's resourceVersion, relist when needed.

A watch ends for ordinary reasons — the server's timeout, a dropped connection, an API-server restart
(GKE control-plane upgrades and repairs), or ``410 Gone`` when etcd compacted past our
resourceVersion (an ERROR event with a 410 ``Expired`` Status; resuming from that version fails
again). None of them is the deploy's failure: like client-go's reflector, an :class:`Informer`
relists, backs off while the server is unreachable, and watches again. Only a permanent answer
(403 Forbidden, 404 for a namespace that is gone, ...) ends the wait with that error.

    changed = queue.Queue()
    pods = Informer(api, core.list_namespaced_pod, changed, namespace=ns, label_selector=sel)
    progress = watch_until([pods], lambda: diagnose(list(pods.items.values()), desired=2),
                           timeout_s=600, log_prefix="pods")
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from typing import Any

from kubernetes import client as k8s
from kubernetes import watch
from kubernetes.client.rest import ApiException

from tasks.log import logger
from tasks.progress import WaitProgress
from tasks.retry import is_transient, retry_after_s
from tasks.settings import get_settings

WATCH_SECONDS = 300  # the server ends each watch after this long; we then relist (cheap for our sizes)
BACKOFF_INITIAL_S, BACKOFF_MAX_S = 0.05, 2.0  # between relists while the API server is unreachable


class Informer(threading.Thread):
    """Keeps ``self.items`` (name -> object dict) current for one list call and signals every change.

    ``items`` is replaced, never mutated, so a reader in another thread always sees one consistent
    version. ``relists`` counts the lists after the first (each one survived watch end or failure).
    """

    def __init__(self, api: k8s.ApiClient, list_fn: Any, changed: queue.Queue, **kwargs: Any) -> None:
        super().__init__(daemon=True, name=f"informer-{getattr(list_fn, '__name__', 'list')}")
        self.api, self.list_fn, self.changed, self.kwargs = api, list_fn, changed, kwargs
        self.items: dict[str, dict[str, Any]] = {}
        self.synced = threading.Event()
        self.error: BaseException | None = None
        self.relists = 0
        self._halt = threading.Event()
        self._watch: watch.Watch | None = None

    def run(self) -> None:
        backoff = BACKOFF_INITIAL_S
        first = True
        while not self._halt.is_set():
            try:
                listing = self.list_fn(**self.kwargs, _request_timeout=get_settings().call_timeout_s)
                self.relists += not first
                first = False
                self.items = {i.metadata.name: self.api.sanitize_for_serialization(i) for i in listing.items}
                self.synced.set()
                self.changed.put(self)
                backoff = BACKOFF_INITIAL_S
                self._stream(listing.metadata.resource_version)
                continue  # the server ended the watch: relist and watch again
            except ApiException as exc:
                if exc.status != 410 and not is_transient(exc):
                    self._fail(exc)
                    return
                why = "watch expired (410 Gone)" if exc.status == 410 else f"HTTP {exc.status}"
                asked = retry_after_s(exc) or 0.0  # a 429's Retry-After
            except Exception as exc:  # noqa: BLE001 - classified below
                if self._halt.is_set():
                    return
                if not is_transient(exc):
                    self._fail(exc)
                    return
                why = f"connection lost ({type(exc).__name__})"
                asked = 0.0
            wait = max(backoff, asked)
            logger().info("%s: %s; relisting in %.2fs", self.name, why, wait)
            self._halt.wait(wait)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _stream(self, resource_version: str) -> None:
        # With timeout_seconds set the client never retries by itself: a 410 ERROR event raises
        # ApiException(410) here, and a cut connection raises urllib3's ProtocolError.
        self._watch = watch.Watch()
        for event in self._watch.stream(self.list_fn, **self.kwargs, resource_version=resource_version,
                                        allow_watch_bookmarks=True, timeout_seconds=WATCH_SECONDS,
                                        _request_timeout=WATCH_SECONDS + 30):
            if self._halt.is_set():
                return
            if event["type"] not in ("ADDED", "MODIFIED", "DELETED"):
                continue  # BOOKMARK: only moves the resourceVersion, which the client tracks
            obj = self.api.sanitize_for_serialization(event["object"])
            name = (obj.get("metadata") or {}).get("name")
            if not name:
                continue
            items = dict(self.items)
            if event["type"] == "DELETED":
                items.pop(name, None)
            else:
                items[name] = obj
            self.items = items
            self.changed.put(self)

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        self.changed.put(self)

    def stop(self) -> None:
        self._halt.set()
        if self._watch is not None:
            self._watch.stop()


def watch_until(informers: list[Informer], evaluate: Any, *, timeout_s: float, log_prefix: str,
                progress: WaitProgress | None = None) -> Any:
    """Run ``evaluate()`` (-> Progress) on every change until it is not "waiting" or time runs out.

    Returns the last Progress (None if the informers never listed within ``timeout_s``); raises the
    first permanent error an informer met. ``progress`` (a Prefect progress artifact) follows along.
    """
    changed: queue.Queue = informers[0].changed
    bar = progress
    for inf in informers:
        inf.start()
    deadline = time.monotonic() + timeout_s
    last: Any = None
    log = logger()
    try:
        while True:
            remaining = deadline - time.monotonic()
            with contextlib.suppress(queue.Empty):
                changed.get(timeout=max(0.0, min(remaining, 5.0)))
            for inf in informers:
                if inf.error is not None:
                    raise inf.error
            if all(inf.synced.is_set() for inf in informers):
                progress = evaluate()
                if last is None or (progress.reason, progress.message) != (last.reason, last.message):
                    log.info("%s: %s", log_prefix, progress.message)
                last = progress
                if progress.state != "waiting":
                    if bar is not None and progress.state == "ready":
                        bar.done(progress.message)
                    return progress
            if bar is not None:
                bar.update(last.message if last is not None else "listing")
            if time.monotonic() >= deadline:
                return last
    finally:
        for inf in informers:
            inf.stop()
