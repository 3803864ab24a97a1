"""release_model: every change to a serving model is a blue-green release (seed 003's `kubectl patch service`).

1. Observe: the live color from the live Service's selector, what each color runs
2. Hugging Face preflight of the new revision; GPU capacity for both colors at once
3. Bring up the candidate color beside the live one; wait by rollout status
4. Preview Service → candidate; pre-promotion analysis (engine, smoke prompts, error rate, latency vs live)
5. Switch: one checked merge-patch of the live Service's selector; its endpoints are the candidate's pods
   (release.auto_promote: false: the preview is announced on Slack and the flow run pauses until a person
   resumes it with promote true or false — Prefect's pause_flow_run with a RunInput, like Argo Rollouts'
   autoPromotionEnabled: false; abort or release.promotion_timeout rolls back)
6. Post-promotion analysis through the live Service; a failure switches back at once
7. Record the release; keep the old color warm for scale_down_delay, then scale it to 0

Any failed step rolls back: the live Service points at the old color (if it had moved), the candidate
is scaled to 0, and the Slack thread says what failed, with the figures, and where traffic is.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from flows import vertex
from flows.report import Report, artifact_key
from flows.serving import (
    ENDPOINT_LAG_S,
    Target,
    ensure_namespace_and_secret,
    load_timeout_s,
    observe,
    prepare,
    scale_down_color,
    scaled,
    smoke,
    smoke_rows,
    wait_until_answering,
    with_revision,
)
from manifests import names
from manifests.errors import DeployError, FleetError, PreflightError
from manifests.fleet import SpecPath
from manifests.names import Color
from manifests.provision import quota_metric
from manifests.release import (
    GATE,
    HISTORY_ANNOTATION,
    RELEASE_ANNOTATION,
    ColorState,
    Desired,
    Observed,
    ReleasePlan,
    ReleaseRecord,
    check_capacity,
    judge,
    plan_release,
    previous_promoted,
    promotion_notice,
    unpromoted_candidate,
    with_record,
)
from manifests.render import autoscaler, preview_service
from manifests.spec import AnalysisSpec, DeploymentSpec, human_duration, region_of, resolve_gke_spec
from tasks import compute, gke, health, k8s
from tasks.locks import model_lock

SWITCH_ATTEMPTS = 3
GATE_POLL_S = 5.0  # how often a paused release checks whether it was resumed


class Promotion(RunInput):
    """The decision at the promotion gate: the Prefect UI's Resume form, or ``run_input`` of the resume API."""

    promote: bool = Field(description="true: switch traffic to the candidate; false: abort and roll back")
    reason: str = Field("", description="why (kept in the release history and the Slack thread)")
    by: str = Field("", description="who decided (Prefect OSS does not record who resumed a run)")


class PromotionRefused(DeployError):
    """The promotion gate closed without a promotion: aborted by a person, or nobody answered in time."""

    def __init__(self, problem: str, fix: str, *, reason: str, figures: dict[str, Any]) -> None:
        super().__init__(problem, fix, reason=reason)
        self.figures = figures


class RollbackFailed(FleetError):
    """A step failed and so did its rollback: both causes, and how to find where traffic is."""


class AnalysisFailed(DeployError):
    """The candidate answered, but not well enough for the release policy."""

    def __init__(self, problem: str, fix: str, *, figures: dict[str, Any]) -> None:
        super().__init__(problem, fix, reason="AnalysisFailed")
        self.figures = figures


@dataclass
class Release:
    t: Target
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


# ---- the steps ---------------------------------------------------------------------------------

def step_capacity(r: Release) -> str:
    spec = r.spec
    live_replicas = r.observed.colors[r.stable].replicas
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


def step_stop_live(r: Release) -> str:
    r.report.note(f"⚠️ release.strategy recreate: {r.spec.name} is down until {r.candidate} answers")
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


