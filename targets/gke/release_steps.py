"""The steps of a GKE release that move things, in the order a blue-green release runs them.

Each step takes the run's ``Release`` state, is idempotent (a rerun after a crash at any point
re-observes and converges), and returns one line for the Slack thread. The analysis steps are in
``analysis.py``, the manual promotion gate in ``promotion_gate.py``; which steps run, in which order,
is the strategy's plan (``bluegreen.py``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from manifests import names
from manifests.errors import DeployError, PreflightError
from manifests.names import Color
from manifests.provision import quota_metric
from manifests.release import (
    HISTORY_ANNOTATION,
    RELEASE_ANNOTATION,
    ColorState,
    Observed,
    ReleasePlan,
    ReleaseRecord,
    check_capacity,
    with_record,
)
from manifests.render import autoscaler, preview_service
from manifests.spec import DeploymentSpec, region_of
from targets.gke.capacity import capacity_for
from targets.gke.serving import ENDPOINT_LAG_S, Prepared, ensure_namespace_and_secret, load_timeout_s, observe
from tasks import compute, gke, health, k8s
from tasks.report import Report, artifact_key

SWITCH_ATTEMPTS = 3


@dataclass
class Release:
    """One release run's state: what it observed, which colors, what it has done so far (for the rollback)."""

    t: Prepared
    report: Report
    plan: ReleasePlan
    observed: Observed
    stable: Color  # where traffic returns if anything fails
    candidate: Color
    switched: bool = False
    live_stopped: bool = False
    hpa_moved: bool = False
    touched: bool = False  # the candidate's Deployment was applied (something to roll back)
    candidate_pods: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    in_flight: dict[str, Any] = field(default_factory=dict)  # RELEASE_ANNOTATION as this run wrote it
    approval: str = ""  # "promoted by ...: reason" from the promotion gate
    started: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    times: dict[str, float] = field(default_factory=dict)  # wall-clock marks: analysis_passed, switched

    @property
    def spec(self) -> DeploymentSpec:
        return self.t.spec

    @property
    def kubeconfig(self) -> str:
        return self.t.kubeconfig

    def state(self, color: Color) -> ColorState:
        dep = k8s.get_object(kubeconfig=self.kubeconfig, api_version="apps/v1", kind="Deployment",
                             name=names.deployment(self.spec, color), namespace=self.spec.namespace)
        return ColorState.from_deployment(color, dep)


Step = Callable[[Release], str]  # one named step of a strategy: does its part, returns its Slack line


def step_capacity(r: Release) -> str:
    spec = r.spec
    live_replicas = r.observed.colors[r.stable].replicas
    options = capacity_for(spec).release_room(spec, kubeconfig=r.kubeconfig, location=r.t.location,
                                              live_replicas=live_replicas, candidate_replicas=candidate_replicas(r))
    if options is not None:  # capacity options: the ComputeClass places the candidate on any with room
        ok, detail, fix = options
        if not ok:
            raise PreflightError(f"the release needs both colors at once: {detail}", fix)
        return detail
    pool_max = pool_nodes = None
    if spec.cluster.mode == "standard":
        pool = gke.get_node_pool(project=spec.cluster.project, location=r.t.location, cluster=spec.cluster.name,
                                 name=spec.accelerator.pool.name)
        pool_max = int(((pool or {}).get("autoscaling") or {}).get("max_node_count") or 0) or None
        nodes = k8s.list_objects(kubeconfig=r.kubeconfig, api_version="v1", kind="Node",
                                 label_selector=f"cloud.google.com/gke-nodepool={spec.accelerator.pool.name}")
        pool_nodes = len(nodes)
    region = region_of(r.t.location)  # the cluster may live in a failover region
    quota = compute.get_region_quota(project=spec.cluster.project, region=region, metric=quota_metric(spec))
    checks = check_capacity(spec, live_replicas=live_replicas, candidate_replicas=candidate_replicas(r),
                            pool_max_nodes=pool_max, pool_nodes=pool_nodes or 0, quota=quota,
                            strategy=spec.release.strategy)
    failed = [c for c in checks if not c.ok]
    if failed:
        raise PreflightError(f"the release needs both colors at once: {failed[0].detail}", failed[0].fix)
    return "; ".join(c.detail for c in checks)


def candidate_replicas(r: Release) -> int:
    # With an HPA the candidate starts at what the live color carries now, so the switch does not shed load.
    live = r.observed.colors[r.stable].replicas
    return max(r.spec.replicas, live) if r.spec.autoscaling and live else r.spec.replicas


# On the stable Deployment while a recreate release has it stopped: the count a rollback restores. On the
# cluster, so a rerun after a killed release (which observes the color at 0) still knows it.
STOPPED_REPLICAS = "llm-fleet.dev/replicas-before-stop"


