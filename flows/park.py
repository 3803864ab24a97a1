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
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows import vertex
from flows.report import Report, artifact_key
from flows.serving import cluster_location, load_timeout_s, scaled, smoke, wait_until_answering
from manifests import names
from manifests import park as P
from manifests.errors import FleetError
from manifests.fleet import SpecPath, bundled_specs
from manifests.spec import DeploymentSpec, load_spec, resolve_gke_spec
from tasks import gke, health, k8s
from tasks.inventory import list_kind
from tasks.locks import model_lock
from tasks.settings import get_settings

ROOT = Path(__file__).resolve().parents[1]
POOL_LABEL = P.POOL_LABEL


class NotDeployed(FleetError):
    """park/wake need the model's live Service (deploy_model creates it)."""


def _spec_ref(spec: Any) -> str | None:
    """The path a spec came from (what schedules and the wake event pass on), if it came from a file."""
    return str(spec) if isinstance(spec, str | Path) else None


def _event_ref(ref: str | None, spec: DeploymentSpec) -> str | None:
    """What the wake event names: the spec's file, else the bundled spec file with the same content."""
    if ref:
        return ref
    for path in bundled_specs():
        try:
            if load_spec(ROOT / path) == spec:
                return path
        except FleetError:
            continue
    return None


def _live_service(spec: DeploymentSpec, kubeconfig: str) -> dict[str, Any]:
    svc = k8s.get_object(kubeconfig=kubeconfig, api_version="v1", kind="Service", name=names.service(spec),
                         namespace=spec.namespace)
    if svc is None:
        raise NotDeployed(f"Service {spec.namespace}/{names.service(spec)} does not exist",
                          "deploy the model first (deploy_model with this spec)")
    return svc


def _deployment(spec: DeploymentSpec, kubeconfig: str, color: str) -> dict[str, Any] | None:
    return k8s.get_object(kubeconfig=kubeconfig, api_version="apps/v1", kind="Deployment",
                          name=names.deployment(spec, color), namespace=spec.namespace)


def _pool_nodes(spec: DeploymentSpec, kubeconfig: str) -> list[str]:
    nodes = k8s.list_objects(kubeconfig=kubeconfig, api_version="v1", kind="Node",
                             label_selector=f"{POOL_LABEL}={spec.accelerator.pool.name}")
    return [n["metadata"]["name"] for n in nodes]


def _pool(spec: DeploymentSpec, kubeconfig: str, location: str, nodes: list[str] | None = None) -> P.PoolState | None:
    """The GPU pool's settings and its nodes per zone, as GKE and Kubernetes report them (Standard only)."""
    if spec.cluster.mode != "standard":
        return None
    c, name = spec.cluster, spec.accelerator.pool.name
    pool = gke.get_node_pool(project=c.project, location=location, cluster=c.name, name=name)
    if pool is None:
        raise FleetError(f"node pool {name} does not exist in cluster {c.name}", "run provision_cluster first")
    nodes = _pool_nodes(spec, kubeconfig) if nodes is None else nodes
    return P.pool_state(pool, len(nodes), len(pool.get("locations") or []) or 1)


def _pool_users(spec: DeploymentSpec, kubeconfig: str, nodes: list[str]) -> list[str]:
    """Other workloads with pods on (or bound for) the GPU pool (``nodes``), from the whole cluster."""
    return P.pool_users(model=spec.name, pool=spec.accelerator.pool.name, nodes=nodes,
                        pods=list_kind(kubeconfig=kubeconfig, api_version="v1", kind="Pod"),
                        deployments=list_kind(kubeconfig=kubeconfig, api_version="apps/v1", kind="Deployment"))


def _apply_pool(spec: DeploymentSpec, *, kubeconfig: str, location: str, now: P.PoolState,
                plan_for: Callable[[P.PoolState], P.PoolPlan]) -> tuple[P.PoolPlan, list[str]]:
    """Apply ``plan_for(now)`` (``now``: the pool as just read): the autoscaling minimum first, then the
    size — planned again on a fresh read after a raised minimum (GKE resizes a pool whose new minimum is
    above its size); a lowered one resizes nothing, so the size follows at once (before the autoscaler
    races it for an empty node). Returns the plan and what changed."""
    c = spec.cluster
    where = {"project": c.project, "location": location, "cluster": c.name, "name": spec.accelerator.pool.name}
    plan = plan_for(now)
    done: list[str] = []
    if plan.min_nodes is not None:
        op = gke.set_node_pool_autoscaling(**where, min_nodes=plan.min_nodes, max_nodes=now.max_nodes)
        gke.wait_operation(project=c.project, location=location, operation=op)
        done.append(f"autoscaling min {now.min_nodes}→{plan.min_nodes} (max {now.max_nodes})")
        if plan.min_nodes > now.min_nodes:
            now = _pool(spec, kubeconfig, location)
            plan = replace(plan, size=plan_for(now).size)
    if plan.size is not None:
        op = gke.set_node_pool_size(**where, nodes=plan.size)
        gke.wait_operation(project=c.project, location=location, operation=op)
        done.append(f"size {now.nodes_per_zone}→{plan.size} per zone")
    return plan, done


