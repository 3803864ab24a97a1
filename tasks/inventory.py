"""Thin tasks that read what is in a cluster by label, across the kinds the product renders.

Used by teardown (what to remove, then proof that nothing is left), check_fleet and gpu_report.
"""

from __future__ import annotations

from typing import Any

from kubernetes.client.rest import ApiException
from prefect import task

from manifests.names import FIELD_MANAGER
from tasks.clients import kube_client
from tasks.k8s import KINDS, _call, object_path
from tasks.retry import task_retries

# Kinds a spec can own, in the order teardown removes them (workloads before what they mount).
OWNED_KINDS: list[tuple[str, str]] = [
    # the Inference Gateway (expose.gateway): the route first, so nothing routes to a pool being removed
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    ("inference.networking.x-k8s.io/v1alpha2", "InferenceObjective"),
    ("inference.networking.k8s.io/v1", "InferencePool"),
    ("gateway.networking.k8s.io/v1", "Gateway"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("networking.k8s.io/v1", "Ingress"),
    ("cloud.google.com/v1", "BackendConfig"),
    ("monitoring.googleapis.com/v1", "PodMonitoring"),
    ("monitoring.googleapis.com/v1", "Rules"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("apps/v1", "Deployment"),
    ("policy/v1", "PodDisruptionBudget"),
    ("v1", "Service"),
    ("v1", "Pod"),
    ("v1", "PersistentVolumeClaim"),
    ("v1", "ConfigMap"),
    ("v1", "Secret"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("v1", "ServiceAccount"),
]


# Cluster-scoped kinds only read here.
CLUSTER_KINDS = {("v1", "Node"): "nodes"}


def _list_path(api_version: str, kind: str, namespace: str | None) -> str:
    if (api_version, kind) in CLUSTER_KINDS:
        return f"/api/v1/{CLUSTER_KINDS[(api_version, kind)]}"
    if namespace:
        return object_path(api_version, kind, None, namespace)
    plural, _ = KINDS[(api_version, kind)]
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{base}/{plural}"


@task(**task_retries())
def list_kind(*, kubeconfig: str, api_version: str, kind: str, namespace: str | None = None,
              label_selector: str = "") -> list[dict[str, Any]]:
    """Objects of one kind (``namespace=None``: every namespace); [] when the kind is not installed (CRDs)."""
    query = [("labelSelector", label_selector)] if label_selector else []
    try:
        items = _call(kube_client(kubeconfig), "GET", _list_path(api_version, kind, namespace),
                      query=query).get("items", [])
    except ApiException as exc:
        if exc.status == 404:
            return []
        raise
    for item in items:  # list items carry no apiVersion/kind
        item.setdefault("apiVersion", api_version)
        item.setdefault("kind", kind)
    return items


def labelled(*, kubeconfig: str, namespace: str | None, label_selector: str,
             kinds: list[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """Every object of the product's kinds that matches ``label_selector``."""
    out: list[dict[str, Any]] = []
    for api_version, kind in kinds or OWNED_KINDS:
        out += list_kind(kubeconfig=kubeconfig, api_version=api_version, kind=kind, namespace=namespace,
                         label_selector=label_selector)
    return out


@task(**task_retries())
def set_labels(*, kubeconfig: str, obj: dict[str, Any], labels: dict[str, str]) -> None:
    """Merge-patch labels (hand a shared object to the spec that still uses it)."""
    meta = obj["metadata"]
    _call(kube_client(kubeconfig), "PATCH",
          object_path(obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace")),
          body={"metadata": {"labels": labels}}, content_type="application/merge-patch+json",
          query=[("fieldManager", FIELD_MANAGER)])  # ours: the next apply must not call it a hand edit


def ref(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{obj['kind']}/{meta['name']}"
