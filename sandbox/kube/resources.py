"""The resource types this API server serves, and the discovery / OpenAPI documents describing them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

SERVER_VERSION = {
    # Minor 30: the kubectl dispatcher then runs kubectl 1.30, which sends JSON (1.32+ send protobuf).
    "major": "1", "minor": "30", "gitVersion": "v1.30.5-gke.1014001", "gitCommit": "sandbox",
    "gitTreeState": "clean", "buildDate": "2024-10-01T00:00:00Z", "goVersion": "go1.22.6",
    "compiler": "gc", "platform": "linux/amd64",
}



def server_version(gke_version: str) -> dict[str, str]:
    """``/version`` of an API server running GKE version ``1.30.14-gke.1009000`` (or ``v1.30.14-gke.…``)."""
    git = "v" + gke_version.lstrip("v")
    major, minor = git[1:].split(".")[:2]
    return {**SERVER_VERSION, "major": major, "minor": minor, "gitVersion": git}


ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


@dataclass(frozen=True)
class RType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    short: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    generation: bool = False  # metadata.generation tracks spec changes
    has_status: bool = False  # status only changes through /status (or the controller)
    # Served only while this CustomResourceDefinition exists in the cluster (add-ons installed by hand or
    # by a GKE cluster setting, e.g. --gateway-api=standard); "" = built in.
    crd: str = ""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def qualified(self) -> str:
        """``deployments.apps`` — how error messages name the resource."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def base_path(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else "/api/v1"


def _t(group: str, version: str, plural: str, kind: str, **kw: Any) -> RType:
    return RType(group, version, plural, kind, **kw)


