"""GKE park (the park_model flow) and the idle policy (park_idle): GPUs to zero when nobody needs them.

park_model
1. Take the model's lock (the one releases take: never a park mid-release)
2. Record what park changes, on the live Service (color, replicas, GPU pool settings)
3. Put the hold proxy in front: the live Service selects it while parked (on a Gateway, the HTTPRoute's
   backend moves from the InferencePools to that Service: the pools have no pods to pick while parked)
   and the pools' endpoint pickers go to 0 (recorded: wake brings them back before the route returns)
4. Scale the model to 0 and wait until none of its GPU pods remains
5. GPU node pool to 0 unless another model still needs it (Standard; shared: the autoscaling minimum
   to 0 only, the cluster autoscaler removes what this model left; Autopilot: the nodes go with the pods)

The frame park and wake share (credentials, the model's lock, the live Service and its park record)
is ``under_model_lock``; wake's own steps are in wake_steps.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import SecretStr

from manifests import gateway, names, startup
from manifests import park as P
from manifests.errors import FleetError
from manifests.fleet import bundled_specs
from manifests.spec import DeploymentSpec, load_spec, resolve_gke_spec
from targets.gke.capacity import capacity_for
from targets.gke.serving import cluster_location, load_timeout_s, scaled
from tasks import gke, health, k8s
from tasks.inventory import list_kind
from tasks.locks import model_lock
from tasks.report import Report, artifact_key
from tasks.settings import get_settings

ROOT = Path(__file__).resolve().parents[2]
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


def live_service(spec: DeploymentSpec, kubeconfig: str) -> dict[str, Any]:
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


def read_pool(spec: DeploymentSpec, kubeconfig: str, location: str, nodes: list[str] | None = None) -> P.PoolState | None:
    """The GPU pool's settings and its nodes per zone, as GKE and Kubernetes report them (Standard only; None
    in Autopilot mode — an Autopilot cluster, or fast-starting nodes: GKE makes the nodes, there is no pool)."""
    if startup.autopilot_mode(spec):
        return None
    c, name = spec.cluster, spec.accelerator.pool.name
    pool = gke.get_node_pool(project=c.project, location=location, cluster=c.name, name=name)
    if pool is None:
        raise FleetError(f"node pool {name} does not exist in cluster {c.name}", "run provision_cluster first")
    nodes = _pool_nodes(spec, kubeconfig) if nodes is None else nodes
    return P.pool_state(pool, len(nodes), len(pool.get("locations") or []) or 1)


def _pool_users(spec: DeploymentSpec, kubeconfig: str, nodes: list[str]) -> list[str]:
    """Other workloads with pods on (or bound for) the GPU pool (``nodes``), from the whole cluster."""
    return P.pool_users(model=spec.name, namespace=spec.namespace, pool=spec.accelerator.pool.name, nodes=nodes,
                        pods=list_kind(kubeconfig=kubeconfig, api_version="v1", kind="Pod"),
                        deployments=list_kind(kubeconfig=kubeconfig, api_version="apps/v1", kind="Deployment"))


def apply_pool(spec: DeploymentSpec, *, kubeconfig: str, location: str, now: P.PoolState,
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
            now = read_pool(spec, kubeconfig, location)
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


def _prefect_credentials() -> dict[str, SecretStr]:
    """This run's own Prefect credential, as the hold proxy's Secret keys (nothing when the server has no auth)."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY

    out = {}
    for key, setting in (("auth-string", PREFECT_API_AUTH_STRING), ("api-key", PREFECT_API_KEY)):
        value = setting.value()
        value = value.get_secret_value() if isinstance(value, SecretStr) else value
        if value:
            out[key] = SecretStr(str(value))
    return out


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


def under_model_lock(flow_name: str, spec: Any, reason: str, body: Callable[[Run], dict[str, Any]]) -> dict[str, Any]:
    """park_model's and wake_model's shared frame: the spec, the Slack thread, cluster credentials, the
    model's lock (the one releases take: never mid-release), the live Service and its park record —
    then ``body``, the flow's own steps. The report goes to Slack and the artifact either way."""
    ref = _spec_ref(spec)
    spec = resolve_gke_spec(spec, flow=flow_name)
    verb = flow_name.removesuffix("_model")
    report = Report(flow_name, f"{spec.name} ({reason})", spec.slack_channel)
    with report.run(artifact_key(verb, spec.name)):
        location, kubeconfig = _credentials(spec, report)
        with model_lock(spec, purpose=verb, kubeconfig=kubeconfig):
            svc = live_service(spec, kubeconfig)
            result = body(Run(spec, ref, kubeconfig, location, report, svc, P.read_record(svc)))
        report.succeed(result["outcome"])
        return result


