"""``KubeCluster``: one Kubernetes API server on 127.0.0.1 with its store, controllers and nodes."""

from __future__ import annotations

import contextlib
import copy
import http.client
import itertools
import queue
import random
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from sandbox.core import Clock, Faults, SandboxHTTPServer, now_rfc3339
from sandbox.kube import admission, crds
from sandbox.kube import resources as res
from sandbox.kube.api import KubeApi, KubeHandler
from sandbox.kube.auth import ClusterAuth
from sandbox.kube.controllers import AUTOPILOT_LABEL, NODES, PODS, SVCS, Controller, is_ready
from sandbox.kube.endpointslices import EndpointSlices
from sandbox.kube.gateway import GatewayController
from sandbox.kube.gmp import GmpCollector
from sandbox.kube.ingress import IngressController
from sandbox.kube.kubeproxy import KubeProxy
from sandbox.kube.prober import Prober
from sandbox.kube.resources import RType
from sandbox.kube.selectors import match_selector_dict
from sandbox.kube.storage import Storage
from sandbox.kube.store import Event, Store, invalid, not_found, status_error
from sandbox.tls import ClusterCA, serve_tls

Obj = dict[str, Any]
LEASES = res.BY_KEY[("coordination.k8s.io", "leases")]
HOP_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
               "transfer-encoding", "upgrade", "host", "content-length"}


