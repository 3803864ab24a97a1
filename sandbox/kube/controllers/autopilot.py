"""GKE Autopilot: a node per pod that fits nowhere, sized to the pod; idle Autopilot nodes go.

Mirrors the GKE cluster autoscaler's node auto-provisioning (``kubernetes/autoscaler``
cluster-autoscaler: a ``TriggeredScaleUp`` event, a ``nap-…`` node pool per machine shape, GPU
nodes tainted ``nvidia.com/gpu=present:NoSchedule``) and its scale-down of empty nodes after
``autopilot_idle_seconds``. Only for clusters in ``KubeCluster.autopilot_clusters``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from sandbox.core import DEFAULT_DELAYS
from sandbox.kube.controllers.base import ControllerBase
from sandbox.kube.controllers.common import NODES, PODS, Obj, pod_gpus, pod_requests
from sandbox.kube.defaults import GPU
from sandbox.kube.store import rand_hex

if TYPE_CHECKING:
    from sandbox.kube.cluster import KubeCluster

AUTOPILOT_LABEL = "sandbox.llm-fleet.dev/autopilot"


class AutopilotProvisioner(ControllerBase):
    """``_maybe_autopilot`` (from the scheduler), ``provision_autopilot_node``, ``_track_idle``, ``autopilot_gc``."""

    def __init__(self, cluster: KubeCluster) -> None:
        super().__init__(cluster)
        self._autopilot_pending: dict[str, str] = {}  # pod uid -> node name being provisioned
        self._idle_since: dict[str, float] = {}  # autopilot node -> monotonic time it became idle

    # ---- Autopilot --------------------------------------------------------------------------
    def _maybe_autopilot(self, pod: Obj, gpu: float) -> None:
        selector = (pod.get("spec") or {}).get("nodeSelector") or {}
        cls = self._class(selector)
        clusters = sorted(self.cluster.autopilot_clusters)
        gke_nodes = getattr(self.cluster, "gke_nodes", None)
        if not clusters:
            # a Standard cluster: GKE runs in Autopilot mode the pods that select a ComputeClass with
            # spec.autopilot.enabled (when its version allows Autopilot ComputeClasses; else no node at all)
            if not (cls and ((cls.get("spec") or {}).get("autopilot") or {}).get("enabled")) or gke_nodes is None \
                    or gke_nodes.autopilot_class_problem() is not None:
                return
            clusters = [gke_nodes.name]
        accel = selector.get("cloud.google.com/gke-accelerator") or self._class_gpu(selector)[0]
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
        boot = DEFAULT_DELAYS["autopilot_node_provision"]
        if gke_nodes is not None and accel:  # GKE times its GPU nodes: fast-starting nodes or the normal boot
            from sandbox.gke.fast_nodes import Shape

            class_gpu, class_spot = self._class_gpu(selector)
            rule = self._class_rule(cls)
            spot = class_spot or selector.get("cloud.google.com/gke-spot") == "true"
            boot = gke_nodes.boot(node, Shape(accelerator=accel, gpus=max(1, int(gpu)), spot=spot, rule=rule,
                                             annotations=(pod.get("metadata") or {}).get("annotations") or {}))
        self.after(boot, ("autopilot-node", pod["metadata"]["namespace"], pod["metadata"]["name"], uid, node, cluster))

    def _class(self, selector: dict[str, str]) -> Obj | None:
        """The ComputeClass the pod selects (``cloud.google.com/compute-class``), or None."""
        name = selector.get("cloud.google.com/compute-class")
        if not name:
            return None
        from sandbox.kube.resources import find

        rtype = find("cloud.google.com", "v1", "computeclasses")
        return self.store.get(rtype, "", name) if rtype is not None else None

    @staticmethod
    def _class_rule(cls: Obj | None) -> Obj | None:
        """The class's first GPU priority: the one an Autopilot node is made from here."""
        for rule in ((cls or {}).get("spec") or {}).get("priorities") or []:
            if (rule.get("gpu") or {}).get("type"):
                return rule
        return None

    def _class_gpu(self, selector: dict[str, str]) -> tuple[str | None, bool]:
        """(GPU type, spot) of the first GPU priority of the ComputeClass the pod selects. Autopilot creates
        the class's nodes itself (no stockouts are emulated here: the first priority always starts)."""
        rule = self._class_rule(self._class(selector))
        if rule is None:
            return None, False
        return rule["gpu"]["type"], bool(rule.get("spot"))

    def provision_autopilot_node(self, ns: str, name: str, uid: str, node: str, cluster: str) -> None:
        pod = self.store.get(PODS, ns, name)
        if self._autopilot_pending.get(uid) != node:
            return
        self._autopilot_pending.pop(uid, None)
        if pod is None or pod["metadata"]["uid"] != uid or (pod.get("spec") or {}).get("nodeName"):
            return
        gke_nodes = getattr(self.cluster, "gke_nodes", None)
        if cluster not in self.cluster.autopilot_clusters and (gke_nodes is None or gke_nodes.name != cluster):
            return
        selector = dict((pod.get("spec") or {}).get("nodeSelector") or {})
        if pod_gpus(pod) <= 0 and "cloud.google.com/gke-accelerator" not in selector:
            labels = {"cloud.google.com/gke-nodepool": "nap-e2-standard-2", "cloud.google.com/machine-family": "e2",
                      "cloud.google.com/gke-provisioning": "standard", "kubernetes.io/arch": "amd64",
                      "kubernetes.io/os": "linux", "kubernetes.io/hostname": node, AUTOPILOT_LABEL: cluster, **selector}
            self.cluster.add_node(node, labels=labels, capacity={"cpu": "2", "memory": f"{8 * 1024 * 1024}Ki",
                                                                  "pods": "110", "ephemeral-storage": "100Gi"})
            self._idle_since[node] = time.monotonic()
            return
        gpus = max(1, int(pod_gpus(pod)))
        class_gpu, class_spot = self._class_gpu(selector)
        accel = selector.get("cloud.google.com/gke-accelerator") or class_gpu or "nvidia-l4"
        if class_spot:
            selector.setdefault("cloud.google.com/gke-spot", "true")
        labels = {
            "cloud.google.com/gke-nodepool": f"nap-{accel}-{gpus}",
            "cloud.google.com/gke-accelerator": accel,
            "cloud.google.com/gke-accelerator-count": str(gpus),
            "cloud.google.com/gke-gpu": "true",
            "cloud.google.com/gke-provisioning": "spot" if selector.get("cloud.google.com/gke-spot") else "standard",
            "cloud.google.com/machine-family": "g2" if "l4" in accel else "a2",
            "kubernetes.io/arch": "amd64", "kubernetes.io/os": "linux", "kubernetes.io/hostname": node,
            # Autopilot pulls eligible images with image streaming, always (GKE image streaming docs)
            "cloud.google.com/gke-image-streaming": "true",
            AUTOPILOT_LABEL: cluster,
            **selector,
        }
        # Autopilot picks a machine that fits the pod's requests (g2-standard-4 .. -32 for one L4)
        cpu = max(4 * gpus, int(pod_requests(pod, "cpu")) + 2)
        mem_ki = max(16 * gpus * 1024 * 1024, int(pod_requests(pod, "memory") / 1024 * 1.2))
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
