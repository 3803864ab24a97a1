"""The lifecycle the sandbox's background actors share: what a real cluster does on its own, unasked.

GMP's collector (:mod:`sandbox.kube.gmp`), Google's LB health checkers (:mod:`sandbox.kube.gcehc`) and the
kubelet's probe workers (:mod:`sandbox.kube.prober`) each run one daemon thread over a due-time loop: a round
reads the cluster, returns the requests now due and when the next one is due; the requests go to a small pool
(a slow or dead target never stalls the loop) and the thread sleeps until then or until poked (a watch event,
a new backend). A subclass says only what a round is (:meth:`BackgroundActor._round`) and how one request
goes; this class owns the thread, the poke, the pool, start/stop/join.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

Job = Callable[[], object]


class BackgroundActor:
    """One daemon thread running :meth:`_round` until stopped, with a pool for the requests it sends."""

    thread_name = "background-actor"
    pool_prefix = "background"
    pool_size = 4
    restartable = True  # False: once stopped, start() does nothing (the actor's owner is being torn down)
    resync_s = 1.0  # real seconds between two re-reads of the cluster when nothing pokes (see _resync_due)
    min_wait_s = 0.0  # real seconds the loop sleeps at least between two rounds

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the subclass's state (targets, workers, backends, counters)
        self._life = threading.Lock()  # start() from several threads (a request may start the actor)
        self._stop = threading.Event()
        self._poke = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._resync_at = 0.0

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        with self._life:
            if self._thread is not None or (self._stop.is_set() and not self.restartable):
                return
            self._stop.clear()
            self._resync_at = 0.0  # a (re)started loop reads the cluster at once
            self._pool = ThreadPoolExecutor(max_workers=self.pool_size, thread_name_prefix=self.pool_prefix)
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._poke.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # ---- the loop -------------------------------------------------------------------------------
    def _round(self, now: float) -> tuple[Iterable[Job], float]:
        """One pass at monotonic time ``now``: the requests due now, and the monotonic time of the next pass."""
        raise NotImplementedError

    def _resync_due(self, now: float) -> bool:
        """True when the caller should re-read the cluster: it was poked, or ``resync_s`` passed since last time."""
        if self._poke.is_set() or now >= self._resync_at:
            self._poke.clear()
            self._resync_at = now + self.resync_s
            return True
        return False

    def _run(self) -> None:
        while not self._stop.is_set():
            jobs, wake = self._round(time.monotonic())
            for job in jobs:
                pool = self._pool
                try:
                    if pool is None:
                        return
                    pool.submit(job)
                except RuntimeError:  # stopping: the pool is shut down
                    return
            self._poke.wait(max(self.min_wait_s, wake - time.monotonic()))
