"""migrate_back (scheduled, e.g. every 30 minutes): a model whose single replica landed on a fallback
capacity option (spot gone at wake time, a preemption's replacement) moves back to the preferred option
once it has capacity again — by a new color beside the live one, never by restarting the only pod.

1. Decide, from the cluster alone: the live color's capacity option, parked or not, a release in flight
   (``manifests.capacity.migrate_back_decision``, pure); nothing to do is a skipped step, not a failure
2. Bring up the other color at the live revision; the cluster autoscaler places it on the first option
   with capacity
3. A candidate no better placed than the live color is scaled back to 0 (traffic never moved: the next
   run tries again); a better placed one is previewed, analysed, switched to, recorded, and the old color
   retired after scale_down_delay

Two or more replicas are moved by GKE's own active migration (the ComputeClass), one at a time under the
PodDisruptionBudget. The steps are in targets/gke/migrate.py (the target's ``migrate_back``).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from manifests.fleet import SpecParam
from targets import target_for


@flow(name="migrate_back", log_prints=True)
def migrate_back(spec: SpecParam = "deployments/mistral-7b-vllm-spot.yaml") -> dict[str, Any]:
    """Move a single replica on a fallback capacity option back to the preferred one, if it has room again.

    Args:
        spec: The deployment spec: a bundled one (deployments/*.yaml), another spec file, or the spec itself.
    """
    return target_for(spec).migrate_back(spec=spec)
