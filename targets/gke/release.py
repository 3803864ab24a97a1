"""GKE release and rollback (the release_model and rollback_model flows): every change to a serving model is
a blue-green release (seed 003's `kubectl patch service`); the steps are in bluegreen.py and its modules.

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

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from prefect import get_run_logger

from manifests import names
from manifests.errors import FleetError
from manifests.fleet import SpecPath
from manifests.names import Color
from manifests.release import (
    HISTORY_ANNOTATION,
    RELEASE_ANNOTATION,
    Desired,
    Observed,
    ReleaseRecord,
    previous_promoted,
    switch_back_target,
    unpromoted_candidate,
    with_record,
)
from manifests.render import autoscaler
from manifests.spec import DeploymentSpec, resolve_gke_spec, with_revision
from targets.gke.canary import route_to
from targets.gke.deploy import first_deploy
from targets.gke.mirror_steps import ensure_mirror
from targets.gke.release_steps import point_preview, switch_traffic
from targets.gke.serving import cluster_location, observe, prepare, scale_down_color, smoke
from targets.gke.strategy import finish_retire, refuse_if_parked, rolled_back, run_release, strategy_for
from tasks import gke, k8s
from tasks.locks import model_lock
from tasks.report import Report, artifact_key


def release(spec: SpecPath | str | dict[str, Any], *, revision: str | None = None,
            dry_run: bool = False) -> dict[str, Any]:
    """Blue-green release of ``revision`` (default: the spec's) with analysis and automatic rollback."""
    spec = with_revision(resolve_gke_spec(spec, flow="release_model"), revision)
    report = Report("release_model", f"{spec.name} ({spec.model.id}@{spec.model.revision})", spec.slack_channel)
    retire: Color | None = None
    with report.run(artifact_key("release", spec.name), settle=rolled_back) as ended:
        t = prepare(spec, report)
        ensure_mirror(spec, commit=t.model.sha, token=t.token, report=report, dry_run=dry_run)  # startup.weights: gcs
        desired = Desired(t.model.sha, t.desired_hash, spec.replicas)
        if dry_run:
            plan = strategy_for(spec).plan(spec, observe(spec, t.kubeconfig), desired)
            report.table_artifact(artifact_key("release", spec.name, "plan"), plan.table(), "Release plan (dry run)")
            for row in plan.table():
                get_run_logger().info("plan: %s — %s", row["step"], row["detail"])
            report.succeed("dry run: nothing was changed")
            return {"dry_run": True, "plan": plan.table(), "action": plan.action, "revision": t.model.sha}
        with model_lock(spec, purpose="release", kubeconfig=t.kubeconfig):
            observed = observe(spec, t.kubeconfig)
            plan = strategy_for(spec).plan(spec, observed, desired)
            refuse_if_parked(spec, plan)
            if plan.action == "first_deploy":
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
    return ended.state  # reached only after an automatic rollback (see rolled_back)


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


def rollback(spec: SpecPath | str | dict[str, Any], *, release_again: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """Back to the previous revision: an instant switch while the old color is warm, else a release of it."""
    spec = resolve_gke_spec(spec, flow="rollback_model")
    report = Report("rollback_model", f"{spec.name} ({spec.model.id})", spec.slack_channel)
    with report.run(artifact_key("rollback", spec.name)):
        location = cluster_location(spec)
        kubeconfig = gke.get_credentials(project=spec.cluster.project, location=location, name=spec.cluster.name)
        with model_lock(spec, purpose="rollback", kubeconfig=kubeconfig):
            observed = observe(spec, kubeconfig)
            if observed.parked is not None:  # the Service selects the hold proxy: no color is live
                raise FleetError(f"{spec.name} is parked (since {observed.parked.get('parked_at', '?')}): no color "
                                 "serves, so there is nothing to switch back from", f"run wake_model for {spec.name}, "
                                 "then rollback_model")
            if observed.live is None:
                raise FleetError(f"{spec.name} does not serve yet: nothing to roll back", "run deploy_model")
            live, other = observed.live, names.other(observed.live)
            warm = observed.colors[other]
            if unpromoted_candidate(observed) == other:
                return abandon_candidate(spec, report, kubeconfig=kubeconfig, observed=observed)
            if switch_back_target(observed) == other:  # never the candidate a release rejected
                with report.step(f"Switch back to the warm color {other}") as step:
                    rollout = k8s.wait_rollout(kubeconfig=kubeconfig, namespace=spec.namespace,
                                               name=names.deployment(spec, other), timeout_s=60)
                    step.detail = switch_traffic(spec, kubeconfig=kubeconfig, to=other, frm=live,
                                                 pods=list(rollout.pods))
                    step.detail += route_to(spec, kubeconfig=kubeconfig, color=other)  # Gateway: its weights too
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
    again = spec.model_dump(mode="json", by_alias=True, exclude_unset=True)
    # rollback_model is a person's decision already: no second gate (Argo's fast-track rollback to the
    # stable ReplicaSet skips pauses too).
    again.setdefault("release", {})["auto_promote"] = True
    return release_again(spec=again, revision=previous["revision"])
