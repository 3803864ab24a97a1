"""Compute Engine disk images that GKE secondary boot disks are made from (``images.get``), and which
container images each one holds.

On GCP such an image is built once with ``gke-disk-image-builder`` (a VM pulls the container images into
a disk, the disk becomes an image); a node pool lists it in ``config.secondaryBootDisks`` with mode
``CONTAINER_IMAGE_CACHE`` and every new node gets a disk made from it, its images already in containerd's
store. The sandbox keeps ``(project, name) -> container images`` (``add_disk_image``, what the builder
would have produced) and answers ``GET /compute/v1/projects/P/global/images/NAME`` as Compute does (404
``notFound`` otherwise), which is how a preflight checks that the image exists.
"""

from __future__ import annotations

from typing import Any

from sandbox.compute import _P, _ROUTES, API_BASE, Compute, ComputeHandler, _not_found
from sandbox.core import route


def _store(compute: Compute) -> dict[tuple[str, str], dict[str, Any]]:
    return compute.__dict__.setdefault("disk_images", {})


def add_disk_image(compute: Compute, project: str, name: str, container_images: list[str], *,
                   size_gb: int = 100) -> dict[str, Any]:
    """What ``gke-disk-image-builder --project-name=P --image-name=NAME --container-image=...`` leaves."""
    image = {"kind": "compute#image", "name": name, "status": "READY", "diskSizeGb": str(size_gb),
             "sourceType": "RAW", "architecture": "X86_64", "id": str(abs(hash((project, name))) % 10**18),
             "labels": {"gke-disk-image-builder": "true"},
             "selfLink": f"{API_BASE}/projects/{project}/global/images/{name}"}
    with compute._lock:
        _store(compute)[(project, name)] = {"resource": image, "containers": list(container_images)}
    return image


def disk_image(compute: Compute, project: str, name: str) -> dict[str, Any] | None:
    """``{"resource": ..., "containers": [...]}`` or None."""
    with compute._lock:
        return _store(compute).get((project, name))


def parse_disk_image(ref: str, project: str) -> tuple[str, str]:
    """``projects/P/global/images/NAME`` or ``global/images/NAME`` (the pool's project) -> (project, name)."""
    parts = ref.strip("/").split("/")
    if len(parts) >= 5 and parts[0] == "projects" and parts[2:4] == ["global", "images"]:
        return parts[1], parts[4]
    if len(parts) == 3 and parts[:2] == ["global", "images"]:
        return project, parts[2]
    raise ValueError(ref)


@route(_ROUTES, "GET", _P + r"/global/images/(?P<name>[^/]+)")
def _get_image(h: ComputeHandler, project: str, name: str):
    found = disk_image(h.compute, project, name)
    if found is None:
        raise _not_found(f"projects/{project}/global/images/{name}")
    return found["resource"]