TYPES: list[RType] = [
    _t("", "v1", "namespaces", "Namespace", namespaced=False, short=("ns",), subresources=("status",),
       has_status=True),
    _t("", "v1", "nodes", "Node", namespaced=False, short=("no",), subresources=("status", "proxy"),
       has_status=True),
    _t("", "v1", "pods", "Pod", short=("po",), subresources=("status", "log", "proxy", "portforward", "exec",
                                                            "attach"), categories=("all",),
       has_status=True),
    _t("", "v1", "services", "Service", short=("svc",), subresources=("status", "proxy"), categories=("all",),
       has_status=True),
    _t("", "v1", "endpoints", "Endpoints", short=("ep",)),
    _t("", "v1", "secrets", "Secret"),
    _t("", "v1", "configmaps", "ConfigMap", short=("cm",)),
    _t("", "v1", "serviceaccounts", "ServiceAccount", short=("sa",)),
    _t("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", short=("pvc",), subresources=("status",),
       has_status=True),
    _t("", "v1", "events", "Event", short=("ev",)),
    _t("apps", "v1", "deployments", "Deployment", short=("deploy",), subresources=("status", "scale"),
       categories=("all",), generation=True, has_status=True),
    _t("apps", "v1", "replicasets", "ReplicaSet", short=("rs",), subresources=("status", "scale"),
       categories=("all",), generation=True, has_status=True),
    _t("networking.k8s.io", "v1", "ingresses", "Ingress", short=("ing",), subresources=("status",),
       generation=True, has_status=True),
    _t("networking.k8s.io", "v1", "ingressclasses", "IngressClass", namespaced=False, generation=True),
    # stored, not enforced: the sandbox has no pod network (see docs/sandbox-contract.md)
    _t("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", short=("netpol",), generation=True),
    _t("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", short=("hpa",),
       subresources=("status",), categories=("all",), generation=True, has_status=True),
    _t("rbac.authorization.k8s.io", "v1", "roles", "Role"),
    _t("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
    _t("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", namespaced=False),
    _t("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", namespaced=False),
    _t("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", short=("pdb",), subresources=("status",),
       generation=True, has_status=True),
    _t("storage.k8s.io", "v1", "storageclasses", "StorageClass", namespaced=False, short=("sc",)),
    _t("coordination.k8s.io", "v1", "leases", "Lease"),
    _t("monitoring.googleapis.com", "v1", "podmonitorings", "PodMonitoring", subresources=("status",),
       generation=True, has_status=True),
    _t("monitoring.googleapis.com", "v1", "clusterpodmonitorings", "ClusterPodMonitoring", namespaced=False,
       subresources=("status",), generation=True, has_status=True),
    _t("monitoring.googleapis.com", "v1", "rules", "Rules", subresources=("status",), generation=True,
       has_status=True),
    # GKE's custom ComputeClass CRD (installed on every cluster from 1.30.3-gke.1451000); the sandbox's
    # cluster autoscaler (sandbox.gke.autoscaler) reads its priorities
    _t("cloud.google.com", "v1", "computeclasses", "ComputeClass", namespaced=False, short=("cc",),
       subresources=("status",), generation=True, has_status=True),
    # GKE's BackendConfig CRD (installed on every cluster): a GCE Ingress backend's health check overrides
    # (sandbox.kube.gcehc reads spec.healthCheck)
    _t("cloud.google.com", "v1", "backendconfigs", "BackendConfig", generation=True),
    # No monitoring.coreos.com (PrometheusRule, ServiceMonitor): GKE ships only GMP's CRDs; the
    # prometheus-operator CRDs exist only where someone installed them.
    _t("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice"),
    _t("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", namespaced=False,
       short=("crd", "crds"), subresources=("status",), generation=True, has_status=True),
    # Gateway API (standard channel) and the Inference Extension: CRDs, served once installed
    # (sandbox/addons/gateway-api-crds.yaml, inference-extension-crds.yaml; sandbox.kube.gateway plays GKE's
    # gateway controller and the endpoint picker).
    _t("gateway.networking.k8s.io", "v1", "gatewayclasses", "GatewayClass", namespaced=False, short=("gc",),
       subresources=("status",), generation=True, has_status=True, crd="gatewayclasses.gateway.networking.k8s.io"),
    _t("gateway.networking.k8s.io", "v1", "gateways", "Gateway", short=("gtw",), subresources=("status",),
       generation=True, has_status=True, crd="gateways.gateway.networking.k8s.io"),
    _t("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute", subresources=("status",), generation=True,
       has_status=True, crd="httproutes.gateway.networking.k8s.io"),
    _t("inference.networking.k8s.io", "v1", "inferencepools", "InferencePool", short=("infpool",),
       subresources=("status",), generation=True, has_status=True, crd="inferencepools.inference.networking.k8s.io"),
    _t("inference.networking.x-k8s.io", "v1alpha2", "inferenceobjectives", "InferenceObjective",
       subresources=("status",), generation=True, has_status=True,
       crd="inferenceobjectives.inference.networking.x-k8s.io"),
    # what a custom metrics adapter registers (sandbox.kube.autoscaling reads them)
    _t("apiregistration.k8s.io", "v1", "apiservices", "APIService", namespaced=False, subresources=("status",),
       has_status=True),
    # metrics-server: computed on read (sandbox.kube.autoscaling.serve_metrics_api), never stored
    _t("metrics.k8s.io", "v1beta1", "pods", "PodMetrics"),
    _t("metrics.k8s.io", "v1beta1", "nodes", "NodeMetrics", namespaced=False),
]

BY_KEY: dict[tuple[str, str], RType] = {t.key: t for t in TYPES}
BY_KIND: dict[tuple[str, str], RType] = {(t.api_version, t.kind): t for t in TYPES}


def find(group: str, version: str, plural: str, installed: frozenset[str] | None = None) -> RType | None:
    """The type at this URL; a CRD-backed one only when ``installed`` (CRD names) holds its CRD."""
    t = BY_KEY.get((group, plural))
    if t is None or t.version != version or (t.crd and installed is not None and t.crd not in installed):
        return None
    return t


def served(installed: frozenset[str] | None = None) -> list[RType]:
    return [t for t in TYPES if not t.crd or installed is None or t.crd in installed]


def group_versions(installed: frozenset[str] | None = None) -> dict[str, list[RType]]:
    out: dict[str, list[RType]] = {}
    for t in served(installed):
        out.setdefault(t.api_version, []).append(t)
    return out


# ---- discovery ------------------------------------------------------------------------------
def _sub_resource(t: RType, sub: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": f"{t.plural}/{sub}", "singularName": "", "namespaced": t.namespaced,
                             "kind": t.kind, "verbs": ["get", "patch", "update"]}
    if sub == "scale":
        entry.update(group="autoscaling", version="v1", kind="Scale")
    elif sub == "log":
        entry.update(kind="Pod", verbs=["get"])
    elif sub in ("portforward", "exec", "attach"):
        entry.update(kind=f"Pod{sub.capitalize()}Options", verbs=["create", "get"])
    elif sub == "proxy":
        entry.update(kind="ServiceProxyOptions" if t.kind == "Service" else f"{t.kind}ProxyOptions",
                     verbs=["create", "delete", "get", "patch", "update"])
    return entry


def resource_list(group_version: str, installed: frozenset[str] | None = None) -> dict[str, Any] | None:
    types = group_versions(installed).get(group_version)
    if not types:
        return None
    resources = []
    for t in types:
        entry: dict[str, Any] = {"name": t.plural, "singularName": t.singular, "namespaced": t.namespaced,
                                 "kind": t.kind, "verbs": ALL_VERBS,
                                 "storageVersionHash": hashlib.sha256(t.api_version.encode() + t.kind.encode())
                                 .hexdigest()[:11]}
        if t.short:
            entry["shortNames"] = list(t.short)
        if t.categories:
            entry["categories"] = list(t.categories)
        resources.append(entry)
        resources += [_sub_resource(t, s) for s in t.subresources]
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}


