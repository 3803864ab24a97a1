"""deploy_model: from `kubectl create secret` to `curl /generate`, as one flow.

1. Hugging Face preflight: token, revision, gated access, fits the GPU — before touching the cluster
2. Get cluster credentials
3. Create the namespace and the Hugging Face token Secret
4. Apply the cache, Deployment, Services, Ingress, autoscaler and monitoring
5. Wait until the model answers (rollout complete, endpoints list the new pods, engine loaded)
6. Smoke test through the Service

On a model that already serves, a change to what the pods run is never applied in place: it becomes
a blue-green release (release_model's steps) beside the live color; only non-disruptive objects
(Ingress, HPA bounds, monitoring, labels) are applied in place.

The target (GKE, Vertex AI) comes from the spec's ``target:``; its steps are in ``targets/<target>/``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from manifests.fleet import OptionalText, SpecParam
from targets import target_for


@flow(name="deploy_model", log_prints=True)
def deploy_model(spec: SpecParam = "deployments/gemma2-2b-it-vllm-l4.yaml", revision: OptionalText = None,
                 dry_run: bool = False) -> dict[str, Any]:
    """HF preflight → Secret → cache, Deployment, Service, Ingress, HPA, monitoring → model answers → smoke test.

    On a serving model a changed pod template is released blue-green (never changed in place).

    Args:
        spec: The deployment spec: a bundled one (deployments/*.yaml), another spec file, or the spec itself.
        revision: A Hub commit, branch or tag to serve instead of the spec's model.revision (empty: the spec's).
        dry_run: Show what would be created or applied, change nothing.
    """
    return target_for(spec).deploy(spec=spec, revision=revision or None, dry_run=dry_run)
