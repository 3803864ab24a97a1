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
