"""The GKE Inference Gateway objects of a spec with ``expose.gateway`` (pure: spec -> objects, no I/O).

As GKE's guide deploys it (cloud.google.com/kubernetes-engine/docs/how-to/deploy-gke-inference-gateway):
a ``Gateway`` of a GKE class (or an existing one, shared with other specs); per color an ``InferencePool``
selecting that color's pods and its endpoint picker (a Deployment + Service + RBAC, what the
``inferencepool`` Helm chart installs); one ``HTTPRoute`` matching the ``X-Gateway-Model-Name`` header
that body-based routing sets from the OpenAI ``model`` field, with one ``backendRef`` per color whose
weights carry the traffic split (blue-green = 0/100, a canary steps through its weights); and per pool an
``InferenceObjective`` with the spec's priority.
"""

from __future__ import annotations

import copy
from typing import Any

from manifests import names
from manifests.errors import PreflightError
from manifests.names import COLORS, Color
from manifests.spec import DeploymentSpec, region_of

Obj = dict[str, Any]
GW_API = "gateway.networking.k8s.io/v1"
IE_GROUP = "inference.networking.k8s.io"
MODEL_HEADER = "X-Gateway-Model-Name"
EPP_PORT = 9002


class GatewayPreflightError(PreflightError):
    """The cluster lacks what a Gateway needs (CRDs, a proxy-only subnet)."""


def gateway_name(spec: DeploymentSpec) -> str:
    gw = spec.expose.gateway
    assert gw is not None
    return gw.existing or f"{spec.name}-gateway"


def route_name(spec: DeploymentSpec) -> str:
    return spec.name


def pool_name(spec: DeploymentSpec, color: Color) -> str:
    return f"{spec.name}-{color}"


def epp_name(spec: DeploymentSpec, color: Color) -> str:
    return f"{spec.name}-{color}-epp"


def _meta(spec: DeploymentSpec, name: str, **labels: str) -> Obj:
    return {"name": name, "namespace": spec.namespace, "labels": {**names.common_labels(spec), **labels}}


def gateway(spec: DeploymentSpec) -> Obj | None:
    gw = spec.expose.gateway
    if gw is None or gw.existing:
        return None
    return {"apiVersion": GW_API, "kind": "Gateway", "metadata": _meta(spec, gateway_name(spec)),
            "spec": {"gatewayClassName": gw.class_name,
                     "listeners": [{"name": "http", "protocol": "HTTP", "port": 80}]}}


def weights(live: Color, candidate_weight: int) -> dict[Color, int]:
    """Backend weights with ``candidate_weight`` percent on the color beside ``live``."""
    return {names.other(live): candidate_weight, live: 100 - candidate_weight}


GENERATION_TIMEOUT_S = 300  # generations stream for minutes; GKE's default backend timeout is 30 s


def pool_backends(spec: DeploymentSpec, split: dict[Color, int]) -> list[Obj]:
    """The route's backends while the model serves: one InferencePool per color, weighted."""
    return [{"group": IE_GROUP, "kind": "InferencePool", "name": pool_name(spec, c), "weight": split.get(c, 0)}
            for c in COLORS]


def held_backends(spec: DeploymentSpec) -> list[Obj]:
    """The route's backend while the model is parked: its live Service, which then selects the hold proxy
    (a core ``Service`` backendRef needs its port). The pools have no pods to pick from while parked: through
    them a request would get the endpoint picker's 503 instead of being held and waking the model."""
    return [{"group": "", "kind": "Service", "name": names.service(spec), "port": spec.expose.port, "weight": 1}]


def request_timeout(spec: DeploymentSpec, *, held: bool) -> str:
    """The rule's request timeout: a held request waits up to hold.timeout for the wake, then generates."""
    wait = spec.hold.timeout.total_seconds() if held else 0
    return f"{int(wait + GENERATION_TIMEOUT_S)}s"


