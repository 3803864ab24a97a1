"""The kubelet's probe workers: every container's ``httpGet`` startup, readiness and liveness probes, over HTTP.

Mirrors ``pkg/kubelet/prober`` (``worker.go``, ``prober.go``) and ``pkg/probe/http``: one worker per probe of a
running container, a ``GET`` of the probe's path on the pod's port every ``periodSeconds`` (default 10) after
``initialDelaySeconds``, ``User-Agent: kube-probe/<major>.<minor>`` and ``Accept: */*`` plus the probe's
``httpHeaders``; 200-399 is a success, anything else (or no answer within ``timeoutSeconds``, default 1) a
failure; a result counts after ``successThreshold`` (default 1) / ``failureThreshold`` (default 3) in a row.

* startup: until it succeeds, readiness and liveness do not run; ``failureThreshold`` failures kill the
  container (``Startup probe failed``), which restarts with the usual back-off;
* liveness: ``failureThreshold`` failures kill the container (``Container X failed liveness probe, will be
  restarted``);
* readiness: ``failureThreshold`` failures make the pod NotReady (its Endpoints drop it), ``successThreshold``
  successes make it Ready again.

Each state change records the kubelet's ``Unhealthy`` / ``Killing`` events. Kept lenient: the pod first turns
Ready when its model server reports loaded (the runtime's ``on_ready``), and the readiness probe re-admits a
pod only while its server says it is loaded — so an engine whose ``/health`` answers 200 during the weight load
is not Ready early; a real wait is never below :data:`MIN_PERIOD_S`, a timeout never below
:data:`MIN_PROBE_TIMEOUT_S`, and a container is killed only after its probe kept failing for
:data:`MIN_KILL_WINDOW_S` real seconds too (local processes start in real time; see docs/sandbox-contract.md).
"""

from __future__ import annotations

import contextlib
import http.client
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from sandbox.kube import resources as res
from sandbox.kube.actors import BackgroundActor, Job
from sandbox.kube.controllers import PODS

if TYPE_CHECKING:
    from sandbox.kube.cluster import KubeCluster

Obj = dict[str, Any]
KINDS = ("startupProbe", "readinessProbe", "livenessProbe")
MIN_PERIOD_S = 0.25  # real seconds: every pod of every test cluster is probed; keep the suite's 2 cores free
# Real seconds a probe must keep failing before the kubelet kills the container: a local process starts at
# real speed (an interpreter, imports) while its probe budget (failureThreshold x periodSeconds) is scaled.
MIN_KILL_WINDOW_S = 5.0
# Real seconds a probe waits at least: the suite's machine runs at load ~20 on 2 cores, where a healthy
# server can take seconds to accept; a slow answer must not read as a dead container.
MIN_PROBE_TIMEOUT_S = 5.0


@dataclass
class _Worker:
    uid: str
    gen: int
    kind: str
    probe: Obj
    next_due: float
    ok: int = 0
    fail: int = 0
    in_flight: bool = False
    probes: int = 0
    failing_since: float = 0.0


def user_agent(cluster: Any) -> str:
    version = getattr(cluster, "server_version", None) or res.SERVER_VERSION
    return f"kube-probe/{version.get('major', '1')}.{str(version.get('minor', '30')).rstrip('+')}"