def _route_weights(spec: DeploymentSpec, kubeconfig: str) -> dict[str, int] | None:
    """The HTTPRoute's pool weights as the cluster holds them (expose.gateway), for the park record."""
    if spec.expose.gateway is None:
        return None
    from manifests import canary
    from tasks import canary as canary_tasks

    route = canary_tasks.read_route(canary_tasks.kube_api(kubeconfig), spec)
    return None if gateway.is_held(route, spec) else canary.route_weights(route)


def picker_deployments(spec: DeploymentSpec, kubeconfig: str) -> dict[str, dict[str, Any] | None]:
    """Each pool's endpoint picker Deployment as the cluster holds it (None when missing), by name."""
    return {gateway.epp_name(spec, c): k8s.get_object(kubeconfig=kubeconfig, api_version="apps/v1", kind="Deployment",
                                                      name=gateway.epp_name(spec, c), namespace=spec.namespace)
            for c in names.COLORS}


def hold_route(spec: DeploymentSpec, kubeconfig: str, *, held: bool,
                weights: dict[str, int] | None = None) -> bool:
    """The Gateway's route to the hold proxy's Service (``held``) or back to the pools with ``weights`` (pool
    -> weight as park recorded them); one checked update, nothing when already so. Returns whether it wrote."""
    from tasks import canary as canary_tasks

    backends = gateway.held_backends(spec) if held else [
        {"group": gateway.IE_GROUP, "kind": "InferencePool", "name": name, "weight": w}
        for name, w in (weights or {}).items()]
    _, wrote = canary_tasks.set_backends(canary_tasks.kube_api(kubeconfig), spec, backends, held=held)
    return wrote


def _annotate_record(run: Run, record: P.ParkRecord) -> None:
    k8s.annotate(kubeconfig=run.kubeconfig, api_version="v1", kind="Service", name=names.service(run.spec),
                 namespace=run.spec.namespace, annotations={P.PARK_RECORD: record.to_annotation(), P.ACTIVITY: None})


