"""Preflight against the cluster itself: what the rendered objects need that GKE does not give by default.

Each check raises a ``PreflightError`` naming the missing piece and the command that installs it, before
deploy_model applies anything (an HPA without its metrics adapter, an nginx Ingress without ingress-nginx,
a Filestore claim without the Filestore CSI add-on, an Ingress naming an unreserved static IP would all be
accepted by the API server and then silently never work).
"""

from __future__ import annotations

from google.api_core import exceptions as gexc
from prefect import task

from manifests.errors import PreflightError
from tasks.clients import compute_get
from tasks.k8s import get_path
from tasks.retry import task_retries

STACKDRIVER_ADAPTER = ("kubectl apply -f https://raw.githubusercontent.com/GoogleCloudPlatform/k8s-stackdriver/"
                       "master/custom-metrics-stackdriver-adapter/deploy/production/adapter_new_resource_model.yaml"
                       " (then let its KSA custom-metrics/custom-metrics-stackdriver-adapter read Cloud Monitoring: "
                       "roles/monitoring.viewer through Workload Identity)")
INGRESS_NGINX = ("helm upgrade --install ingress-nginx ingress-nginx --repo https://kubernetes.github.io/ingress-nginx "
                 "--namespace ingress-nginx --create-namespace (it creates the nginx IngressClass)")


@task(**task_retries())
def check_metrics_adapter(*, kubeconfig: str | None, metric: str) -> str:
    """An HPA on a Prometheus metric needs custom.metrics.k8s.io, served by an adapter someone installed."""
    for version in ("v1beta1", "v1beta2"):
        svc = get_path(kubeconfig, f"/apis/apiregistration.k8s.io/v1/apiservices/{version}.custom.metrics.k8s.io")
        if svc is not None:
            backend = ((svc.get("spec") or {}).get("service") or {})
            return f"custom metrics served by {backend.get('namespace')}/{backend.get('name')}"
    raise PreflightError(f"autoscaling: the HPA scales on {metric}, but the cluster has no custom metrics API "
                         "(custom.metrics.k8s.io): the HPA would report FailedGetPodsMetric and never scale",
                         f"install the Custom Metrics Stackdriver Adapter: {STACKDRIVER_ADAPTER}")


@task(**task_retries())
def check_ingress_class(*, kubeconfig: str | None, name: str) -> str:
    if get_path(kubeconfig, f"/apis/networking.k8s.io/v1/ingressclasses/{name}") is None:
        raise PreflightError(f"expose.ingress.class: {name}: the cluster has no IngressClass {name!r}, so no "
                             "controller would ever serve this Ingress (GKE ships none for nginx)",
                             f"install ingress-nginx: {INGRESS_NGINX}; or use class: gce")
    return f"IngressClass {name} present"


@task(**task_retries())
def check_storage_class(*, kubeconfig: str | None, name: str, cluster: str, location: str) -> str:
    if get_path(kubeconfig, f"/apis/storage.k8s.io/v1/storageclasses/{name}") is None:
        fix = (f"enable the Filestore CSI driver: gcloud container clusters update {cluster} --location {location} "
               "--update-addons=GcpFilestoreCsiDriver=ENABLED (provision_cluster enables it for RWX caches on "
               "create)" if name.endswith("-rwx") else "set cache.storage_class to an existing class "
               "(standard-rwo, premium-rwo)")
        raise PreflightError(f"cache.storage_class: StorageClass {name!r} does not exist in the cluster, so the "
                             "cache claim would stay Pending and no pod would schedule", fix)
    return f"StorageClass {name} present"


@task(**task_retries())
def check_static_ip(*, project: str, name: str) -> str:
    try:
        addr = compute_get("projects", project, "global", "addresses", name)
    except gexc.NotFound:
        raise PreflightError(f"expose.ingress.static_ip_name: global address {name!r} is not reserved in project "
                             f"{project}; the GCE Ingress would never get it",
                             f"gcloud compute addresses create {name} --global --project {project}") from None
    return f"static IP {name} = {addr.get('address')}"
