"""The kubelet: pull the image, run the container (a model server), report readiness, restart, stop, logs.

Mirrors ``pkg/kubelet``: image pulls with ``ErrImagePull`` / ``ImagePullBackOff`` (``pkg/kubelet/images``),
the container restart back-off of ``kuberuntime`` (10 s doubling, capped at 5 min: ``CrashLoopBackOff``,
``lastState.terminated``, ``restartCount``), the status manager's container statuses and
``Ready`` / ``ContainersReady`` conditions, graceful termination (``deletionTimestamp``, then gone),
and log serving like the kubelet's ``/containerLogs`` (``tailLines``, ``timestamps``, ``limitBytes``,
``previous``, ``follow``), which the API server's ``pods/log`` calls directly here. Model servers are started through the
runtime (``runtime.start(pod, on_ready=..., on_exit=...)``) or, for local images, as a subprocess
(``sandbox.kube.localproc``); their callbacks update the pod directly so readiness is visible to
watchers at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from sandbox import coldstart
from sandbox.core import HttpError, now_rfc3339
from sandbox.kube import localproc
from sandbox.kube.controllers.base import ControllerBase
from sandbox.kube.controllers.common import NODES, PODS, Obj, set_condition
from sandbox.kube.store import not_found, rand_hex, status_error

if TYPE_CHECKING:
    from sandbox.kube.cluster import KubeCluster

PORT_ANNOTATION = "sandbox.llm-fleet.dev/port"
CRASH_BACKOFF = (10.0, 300.0)  # kubelet: 10 s doubling, capped at 5 min (cloud seconds)
IMAGE_PULL_FAIL_AFTER = 5.0  # cloud seconds until a bad image reports ErrImagePull
PLEG_RELIST_S = 1.0  # cloud seconds: the kubelet sees a container's exit at its next relist, then restarts it
SHUTDOWN_SECONDS = 2.0  # cloud seconds from SIGTERM to a model server's exit (at most the grace period)
# Real seconds from SIGTERM to SIGKILL at least. A request in progress at SIGTERM finishes in real time (its
# handling is not scaled), and on the suite's clock a spot pod's 15 s grace minus its preStop is ~10 ms: a
# loaded machine then cut GETs that take a millisecond on a node (as with prober.MIN_PROBE_TIMEOUT_S, machine
# load must not read as cloud time). A server that drains sooner exits sooner. 2 s: at 0.5 s a 0.3 s GET was cut
# with four pytest workers on two cores.
MIN_DRAIN_S = 2.0


def _pre_stop_seconds(pod: dict) -> float:
    """How long the main container's preStop hook keeps it up before SIGTERM: the ``sleep`` action
    (``lifecycle.preStop.sleep.seconds``) or an exec of ``sleep N`` (``["sleep", "N"]``, ``sh -c "sleep N"``);
    any other hook counts as instant."""
    containers = (pod.get("spec") or {}).get("containers") or []
    hook = ((containers[0].get("lifecycle") or {}).get("preStop") or {}) if containers else {}
    if "sleep" in hook:
        return float((hook["sleep"] or {}).get("seconds") or 0)
    cmd = " ".join(str(c) for c in ((hook.get("exec") or {}).get("command") or []))
    m = re.search(r"(?:^|\s)sleep\s+(\d+(?:\.\d+)?)", cmd)
    return float(m.group(1)) if m else 0.0
IMAGE_STREAMING_LABEL = "cloud.google.com/gke-image-streaming"  # GKE sets it on nodes with gcfsConfig
# GKE labels a node with a secondary boot disk "<this prefix><disk image>=<mode>.<project>"
START_ANNOTATION = "sandbox.llm-fleet.dev/start"  # sandbox/engines/runtime.py reads it
SECONDARY_DISK_LABEL = "cloud.google.com.node-restriction.kubernetes.io/gke-secondary-boot-disk-"


class PodRun:
    """The kubelet's view of one pod: its model server, restarts and the logs of the last crash."""

    def __init__(self, uid: str, namespace: str, name: str) -> None:
        self.uid, self.namespace, self.name = uid, namespace, name
        self.lock = threading.RLock()
        self.gen = 0
        self.server: Any = None
        self.draining: Any = None  # the server between the pod's deletion and its exit (kube-proxy may still send)
        self.ready = False
        self.restarts = 0
        self.prev_logs: list[str] | None = None
        self.last_logs: list[str] = []
        self.stopped = False
        self.started_at = ""
        self.container_id = ""
        self.plain = False  # no model server (image the runtime does not serve)
        self.last_terminated: Obj = {}
        # kuberuntime's restart back-off entry (flowcontrol.Backoff): its duration (cloud seconds, 0: none
        # yet) and when it was last advanced (cloud time)
        self.backoff = 0.0
        self.backoff_at = 0.0

    def logs(self) -> list[str]:
        if self.server is not None:
            with contextlib.suppress(Exception):
                return list(self.server.logs())
        return list(self.last_logs)


