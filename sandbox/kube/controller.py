"""Controllers of the sandbox cluster: deployments, replica sets, scheduler, kubelet, endpoints, HPA, namespaces.

One worker thread drains a de-duplicated work queue fed by store events (no polling). Cloud delays
(image pull, crash back-off, Autopilot node provisioning, progress deadlines) are timers on the
sandbox ``Clock`` that enqueue work when they fire. Model servers are started through the runtime
(``runtime.start(pod, on_ready=..., on_exit=...)``); their callbacks update the pod directly so
readiness is visible to watchers at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import itertools
import json
import queue
import sys
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from sandbox.core import DEFAULT_DELAYS, HttpError, now_rfc3339
from sandbox.kube import localproc
from sandbox.kube import resources as res
from sandbox.kube.defaults import GPU, parse_quantity
from sandbox.kube.selectors import match_label_selector, match_selector_dict
from sandbox.kube.store import Event, clone, new_uid, not_found, rand_hex, status_error

if TYPE_CHECKING:
    from sandbox.kube.cluster import KubeCluster

Obj = dict[str, Any]
T = res.BY_KEY
PODS, NODES, NS = T[("", "pods")], T[("", "nodes")], T[("", "namespaces")]
SVCS, EPS, EVENTS, SAS = T[("", "services")], T[("", "endpoints")], T[("", "events")], T[("", "serviceaccounts")]
DEPLOYS, RSS = T[("apps", "deployments")], T[("apps", "replicasets")]
HPAS, PDBS = T[("autoscaling", "horizontalpodautoscalers")], T[("policy", "poddisruptionbudgets")]
PORT_ANNOTATION = "sandbox.llm-fleet.dev/port"
AUTOPILOT_LABEL = "sandbox.llm-fleet.dev/autopilot"
MAX_EVENTS = 3000
CRASH_BACKOFF = (10.0, 300.0)  # kubelet: 10 s doubling, capped at 5 min (cloud seconds)
IMAGE_PULL_FAIL_AFTER = 5.0  # cloud seconds until a bad image reports ErrImagePull
NAMESPACE_FINALIZE = 5.0  # cloud seconds a deleted namespace stays Terminating (at least 0.1 s real)


def _gpus(pod: Obj) -> float:
    total = 0.0
    for c in (pod.get("spec") or {}).get("containers") or []:
        r = c.get("resources") or {}
        v = (r.get("requests") or {}).get(GPU, (r.get("limits") or {}).get(GPU))
        if v is not None:
            total += parse_quantity(v) or 0.0
    return total


def _requests(pod: Obj, resource: str) -> float:
    total = 0.0
    for c in (pod.get("spec") or {}).get("containers") or []:
        v = ((c.get("resources") or {}).get("requests") or {}).get(resource)
        if v is not None:
            total += parse_quantity(v) or 0.0
    return total


def _owner(obj: Obj, kind: str) -> str | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("kind") == kind and ref.get("controller"):
            return ref.get("name")
    return None


def _owned_by(obj: Obj, uid: str) -> bool:
    return any(r.get("uid") == uid and r.get("controller") for r in obj["metadata"].get("ownerReferences") or [])


def is_ready(pod: Obj) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def _int_or_percent(value: Any, total: int, round_up: bool) -> int:
    if isinstance(value, int):
        return value
    text = str(value or "0")
    if text.endswith("%"):
        pct = int(text[:-1] or 0)
        raw = pct * total / 100
        return int(-(-raw // 1)) if round_up else int(raw // 1)
    try:
        return int(text)
    except ValueError:
        return 0


def template_hash(template: Obj) -> str:
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).digest()
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    n = int.from_bytes(digest[:8], "big")
    out = []
    for _ in range(10):
        n, r = divmod(n, len(alphabet))
        out.append(alphabet[r])
    return "".join(out)


def _set_condition(conds: list[Obj], ctype: str, status: str, reason: str = "", message: str = "",
                   now: str | None = None, probe: bool = True, update_time: bool = False) -> list[Obj]:
    now = now or now_rfc3339()
    out = [dict(c) for c in conds]
    cur = next((c for c in out if c.get("type") == ctype), None)
    if cur is None:
        cur = {"type": ctype}
        if probe:
            cur["lastProbeTime"] = None
        out.append(cur)
    if cur.get("status") != status:
        cur["lastTransitionTime"] = now
    if update_time and (cur.get("status") != status or cur.get("reason") != reason):
        cur["lastUpdateTime"] = now
    cur["status"] = status
    if reason:
        cur["reason"] = reason
    else:
        cur.pop("reason", None)
    if message:
        cur["message"] = message
    else:
        cur.pop("message", None)
    return out


class PodRun:
    """The kubelet's view of one pod: its model server, restarts and the logs of the last crash."""

    def __init__(self, uid: str, namespace: str, name: str) -> None:
        self.uid, self.namespace, self.name = uid, namespace, name
        self.lock = threading.RLock()
        self.gen = 0
        self.server: Any = None
        self.ready = False
        self.restarts = 0
        self.prev_logs: list[str] | None = None
        self.last_logs: list[str] = []
        self.stopped = False
        self.started_at = ""
        self.container_id = ""
        self.plain = False  # no model server (image the runtime does not serve)
        self.last_terminated: Obj = {}

    def logs(self) -> list[str]:
        if self.server is not None:
            with contextlib.suppress(Exception):
                return list(self.server.logs())
        return list(self.last_logs)


