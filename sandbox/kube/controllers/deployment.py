"""The Deployment controller: ReplicaSets per pod template, rolling update / recreate, status and conditions.

Mirrors kube-controller-manager ``pkg/controller/deployment``: ``sync.go`` (new ReplicaSet named by
the ``pod-template-hash``, revision annotations, history cleanup), ``rolling.go`` (maxSurge /
maxUnavailable, unhealthy old replicas scaled down first), ``recreate.go``, ``progress.go``
(``progressDeadlineSeconds`` → ``ProgressDeadlineExceeded``) and ``util/deployment_util.go``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from typing import TYPE_CHECKING, Any

from sandbox.core import HttpError, now_rfc3339
from sandbox.kube import resources as res
from sandbox.kube.controllers.base import ControllerBase
from sandbox.kube.controllers.common import (
    DEPLOYS,
    PODS,
    RSS,
    Obj,
    int_or_percent,
    is_ready,
    owned_by,
    set_condition,
)
from sandbox.kube.store import clone

if TYPE_CHECKING:
    from sandbox.kube.cluster import KubeCluster


def template_hash(template: Obj) -> str:
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).digest()
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    n = int.from_bytes(digest[:8], "big")
    out = []
    for _ in range(10):
        n, r = divmod(n, len(alphabet))
        out.append(alphabet[r])
    return "".join(out)


class DeploymentController(ControllerBase):
    """``sync_deployment(ns, name)``: scales the Deployment's ReplicaSets (``_pods_of`` is the RS controller's)."""

    def __init__(self, cluster: KubeCluster) -> None:
        super().__init__(cluster)
        self._progress: dict[tuple[str, str], tuple[Any, float]] = {}

    # ---- deployments ------------------------------------------------------------------------
    def _owned(self, t: res.RType, ns: str, uid: str) -> list[Obj]:
        items, _ = self.store.list(t, ns, lambda o: owned_by(o, uid))
        return items

    def sync_deployment(self, ns: str, name: str) -> None:
        d = self.store.get(DEPLOYS, ns, name)
        if d is None or d["metadata"].get("deletionTimestamp"):
            self._progress.pop((ns, name), None)
            if d is None:  # a ReplicaSet created while its Deployment was being deleted goes too (GC)
                self.collect_dangling(RSS, ns, "Deployment", name)
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
        surge = int_or_percent(ru.get("maxSurge", "25%"), replicas, True) if rolling else 0
        unavailable = int_or_percent(ru.get("maxUnavailable", "25%"), replicas, False) if rolling else 0
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

    def _create_rs(self, d: Obj, tmpl: Obj, h: str, replicas: int, revision: int) -> Obj:
        meta = d["metadata"]
        labels = dict((tmpl.get("metadata") or {}).get("labels") or {}, **{"pod-template-hash": h})
        tmpl = clone(tmpl)
        tmpl.setdefault("metadata", {})["labels"] = labels
        selector = clone(d["spec"]["selector"])
        selector.setdefault("matchLabels", {})["pod-template-hash"] = h
        strategy = d["spec"].get("strategy") or {}
        surge = int_or_percent((strategy.get("rollingUpdate") or {}).get("maxSurge", 0), d["spec"]["replicas"], True)
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
                     and now_m - last_progress >= self.clock.deadline(float(deadline)))
        if progressed and not complete and deadline is not None:
            self.after_real(self.clock.deadline(float(deadline)) + 0.001, ("deploy", ns, name))
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
            conds = set_condition(conds, "Available", "True" if available_ok else "False",
                                  "MinimumReplicasAvailable" if available_ok else "MinimumReplicasUnavailable",
                                  "Deployment has minimum availability." if available_ok else
                                  "Deployment does not have minimum availability.", now, probe=False,
                                  update_time=True)
            prog = next((c for c in conds if c.get("type") == "Progressing"), None)
            if complete:
                if not prog or prog.get("reason") != "NewReplicaSetAvailable":
                    conds = set_condition(conds, "Progressing", "True", "NewReplicaSetAvailable",
                                          f'ReplicaSet "{rs_name}" has successfully progressed.', now, probe=False,
                                          update_time=True)
            elif timed_out:
                conds = set_condition(conds, "Progressing", "False", "ProgressDeadlineExceeded",
                                      f'ReplicaSet "{rs_name}" has timed out progressing.', now, probe=False,
                                      update_time=True)
            elif created_new:
                conds = set_condition(conds, "Progressing", "True", "NewReplicaSetCreated",
                                      f'Created new replica set "{rs_name}"', now, probe=False, update_time=True)
            elif progressed or not prog or prog.get("reason") == "NewReplicaSetAvailable":
                conds = set_condition(conds, "Progressing", "True", "ReplicaSetUpdated",
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