def _p95_limit(policy: AnalysisSpec) -> float:
    # Latency limits are cloud seconds; on the sandbox's scaled clock a floor absorbs HTTP overhead.
    return max(scaled(policy.max_p95_latency_s), min(policy.max_p95_latency_s, 1.0))


def _noise_s() -> float:
    """Latency differences below this are noise, not a slower model (sandbox: real HTTP overhead)."""
    return 0.1 if scaled(1.0) < 1.0 else 0.02


def _analysis(r: Release, service: str, policy: AnalysisSpec, requests: int) -> dict[str, Any]:
    spec = r.spec
    return health.analyze(kubeconfig=r.kubeconfig, namespace=spec.namespace, service=service, engine=spec.engine.kind,
                          model_id=spec.model.id, prompts=spec.release.smoke_prompts,
                          max_tokens=spec.release.smoke_max_tokens, requests=requests,
                          concurrency=policy.concurrency, expect=spec.release.expect)


def step_pre_analysis(r: Release) -> str:
    spec, policy = r.spec, r.spec.release.pre_promotion
    try:
        results = smoke(spec, kubeconfig=r.kubeconfig, service=names.preview_service(spec))
    except DeployError as exc:
        raise AnalysisFailed(f"pre-promotion smoke test of {r.candidate}: {exc.problem}", exc.fix,
                             figures={}) from None
    r.figures["smoke"] = smoke_rows(results)
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        # Candidate and live measured side by side: same moment, same load on the cluster.
        cand = pool.submit(contextvars.copy_context().run, _analysis, r, names.preview_service(spec), policy,
                           policy.requests)
        base = (pool.submit(contextvars.copy_context().run, _analysis, r, names.service(spec), policy,
                            policy.requests)
                if policy.max_latency_ratio and not r.live_stopped else None)
        figures, baseline = cand.result(), base.result() if base else None
    r.figures["pre"], r.figures["baseline"] = figures, baseline
    verdict = judge(figures, max_error_rate=policy.max_error_rate, max_p95_s=_p95_limit(policy),
                    min_tokens_per_s=policy.min_tokens_per_s, baseline=baseline,
                    max_latency_ratio=policy.max_latency_ratio, noise_s=_noise_s())
    if not verdict.ok:
        raise AnalysisFailed(f"pre-promotion analysis of {r.candidate}: {verdict.reason}",
                             "no traffic moved; fix the revision or the engine settings and release again",
                             figures=figures)
    r.times["analysis_passed"] = time.time()
    return verdict.reason + (f"; live p50 {baseline['p50_s']:.3f}s" if baseline else "")


