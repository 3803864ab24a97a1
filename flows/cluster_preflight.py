"""What a spec needs from the cluster beyond GKE's defaults, checked before deploy_model applies anything."""

from __future__ import annotations

from manifests.render import adapter_metric
from manifests.spec import DeploymentSpec
from tasks import cluster_checks


def cluster_preflight(spec: DeploymentSpec, *, kubeconfig: str, location: str) -> list[str]:
    """One line per check that passed; the first missing piece raises a PreflightError with its install step."""
    notes: list[str] = []
    if spec.cache.enabled and spec.cache.storage_class:
        notes.append(cluster_checks.check_storage_class(kubeconfig=kubeconfig, name=spec.cache.storage_class,
                                                        cluster=spec.cluster.name, location=location))
    ing = spec.expose.ingress
    if ing is not None and ing.class_name == "nginx":
        notes.append(cluster_checks.check_ingress_class(kubeconfig=kubeconfig, name="nginx"))
    if ing is not None and ing.static_ip_name:
        notes.append(cluster_checks.check_static_ip(project=spec.cluster.project, name=ing.static_ip_name))
    if spec.autoscaling is not None:
        metric = adapter_metric(spec.autoscaling.metric or spec.engine.defaults.queue_metric)
        notes.append(cluster_checks.check_metrics_adapter(kubeconfig=kubeconfig, metric=metric))
    return notes
