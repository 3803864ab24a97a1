"""In-cluster objects that GKE add-ons bring, switched by the cluster's ``addonsConfig``.

The Filestore CSI driver add-on (``addonsConfig.gcpFilestoreCsiDriverConfig.enabled``; on by default
in Autopilot) is what creates the ``standard-rwx`` / ``premium-rwx`` / ``enterprise-rwx`` StorageClasses
(cloud.google.com/kubernetes-engine/docs/how-to/persistent-volumes/filestore-csi-driver). Without it
they do not exist, and a claim on ``standard-rwx`` stays Pending (``sandbox.kube.storage``).
Disabling the add-on removes the classes again (existing volumes stay).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from sandbox.core import HttpError
from sandbox.kube import resources as res

if TYPE_CHECKING:
    from sandbox.kube.cluster import KubeCluster

SCS = res.BY_KEY[("storage.k8s.io", "storageclasses")]
FILESTORE_CLASSES = {"standard-rwx": "standard", "premium-rwx": "premium", "enterprise-rwx": "enterprise"}


def filestore_enabled(cluster_data: dict[str, Any]) -> bool:
    cfg = ((cluster_data.get("addonsConfig") or {}).get("gcpFilestoreCsiDriverConfig") or {})
    if "enabled" in cfg:
        return bool(cfg["enabled"])
    return bool((cluster_data.get("autopilot") or {}).get("enabled"))


def set_filestore(kube: KubeCluster, enabled: bool) -> None:
    for name, tier in FILESTORE_CLASSES.items():
        live = kube.store.get(SCS, "", name)
        if enabled and live is None:
            with contextlib.suppress(HttpError):
                kube.api.create(SCS, None, {
                    "metadata": {"name": name, "labels": {"addonmanager.kubernetes.io/mode": "EnsureExists",
                                                          "k8s-app": "gcp-filestore-csi-driver"}},
                    "provisioner": "filestore.csi.storage.gke.io",
                    "parameters": {"tier": tier, "network": "default"},
                    "reclaimPolicy": "Delete", "volumeBindingMode": "WaitForFirstConsumer",
                    "allowVolumeExpansion": True})
        elif not enabled and live is not None:
            with contextlib.suppress(HttpError):
                kube.api.delete(SCS, "", name)


def sync(kube: Any, cluster_data: dict[str, Any]) -> None:
    """Make ``kube`` hold what the cluster's add-ons install (GKE calls this on create and update)."""
    if kube is None or not hasattr(kube, "store"):
        return
    set_filestore(kube, filestore_enabled(cluster_data))
