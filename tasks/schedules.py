"""Prefect deployment schedules from the specs (schedule.park / schedule.wake), and the measured wake
times the wake schedules start early by (a Prefect Variable per model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from manifests import park as P
from manifests.errors import FleetError
from manifests.fleet import SpecPath, bundled_specs, deployment_name
from manifests.spec import DeploymentSpec, load_spec
from tasks.log import logger

ROOT = Path(__file__).resolve().parents[1]


def record_wake(spec: DeploymentSpec, seconds: float) -> list[float]:
    """Append a measured wake time to the spec's Prefect Variable (the prewarm p95 reads it)."""
    from prefect.variables import Variable

    name = P.wake_variable(spec)
    history = P.add_wake(list(Variable.get(name, default=[]) or []), seconds)
    Variable.set(name, history, overwrite=True)
    return history


def wake_history(spec: DeploymentSpec) -> list[float]:
    from prefect.variables import Variable

    return [float(x) for x in (Variable.get(P.wake_variable(spec), default=[]) or [])]


def sync(specs: list[SpecPath | str] | None = None, park_deployment: str | None = None,
         wake_deployment: str | None = None) -> list[dict[str, Any]]:
    """The specs' schedule.park / schedule.wake → Prefect deployment schedules (the specs are the truth).

    Wake schedules start early by the p95 of the model's measured wakes. With ``specs`` given only
    those specs' schedules are touched; without, every bundled spec's, and schedules of specs that are
    gone or lost their schedule are deleted.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.exceptions import ObjectNotFound

    park_deployment = park_deployment or deployment_name("park_model")  # prefect.yaml's, by default
    wake_deployment = wake_deployment or deployment_name("wake_model")
    paths = specs or bundled_specs()
    desired: list[P.ScheduleEntry] = []
    for path in paths:
        spec = load_spec(ROOT / path if not Path(path).is_absolute() else path)
        desired += P.desired_schedules(spec, spec_ref=path, wake_seconds=wake_history(spec),
                                       park_deployment=park_deployment, wake_deployment=wake_deployment)
    mine = {f"{P.SLUG_PREFIX}{kind}-{load_spec(ROOT / p if not Path(p).is_absolute() else p).name}"
            for p in paths for kind in ("park", "wake")}
    rows: list[dict[str, Any]] = []
    with get_client(sync_client=True) as client:
        ids: dict[str, Any] = {}
        existing: dict[str, list[dict[str, Any]]] = {}
        for dep_name in (park_deployment, wake_deployment):
            try:
                dep = client.read_deployment_by_name(dep_name)
            except ObjectNotFound:
                raise FleetError(f"Prefect deployment {dep_name} does not exist",
                                 "run `prefect --no-prompt deploy --all` (prefect.yaml) first") from None
            ids[dep_name] = dep.id
            existing[dep_name] = [
                {"id": s.id, "slug": s.slug, "cron": getattr(s.schedule, "cron", None),
                 "timezone": getattr(s.schedule, "timezone", None), "parameters": s.parameters or {}}
                for s in client.read_deployment_schedules(dep.id)
                # with only some specs given, leave the other specs' schedules alone
                if specs is None or s.slug in mine]
        for ch in P.plan_schedules(desired, existing):
            dep_id = ids[ch.deployment]
            cron = CronSchedule(cron=ch.cron, timezone=ch.timezone)
            if ch.action == "create":
                client.create_deployment_schedules(dep_id, [DeploymentScheduleCreate(
                    schedule=cron, active=True, parameters=ch.parameters, slug=ch.slug)])
            elif ch.action == "update":
                client.update_deployment_schedule(dep_id, ch.id, schedule=cron, active=True,
                                                  parameters=ch.parameters, slug=ch.slug)
            elif ch.action == "delete":
                client.delete_deployment_schedule(dep_id, ch.id)
            rows.append({"deployment": ch.deployment, "schedule": ch.slug, "action": ch.action, "cron": ch.cron,
                         "timezone": ch.timezone})
    for r in rows:
        logger().info("%s %s: %s %s (%s)", r["action"], r["schedule"], r["deployment"], r["cron"], r["timezone"])
    return rows
