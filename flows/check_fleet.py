"""check_fleet (scheduled): is every deployed model answering, and is it what its spec says?

1. For each spec, find its cluster and live Service; skip what is not deployed, note what is parked
2. Probe through the Service: engine readiness, one smoke prompt, its latency
3. Read the engine's /metrics: queue, KV-cache use, error counters
4. Compare the live Deployment with the spec: replicas, revision annotation, hand edits
5. One Slack alert per incident: posted when it starts, edited while it lasts, resolved once when it
   clears (the incident lives in a Prefect Variable, so each run continues the last one's); a healthy
   fleet posts nothing. Each start and end is also a Prefect event automations can act on.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.events import emit_event
from prefect.variables import Variable

from flows.provision_cluster import find_cluster
from manifests import names, park
from manifests.fleet import SpecPath, bundled_specs, load_fleet
from manifests.render import model_deployment
from manifests.rollout import diagnose
from manifests.spec import DeploymentSpec, SpecError, resolve_spec
from tasks import gke, health, k8s
from tasks.alerts import edit_alert, open_alert, reply_alert
from tasks.clients import kube_client, kube_http
from tasks.log import logger
from tasks.settings import get_settings
from tasks.usage import ledger_name, record_usage

UNHEALTHY = "llm-fleet.model.unhealthy"
RECOVERED = "llm-fleet.model.recovered"
COMMIT = re.compile(r"^[0-9a-f]{40}$")
# Engine metrics worth a column: (engine, metric) -> column.
METRICS = {
    "vllm": {"vllm:num_requests_waiting": "queue", "vllm:num_requests_running": "running",
             "vllm:kv_cache_usage_perc": "kv_cache", "vllm:gpu_cache_usage_perc": "kv_cache"},
    "tgi": {"tgi_queue_size": "queue", "tgi_batch_current_size": "running", "tgi_request_failure": "errors"},
    "sglang": {"sglang:num_queue_reqs": "queue", "sglang:num_running_reqs": "running",
               "sglang:token_usage": "kv_cache"},
}


@dataclass
class Check:
    model: str
    namespace: str = ""
    cluster: str = ""
    status: str = "healthy"  # healthy | unhealthy | parked | not deployed | error
    color: str = ""
    ready: str = ""
    latency_ms: float | None = None
    queue: float | None = None
    running: float | None = None
    kv_cache: float | None = None
    errors: float | None = None
    drift: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d["drift"] = ", ".join(self.drift)
        d["problems"] = "; ".join(self.problems)
        return d


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


# ---- probes ---------------------------------------------------------------------------------------

def parse_metrics(text: str, engine: str) -> dict[str, float]:
    """The engine's Prometheus text → {queue, running, kv_cache, errors} (summed over label sets)."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = METRICS.get(engine, {})
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            column = wanted.get(name) or wanted.get(name.removesuffix("_total"))
            if column is None and engine == "vllm" and name.startswith("vllm:request_success") and \
                    sample.labels.get("finished_reason") in ("abort", "error"):
                column = "errors"
            if column:
                out[column] = out.get(column, 0.0) + float(sample.value)
    return out


def drift(spec: DeploymentSpec, live: dict[str, Any], color: str) -> list[str]:
    """Fields where the live Deployment differs from what the spec renders (hand edits, stale spec)."""
    revision = (live["metadata"].get("annotations") or {}).get(names.REVISION_ANNOTATION, spec.model.revision)
    out: list[str] = []
    if COMMIT.match(spec.model.revision) and revision != spec.model.revision:
        out.append(f"revision {revision[:12]} (spec pins {spec.model.revision[:12]})")
    want = model_deployment(spec, color, revision=revision)  # type: ignore[arg-type]
    fields = k8s._diff({"spec": want["spec"]}, {"spec": live.get("spec", {})})
    if spec.autoscaling is not None:  # the HPA owns replicas
        fields = [f for f in fields if f != "spec.replicas"]
    for f in fields:
        if f == "spec.replicas":
            out.append(f"replicas {live['spec'].get('replicas')} (spec {want['spec']['replicas']})")
        else:
            out.append(f"hand edit: {f}")
    return out