def park(run: Run) -> dict[str, Any]:
    spec, kubeconfig, report, record = run.spec, run.kubeconfig, run.report, run.record
    if (record is None or record.held) and spec.hold.enabled:
        P.require_image(spec, "the hold proxy")  # before anything is recorded or scaled
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
                                  pool=read_pool(spec, kubeconfig, run.location), held=spec.hold.enabled,
                                  pool_changed=(), route=_route_weights(spec, kubeconfig),
                                  pickers=None if spec.expose.gateway is None else
                                  P.picker_replicas(picker_deployments(spec, kubeconfig)))
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
            # at most one proxy pod disrupted at a time (drain, upgrade): a parked model always has a holder
            k8s.apply_object(kubeconfig=kubeconfig, obj=P.hold_proxy_budget(spec))
            # its wake events authenticate as this run does: the credential goes to a Secret the kubelet
            # reads into the proxy's env (secretKeyRef), never into the Deployment
            for key, value in _prefect_credentials().items():
                run.report.secrets.append(value.get_secret_value())
                k8s.ensure_secret(kubeconfig=kubeconfig, namespace=spec.namespace, name=P.PREFECT_AUTH_SECRET,
                                  key=key, value=value, labels=names.common_labels(spec))
            # its replicas: a wake scaled the proxy to 0; the Service moves only once they are Ready
            applied = k8s.apply_object(kubeconfig=kubeconfig, obj=P.hold_proxy_deployment(
                spec, prefect_api_url=_prefect_api_url(), spec_ref=_event_ref(run.ref, spec)))
            k8s.wait_rollout(kubeconfig=kubeconfig, namespace=spec.namespace, name=P.hold_deployment_name(spec),
                             timeout_s=max(60.0, load_timeout_s(spec, None)))
            live = (live_service(spec, kubeconfig)["spec"].get("selector") or {})
            moved = False
            if live != P.hold_selector(spec):
                k8s.patch_service_selector(kubeconfig=kubeconfig, namespace=spec.namespace, name=names.service(spec),
                                           selector=P.hold_selector(spec), expect=record.selector)
                changed.append("held")
                moved = True
            # A Gateway routes to the pools, not the Service: its route follows, to the Service (which now
            # selects the proxy) — outside the branch above, so a rerun after a crash between the two moves it.
            if spec.expose.gateway is not None and hold_route(spec, kubeconfig, held=True):
                changed.append("route held")
                moved = True
            if moved:
                # Settle before the model's pods go, as a release does before it retires a color: every
                # node's kube-proxy (and the Gateway's proxies) still route new requests to them for a
                # while after the change, and the generations in flight there must finish.
                time.sleep(scaled(spec.release.scale_down_delay.total_seconds()))
            step.detail = (f"{P.hold_deployment_name(spec)} {applied.action}; {names.service(spec)} → hold proxy" +
                           (f"; HTTPRoute {spec.name} → Service {names.service(spec)}" if spec.expose.gateway else ""))
    else:
        report.skip("Put the hold proxy in front of the model", "hold.enabled is false: requests get 503 while parked")

    if spec.expose.gateway is not None:
        # ~1 CPU / 1 GiB per pool all night for nothing: the route reaches the hold proxy's Service now (without
        # a hold proxy the pools have no pod to pick either way). Wake brings them back, Ready, before the route.
        with report.step("Scale the endpoint pickers to 0") as step:
            deps = picker_deployments(spec, kubeconfig)
            if record.pickers is None:  # a park recorded before pickers were parked: recorded before the change
                record = replace(record, pickers=P.picker_replicas(deps))
                _annotate_record(run, record)
            scaled_down = []
            for name, dep in deps.items():
                if dep is not None and int((dep.get("spec") or {}).get("replicas") or 0) != 0:
                    k8s.scale_deployment(kubeconfig=kubeconfig, namespace=spec.namespace, name=name, replicas=0)
                    scaled_down.append(name)
            if scaled_down:
                changed.append("pickers to 0")
            step.detail = (", ".join(f"{n} {record.pickers.get(n, '?')}→0" for n in scaled_down)
                           or "already at 0")

    with report.step("Scale the model to 0 and wait until no GPU pod remains") as step:
        # Both colors: a stray candidate (an interrupted release's) holds GPUs too, and serves no one.
        for color in names.COLORS:
            dep = _deployment(spec, kubeconfig, color) or {}
            if int((dep.get("spec") or {}).get("replicas") or 0) != 0:
                k8s.scale_deployment(kubeconfig=kubeconfig, namespace=spec.namespace,
                                     name=names.deployment(spec, color), replicas=0)
                changed.append("scaled" if color == record.color else f"stray {color} scaled")
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
            now = read_pool(spec, kubeconfig, run.location, nodes)
            users = _pool_users(spec, kubeconfig, nodes)
            first = P.plan_park_pool(now, users=users, changed=record.pool_changed or ())
            if first.changed != record.pool_changed:  # recorded before it is done: wake undoes exactly this
                record = replace(record, pool_changed=first.changed)
                _annotate_record(run, record)
            plan, done = apply_pool(spec, kubeconfig=kubeconfig, location=run.location, now=now,
                                    plan_for=lambda now: P.plan_park_pool(now, users=users,
                                                                          changed=record.pool_changed or ()))
            changed += done
            more = capacity_for(spec).park_fallback_pools(spec, kubeconfig=kubeconfig, location=run.location)
            done += more
            changed += more
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
    pods = k8s.list_objects(kubeconfig=kubeconfig, api_version="v1", kind="Pod", namespace=spec.namespace,
                            label_selector=",".join(f"{k}={v}" for k, v in names.selector(spec, color).items()))
    ready = sorted(p["metadata"]["name"] for p in pods if not p["metadata"].get("deletionTimestamp") and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in (p.get("status") or {}).get("conditions") or []))
    # Every replica's counter (a Service would answer from one at random: never the same counter twice)
    metrics = P.parse_pod_metrics(health.read_pod_metrics(kubeconfig=kubeconfig, namespace=spec.namespace, pods=ready,
                                                          port=spec.engine.container_port), spec.engine.kind)
    annotations = svc["metadata"].get("annotations") or {}
    previous = P.Activity.from_annotation(annotations.get(P.ACTIVITY))
    activity, known = P.observe_activity(previous, metrics, now)
    # The learned arrivals per hour of the day: kept across park and wake (park/wake clear only ACTIVITY),
    # so the first look after a wake credits the parked hours too.
    tz = ZoneInfo(spec.schedule.timezone if spec.schedule else "UTC")
    arrivals = P.observe_arrivals(P.Arrivals.from_annotation(annotations.get(P.ARRIVALS)), metrics.requests, now, tz)
    k8s.annotate(kubeconfig=kubeconfig, api_version="v1", kind="Service", name=names.service(spec),
                 namespace=spec.namespace, annotations={P.ACTIVITY: activity.to_annotation(),
                                                        P.ARRIVALS: arrivals.to_annotation()})
    observed = P.Observed(spec.name, False, replicas, metrics.running + metrics.waiting,
                          datetime.fromisoformat(activity.last_active) if known else None)
    wake_s = None
    if spec.schedule is not None and spec.schedule.learned_idle:
        from tasks.schedules import wake_history

        wake_s = P.prewarm_s(spec.schedule, wake_history(spec))  # p95 of the measured wakes
    return P.decide_park(observed, spec.schedule, now, arrivals=arrivals, wake_s=wake_s)