def is_held(route: Obj, spec: DeploymentSpec) -> bool:
    """Whether the route (as the cluster holds it) sends the model's traffic to the hold proxy."""
    rules = (route.get("spec") or {}).get("rules") or [{}]
    return [(r.get("kind"), r.get("name")) for r in rules[0].get("backendRefs") or []] == \
        [(b["kind"], b["name"]) for b in held_backends(spec)]


def with_backends(route: Obj, spec: DeploymentSpec, backends: list[Obj], *, held: bool) -> Obj:
    """``route`` (as read: its resourceVersion kept for the checked update) with the model rule's backends
    and request timeout replaced (park: to the hold proxy; wake: back to the pools)."""
    out = copy.deepcopy(route)
    rule = out["spec"]["rules"][0]
    rule["backendRefs"] = copy.deepcopy(backends)
    rule["timeouts"] = {**(rule.get("timeouts") or {}), "request": request_timeout(spec, held=held)}
    out.get("metadata", {}).pop("managedFields", None)
    return out


def http_route(spec: DeploymentSpec, split: dict[Color, int]) -> Obj:
    gw = spec.expose.gateway
    assert gw is not None
    route: Obj = {
        "parentRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gateway_name(spec)}],
        "rules": [{"matches": [{"headers": [{"type": "Exact", "name": MODEL_HEADER, "value": spec.model.id}],
                                "path": {"type": "PathPrefix", "value": "/"}}],
                   "backendRefs": pool_backends(spec, split),
                   "timeouts": {"request": request_timeout(spec, held=False)}}]}
    if gw.host:
        route["hostnames"] = [gw.host]
    return {"apiVersion": GW_API, "kind": "HTTPRoute", "metadata": _meta(spec, route_name(spec)), "spec": route}


def inference_pool(spec: DeploymentSpec, color: Color) -> Obj:
    return {"apiVersion": f"{IE_GROUP}/v1", "kind": "InferencePool",
            "metadata": _meta(spec, pool_name(spec, color), **{names.COLOR_LABEL: color}),
            "spec": {"selector": {"matchLabels": names.selector(spec, color)},
                     "targetPorts": [{"number": spec.engine.container_port}],
                     "endpointPickerRef": {"name": epp_name(spec, color), "port": {"number": EPP_PORT},
                                           "failureMode": "FailClose"}}}


def picker_rbac(spec: DeploymentSpec, color: Color) -> list[Obj]:
    """The endpoint picker's Role and RoleBinding: a grant, so a cluster admin applies it with the operator's
    RBAC (manifests.render.operator_rbac); the flows only check it is current."""
    name = epp_name(spec, color)
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(spec, name),
         "rules": [{"apiGroups": [IE_GROUP], "resources": ["inferencepools"], "verbs": ["get", "watch", "list"]},
                   {"apiGroups": ["inference.networking.x-k8s.io"], "resources": ["inferenceobjectives"],
                    "verbs": ["get", "watch", "list"]},
                   {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "watch", "list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": _meta(spec, name),
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": spec.namespace}],
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}},
    ]


