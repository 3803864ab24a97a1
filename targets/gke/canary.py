"""Canary on the GKE Inference Gateway (and blue-green on a Gateway, its one-step form): the candidate comes
up beside the live color as in blue-green, then the HTTPRoute's weight moves to its InferencePool step by
step, each step judged on the real traffic it carried (PromQL over Managed Prometheus, against the live
color over the same window) plus smoke prompts; a failed step puts the weight back on the live color at
once (Argo Rollouts' canary.go with setWeight steps and an AnalysisRun per step).

The plan is blue-green's with its synthetic analyses replaced by the Gateway steps
(``manifests.canary.plan_steps``); the decisions are pure (``manifests.canary``, ``manifests.analysis``),
the I/O is ``tasks.canary``.
"""

from __future__ import annotations

import time
from dataclasses import replace

from kubernetes.client.rest import ApiException

from manifests import canary, gateway, names
from manifests.errors import FleetError
from manifests.release import Desired, Observed, ReleasePlan
from manifests.spec import DeploymentSpec
from targets.gke import bluegreen
from targets.gke.release_steps import Release, Step
from targets.gke.serving import scaled, smoke
from tasks import canary as canary_tasks
from tasks import k8s


def step_gateway(r: Release) -> str:
    """The Gateway objects for both colors; the live color keeps whatever weight the cluster gives it."""
    spec = r.spec
    api = canary_tasks.kube_api(r.kubeconfig)
    canary_tasks.check_gateway(spec, kubeconfig=r.kubeconfig)
    rest = canary_tasks.apply_gateway_objects(api, gateway.objects(spec, r.stable))
    for obj in rest:
        k8s.apply_object(kubeconfig=r.kubeconfig, obj=obj)
    route = canary_tasks.read_route(api, spec)
    return (f"HTTPRoute {gateway.route_name(spec)} on Gateway {gateway.gateway_name(spec)}: "
            f"{canary.route_weights(route)}")


def step_canary(r: Release) -> str:
    spec = r.spec
    api = canary_tasks.kube_api(r.kubeconfig)
    total = len(canary.plan(spec))
    lines: list[str] = []

    def smoke_ok() -> bool:
        try:
            smoke(spec, kubeconfig=r.kubeconfig, service=names.preview_service(spec))
        except FleetError:
            return False
        return True

    def on_step(step: canary.Step, text: str) -> None:
        if text != "weights set":
            lines.append(text)
            r.report.note(text)

    outcome = canary_tasks.run_canary(api=api, spec=spec, live=r.stable,
                                      query=canary_tasks.product_query_fn(spec.cluster.project), smoke=smoke_ok,
                                      sleep=lambda cloud_s: time.sleep(scaled(cloud_s)),
                                      on_step=on_step)
    r.figures["canary"] = [{"weight": s.step.weight, "action": s.action,
                            "figures": {f.name: f.candidate for f in s.verdict.figures},
                            "live": {f.name: f.live for f in s.verdict.figures}} for s in outcome.steps]
    if not outcome.promoted:
        failed = outcome.failed_step
        assert failed is not None
        raise canary_tasks.CanaryError(
            f"canary stopped at {failed.step.weight}%: {failed.text(total)}",
            f"traffic is back on {r.stable}; read the figures, fix the candidate and release again")
    return f"{r.candidate} took 100% through {total} step(s): " + " | ".join(lines[-1:])


def route_to(spec: DeploymentSpec, *, kubeconfig: str, color: names.Color) -> str:
    """All of the HTTPRoute's weight on ``color`` (rollback_model's instant switch); no Gateway: nothing."""
    if spec.expose.gateway is None:
        return ""
    route = canary_tasks.set_weights(canary_tasks.kube_api(kubeconfig), spec, gateway.weights(color, 0))
    return f"; HTTPRoute {gateway.route_name(spec)}: {canary.route_weights(route)}"


STEPS: dict[str, tuple[str, Step]] = {
    **bluegreen.STEPS,
    "gateway": ("Gateway objects for both colors", step_gateway),
    "canary": ("Canary on real traffic through the Gateway", step_canary),
}


class Canary:
    """The ``ReleaseStrategy`` for release.strategy canary, and blue-green on a Gateway-exposed model."""

    name = "canary"
    steps = STEPS

    def plan(self, spec: DeploymentSpec, observed: Observed, desired: Desired) -> ReleasePlan:
        base = bluegreen.BlueGreen().plan(spec, observed, desired)
        return replace(base, steps=canary.plan_steps(base.steps))

    def roll_back(self, r: Release, exc: BaseException) -> str:
        """Weight back on the stable color first (instant: it is warm), then blue-green's rollback."""
        try:
            canary_tasks.set_weights(canary_tasks.kube_api(r.kubeconfig), r.spec, gateway.weights(r.stable, 0))
        except ApiException as route_exc:
            if route_exc.status != 404:  # no route yet (failed before the gateway step): nothing to move
                raise
        return bluegreen.roll_back(r, exc)
