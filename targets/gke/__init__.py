"""GKE: models on a GKE cluster's GPU node pool, two colors behind one live Service.

Where each verb's steps are, each module readable top to bottom:

  provision.py       cluster + GPU pool (zone/region failover), and the cluster preflight deploy runs
  serving.py         what every verb shares: Hub preflight, credentials, observing the colors, "ready"
  deploy.py          deploy: first deploy, or in-place objects + a release when the pod template changed
  release.py         release and rollback (instant switch back to a warm color, else a release of it)
  strategy.py        the release-strategy seam: run a plan's named steps, roll back on failure
  bluegreen.py       the blue-green strategy (and recreate): its step table and its rollback
  release_steps.py   the steps that move things (capacity, bring up, preview, switch, record)
  analysis.py        pre- and post-promotion analysis
  promotion_gate.py  release.auto_promote: false (pause the flow run for a person)
  park_steps.py      park, the frame park and wake share, the idle observation
  wake_steps.py      wake, retiring the hold proxy
  teardown_steps.py  teardown and its verification
  health_checks.py   observe: probe through the live Service, metrics, drift
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from manifests.park import Decision
from manifests.spec import DeploymentSpec
from targets.base import Check, ServingTarget, SpecRef


class GKE(ServingTarget):
    name = "gke"

    def provision(self, *, spec: SpecRef, dry_run: bool = False) -> dict[str, Any]:
        from targets.gke.provision import provision

        return provision(spec, dry_run=dry_run)

    def deploy(self, *, spec: SpecRef, revision: str | None = None, dry_run: bool = False) -> dict[str, Any]:
        from targets.gke.deploy import deploy

        return deploy(spec, revision=revision, dry_run=dry_run)

    def release(self, *, spec: SpecRef, revision: str | None = None, dry_run: bool = False) -> dict[str, Any]:
        from targets.gke.release import release

        return release(spec, revision=revision, dry_run=dry_run)

    def rollback(self, *, spec: SpecRef, release_again: Callable[..., dict[str, Any]]) -> dict[str, Any]:
        from targets.gke.release import rollback

        return rollback(spec, release_again=release_again)

    def park(self, *, spec: SpecRef, reason: str = "manual") -> dict[str, Any]:
        from targets.gke.park_steps import park, under_model_lock

        return under_model_lock("park_model", spec, reason, park)

    def wake(self, *, spec: SpecRef, reason: str = "manual", requested_at: datetime | None = None) -> dict[str, Any]:
        from targets.gke.park_steps import under_model_lock
        from targets.gke.wake_steps import wake

        return under_model_lock("wake_model", spec, reason, lambda run: wake(run, requested_at=requested_at))

    def teardown(self, *, spec: SpecRef, cluster: bool = False, dry_run: bool = False) -> dict[str, Any]:
        from targets.gke.teardown_steps import teardown

        return teardown(spec, cluster=cluster, dry_run=dry_run)

    def migrate_back(self, *, spec: SpecRef) -> dict[str, Any]:
        from targets.gke.migrate import migrate_back

        return migrate_back(spec)

    def mirror(self, *, spec: SpecRef, revision: str | None = None, dry_run: bool = False) -> dict[str, Any]:
        from targets.gke.mirror_steps import mirror_model

        return mirror_model(spec, revision=revision, dry_run=dry_run)

    def observe(self, *, spec: DeploymentSpec, smoke: bool, seen: dict[str, Any]) -> Check:
        from targets.gke.health_checks import check_one

        return check_one(spec, seen.setdefault("kubeconfigs", {}), smoke=smoke,
                         observed=seen.setdefault("pools", set()))

    def served_revision(self, *, spec: DeploymentSpec) -> str | None:
        from targets.gke.serving import served_revision

        return served_revision(spec)

    def idle(self, *, spec: DeploymentSpec, now: datetime) -> Decision:
        from targets.gke.park_steps import observe_idle

        return observe_idle(spec, now)