def step_promotion_gate(r: Release) -> str:
    """Announce the preview, then pause this flow run until a person promotes or aborts (or time runs out).

    The model's lock stays held while paused — the release is still in flight — and Prefect's lease
    renewal thread keeps it alive while this process lives (tasks/locks.py). If the process dies, the
    lease lapses, the paused run can never continue, and a rerun re-observes: the candidate is up, so it
    is previewed, analysed and gated again (the stale paused run is cancelled so nobody resumes it).
    """
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_UI_URL

    spec = r.spec
    run_id = flow_run.get_id()
    if run_id is None:
        raise FleetError("release.auto_promote is false but this release is not a Prefect flow run",
                         "run release_model as a flow (the gate pauses the flow run)")
    timeout_s = spec.release.promotion_timeout.total_seconds()
    ui = PREFECT_UI_URL.value()
    notice = promotion_notice(spec, live=r.stable, candidate=r.candidate, revision=r.t.model.sha,
                              figures=r.figures, flow_run_id=run_id,
                              ui_url=f"{ui}/flow-runs/flow-run/{run_id}" if ui else None, timeout_s=timeout_s)
    cancel_stale_gate(r.observed.in_flight, current=run_id)
    # On the cluster, for a rerun's plan and for anyone reading the Service: which run waits, since when.
    gate = {"flow_run": run_id, "opened": datetime.now(UTC).isoformat(timespec="seconds")}
    r.in_flight = dict(r.in_flight, gate=gate)
    k8s.annotate(kubeconfig=r.kubeconfig, api_version="v1", kind="Service", name=names.service(spec),
                 namespace=spec.namespace, annotations={RELEASE_ANNOTATION: json.dumps(r.in_flight, sort_keys=True)})
    r.report.note(notice)
    wait = scaled(timeout_s)  # the sandbox's clock, like every spec duration
    try:
        answer = pause_flow_run(wait_for_input=Promotion.with_initial_data(description=notice),
                                timeout=math.ceil(wait), poll_interval=max(0.25, min(GATE_POLL_S, scaled(GATE_POLL_S))))
    except FlowPauseTimeout:
        raise PromotionRefused(f"nobody promoted {r.candidate} within release.promotion_timeout "
                               f"({human_duration(timeout_s)})",
                               "no traffic moved; release again when someone can check the preview, or raise "
                               "release.promotion_timeout", reason="PromotionTimeout",
                               figures=r.figures.get("pre") or {}) from None
    who = answer.by.strip() or "someone"
    why = f": {answer.reason.strip()}" if answer.reason.strip() else ""
    if not answer.promote:
        raise PromotionRefused(f"aborted at the promotion gate by {who}{why}",
                               "no traffic moved; release again when the candidate is fixed",
                               reason="PromotionAborted", figures=r.figures.get("pre") or {})
    r.approval = f"promoted by {who}{why}"
    r.report.note(f"▶️ {r.approval} — switching traffic {r.stable} → {r.candidate}")
    return r.approval


def cancel_stale_gate(in_flight: dict[str, Any] | None, *, current: str) -> None:
    """The run that opened the last gate is gone (this run holds the lock): if the server still shows it
    Paused (its process died) or Running (resumed after that, with nothing behind it), cancel it so nobody
    presses a Resume button that can do nothing."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    old = ((in_flight or {}).get("gate") or {}).get("flow_run")
    if not old or old == current:
        return
    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(UUID(old))
            if run.state is not None and (run.state.is_paused() or run.state.is_running()):
                client.set_flow_run_state(UUID(old), Cancelled(message=f"superseded by flow run {current}: "
                                                                      "its process is gone"))
                get_run_logger().info("cancelled the stale paused release run %s", old)
    except Exception as exc:  # noqa: BLE001 - a stale run is cosmetic; the gate that matters is this run's
        get_run_logger().warning("could not cancel the stale paused run %s: %s", old, exc)


def switch_traffic(spec: DeploymentSpec, *, kubeconfig: str, to: Color, frm: Color, pods: list[str],
                   times: dict[str, float] | None = None) -> str:
    """One checked selector patch (resourceVersion read just before), then the endpoints are ``to``'s pods."""
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
    k8s.wait_endpoints(kubeconfig=kubeconfig, namespace=spec.namespace, service=names.service(spec),
                       pods=set(pods), timeout_s=60)
    return f"{names.service(spec)}: {frm} → {to} ({len(pods)} pod(s) behind it)"


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
    detail = switch_traffic(spec, kubeconfig=r.kubeconfig, to=r.candidate, frm=r.stable, pods=pods, times=r.times)
    r.switched = True
    r.times["switched"] = r.times.get(f"switched_to_{r.candidate}", time.time())
    r.candidate_pods = pods
    if spec.autoscaling:
        k8s.apply_object(kubeconfig=r.kubeconfig, obj=autoscaler(spec, r.candidate))
        r.hpa_moved = True
    return detail