def stopped_replicas(r: Release) -> int:
    """What the stable color ran before a recreate release stopped it (this run or a killed earlier one)."""
    dep = k8s.get_object(kubeconfig=r.kubeconfig, api_version="apps/v1", kind="Deployment",
                         name=names.deployment(r.spec, r.stable), namespace=r.spec.namespace)
    stored = ((dep or {}).get("metadata", {}).get("annotations") or {}).get(STOPPED_REPLICAS)
    return max(int(stored or 0), r.observed.colors[r.stable].replicas)


def step_stop_live(r: Release) -> str:
    r.report.note(f"⚠️ release.strategy recreate: {r.spec.name} is down until {r.candidate} answers")
    if r.observed.colors[r.stable].replicas > 0:  # a rerun finds it at 0: the stored count stands
        k8s.annotate(kubeconfig=r.kubeconfig, api_version="apps/v1", kind="Deployment",
                     name=names.deployment(r.spec, r.stable), namespace=r.spec.namespace,
                     annotations={STOPPED_REPLICAS: str(r.observed.colors[r.stable].replicas)})
    k8s.scale_deployment(kubeconfig=r.kubeconfig, namespace=r.spec.namespace,
                         name=names.deployment(r.spec, r.stable), replicas=0)
    r.live_stopped = True
    return f"{names.deployment(r.spec, r.stable)} scaled to 0 (downtime begins)"


def step_bring_up(r: Release) -> str:
    spec = r.spec
    in_flight = {"candidate": r.candidate, "revision": r.t.model.sha, "spec_hash": r.t.desired_hash,
                 "started": r.started}
    r.in_flight = in_flight
    k8s.annotate(kubeconfig=r.kubeconfig, api_version="v1", kind="Service", name=names.service(spec),
                 namespace=spec.namespace, annotations={RELEASE_ANNOTATION: json.dumps(in_flight, sort_keys=True)})
    ensure_namespace_and_secret(r.t)
    replicas = candidate_replicas(r)
    r.touched = True
    k8s.apply_object(kubeconfig=r.kubeconfig, obj=r.t.deployment(r.candidate, replicas=replicas))
    rollout = k8s.wait_rollout(kubeconfig=r.kubeconfig, namespace=spec.namespace,
                               name=names.deployment(spec, r.candidate), timeout_s=load_timeout_s(spec, r.t.model.params))
    r.candidate_pods = list(rollout.pods)
    return f"{rollout.replicaset}: {rollout.ready}/{replicas} available at {r.t.model.sha[:12]}"


def step_preview(r: Release) -> str:
    spec = r.spec
    point_preview(spec, kubeconfig=r.kubeconfig, color=r.candidate)
    # The rollout is complete (bring_up); now the preview's endpoints must be exactly those pods.
    k8s.wait_endpoints(kubeconfig=r.kubeconfig, namespace=spec.namespace, service=names.preview_service(spec),
                       pods=set(r.candidate_pods), timeout_s=ENDPOINT_LAG_S)
    engine = health.check_engine_ready(kubeconfig=r.kubeconfig, namespace=spec.namespace,
                                       service=names.preview_service(spec), engine=spec.engine.kind,
                                       model_id=spec.model.id)
    return f"{names.preview_service(spec)} → {len(r.candidate_pods)} pod(s) of {r.candidate}, serving {engine['model']}"


def point_preview(spec: DeploymentSpec, *, kubeconfig: str, color: Color) -> None:
    """The preview Service follows the release (a selector patch, not a re-apply of the whole object)."""
    existing = k8s.get_object(kubeconfig=kubeconfig, api_version="v1", kind="Service",
                              name=names.preview_service(spec), namespace=spec.namespace)
    if existing is None:
        k8s.apply_object(kubeconfig=kubeconfig, obj=preview_service(spec, color))
    elif (existing["spec"].get("selector") or {}) != names.selector(spec, color):
        k8s.patch_service_selector(kubeconfig=kubeconfig, namespace=spec.namespace, name=names.preview_service(spec),
                                   selector=names.selector(spec, color))


def switch_traffic(spec: DeploymentSpec, *, kubeconfig: str, to: Color, frm: Color, pods: list[str],
                   times: dict[str, float] | None = None) -> str:
    """One checked selector patch (resourceVersion read just before), then the endpoints are ``to``'s pods."""
    move_selector(spec, kubeconfig=kubeconfig, to=to, frm=frm, times=times)
    k8s.wait_endpoints(kubeconfig=kubeconfig, namespace=spec.namespace, service=names.service(spec),
                       pods=set(pods), timeout_s=60)
    return f"{names.service(spec)}: {frm} → {to} ({len(pods)} pod(s) behind it)"


