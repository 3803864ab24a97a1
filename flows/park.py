"""park_model / wake_model / park_idle / sync_schedules: GPUs to zero when nobody needs them, and back.

park_model
1. Take the model's lock (the one releases take: never a park mid-release)
2. Record what park changes, on the live Service (color, replicas, GPU pool settings)
3. Put the hold proxy in front: the live Service selects it while parked
4. Scale the model to 0 and wait until none of its GPU pods remains
5. GPU node pool to 0 unless another model still needs it (Standard; shared: the autoscaling minimum
   to 0 only, the cluster autoscaler removes what this model left; Autopilot: the nodes go with the pods)

wake_model
1. Take the lock; read the park record from the live Service
2. Restore what park changed on the GPU pool, then the replicas
3. Wait until the model answers (rollout, endpoints, engine) and passes the smoke prompts
4. Point the live Service back at the model; record the wake time (prewarm uses its p95)
5. Scale the hold proxy to 0 once the switch has settled (the next park scales it up again)

park_idle: serving metrics through the Service → one decision per model (table artifact) → park_model.
sync_schedules: the specs' schedule.park / schedule.wake become Prefect deployment schedules.

Each target's steps are in ``targets/<target>/`` (GKE: park_steps.py, wake_steps.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger

from manifests import park as P
from manifests.fleet import OptionalDateTime, OptionalText, SpecFileParam, SpecParam, bundled_specs
from manifests.spec import DeploymentSpec, load_spec
from targets import Unsupported, target_for
from targets.trust import admit_event_spec
from tasks import schedules

ROOT = Path(__file__).resolve().parents[1]


@flow(name="park_model", log_prints=True)
def park_model(spec: SpecParam = "deployments/gemma2-2b-it-vllm-l4.yaml",
               reason: str = "manual") -> dict[str, Any]:
    """Replicas to 0, hold proxy in front, GPU node pool to 0 — recorded on the cluster for wake_model.

    Args:
        spec: The deployment spec: a bundled one (deployments/*.yaml), another spec file, or the spec itself.
        reason: Why it is parked, kept in the park record and the Slack message.
    """
    return target_for(spec).park(spec=spec, reason=reason)


@flow(name="wake_model", log_prints=True)
def wake_model(spec: SpecParam = "deployments/gemma2-2b-it-vllm-l4.yaml",
               reason: str = "manual", source: Literal["manual", "event"] = "manual",
               requested_at: OptionalDateTime = None) -> dict[str, Any]:
    """Restore what park changed (pool, replicas), wait until the model answers, route to it.

    ``source: event`` (the hold proxy's trigger): only a bundled spec path (docs/security.md).

    Args:
        spec: The deployment spec: a bundled one (deployments/*.yaml), another spec file, or the spec itself.
        reason: Why it is woken, kept in the wake history and the Slack message.
        source: Who started the run: manual (you) or event (the hold proxy's trigger).
        requested_at: When a held request asked for this wake (the trigger sets the event's time): the
            reported wait counts from it, the trigger and the worker's start included. Empty: from this run.
    """
    if source == "event":
        spec = admit_event_spec(spec)
    return target_for(spec).wake(spec=spec, reason=reason, requested_at=requested_at)


def _idle(spec: DeploymentSpec, now: datetime) -> P.Decision:
    try:
        return target_for(spec).idle(spec=spec, now=now)
    except Unsupported as exc:
        return P.Decision(spec.name, None, "skip", exc.why)


@flow(name="park_idle", log_prints=True)
def park_idle(specs: tuple[SpecFileParam, ...] = (), dry_run: bool = False) -> list[dict[str, Any]]:
    """Park every model idle longer than its schedule.idle_after (decisions shown before acting).

    Args:
        specs: Spec files to look at (empty: every bundled spec).
        dry_run: Show each model's decision, park nothing.
    """
    paths = specs or bundled_specs()
    loaded = [load_spec(ROOT / p if not Path(p).is_absolute() else p) for p in paths]
    now = datetime.now(UTC)
    decisions = [_idle(s, now) for s in loaded]
    from prefect.artifacts import create_table_artifact

    create_table_artifact(key="park-idle-decisions", table=[d.row() for d in decisions],
                          description="park_idle: one decision per model, before anything is done")
    for d in decisions:
        get_run_logger().info("%s: %s (%s)", d.model, d.action, d.reason)
    if not dry_run:
        for path, d in zip(paths, decisions, strict=True):
            if d.action == "park":
                park_model(spec=path, reason=f"idle: {d.reason}")
    return [d.row() for d in decisions]


@flow(name="sync_schedules", log_prints=True)
def sync_schedules(specs: tuple[SpecFileParam, ...] = (), park_deployment: OptionalText = None,
                   wake_deployment: OptionalText = None) -> list[dict[str, Any]]:
    """The specs' schedule.park / schedule.wake → Prefect deployment schedules (the specs are the truth).

    Wake schedules start early by the p95 of the model's measured wakes. With ``specs`` given only
    those specs' schedules are touched; without, every bundled spec's, and schedules of specs that are
    gone or lost their schedule are deleted.

    Args:
        specs: Spec files whose schedules to sync (empty: every bundled spec; others' schedules are removed).
        park_deployment: The park_model deployment to put park schedules on (empty: prefect.yaml's).
        wake_deployment: The wake_model deployment to put wake schedules on (empty: prefect.yaml's).
    """
    return schedules.sync(specs=list(specs) or None, park_deployment=park_deployment or None,
                          wake_deployment=wake_deployment or None)