class Controller:
    def __init__(self, cluster: KubeCluster) -> None:
        self.cluster = cluster
        self.store = cluster.store
        self.clock = cluster.clock
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        self._pending: set[tuple[Any, ...]] = set()
        self._plock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.runs: dict[str, PodRun] = {}
        self.runs_lock = threading.Lock()
        self._timers: list[tuple[float, int, tuple[Any, ...]]] = []
        self._tcond = threading.Condition()
        self._tseq = itertools.count()
        self._timer_thread: threading.Thread | None = None
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kube-stop")
        self._ip = 0
        self._progress: dict[tuple[str, str], tuple[Any, float]] = {}
        self._autopilot_pending: dict[str, str] = {}  # pod uid -> node name being provisioned
        self._idle_since: dict[str, float] = {}  # autopilot node -> monotonic time it became idle
        self._events: dict[tuple[str, str, str], str] = {}  # (uid, reason, message) -> event name
        self._event_order: list[tuple[str, str]] = []
        self._elock = threading.Lock()
        self._event_seq = 0
        self._ns_terminating: dict[str, float] = {}
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
        with self.runs_lock:
            runs = list(self.runs.values())
            self.runs.clear()
        servers = []
        for run in runs:
            with run.lock:
                run.stopped = True
                server, run.server = run.server, None
            if server is not None:
                servers.append(server)
        self._executor.shutdown(wait=True, cancel_futures=False)
        if servers:  # each HTTP server takes a poll interval to shut down: do them side by side
            with ThreadPoolExecutor(max_workers=min(64, len(servers))) as pool:
                list(pool.map(self._stop_server, servers))
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kube-stop")

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
            rs = _owner(obj, "ReplicaSet")
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
            d = _owner(obj, "Deployment")
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

    # ---- deployments ------------------------------------------------------------------------
    def _owned(self, t: res.RType, ns: str, uid: str) -> list[Obj]:
        items, _ = self.store.list(t, ns, lambda o: _owned_by(o, uid))
        return items

    def sync_deployment(self, ns: str, name: str) -> None:
        d = self.store.get(DEPLOYS, ns, name)
        if d is None or d["metadata"].get("deletionTimestamp"):
            self._progress.pop((ns, name), None)
            return
        spec = d["spec"]
        replicas = int(spec.get("replicas", 1))
        uid = d["metadata"]["uid"]
        rss = self._owned(RSS, ns, uid)
        tmpl = clone(spec["template"])
        h = template_hash(tmpl)
        new_rs = next((r for r in rss if (r["metadata"].get("labels") or {}).get("pod-template-hash") == h), None)
        olds = [r for r in rss if r is not new_rs]
        pods = self._owned_pods_by_rs(ns, rss)
        revision = max([int((r["metadata"].get("annotations") or {}).get("deployment.kubernetes.io/revision", 0))
                        for r in rss] + [0])
        strategy = spec.get("strategy") or {}
        rolling = strategy.get("type", "RollingUpdate") == "RollingUpdate"
        ru = strategy.get("rollingUpdate") or {}
        surge = _int_or_percent(ru.get("maxSurge", "25%"), replicas, True) if rolling else 0
        unavailable = _int_or_percent(ru.get("maxUnavailable", "25%"), replicas, False) if rolling else 0
        if rolling and surge == 0 and unavailable == 0:
            unavailable = 1
        created_new = False
        old_active = sum(len(pods.get(r["metadata"]["uid"], ())) for r in olds)
        old_any_pods = any(self._pods_of(ns, r["metadata"]["uid"], include_terminating=True) for r in olds)
        old_spec = sum(int(r["spec"].get("replicas", 0)) for r in olds)
        if new_rs is None:
            if rolling and (old_spec or old_active):
                total = old_spec
                start = max(0, min(replicas, replicas + surge - total))
            elif not rolling and (old_spec or old_any_pods):
                start = 0
            else:
                start = replicas
            new_rs = self._create_rs(d, tmpl, h, start, revision + 1)
            created_new = True
            if start:
                self.event(d, "Normal", "ScalingReplicaSet", f"Scaled up replica set {new_rs['metadata']['name']} "
                           f"to {start}", component="deployment-controller")
        else:
            cur_rev = int((new_rs["metadata"].get("annotations") or {}).get("deployment.kubernetes.io/revision", 0))
            if cur_rev < revision:
                self._annotate_rs(new_rs, revision + 1, replicas, surge)
        new_uid = new_rs["metadata"]["uid"]
        ready = {r["metadata"]["uid"]: sum(1 for p in pods.get(r["metadata"]["uid"], ()) if is_ready(p))
                 for r in rss + ([new_rs] if created_new else [])}
        new_spec = int(new_rs["spec"].get("replicas", 0))
        if not rolling:
            if old_spec:
                for r in olds:
                    self._scale_rs(d, r, 0)
            elif not old_any_pods and new_spec != replicas:
                self._scale_rs(d, new_rs, replicas)
        elif not olds or (old_spec == 0 and old_active == 0):
            if new_spec != replicas:
                self._scale_rs(d, new_rs, replicas)
        else:
            total = new_spec + old_spec
            allowed = replicas + surge
            if new_spec < replicas and total < allowed:
                up = min(allowed - total, replicas - new_spec)
                new_spec += up
                total += up
                self._scale_rs(d, new_rs, new_spec)
            elif new_spec > replicas:
                new_spec = replicas
                total = new_spec + old_spec
                self._scale_rs(d, new_rs, new_spec)
            min_available = replicas - unavailable
            new_unavailable = max(0, new_spec - ready.get(new_uid, 0))
            max_down = total - min_available - new_unavailable
            olds_sorted = sorted(olds, key=lambda r: r["metadata"].get("creationTimestamp", ""))
            if max_down > 0:
                targets = {r["metadata"]["uid"]: int(r["spec"].get("replicas", 0)) for r in olds_sorted}
                for r in olds_sorted:  # unhealthy old replicas go first
                    if max_down <= 0:
                        break
                    u = r["metadata"]["uid"]
                    unhealthy = targets[u] - min(ready.get(u, 0), targets[u])
                    cut = min(max_down, unhealthy)
                    if cut > 0:
                        targets[u] -= cut
                        max_down -= cut
                available = sum(min(ready.get(u, 0), n) for u, n in targets.items()) + min(ready.get(new_uid, 0),
                                                                                            new_spec)
                down = min(max_down, available - min_available)
                for r in olds_sorted:
                    if down <= 0:
                        break
                    u = r["metadata"]["uid"]
                    cut = min(targets[u], down)
                    targets[u] -= cut
                    down -= cut
                for r in olds_sorted:
                    if targets[r["metadata"]["uid"]] != int(r["spec"].get("replicas", 0)):
                        self._scale_rs(d, r, targets[r["metadata"]["uid"]])
        self._cleanup_history(d, olds)
        self._deployment_status(d, new_rs, created_new, surge, unavailable)

    def _owned_pods_by_rs(self, ns: str, rss: list[Obj]) -> dict[str, list[Obj]]:
        uids = {r["metadata"]["uid"] for r in rss}
        out: dict[str, list[Obj]] = {u: [] for u in uids}
        pods, _ = self.store.list(PODS, ns)
        for p in pods:
            if p["metadata"].get("deletionTimestamp"):
                continue
            for ref in p["metadata"].get("ownerReferences") or []:
                if ref.get("uid") in uids and ref.get("controller"):
                    out[ref["uid"]].append(p)
        return out

    def _pods_of(self, ns: str, uid: str, include_terminating: bool = False) -> list[Obj]:
        items, _ = self.store.list(PODS, ns, lambda p: _owned_by(p, uid) and (
            include_terminating or not p["metadata"].get("deletionTimestamp")))
        return items

    def _create_rs(self, d: Obj, tmpl: Obj, h: str, replicas: int, revision: int) -> Obj:
        meta = d["metadata"]
        labels = dict((tmpl.get("metadata") or {}).get("labels") or {}, **{"pod-template-hash": h})
        tmpl = clone(tmpl)
        tmpl.setdefault("metadata", {})["labels"] = labels
        selector = clone(d["spec"]["selector"])
        selector.setdefault("matchLabels", {})["pod-template-hash"] = h
        strategy = d["spec"].get("strategy") or {}
        surge = _int_or_percent((strategy.get("rollingUpdate") or {}).get("maxSurge", 0), d["spec"]["replicas"], True)
        rs = {"apiVersion": "apps/v1", "kind": "ReplicaSet",
              "metadata": {"name": f"{meta['name']}-{h}", "namespace": meta["namespace"], "labels": labels,
                           "annotations": {"deployment.kubernetes.io/desired-replicas": str(d["spec"]["replicas"]),
                                           "deployment.kubernetes.io/max-replicas": str(d["spec"]["replicas"] + surge),
                                           "deployment.kubernetes.io/revision": str(revision)},
                           "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": meta["name"],
                                                "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}]},
              "spec": {"replicas": replicas, "selector": selector, "template": tmpl,
                       **({"minReadySeconds": d["spec"]["minReadySeconds"]} if d["spec"].get("minReadySeconds")
                          else {})}}
        for k, v in (meta.get("annotations") or {}).items():
            if k != "kubectl.kubernetes.io/last-applied-configuration" and not k.startswith("deployment.kubernetes.io/"):
                rs["metadata"]["annotations"].setdefault(k, v)
        try:
            return self.cluster.api.create(RSS, meta["namespace"], rs)
        except HttpError as err:
            if err.status == 409:
                live = self.store.get(RSS, meta["namespace"], rs["metadata"]["name"])
                if live is not None:
                    return live
            raise

    def _annotate_rs(self, rs: Obj, revision: int, replicas: int, surge: int) -> None:
        def fn(r: Obj) -> Obj:
            ann = r["metadata"].setdefault("annotations", {})
            ann["deployment.kubernetes.io/revision"] = str(revision)
            ann["deployment.kubernetes.io/desired-replicas"] = str(replicas)
            ann["deployment.kubernetes.io/max-replicas"] = str(replicas + surge)
            return r

        self.store.mutate(RSS, rs["metadata"]["namespace"], rs["metadata"]["name"], fn)

    def _scale_rs(self, d: Obj, rs: Obj, replicas: int) -> None:
        before = int(rs["spec"].get("replicas", 0))
        if before == replicas:
            return

        def fn(r: Obj) -> Obj:
            r["spec"]["replicas"] = replicas
            r["metadata"]["generation"] = int(r["metadata"].get("generation", 1)) + 1
            ann = r["metadata"].setdefault("annotations", {})
            ann["deployment.kubernetes.io/desired-replicas"] = str(d["spec"]["replicas"])
            return r

        self.store.mutate(RSS, rs["metadata"]["namespace"], rs["metadata"]["name"], fn)
        verb = "up" if replicas > before else "down"
        self.event(d, "Normal", "ScalingReplicaSet", f"Scaled {verb} replica set {rs['metadata']['name']} "
                   f"to {replicas} from {before}", component="deployment-controller")

    def _cleanup_history(self, d: Obj, olds: list[Obj]) -> None:
        limit = int(d["spec"].get("revisionHistoryLimit", 10))
        idle = [r for r in olds if int(r["spec"].get("replicas", 0)) == 0
                and int((r.get("status") or {}).get("replicas", 0)) == 0]
        idle.sort(key=lambda r: int((r["metadata"].get("annotations") or {}).get(
            "deployment.kubernetes.io/revision", 0)))
        for r in idle[:max(0, len(idle) - limit)]:
            if not self._pods_of(r["metadata"]["namespace"], r["metadata"]["uid"], include_terminating=True):
                with contextlib.suppress(HttpError):
                    self.store.delete(RSS, r["metadata"]["namespace"], r["metadata"]["name"])

    def _deployment_status(self, d: Obj, new_rs: Obj, created_new: bool, surge: int, unavailable: int) -> None:
        ns, name = d["metadata"]["namespace"], d["metadata"]["name"]
        replicas = int(d["spec"].get("replicas", 1))
        rss = self._owned(RSS, ns, d["metadata"]["uid"])
        pods = self._owned_pods_by_rs(ns, rss)
        all_pods = [p for ps in pods.values() for p in ps]
        new_uid = new_rs["metadata"]["uid"]
        updated = len(pods.get(new_uid, []))
        ready = sum(1 for p in all_pods if is_ready(p))
        spec_total = sum(int(r["spec"].get("replicas", 0)) for r in rss)
        complete = (updated == replicas and ready == replicas and len(all_pods) == replicas
                    and ready >= replicas and all(int(r["spec"].get("replicas", 0)) == 0 for r in rss
                                                  if r["metadata"]["uid"] != new_uid))
        rs_name = new_rs["metadata"]["name"]
        key = (ns, name)
        signature = (rs_name, updated, ready, len(all_pods), replicas)
        now_m = time.monotonic()
        prev = self._progress.get(key)
        progressed = prev is None or prev[0] != signature
        if progressed:
            self._progress[key] = (signature, now_m)
        last_progress = self._progress[key][1]
        deadline = d["spec"].get("progressDeadlineSeconds")
        timed_out = (not complete and deadline is not None
                     and now_m - last_progress >= self.clock.scaled(float(deadline)))
        if progressed and not complete and deadline is not None:
            self.after(float(deadline) + 0.001, ("deploy", ns, name))
        min_available = replicas - unavailable
        available_ok = ready >= min_available

        new_revision = (new_rs["metadata"].get("annotations") or {}).get("deployment.kubernetes.io/revision")

        def fn(obj: Obj) -> Obj:
            st = obj.setdefault("status", {})
            before = clone(st)
            # The deployment controller mirrors the new ReplicaSet's revision onto the Deployment
            # (deployment_util.SetDeploymentRevision); `kubectl rollout status/history` read it.
            ann = obj["metadata"].setdefault("annotations", {})
            revision_changed = bool(new_revision) and ann.get("deployment.kubernetes.io/revision") != new_revision
            if revision_changed:
                ann["deployment.kubernetes.io/revision"] = new_revision
            st["observedGeneration"] = obj["metadata"].get("generation", 1)
            for k, v in (("replicas", len(all_pods)), ("updatedReplicas", updated), ("readyReplicas", ready),
                         ("availableReplicas", ready),
                         ("unavailableReplicas", max(0, spec_total - ready))):
                if v:
                    st[k] = v
                else:
                    st.pop(k, None)
            now = now_rfc3339()
            conds = st.get("conditions") or []
            conds = _set_condition(conds, "Available", "True" if available_ok else "False",
                                   "MinimumReplicasAvailable" if available_ok else "MinimumReplicasUnavailable",
                                   "Deployment has minimum availability." if available_ok else
                                   "Deployment does not have minimum availability.", now, probe=False,
                                   update_time=True)
            prog = next((c for c in conds if c.get("type") == "Progressing"), None)
            if complete:
                if not prog or prog.get("reason") != "NewReplicaSetAvailable":
                    conds = _set_condition(conds, "Progressing", "True", "NewReplicaSetAvailable",
                                           f'ReplicaSet "{rs_name}" has successfully progressed.', now, probe=False,
                                           update_time=True)
            elif timed_out:
                conds = _set_condition(conds, "Progressing", "False", "ProgressDeadlineExceeded",
                                       f'ReplicaSet "{rs_name}" has timed out progressing.', now, probe=False,
                                       update_time=True)
            elif created_new:
                conds = _set_condition(conds, "Progressing", "True", "NewReplicaSetCreated",
                                       f'Created new replica set "{rs_name}"', now, probe=False, update_time=True)
            elif progressed or not prog or prog.get("reason") == "NewReplicaSetAvailable":
                conds = _set_condition(conds, "Progressing", "True", "ReplicaSetUpdated",
                                       f'ReplicaSet "{rs_name}" is progressing.', now, probe=False, update_time=True)
                for c in conds:
                    if c["type"] == "Progressing":
                        c["lastUpdateTime"] = now
            # Available first, then Progressing: the order kubectl describe shows
            conds.sort(key=lambda c: {"Available": 0, "Progressing": 1}.get(c.get("type"), 2))
            st["conditions"] = conds
            if st == before and not revision_changed:
                return None  # type: ignore[return-value]
            return obj

        self.store.mutate(DEPLOYS, ns, name, fn)
        if timed_out and (prev is None or prev[0] == signature):
            self.event(d, "Warning", "ProgressDeadlineExceeded", f'ReplicaSet "{rs_name}" has timed out progressing.',
                       component="deployment-controller")

    # ---- replica sets -----------------------------------------------------------------------
    def sync_replicaset(self, ns: str, name: str) -> None:
        rs = self.store.get(RSS, ns, name)
        if rs is None:
            return
        uid = rs["metadata"]["uid"]
        pods = self._pods_of(ns, uid)
        want = int(rs["spec"].get("replicas", 1))
        diff = want - len(pods)
        if diff > 0 and not rs["metadata"].get("deletionTimestamp"):
            for _ in range(diff):
                pod = self._pod_from_template(rs)
                try:
                    created = self.cluster.api.create(PODS, ns, pod)
                except HttpError as err:
                    self.event(rs, "Warning", "FailedCreate", f"Error creating: {err.message}",
                               component="replicaset-controller")
                    break
                pods.append(created)
                self.event(rs, "Normal", "SuccessfulCreate", f"Created pod: {created['metadata']['name']}",
                           component="replicaset-controller")
        elif diff < 0:
            def rank(p: Obj) -> tuple[Any, ...]:
                return (bool((p.get("spec") or {}).get("nodeName")), is_ready(p),
                        -sum(int(c.get("restartCount", 0)) for c in (p.get("status") or {}).get("containerStatuses")
                             or []),
                        [-ord(ch) for ch in p["metadata"].get("creationTimestamp", "")])

            victims = sorted(pods, key=rank)[:-diff]
            for p in victims:
                with contextlib.suppress(HttpError):
                    self.delete_pod(ns, p["metadata"]["name"])
                self.event(rs, "Normal", "SuccessfulDelete", f"Deleted pod: {p['metadata']['name']}",
                           component="replicaset-controller")
            names = {v["metadata"]["name"] for v in victims}
            pods = [p for p in pods if p["metadata"]["name"] not in names]
        ready = sum(1 for p in pods if is_ready(p))
        labels = rs["spec"].get("template", {}).get("metadata", {}).get("labels") or {}

        def fn(obj: Obj) -> Obj | None:
            st = {"replicas": len(pods), "observedGeneration": obj["metadata"].get("generation", 1)}
            labeled = sum(1 for p in pods if all((p["metadata"].get("labels") or {}).get(k) == v
                                                  for k, v in labels.items()))
            if labeled:
                st["fullyLabeledReplicas"] = labeled
            if ready:
                st["readyReplicas"] = ready
                st["availableReplicas"] = ready
            if obj.get("status") == st:
                return None
            obj["status"] = st
            return obj

        self.store.mutate(RSS, ns, name, fn)

    def _pod_from_template(self, rs: Obj) -> Obj:
        tmpl = clone(rs["spec"]["template"])
        meta = tmpl.get("metadata") or {}
        rsm = rs["metadata"]
        pod_meta: Obj = {"generateName": f"{rsm['name']}-", "namespace": rsm["namespace"],
                         "labels": meta.get("labels") or {},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rsm["name"],
                                              "uid": rsm["uid"], "controller": True, "blockOwnerDeletion": True}]}
        if meta.get("annotations"):
            pod_meta["annotations"] = meta["annotations"]
        return {"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta, "spec": tmpl.get("spec") or {}}

    # ---- scheduler --------------------------------------------------------------------------
    @staticmethod
    def _selector_ok(pod: Obj, node: Obj) -> bool:
        labels = node["metadata"].get("labels") or {}
        spec = pod.get("spec") or {}
        for k, v in (spec.get("nodeSelector") or {}).items():
            if labels.get(k) != v:
                return False
        req = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
               .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
        terms = req.get("nodeSelectorTerms") or []
        if not terms:
            return True
        for term in terms:
            ok = True
            for expr in term.get("matchExpressions") or []:
                key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
                val = labels.get(key)
                if op == "In":
                    ok = val in values
                elif op == "NotIn":
                    ok = val not in values
                elif op == "Exists":
                    ok = key in labels
                elif op == "DoesNotExist":
                    ok = key not in labels
                elif op in ("Gt", "Lt"):
                    try:
                        ok = (int(val) > int(values[0])) if op == "Gt" else (int(val) < int(values[0]))
                    except (TypeError, ValueError, IndexError):
                        ok = False
                if not ok:
                    break
            for expr in term.get("matchFields") or []:
                if expr.get("key") == "metadata.name":
                    inside = node["metadata"]["name"] in (expr.get("values") or [])
                    ok = ok and (inside if expr.get("operator") == "In" else not inside)
            if ok:
                return True
        return False

    @staticmethod
    def _untolerated(pod: Obj, node: Obj) -> Obj | None:
        tolerations = (pod.get("spec") or {}).get("tolerations") or []
        for taint in (node.get("spec") or {}).get("taints") or []:
            if taint.get("effect") not in ("NoSchedule", "NoExecute"):
                continue
            tolerated = False
            for tol in tolerations:
                if tol.get("effect") and tol.get("effect") != taint.get("effect"):
                    continue
                op = tol.get("operator", "Equal")
                any_key = not tol.get("key") and op == "Exists"
                same = tol.get("key") == taint.get("key") and (
                    op == "Exists" or tol.get("value", "") == taint.get("value", ""))
                tolerated = any_key or same
                if tolerated:
                    break
            if not tolerated:
                return taint
        return None

    def schedule(self) -> None:
        nodes, _ = self.store.list(NODES)
        pods, _ = self.store.list(PODS)
        used: dict[str, dict[str, float]] = {n["metadata"]["name"]: {"gpu": 0.0, "cpu": 0.0, "memory": 0.0,
                                                                      "pods": 0.0} for n in nodes}
        pending = []
        for p in pods:
            node = (p.get("spec") or {}).get("nodeName")
            if node:
                if node in used and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                    u = used[node]
                    u["gpu"] += _gpus(p)
                    u["cpu"] += _requests(p, "cpu")
                    u["memory"] += _requests(p, "memory")
                    u["pods"] += 1
            elif not p["metadata"].get("deletionTimestamp"):
                pending.append(p)
        self._track_idle(nodes, used)
        pending.sort(key=lambda p: (p["metadata"].get("creationTimestamp", ""), p["metadata"]["name"]))
        schedulable = [n for n in nodes if not (n.get("spec") or {}).get("unschedulable") and any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in (n.get("status") or {}).get("conditions")
            or [])]
        for pod in pending:
            gpu, cpu, mem = _gpus(pod), _requests(pod, "cpu"), _requests(pod, "memory")
            volumes = self.cluster.storage.blocked(pod) if hasattr(self.cluster, "storage") else None
            if volumes:  # the VolumeBinding plugin: no node fits a pod whose claims cannot bind
                self._unschedulable(pod, f"0/{len(nodes)} nodes are available: {volumes}.")
                continue
            reasons: Counter[str] = Counter()
            fits = []
            for n in schedulable:
                nname = n["metadata"]["name"]
                alloc = (n.get("status") or {}).get("allocatable") or (n.get("status") or {}).get("capacity") or {}
                if not self._selector_ok(pod, n):
                    reasons["node(s) didn't match Pod's node affinity/selector"] += 1
                    continue
                taint = self._untolerated(pod, n)
                if taint is not None:
                    reasons[f"node(s) had untolerated taint {{{taint.get('key')}: {taint.get('value', '')}}}"] += 1
                    continue
                u = used[nname]
                short = False
                if gpu and (parse_quantity(alloc.get(GPU, 0)) or 0) - u["gpu"] < gpu:
                    reasons[f"Insufficient {GPU}"] += 1
                    short = True
                if cpu and "cpu" in alloc and (parse_quantity(alloc["cpu"]) or 0) - u["cpu"] < cpu:
                    reasons["Insufficient cpu"] += 1
                    short = True
                if mem and "memory" in alloc and (parse_quantity(alloc["memory"]) or 0) - u["memory"] < mem:
                    reasons["Insufficient memory"] += 1
                    short = True
                if "pods" in alloc and (parse_quantity(alloc["pods"]) or 0) - u["pods"] < 1:
                    reasons["Too many pods"] += 1
                    short = True
                if not short:
                    free = (parse_quantity(alloc.get(GPU, 0)) or 0) - u["gpu"]
                    fits.append((-(free - gpu), u["pods"], nname, n))
            if fits:
                fits.sort(key=lambda f: (f[0], f[1], f[2]))
                node = fits[0][3]
                nname = node["metadata"]["name"]
                u = used[nname]
                u["gpu"] += gpu
                u["cpu"] += cpu
                u["memory"] += mem
                u["pods"] += 1
                self._idle_since.pop(nname, None)
                if hasattr(self.cluster, "storage") and not self.cluster.storage.bind_for(pod):
                    continue  # PreBind: its WaitForFirstConsumer volumes are still being provisioned
                self.bind(pod, node)
            else:
                if not nodes:
                    message = "no nodes available to schedule pods"
                else:
                    detail = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
                    message = f"0/{len(nodes)} nodes are available: {detail}."
                    if len(schedulable) < len(nodes):
                        message = (f"0/{len(nodes)} nodes are available: "
                                   + ", ".join(filter(None, [detail, f"{len(nodes) - len(schedulable)} node(s) were "
                                                             "unschedulable"])) + ".")
                self._unschedulable(pod, message)
                self._maybe_autopilot(pod, gpu)

    def _unschedulable(self, pod: Obj, message: str) -> None:
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        changed = []

        def fn(p: Obj) -> Obj | None:
            if (p.get("spec") or {}).get("nodeName"):
                return None
            conds = (p.get("status") or {}).get("conditions") or []
            cur = next((c for c in conds if c.get("type") == "PodScheduled"), {})
            if cur.get("status") == "False" and cur.get("message") == message:
                return None
            p["status"]["conditions"] = _set_condition(conds, "PodScheduled", "False", "Unschedulable", message)
            changed.append(True)
            return p

        out = self.store.mutate(PODS, ns, name, fn)
        if changed and out is not None:
            self.event(out, "Warning", "FailedScheduling", message, component="default-scheduler")

    def _next_ip(self) -> str:
        self._ip += 1
        n = self._ip
        return f"10.{8 + (n >> 16) % 240}.{(n >> 8) & 255}.{n & 255}"

    def bind(self, pod: Obj, node: Obj) -> None:
        ns, name, uid = pod["metadata"]["namespace"], pod["metadata"]["name"], pod["metadata"]["uid"]
        nname = node["metadata"]["name"]
        host_ip = next((a["address"] for a in (node.get("status") or {}).get("addresses") or []
                        if a.get("type") == "InternalIP"), "10.128.0.2")
        pod_ip = self._next_ip()
        now = now_rfc3339()

        def fn(p: Obj) -> Obj | None:
            if p["metadata"]["uid"] != uid or (p.get("spec") or {}).get("nodeName"):
                return None
            p["spec"]["nodeName"] = nname
            st = p.setdefault("status", {})
            conds = st.get("conditions") or []
            conds = _set_condition(conds, "PodReadyToStartContainers", "True", now=now)
            conds = _set_condition(conds, "Initialized", "True", now=now)
            conds = _set_condition(conds, "Ready", "False", "ContainersNotReady",
                                   f"containers with unready status: [{self._names(p)}]", now)
            conds = _set_condition(conds, "ContainersReady", "False", "ContainersNotReady",
                                   f"containers with unready status: [{self._names(p)}]", now)
            conds = _set_condition(conds, "PodScheduled", "True", now=now)
            st["conditions"] = conds
            st.update(phase="Pending", hostIP=host_ip, hostIPs=[{"ip": host_ip}], podIP=pod_ip,
                      podIPs=[{"ip": pod_ip}], startTime=now)
            st["containerStatuses"] = [self._cstatus(c, {"waiting": {"reason": "ContainerCreating"}})
                                       for c in p["spec"]["containers"]]
            return p

        out = self.store.mutate(PODS, ns, name, fn)
        if out is None or out["spec"].get("nodeName") != nname:
            return
        self.event(out, "Normal", "Scheduled", f"Successfully assigned {ns}/{name} to {nname}",
                   component="default-scheduler")
        self.begin_pull(out)

    @staticmethod
    def _names(p: Obj) -> str:
        return " ".join(c.get("name", "") for c in (p.get("spec") or {}).get("containers") or [])

    @staticmethod
    def _cstatus(c: Obj, state: Obj, *, ready: bool = False, restarts: int = 0, last: Obj | None = None,
                 started: bool | None = None, container_id: str = "") -> Obj:
        image = c.get("image", "")
        out: Obj = {"name": c.get("name"), "state": state, "lastState": last or {}, "ready": ready,
                    "restartCount": restarts, "image": image, "imageID": "",
                    "started": bool(started) if started is not None else False}
        if container_id:
            out["containerID"] = container_id
            repo = image.split("@")[0].rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
            out["imageID"] = f"{repo}@sha256:{hashlib.sha256(image.encode()).hexdigest()}"
        return out

    # ---- kubelet ----------------------------------------------------------------------------
    def _behavior(self, pod: Obj) -> str:
        runtime = self.cluster.runtime
        fn = getattr(runtime, "behavior_for", None)
        if fn is None:
            return ""
        try:
            b = fn(pod)
        except Exception:
            return ""
        mode = getattr(b, "mode", None)
        if mode is None and isinstance(b, dict):
            mode = b.get("mode")
        return str(mode or "")

    def begin_pull(self, pod: Obj) -> None:
        image = pod["spec"]["containers"][0].get("image", "")
        self.event(pod, "Normal", "Pulling", f'Pulling image "{image}"', host=pod["spec"]["nodeName"])
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"], pod["metadata"]["uid"])
        if self._behavior(pod) == "image_pull_error":
            self.after(IMAGE_PULL_FAIL_AFTER, ("pull-failed", *key, 0))
        else:
            self.after(DEFAULT_DELAYS["image_pull"], ("start", *key, True))

    def pull_failed(self, ns: str, name: str, uid: str, attempt: int) -> None:
        pod = self.store.get(PODS, ns, name)
        if pod is None or pod["metadata"]["uid"] != uid or pod["metadata"].get("deletionTimestamp"):
            return
        image = pod["spec"]["containers"][0].get("image", "")
        if attempt and attempt % 2 == 0:  # the kubelet pulls again after the back-off
            self.event(pod, "Normal", "Pulling", f'Pulling image "{image}"', host=pod["spec"].get("nodeName", ""))
            if self._behavior(pod) != "image_pull_error":  # a counted fault ran out: this pull works
                self.after(DEFAULT_DELAYS["image_pull"], ("start", ns, name, uid, True))
                return
        repo = image.split(":")[0]
        err = (f'failed to pull and unpack image "{image}": failed to resolve reference "{image}": '
               f"{repo}: not found")
        reason = "ErrImagePull" if attempt % 2 == 0 else "ImagePullBackOff"
        message = err if reason == "ErrImagePull" else f'Back-off pulling image "{image}"'

        def fn(p: Obj) -> Obj | None:
            if p["metadata"]["uid"] != uid:
                return None
            p["status"]["containerStatuses"] = [
                self._cstatus(c, {"waiting": {"reason": reason, "message": message}}) for c in p["spec"]["containers"]]
            return p

        out = self.store.mutate(PODS, ns, name, fn)
        if out is None:
            return
        host = pod["spec"].get("nodeName", "")
        if reason == "ErrImagePull":
            self.event(out, "Warning", "Failed", f'Failed to pull image "{image}": {err}', host=host)
            self.event(out, "Warning", "Failed", "Error: ErrImagePull", host=host)
            self.after(10.0, ("pull-failed", ns, name, uid, attempt + 1))
        else:
            self.event(out, "Normal", "BackOff", f'Back-off pulling image "{image}"', host=host)
            self.event(out, "Warning", "Failed", "Error: ImagePullBackOff", host=host)
            backoff = min(CRASH_BACKOFF[1], CRASH_BACKOFF[0] * 2 ** (attempt // 2))
            self.after(backoff, ("pull-failed", ns, name, uid, attempt + 1))

    def _run_for(self, pod: Obj) -> PodRun:
        uid = pod["metadata"]["uid"]
        with self.runs_lock:
            run = self.runs.get(uid)
            if run is None:
                run = self.runs[uid] = PodRun(uid, pod["metadata"]["namespace"], pod["metadata"]["name"])
            return run

    def start_container(self, ns: str, name: str, uid: str, first: bool) -> None:
        pod = self.store.get(PODS, ns, name)
        if pod is None or pod["metadata"]["uid"] != uid or pod["metadata"].get("deletionTimestamp"):
            return
        if self._stop.is_set():
            return
        run = self._run_for(pod)
        host = pod["spec"].get("nodeName", "")
        cname = self._main_container(pod)
        if first:
            image = pod["spec"]["containers"][0].get("image", "")
            secs = DEFAULT_DELAYS["image_pull"]
            self.event(pod, "Normal", "Pulled", f'Successfully pulled image "{image}" in {secs:.0f}s '
                       f"({secs:.0f}s including waiting)", host=host)
        self.event(pod, "Normal", "Created", f"Created container {cname}", host=host)
        with run.lock:
            if run.stopped:
                return
            run.gen += 1
            gen = run.gen
            run.ready = False
            run.started_at = now_rfc3339()
            run.container_id = "containerd://" + rand_hex(64)
            run.server = None
            run.plain = False
            runtime = self.cluster.runtime
            try:
                if runtime is None:
                    raise RuntimeError("no model runtime configured")
                start = localproc.starter(self.cluster, pod) or runtime.start  # local images: a subprocess
                server = start(pod, on_ready=lambda: self.on_ready(uid, gen),
                                       on_exit=lambda code=1, reason="Error": self.on_exit(uid, gen, code, reason))
            except Exception as exc:  # an image the runtime does not serve: a plain running container
                server = None
                run.plain = True
                run.last_logs = [f"sandbox: no model server for image {pod['spec']['containers'][0].get('image')}: "
                                 f"{exc}"]
            if run.gen != gen or run.stopped:
                if server is not None:
                    self._executor.submit(self._stop_server, server)
                return
            run.server = server
            if run.plain or (server is not None and getattr(server, "ready", False)):
                run.ready = True
            self._write_running(run, pod)
        self.event(pod, "Normal", "Started", f"Started container {cname}", host=host)

    def _write_running(self, run: PodRun, pod: Obj) -> None:
        """Container running (and Ready if the server already is); caller holds run.lock."""
        port = getattr(run.server, "port", None) if run.server is not None else None
        ready, restarts, started_at, cid = run.ready, run.restarts, run.started_at, run.container_id
        last = self._last_state(run)

        def fn(p: Obj) -> Obj | None:
            if p["metadata"]["uid"] != run.uid:
                return None
            if port is not None:
                p["metadata"].setdefault("annotations", {})[PORT_ANNOTATION] = str(port)
            st = p["status"]
            st["phase"] = "Running"
            st["containerStatuses"] = [
                self._cstatus(c, {"running": {"startedAt": started_at}}, ready=ready, restarts=restarts, last=last,
                              started=True, container_id=cid) for c in p["spec"]["containers"]]
            self._ready_conditions(p, ready)
            return p

        self.store.mutate(PODS, run.namespace, run.name, fn)

    def _last_state(self, run: PodRun) -> Obj:
        return run.last_terminated

    def _ready_conditions(self, p: Obj, ready: bool) -> None:
        now = now_rfc3339()
        conds = p["status"].get("conditions") or []
        if ready:
            conds = _set_condition(conds, "Ready", "True", now=now)
            conds = _set_condition(conds, "ContainersReady", "True", now=now)
        else:
            msg = f"containers with unready status: [{self._names(p)}]"
            conds = _set_condition(conds, "Ready", "False", "ContainersNotReady", msg, now)
            conds = _set_condition(conds, "ContainersReady", "False", "ContainersNotReady", msg, now)
        order = {"PodReadyToStartContainers": 0, "Initialized": 1, "Ready": 2, "ContainersReady": 3,
                 "PodScheduled": 4}
        conds.sort(key=lambda c: order.get(c.get("type"), 9))
        p["status"]["conditions"] = conds

    def on_ready(self, uid: str, gen: int) -> None:
        with self.runs_lock:
            run = self.runs.get(uid)
        if run is None:
            return
        with run.lock:
            if run.gen != gen or run.stopped:
                return
            run.ready = True
            if run.server is None and not run.plain:
                return  # start() has not returned yet: it writes the Ready state itself
            pod = self.store.get(PODS, run.namespace, run.name)
            if pod is None or pod["metadata"]["uid"] != uid:
                return
            self._write_running(run, pod)

    def on_exit(self, uid: str, gen: int, code: int = 1, reason: str = "Error") -> None:
        with self.runs_lock:
            run = self.runs.get(uid)
        if run is None:
            return
        with run.lock:
            if run.gen != gen or run.stopped:
                return
            run.gen += 1  # later callbacks of this run are stale
            server, run.server = run.server, None
            if server is not None:
                with contextlib.suppress(Exception):
                    run.last_logs = list(server.logs())
                self._executor.submit(self._stop_server, server)
            run.prev_logs = list(run.last_logs)
            run.ready = False
            finished = now_rfc3339()
            run.last_terminated = {"terminated": {
                "exitCode": int(code), "reason": reason or "Error", "startedAt": run.started_at,
                "finishedAt": finished, "containerID": run.container_id}}
            run.restarts += 1
            restarts = run.restarts
            backoff = min(CRASH_BACKOFF[1], CRASH_BACKOFF[0] * 2 ** (restarts - 1))
            last = run.last_terminated
            pod_name = run.name

            def fn(p: Obj) -> Obj | None:
                if p["metadata"]["uid"] != uid:
                    return None
                cname = self._main_container(p)
                waiting = {"waiting": {"reason": "CrashLoopBackOff", "message":
                                       f"back-off {human_backoff(backoff)} restarting failed container={cname} "
                                       f"pod={pod_name}_{p['metadata']['namespace']}({uid})"}}
                p["status"]["containerStatuses"] = [
                    self._cstatus(c, waiting, restarts=restarts, last=last, started=False,
                                  container_id=run.container_id) for c in p["spec"]["containers"]]
                self._ready_conditions(p, False)
                return p

            out = self.store.mutate(PODS, run.namespace, run.name, fn)
        if out is None:
            return
        host = out["spec"].get("nodeName", "")
        cname = self._main_container(out)
        self.event(out, "Warning", "BackOff", f"Back-off restarting failed container {cname} in pod "
                   f"{run.name}_{run.namespace}({uid})", host=host)
        self.after(backoff, ("start", run.namespace, run.name, uid, False))

    @staticmethod
    def _stop_server(server: Any) -> None:
        with contextlib.suppress(Exception):
            server.stop()

    def delete_pod(self, ns: str, name: str, grace: int | None = None) -> Obj:
        """API delete of a pod: graceful (Terminating, server stopped, then gone) when it runs on a node."""
        pod = self.store.get(PODS, ns, name)
        if pod is None:
            raise not_found(PODS, name)
        if grace is None:
            grace = int((pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30))
        if pod["metadata"].get("deletionTimestamp") and grace > 0:
            return pod
        if not (pod.get("spec") or {}).get("nodeName") or grace <= 0 or self._stop.is_set():
            self._release(self._halt(pod["metadata"]["uid"]))
            try:
                return self.store.delete(PODS, ns, name)
            except HttpError:
                return pod

        def mark(p: Obj) -> Obj | None:
            if p["metadata"].get("deletionTimestamp"):
                return None
            p["metadata"]["deletionTimestamp"] = now_rfc3339()
            p["metadata"]["deletionGracePeriodSeconds"] = grace
            return p

        out = self.store.mutate(PODS, ns, name, mark)
        if out is None:
            raise not_found(PODS, name)
        return out

    def _halt(self, uid: str) -> Any:
        with self.runs_lock:
            run = self.runs.get(uid)
        if run is None:
            return None
        with run.lock:
            run.stopped = True
            run.gen += 1
            server, run.server = run.server, None
            run.ready = False
        return server

    def terminate(self, ns: str, name: str, uid: str) -> None:
        """A pod marked for deletion: stop its server (off the controller thread), then remove it."""
        server = self._halt(uid)
        pod = self.store.get(PODS, ns, name)
        if pod is not None and pod["metadata"]["uid"] == uid:
            host = (pod.get("spec") or {}).get("nodeName", "")
            self.event(pod, "Normal", "Killing", f"Stopping container {self._main_container(pod)}", host=host)

        def finish() -> None:
            if server is not None:
                self._stop_server(server)
            cur = self.store.get(PODS, ns, name)
            if cur is not None and cur["metadata"]["uid"] == uid:
                with contextlib.suppress(HttpError):
                    self.store.delete(PODS, ns, name)

        try:
            self._executor.submit(finish)
        except RuntimeError:
            finish()

    def forget_pod(self, uid: str) -> None:
        server = self._halt(uid)
        with self.runs_lock:
            self.runs.pop(uid, None)
        self._autopilot_pending.pop(uid, None)
        self._release(server)

    def _release(self, server: Any) -> None:
        """Stop a model server off the calling thread (shutting an HTTP server down takes a poll)."""
        if server is None:
            return
        try:
            self._executor.submit(self._stop_server, server)
        except RuntimeError:
            self._stop_server(server)

    # ---- logs -------------------------------------------------------------------------------
    def pod_logs(self, ns: str, name: str, container: str | None, previous: bool) -> list[str]:
        pod = self.store.get(PODS, ns, name)
        if pod is None:
            raise not_found(PODS, name)
        containers = [c.get("name") for c in pod["spec"].get("containers") or []]
        cname = container or (containers[0] if containers else "")
        if container and container not in containers:
            raise status_error(400, "BadRequest", f"container {container} is not valid for pod {name}")
        if len(containers) > 1 and not container:
            raise status_error(400, "BadRequest", f"a container name must be specified for pod {name}, choose one "
                               f"of: [{' '.join(containers)}]")
        with self.runs_lock:
            run = self.runs.get(pod["metadata"]["uid"])
        main = cname == containers[0]
        if previous:
            if run is None or run.prev_logs is None or not main:
                raise status_error(400, "BadRequest", f'previous terminated container "{cname}" in pod "{name}" '
                                   "not found")
            return list(run.prev_logs)
        if run is None or (run.server is None and not run.plain and run.prev_logs is None):
            cs = ((pod.get("status") or {}).get("containerStatuses") or [{}])[0]
            waiting = ((cs.get("state") or {}).get("waiting") or {}).get("reason", "ContainerCreating")
            if waiting in ("ErrImagePull", "ImagePullBackOff"):
                waiting = "trying and failing to pull image"
            raise status_error(400, "BadRequest", f'container "{cname}" in pod "{name}" is waiting to start: '
                               f"{waiting}")
        if not main:
            return []
        return run.logs()

    def serve_logs(self, h: Any, ns: str, name: str) -> None:
        container = h.q("container")
        previous = (h.q("previous") or "").lower() in ("1", "true")
        lines = self.pod_logs(ns, name, container, previous)
        tail = h.q("tailLines")
        stamps = (h.q("timestamps") or "").lower() in ("1", "true")
        if tail is not None:
            with contextlib.suppress(ValueError):
                n = int(tail)
                lines = lines[-n:] if n > 0 else []

        def fmt(ls: list[str]) -> str:
            if stamps:
                now = time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())
                return "".join(f"{now} {ln}\n" for ln in ls)
            return "".join(f"{ln}\n" for ln in ls)

        text = fmt(lines)
        limit = h.q("limitBytes")
        if limit:
            with contextlib.suppress(ValueError):
                text = text.encode()[: int(limit)].decode(errors="ignore")
        follow = (h.q("follow") or "").lower() in ("1", "true")
        if not follow or previous:
            h.send_text(200, text)
            return
        self._follow_logs(h, ns, name, text, len(self.pod_logs(ns, name, container, False)), container, fmt)

    def _follow_logs(self, h: Any, ns: str, name: str, first: str, seen: int, container: str | None,
                     fmt: Any) -> None:
        from sandbox.kube.api import _client_gone

        h.start_chunked(200, "text/plain; charset=utf-8")
        try:
            h.write_chunk(first)
            pod = self.store.get(PODS, ns, name)
            uid = pod["metadata"]["uid"] if pod else ""
            with self.runs_lock:
                run = self.runs.get(uid)
            gen = run.gen if run else 0
            while not self._stop.is_set():
                time.sleep(0.1)  # log lines have no change events: poll the server's buffer
                cur = self.store.get(PODS, ns, name)
                if cur is None or cur["metadata"]["uid"] != uid or _client_gone(h):
                    break
                if run is None or run.gen != gen:
                    break
                lines = run.logs()
                if len(lines) > seen:
                    h.write_chunk(fmt(lines[seen:]))
                    seen = len(lines)
            h.end_chunked()
        except OSError:
            h.close_connection = True

    # ---- endpoints --------------------------------------------------------------------------
    def sync_endpoints(self, ns: str, name: str) -> None:
        svc = self.store.get(SVCS, ns, name)
        if svc is None:
            with contextlib.suppress(HttpError):
                ep = self.store.get(EPS, ns, name)
                if ep is not None and not (ep["metadata"].get("labels") or {}).get("sandbox.llm-fleet.dev/manual"):
                    self.store.delete(EPS, ns, name)
            return
        selector = (svc.get("spec") or {}).get("selector")
        if not selector:
            return
        pods, _ = self.store.list(PODS, ns, lambda p: match_selector_dict(selector, p["metadata"].get("labels"))
                                  and bool((p.get("status") or {}).get("podIP"))
                                  and not p["metadata"].get("deletionTimestamp"))
        ready_addrs, not_ready = [], []
        for p in pods:
            addr = {"ip": p["status"]["podIP"], "nodeName": p["spec"].get("nodeName"),
                    "targetRef": {"kind": "Pod", "namespace": ns, "name": p["metadata"]["name"],
                                  "uid": p["metadata"]["uid"]}}
            (ready_addrs if is_ready(p) else not_ready).append(addr)
        ports = []
        for sp in svc["spec"].get("ports") or []:
            target = sp.get("targetPort", sp.get("port"))
            number = target if isinstance(target, int) else None
            if number is None:
                for p in pods:
                    for c in p["spec"].get("containers") or []:
                        for cp in c.get("ports") or []:
                            if cp.get("name") == target:
                                number = cp.get("containerPort")
                if number is None:
                    try:
                        number = int(target)
                    except (TypeError, ValueError):
                        continue
            port = {"port": number, "protocol": sp.get("protocol", "TCP")}
            if sp.get("name"):
                port["name"] = sp["name"]
            ports.append(port)
        subsets = []
        if (ready_addrs or not_ready) and ports:
            subset: Obj = {}
            if ready_addrs:
                subset["addresses"] = sorted(ready_addrs, key=lambda a: a["ip"])
            if not_ready:
                subset["notReadyAddresses"] = sorted(not_ready, key=lambda a: a["ip"])
            subset["ports"] = ports
            subsets.append(subset)
        live = self.store.get(EPS, ns, name)
        labels = dict(svc["metadata"].get("labels") or {})
        if live is None:
            ep = {"apiVersion": "v1", "kind": "Endpoints",
                  "metadata": {"name": name, "namespace": ns, "labels": labels}}
            if subsets:
                ep["subsets"] = subsets
            with contextlib.suppress(HttpError):
                self.cluster.api.create(EPS, ns, ep)
            return

        def fn(e: Obj) -> Obj | None:
            if e.get("subsets", []) == subsets and (e["metadata"].get("labels") or {}) == labels:
                return None
            if subsets:
                e["subsets"] = subsets
            else:
                e.pop("subsets", None)
            e["metadata"]["labels"] = labels
            return e

        self.store.mutate(EPS, ns, name, fn)

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

    # ---- HPA / PDB --------------------------------------------------------------------------
    def sync_hpa(self, ns: str, name: str) -> None:
        """The HPA controller with its metrics sources lives in sandbox.kube.autoscaling."""
        from sandbox.kube.autoscaling import HpaController

        if getattr(self, "_hpa", None) is None:
            self._hpa = HpaController(self)
        self._hpa.sync(ns, name)

    def sync_pdbs(self, ns: str) -> None:
        pdbs, _ = self.store.list(PDBS, ns)
        if not pdbs:
            return
        pods, _ = self.store.list(PODS, ns, lambda p: not p["metadata"].get("deletionTimestamp"))
        for pdb in pdbs:
            spec = pdb.get("spec") or {}
            sel = spec.get("selector")
            matched = [p for p in pods if sel is not None and match_label_selector(sel, p["metadata"].get("labels"))]
            expected = len(matched)
            healthy = sum(1 for p in matched if is_ready(p))
            if "minAvailable" in spec:
                desired = _int_or_percent(spec["minAvailable"], expected, True)
            elif "maxUnavailable" in spec:
                desired = max(0, expected - _int_or_percent(spec["maxUnavailable"], expected, True))
            else:
                desired = expected
            allowed = max(0, healthy - desired)
            now = now_rfc3339()

            def fn(o: Obj, expected: int = expected, healthy: int = healthy, desired: int = desired,
                   allowed: int = allowed, now: str = now) -> Obj | None:
                old = o.get("status") or {}
                conds = _set_condition(old.get("conditions") or [], "DisruptionAllowed",
                                       "True" if allowed else "False",
                                       "SufficientPods" if allowed else "InsufficientPods", "", now, probe=False)
                st = {"currentHealthy": healthy, "desiredHealthy": desired, "disruptionsAllowed": allowed,
                      "expectedPods": expected, "observedGeneration": o["metadata"].get("generation", 1),
                      "conditions": conds}
                if old == st:
                    return None
                o["status"] = st
                return o

            self.store.mutate(PDBS, ns, pdb["metadata"]["name"], fn)

    # ---- Autopilot --------------------------------------------------------------------------
    def _maybe_autopilot(self, pod: Obj, gpu: float) -> None:
        clusters = sorted(self.cluster.autopilot_clusters)
        if not clusters:
            return
        selector = (pod.get("spec") or {}).get("nodeSelector") or {}
        accel = selector.get("cloud.google.com/gke-accelerator")
        uid = pod["metadata"]["uid"]
        # GPU pods get a GPU node; CPU-only pods a general-purpose one (Autopilot's default compute class)
        if (gpu > 0 and not accel) or (gpu <= 0 and accel) or uid in self._autopilot_pending:
            return
        cluster = clusters[0]
        node = f"gk3-{cluster}-nap-{rand_hex(4)}-{rand_hex(8)}"[:63]
        self._autopilot_pending[uid] = node
        self.event(pod, "Normal", "TriggeredScaleUp", f"pod triggered scale-up: [{{https://www.googleapis.com/"
                   f"compute/v1/projects/sandbox/zones/-/instanceGroups/{node[:-9]}-grp 0->1 (max: 1000)}}]",
                   component="cluster-autoscaler")
        self.after(DEFAULT_DELAYS["autopilot_node_provision"],
                   ("autopilot-node", pod["metadata"]["namespace"], pod["metadata"]["name"], uid, node, cluster))

    def provision_autopilot_node(self, ns: str, name: str, uid: str, node: str, cluster: str) -> None:
        pod = self.store.get(PODS, ns, name)
        if self._autopilot_pending.get(uid) != node:
            return
        self._autopilot_pending.pop(uid, None)
        if pod is None or pod["metadata"]["uid"] != uid or (pod.get("spec") or {}).get("nodeName"):
            return
        if cluster not in self.cluster.autopilot_clusters:
            return
        selector = dict((pod.get("spec") or {}).get("nodeSelector") or {})
        if _gpus(pod) <= 0 and "cloud.google.com/gke-accelerator" not in selector:
            labels = {"cloud.google.com/gke-nodepool": "nap-e2-standard-2", "cloud.google.com/machine-family": "e2",
                      "cloud.google.com/gke-provisioning": "standard", "kubernetes.io/arch": "amd64",
                      "kubernetes.io/os": "linux", "kubernetes.io/hostname": node, AUTOPILOT_LABEL: cluster, **selector}
            self.cluster.add_node(node, labels=labels, capacity={"cpu": "2", "memory": f"{8 * 1024 * 1024}Ki",
                                                                  "pods": "110", "ephemeral-storage": "100Gi"})
            self._idle_since[node] = time.monotonic()
            return
        gpus = max(1, int(_gpus(pod)))
        accel = selector.get("cloud.google.com/gke-accelerator", "nvidia-l4")
        labels = {
            "cloud.google.com/gke-nodepool": f"nap-{accel}-{gpus}",
            "cloud.google.com/gke-accelerator": accel,
            "cloud.google.com/gke-accelerator-count": str(gpus),
            "cloud.google.com/gke-gpu": "true",
            "cloud.google.com/gke-provisioning": "spot" if selector.get("cloud.google.com/gke-spot") else "standard",
            "cloud.google.com/machine-family": "g2" if "l4" in accel else "a2",
            "kubernetes.io/arch": "amd64", "kubernetes.io/os": "linux", "kubernetes.io/hostname": node,
            AUTOPILOT_LABEL: cluster,
            **selector,
        }
        # Autopilot picks a machine that fits the pod's requests (g2-standard-4 .. -32 for one L4)
        cpu = max(4 * gpus, int(_requests(pod, "cpu")) + 2)
        mem_ki = max(16 * gpus * 1024 * 1024, int(_requests(pod, "memory") / 1024 * 1.2))
        capacity = {"cpu": str(cpu), "memory": f"{mem_ki}Ki", "pods": "110",
                    "ephemeral-storage": "100Gi", GPU: str(gpus)}
        # GKE taints GPU nodes (Autopilot too): only pods that request GPUs (and so tolerate it) land there
        self.cluster.add_node(node, labels=labels, capacity=capacity,
                              taints=[{"key": GPU, "value": "present", "effect": "NoSchedule"}])
        self._idle_since[node] = time.monotonic()

    def _track_idle(self, nodes: list[Obj], used: dict[str, dict[str, float]]) -> None:
        now = time.monotonic()
        for n in nodes:
            name = n["metadata"]["name"]
            if not (n["metadata"].get("labels") or {}).get(AUTOPILOT_LABEL):
                continue
            if used[name]["pods"] > 0:
                self._idle_since.pop(name, None)
            elif name not in self._idle_since:
                self._idle_since[name] = now
                self.after(self.cluster.autopilot_idle_seconds, ("autopilot-gc",))

    def autopilot_gc(self) -> None:
        limit = self.clock.scaled(self.cluster.autopilot_idle_seconds)
        now = time.monotonic()
        nodes, _ = self.store.list(NODES, None, lambda n: bool((n["metadata"].get("labels") or {}).get(AUTOPILOT_LABEL)))
        pods, _ = self.store.list(PODS)
        busy = {(p.get("spec") or {}).get("nodeName") for p in pods}
        for n in nodes:
            name = n["metadata"]["name"]
            if name in busy:
                self._idle_since.pop(name, None)
                continue
            since = self._idle_since.setdefault(name, now)
            if now - since >= limit * 0.999:
                self._idle_since.pop(name, None)
                self.cluster.remove_node(name)
            else:
                self.after(self.cluster.autopilot_idle_seconds, ("autopilot-gc",))


def human_backoff(cloud_seconds: float) -> str:
    s = int(cloud_seconds)
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"