def move_selector(spec: DeploymentSpec, *, kubeconfig: str, to: Color, frm: Color,
                  times: dict[str, float] | None = None) -> None:
    """The live Service selects ``to``: one patch guarded by the resourceVersion read just before (none when
    an earlier attempt or run already moved it)."""
    times = {} if times is None else times
    want, old = names.selector(spec, to), names.selector(spec, frm)
    for attempt in range(SWITCH_ATTEMPTS):
        svc = k8s.get_object(kubeconfig=kubeconfig, api_version="v1", kind="Service", name=names.service(spec),
                             namespace=spec.namespace)
        selector = (svc or {}).get("spec", {}).get("selector") or {}
        if selector == want:
            break  # an earlier attempt (or run) already moved it
        if selector != old:
            raise k8s.SelectorConflict(f"Service {names.service(spec)} selects {selector}, expected {old}",
                                       "someone edited the live Service; fix its selector and rerun release_model")
        try:
            k8s.patch_service_selector(kubeconfig=kubeconfig, namespace=spec.namespace, name=names.service(spec),
                                       selector=want, resource_version=svc["metadata"]["resourceVersion"])
            times[f"switched_to_{to}"] = time.time()
            break
        except k8s.SelectorConflict:
            if attempt == SWITCH_ATTEMPTS - 1:
                raise


def live_color(spec: DeploymentSpec, *, kubeconfig: str) -> str | None:
    """The color the live Service selects now, read from the cluster (None: the hold proxy or no Service)."""
    svc = k8s.get_object(kubeconfig=kubeconfig, api_version="v1", kind="Service", name=names.service(spec),
                         namespace=spec.namespace)
    return ((svc or {}).get("spec", {}).get("selector") or {}).get(names.COLOR_LABEL)


def step_switch(r: Release) -> str:
    spec = r.spec
    # Safe only when the candidate is fully available and its Ready pods are what the preview lists.
    state = r.state(r.candidate)
    if not state.warm:
        raise DeployError(f"{r.candidate} is no longer fully available ({state.available}/{state.replicas})",
                          "no traffic moved; read the candidate's pod events", reason="NotReady")
    endpoints = k8s.get_object(kubeconfig=r.kubeconfig, api_version="v1", kind="Endpoints",
                               name=names.preview_service(spec), namespace=spec.namespace)
    pods = sorted(k8s.endpoint_pods(endpoints))
    if len(pods) < state.replicas:
        raise DeployError(f"the preview lists {len(pods)} Ready pod(s) of {state.replicas}", "rerun release_model",
                          reason="NotReady")
    move_selector(spec, kubeconfig=r.kubeconfig, to=r.candidate, frm=r.stable, times=r.times)
    # Switched the moment the patch succeeded: if the endpoints check below fails, the rollback must move
    # traffic back — the candidate is the live color now, and scaling it to 0 would drop the model.
    r.switched = True
    r.times["switched"] = r.times.get(f"switched_to_{r.candidate}", time.time())
    r.candidate_pods = pods
    k8s.wait_endpoints(kubeconfig=r.kubeconfig, namespace=spec.namespace, service=names.service(spec),
                       pods=set(pods), timeout_s=60)
    detail = f"{names.service(spec)}: {r.stable} → {r.candidate} ({len(pods)} pod(s) behind it)"
    if spec.autoscaling:
        k8s.apply_object(kubeconfig=r.kubeconfig, obj=autoscaler(spec, r.candidate))
        r.hpa_moved = True
    return detail


def record(r: Release, result: str, cause: str = "") -> None:
    spec = r.spec
    rec = ReleaseRecord(revision=r.t.model.sha, spec_hash=r.t.desired_hash, color=r.candidate,
                        previous_revision=r.observed.colors[r.stable].revision, previous_color=r.stable,
                        started=r.started, result=result, cause=cause[:300],
                        figures={k: v for k, v in r.figures.items() if k in ("pre", "baseline", "post")})
    history = observe(spec, r.kubeconfig).history
    k8s.annotate(kubeconfig=r.kubeconfig, api_version="v1", kind="Service", name=names.service(spec),
                 namespace=spec.namespace, annotations={HISTORY_ANNOTATION: with_record(history, rec),
                                                        RELEASE_ANNOTATION: None})
    rows = [{"started": h.get("started"), "revision": (h.get("revision") or "")[:12], "color": h.get("color"),
             "result": h.get("result"), "cause": h.get("cause", "")} for h in history + [rec.__dict__]]
    r.report.table_artifact(artifact_key("release", spec.name, "history"), rows, f"Releases of {spec.name}")


def step_record(r: Release) -> str:
    record(r, "promoted", r.approval)
    return f"{r.t.model.sha[:12]} promoted on {r.candidate}"
