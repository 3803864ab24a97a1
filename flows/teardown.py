"""teardown: remove everything a spec created, then prove that nothing labelled for it is left.

1. Find the cluster and take the model's lock (never tears down mid-release or mid-wake)
2. Inventory: every object labelled ``app.kubernetes.io/instance=<spec>``, and the other specs that
   share the namespace, the Secret, the operator RBAC, the GPU pool and the cluster
3. Remove the workloads and what they expose (Deployments of both colors, Services incl. preview,
   Ingress, HPA, monitoring), the cache PVC unless ``cache.keep_on_teardown``, the Secret and the
   operator RBAC unless another spec still uses them (then they are handed to that spec's label),
   the namespace if nothing else lives there
4. With ``cluster: true``: the GPU pool and the cluster, unless another spec's workloads use them
5. Verify: list by the instance label again (and the pool and cluster when asked) — anything left fails the run

The target (GKE, Vertex AI) comes from the spec; its steps are in ``targets/<target>/``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from manifests.fleet import SpecParam
from targets import target_for


@flow(name="teardown", log_prints=True)
def teardown(spec: SpecParam = "deployments/gemma2-2b-it-vllm-l4.yaml",
             cluster: bool = False, dry_run: bool = False) -> dict[str, Any]:
    """Remove everything the spec created (with cluster=true also its GPU pool and cluster), then verify.

    Args:
        spec: The deployment spec: a bundled one (deployments/*.yaml), another spec file, or the spec itself.
        cluster: Also delete the spec's GPU node pool, and the cluster unless another spec uses it.
        dry_run: List what would be deleted, delete nothing.
    """
    return target_for(spec).teardown(spec=spec, cluster=cluster, dry_run=dry_run)