def probe(spec: DeploymentSpec, kubeconfig: str, check: Check, *, smoke: bool) -> None:
    """Fill ``check`` from the live objects and the engine, through the Service (no retries: a probe
    that fails is the data point)."""
    svc = k8s.get_object.fn(kubeconfig=kubeconfig, api_version="v1", kind="Service", name=names.service(spec),
                            namespace=spec.namespace)
    if svc is None:
        check.status = "not deployed"
        return
    if park.read_record(svc) is not None:  # park_model's record: parked on purpose (maybe behind the hold proxy)
        check.status, check.ready = "parked", "0/0"
        return
    color = (svc.get("spec", {}).get("selector") or {}).get(names.COLOR_LABEL, "")
    check.color = color
    dep = k8s.get_object.fn(kubeconfig=kubeconfig, api_version="apps/v1", kind="Deployment",
                            name=names.deployment(spec, color), namespace=spec.namespace) if color else None
    if dep is None:
        check.status, check.problems = "unhealthy", [f"the Service selects color {color!r}, which has no Deployment"]
        return
    desired = int(dep["spec"].get("replicas") or 0)
    if desired == 0:
        check.status, check.ready = "parked", "0/0"
        return
    check.drift = drift(spec, dep, color)
    api = kube_client(kubeconfig)
    pods = k8s.list_objects.fn(kubeconfig=kubeconfig, api_version="v1", kind="Pod", namespace=spec.namespace,
                               label_selector=",".join(f"{k}={v}" for k, v in names.selector(spec, color).items()))
    progress = diagnose(pods, desired=desired)
    ready = sum(1 for p in pods if any(c.get("type") == "Ready" and c.get("status") == "True"
                                       for c in (p.get("status") or {}).get("conditions") or []))
    check.ready = f"{ready}/{desired}"
    if progress.state == "failed" or ready < desired:
        check.problems.append(progress.message if progress.state != "ready" else f"{ready} of {desired} pods Ready")
    try:
        health.check_engine_ready.fn(kubeconfig=kubeconfig, namespace=spec.namespace, service=names.service(spec),
                                     engine=spec.engine.kind, model_id=spec.model.id)
        # A prompt every few minutes would look like traffic to park_idle: models it may park get none.
        if smoke and not (spec.schedule and spec.schedule.idle_after):
            result = health.smoke_test.fn(kubeconfig=kubeconfig, namespace=spec.namespace,
                                          service=names.service(spec), engine=spec.engine.kind,
                                          model_id=spec.model.id, prompts=spec.release.smoke_prompts[:1],
                                          max_tokens=min(spec.release.smoke_max_tokens, 16),
                                          expect=spec.release.expect, stream=False)
            check.latency_ms = round(result[0].latency_s * 1000, 1)
    except Exception as exc:  # noqa: BLE001 - any failure to answer is the finding
        check.problems.insert(0, f"not answering through the Service: {str(exc).splitlines()[0][:160]}")
    try:
        resp = kube_http(api, timeout=10).get(f"{health.service_base(spec.namespace, names.service(spec))}/metrics")
        if resp.status_code == 200:
            for k, v in parse_metrics(resp.text, spec.engine.kind).items():
                setattr(check, k, round(v, 3))
    except Exception as exc:  # noqa: BLE001
        logger().info("%s: /metrics unreadable (%s)", spec.name, exc)
    if check.problems:
        check.status = "unhealthy"


def check_one(spec: DeploymentSpec, kubeconfigs: dict[tuple[str, str], tuple[str, str | None]], *,
              smoke: bool, observed: set[str]) -> Check:
    c = spec.cluster
    check = Check(spec.name, spec.namespace, c.name)
    key = (c.project, c.name)
    if key not in kubeconfigs:
        location, found = find_cluster(spec)
        kubeconfigs[key] = (location, gke.get_credentials(project=c.project, location=location, name=c.name)
                            if found else None)
    _, kubeconfig = kubeconfigs[key]
    if kubeconfig is None:
        check.status = "not deployed"
        return check
    if ledger_name(spec) not in observed:  # a sighting of the GPU nodes for gpu_report, once per pool
        observed.add(ledger_name(spec))
        try:
            record_usage(spec, kubeconfig=kubeconfig)
        except Exception as exc:  # noqa: BLE001 - the report loses precision, the health check goes on
            logger().warning("%s: usage not recorded (%s)", spec.name, exc)
    probe(spec, kubeconfig, check, smoke=smoke)
    return check


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
def check_fleet(specs: list[SpecPath | str | dict[str, Any]] | None = None, fleet: str | None = None,
                smoke: bool = True) -> dict[str, Any]:
    """Probe every deployed model through its Service, read its metrics, compare it with its spec; one
    Slack alert per incident (never a message per run)."""
    log = logger()
    channel = get_settings().slack_channel
    kubeconfigs: dict[tuple[str, str], tuple[str, str | None]] = {}
    checks: list[Check] = []
    actions: dict[str, str] = {}
    observed: set[str] = set()
    for ref in _specs(specs, fleet):
        try:
            spec = resolve_spec(ref)
        except SpecError as exc:
            checks.append(Check(str(ref), status="error", problems=[str(exc)]))
            continue
        if spec.target != "gke":
            continue
        try:
            check = check_one(spec, kubeconfigs, smoke=smoke, observed=observed)
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
