"""Every Kubernetes name and label the product uses, derived in one place."""

from __future__ import annotations

from typing import Literal

from manifests.spec import DeploymentSpec

Color = Literal["blue", "green"]
COLORS: tuple[Color, Color] = ("blue", "green")
COLOR_LABEL = "llm-fleet.dev/color"
REVISION_ANNOTATION = "llm-fleet.dev/model-revision"
SPEC_HASH_ANNOTATION = "llm-fleet.dev/spec-hash"
FIELD_MANAGER = "llm-fleet"
OPERATOR_ACCOUNT = "llm-fleet-operator"


def operator_cluster_rbac(namespace: str) -> str:
    """The operator's ClusterRole and ClusterRoleBinding: one per namespace (cluster-scoped names are
    shared by every spec in the cluster)."""
    return f"{OPERATOR_ACCOUNT}-{namespace}"


def other(color: Color) -> Color:
    return "green" if color == "blue" else "blue"


def deployment(spec: DeploymentSpec, color: Color) -> str:
    return f"{spec.name}-{color}"


def service(spec: DeploymentSpec) -> str:
    return spec.name


def preview_service(spec: DeploymentSpec) -> str:
    return f"{spec.name}-preview"


def cache_claim(spec: DeploymentSpec) -> str:
    return f"{spec.name}-cache"


def ingress(spec: DeploymentSpec) -> str:
    return spec.name


def backend_config(spec: DeploymentSpec) -> str:
    """The GCE Ingress backend's BackendConfig (its timeout outlasts a held request)."""
    return f"{spec.name}-backend"


def hpa(spec: DeploymentSpec) -> str:
    return spec.name


def alerts(spec: DeploymentSpec) -> str:
    return f"{spec.name}-alerts"


COMPUTE_CLASS_LABEL = "cloud.google.com/compute-class"  # node label + taint key, and the pods' selector


def lock_lease(spec: DeploymentSpec) -> str:
    """The model's lock: a coordination.k8s.io Lease in its namespace (tasks/locks.py)."""
    return f"{spec.name}-lock"


def compute_class(spec: DeploymentSpec) -> str:
    """The spec's GKE ComputeClass (cluster-scoped: the namespace keeps two same-named specs apart)."""
    return f"{spec.name}-{spec.namespace}"[:63].rstrip("-")


def instance_labels(spec: DeploymentSpec) -> dict[str, str]:
    """Labels that identify everything a spec owns (teardown selects on these)."""
    return {"app.kubernetes.io/instance": spec.name, "app.kubernetes.io/managed-by": "llm-fleet"}


def common_labels(spec: DeploymentSpec) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": spec.engine.kind,
        **instance_labels(spec),
        "app.kubernetes.io/part-of": "llm-fleet",
        "hf.co/model": spec.model.label,
        "hf.co/task": spec.model.task,
    }


def selector(spec: DeploymentSpec, color: Color) -> dict[str, str]:
    """What a color's pods carry and what the live/preview Services select on."""
    return {"app.kubernetes.io/instance": spec.name, COLOR_LABEL: color}


def pod_labels(spec: DeploymentSpec, color: Color) -> dict[str, str]:
    return {**common_labels(spec), "app.kubernetes.io/component": "model-server", COLOR_LABEL: color}
