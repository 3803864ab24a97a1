"""What a node pool's fast-start settings do to its nodes, as GKE does it (hooks of node pools, nodes and
the cluster autoscaler):

* ``config.gcfsConfig.enabled`` (or the cluster's ``nodePoolDefaults``): image streaming; the nodes carry
  ``cloud.google.com/gke-image-streaming=true`` and the kubelet streams eligible images;
* ``config.secondaryBootDisks`` (``[{diskImage, mode: CONTAINER_IMAGE_CACHE}]``): GKE >= 1.28.3-gke.1067000,
  image streaming on, and a disk image that exists in Compute (else 400 with GKE's reason); each node
  gets the disk (in parallel with its boot, so no extra boot time), the label
  ``cloud.google.com.node-restriction.kubernetes.io/gke-secondary-boot-disk-<image>=CONTAINER_IMAGE_CACHE.<project>``
  and the image's container images in ``status.images``;
* node boot by machine family and GPU driver install (``sandbox.coldstart.node_boot_s``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from sandbox import coldstart
from sandbox.core import DEFAULT_DELAYS
from sandbox.disk_images import disk_image, parse_disk_image
from sandbox.gke.common import _bad

if TYPE_CHECKING:
    from sandbox.gke.state import _Cluster, _Pool

IMAGE_STREAMING_LABEL = "cloud.google.com/gke-image-streaming"
SECONDARY_DISK_LABEL = "cloud.google.com.node-restriction.kubernetes.io/gke-secondary-boot-disk-"
MIN_SECONDARY_DISK_VERSION = (1, 28, 3, 1067000)


def _version(v: str) -> tuple[int, ...]:
    m = re.match(r"(\d+)\.(\d+)\.(\d+)(?:-gke\.(\d+))?", v or "")
    return tuple(int(x or 0) for x in m.groups()) if m else (0, 0, 0, 0)


def streaming_on(cluster: _Cluster, config: dict[str, Any]) -> bool:
    if "gcfsConfig" in config:
        return bool((config.get("gcfsConfig") or {}).get("enabled"))
    defaults = ((cluster.data.get("nodePoolDefaults") or {}).get("nodeConfigDefaults") or {})
    return bool((defaults.get("gcfsConfig") or {}).get("enabled"))


def validate(gke: Any, cluster: _Cluster, data: dict[str, Any]) -> None:
    """GKE's checks of ``config.secondaryBootDisks`` at create/update (400 INVALID_ARGUMENT)."""
    config = data.get("config") or {}
    disks = config.get("secondaryBootDisks") or []
    if not disks:
        return
    version = data.get("version") or cluster.data.get("currentNodeVersion") or cluster.data.get(
        "currentMasterVersion", "")
    if _version(version) < MIN_SECONDARY_DISK_VERSION:
        raise _bad(f"Secondary boot disks require GKE version 1.28.3-gke.1067000 or later; node version is "
                   f"{version}.")
    for i, disk in enumerate(disks):
        mode = disk.get("mode", "MODE_UNSPECIFIED")
        if mode == "CONTAINER_IMAGE_CACHE" and not streaming_on(cluster, config):
            raise _bad(f"nodePool.config.secondaryBootDisks[{i}]: mode CONTAINER_IMAGE_CACHE requires image "
                       f"streaming (gcfsConfig.enabled) on the node pool.")
        try:
            project, name = parse_disk_image(disk.get("diskImage", ""), cluster.project)
        except ValueError:
            raise _bad(f"nodePool.config.secondaryBootDisks[{i}].diskImage: \"{disk.get('diskImage', '')}\" is not "
                       f"a disk image (projects/PROJECT/global/images/NAME).") from None
        if disk_image(gke.compute, project, name) is None:
            raise _bad(f"nodePool.config.secondaryBootDisks[{i}].diskImage: The resource "
                       f"'projects/{project}/global/images/{name}' was not found.")


def node_labels(cluster: _Cluster, config: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = {}
    if streaming_on(cluster, config):
        labels[IMAGE_STREAMING_LABEL] = "true"
    for disk in config.get("secondaryBootDisks") or []:
        project, name = parse_disk_image(disk.get("diskImage", ""), cluster.project)
        labels[SECONDARY_DISK_LABEL + name] = f"{disk.get('mode', 'MODE_UNSPECIFIED')}.{project}"
    return labels


def preloaded_images(gke: Any, cluster: _Cluster, config: dict[str, Any]) -> list[dict[str, Any]]:
    """``status.images`` of a fresh node: what its CONTAINER_IMAGE_CACHE secondary boot disks hold."""
    out = []
    for disk in config.get("secondaryBootDisks") or []:
        if disk.get("mode") != "CONTAINER_IMAGE_CACHE":
            continue
        found = disk_image(gke.compute, *parse_disk_image(disk.get("diskImage", ""), cluster.project))
        for image in (found or {}).get("containers") or []:
            out.append({"names": [image], "sizeBytes": int(coldstart.image_bytes(image))})
    return out


def preload(gke: Any, cluster: _Cluster, pool: _Pool, node: str) -> None:
    images = preloaded_images(gke, cluster, pool.data.get("config") or {})
    kube = cluster.kube
    if not images or kube is None or getattr(kube, "store", None) is None:
        return
    from sandbox.kube.controllers import NODES

    def fn(n: dict[str, Any]) -> dict[str, Any]:
        n.setdefault("status", {})["images"] = images
        return n

    kube.store.mutate(NODES, "", node, fn)


def node_boot_s(gke: Any, pool_data: dict[str, Any]) -> float:
    """Cloud seconds a new node of this pool takes; an explicit ``delays["node_boot"]`` (tests) wins."""
    if gke.delays.get("node_boot") != DEFAULT_DELAYS["node_boot"]:
        return float(gke.delays["node_boot"])
    config = pool_data.get("config") or {}
    accs = config.get("accelerators") or []
    acc = accs[0] if accs else {}
    driver = (acc.get("gpuDriverInstallationConfig") or {}).get("gpuDriverVersion")
    return coldstart.node_boot_s(config.get("machineType", "e2-medium"), accelerator=acc.get("acceleratorType"),
                                 driver=driver)
