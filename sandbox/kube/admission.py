"""Admission that GKE runs on every create, and nobody asks for: defaults and refusals on pods and claims.

* ExtendedResourceToleration (kube-apiserver plugin, on in GKE): a pod whose containers request an
  extended resource such as ``nvidia.com/gpu`` gets ``{key: nvidia.com/gpu, operator: Exists,
  effect: NoSchedule}`` — so GKE's own GPU manifests schedule onto GKE's tainted GPU nodes.
* DefaultStorageClass: a claim without ``storageClassName`` gets the default class (``standard-rwo``).
* Autopilot (GKE Warden + the resource mutator): GPU pods must select ``cloud.google.com/gke-accelerator``;
  containers without requests get the documented defaults, and limits equal requests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sandbox.kube import podsecurity
from sandbox.kube.store import status_error

if TYPE_CHECKING:
    from sandbox.kube.cluster import KubeCluster

Obj = dict[str, Any]
GPU = "nvidia.com/gpu"
ACCELERATOR = "cloud.google.com/gke-accelerator"
# Autopilot defaults (cloud.google.com/kubernetes-engine/docs/concepts/autopilot-resource-requests):
# general purpose 0.5 vCPU / 2 GiB; GPU pods get per-accelerator defaults; every container 1 GiB ephemeral.
AUTOPILOT_DEFAULTS = {"": {"cpu": "500m", "memory": "2Gi"}, "nvidia-l4": {"cpu": "2", "memory": "7Gi"},
                      "nvidia-tesla-t4": {"cpu": "500m", "memory": "2Gi"},
                      "nvidia-tesla-a100": {"cpu": "9", "memory": "60Gi"},
                      "nvidia-a100-80gb": {"cpu": "9", "memory": "100Gi"},
                      "nvidia-h100-80gb": {"cpu": "25", "memory": "225Gi"}}


def _extended(pod: Obj) -> set[str]:
    names: set[str] = set()
    for c in ((pod.get("spec") or {}).get("containers") or []) + ((pod.get("spec") or {}).get("initContainers")
                                                                   or []):
        r = c.get("resources") or {}
        for key in list(r.get("requests") or {}) + list(r.get("limits") or {}):
            if "/" in key and not key.startswith(("kubernetes.io/", "requests.")) and not key.startswith("hugepages-"):
                names.add(key)
    return names


def extended_resource_toleration(pod: Obj) -> None:
    spec = pod.setdefault("spec", {})
    tolerations = spec.get("tolerations") or []
    for name in sorted(_extended(pod)):
        if any(t.get("key") == name and t.get("operator") == "Exists" and t.get("effect") in ("NoSchedule", None, "")
               for t in tolerations):
            continue
        tolerations.append({"key": name, "operator": "Exists", "effect": "NoSchedule"})
    if tolerations:
        spec["tolerations"] = tolerations


def gpu_compute_classes(cluster: Any) -> frozenset[str]:
    from sandbox.kube.resources import find

    rtype = find("cloud.google.com", "v1", "computeclasses")
    items = cluster.store.list(rtype)[0] if rtype is not None else []
    return frozenset(o["metadata"]["name"] for o in items
                     if any("gpu" in r for r in (o.get("spec") or {}).get("priorities") or []))


def autopilot_pod(pod: Obj, *, gpu_classes: frozenset[str] = frozenset()) -> None:
    """``gpu_classes``: the cluster's ComputeClasses with GPU priorities (a pod selecting one gets its GPU
    from the class: cloud.google.com/kubernetes-engine/docs/concepts/about-custom-compute-classes)."""
    spec = pod.setdefault("spec", {})
    selector = spec.get("nodeSelector") or {}
    if GPU in _extended(pod) and ACCELERATOR not in selector and \
            selector.get("cloud.google.com/compute-class") not in gpu_classes:
        raise status_error(403, "Forbidden", 'admission webhook "warden-validating.common-webhooks.networking.gke.io"'
                           " denied the request: GKE Warden rejected the request because it violates one or more "
                           'constraints. Violations details: {"[denied by autogke-gpu-limitation]":["When requesting '
                           f"'{GPU}' resources, the nodeSelector '{ACCELERATOR}' must be specified.\"]}}")
    defaults = AUTOPILOT_DEFAULTS.get(selector.get(ACCELERATOR, ""), AUTOPILOT_DEFAULTS[""])
    adjusted = []
    for c in spec.get("containers") or []:
        r = c.setdefault("resources", {})
        req, lim = r.setdefault("requests", {}), r.setdefault("limits", {})
        for key, value in (*defaults.items(), ("ephemeral-storage", "1Gi")):
            if key not in req:
                req[key] = lim.get(key, value)
                adjusted.append(f"{c.get('name')}:{key}")
            lim.setdefault(key, req[key])
        if GPU in lim:
            req.setdefault(GPU, lim[GPU])
    if adjusted:
        ann = pod.setdefault("metadata", {}).setdefault("annotations", {})
        ann["autopilot.gke.io/resource-adjustment"] = ('{"input":{},"output":{},"modified":true,"adjusted":'
                                                       + str(adjusted).replace("'", '"') + "}")


def default_storage_class(cluster: KubeCluster, claim: Obj) -> None:
    from sandbox.kube.resources import BY_KEY

    spec = claim.setdefault("spec", {})
    if "storageClassName" in spec:
        return
    classes, _ = cluster.store.list(BY_KEY[("storage.k8s.io", "storageclasses")], None)
    for sc in classes:
        if (sc["metadata"].get("annotations") or {}).get("storageclass.kubernetes.io/is-default-class") == "true":
            spec["storageClassName"] = sc["metadata"]["name"]
            return


def admit(cluster: KubeCluster, kind: str, obj: Obj, old: Obj | None) -> None:
    """Called by the API server on create/update, after defaulting (``old`` is None on create)."""
    podsecurity.admit(cluster, kind, obj, old)  # the namespace's Pod Security levels (create and update)
    if old is not None:
        return
    if kind == "Pod":
        extended_resource_toleration(obj)
        if cluster.autopilot_clusters:
            autopilot_pod(obj, gpu_classes=gpu_compute_classes(cluster))
    elif kind == "PersistentVolumeClaim":
        default_storage_class(cluster, obj)
        obj["status"] = {"phase": "Pending"}
