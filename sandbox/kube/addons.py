"""In-cluster objects that GKE add-ons bring, switched by the cluster's ``addonsConfig``.

The Filestore CSI driver add-on (``addonsConfig.gcpFilestoreCsiDriverConfig.enabled``; on by default
in Autopilot) is what creates the ``standard-rwx`` / ``premium-rwx`` / ``enterprise-rwx`` StorageClasses
(cloud.google.com/kubernetes-engine/docs/how-to/persistent-volumes/filestore-csi-driver). Without it
they do not exist, and a claim on ``standard-rwx`` stays Pending (``sandbox.kube.storage``).
Disabling the add-on removes the classes again (existing volumes stay).
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from manifests import yamlio
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
    gateway = ((cluster_data.get("networkConfig") or {}).get("gatewayApiConfig") or {}).get("channel")
    if gateway == "CHANNEL_STANDARD":  # GKE installs the standard channel; it is never removed by the sandbox
        install_gateway_api(kube)


# ---- what users install themselves (kubectl apply / helm), as the objects those manifests create --------
APISERVICES = res.BY_KEY[("apiregistration.k8s.io", "apiservices")]
NAMESPACES = res.BY_KEY[("", "namespaces")]
SERVICES = res.BY_KEY[("", "services")]
INGRESS_CLASSES = res.BY_KEY[("networking.k8s.io", "ingressclasses")]
STACKDRIVER_ADAPTER = ("https://raw.githubusercontent.com/GoogleCloudPlatform/k8s-stackdriver/master/"
                       "custom-metrics-stackdriver-adapter/deploy/production/adapter_new_resource_model.yaml")


def install_custom_metrics_adapter(kube: KubeCluster, *, kind: str = "stackdriver") -> None:
    """What ``kubectl apply -f adapter_new_resource_model.yaml`` registers (or helm prometheus-adapter):
    its namespace, Service and the custom/external metrics APIServices pointing at it."""
    ns, name = (("custom-metrics", "custom-metrics-stackdriver-adapter") if kind == "stackdriver" else
                ("monitoring", "prometheus-adapter"))
    with contextlib.suppress(HttpError):
        kube.api.create(NAMESPACES, None, {"metadata": {"name": ns}})
    with contextlib.suppress(HttpError):
        kube.api.create(SERVICES, ns, {"metadata": {"name": name, "labels": {"k8s-app": name}},
                                       "spec": {"selector": {"k8s-app": name},
                                                "ports": [{"port": 443, "targetPort": 443, "protocol": "TCP"}]}})
    groups = [("v1beta1", "custom.metrics.k8s.io"), ("v1beta2", "custom.metrics.k8s.io")]
    if kind == "stackdriver":
        groups.append(("v1beta1", "external.metrics.k8s.io"))
    for version, group in groups:
        with contextlib.suppress(HttpError):
            kube.api.create(APISERVICES, None, {
                "metadata": {"name": f"{version}.{group}"},
                "spec": {"group": group, "version": version, "insecureSkipTLSVerify": True,
                         "groupPriorityMinimum": 100, "versionPriority": 100,
                         "service": {"namespace": ns, "name": name, "port": 443}}})


def install_ingress_nginx(kube: KubeCluster) -> None:
    """What ``helm install ingress-nginx`` adds that others can see: the ``nginx`` IngressClass whose
    controller the sandbox then plays (sandbox.kube.ingress serves Ingresses of that class)."""
    with contextlib.suppress(HttpError):
        kube.api.create(NAMESPACES, None, {"metadata": {"name": "ingress-nginx"}})
    with contextlib.suppress(HttpError):
        kube.api.create(INGRESS_CLASSES, None, {"metadata": {"name": "nginx", "labels": {
            "app.kubernetes.io/name": "ingress-nginx", "app.kubernetes.io/component": "controller"}},
            "spec": {"controller": "k8s.io/ingress-nginx"}})


# ---- the Gateway API and the Inference Extension: CRDs (vendored upstream YAML) ---------------------------
CRDS = res.BY_KEY[("apiextensions.k8s.io", "customresourcedefinitions")]
GATEWAY_CLASSES = res.BY_KEY[("gateway.networking.k8s.io", "gatewayclasses")]
ADDONS_DIR = Path(__file__).resolve().parents[1] / "addons"


@functools.cache
def _crds(filename: str) -> str:
    """The file's CRDs, parsed once per process (the Gateway API's are 490 KB of YAML), as JSON: each
    cluster gets objects of its own from one fast ``json.loads``."""
    docs = yamlio.load_all((ADDONS_DIR / filename).read_text())
    return json.dumps([d for d in docs if d and d.get("kind") == "CustomResourceDefinition"])


def _apply_crds(kube: KubeCluster, filename: str) -> None:
    for doc in json.loads(_crds(filename)):
        with contextlib.suppress(HttpError):
            kube.api.create(CRDS, None, doc)


def install_gateway_api(kube: KubeCluster) -> None:
    """What ``gcloud container clusters update --gateway-api=standard`` brings: the standard channel CRDs
    and GKE's GatewayClasses (controller ``networking.gke.io/gateway``, played by sandbox.kube.gateway)."""
    from sandbox.kube.gateway import CONTROLLER, GKE_CLASSES

    _apply_crds(kube, "gateway-api-crds.yaml")
    for name in GKE_CLASSES:
        with contextlib.suppress(HttpError):
            kube.api.create(GATEWAY_CLASSES, None, {"metadata": {"name": name},
                                                    "spec": {"controllerName": CONTROLLER}})


def install_inference_extension(kube: KubeCluster) -> None:
    """``kubectl apply -f .../gateway-api-inference-extension/releases/download/v1.5.0/manifests.yaml``:
    the InferencePool and InferenceObjective CRDs."""
    _apply_crds(kube, "inference-extension-crds.yaml")