def _credentials(spec: DeploymentSpec, report: Report) -> tuple[str, str]:
    with report.step("Get cluster credentials") as step:
        location = cluster_location(spec)
        kubeconfig = gke.get_credentials(project=spec.cluster.project, location=location, name=spec.cluster.name)
        step.detail = f"{spec.cluster.name} in {location}"
    return location, kubeconfig


def _prefect_api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@dataclass
class Run:
    """What park and wake both start from: the spec, the cluster, the Slack thread, the live Service."""

    spec: DeploymentSpec
    ref: str | None  # the spec's file, if it came from one
    kubeconfig: str
    location: str
    report: Report
    service: dict[str, Any]
    record: P.ParkRecord | None


def _under_model_lock(flow_name: str, spec: Any, reason: str, body: Callable[[Run], dict[str, Any]]) -> dict[str, Any]:
    """park_model's and wake_model's shared frame: the spec, the Slack thread, cluster credentials, the
    model's lock (the one releases take: never mid-release), the live Service and its park record —
    then ``body``, the flow's own steps. The report goes to Slack and the artifact either way."""
    ref = _spec_ref(spec)
    spec = resolve_gke_spec(spec, flow=flow_name)
    verb = flow_name.removesuffix("_model")
    report = Report(flow_name, f"{spec.name} ({reason})", spec.slack_channel)
    try:
        location, kubeconfig = _credentials(spec, report)
        with model_lock(spec, purpose=verb):
            svc = _live_service(spec, kubeconfig)
            result = body(Run(spec, ref, kubeconfig, location, report, svc, P.read_record(svc)))
        report.succeed(result["outcome"])
        return result
    except Exception as exc:
        report.fail(exc)
        raise
    finally:
        report.markdown_artifact(artifact_key(verb, spec.name))


def _annotate_record(run: Run, record: P.ParkRecord) -> None:
    k8s.annotate(kubeconfig=run.kubeconfig, api_version="v1", kind="Service", name=names.service(run.spec),
                 namespace=run.spec.namespace, annotations={P.PARK_RECORD: record.to_annotation(), P.ACTIVITY: None})


# ---- park ------------------------------------------------------------------------------------------

@flow(name="park_model", log_prints=True)
def park_model(spec: SpecPath | str | dict[str, Any] = "deployments/gemma2-2b-it-vllm-l4.yaml",
               reason: str = "manual") -> dict[str, Any]:
    """Replicas to 0, hold proxy in front, GPU node pool to 0 — recorded on the cluster for wake_model."""
    if vertex.is_vertex(spec):  # target: vertex: Vertex AI's steps (flows/vertex.py)
        return vertex.park(spec)
    return _under_model_lock("park_model", spec, reason, _park)


