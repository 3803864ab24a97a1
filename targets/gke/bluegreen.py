"""Blue-green (and recreate, its variant that stops the live color first): the candidate color comes up
beside the live one, is analysed through the preview Service, and one checked selector patch moves the
live Service to it; any failure moves traffic back to the stable color (Argo Rollouts' bluegreen.go).

The plan (``manifests.release.plan_release``, pure) says which named steps run, in which order; this
module says what each name does and how a failed release is undone.
"""

from __future__ import annotations

from prefect import get_run_logger

from manifests import names
from manifests.errors import FleetError
from manifests.release import GATE, Desired, Observed, ReleasePlan, plan_release
from manifests.render import autoscaler
from manifests.spec import DeploymentSpec
from targets.gke.analysis import step_post_analysis, step_pre_analysis
from targets.gke.promotion_gate import step_promotion_gate
from targets.gke.release_steps import (
    STOPPED_REPLICAS,
    Release,
    Step,
    live_color,
    point_preview,
    record,
    step_bring_up,
    step_capacity,
    step_preview,
    step_record,
    step_stop_live,
    step_switch,
    stopped_replicas,
    switch_traffic,
)
from targets.gke.serving import load_timeout_s, scale_down_color, wait_until_answering
from tasks import k8s

# name -> (the step's title in the Slack thread, the step). Each step is idempotent.
STEPS: dict[str, tuple[str, Step]] = {
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


def roll_back(r: Release, exc: BaseException) -> str:
    """Traffic back on (or still on) the stable color, candidate scaled to 0, the release recorded."""
    spec, log = r.spec, get_run_logger()
    done: list[str] = []
    with r.report.step(f"Roll back to {r.stable}") as step:
        if r.live_stopped:
            replicas = stopped_replicas(r)  # stored on the cluster: a rerun observed the stable color at 0
            k8s.scale_deployment(kubeconfig=r.kubeconfig, namespace=spec.namespace,
                                 name=names.deployment(spec, r.stable), replicas=replicas)
            wait_until_answering(spec, kubeconfig=r.kubeconfig, color=r.stable, replicas=replicas,
                                 timeout_s=load_timeout_s(spec, r.t.model.params), service=names.service(spec))
            k8s.annotate(kubeconfig=r.kubeconfig, api_version="apps/v1", kind="Deployment",
                         name=names.deployment(spec, r.stable), namespace=spec.namespace,
                         annotations={STOPPED_REPLICAS: None})
            done.append(f"{r.stable} scaled back up to {replicas}")
        # Where traffic is, read from the cluster: a patch whose reply was lost still moved it.
        if r.switched or live_color(spec, kubeconfig=r.kubeconfig) == r.candidate:
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
            if live_color(spec, kubeconfig=r.kubeconfig) == r.candidate:  # never scale the live color down
                raise FleetError(f"{names.service(spec)} still selects {r.candidate}: it was not scaled down",
                                 "run rollback_model, or release again") from exc
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


class BlueGreen:
    """The ``ReleaseStrategy`` for release.strategy blue-green and recreate."""

    name = "blue-green"
    steps = STEPS

    def plan(self, spec: DeploymentSpec, observed: Observed, desired: Desired) -> ReleasePlan:
        return plan_release(observed, desired, strategy=spec.release.strategy,
                            auto_promote=spec.release.auto_promote,
                            promotion_timeout_s=spec.release.promotion_timeout.total_seconds())

    def roll_back(self, r: Release, exc: BaseException) -> str:
        return roll_back(r, exc)
