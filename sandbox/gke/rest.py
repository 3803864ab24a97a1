"""The REST surface of the GKE emulator: the container v1 API (``container.googleapis.com/v1``) as
``google.cloud.container_v1`` (``transport="rest"``) and ``gcloud container`` call it, on
``projects/*/locations/*`` and the legacy ``projects/*/zones/*`` paths gcloud and old clients use;
errors as the API's ``{"error": {"code", "message", "status"}}``; and Service Usage
``services.get``, which ``gcloud container clusters create`` asks first.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from google.cloud import container_v1

from sandbox.compute import REGIONS, zones_of
from sandbox.core import HttpError, JsonHandler, SandboxHTTPServer, route
from sandbox.gke.common import _bad, normalize
from sandbox.gke.state import _Cluster

if TYPE_CHECKING:
    from sandbox.gke.service import Gke


_STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 409: "ALREADY_EXISTS", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL",
                 501: "UNIMPLEMENTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


_ROUTES: list = []
_L = r"/v1/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"
_Z = r"/v1/projects/(?P<project>[^/]+)/zones/(?P<location>[^/]+)"  # legacy zonal paths (gcloud, old clients)
_C = r"/clusters/(?P<cluster>[^/:]+)"
_NP = r"/nodePools/(?P<pool>[^/:]+)"
_OP = r"/operations/(?P<op>[^/:]+)"


class GkeHandler(JsonHandler):
    service = "gke"
    routes = _ROUTES
    server: SandboxHTTPServer

    @property
    def gke(self) -> Gke:
        return self.server.state

    def error_body(self, err: HttpError) -> Any:
        if err.body is not None:
            return err.body
        status = err.reason if err.reason and err.reason.isupper() else _STATUS_NAMES.get(err.status, "UNKNOWN")
        return {"error": {"code": err.status, "message": err.message, "status": status}}


def _both(method: str, suffix: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        route(_ROUTES, method, _L + suffix)(fn)
        route(_ROUTES, method, _Z + suffix)(fn)
        return fn

    return deco


@_both("GET", "/clusters")
def _list_clusters(h: GkeHandler, project: str, location: str):
    return h.gke.list_clusters(project, location)


@_both("POST", "/clusters")
def _create_cluster(h: GkeHandler, project: str, location: str):
    return h.gke.create_cluster(project, location, h.json_body())


@_both("GET", _C)
def _get_cluster(h: GkeHandler, project: str, location: str, cluster: str):
    return h.gke.get_cluster(project, location, cluster)


@_both("DELETE", _C)
def _delete_cluster(h: GkeHandler, project: str, location: str, cluster: str):
    return h.gke.delete_cluster(project, location, cluster)


@_both("PUT", _C)
def _update_cluster(h: GkeHandler, project: str, location: str, cluster: str):
    return h.gke.update_cluster(project, location, cluster, h.json_body())


@route(_ROUTES, "POST", _L + _C + r":setResourceLabels")
def _set_labels(h: GkeHandler, project: str, location: str, cluster: str):
    req = normalize(container_v1.SetLabelsRequest, h.json_body())

    def apply(c: _Cluster) -> None:
        c.data["resourceLabels"] = req.get("resourceLabels", {})
        c.data["labelFingerprint"] = secrets.token_hex(4)

    return h.gke.quick_cluster_op(project, location, cluster, "SET_LABELS", apply)


@route(_ROUTES, "POST", _L + _C + r":setMaintenancePolicy")
def _set_maintenance(h: GkeHandler, project: str, location: str, cluster: str):
    req = normalize(container_v1.SetMaintenancePolicyRequest, h.json_body())

    def apply(c: _Cluster) -> None:
        c.data["maintenancePolicy"] = req.get("maintenancePolicy", {})

    return h.gke.quick_cluster_op(project, location, cluster, "SET_MAINTENANCE_POLICY", apply)


@_both("GET", _C + r"/nodePools")
def _list_pools(h: GkeHandler, project: str, location: str, cluster: str):
    return h.gke.list_node_pools(project, location, cluster)


@_both("POST", _C + r"/nodePools")
def _create_pool(h: GkeHandler, project: str, location: str, cluster: str):
    return h.gke.create_node_pool(project, location, cluster, h.json_body())


@_both("GET", _C + _NP)
def _get_pool(h: GkeHandler, project: str, location: str, cluster: str, pool: str):
    return h.gke.get_node_pool(project, location, cluster, pool)


@_both("DELETE", _C + _NP)
def _delete_pool(h: GkeHandler, project: str, location: str, cluster: str, pool: str):
    return h.gke.delete_node_pool(project, location, cluster, pool)


@route(_ROUTES, "PUT", _L + _C + _NP)
def _update_pool(h: GkeHandler, project: str, location: str, cluster: str, pool: str):
    return h.gke.update_node_pool(project, location, cluster, pool, h.json_body())


@route(_ROUTES, "POST", _Z + _C + _NP + r"/update")
def _update_pool_zonal(h: GkeHandler, project: str, location: str, cluster: str, pool: str):
    return h.gke.update_node_pool(project, location, cluster, pool, h.json_body())


@route(_ROUTES, "POST", _L + _C + _NP + r":setSize")
@route(_ROUTES, "POST", _Z + _C + _NP + r"/setSize")
def _set_size(h: GkeHandler, project: str, location: str, cluster: str, pool: str):
    return h.gke.set_node_pool_size(project, location, cluster, pool, h.json_body())


@route(_ROUTES, "POST", _L + _C + _NP + r":setAutoscaling")
@route(_ROUTES, "POST", _Z + _C + _NP + r"/autoscaling")
def _set_autoscaling(h: GkeHandler, project: str, location: str, cluster: str, pool: str):
    return h.gke.set_node_pool_autoscaling(project, location, cluster, pool, h.json_body())


@route(_ROUTES, "POST", _L + _C + _NP + r":setManagement")
@route(_ROUTES, "POST", _Z + _C + _NP + r"/setManagement")
def _set_management(h: GkeHandler, project: str, location: str, cluster: str, pool: str):
    return h.gke.set_node_pool_management(project, location, cluster, pool, h.json_body())


@_both("GET", r"/operations")
def _list_ops(h: GkeHandler, project: str, location: str):
    return h.gke.list_operations(project, location)


@_both("GET", _OP)
def _get_op(h: GkeHandler, project: str, location: str, op: str):
    return h.gke.get_operation(project, location, op)


@route(_ROUTES, "POST", _L + _OP + r":wait")
def _wait_op(h: GkeHandler, project: str, location: str, op: str):
    """Sandbox extension (like Compute's ``operations.wait``): block until DONE, at most ``timeout`` s."""
    body = h.json_body() if h.body_bytes() else {}
    raw = h.q("timeout") or (body.get("timeout") if isinstance(body, dict) else None)
    timeout = None
    if raw is not None:
        try:
            timeout = float(str(raw).rstrip("s"))
        except ValueError:
            raise _bad(f"Invalid timeout {raw!r}.") from None
    h.gke.get_operation(project, location, op)  # 404 check
    return h.gke.wait_operation(op, timeout)


@route(_ROUTES, "POST", _L + _OP + r":cancel")
@route(_ROUTES, "POST", _Z + _OP + r":cancel")
def _cancel_op(h: GkeHandler, project: str, location: str, op: str):
    h.body_bytes()
    return h.gke.cancel_operation(project, location, op)


@route(_ROUTES, "GET", _L + r"/serverConfig")
@route(_ROUTES, "GET", _Z + r"/serverconfig")
def _server_config(h: GkeHandler, project: str, location: str):
    if location not in REGIONS and location not in {z for r in REGIONS for z in zones_of(r)}:
        raise _bad(f"Location \"{location}\" is not a valid region or zone.")
    return h.gke.server_config(project, location)


@route(_ROUTES, "GET", r"/v1/projects/(?P<project>[^/]+)/services/(?P<service>[^/:]+)")
def _service_usage(h: GkeHandler, project: str, service: str):
    """Service Usage ``services.get`` (``gcloud container clusters create`` checks the API is enabled):
    served here so ``CLOUDSDK_API_ENDPOINT_OVERRIDES_SERVICEUSAGE`` can point at the GKE emulator."""
    number = h.gke._number(project)
    return {"name": f"projects/{number}/services/{service}", "parent": f"projects/{number}",
            "config": {"name": service, "title": service.split(".")[0].title() + " API"}, "state": "ENABLED"}