def human_backoff(cloud_seconds: float) -> str:
    s = int(cloud_seconds)
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"


class Kubelet(ControllerBase):
    """Every node's kubelet at once: ``runs`` holds one ``PodRun`` per pod uid started on a node."""

    def __init__(self, cluster: KubeCluster) -> None:
        super().__init__(cluster)
        self.runs: dict[str, PodRun] = {}
        self.runs_lock = threading.Lock()
        self._pulls: dict[str, coldstart.Pull] = {}  # pod uid -> the pull under way
        self._node_images: dict[str, set[str]] = {}  # node -> images a container of it has used
        self._streamed: set[str] = set()  # images the image-streaming backend holds (pulled once before)
        # the registry behind an image (sandbox.artifact_registry.pull): (image, cluster_project=) -> why it
        # cannot be pulled, None when it can; unset: every image resolves
        self.registry: Any = None

    def _unresolvable(self, image: str) -> str | None:
        return self.registry(image, cluster_project=self.cluster.project) if self.registry is not None else None

    def _remember_image(self, node_name: str, image: str, plan: coldstart.Pull) -> None:
        """The kubelet reports a pulled image in the node's ``status.images``; a later pod on the node finds it."""
        with self.runs_lock:
            self._node_images.setdefault(node_name, set()).add(image)
            if coldstart.is_artifact_registry(image):
                self._streamed.add(image)

        def fn(n: Obj) -> Obj | None:
            images = n.setdefault("status", {}).setdefault("images", [])
            if any(image in (i.get("names") or []) for i in images):
                return None
            images.append({"names": [image], "sizeBytes": int(plan.bytes)})
            return n

        with contextlib.suppress(Exception):
            self.store.mutate(NODES, "", node_name, fn)

    def _stop_pods(self) -> None:
        """``stop()``: every model server goes, side by side, after the pending stop work drains."""
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

    def pull_plan(self, pod: Obj) -> coldstart.Pull:
        """How this node gets the pod's image, and how long it takes (``sandbox.coldstart``): already on
        the node (``IfNotPresent``), preloaded on the node's secondary boot disk (first use reads it from
        the disk), streamed (image streaming on the node, Artifact Registry, and the streaming backend has
        the image from an earlier pull), else a plain pull by size."""
        c = pod["spec"]["containers"][0]
        image, policy = c.get("image", ""), c.get("imagePullPolicy", "IfNotPresent")
        node_name = pod["spec"].get("nodeName", "")
        node = self.store.get(NODES, "", node_name) or {}
        labels = (node.get("metadata") or {}).get("labels") or {}
        on_node = {n for i in (node.get("status") or {}).get("images") or [] for n in i.get("names") or []}
        with self.runs_lock:
            used = image in self._node_images.setdefault(node_name, set())
        if image in on_node and policy != "Always":
            disk = any(k.startswith(SECONDARY_DISK_LABEL) for k in labels)
            return coldstart.image_pull(image, "secondary-boot-disk" if disk and not used else "present")
        if (labels.get(IMAGE_STREAMING_LABEL) == "true" and coldstart.is_artifact_registry(image)
                and image in self._streamed):
            return coldstart.image_pull(image, "streaming")
        return coldstart.image_pull(image, "registry")

    def begin_pull(self, pod: Obj) -> None:
        image = pod["spec"]["containers"][0].get("image", "")
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"], pod["metadata"]["uid"])
        plan = None if self._behavior(pod) == "image_pull_error" else self.pull_plan(pod)
        # an image already on the node needs no registry; a pull or a stream does (404: ErrImagePull)
        if plan is None or (plan.path not in ("present", "secondary-boot-disk") and self._unresolvable(image)):
            self.event(pod, "Normal", "Pulling", f'Pulling image "{image}"', host=pod["spec"]["nodeName"])
            self.after(IMAGE_PULL_FAIL_AFTER, ("pull-failed", *key, 0))
            return
        self._pulls[key[2]] = plan
        if plan.path in ("present", "secondary-boot-disk"):
            self.after(plan.seconds, ("start", *key, True))
            return
        self.event(pod, "Normal", "Pulling", f'Pulling image "{image}"', host=pod["spec"]["nodeName"])
        self.after(plan.seconds, ("start", *key, True))

    def pull_failed(self, ns: str, name: str, uid: str, attempt: int) -> None:
        pod = self.store.get(PODS, ns, name)
        if pod is None or pod["metadata"]["uid"] != uid or pod["metadata"].get("deletionTimestamp"):
            return
        image = pod["spec"]["containers"][0].get("image", "")
        if attempt and attempt % 2 == 0:  # the kubelet pulls again after the back-off
            self.event(pod, "Normal", "Pulling", f'Pulling image "{image}"', host=pod["spec"].get("nodeName", ""))
            # a counted fault ran out, or the image now exists (its repository was created): this pull works
            if self._behavior(pod) != "image_pull_error" and not self._unresolvable(image):
                self._pulls[uid] = plan = coldstart.image_pull(image, "registry")
                self.after(plan.seconds, ("start", ns, name, uid, True))
                return
        repo = image.split(":")[0]
        err = self._unresolvable(image) or (f'failed to pull and unpack image "{image}": failed to resolve '
                                            f'reference "{image}": {repo}: not found')
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
        stream_s = 0.0
        if first:
            image = pod["spec"]["containers"][0].get("image", "")
            plan = self._pulls.pop(uid, None) or coldstart.image_pull(image, "registry")
            stream_s = plan.start_penalty_s
            if plan.path in ("present", "secondary-boot-disk"):
                self.event(pod, "Normal", "Pulled", f'Container image "{image}" already present on machine',
                           host=host)
            else:
                self.event(pod, "Normal", "Pulled", f'Successfully pulled image "{image}" in {plan.seconds:.3g}s '
                           f"({plan.seconds:.3g}s including waiting). Image size: {int(plan.bytes)} bytes.",
                           host=host)
            self._remember_image(host, image, plan)
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
                server = start(self._runtime_view(pod, stream_s), on_ready=lambda: self.on_ready(uid, gen),
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

    def _runtime_view(self, pod: Obj, stream_s: float) -> Obj:
        """The pod as its container sees it once the kubelet has mounted its volumes: a copy carrying
        what each volume is (PVC storage class and disk type, CSI driver) and the image-streaming reads
        still due at start, in ``START_ANNOTATION`` (the stored pod is not changed)."""
        from sandbox.kube.storage import PVCS, SCS

        volumes: dict[str, Obj] = {}
        for v in (pod.get("spec") or {}).get("volumes") or []:
            claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
            if claim:
                pvc = self.store.get(PVCS, pod["metadata"]["namespace"], claim) or {}
                sc_name = (pvc.get("spec") or {}).get("storageClassName") or ""
                sc = self.store.get(SCS, "", sc_name) if sc_name else None
                volumes[v["name"]] = {"kind": "pvc", "storageClass": sc_name,
                                      "type": ((sc or {}).get("parameters") or {}).get("type", ""),
                                      "uid": (pvc.get("metadata") or {}).get("uid", claim)}
            elif v.get("csi"):
                volumes[v["name"]] = {"kind": "csi", "driver": v["csi"].get("driver", "")}
            else:
                volumes[v["name"]] = {"kind": next(iter(k for k in v if k != "name"), "emptyDir")}
        view = json.loads(json.dumps(pod))
        view["metadata"].setdefault("annotations", {})[START_ANNOTATION] = json.dumps(
            {"image_stream_s": stream_s, "volumes": volumes})
        return view

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
            conds = set_condition(conds, "Ready", "True", now=now)
            conds = set_condition(conds, "ContainersReady", "True", now=now)
        else:
            msg = f"containers with unready status: [{self._names(p)}]"
            conds = set_condition(conds, "Ready", "False", "ContainersNotReady", msg, now)
            conds = set_condition(conds, "ContainersReady", "False", "ContainersNotReady", msg, now)
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
            previous = run.last_terminated  # the lastState shown until this exit counts as a restart
            run.last_terminated = {"terminated": {
                "exitCode": int(code), "reason": reason or "Error", "startedAt": run.started_at,
                "finishedAt": finished, "containerID": run.container_id}}
            run.restarts += 1
            restarts = run.restarts
            delay = self._restart_delay(run)
            last = run.last_terminated
            pod_name = run.name

            def fn(p: Obj) -> Obj | None:
                if p["metadata"]["uid"] != uid:
                    return None
                cname = self._main_container(p)
                if delay:
                    state = {"waiting": {"reason": "CrashLoopBackOff", "message":
                                         f"back-off {human_backoff(delay)} restarting failed container={cname} "
                                         f"pod={pod_name}_{p['metadata']['namespace']}({uid})"}}
                    shown, prior = restarts, last
                else:  # exited, not yet restarted: the exit is the current state, counted once restarted
                    state, shown, prior = last, restarts - 1, previous
                p["status"]["containerStatuses"] = [
                    self._cstatus(c, state, restarts=shown, last=prior, started=False,
                                  container_id=run.container_id) for c in p["spec"]["containers"]]
                self._ready_conditions(p, False)
                return p

            out = self.store.mutate(PODS, run.namespace, run.name, fn)
        if out is None:
            return
        if not delay:
            self.after(PLEG_RELIST_S, ("start", run.namespace, run.name, uid, False))
            return
        host = out["spec"].get("nodeName", "")
        cname = self._main_container(out)
        self.event(out, "Warning", "BackOff", f"Back-off restarting failed container {cname} in pod "
                   f"{run.name}_{run.namespace}({uid})", host=host)
        self.after(delay, ("start", run.namespace, run.name, uid, False))

    def _restart_delay(self, run: PodRun) -> float:
        """How long the kubelet waits to restart ``run``'s container that just exited (cloud seconds), advancing
        its back-off entry as ``kuberuntime``'s ``doBackOff`` does: with no entry, or one idle for over twice
        the cap, the container restarts at once (``restartCount`` 1, no ``CrashLoopBackOff``) and the entry
        starts at 10 s; within an entry it waits the entry's duration (``back-off 10s``), and the restart
        doubles it up to 5 min. So one crash (or a liveness kill) is a restart; the second is a crash loop."""
        now = self.clock.now()
        if run.backoff == 0 or now - run.backoff_at > 2 * CRASH_BACKOFF[1]:
            run.backoff, run.backoff_at = CRASH_BACKOFF[0], now
            return 0.0
        delay = run.backoff
        run.backoff, run.backoff_at = min(CRASH_BACKOFF[1], 2 * delay), now + delay
        return delay

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
        """A pod marked for deletion: run its preStop hook, SIGTERM its server, wait for it to exit (SIGKILL at
        the end of the grace period), then remove the pod — off the controller thread."""
        server = self._halt(uid)
        with self.runs_lock:
            run = self.runs.get(uid)
        if run is not None:
            run.draining = server  # out of the Endpoints, but a lagging kube-proxy still sends it connections
        pod = self.store.get(PODS, ns, name)
        if pod is not None and pod["metadata"]["uid"] == uid:
            host = (pod.get("spec") or {}).get("nodeName", "")
            self.event(pod, "Normal", "Killing", f"Stopping container {self._main_container(pod)}", host=host)

        grace = float((pod or {}).get("metadata", {}).get("deletionGracePeriodSeconds") or 0)
        hook = min(grace, _pre_stop_seconds(pod or {}))

        def finish() -> None:
            # The preStop hook runs before SIGTERM, inside the grace period: a `sleep` hook keeps the server
            # answering while the endpoint removal reaches every kube-proxy (the pod is Terminating and
            # out of the Endpoints already)
            if hook > 0:
                self.clock.sleep(hook, self._stop)
            left = max(0.0, grace - hook)
            sigterm = time.monotonic()
            term = getattr(server, "terminate", None)
            if callable(term):
                # SIGTERM: the engine stops accepting, closes idle keep-alive connections, finishes what is in
                # progress (uvicorn's graceful shutdown) and exits once no connection is left; the process
                # takes SHUTDOWN_SECONDS to go at least; SIGKILL when the grace period ends first
                term()
                deadline = sigterm + max(self.clock.scaled(left), MIN_DRAIN_S)
                while not server.drained and time.monotonic() < deadline:
                    if self._stop.wait(0.005):
                        break
            elif server is not None:  # a local process: SIGTERM now, SIGKILL after its grace (LocalProcess.stop)
                self._stop_server(server)
            rest = self.clock.scaled(min(left, SHUTDOWN_SECONDS)) - (time.monotonic() - sigterm)
            if rest > 0:
                self._stop.wait(rest)
            if server is not None:
                self._stop_server(server)  # the exit (a stopped local process: a no-op)
            if run is not None and run.draining is server:
                run.draining = None
            # until the exit the pod is Terminating (kubectl shows it, watchers see it)
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