def _park(run: Run) -> dict[str, Any]:
    spec, kubeconfig, report, record = run.spec, run.kubeconfig, run.report, run.record
    changed: list[str] = []
    with report.step("Record what park changes, on the live Service") as step:
        if record is None:
            svc = run.service
            color = (svc["spec"].get("selector") or {}).get(names.COLOR_LABEL)
            if color not in names.COLORS:
                raise FleetError(f"Service {names.service(spec)} selects {svc['spec'].get('selector')}, not a color",
                                 "deploy the model (or finish its release) before parking it")
            dep = _deployment(spec, kubeconfig, color) or {}
            replicas = int((dep.get("spec") or {}).get("replicas") or 0) or spec.replicas
            record = P.ParkRecord(color=color, replicas=replicas, selector=dict(svc["spec"]["selector"]),
                                  parked_at=datetime.now(UTC).isoformat(),
                                  pool=_pool(spec, kubeconfig, run.location), held=spec.hold.enabled,
                                  pool_changed=())
            _annotate_record(run, record)
            changed.append("recorded")
            step.detail = (f"{record.color} × {record.replicas}" +
                           (f", pool {record.pool.name} min {record.pool.min_nodes}/max {record.pool.max_nodes}, "
                            f"{record.pool.nodes_per_zone} node(s) per zone" if record.pool else ", Autopilot"))
        else:
            step.detail = f"already recorded at {record.parked_at}: resuming"

    if record.held:
        with report.step("Put the hold proxy in front of the model") as step:
            k8s.apply_object(kubeconfig=kubeconfig, obj=P.awake_service(spec, record.color))
            # replicas 1: a wake scaled the proxy to 0; the Service moves only once it is Ready
            applied = k8s.apply_object(kubeconfig=kubeconfig, obj=P.hold_proxy_deployment(
                spec, prefect_api_url=_prefect_api_url(), spec_ref=_event_ref(run.ref, spec)))
            k8s.wait_rollout(kubeconfig=kubeconfig, namespace=spec.namespace, name=P.hold_deployment_name(spec),
                             timeout_s=max(60.0, load_timeout_s(spec, None)))
            live = (_live_service(spec, kubeconfig)["spec"].get("selector") or {})
            if live != P.hold_selector(spec):
                k8s.patch_service_selector(kubeconfig=kubeconfig, namespace=spec.namespace, name=names.service(spec),
                                           selector=P.hold_selector(spec), expect=record.selector)
                changed.append("held")
            step.detail = f"{P.hold_deployment_name(spec)} {applied.action}; {names.service(spec)} → hold proxy"
    else:
        report.skip("Put the hold proxy in front of the model", "hold.enabled is false: requests get 503 while parked")

    with report.step("Scale the model to 0 and wait until no GPU pod remains") as step:
        dep = _deployment(spec, kubeconfig, record.color) or {}
        if int((dep.get("spec") or {}).get("replicas") or 0) != 0:
            k8s.scale_deployment(kubeconfig=kubeconfig, namespace=spec.namespace,
                                 name=names.deployment(spec, record.color), replicas=0)
            changed.append("scaled")
        k8s.wait_pods_gone(kubeconfig=kubeconfig, namespace=spec.namespace,
                           selector={"app.kubernetes.io/instance": spec.name,
                                     "app.kubernetes.io/component": "model-server"},
                           timeout_s=max(120.0, 90 * get_settings().time_scale))
        step.detail = f"{names.deployment(spec, record.color)}: 0 replicas, 0 pods"

    shared = False
    with report.step("GPU node pool to 0 unless another model still needs it") as step:
        if record.pool is None:
            step.detail = "Autopilot: the GPU nodes go with the pods"
        else:
            # Who needs the pool is read last thing before the resize: a model waking on it meanwhile
            # has its pods or its scaled-up Deployment in the cluster by then.
            nodes = _pool_nodes(spec, kubeconfig)
            now = _pool(spec, kubeconfig, run.location, nodes)
            users = _pool_users(spec, kubeconfig, nodes)
            first = P.plan_park_pool(now, users=users, changed=record.pool_changed or ())
            if first.changed != record.pool_changed:  # recorded before it is done: wake undoes exactly this
                record = replace(record, pool_changed=first.changed)
                _annotate_record(run, record)
            plan, done = _apply_pool(spec, kubeconfig=kubeconfig, location=run.location, now=now,
                                     plan_for=lambda now: P.plan_park_pool(now, users=users,
                                                                           changed=record.pool_changed or ()))
            changed += done
            shared = bool(users)
            step.detail = ("; ".join(done + [plan.note]) if done else
                           f"{record.pool.name}: nothing to change ({plan.note})")
            if shared:
                report.note(f"GPU pool {record.pool.name} is {plan.note}.")
    outcome = (f"parked {spec.name}: 0 GPU pods" +
               ("" if record.pool is None else
                f", pool {record.pool.name} left to the cluster autoscaler (shared)" if shared else ", 0 GPU nodes") +
               ("; requests are held by the hold proxy and wake it" if record.held else ""))
    if changed == []:
        outcome = f"{spec.name} was already parked: nothing changed"
    return {"name": spec.name, "parked": True, "changed": changed, "record": json.loads(record.to_annotation()),
            "shared_pool": shared, "outcome": outcome}


# ---- wake ------------------------------------------------------------------------------------------

