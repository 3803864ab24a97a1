"""mirror_model: copy a Hub revision's weights once into the Cloud Storage bucket the engine loads from.

1. Check the spec (``startup.weights: {source: gcs, bucket: ...}``) and resolve the revision to its commit
2. Compare the commit's files on the Hub with ``gs://BUCKET/PREFIX/ORG/NAME/COMMIT/`` (size and checksum)
3. Copy what is missing, each file streamed into a resumable upload, checked against the Hub's sha256
   before it becomes an object and against Cloud Storage's crc32c after
4. Verify every file is there; a rerun (after a kill anywhere) copies only what is missing, then nothing

The target (GKE) comes from the spec; its steps are in ``targets/gke/mirror_steps.py``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from manifests.fleet import OptionalText, SpecParam
from targets import target_for


@flow(name="mirror_model", log_prints=True)
def mirror_model(spec: SpecParam = "deployments/gemma2-2b-it-vllm-l4.yaml", revision: OptionalText = None,
                 dry_run: bool = False) -> dict[str, Any]:
    """Copy the spec's model revision (or ``revision``) into its startup.weights bucket, verified.

    Args:
        spec: The deployment spec: a bundled one (deployments/*.yaml), another spec file, or the spec itself.
            It must read its weights from Cloud Storage (startup.weights.source: gcs, with a bucket).
        revision: A Hub branch, tag or commit instead of the spec's model.revision.
        dry_run: List what would be copied, copy nothing.
    """
    return target_for(spec).mirror(spec=spec, revision=revision, dry_run=dry_run)
