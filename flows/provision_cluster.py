"""provision_cluster: what seeds 000, 001 and 004 do by hand with gcloud, as one flow.

1. Preflight: GPU quota, accelerator in zone, GKE version — before anything is created or paid for
2. Create the GKE cluster (Autopilot or Standard), get-or-create
3. Create the GPU node pool (Standard), failing over to the next zone/region on stockouts
4. Get cluster credentials (kubeconfig)

Steps: targets/gke/provision.py (Vertex AI provisions its machines itself: it says so).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from manifests.fleet import SpecParam
from targets import target_for


@flow(name="provision_cluster", log_prints=True)
def provision_cluster(spec: SpecParam = "deployments/gemma2-2b-it-vllm-l4.yaml",
                      dry_run: bool = False) -> dict[str, Any]:
    """GPU quota and zone preflight → GKE cluster → GPU node pool (with stockout failover) → kubeconfig.

    Args:
        spec: The deployment spec: a bundled one (deployments/*.yaml), another spec file, or the spec itself.
        dry_run: Run the preflight and show the plan (create / keep / update), change nothing.
    """
    return target_for(spec).provision(spec=spec, dry_run=dry_run)
