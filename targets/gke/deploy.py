"""GKE deploy (the deploy_model flow): from `kubectl create secret` to `curl /generate`.

1. Hugging Face preflight: token, revision, gated access, fits the GPU — before touching the cluster
2. Get cluster credentials
3. Create the namespace and the Hugging Face token Secret
4. Apply the cache, Deployment, Services, Ingress, autoscaler and monitoring
5. Wait until the model answers (rollout complete, endpoints list the new pods, engine loaded)
6. Smoke test through the Service

On a model that already serves, a change to what the pods run is never applied in place: it becomes
a release (strategy.py, bluegreen.py) beside the live color; only non-disruptive objects
(Ingress, HPA bounds, monitoring, labels) are applied in place.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import get_run_logger

from manifests import names, playground
from manifests.errors import DeployError
from manifests.fleet import SpecPath
from manifests.names import Color
from manifests.park import require_image
from manifests.release import Desired
from manifests.render import model_deployment, object_key, render
from manifests.spec import DeploymentSpec, resolve_gke_spec, with_revision
from targets.gke.mirror_steps import ensure_mirror
from targets.gke.provision import cluster_preflight
from targets.gke.serving import (
    Prepared,
    ensure_namespace_and_secret,
    in_place_objects,
    load_timeout_s,
    observe,
    prepare,
    scale_down_color,
    smoke,
    smoke_rows,
    wait_until_answering,
)
from targets.gke.strategy import (
    ROLLED_BACK_TO,
    finish_retire,
    refuse_if_parked,
    rolled_back,
    run_release,
    strategy_for,
)
from tasks import k8s
from tasks.locks import model_lock
from tasks.report import Report, artifact_key


def first_deploy(t: Prepared, report: Report, *, color: Color = "blue") -> dict[str, Any]:
    """No color serves yet: apply everything with ``color`` live, wait until it answers, smoke test."""
    spec, log = t.spec, get_run_logger()
    applied_deployment = False
    try:
        with report.step("Create the namespace and the Hugging Face token Secret") as step:
            step.detail = ensure_namespace_and_secret(t)
        with report.step("Apply cache, Deployment, Services, Ingress, autoscaler, monitoring") as step:
            applied = [k8s.apply_object(kubeconfig=t.kubeconfig, obj=o)
                       for o in render(spec, color=color, revision=t.model.sha)[1:]]
            applied_deployment = True
            counts = {a: sum(x.action == a for x in applied) for a in ("created", "configured", "unchanged")}
            step.detail = ", ".join(f"{n} {a}" for a, n in counts.items() if n)
        replicas = model_deployment(spec, color)["spec"]["replicas"]
        with report.step("Wait until the model answers") as step:
            ready = wait_until_answering(spec, kubeconfig=t.kubeconfig, color=color, replicas=replicas,
                                         timeout_s=load_timeout_s(spec, t.model.params), service=names.service(spec))
            step.detail = f"{ready['ready_pods']} pod(s) of {ready.get('replicaset', '-')} Ready, serving {ready['model']}"
        with report.step("Smoke test through the Service") as step:
            results = smoke(spec, kubeconfig=t.kubeconfig, service=names.service(spec))
            step.detail = f"{len(results)} prompt(s) answered, " + ", ".join(
                f"{r.latency_s * 1000:.0f} ms" for r in results)
    except Exception:
        # A first deploy has no traffic to protect: whatever failed (a smoke prompt, an API error, a lost
        # lock), stop paying for its GPUs — unless another run holds the model now (the fence refuses).
        if applied_deployment:
            try:
                log.warning(scale_down_color(spec, kubeconfig=t.kubeconfig, color=color))
            except Exception as down:  # noqa: BLE001 - the first failure is what to fix
                log.warning("could not scale %s down: %s", names.deployment(spec, color), down)
        raise
    report.table_artifact(artifact_key("deploy", spec.name, "smoke"), smoke_rows(results), "Smoke prompts")
    return {"color": color, "replicas": replicas, "objects": [a.__dict__ for a in applied],
            "smoke": smoke_rows(results), "action": "deployed"}


def serving_apply(spec: DeploymentSpec, *, action: str, live: Color, revision: str) -> list[dict[str, Any]]:
    """What deploy_model applies to a model that serves, under a plan's ``action`` (``noop``: the pod template
    is the live color's; else a release follows, which applies its own candidate): the in-place objects only.

    Never the live Deployment, even on a noop: re-applying it would drop spec.replicas where an HPA owns the
    count (server-side apply removes a field its manager stops sending; the API server then defaults it to 1),
    and would change a hand-edited template of the serving color in place (check_fleet reports that drift)."""
    return in_place_objects(spec, live=live, revision=revision)


def wait_playground(t: Prepared, report: Report) -> str | None:
    """With ``expose.playground``: wait until its page answers (a CPU pod; its failure never touches the
    model), and say where to open it."""
    spec = t.spec
    if not spec.expose.playground:
        return None
    with report.step("Wait until the playground answers") as step:
        k8s.wait_rollout(kubeconfig=t.kubeconfig, namespace=spec.namespace, name=playground.name(spec), timeout_s=120)
        step.detail = playground.where(spec)
    return step.detail


def _dry_run(t: Prepared, report: Report, color: Color) -> dict[str, Any]:
    rows = []
    for obj in render(t.spec, color=color, revision=t.model.sha):
        api_version, kind, ns, name = object_key(obj)
        live = k8s.get_object(kubeconfig=t.kubeconfig, api_version=api_version, kind=kind, name=name,
                              namespace=ns or None)
        rows.append({"kind": kind, "name": name, "namespace": ns, "action": "apply" if live else "create"})
        get_run_logger().info("plan: %s %s/%s", rows[-1]["action"], kind, name)
    report.table_artifact(artifact_key("deploy", t.spec.name, "plan"), rows, "What deploy_model would apply")
    return {"dry_run": True, "plan": rows, "revision": t.model.sha}


def deploy(spec: SpecPath | str | dict[str, Any], *, revision: str | None = None,
           dry_run: bool = False) -> dict[str, Any]:
    """HF preflight → Secret → cache, Deployment, Service, Ingress, HPA, monitoring → model answers → smoke test.

    ``revision``: a Hub commit, branch or tag to serve instead of the spec's. On a serving model a changed
    pod template (a new revision too) is released blue-green (never changed in place).
    """
    spec = with_revision(resolve_gke_spec(spec, flow="deploy_model"), revision)
    if spec.expose.playground:
        require_image(spec, "expose.playground")  # the product's image, checked before anything is applied
    report = Report("deploy_model", f"{spec.name} ({spec.model.id})", spec.slack_channel)
    retire = None
    with report.run(artifact_key("deploy", spec.name), before_fail=_pod_logs, settle=rolled_back) as ended:
        t = prepare(spec, report)
        ensure_mirror(spec, commit=t.model.sha, token=t.token, report=report, dry_run=dry_run)  # startup.weights: gcs
        with report.step("Cluster preflight: storage class, IngressClass, static IP, metrics adapter") as step:
            step.detail = "; ".join(cluster_preflight(spec, kubeconfig=t.kubeconfig, location=t.location)) or "-"
        if dry_run:
            out = _dry_run(t, report, observe(spec, t.kubeconfig).live or "blue")
            report.succeed("dry run: nothing was changed")
            return out
        with model_lock(spec, purpose="deploy", kubeconfig=t.kubeconfig):
            observed = observe(spec, t.kubeconfig)  # under the lock: what the previous holder left
            plan = strategy_for(spec).plan(spec, observed, Desired(t.model.sha, t.desired_hash, spec.replicas))
            refuse_if_parked(spec, plan)
            if plan.action == "first_deploy":
                out = first_deploy(t, report)
            else:
                live: Color = plan.live  # type: ignore[assignment]
                with report.step("Apply Ingress, HPA bounds, monitoring, labels in place") as step:
                    ensure_namespace_and_secret(t)
                    applied = [k8s.apply_object(kubeconfig=t.kubeconfig, obj=o)
                               for o in serving_apply(spec, action=plan.action, live=live, revision=t.model.sha)]
                    step.detail = f"{sum(a.action != 'unchanged' for a in applied)} changed, live color {live}"
                if plan.action == "noop":
                    out = {"color": live, "replicas": observed.colors[live].replicas,
                           "objects": [a.__dict__ for a in applied], "smoke": [], "action": "unchanged"}
                else:
                    report.skip("Live pods untouched", f"the pod template changed: blue-green release "
                                f"{plan.live} → {plan.candidate} instead of an in-place update")
                    out, retire = run_release(t, report, observed, plan)
                    out["objects"] = [a.__dict__ for a in applied]
        if (where := wait_playground(t, report)) is not None:
            out["playground"] = where
        endpoint = f"http://{names.service(spec)}.{spec.namespace}.svc.cluster.local:{spec.expose.port}"
        report.succeed(f"{spec.model.id}@{t.model.sha[:12]} serving at {endpoint} "
                       f"({out['replicas']} replica(s), {out['color']})")
        if retire is not None:
            finish_retire(t, report, retire)
        return {"name": spec.name, "namespace": spec.namespace, "revision": t.model.sha, "endpoint": endpoint,
                "kubeconfig": t.kubeconfig, **out}
    return ended.state  # reached only after an automatic rollback (see rolled_back)


def _pod_logs(exc: Exception, report: Report) -> None:
    """A failed pod's last log lines: in the run's log, and the last five in the fix Slack shows."""
    if isinstance(exc, DeployError) and exc.logs:
        # after an automatic rollback the run's one ERROR line is the rollback's (it names the cause)
        level = logging.INFO if getattr(exc, ROLLED_BACK_TO, None) else logging.ERROR
        get_run_logger().log(level, "last log lines of the failing pod:\n%s", report.scrub("\n".join(exc.logs)))
        exc.fix = (exc.fix + "\nLast log lines:\n" + "\n".join(exc.logs[-5:])) if exc.fix else exc.fix