@flow(name="wake_model", log_prints=True)
def wake_model(spec: SpecPath | str | dict[str, Any] = "deployments/gemma2-2b-it-vllm-l4.yaml",
               reason: str = "manual") -> dict[str, Any]:
    """Restore what park changed (pool, replicas), wait until the model answers, route to it."""
    if vertex.is_vertex(spec):  # target: vertex: Vertex AI's steps (flows/vertex.py)
        return vertex.wake(spec)
    return _under_model_lock("wake_model", spec, reason, _wake)


def _wake(run: Run) -> dict[str, Any]:
    spec, kubeconfig, report, record = run.spec, run.kubeconfig, run.report, run.record
    start = time.monotonic()
    if record is None:
        report.skip("Restore the GPU pool and replicas", "not parked (no park record on the live Service)")
        retired = _retire_hold_proxy(run, settle_s=0.0, quiet=True)  # a wake killed after its switch
        return {"name": spec.name, "woken": False, "changed": ["hold proxy to 0"] if retired else [],
                "outcome": f"{spec.name} is not parked: nothing to do"}
    with report.step("Restore what park changed on the GPU pool") as step:
        if record.pool is None:
            step.detail = "Autopilot: nodes come with the pods"
        else:
            plan, done = _apply_pool(spec, kubeconfig=kubeconfig, location=run.location,
                                     now=_pool(spec, kubeconfig, run.location),
                                     plan_for=lambda now: P.plan_wake_pool(record, now))
            step.detail = "; ".join(done + [plan.note])
    with report.step("Restore the replicas") as step:
        k8s.apply_object(kubeconfig=kubeconfig, obj=P.awake_service(spec, record.color))
        k8s.scale_deployment(kubeconfig=kubeconfig, namespace=spec.namespace,
                             name=names.deployment(spec, record.color), replicas=record.replicas)
        step.detail = f"{names.deployment(spec, record.color)} × {record.replicas}"
    with report.step("Wait until the model answers and passes the smoke prompts") as step:
        ready = wait_until_answering(spec, kubeconfig=kubeconfig, color=record.color, replicas=record.replicas,
                                     timeout_s=load_timeout_s(spec, None), service=P.awake_service_name(spec))
        results = smoke(spec, kubeconfig=kubeconfig, service=P.awake_service_name(spec))
        step.detail = f"{ready['ready_pods']} pod(s) answer, {len(results)} smoke prompt(s) passed"
    with report.step("Point the live Service back at the model") as step:
        live = _live_service(spec, kubeconfig)["spec"].get("selector") or {}
        if live != record.selector:
            k8s.patch_service_selector(kubeconfig=kubeconfig, namespace=spec.namespace, name=names.service(spec),
                                       selector=record.selector, expect=live)
        took = time.monotonic() - start
        cloud_s = took / (get_settings().time_scale or 1.0)
        k8s.annotate(kubeconfig=kubeconfig, api_version="v1", kind="Service", name=names.service(spec),
                     namespace=spec.namespace, annotations={P.PARK_RECORD: None, P.ACTIVITY: None})
        step.detail = f"{names.service(spec)} → {record.color}"
    _retire_hold_proxy(run, settle_s=scaled(spec.release.scale_down_delay.total_seconds()))
    # Real seconds: Prefect schedules fire on the wall clock, also against the (time-scaled) sandbox.
    history = record_wake(spec, took)
    if run.ref and spec.schedule and spec.schedule.wake:
        try:
            sync_schedules.fn(specs=[run.ref])  # the next scheduled wake starts earlier by the new p95
        except FleetError as exc:
            get_run_logger().warning("prewarm not updated: %s", exc)
    outcome = f"{spec.name} serving again after {took:.1f} s" + (
        f" ({cloud_s:.0f} s on the cloud clock)" if get_settings().time_scale != 1.0 else "")
    return {"name": spec.name, "woken": True, "took_s": took, "cloud_s": cloud_s, "color": record.color,
            "replicas": record.replicas, "wake_history": history, "outcome": outcome}


