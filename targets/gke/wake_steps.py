"""GKE wake (the wake_model flow): undo exactly what park recorded, and stop the hold proxy.

wake_model
1. Take the lock; read the park record from the live Service
2. Restore what park changed on the GPU pool, then the replicas (and a Gateway's endpoint pickers)
3. Wait until the model answers (rollout, endpoints, engine) and passes the smoke prompts
   then the wake phase by phase: node, image, weights, engine, smoke (the kubelet's and engine's words)
4. Point the live Service (and a Gateway's HTTPRoute, to the pools as park found them, once their endpoint
   pickers are Ready: a pool whose picker is down fails every request, FailClose) back at the model;
   record the wake time (prewarm uses its p95)
5. Scale the hold proxy to 0 once the switch has settled (the next park scales it up again)
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from prefect import get_run_logger

from manifests import gateway, names
from manifests import park as P
from manifests import wake as W
from manifests.errors import FleetError
from manifests.wake import WakePhases
from targets.gke.capacity import capacity_for
from targets.gke.park_steps import Run, apply_pool, hold_route, live_service, read_pool
from targets.gke.serving import load_timeout_s, scaled, smoke, wait_until_answering
from tasks import k8s, schedules
from tasks.report import artifact_key
from tasks.settings import get_settings


def wake(run: Run, *, requested_at: datetime | None = None) -> dict[str, Any]:
    """``requested_at``: the wake event's ``occurred`` (the hold proxy's first held request), when a held
    request asked for this wake: the figure reported is then the client's wait (until the model answers and
    the hold proxy forwards it), the event -> trigger -> worker start included."""
    spec, kubeconfig, report, record = run.spec, run.kubeconfig, run.report, run.record
    start = time.monotonic()
    if record is None:
        report.skip("Restore the GPU pool and replicas", "not parked (no park record on the live Service)")
        retired = _retire_hold_proxy(run, settle_s=0.0, quiet=True)  # a wake killed after its switch
        return {"name": spec.name, "woken": False, "changed": ["hold proxy to 0"] if retired else [],
                "outcome": f"{spec.name} is not parked: nothing to do"}
    way = capacity_for(spec)
    with report.step("Restore what park changed on the GPU pool") as step:
        if record.pool is None:
            step.detail = "Autopilot: nodes come with the pods"
        else:
            plan, done = apply_pool(spec, kubeconfig=kubeconfig, location=run.location,
                                    now=read_pool(spec, kubeconfig, run.location),
                                    plan_for=lambda now: way.wake_pool_plan(record, now))
            step.detail = "; ".join(done + [plan.note])
    with report.step("Restore the replicas") as step:
        k8s.apply_object(kubeconfig=kubeconfig, obj=P.awake_service(spec, record.color))
        k8s.scale_deployment(kubeconfig=kubeconfig, namespace=spec.namespace,
                             name=names.deployment(spec, record.color), replicas=record.replicas)
        # the pickers start while the model loads (seconds against minutes); the route waits for them below
        for name, replicas in (record.pickers or {}).items():
            k8s.scale_deployment(kubeconfig=kubeconfig, namespace=spec.namespace, name=name, replicas=replicas)
        step.detail = f"{names.deployment(spec, record.color)} × {record.replicas}" + "".join(
            f"; {n} × {r}" for n, r in sorted((record.pickers or {}).items()))
    way.wait_for_nodes(spec, kubeconfig=kubeconfig, color=record.color, timeout_s=load_timeout_s(spec, None),
                       report=report)
    nodes_at = time.monotonic()
    with report.step("Wait until the model answers and passes the smoke prompts") as step:
        ready = wait_until_answering(spec, kubeconfig=kubeconfig, color=record.color, replicas=record.replicas,
                                     timeout_s=load_timeout_s(spec, None), service=P.awake_service_name(spec))
        ready_at, answering = time.monotonic(), datetime.now(UTC)  # the hold proxy forwards from here on
        results = smoke(spec, kubeconfig=kubeconfig, service=P.awake_service_name(spec))
        step.detail = f"{ready['ready_pods']} pod(s) answer, {len(results)} smoke prompt(s) passed"
    with report.step("Measure the wake phase by phase") as step:
        phases = measure_phases(spec, kubeconfig=kubeconfig, pods=ready.get("pods") or [],
                                node_s=nodes_at - start, ready_s=ready_at - nodes_at,
                                smoke_s=time.monotonic() - ready_at)
        step.detail = phases.line() + " (cloud clock)" if get_settings().time_scale != 1.0 else phases.line()
    if spec.expose.gateway is not None and record.pickers:
        with report.step("Wait until the endpoint pickers are Ready") as step:
            for name in sorted(record.pickers):
                k8s.wait_rollout(kubeconfig=kubeconfig, namespace=spec.namespace, name=name,
                                 timeout_s=max(60.0, load_timeout_s(spec, None)))
            step.detail = ", ".join(f"{n} × {r}" for n, r in sorted(record.pickers.items()))
    with report.step("Point the live Service back at the model") as step:
        routed = ""
        if spec.expose.gateway is not None:  # the Gateway's route back to the pools, as park found it
            weights = record.route or {gateway.pool_name(spec, c): w
                                       for c, w in gateway.weights(record.color, 0).items()}
            hold_route(spec, kubeconfig, held=False, weights=weights)
            routed = f"; HTTPRoute {spec.name} → " + ", ".join(f"{n} {w}" for n, w in sorted(weights.items()))
        live = live_service(spec, kubeconfig)["spec"].get("selector") or {}
        if live != record.selector:
            k8s.patch_service_selector(kubeconfig=kubeconfig, namespace=spec.namespace, name=names.service(spec),
                                       selector=record.selector, expect=live)
        took = time.monotonic() - start
        cloud_s = took / (get_settings().time_scale or 1.0)
        k8s.annotate(kubeconfig=kubeconfig, api_version="v1", kind="Service", name=names.service(spec),
                     namespace=spec.namespace, annotations={P.PARK_RECORD: None, P.ACTIVITY: None})
        step.detail = f"{names.service(spec)} → {record.color}{routed}"
    way.report_placement(spec, kubeconfig=kubeconfig, color=record.color, report=report,
                         key=artifact_key("wake", spec.name))
    _retire_hold_proxy(run, settle_s=scaled(spec.release.scale_down_delay.total_seconds()))
    # Real seconds: Prefect schedules fire on the wall clock, also against the (time-scaled) sandbox.
    history = schedules.record_wake(spec, took)
    if run.ref and spec.schedule and spec.schedule.wake:
        try:
            schedules.sync(specs=[run.ref])  # the next scheduled wake starts earlier by the new p95
        except FleetError as exc:
            get_run_logger().warning("prewarm not updated: %s", exc)
    waited = W.held_wait_s(requested_at, now=answering)
    outcome = W.outcome(spec.name, took_s=took, cloud_s=cloud_s if get_settings().time_scale != 1.0 else None,
                        phases=phases.line(), waited_s=waited, answering_s=ready_at - start)
    return {"name": spec.name, "woken": True, "took_s": took, "waited_s": waited, "answering_s": ready_at - start,
            "cloud_s": cloud_s, "color": record.color, "replicas": record.replicas, "wake_history": history, "phases": phases.to_dict(), "outcome": outcome}


def measure_phases(spec: Any, *, kubeconfig: str, pods: list[str], node_s: float, ready_s: float,
                   smoke_s: float) -> WakePhases:
    """The wake's phases on the cloud clock: the step timings (real seconds ÷ the sandbox's time scale; 1 on
    GCP), split by what the first pod's kubelet (``Pulled ... in Xs``) and engine (weights lines) said."""
    scale = get_settings().time_scale or 1.0
    pulled = weights = None
    if pods:
        try:  # a split we cannot read (an operator Role from before events were listed) never fails the wake
            events = [e for e in k8s.list_objects(kubeconfig=kubeconfig, api_version="v1", kind="Event",
                                                  namespace=spec.namespace)
                      if (e.get("involvedObject") or {}).get("name") == pods[0]]
            pulled = W.pulled_seconds(events)
            weights = W.weight_seconds(k8s.pod_logs(kubeconfig=kubeconfig, namespace=spec.namespace, pod=pods[0],
                                                    tail=1000))
        except Exception as exc:  # noqa: BLE001 - reported, the wake itself succeeded
            get_run_logger().warning("wake phases: could not read the pod's events or logs (%s)", exc)
    return W.phases(node_s=node_s / scale, ready_s=ready_s / scale, smoke_s=smoke_s / scale, pulled_s=pulled,
                    weights_s=weights or 0.0)


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
        if (live_service(spec, kubeconfig)["spec"].get("selector") or {}) == P.hold_selector(spec):
            step.detail = f"{names.service(spec)} still selects {name}: kept"
            return False
        time.sleep(settle_s)
        k8s.scale_deployment(kubeconfig=kubeconfig, namespace=spec.namespace, name=name, replicas=0)
        step.detail = f"{name} → 0 after {settle_s:g} s (the next park scales it up again)"
    return True
