"""The Vertex AI target (seed 002): deploy, release, park/wake and teardown of one spec on one endpoint.

The main flows (deploy_model, release_model, rollback_model, park_model/wake_model, teardown) reach these
through ``VertexAI`` (``targets.target_for`` picks it for ``target: vertex``); they run inside the
caller's flow run. There is no cluster to provision, and no health probe or idle policy yet. Steps, as the seed does them by hand:

deploy   1. Hugging Face preflight (token, revision, gated access, fits the Vertex machine's GPUs)
         2. Vertex GPU quota in the region — nothing is created before these pass
         3. Upload the model (serving container image, args, env)
         4. Get or create the endpoint by display name + labels
         5. Deploy on the machine type / accelerator / replicas, wait for the operation
         6. Wait until it answers, smoke prompts through predict and rawPredict
release  new model at 0 % → one traffic-split update to 100 % → analysis (smoke, error rate, latency)
         → the old split back on any failure; the old model undeployed after release.scale_down_delay
park     undeploy everything (nothing billed; endpoint and model kept), settings in a Prefect Variable
wake     redeploy from that record, wait until it answers
teardown undeploy, delete the endpoint and the spec's models, verify nothing is left

Where each verb's steps are, each module readable top to bottom:

  serving.py         what every verb shares: how its run opens (spec check, Slack thread, lock),
                     observing the endpoint, the preflights, getting or creating the model and the
                     endpoint, deploying a model on it
  analysis.py        smoke prompts (predict and rawPredict) and the post-promotion analysis
  deploy.py          deploy
  release.py         release and rollback (a release of the kept Model)
  park_steps.py      park
  wake_steps.py      wake
  teardown_steps.py  teardown and its verification
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from targets.base import ServingTarget, SpecRef


class VertexAI(ServingTarget):
    name = "vertex"

    def provision(self, *, spec: SpecRef, dry_run: bool = False) -> dict[str, Any]:
        raise self._unsupported("provision_cluster", "Vertex AI provisions the machines itself",
                                "run deploy_model with this spec: it creates the endpoint and deploys")

    def deploy(self, *, spec: SpecRef, revision: str | None = None, dry_run: bool = False) -> dict[str, Any]:
        from targets.vertex.deploy import deploy

        return deploy(spec, revision=revision, dry_run=dry_run)

    def release(self, *, spec: SpecRef, revision: str | None = None, dry_run: bool = False) -> dict[str, Any]:
        from targets.vertex.release import release

        return release(spec, revision=revision, dry_run=dry_run)

    def rollback(self, *, spec: SpecRef, release_again: Callable[..., dict[str, Any]]) -> dict[str, Any]:
        from targets.vertex.release import rollback

        return rollback(spec)  # a release of the kept Model, inside this flow run

    def park(self, *, spec: SpecRef, reason: str = "manual") -> dict[str, Any]:
        from targets.vertex.park_steps import park

        return park(spec)

    def wake(self, *, spec: SpecRef, reason: str = "manual", requested_at: datetime | None = None) -> dict[str, Any]:
        from targets.vertex.wake_steps import wake

        return wake(spec)  # no hold proxy on Vertex AI: no held request's wait to count

    def teardown(self, *, spec: SpecRef, cluster: bool = False, dry_run: bool = False) -> dict[str, Any]:
        from targets.vertex.teardown_steps import teardown

        return teardown(spec, dry_run=dry_run)  # no cluster: the endpoint and the models are everything


__all__ = ["VertexAI"]
