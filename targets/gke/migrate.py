"""Back to the preferred capacity option (issue 23): a single replica that landed on a fallback option
(spot gone at wake time, a preemption's replacement) moves back when the first option has capacity again —
the blue-green way, never by restarting the only pod. The decision is ``manifests.capacity.
migrate_back_decision`` (pure); acting on it is a release of the live revision to the other color:
capacity, bring up (the cluster autoscaler places it on the first option with capacity), a placement check
(a candidate no better than the live color is rolled back: scaled to 0, traffic never moved — try again at
the next check), preview and analysis, the switch, the record, and the old color retired after
scale_down_delay. The live color's pod template is never touched and it is never scaled down before the
candidate answers.
"""

from __future__ import annotations

from typing import Any

from manifests import names
from manifests.capacity import MIGRATE_STEPS, MigrateBack, landed_better, migrate_back_decision
from manifests.errors import FleetError
from manifests.fleet import SpecPath
from manifests.release import ReleasePlan
from manifests.spec import DeploymentSpec, resolve_gke_spec, with_revision
from targets.gke.capacity import capacity_for
from targets.gke.release_steps import Release
from targets.gke.serving import cluster_location, observe, prepare
from targets.gke.strategy import finish_retire, rolled_back, run_release
from tasks import gke
from tasks.locks import model_lock
from tasks.report import Report, artifact_key


class NotBetterYet(FleetError):
    """The migration's candidate landed on an option no better than the live color's."""


def decide(spec: DeploymentSpec, *, kubeconfig: str) -> tuple[MigrateBack, Any]:
    """What the cluster says, and the decision (no change made)."""
    observed = observe(spec, kubeconfig)
    live = observed.live
    other = observed.colors[names.other(live)] if live else None
    placement = capacity_for(spec).placement(spec, kubeconfig=kubeconfig, color=live) if live else None
    cur = observed.colors[live] if live else None
    matches = bool(cur and cur.revision and cur.spec_hash == _hash(spec, cur.revision))
    decision = migrate_back_decision(spec, parked=observed.parked is not None, live=live,
                                     live_replicas=cur.replicas if cur else 0,
                                     other_replicas=other.replicas if other else 0, live_matches_spec=matches,
                                     placement=placement)
    return decision, observed


def _hash(spec: DeploymentSpec, revision: str) -> str:
    from manifests.render import spec_hash

    return spec_hash(spec, revision)


def migrate_back(spec: SpecPath | str | dict[str, Any]) -> dict[str, Any]:
    """Move the model back toward its first capacity option if the decision says so; else say why not."""
    spec = resolve_gke_spec(spec, flow="migrate_back")
    report = Report("migrate_back", f"{spec.name} ({spec.model.id})", spec.slack_channel)
    with report.run(artifact_key("migrate_back", spec.name), settle=rolled_back) as ended:
        kubeconfig = gke.get_credentials(project=spec.cluster.project, location=cluster_location(spec),
                                         name=spec.cluster.name)
        decision, observed = decide(spec, kubeconfig=kubeconfig)
        if not decision.migrate:
            report.skip("Move back to the preferred option", decision.reason)
            report.succeed(f"no move: {decision.reason}")
            return {"name": spec.name, "action": "none", "reason": decision.reason}
        spec = with_revision(spec, observed.colors[observed.live].revision)  # the live revision, not a new one
        t = prepare(spec, report)
        with model_lock(spec, purpose="migrate back", kubeconfig=t.kubeconfig):
            decision, observed = decide(spec, kubeconfig=t.kubeconfig)  # again, under the lock
            if not decision.migrate:
                report.skip("Move back to the preferred option", decision.reason)
                report.succeed(f"no move: {decision.reason}")
                return {"name": spec.name, "action": "none", "reason": decision.reason}
            live = observed.live
            plan = ReleasePlan("release", decision.reason, live, names.other(live), MIGRATE_STEPS,
                               t.model.sha, observed.colors[live].revision, retire=live)

            def placement(r: Release) -> str:
                found = capacity_for(r.spec).placement(r.spec, kubeconfig=r.kubeconfig, color=r.candidate)
                better, why = landed_better(found, than=decision.serving_option or 0)
                if not better:
                    raise NotBetterYet(why, "nothing to do: the next check tries again")
                return why

            try:
                out, retire = run_release(t, report, observed, plan, extra_steps={
                    "placement": ("The candidate landed on a better capacity option", placement)})
            except NotBetterYet as exc:  # rolled back: the candidate at 0, traffic never moved — an outcome
                report.succeed(f"{live} keeps serving on option {decision.serving_option}: {exc}")
                return {"name": spec.name, "action": "stayed", "color": live, "reason": str(exc)}
        if retire is not None:
            finish_retire(t, report, retire)
        report.succeed(f"moved back: {spec.model.id}@{t.model.sha[:12]} serving on {out['color']}")
        return {"name": spec.name, "revision": t.model.sha, **out, "action": "migrated_back"}
    return ended.state  # reached only after an automatic rollback (see rolled_back)