def step_post_analysis(r: Release) -> str:
    spec, policy = r.spec, r.spec.release.post_promotion
    batches = max(1, int(policy.window.total_seconds() // max(policy.interval.total_seconds(), 1e-9)))
    per_batch = max(1, math.ceil(policy.requests / batches))
    total: list[dict[str, Any]] = []
    begin = time.monotonic()
    for i in range(batches):
        figures = _analysis(r, names.service(spec), policy, per_batch)
        total.append(figures)
        verdict = judge(figures, max_error_rate=policy.max_error_rate, max_p95_s=_p95_limit(policy),
                        min_tokens_per_s=policy.min_tokens_per_s)
        if not verdict.ok:
            r.figures["post"] = figures
            raise AnalysisFailed(f"post-promotion analysis (batch {i + 1}/{batches}): {verdict.reason}",
                                 f"traffic switched back to {r.stable}; fix the revision and release again",
                                 figures=figures)
        if i < batches - 1:  # batches start on the interval grid: the window is the window
            time.sleep(max(0.0, begin + (i + 1) * scaled(policy.interval.total_seconds()) - time.monotonic()))
    r.times["post_analysis_done"] = time.time()
    r.figures["post"] = {"requests": sum(f["requests"] for f in total), "errors": sum(f["errors"] for f in total),
                         "p95_s": max(f["p95_s"] for f in total)}
    return f"{batches} batch(es), {r.figures['post']['requests']} requests, {r.figures['post']['errors']} errors"


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


STEPS = {
    "capacity": ("GPU capacity for both colors", step_capacity),
    "stop_live": ("Recreate: stop the live color", step_stop_live),
    "bring_up": ("Bring up the candidate color", step_bring_up),
    "preview": ("Preview Service → candidate", step_preview),
    "pre_analysis": ("Pre-promotion analysis", step_pre_analysis),
    GATE: ("Wait for promotion", step_promotion_gate),
    "switch": ("Switch the live Service's selector", step_switch),
    "post_analysis": ("Post-promotion analysis", step_post_analysis),
    "record": ("Record the release", step_record),
}


# ---- rollback ------------------------------------------------------------------------------------

def roll_back(r: Release, exc: BaseException) -> str:
    """Traffic back on (or still on) the stable color, candidate scaled to 0, the release recorded."""
    spec, log = r.spec, get_run_logger()
    done: list[str] = []
    with r.report.step(f"Roll back to {r.stable}") as step:
        if r.live_stopped:
            k8s.scale_deployment(kubeconfig=r.kubeconfig, namespace=spec.namespace,
                                 name=names.deployment(spec, r.stable), replicas=r.observed.colors[r.stable].replicas)
            wait_until_answering(spec, kubeconfig=r.kubeconfig, color=r.stable,
                                 replicas=r.observed.colors[r.stable].replicas,
                                 timeout_s=load_timeout_s(spec, r.t.model.params), service=names.service(spec))
            done.append(f"{r.stable} scaled back up")
        if r.switched:
            stable = r.state(r.stable)
            if not stable.warm:  # never point the live Service at a color with no Ready pods
                raise FleetError(f"cannot switch back: {r.stable} is not available ({stable.available}/"
                                 f"{stable.replicas})", f"scale {names.deployment(spec, r.stable)} up, then run "
                                 "rollback_model") from exc
            rollout = k8s.wait_rollout(kubeconfig=r.kubeconfig, namespace=spec.namespace,
                                       name=names.deployment(spec, r.stable), timeout_s=60)
            done.append(switch_traffic(spec, kubeconfig=r.kubeconfig, to=r.stable, frm=r.candidate,
                                       pods=list(rollout.pods), times=r.times))
            r.switched = False
        if r.hpa_moved:
            k8s.apply_object(kubeconfig=r.kubeconfig, obj=autoscaler(spec, r.stable))
        # The preview never points at a color about to have no pods (argo-rollouts #2641).
        point_preview(spec, kubeconfig=r.kubeconfig, color=r.stable)
        if r.plan.action == "release" and r.touched:
            done.append(scale_down_color(spec, kubeconfig=r.kubeconfig, color=r.candidate))
        try:
            record(r, "rolled_back" if r.touched or r.live_stopped else "refused", str(exc))
        except Exception as rec_exc:  # noqa: BLE001 - the rollback itself matters more than its record
            log.warning("could not record the rollback: %s", rec_exc)
        step.detail = "; ".join(done)
    moved = "returned to" if any("→" in d for d in done) else "stayed on"
    rev = (r.observed.colors[r.stable].revision or "?")[:12]
    figures = getattr(exc, "figures", None) or {}
    fig = (f" Figures: {figures.get('requests')} requests, {figures.get('errors')} errors, "
           f"p50 {figures.get('p50_s')}s, p95 {figures.get('p95_s')}s." if figures else "")
    text = f"↩️ Rolled back: {exc}.{fig} Traffic {moved} {r.stable} ({rev})."
    r.report.note(text)
    return text


def run_release(t: Target, report: Report, observed: Observed, plan: ReleasePlan) -> tuple[dict[str, Any], Color | None]:
    """Run the plan's steps in order (caller holds the model's lock). Returns (result, color to retire later)."""
    if plan.action == "clean_up":
        r = Release(t, report, plan, observed, stable=plan.retire, candidate=plan.live, switched=True)  # type: ignore[arg-type]
    else:
        r = Release(t, report, plan, observed, stable=plan.live, candidate=plan.candidate)  # type: ignore[arg-type]
    for row in plan.table():
        get_run_logger().info("plan: %s — %s", row["step"], row["detail"])
    report.table_artifact(artifact_key("release", t.spec.name, "plan"), plan.table(), "Release plan")
    try:
        for name in plan.steps:
            if name == "scale_down":
                continue  # after the lock, see finish_retire
            title, fn = STEPS[name]
            with report.step(title) as step:
                step.detail = fn(r)
    except Exception as exc:
        try:
            roll_back(r, exc)
        except Exception as rollback_exc:  # say both: the first cause is what the user must fix
            raise RollbackFailed(f"{exc}; then the rollback failed: {rollback_exc}",
                                 f"check which color the live Service {names.service(r.spec)} selects (kubectl get "
                                 "svc -o jsonpath='{.spec.selector}'), then run rollback_model") from rollback_exc
        raise
    result = {"color": r.candidate, "previous_color": r.stable, "replicas": candidate_replicas(r),
              "action": "released" if plan.action == "release" else plan.action, "figures": r.figures,
              "times": r.times, "smoke": r.figures.get("smoke", [])}
    return result, (plan.retire if "scale_down" in plan.steps else None)


def finish_retire(t: Target, report: Report, color: Color) -> None:
    """Keep the old color warm for scale_down_delay (rollback_model can switch back meanwhile), then stop it."""
    spec = t.spec
    delay = spec.release.scale_down_delay.total_seconds()
    with report.step(f"Keep {color} warm {delay:g}s, then scale it to 0") as step:
        time.sleep(scaled(delay))
        with model_lock(spec, purpose="scale down"):
            now = observe(spec, t.kubeconfig)
            if now.live == color:
                step.detail = f"{color} is live again (rolled back meanwhile): kept"
                return
            k8s.scale_deployment(kubeconfig=t.kubeconfig, namespace=spec.namespace,
                                 name=names.deployment(spec, color), replicas=0)
            step.detail = f"{names.deployment(spec, color)} scaled to 0"


# ---- flows ---------------------------------------------------------------------------------------

def plan_for(spec: DeploymentSpec, observed: Observed, desired: Desired) -> ReleasePlan:
    """plan_release with the spec's release policy (strategy, promotion gate)."""
    return plan_release(observed, desired, strategy=spec.release.strategy, auto_promote=spec.release.auto_promote,
                        promotion_timeout_s=spec.release.promotion_timeout.total_seconds())


def refuse_if_parked(spec: DeploymentSpec, plan: ReleasePlan) -> None:
    if plan.action == "parked":
        raise FleetError(f"{spec.name} is parked ({plan.reason}); a change needs a warm color to fall back to",
                         f"run wake_model for {spec.name}, then release again (the hold proxy keeps "
                         "requests meanwhile)")


@flow(name="release_model", log_prints=True)
def release_model(spec: SpecPath | str | dict[str, Any] = "deployments/gemma2-2b-it-vllm-l4.yaml", revision: str | None = None,
                  dry_run: bool = False) -> dict[str, Any]:
    """Blue-green release of ``revision`` (default: the spec's) with analysis and automatic rollback."""
    if vertex.is_vertex(spec):  # target: vertex: the same flow, Vertex AI's steps (flows/vertex.py)
        return vertex.release(spec, revision=revision, dry_run=dry_run)
    spec = with_revision(resolve_gke_spec(spec, flow="release_model"), revision)
    report = Report("release_model", f"{spec.name} ({spec.model.id}@{spec.model.revision})", spec.slack_channel)
    retire: Color | None = None
    try:
        t = prepare(spec, report)
        desired = Desired(t.model.sha, t.desired_hash, spec.replicas)
        if dry_run:
            plan = plan_for(spec, observe(spec, t.kubeconfig), desired)
            report.table_artifact(artifact_key("release", spec.name, "plan"), plan.table(), "Release plan (dry run)")
            for row in plan.table():
                get_run_logger().info("plan: %s — %s", row["step"], row["detail"])
            report.succeed("dry run: nothing was changed")
            return {"dry_run": True, "plan": plan.table(), "action": plan.action, "revision": t.model.sha}
        with model_lock(spec, purpose="release"):
            observed = observe(spec, t.kubeconfig)
            plan = plan_for(spec, observed, desired)
            refuse_if_parked(spec, plan)
            if plan.action == "first_deploy":
                from flows.deploy_model import first_deploy

                out = first_deploy(t, report)
            elif plan.action == "noop":
                report.skip("Release", plan.reason)
                out = {"color": plan.live, "action": "noop", "replicas": observed.colors[plan.live].replicas}  # type: ignore[index]
            else:
                out, retire = run_release(t, report, observed, plan)
        if retire is not None:
            finish_retire(t, report, retire)
        report.succeed(f"{spec.model.id}@{t.model.sha[:12]} serving on {out['color']} ({out['action']})")
        return {"name": spec.name, "revision": t.model.sha, **out}
    except Exception as exc:
        report.fail(exc)
        raise
    finally:
        report.markdown_artifact(artifact_key("release", spec.name))


def abandon_candidate(spec: DeploymentSpec, report: Report, *, kubeconfig: str, observed: Observed) -> dict[str, Any]:
    """rollback_model after an interrupted release: the live color never stopped serving; retire the candidate."""
    live: Color = observed.live  # type: ignore[assignment]
    stray, in_flight = names.other(live), observed.in_flight or {}
    with report.step(f"Abandon the interrupted release's candidate {stray}") as step:
        point_preview(spec, kubeconfig=kubeconfig, color=live)  # never at a color about to have no pods
        detail = scale_down_color(spec, kubeconfig=kubeconfig, color=stray)
        rec = ReleaseRecord(revision=in_flight.get("revision") or "?", spec_hash=in_flight.get("spec_hash") or "",
                            color=stray, previous_revision=observed.colors[live].revision, previous_color=live,
                            started=in_flight.get("started") or datetime.now(UTC).isoformat(timespec="seconds"),
                            result="rolled_back", cause="rollback_model: an interrupted release's candidate, "
                                                        "never promoted")
        k8s.annotate(kubeconfig=kubeconfig, api_version="v1", kind="Service", name=names.service(spec),
                     namespace=spec.namespace, annotations={HISTORY_ANNOTATION: with_record(observed.history, rec),
                                                            RELEASE_ANNOTATION: None})
        step.detail = f"{detail}; {live} keeps serving"
    rev = (observed.colors[live].revision or "?")[:12]
    report.succeed(f"{live} keeps serving {rev}: the interrupted release of {rec.revision[:12]} on {stray} was "
                   "never promoted, so it was retired instead of switched to")
    return {"name": spec.name, "color": live, "revision": observed.colors[live].revision,
            "action": "abandoned_candidate"}


@flow(name="rollback_model", log_prints=True)
def rollback_model(spec: SpecPath | str | dict[str, Any] = "deployments/gemma2-2b-it-vllm-l4.yaml") -> dict[str, Any]:
    """Back to the previous revision: an instant switch while the old color is warm, else a release of it."""
    if vertex.is_vertex(spec):  # target: vertex: the same flow, Vertex AI's steps (flows/vertex.py)
        return vertex.rollback(spec)
    spec = resolve_gke_spec(spec, flow="rollback_model")
    report = Report("rollback_model", f"{spec.name} ({spec.model.id})", spec.slack_channel)
    try:
        from flows.serving import cluster_location

        location = cluster_location(spec)
        kubeconfig = gke.get_credentials(project=spec.cluster.project, location=location, name=spec.cluster.name)
        with model_lock(spec, purpose="rollback"):
            observed = observe(spec, kubeconfig)
            if observed.live is None:
                raise FleetError(f"{spec.name} does not serve yet: nothing to roll back", "run deploy_model")
            live, other = observed.live, names.other(observed.live)
            warm = observed.colors[other]
            if unpromoted_candidate(observed) == other:
                return abandon_candidate(spec, report, kubeconfig=kubeconfig, observed=observed)
            if warm.warm and warm.revision:
                with report.step(f"Switch back to the warm color {other}") as step:
                    rollout = k8s.wait_rollout(kubeconfig=kubeconfig, namespace=spec.namespace,
                                               name=names.deployment(spec, other), timeout_s=60)
                    step.detail = switch_traffic(spec, kubeconfig=kubeconfig, to=other, frm=live,
                                                 pods=list(rollout.pods))
                    if spec.autoscaling:
                        k8s.apply_object(kubeconfig=kubeconfig, obj=autoscaler(spec, other))
                    point_preview(spec, kubeconfig=kubeconfig, color=other)
                with report.step("Smoke test through the live Service") as step:
                    step.detail = f"{len(smoke(spec, kubeconfig=kubeconfig, service=names.service(spec)))} prompt(s) answered"
                with report.step(f"Scale {live} to 0 and record") as step:
                    k8s.scale_deployment(kubeconfig=kubeconfig, namespace=spec.namespace,
                                         name=names.deployment(spec, live), replicas=0)
                    rec = ReleaseRecord(revision=warm.revision, spec_hash=warm.spec_hash or "", color=other,
                                        previous_revision=observed.colors[live].revision, previous_color=live,
                                        started=datetime.now(UTC).isoformat(timespec="seconds"), result="promoted",
                                        cause="rollback_model: switched back to the warm color")
                    k8s.annotate(kubeconfig=kubeconfig, api_version="v1", kind="Service", name=names.service(spec),
                                 namespace=spec.namespace,
                                 annotations={HISTORY_ANNOTATION: with_record(observed.history, rec)})
                    step.detail = f"{warm.revision[:12]} serving on {other}"
                report.succeed(f"rolled back to {warm.revision[:12]} on {other} (instant switch)")
                return {"name": spec.name, "color": other, "revision": warm.revision, "action": "switched_back"}
            previous = previous_promoted(observed.history, observed.colors[live].revision)
        if previous is None:
            raise FleetError(f"no earlier revision of {spec.name} is recorded on the cluster",
                             "run release_model with revision=<the commit to go back to>")
        report.skip("Switch back", f"{other} is not warm any more: releasing {previous['revision'][:12]} again")
    except Exception as exc:
        report.fail(exc)
        raise
    finally:
        report.markdown_artifact(artifact_key("rollback", spec.name))
    again = spec.model_dump(mode="json", by_alias=True, exclude_unset=True)
    # rollback_model is a person's decision already: no second gate (Argo's fast-track rollback to the
    # stable ReplicaSet skips pauses too).
    again.setdefault("release", {})["auto_promote"] = True
    return release_model(spec=again, revision=previous["revision"])

