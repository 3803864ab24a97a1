"""check_fleet (scheduled): is every deployed model answering, and is it what its spec says?

1. For each spec, find its cluster and live Service; skip what is not deployed, note what is parked
2. Probe through the Service: engine readiness, one smoke prompt, its latency
3. Read the engine's /metrics: queue, KV-cache use, error counters
4. Compare the live Deployment with the spec: replicas, revision annotation, hand edits
5. One Slack alert per incident: posted when it starts, edited while it lasts, resolved once when it
   clears (the incident lives in a Prefect Variable, so each run continues the last one's); a healthy
   fleet posts nothing. Each start and end is also a Prefect event automations can act on.

The probe is the target's ``observe`` (GKE: targets/gke/health_checks.py); this flow owns the incidents.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.events import emit_event
from prefect.variables import Variable

from manifests.fleet import OptionalText, SpecParam, bundled_specs, load_fleet
from manifests.spec import DeploymentSpec, SpecError, resolve_spec
from targets import Check, Unsupported, target_for
from tasks.alerts import edit_alert, open_alert, reply_alert
from tasks.log import logger
from tasks.settings import get_settings

__all__ = ["Check", "check_fleet", "incident_step"]

UNHEALTHY = "llm-fleet.model.unhealthy"


RECOVERED = "llm-fleet.model.recovered"


# ---- pure: one incident per model -----------------------------------------------------------------

def incident_step(prev: dict[str, Any] | None, check: Check, now: float) -> tuple[str, dict[str, Any] | None]:
    """(action, next state): open when it starts, update while it lasts, resolve once when it clears."""
    bad = check.status == "unhealthy"
    if bad and prev is None:
        return "open", {"started": now, "last": now, "checks": 1, "first": check.problems[:1],
                        "latest": check.problems[:3]}
    if bad:
        return "update", {**prev, "last": now, "checks": prev.get("checks", 0) + 1, "latest": check.problems[:3]}
    if prev is not None and check.status in ("healthy", "parked", "not deployed"):
        return "resolve", None
    return "none", prev


def _ago(seconds: float) -> str:
    minutes = seconds / 60
    return f"{seconds:.0f} s" if minutes < 1 else (f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h")


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S UTC")


def alert_text(spec: DeploymentSpec, state: dict[str, Any], now: float, *, resolved: bool = False) -> str:
    where = f"`{spec.name}` ({spec.model.id}, {spec.cluster.name}/{spec.namespace})"
    lasted = _ago(now - state["started"])
    if resolved:
        return (f"✅ *resolved* {where}: unhealthy from {_stamp(state['started'])} for {lasted} "
                f"({state['checks']} checks). First cause: {'; '.join(state['first']) or '?'}")
    return (f"🔴 *unhealthy* {where} since {_stamp(state['started'])} ({lasted}, {state['checks']} checks)\n"
            f"Now: {'; '.join(state['latest']) or '?'}\nFirst: {'; '.join(state['first']) or '?'}")


def variable_name(spec: DeploymentSpec) -> str:
    return re.sub(r"[^a-z0-9_-]", "-", f"llm-fleet-incident-{spec.cluster.project}-{spec.namespace}-{spec.name}")


def resource(spec: DeploymentSpec) -> dict[str, str]:
    return {"prefect.resource.id": f"llm-fleet.model.{spec.cluster.project}.{spec.namespace}.{spec.name}",
            "prefect.resource.name": spec.name, "llm-fleet.model": spec.model.id,
            "llm-fleet.cluster": spec.cluster.name}


def follow_incident(spec: DeploymentSpec, check: Check, *, channel: str) -> str:
    """Advance the model's incident by one check; Slack and events only on start, change and end."""
    var = variable_name(spec)
    prev = Variable.get(var, default=None)
    prev = prev if isinstance(prev, dict) and prev else None
    now = time.time()
    action, state = incident_step(prev, check, now)
    if action == "open":
        state["alert"] = open_alert(channel=channel, text=alert_text(spec, state, now))
        emit_event(UNHEALTHY, resource=resource(spec), payload={"problems": check.problems, "check": check.row()})
    elif action == "update" and state.get("alert"):
        edit_alert(alert=state["alert"], text=alert_text(spec, state, now))
    elif action == "resolve":
        if prev.get("alert"):
            edit_alert(alert=prev["alert"], text=alert_text(spec, prev, now, resolved=True))
            reply_alert(alert=prev["alert"], text=f"✅ all clear: {spec.name} answers again"
                        + (f" ({check.latency_ms:.0f} ms)" if check.latency_ms is not None else "")
                        + f" after {_ago(now - prev['started'])}")
        emit_event(RECOVERED, resource=resource(spec),
                   payload={"unhealthy_s": round(now - prev["started"], 3), "checks": prev.get("checks", 0)})
    if action in ("open", "update"):
        Variable.set(var, state, overwrite=True)
    elif action == "resolve":
        Variable.set(var, {}, overwrite=True)
    return action


def _specs(specs: list[Any] | None, fleet: str | None) -> list[Any]:
    if fleet:
        return [str(p) for p in load_fleet(fleet)]
    return list(specs) if specs else bundled_specs()


@flow(name="check_fleet", log_prints=True)
def check_fleet(specs: tuple[SpecParam, ...] = (), fleet: OptionalText = None,
                smoke: bool = True) -> dict[str, Any]:
    """Probe every deployed model through its Service, read its metrics, compare it with its spec; one
    Slack alert per incident (never a message per run).

    Args:
        specs: Specs to check (empty: every bundled spec).
        fleet: A fleet file (deployments/fleets/*.yaml) instead of specs.
        smoke: Also send each model a smoke prompt (not only readiness and /metrics).
    """
    log = logger()
    channel = get_settings().slack_channel
    seen: dict[str, Any] = {}  # what the scan already looked up (each cluster's credentials, pools sighted)
    checks: list[Check] = []
    actions: dict[str, str] = {}
    for ref in _specs(specs, fleet):
        try:
            spec = resolve_spec(ref)
        except SpecError as exc:
            checks.append(Check(str(ref), status="error", problems=[str(exc)]))
            continue
        try:
            check = target_for(spec).observe(spec=spec, smoke=smoke, seen=seen)
        except Unsupported:
            continue  # a target without a health probe (Vertex AI) is not in the table
        except Exception as exc:  # noqa: BLE001 - one model's failure is a row, not the end of the scan
            check = Check(spec.name, spec.namespace, spec.cluster.name, status="error",
                          problems=[str(exc).splitlines()[0][:200]])
        checks.append(check)
        if check.status != "error":
            actions[spec.name] = follow_incident(spec, check, channel=spec.slack_channel or channel)
        log.info("%s: %s %s", check.model, check.status, "; ".join(check.problems + check.drift))
    rows = [c.row() | {"alert": actions.get(c.model, "")} for c in checks]
    create_table_artifact(key="check-fleet", table=rows,
                          description=f"Fleet health at {datetime.now(UTC):%Y-%m-%d %H:%M UTC}: "
                          f"{sum(c.status == 'healthy' for c in checks)} healthy, "
                          f"{sum(c.status == 'unhealthy' for c in checks)} unhealthy")
    return {"checks": rows, "unhealthy": [c.model for c in checks if c.status == "unhealthy"]}
