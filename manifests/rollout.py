"""Pure reading of pod state: is the model up, still coming, or failed — and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# Waiting reasons that will not fix themselves: fail fast, name them.
FATAL_WAITING = {
    "ErrImagePull": "the image cannot be pulled",
    "ImagePullBackOff": "the image cannot be pulled",
    "InvalidImageName": "the image name is invalid",
    "CreateContainerConfigError": "the container config is invalid (a missing Secret or key?)",
    "CrashLoopBackOff": "the model server keeps crashing",
}
FIXES = {
    "ErrImagePull": "check engine.image (name, tag, registry access from the cluster)",
    "ImagePullBackOff": "check engine.image (name, tag, registry access from the cluster)",
    "InvalidImageName": "fix engine.image",
    "CreateContainerConfigError": "check that the Secret named in the spec exists with that key",
    "CrashLoopBackOff": "read the log lines below; check engine args, max_model_len and the model revision",
    "OOMKilled": "use more GPUs (accelerator.count + engine.tensor_parallel), a quantized model, "
                 "or lower engine.max_model_len",
    "Unschedulable": "check the GPU node pool (size, autoscaling max, zone) or quota",
}


@dataclass(frozen=True)
class Progress:
    state: Literal["waiting", "ready", "failed"]
    reason: str = ""
    message: str = ""
    pod: str | None = None
    ready: int = 0
    previous_logs: bool = False  # the logs worth showing are from the crashed run
    pods: tuple[str, ...] = ()  # the Ready pods of the new ReplicaSet (when ready)
    replicaset: str = ""

    @property
    def fix(self) -> str:
        return FIXES.get(self.reason, "")


@dataclass
class PodView:
    name: str
    phase: str
    ready: bool
    waiting: str | None = None
    waiting_message: str = ""
    last_terminated: str | None = None
    restarts: int = 0
    unschedulable: str | None = None
    deleting: bool = False
    conditions: dict[str, str] = field(default_factory=dict)


def view(pod: dict[str, Any]) -> PodView:
    meta, status = pod.get("metadata", {}), pod.get("status") or {}
    conds = {c.get("type"): c for c in status.get("conditions") or []}
    cs = (status.get("containerStatuses") or [{}])[0] or {}
    waiting = (cs.get("state") or {}).get("waiting") or {}
    last = ((cs.get("lastState") or cs.get("last_state") or {}).get("terminated")) or {}
    sched = conds.get("PodScheduled", {})
    return PodView(
        name=meta.get("name", "?"), phase=status.get("phase", "Pending"),
        ready=conds.get("Ready", {}).get("status") == "True",
        waiting=waiting.get("reason"), waiting_message=waiting.get("message", ""),
        last_terminated=last.get("reason"), restarts=int(cs.get("restartCount") or cs.get("restart_count") or 0),
        unschedulable=sched.get("message") if sched.get("status") == "False" else None,
        deleting=bool(meta.get("deletionTimestamp") or meta.get("deletion_timestamp")),
        conditions={k: v.get("status", "") for k, v in conds.items()},
    )


def diagnose(pods: list[dict[str, Any]], *, desired: int) -> Progress:
    """Ready when ``desired`` pods are Ready; failed on a cause that will not heal; else waiting (with why)."""
    views = [view(p) for p in pods if not view(p).deleting]
    ready = sum(v.ready for v in views)
    if ready >= desired:
        return Progress("ready", ready=ready)
    for v in views:
        if v.last_terminated == "OOMKilled" or v.waiting == "OOMKilled":
            return Progress("failed", "OOMKilled", f"pod {v.name} ran out of memory loading the model "
                            f"(restarts: {v.restarts})", v.name, ready, previous_logs=True)
        if v.waiting in FATAL_WAITING:
            detail = f": {v.waiting_message}" if v.waiting_message else ""
            return Progress("failed", v.waiting, f"pod {v.name}: {FATAL_WAITING[v.waiting]}{detail}", v.name, ready,
                            previous_logs=v.waiting == "CrashLoopBackOff")
        if v.restarts >= 2 and v.last_terminated and not v.ready:
            # Crashed and restarted twice, not Ready: the same crash loop, read between its back-offs. The
            # waiting CrashLoopBackOff state lasts only the back-off (10 s, doubling), and a watcher may see
            # the pod only once it runs again; the restart count and last state stay (kubectl shows the same
            # pod as Running, RESTARTS 2). Without this, a crashing model read as "loading" until the timeout.
            # One restart is not yet a loop: a liveness kill of a slow start (a loaded node) recovers.
            return Progress("failed", "CrashLoopBackOff", f"pod {v.name}: {FATAL_WAITING['CrashLoopBackOff']} "
                            f"(restarts: {v.restarts}, last exit: {v.last_terminated})", v.name, ready,
                            previous_logs=True)
    for v in views:
        if v.unschedulable:
            return Progress("waiting", "Unschedulable", f"pod {v.name} is Pending: {v.unschedulable}", v.name, ready)
    loading = [v for v in views if v.phase == "Running" and not v.ready]
    if loading:
        return Progress("waiting", "Loading", f"{len(loading)} pod(s) loading the model", loading[0].name, ready)
    if views:
        v = views[0]
        return Progress("waiting", v.waiting or v.phase, f"pod {v.name} is {v.waiting or v.phase}", v.name, ready)
    return Progress("waiting", "NoPods", "no pods yet", None, ready)


# ---- rollout status: what `kubectl rollout status` checks, plus why the new pods are not there ------

REVISION_KEY = "deployment.kubernetes.io/revision"
TEMPLATE_HASH = "pod-template-hash"


def new_replicaset(deployment: dict[str, Any], replicasets: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The ReplicaSet of the Deployment's current template: owned by it, same revision annotation."""
    meta = deployment.get("metadata", {})
    uid, revision = meta.get("uid"), (meta.get("annotations") or {}).get(REVISION_KEY)
    owned = [rs for rs in replicasets
             if any(o.get("uid") == uid for o in rs.get("metadata", {}).get("ownerReferences") or [])]
    for rs in owned:
        if revision and (rs["metadata"].get("annotations") or {}).get(REVISION_KEY) == revision:
            return rs
    return None


