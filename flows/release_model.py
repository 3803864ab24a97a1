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

rollback_model: back to the previous revision — an instant switch while the old color is warm, else a
release of it (as a release_model subflow run). Each target's steps are in ``targets/<target>/``.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow

from manifests.fleet import OptionalText, SpecParam
from targets import target_for
from targets.trust import admit_event_release


@flow(name="release_model", log_prints=True)
def release_model(spec: SpecParam = "deployments/gemma2-2b-it-vllm-l4.yaml", revision: OptionalText = None,
                  dry_run: bool = False, source: Literal["manual", "event"] = "manual") -> dict[str, Any]:
    """Blue-green release of ``revision`` (default: the spec's) with analysis and automatic rollback.

    ``source: event`` (set by the deployment trigger, never by the event): only a bundled spec path and a
    newer commit of its tracked branch, checked before anything runs (docs/security.md).

    Args:
        spec: The deployment spec: a bundled one (deployments/*.yaml), another spec file, or the spec itself.
        revision: The Hub commit, branch or tag to release (empty: the spec's model.revision).
        dry_run: Show the release plan (colors, steps), change nothing.
        source: Who started the run: manual (you) or event (the trigger, which checks what the event says).
    """
    revision = revision or None
    if source == "event":
        spec, revision = admit_event_release(spec=spec, revision=revision)
    return target_for(spec).release(spec=spec, revision=revision, dry_run=dry_run)


@flow(name="rollback_model", log_prints=True)
def rollback_model(spec: SpecParam = "deployments/gemma2-2b-it-vllm-l4.yaml") -> dict[str, Any]:
    """Back to the previous revision: an instant switch while the old color is warm, else a release of it.

    Args:
        spec: The deployment spec: a bundled one (deployments/*.yaml), another spec file, or the spec itself.
    """
    return target_for(spec).rollback(spec=spec, release_again=release_model)