def _retire_hold_proxy(run: Run, *, settle_s: float, quiet: bool = False) -> bool:
    """The hold proxy to 0 once the live Service routes to the model again: nothing keeps running that
    only a parked model needs. It waits ``settle_s`` first (release.scale_down_delay, as a blue-green
    switch does: kube-proxy on every node needs time after a selector change), and a proxy pod on its
    way out still finishes the requests it forwards (aiohttp's graceful shutdown, hold.timeout + 5 s
    of grace). Returns whether it scaled the proxy down."""
    spec, kubeconfig = run.spec, run.kubeconfig
    name = P.hold_deployment_name(spec)
    dep = k8s.get_object(kubeconfig=kubeconfig, api_version="apps/v1", kind="Deployment", name=name,
                         namespace=spec.namespace)
    running = int(((dep or {}).get("spec") or {}).get("replicas") or 0) > 0
    if quiet and not running:
        return False
    if dep is None:
        run.report.skip("Scale the hold proxy to 0 once the switch has settled", "no hold proxy (hold.enabled is false)")
        return False
    with run.report.step("Scale the hold proxy to 0 once the switch has settled") as step:
        if not running:
            step.detail = f"{name} is not running"
            return False
        if (_live_service(spec, kubeconfig)["spec"].get("selector") or {}) == P.hold_selector(spec):
            step.detail = f"{names.service(spec)} still selects {name}: kept"
            return False
        time.sleep(settle_s)
        k8s.scale_deployment(kubeconfig=kubeconfig, namespace=spec.namespace, name=name, replicas=0)
        step.detail = f"{name} → 0 after {settle_s:g} s (the next park scales it up again)"
    return True


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


# ---- idle policy -----------------------------------------------------------------------------------

def observe_idle(spec: DeploymentSpec, now: datetime) -> P.Decision:
    """Serving metrics through the live Service → the stored activity record → a decision."""
    try:
        location = cluster_location(spec)
        kubeconfig = gke.get_credentials(project=spec.cluster.project, location=location, name=spec.cluster.name)
    except FleetError as exc:
        return P.Decision(spec.name, None, "skip", f"no cluster: {exc.problem}")
    svc = k8s.get_object(kubeconfig=kubeconfig, api_version="v1", kind="Service", name=names.service(spec),
                         namespace=spec.namespace)
    if svc is None:
        return P.Decision(spec.name, None, "skip", "not deployed")
    if P.read_record(svc) is not None:
        return P.decide_park(P.Observed(spec.name, True, 0, 0, None), spec.schedule, now)
    color = (svc["spec"].get("selector") or {}).get(names.COLOR_LABEL)
    dep = _deployment(spec, kubeconfig, color) if color in names.COLORS else None
    replicas = int(((dep or {}).get("status") or {}).get("readyReplicas") or 0)
    if replicas == 0:
        return P.decide_park(P.Observed(spec.name, False, 0, 0, None), spec.schedule, now)
    metrics = P.parse_metrics(health.read_metrics(kubeconfig=kubeconfig, namespace=spec.namespace,
                                                  service=names.service(spec)), spec.engine.kind)
    previous = P.Activity.from_annotation((svc["metadata"].get("annotations") or {}).get(P.ACTIVITY))
    activity, known = P.observe_activity(previous, metrics, now)
    if activity != previous:
        k8s.annotate(kubeconfig=kubeconfig, api_version="v1", kind="Service", name=names.service(spec),
                     namespace=spec.namespace, annotations={P.ACTIVITY: activity.to_annotation()})
    observed = P.Observed(spec.name, False, replicas, metrics.running + metrics.waiting,
                          datetime.fromisoformat(activity.last_active) if known else None)
    return P.decide_park(observed, spec.schedule, now)


@flow(name="park_idle", log_prints=True)
def park_idle(specs: list[SpecPath | str] | None = None, dry_run: bool = False) -> list[dict[str, Any]]:
    """Park every model idle longer than its schedule.idle_after (decisions shown before acting)."""
    paths = specs or bundled_specs()
    loaded = [load_spec(ROOT / p if not Path(p).is_absolute() else p) for p in paths]
    now = datetime.now(UTC)
    decisions = [observe_idle(s, now) if s.target == "gke" else P.Decision(s.name, None, "skip", "not on GKE")
                 for s in loaded]
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


# ---- schedules ---------------------------------------------------------------------------------------

@flow(name="sync_schedules", log_prints=True)
def sync_schedules(specs: list[SpecPath | str] | None = None, park_deployment: str = "park_model/default",
                   wake_deployment: str = "wake_model/default") -> list[dict[str, Any]]:
    """The specs' schedule.park / schedule.wake → Prefect deployment schedules (the specs are the truth).

    Wake schedules start early by the p95 of the model's measured wakes. With ``specs`` given only
    those specs' schedules are touched; without, every bundled spec's, and schedules of specs that are
    gone or lost their schedule are deleted.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.exceptions import ObjectNotFound

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
        get_run_logger().info("%s %s: %s %s (%s)", r["action"], r["schedule"], r["deployment"], r["cron"], r["timezone"])
    return rows