def rollout_progress(deployment: dict[str, Any], new_pods: list[dict[str, Any]], *,
                     replicaset: str = "") -> Progress:
    """Complete when the controller has seen the newest spec and every replica is updated and available.

    ``new_pods`` are the pods of the new ReplicaSet only: old Ready pods never count, and their
    causes (crash loop, OOM, unschedulable) are what a failed rollout reports.
    """
    meta, spec, status = deployment.get("metadata", {}), deployment.get("spec", {}), deployment.get("status") or {}
    want = int(spec.get("replicas", 1) if spec.get("replicas") is not None else 1)
    generation, observed = int(meta.get("generation") or 0), int(status.get("observedGeneration") or 0)
    ready_pods = tuple(sorted(view(p).name for p in new_pods if view(p).ready and not view(p).deleting))
    if observed < generation:
        return Progress("waiting", "Observing", f"waiting for the controller to observe generation {generation}",
                        ready=len(ready_pods))
    updated, available = int(status.get("updatedReplicas") or 0), int(status.get("availableReplicas") or 0)
    total = int(status.get("replicas") or 0)
    if updated == want and available == want and total == want and len(ready_pods) == want:
        return Progress("ready", "Complete", f"{want} of {want} updated replicas available", ready=want,
                        pods=ready_pods, replicaset=replicaset)
    cause = diagnose(new_pods, desired=max(want, 1))
    if cause.state == "failed":
        return Progress("failed", cause.reason, cause.message, cause.pod, len(ready_pods),
                        cause.previous_logs, replicaset=replicaset)
    progressing = next((c for c in status.get("conditions") or [] if c.get("type") == "Progressing"), {})
    if progressing.get("reason") == "ProgressDeadlineExceeded":
        reason = "Unschedulable" if cause.reason == "Unschedulable" else "LoadTimeout"
        return Progress("failed", reason, f"rollout exceeded its progress deadline: {cause.message}", cause.pod,
                        len(ready_pods), replicaset=replicaset)
    if cause.state == "ready":
        reason, detail = "Rolling", "new pods Ready, old ones going away"
    else:
        reason = cause.reason
        detail = cause.message if cause.reason != "NoPods" or not replicaset else f"no pods of {replicaset} yet"
    return Progress("waiting", reason,
                    f"{updated}/{want} updated, {available}/{want} available; {detail}", cause.pod,
                    len(ready_pods), replicaset=replicaset)