class Prober(BackgroundActor):
    """Every node's probe workers for one cluster (one scheduling thread, a small pool for the requests)."""

    thread_name = "kubelet-prober"
    pool_prefix = "kubelet-probe"
    min_wait_s = 0.01

    def __init__(self, cluster: KubeCluster) -> None:
        super().__init__()
        self.cluster = cluster
        self._workers: dict[tuple[str, int, str], _Worker] = {}
        self._started: set[tuple[str, int]] = set()  # containers whose startup probe succeeded
        self.probes = 0  # requests sent (all pods)
        cluster.subscribe(self._on_event)

    def count(self, uid: str | None = None, kind: str | None = None) -> int:
        """Probes sent so far (to one pod uid, of one kind)."""
        with self._lock:
            return sum(w.probes for w in self._workers.values()
                       if (uid is None or w.uid == uid) and (kind is None or w.kind == kind))

    def _on_event(self, etype: str, obj: Obj) -> None:
        if obj.get("kind") == "Pod":
            self._poke.set()

    # ---- the loop -------------------------------------------------------------------------------
    def _period(self, probe: Obj) -> float:
        return max(MIN_PERIOD_S, self.cluster.clock.scaled(float(probe.get("periodSeconds") or 10)))

    def _sync(self, now: float) -> None:
        ctl = self.cluster.controller
        with ctl.runs_lock:
            runs = [r for r in ctl.runs.values() if r.server is not None and not r.stopped and not r.plain]
        want: dict[tuple[str, int, str], Obj] = {}
        for run in runs:
            pod = self.cluster.store.get(PODS, run.namespace, run.name)
            if pod is None or pod["metadata"]["uid"] != run.uid or pod["metadata"].get("deletionTimestamp"):
                continue
            c = ((pod.get("spec") or {}).get("containers") or [{}])[0]
            for kind in KINDS:
                probe = c.get(kind) or {}
                if probe.get("httpGet"):
                    want[(run.uid, run.gen, kind)] = probe
        with self._lock:
            for key in list(self._workers):
                if key not in want:
                    del self._workers[key]
            self._started &= {(k[0], k[1]) for k in want}
            for key, probe in want.items():
                if key not in self._workers:
                    delay = self.cluster.clock.scaled(float(probe.get("initialDelaySeconds") or 0))
                    self._workers[key] = _Worker(key[0], key[1], key[2], probe, now + delay)

    def _round(self, now: float) -> tuple[list[Job], float]:
        if self._resync_due(now):
            self._sync(now)
        with self._lock:
            due = []
            for w in self._workers.values():
                gated = w.kind != "startupProbe" and (w.uid, w.gen) not in self._started and \
                    (w.uid, w.gen, "startupProbe") in self._workers
                if w.next_due <= now and not w.in_flight and not gated:
                    w.in_flight = True
                    w.next_due = now + self._period(w.probe)
                    due.append(w)
            wake = min((w.next_due for w in self._workers.values()), default=now + 1.0)
        return [partial(self._probe, w) for w in due], min(wake, self._resync_at)

    # ---- one probe --------------------------------------------------------------------------------
    def _probe(self, w: _Worker) -> None:
        try:
            ok, detail = self._get(w)
            self._result(w, ok, detail)
        finally:
            with self._lock:
                w.in_flight = False

    def _get(self, w: _Worker) -> tuple[bool, str]:
        ctl = self.cluster.controller
        with ctl.runs_lock:
            run = ctl.runs.get(w.uid)
        port = getattr(run.server, "port", None) if run is not None and run.server is not None else None
        get = w.probe["httpGet"]
        path = get.get("path") or "/"
        if not port:
            return False, f'Get "http://127.0.0.1{path}": dial tcp: connect: connection refused'
        headers = {"User-Agent": user_agent(self.cluster), "Accept": "*/*"}
        headers.update({h.get("name", ""): h.get("value", "") for h in get.get("httpHeaders") or []})
        timeout = max(MIN_PROBE_TIMEOUT_S, self.cluster.clock.scaled(float(w.probe.get("timeoutSeconds") or 1)))
        conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=timeout)
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            resp.read()
            if 200 <= resp.status < 400:
                return True, ""
            return False, f"HTTP probe failed with statuscode: {resp.status}"
        except TimeoutError:
            return False, (f'Get "http://127.0.0.1:{port}{path}": context deadline exceeded (Client.Timeout '
                           "exceeded while awaiting headers)")
        except (OSError, http.client.HTTPException) as exc:
            return False, f'Get "http://127.0.0.1:{port}{path}": {exc}'
        finally:
            conn.close()

    def _result(self, w: _Worker, ok: bool, detail: str) -> None:
        probe = w.probe
        with self._lock:
            if (w.uid, w.gen, w.kind) not in self._workers:
                return
            w.probes += 1
            self.probes += 1
            if ok:
                w.ok, w.fail = w.ok + 1, 0
            else:
                w.ok, w.fail = 0, w.fail + 1
                if w.fail == 1:
                    w.failing_since = time.monotonic()
            failed = w.fail >= int(probe.get("failureThreshold") or 3) and not ok
            if failed and w.kind != "readinessProbe" and time.monotonic() - w.failing_since < MIN_KILL_WINDOW_S:
                failed = False  # not yet: see MIN_KILL_WINDOW_S
            succeeded = ok and w.ok >= int(probe.get("successThreshold") or 1)
            if w.kind == "startupProbe" and succeeded:
                self._started.add((w.uid, w.gen))
        ctl = self.cluster.controller
        with ctl.runs_lock:
            run = ctl.runs.get(w.uid)
        if run is None:
            return
        pod = self.cluster.store.get(PODS, run.namespace, run.name)
        if pod is None:
            return
        host = (pod.get("spec") or {}).get("nodeName", "")
        name = ctl._main_container(pod)
        label = {"startupProbe": "Startup", "readinessProbe": "Readiness", "livenessProbe": "Liveness"}[w.kind]
        if not ok and w.fail == 1:
            ctl.event(pod, "Warning", "Unhealthy", f"{label} probe failed: {detail}", host=host)
        if w.kind == "readinessProbe":
            self._set_ready(run, pod, w.gen, ready=True if succeeded else False if failed else None)
        elif failed:  # startup or liveness: the kubelet kills the container, which restarts
            why = "failed liveness probe" if w.kind == "livenessProbe" else "failed startup probe"
            ctl.event(pod, "Normal", "Killing", f"Container {name} {why}, will be restarted", host=host)
            with self._lock:
                self._workers.pop((w.uid, w.gen, w.kind), None)
            ctl.on_exit(w.uid, w.gen, 137, "Error")

    def _set_ready(self, run: Any, pod: Obj, gen: int, *, ready: bool | None) -> None:
        if ready is None:
            return
        with run.lock:
            if run.gen != gen or run.stopped or run.server is None:
                return
            if ready and not getattr(run.server, "ready", True):
                return  # still loading: the runtime's on_ready makes it Ready (kept lenient)
            if run.ready == ready:
                return
            run.ready = ready
            with contextlib.suppress(Exception):
                self.cluster.controller._write_running(run, pod)