def endpoint_picker(spec: DeploymentSpec, color: Color) -> list[Obj]:
    """The endpoint picker of one pool, as the ``inferencepool`` chart installs it (provider gke)."""
    gw = spec.expose.gateway
    assert gw is not None
    name = epp_name(spec, color)
    labels = {"app": name}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(spec, name)},
        *picker_rbac(spec, color),
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(spec, name),
         "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": {
                      "serviceAccountName": name, "terminationGracePeriodSeconds": 130,
                      "containers": [{"name": "epp", "image": gw.epp_image,
                                      "args": ["--pool-name", pool_name(spec, color), "--pool-namespace",
                                               spec.namespace, "--grpc-port", str(EPP_PORT),
                                               "--grpc-health-port", "9003", "--metrics-port", "9090"],
                                      "ports": [{"name": "grpc", "containerPort": EPP_PORT},
                                                {"name": "grpc-health", "containerPort": 9003},
                                                {"name": "metrics", "containerPort": 9090}],
                                      "readinessProbe": {"grpc": {"port": 9003, "service": "inference-extension"}},
                                      "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta(spec, name),
         "spec": {"selector": labels, "type": "ClusterIP",
                  "ports": [{"name": "grpc-ext-proc", "port": EPP_PORT, "protocol": "TCP", "appProtocol": "http2"}]}},
    ]


def inference_objective(spec: DeploymentSpec, color: Color) -> Obj:
    """The request priority on one color's pool (one per pool: an objective names a single pool, and traffic
    moves between the two during a release)."""
    gw = spec.expose.gateway
    assert gw is not None
    return {"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceObjective",
            "metadata": _meta(spec, pool_name(spec, color), **{names.COLOR_LABEL: color}),
            "spec": {"priority": gw.priority, "poolRef": {"group": IE_GROUP, "name": pool_name(spec, color)}}}


def objects(spec: DeploymentSpec, live: Color = "blue") -> list[Obj]:
    """Every Gateway object of ``spec`` with ``live`` taking all traffic ([] without expose.gateway)."""
    if spec.expose.gateway is None:
        return []
    out: list[Obj | None] = [gateway(spec)]
    for c in COLORS:
        out += [*endpoint_picker(spec, c), inference_pool(spec, c), inference_objective(spec, c)]
    out.append(http_route(spec, weights(live, 0)))
    return [o for o in out if o is not None]


# ---- preflight: what the cluster must have, each missing piece named with its fix --------------------------
REQUIRED_CRDS = {
    "gateways.gateway.networking.k8s.io":
        "gcloud container clusters update {cluster} --location {location} --gateway-api=standard",
    "httproutes.gateway.networking.k8s.io":
        "gcloud container clusters update {cluster} --location {location} --gateway-api=standard",
    "inferencepools.inference.networking.k8s.io":
        "kubectl apply -f https://github.com/kubernetes-sigs/gateway-api-inference-extension/releases/download/"
        "v1.5.0/manifests.yaml",
    "inferenceobjectives.inference.networking.x-k8s.io":
        "kubectl apply -f https://github.com/kubernetes-sigs/gateway-api-inference-extension/releases/download/"
        "v1.5.0/manifests.yaml",
}


def preflight_problems(spec: DeploymentSpec, *, crds: set[str], proxy_only_subnets: set[str] | None) -> list[str]:
    """Each thing missing for ``expose.gateway`` with the command that fixes it ([] = ready).

    ``crds``: CustomResourceDefinition names in the cluster; ``proxy_only_subnets``: regions that have a
    subnet with purpose REGIONAL_MANAGED_PROXY on the cluster's network (None: not looked up)."""
    gw = spec.expose.gateway
    if gw is None:
        return []
    where = {"cluster": spec.cluster.name, "location": spec.cluster.location}
    out = [f"CRD {crd} missing: {fix.format(**where)}" for crd, fix in REQUIRED_CRDS.items() if crd not in crds]
    region = region_of(spec.cluster.location)
    if gw.regional and not gw.existing and proxy_only_subnets is not None and region not in proxy_only_subnets:
        out.append(f"no proxy-only subnet in {region} (a regional Gateway's proxies need one): gcloud compute "
                   f"networks subnets create proxy-only-{region} --purpose=REGIONAL_MANAGED_PROXY --role=ACTIVE "
                   f"--region={region} --network=default --range=10.129.0.0/23")
    return out


def check_preflight(spec: DeploymentSpec, *, crds: set[str], proxy_only_subnets: set[str] | None) -> None:
    problems = preflight_problems(spec, crds=crds, proxy_only_subnets=proxy_only_subnets)
    if problems:
        raise GatewayPreflightError("expose.gateway: the cluster is not ready for an Inference Gateway: "
                                    + "; ".join(problems), "run the commands named above, then retry")