class KubeCluster:
    """The sandbox Kubernetes API server (fault service name ``kube``) plus store and controllers.

    Public surface for the rest of the sandbox:

    * ``start()`` / ``stop()`` / ``url`` / ``snapshot()``
    * ``add_node(name, *, labels, capacity, taints=())`` / ``remove_node(name)``
    * ``autopilot_clusters`` (a set; ``enable_autopilot(name)`` / ``disable_autopilot(name)``):
      while non-empty, pending GPU pods that select ``cloud.google.com/gke-accelerator`` get a
      node after ``DEFAULT_DELAYS["autopilot_node_provision"]``; idle ones go after
      ``autopilot_idle_seconds`` (cloud seconds)
    * ``subscribe(fn)`` -> unsubscribe callable; ``fn(event_type, obj)`` for every change
    * ``ready_pod_ports(namespace, selector)`` / ``service_backends(namespace, service)``
    """

    def __init__(self, *, clock: Clock | None = None, faults: Faults | None = None, runtime: Any = None,
                 google_tokens: Any = None) -> None:
        self.clock = clock or Clock()
        self.faults = faults
        self.runtime = runtime
        self.store = Store()
        self.api = KubeApi(self)
        self.controller = Controller(self)
        self.autopilot_clusters: set[str] = set()
        self.autopilot_idle_seconds = 600.0
        # what /version and each new node's kubelet report; GKE sets both to its cluster's and pool's
        # versions (set_version), and the project names nodes' providerID (gce://PROJECT/ZONE/NAME)
        self.server_version: dict[str, str] = dict(res.SERVER_VERSION)
        self.project = "sandbox-project"
        self.stopping = threading.Event()
        self._server: SandboxHTTPServer | None = None
        self._subscribers: list[Callable[[str, Obj], Any]] = []
        self._sub_queue: queue.SimpleQueue[tuple[str, Obj] | threading.Event | None] = queue.SimpleQueue()
        self._sub_thread: threading.Thread | None = None
        self._ips = itertools.count(10)
        self._node_ips = itertools.count(2)
        self._node_ports: set[int] = set()
        self.store.add_hook(self.controller.on_event)
        self.store.add_hook(self._publish)
        self.storage = Storage(self)  # claims bind like GKE's provisioners (sandbox.kube.storage)
        EndpointSlices(self)  # discovery.k8s.io/v1 mirrors of each Service's Endpoints
        # what routes to a Service: the Endpoints of endpoint_propagation cloud seconds ago (sandbox.kube.kubeproxy)
        self.kube_proxy = KubeProxy(self)
        self.ingress = IngressController(self)  # an address per Ingress its class's controller serves
        self.gmp = GmpCollector(self)  # Managed Prometheus scrapes every PodMonitoring target (sandbox.kube.gmp)
        self.prober = Prober(self)  # the kubelets' httpGet startup/readiness/liveness probes (sandbox.kube.prober)
        self.gateway = GatewayController(self)  # GKE's Gateway controller + the endpoint picker (CRDs installed)
        # HTTPS with the cluster's own CA, bearer tokens and RBAC, as a GKE control plane (sandbox.kube.auth)
        self.tls = ClusterCA()
        self.auth = ClusterAuth(self, google=google_tokens)
        self._bootstrap()
        self.auth.bootstrap()

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        if self._server is not None:
            return
        self.stopping.clear()
        self.controller.start()
        self.gmp.start()
        self.prober.start()
        self._sub_thread = threading.Thread(target=self._dispatch_subscribers, name="kube-subscribers", daemon=True)
        self._sub_thread.start()
        self._server = serve_tls(KubeHandler, state=self, faults=self.faults, context=self.tls.server_context())

    def stop(self) -> None:
        self.stopping.set()
        self.gmp.stop()
        self.prober.stop()
        self.ingress.stop()
        self.gateway.stop()
        self.store.close_watchers()
        self.controller.stop()
        self._sub_queue.put(None)
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._sub_thread is not None:
            self._sub_thread.join(timeout=2)
            self._sub_thread = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("KubeCluster is not started")
        return self._server.url

    @property
    def port(self) -> int:
        return self._server.port if self._server else 0

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until the controllers have no queued work (timers may add more later)."""
        return self.controller.wait_idle(timeout)

    def _bootstrap(self) -> None:
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.api.create(res.BY_KEY[("", "namespaces")], None, {"metadata": {"name": ns}})
        self.api.create(SVCS, "default", {
            "metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443, "targetPort": 443}]}})
        sc = res.BY_KEY[("storage.k8s.io", "storageclasses")]
        for name, disk in (("standard-rwo", "pd-balanced"), ("premium-rwo", "pd-ssd"), ("standard", "pd-standard")):
            ann = {"storageclass.kubernetes.io/is-default-class": "true"} if name == "standard-rwo" else {}
            self.api.create(sc, None, {"metadata": {"name": name, "annotations": ann,
                                                    "labels": {"addonmanager.kubernetes.io/mode": "EnsureExists"}},
                                       "provisioner": "pd.csi.storage.gke.io", "parameters": {"type": disk},
                                       "reclaimPolicy": "Delete", "allowVolumeExpansion": True,
                                       # GKE's legacy "standard" class binds at once; the CSI ones wait for a pod
                                       "volumeBindingMode": "Immediate" if name == "standard" else
                                       "WaitForFirstConsumer"})
        ic = res.BY_KEY[("networking.k8s.io", "ingressclasses")]
        self.api.create(ic, None, {"metadata": {"name": "gce"}, "spec": {"controller": "k8s.io/ingress-gce"}})
        # no "nginx" IngressClass: GKE has none until ingress-nginx is installed (helm/kubectl apply creates it)

    # ---- admission (defaults that need cluster state) -----------------------------------------
    def admit(self, t: RType, obj: Obj, old: Obj | None) -> None:
        admission.admit(self, t.kind, obj, old)  # GKE's admission plugins (toleration, Autopilot, default class)
        if t.kind == "CustomResourceDefinition":
            crds.admit_crd(obj)
        elif t.crd and (errors := crds.admit_custom(self, t, obj)):
            raise invalid(t, obj["metadata"].get("name", ""), [(f, "FieldValueInvalid", m) for f, m in errors])
        if t.kind == "Service":
            spec = obj.setdefault("spec", {})
            old_spec = (old or {}).get("spec") or {}
            if spec.get("type") != "ExternalName":
                ip = spec.get("clusterIP") or old_spec.get("clusterIP")
                if not ip:
                    n = next(self._ips)
                    ip = f"10.96.{(n >> 8) & 255}.{n & 255}"
                spec["clusterIP"] = ip
                spec["clusterIPs"] = [ip] if ip != "None" else ["None"]
            if spec.get("type") in ("NodePort", "LoadBalancer"):
                old_ports = {(p.get("port"), p.get("protocol", "TCP")): p.get("nodePort")
                             for p in old_spec.get("ports") or []}
                for p in spec.get("ports") or []:
                    if not p.get("nodePort"):
                        p["nodePort"] = old_ports.get((p.get("port"), p.get("protocol", "TCP"))) or self._node_port()
            else:
                for p in spec.get("ports") or []:
                    p.pop("nodePort", None)
            if spec.get("type") == "LoadBalancer":
                obj["status"] = {"loadBalancer": {"ingress": [{"ip": "127.0.0.1", "ipMode": "VIP"}]}}
            elif old is not None:
                obj["status"] = {"loadBalancer": {}}

    def _node_port(self) -> int:
        while True:
            port = random.randint(30000, 32767)
            if port not in self._node_ports:
                self._node_ports.add(port)
                return port

    # ---- nodes ------------------------------------------------------------------------------
    def set_version(self, version: str) -> None:
        """Report GKE's ``1.30.14-gke.1009000`` (a cluster's ``currentMasterVersion``) at /version."""
        self.server_version = res.server_version(version)

    def set_node_version(self, names: Iterable[str], version: str) -> None:
        """The kubelets of ``names`` now run GKE ``version`` (a node pool upgrade)."""
        kubelet = res.server_version(version)["gitVersion"]
        for name in names:
            node = copy.deepcopy(self.store.get(NODES, "", name))
            if node is not None:
                info = node["status"]["nodeInfo"]
                info["kubeletVersion"] = info["kubeProxyVersion"] = kubelet
                self.store.replace(NODES, node)

    def add_node(self, name: str, *, labels: dict[str, str] | None = None, capacity: dict[str, Any] | None = None,
                 taints: Iterable[Any] = (), version: str | None = None) -> Obj:
        """Register a Ready node (GKE calls this once the VM has booted); ``version`` = its pool's
        GKE version (default: the control plane's, as Autopilot's nodes)."""
        kubelet = res.server_version(version)["gitVersion"] if version else self.server_version["gitVersion"]
        labels = dict(labels or {})
        labels.setdefault("kubernetes.io/hostname", name)
        labels.setdefault("kubernetes.io/os", "linux")
        labels.setdefault("kubernetes.io/arch", "amd64")
        labels.setdefault("beta.kubernetes.io/os", "linux")
        labels.setdefault("beta.kubernetes.io/arch", "amd64")
        cap = {"cpu": "8", "memory": "32Gi", "pods": "110", "ephemeral-storage": "100Gi"}
        cap.update({k: str(v) for k, v in (capacity or {}).items()})
        zone = labels.get("topology.kubernetes.io/zone", "us-central1-a")
        ip = f"10.128.{(n := next(self._node_ips)) >> 8 & 255}.{n & 255}"
        now = now_rfc3339()
        conds = [
            {"type": t, "status": "False", "reason": r, "message": m, "lastHeartbeatTime": now,
             "lastTransitionTime": now}
            for t, r, m in (("MemoryPressure", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                            ("DiskPressure", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                            ("PIDPressure", "KubeletHasSufficientPID", "kubelet has sufficient PID available"))]
        conds.append({"type": "Ready", "status": "True", "reason": "KubeletReady",
                      "message": "kubelet is posting ready status", "lastHeartbeatTime": now,
                      "lastTransitionTime": now})
        node: Obj = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels,
                         "annotations": {"node.alpha.kubernetes.io/ttl": "0",
                                         "volumes.kubernetes.io/controller-managed-attach-detach": "true"}},
            "spec": {"providerID": f"gce://{self.project}/{zone}/{name}", "podCIDR": f"10.8.{n & 255}.0/24",
                     "podCIDRs": [f"10.8.{n & 255}.0/24"]},
            "status": {"capacity": cap, "allocatable": dict(cap), "conditions": conds,
                       "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
                       "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
                       "nodeInfo": {"machineID": name, "systemUUID": name, "bootID": name,
                                    "kernelVersion": "6.1.100+", "osImage": "Container-Optimized OS from Google",
                                    "containerRuntimeVersion": "containerd://1.7.22",
                                    "kubeletVersion": kubelet, "kubeProxyVersion": kubelet,
                                    "operatingSystem": "linux", "architecture": "amd64"}},
        }
        node_taints = [self._taint(t) for t in taints]
        if node_taints:
            node["spec"]["taints"] = node_taints
        live = self.store.get(NODES, "", name)
        if live is not None:
            node["metadata"] = dict(live["metadata"], labels=labels)
            return self.store.replace(NODES, node)
        created = self.api.create(NODES, None, node)
        renew = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        with contextlib.suppress(Exception):  # the kubelet's heartbeat object (kubectl describe node shows it)
            self.api.create(LEASES, "kube-node-lease", {
                "metadata": {"name": name, "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name,
                                                                "uid": created["metadata"]["uid"]}]},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": renew}})
        return created

    @staticmethod
    def _taint(t: Any) -> Obj:
        if isinstance(t, dict):
            out = {"key": t.get("key", ""), "effect": t.get("effect", "NoSchedule")}
            if t.get("value"):
                out["value"] = t["value"]
            return out
        if isinstance(t, tuple | list):
            key, value, effect = (list(t) + ["", "NoSchedule"])[:3]
            return {"key": key, "value": value, "effect": effect} if value else {"key": key, "effect": effect}
        text = str(t)  # "key=value:Effect"
        kv, _, effect = text.partition(":")
        key, _, value = kv.partition("=")
        return {"key": key, "value": value, "effect": effect or "NoSchedule"} if value else \
            {"key": key, "effect": effect or "NoSchedule"}

    def remove_node(self, name: str) -> bool:
        """The VM is gone: delete the Node and the pods bound to it (their owners replace them)."""
        try:
            self.store.delete(NODES, "", name)
        except Exception:
            return False
        with contextlib.suppress(Exception):
            self.store.delete(LEASES, "kube-node-lease", name)
        pods, _ = self.store.list(PODS, None, lambda p: (p.get("spec") or {}).get("nodeName") == name)
        for p in pods:
            with contextlib.suppress(Exception):
                self.controller.delete_pod(p["metadata"]["namespace"], p["metadata"]["name"], grace=0)
        return True

    def nodes(self) -> list[Obj]:
        return self.store.list(NODES)[0]

    def enable_autopilot(self, cluster_name: str) -> None:
        self.autopilot_clusters.add(cluster_name)
        self.controller.enqueue(("schedule",))

    def disable_autopilot(self, cluster_name: str) -> None:
        self.autopilot_clusters.discard(cluster_name)

    # ---- subscribers ------------------------------------------------------------------------
    def subscribe(self, fn: Callable[[str, Obj], Any]) -> Callable[[], None]:
        """``fn(event_type, obj)`` for every ADDED/MODIFIED/DELETED, in order, on a dispatcher thread, until
        the returned ``unsubscribe()``, which returns once ``fn`` has had every change made before it: a
        caller that reads a change through the API and then unsubscribes has it in ``fn`` too (the dispatcher
        can be behind on a loaded machine; a test lost a crash loop's last write that way)."""
        self._subscribers.append(fn)

        def unsubscribe() -> None:
            thread = self._sub_thread
            if thread is not None and thread.is_alive() and threading.current_thread() is not thread:
                delivered = threading.Event()  # queued behind every change made so far
                self._sub_queue.put(delivered)
                delivered.wait(10)
            with contextlib.suppress(ValueError):
                self._subscribers.remove(fn)

        return unsubscribe

    def _publish(self, ev: Event) -> None:
        if self._subscribers:
            self._sub_queue.put((ev.type, ev.obj))

    def _dispatch_subscribers(self) -> None:
        while True:
            item = self._sub_queue.get()
            if item is None:
                return
            if isinstance(item, threading.Event):  # an unsubscribe() waiting for what came before it
                item.set()
                continue
            for fn in list(self._subscribers):
                try:
                    fn(item[0], item[1])
                except Exception:
                    traceback.print_exc(file=sys.stderr)

    # ---- routing ----------------------------------------------------------------------------
    def installed_crds(self) -> frozenset[str]:
        return crds.installed(self)

    def ready_pod_ports(self, namespace: str, selector: dict[str, str] | None) -> list[int]:
        """Loopback ports of the model servers of Ready, non-terminating pods matching ``selector`` now."""
        if not selector:
            return []
        pods, _ = self.store.list(PODS, namespace, lambda p: match_selector_dict(selector, p["metadata"].get("labels"))
                                  and is_ready(p) and not p["metadata"].get("deletionTimestamp"))
        ports = []
        with self.controller.runs_lock:
            runs = [self.controller.runs.get(p["metadata"]["uid"]) for p in pods]
        for run in runs:
            if run is None or run.stopped or not run.ready:
                continue
            port = getattr(run.server, "port", None) if run.server is not None else None
            if port:
                ports.append(int(port))
        return ports

    def service_backends(self, namespace: str, service_name: str) -> list[int]:
        svc = self.store.get(SVCS, namespace, service_name)
        if svc is None:
            return []
        return self.ready_pod_ports(namespace, (svc.get("spec") or {}).get("selector"))

    def routed_backends(self, namespace: str, service_name: str) -> list[int]:
        """Where a connection to the Service goes: kube-proxy's programmed view, ``kube_proxy.lag_s`` behind."""
        return self.kube_proxy.backends(namespace, service_name)

    def pod_port(self, namespace: str, name: str) -> int | None:
        pod = self.store.get(PODS, namespace, name)
        if pod is None:
            return None
        with self.controller.runs_lock:
            run = self.controller.runs.get(pod["metadata"]["uid"])
        if run is None or run.server is None or run.stopped:
            return None
        return getattr(run.server, "port", None)

    def proxy(self, h: Any, t: RType, namespace: str, name: str, path: str) -> None:
        """``.../services/NAME[:PORT]/proxy/PATH`` and ``.../pods/NAME[:PORT]/proxy/PATH``."""
        parts = name.split(":")
        target = parts[1] if len(parts) == 3 else parts[0]
        query = h.url.query
        full = (path or "/") + (f"?{query}" if query else "")
        if t.kind == "Service":
            if self.store.get(SVCS, namespace, target) is None:
                raise not_found(t, target)
            ports = self.service_backends(namespace, target)
            if not ports:
                raise status_error(503, "ServiceUnavailable", f'no endpoints available for service "{target}"')
        elif t.kind == "Pod":
            if self.store.get(PODS, namespace, target) is None:
                raise not_found(t, target)
            port = self.pod_port(namespace, target)
            if not port:
                raise status_error(503, "ServiceUnavailable", f'pod "{target}" has no running server')
            ports = [port]
        else:
            raise status_error(404, "NotFound", "the server could not find the requested resource")
        try:
            from sandbox.routing import proxy as route_proxy
        except ImportError:
            route_proxy = fallback_proxy
        # like the real API server's proxy: the caller's credentials do not reach the backend
        route_proxy(h, ports, full, service=target, drop_headers=("Authorization",))

    # ---- inspection -------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        objects = self.store.all_objects()
        out: dict[str, Any] = {"url": self._server.url if self._server else None,
                               "resourceVersion": str(self.store.resource_version),
                               "autopilotClusters": sorted(self.autopilot_clusters)}
        with self.controller.runs_lock:
            runs = dict(self.controller.runs)
        pods = []
        for p in objects.get(("", "pods"), []):
            run = runs.get(p["metadata"]["uid"])
            cs = ((p.get("status") or {}).get("containerStatuses") or [{}])[0]
            pods.append({"namespace": p["metadata"]["namespace"], "name": p["metadata"]["name"],
                         "phase": (p.get("status") or {}).get("phase"), "ready": is_ready(p),
                         "node": (p.get("spec") or {}).get("nodeName"),
                         "port": getattr(run.server, "port", None) if run and run.server else None,
                         "restarts": cs.get("restartCount", 0),
                         "terminating": bool(p["metadata"].get("deletionTimestamp"))})
        out["pods"] = sorted(pods, key=lambda x: (x["namespace"], x["name"]))
        out["nodes"] = [{"name": n["metadata"]["name"], "labels": n["metadata"].get("labels", {}),
                         "capacity": (n.get("status") or {}).get("capacity", {}),
                         "taints": (n.get("spec") or {}).get("taints", []),
                         "autopilot": bool((n["metadata"].get("labels") or {}).get(AUTOPILOT_LABEL))}
                        for n in objects.get(("", "nodes"), [])]
        out["objects"] = {
            (f"{g}/{p}" if g else p): [{k: v for k, v in o.items() if k != "metadata"} | {
                "metadata": {k: v for k, v in o["metadata"].items() if k != "managedFields"}} for o in items]
            for (g, p), items in objects.items() if p != "events"}
        out["events"] = len(objects.get(("", "events"), []))
        return out


def fallback_proxy(h: Any, ports: list[int], path: str, **_: Any) -> None:
    """Forward one request to one backend (used only when sandbox.routing is not available)."""
    port = random.choice(ports)
    body = h.body_bytes()
    headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP_HEADERS}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request(h.command, path, body=body or None, headers=headers)
        resp = conn.getresponse()
    except OSError as exc:
        conn.close()
        raise status_error(503, "ServiceUnavailable", f"error trying to reach service: {exc}") from None
    try:
        length = resp.getheader("Content-Length")
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_HEADERS:
                h.send_header(k, v)
        if length is not None:
            data = resp.read()
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        else:
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            while True:
                chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536)
                if not chunk:
                    break
                h.write_chunk(chunk)
            h.end_chunked()
    finally:
        conn.close()
