"""The chat playground's objects (``expose.playground``): seed 004's web client, rendered per model.

A CPU-only Deployment of the product's own image (the one the hold proxy runs) serving
``python -m servers.playground``, configured like the seed's ``vllm-client`` (``LLM_URL`` = the model's live
Service, ``LLM_NAME`` = the served model id), and its ClusterIP Service; a ServiceAccount that may only
``get`` Services and Deployments, to show which color and revision answer. Where the spec has an Ingress,
the model's Ingress routes ``/playground`` to it (``render.ingress``).
"""

from __future__ import annotations

from typing import Any

from manifests import names
from manifests.spec import DeploymentSpec

Obj = dict[str, Any]
PORT = 8080
PATH = "/playground"
UID = 10001  # the product image's user (Dockerfile)
RBAC = "rbac.authorization.k8s.io"
ACCOUNT = "llm-fleet-playground"  # per namespace, like the operator's account


def name(spec: DeploymentSpec) -> str:
    return f"{spec.name}-playground"


def labels(spec: DeploymentSpec) -> dict[str, str]:
    return {**names.common_labels(spec), "app.kubernetes.io/component": "playground"}


def base_path(spec: DeploymentSpec) -> str:
    return PATH if spec.expose.ingress is not None else "/"


def _api(spec: DeploymentSpec) -> str:
    # TGI serves chat only with a chat template; PaliGemma (a VLM without one) answers /generate_stream.
    return "generate" if spec.engine.kind == "tgi" and spec.model.is_vision else "chat"


def server_pod_security() -> tuple[Obj, Obj]:
    """Pod and container security contexts of the product's own servers (hold proxy, playground):
    Pod Security 'restricted' (non-root, no privilege escalation, no capabilities, RuntimeDefault seccomp)."""
    pod = {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "seccompProfile": {"type": "RuntimeDefault"}}
    container = {"allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": True,
                 "capabilities": {"drop": ["ALL"]}}
    return pod, container


def _meta(spec: DeploymentSpec) -> Obj:
    return {"name": name(spec), "namespace": spec.namespace, "labels": labels(spec)}


def rbac(spec: DeploymentSpec) -> list[Obj]:
    """The page's reader: a ServiceAccount, a Role with ``get`` on Services and Deployments (the live selector
    and each color's revision annotation; no list, no watch, no Secrets) and its RoleBinding — one set per
    namespace, shared by its models' playgrounds like the operator's own Role, and applied with it by the
    cluster admin (``render.operator_rbac``): the operator may re-apply them by name but never creates RBAC."""
    meta = {"name": ACCOUNT, "namespace": spec.namespace, "labels": labels(spec)}
    rules = [{"apiGroups": [""], "resources": ["services"], "verbs": ["get"]},
             {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]}]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": f"{RBAC}/v1", "kind": "Role", "metadata": meta, "rules": rules},
        {"apiVersion": f"{RBAC}/v1", "kind": "RoleBinding", "metadata": meta,
         "roleRef": {"apiGroup": RBAC, "kind": "Role", "name": ACCOUNT},
         "subjects": [{"kind": "ServiceAccount", "name": ACCOUNT, "namespace": spec.namespace}]},
    ]


def deployment(spec: DeploymentSpec) -> Obj:
    env = {
        "LLM_SERVICE": names.service(spec), "LLM_NAMESPACE": spec.namespace, "LLM_PORT": str(spec.expose.port),
        "LLM_URL": f"http://{names.service(spec)}.{spec.namespace}.svc.cluster.local:{spec.expose.port}",
        "LLM_NAME": spec.model.id, "LLM_ENGINE": spec.engine.kind, "LLM_API": _api(spec),
        "LLM_VISION": "1" if spec.model.is_vision else "0",
        "LLM_DEPLOYMENT_PREFIX": names.deployment(spec, "blue").removesuffix("blue"),
        "PLAYGROUND_BASE": base_path(spec),
    }
    pod_sc, container_sc = server_pod_security()
    probe = {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10, "timeoutSeconds": 2}
    container = {
        "name": "playground", "image": spec.hold.image,
        "command": ["python", "-m", "servers.playground"],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": [{"name": "PORT", "value": str(PORT)}] + [{"name": k, "value": v} for k, v in env.items()],
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}},
        "readinessProbe": probe, "livenessProbe": {**probe, "periodSeconds": 30, "failureThreshold": 3},
        "securityContext": container_sc,
    }
    selector = {"app.kubernetes.io/instance": spec.name, "app.kubernetes.io/component": "playground"}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(spec),
        "spec": {"replicas": 1,
                 # As the hold proxy's: the flow's own wait is the bound (and the sandbox runs the page as a real
                 # process whose start is not time-scaled like the Deployment's deadline).
                 "progressDeadlineSeconds": 3600,
                 "selector": {"matchLabels": selector},
                 "template": {"metadata": {"labels": {**labels(spec), **selector}},
                              "spec": {"serviceAccountName": ACCOUNT, "containers": [container],
                                       "securityContext": pod_sc}}},
    }


def service(spec: DeploymentSpec) -> Obj:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(spec),
            "spec": {"type": "ClusterIP",
                     "selector": {"app.kubernetes.io/instance": spec.name, "app.kubernetes.io/component": "playground"},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}}


def ingress_path(spec: DeploymentSpec) -> Obj:
    """The model Ingress's rule for the page (listed before the model's own ``/``)."""
    return {"path": PATH, "pathType": "Prefix",
            "backend": {"service": {"name": name(spec), "port": {"number": 80}}}}


def where(spec: DeploymentSpec) -> str:
    """How a user opens the page (what deploy_model and the demo print)."""
    if spec.expose.ingress is not None:
        return f"the model's Ingress address at {PATH}/" + (f" (host {spec.expose.ingress.host})"
                                                             if spec.expose.ingress.host else "")
    return (f"kubectl port-forward -n {spec.namespace} service/{name(spec)} 8080:80, "
            "then http://localhost:8080/")


def objects(spec: DeploymentSpec) -> list[Obj]:
    """What the operator applies for the playground (its RBAC comes with the operator's); nothing unless
    ``expose.playground``."""
    if not spec.expose.playground:
        return []
    return [deployment(spec), service(spec)]
