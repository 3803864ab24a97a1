"""The ReplicaSet controller: create or delete pods until the ReplicaSet's replicas match, then its status.

Mirrors kube-controller-manager ``pkg/controller/replicaset`` (``replica_set.go`` manageReplicas:
pods from the template with a controller ownerReference, ``SuccessfulCreate`` / ``FailedCreate`` /
``SuccessfulDelete`` events); which pods go first on scale-down follows ``controller.ActivePods``
in ``pkg/controller/controller_utils.go`` (unscheduled, then not ready, then most restarts, then newest).
"""

from __future__ import annotations

import contextlib
from typing import Any

from sandbox.core import HttpError
from sandbox.kube.controllers.base import ControllerBase
from sandbox.kube.controllers.common import PODS, RSS, Obj, is_ready, owned_by
from sandbox.kube.store import clone


class ReplicaSetController(ControllerBase):
    """``sync_replicaset(ns, name)``; pods are deleted through the kubelet's ``delete_pod`` (graceful)."""

    # ---- replica sets -----------------------------------------------------------------------
    def sync_replicaset(self, ns: str, name: str) -> None:
        rs = self.store.get(RSS, ns, name)
        if rs is None:
            self.collect_dangling(PODS, ns, "ReplicaSet", name)
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

    def collect_dangling(self, t: Any, ns: str, owner_kind: str, owner_name: str) -> None:
        """The garbage collector's rule for dangling owner references: a dependent whose controller owner is
        gone is deleted (kubernetes.io/docs/concepts/architecture/garbage-collection/). Catches what a
        controller created while its owner was being deleted — a pod the ReplicaSet controller started
        for a ReplicaSet the API server removed a moment later, left running for ever before."""
        items, _ = self.store.list(t, ns, lambda o: not o["metadata"].get("deletionTimestamp") and any(
            r.get("controller") and r.get("kind") == owner_kind and r.get("name") == owner_name
            for r in o["metadata"].get("ownerReferences") or []))
        for o in items:
            with contextlib.suppress(HttpError):
                if t is PODS:
                    self.delete_pod(ns, o["metadata"]["name"])
                else:
                    self.cluster.api.delete(t, ns, o["metadata"]["name"])

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

    def _pods_of(self, ns: str, uid: str, include_terminating: bool = False) -> list[Obj]:
        items, _ = self.store.list(PODS, ns, lambda p: owned_by(p, uid) and (
            include_terminating or not p["metadata"].get("deletionTimestamp")))
        return items
