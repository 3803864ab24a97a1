"""The weights' mirror (mirror_model): which files of a Hub revision belong in the bucket, which are already
there, and the spec fields it needs. Pure: no I/O.

A Hub revision's files go to ``gs://BUCKET/PREFIX/ORG/NAME/COMMIT/<path>`` (``manifests.startup.weights_uri``:
where the engine reads them). An object counts as mirrored when its size is the file's and its metadata
holds the checksum the Hub states for the file — the sha256 of an LFS file (its ``lfs.oid``), the git blob
id of a plain one — which the copy writes only with an upload whose bytes matched it (the object appears at
the upload's last byte, sent after that check) and whose crc32c Cloud Storage then confirmed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from manifests.startup import image_repository, weights_uri

if TYPE_CHECKING:
    from manifests.spec import DeploymentSpec

CHECKSUM_KEY = "hf-checksum"  # object metadata: "sha256:<hex>" (LFS) or "git-blob:<hex>"
REVISION_KEY = "hf-revision"


@dataclass(frozen=True)
class SourceFile:
    """One file of a Hub revision, as the Hub's tree lists it."""

    path: str
    size: int
    checksum: str  # "sha256:<hex>" for an LFS file, "git-blob:<hex>" otherwise


@dataclass(frozen=True)
class MirroredObject:
    name: str
    size: int
    checksum: str | None  # the object's CHECKSUM_KEY metadata
    generation: int


@dataclass(frozen=True)
class MirrorPlan:
    copy: tuple[SourceFile, ...]  # missing, or there with another size or checksum (a killed copy never is)
    done: tuple[SourceFile, ...]

    @property
    def bytes_to_copy(self) -> int:
        return sum(f.size for f in self.copy)


def location(spec: DeploymentSpec, commit: str) -> tuple[str, str]:
    """(bucket, object prefix ending in ``/``) of a commit's mirror."""
    uri = weights_uri(spec, commit)
    bucket, _, prefix = uri.removeprefix("gs://").partition("/")
    return bucket, prefix + "/"


def plan(files: list[SourceFile], objects: dict[str, MirroredObject], *, prefix: str) -> MirrorPlan:
    """Which files still need copying: a file is done only when its object has its size and checksum."""
    copy, done = [], []
    for f in sorted(files, key=lambda f: f.path):
        obj = objects.get(prefix + f.path)
        (done if obj is not None and obj.size == f.size and obj.checksum == f.checksum else copy).append(f)
    return MirrorPlan(tuple(copy), tuple(done))


def check(spec: DeploymentSpec, error: type[Exception]) -> None:
    """The spec fields mirror_model needs (a weights mirror, an image mirror, or both); raises
    ``error(field, problem, fix)`` (SpecError) for the first."""
    w = spec.startup.weights
    if w.source != "gcs" and image_repository(spec) is None:
        raise error("startup.weights.source", f"mirror_model copies the weights into Cloud Storage; this spec "
                    f"reads them from {w.source}", "set startup.weights: {source: gcs, bucket: <bucket>} "
                    "(the engine then loads the mirror), or startup.image.mirror: artifact-registry (the image "
                    "through an Artifact Registry remote repository)")
    if w.source != "gcs":
        return
    if not w.bucket:  # (the spec's own check already refuses this; kept for a spec built by hand)
        raise error("startup.weights.bucket", "no bucket to mirror into", "set startup.weights.bucket")


# Bucket-level roles that include storage.objects.get (what the engine needs to read the mirror).
READER_ROLES = frozenset({"roles/storage.objectViewer", "roles/storage.objectUser", "roles/storage.objectAdmin",
                          "roles/storage.admin", "roles/storage.legacyObjectReader", "roles/storage.legacyObjectOwner"})


def pod_identity(spec: DeploymentSpec) -> tuple[str, str]:
    """(IAM member the pods read the bucket as, the gcloud grant that lets them): the Google service account
    their Kubernetes service account impersonates, else that Kubernetes service account itself through
    Workload Identity Federation (its principal; the project number is the caller's to fill in)."""
    w = spec.startup.weights
    if spec.gcp_service_account:
        member = f"serviceAccount:{spec.gcp_service_account}"
    else:
        member = (f"principal://iam.googleapis.com/projects/PROJECT_NUMBER/locations/global/workloadIdentityPools/"
                  f"{spec.cluster.project}.svc.id.goog/subject/ns/{spec.namespace}/sa/{spec.service_account}")
    return member, (f"gcloud storage buckets add-iam-policy-binding gs://{w.bucket} --member={member} "
                    "--role=roles/storage.objectViewer")


def pods_can_read(bindings: list[dict], spec: DeploymentSpec) -> bool:
    """Whether the bucket's own policy lets the pods read objects (project-level grants are not visible here)."""
    member, _ = pod_identity(spec)
    pool_subject = member.split("/workloadIdentityPools/", 1)[-1]
    for b in bindings:
        if b.get("role") not in READER_ROLES:
            continue
        for m in b.get("members") or []:
            if m == member or (m.startswith("principal://") and m.split("/workloadIdentityPools/", 1)[-1] == pool_subject):
                return True
    return False