def api_versions(server_address: str) -> dict[str, Any]:
    return {"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]}


def api_groups(installed: frozenset[str] | None = None) -> dict[str, Any]:
    groups: dict[str, list[str]] = {}
    for t in served(installed):
        if t.group and t.version not in groups.setdefault(t.group, []):
            groups[t.group].append(t.version)
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [api_group(g, installed) for g in groups]}


def api_group(group: str, installed: frozenset[str] | None = None) -> dict[str, Any] | None:
    versions = []
    for t in served(installed):
        if t.group == group and t.version not in versions:
            versions.append(t.version)
    if not versions:
        return None
    vs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": vs, "preferredVersion": vs[0]}


# ---- OpenAPI --------------------------------------------------------------------------------
def _gv_path(group_version: str) -> str:
    return "api/v1" if group_version == "v1" else f"apis/{group_version}"


def openapi_v3_index(installed: frozenset[str] | None = None) -> dict[str, Any]:
    paths = {}
    for gv in group_versions(installed):
        doc = openapi_v3_doc(gv, installed)
        digest = hashlib.sha512(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:64].upper()
        paths[_gv_path(gv)] = {"serverRelativeURL": f"/openapi/v3/{_gv_path(gv)}?hash={digest}"}
    return {"paths": paths}


_PARAMS = {
    "dryRun": "When present, indicates that modifications should not be persisted.",
    "fieldManager": "fieldManager is a name associated with the actor or entity that is making these changes.",
    "fieldValidation": "fieldValidation instructs the server on how to handle objects in the request "
                       "containing unknown or duplicate fields.",
    "force": "Force is going to \"force\" Apply requests.",
    "pretty": "If 'true', then the output is pretty printed.",
}


def _op(t: RType, action: str, op_id: str, params: list[str]) -> dict[str, Any]:
    parameters = [{"name": p, "in": "query", "description": _PARAMS.get(p, p), "schema":
                   {"type": "boolean" if p == "force" else "string", "uniqueItems": True}} for p in params]
    # No component schemas: kubectl then computes re-apply patches from its compiled-in types.
    ref = {"type": "object"}
    op: dict[str, Any] = {
        "tags": [t.api_version.replace("/", "_").replace(".", "_")],
        "description": f"{action} {t.kind}", "operationId": op_id, "parameters": parameters,
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": ref}}},
                      "401": {"description": "Unauthorized"}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": t.group, "version": t.version, "kind": t.kind},
    }
    if action in ("patch", "put", "post"):
        types = (["application/apply-patch+yaml", "application/json-patch+json", "application/merge-patch+json",
                  "application/strategic-merge-patch+json"] if action == "patch" else ["*/*"])
        op["requestBody"] = {"content": {ct: {"schema": {"type": "object"} if action == "patch" else ref}
                                         for ct in types}, "required": True}
    return op


def openapi_v3_doc(group_version: str, installed: frozenset[str] | None = None) -> dict[str, Any] | None:
    types = group_versions(installed).get(group_version)
    if not types:
        return None
    paths: dict[str, Any] = {}
    for t in types:
        name = f"{t.kind}"
        scope = "Namespaced" if t.namespaced else ""
        prefix = t.base_path + ("/namespaces/{namespace}" if t.namespaced else "")
        write = ["dryRun", "fieldManager", "fieldValidation", "pretty"]
        paths[f"{prefix}/{t.plural}"] = {
            "get": _op(t, "list", f"list{scope}{name}", ["pretty"]),
            "post": _op(t, "post", f"create{scope}{name}", write),
        }
        paths[f"{prefix}/{t.plural}/{{name}}"] = {
            "get": _op(t, "get", f"read{scope}{name}", ["pretty"]),
            "put": _op(t, "put", f"replace{scope}{name}", write),
            "patch": _op(t, "patch", f"patch{scope}{name}", write + ["force"]),
            "delete": _op(t, "delete", f"delete{scope}{name}", ["dryRun", "pretty"]),
        }
        for sub in t.subresources:
            if sub in ("status", "scale"):
                sub_t = RType("autoscaling", "v1", "scale", "Scale") if sub == "scale" else t
                paths[f"{prefix}/{t.plural}/{{name}}/{sub}"] = {
                    "get": _op(sub_t, "get", f"read{scope}{name}{sub.title()}", ["pretty"]),
                    "put": _op(sub_t, "put", f"replace{scope}{name}{sub.title()}", write),
                    "patch": _op(sub_t, "patch", f"patch{scope}{name}{sub.title()}", write + ["force"]),
                }
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": SERVER_VERSION["gitVersion"]},
            "paths": paths, "components": {"schemas": {}}}
