"""The canary's I/O: the HTTPRoute's weights (one checked update each), PromQL through Managed Prometheus'
query API, and the step loop that judges each step on real traffic (decisions: manifests.canary).

Used by the Gateway release strategy and by ``bench/canary.py``; everything that touches the world comes in
as an argument (a kubernetes ``ApiClient``, a query function, the smoke check, the clock), so the loop is
the same on the sandbox and on GKE.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from kubernetes import client
from kubernetes.client.rest import ApiException

from manifests import analysis, canary, gateway
from manifests.errors import FleetError
from manifests.names import Color, other
from manifests.spec import DeploymentSpec

Obj = dict[str, Any]
GROUP, VERSION = "gateway.networking.k8s.io", "v1"
QueryFn = Callable[[str, "float | None"], "float | None"]  # (PromQL, evaluation time or None = now) -> value


class CanaryError(FleetError):
    """A canary step failed; traffic is back on the live color."""


def read_route(api: client.ApiClient, spec: DeploymentSpec) -> Obj:
    return client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, spec.namespace, "httproutes", gateway.route_name(spec))


def set_weights(api: client.ApiClient, spec: DeploymentSpec, split: dict[Color, int], *, attempts: int = 5) -> Obj:
    """Write the colors' weights with one update guarded by the resourceVersion just read; a conflict (someone
    else wrote the route meanwhile) re-reads and retries. Returns the route as stored."""
    custom = client.CustomObjectsApi(api)
    for attempt in range(attempts):
        route = read_route(api, spec)
        want = canary.with_weights(route, spec, split)
        if canary.route_weights(want) == canary.route_weights(route):
            return route  # already there (a rerun): no write
        try:
            return custom.replace_namespaced_custom_object(GROUP, VERSION, spec.namespace, "httproutes",
                                                           gateway.route_name(spec), want)
        except ApiException as exc:
            if exc.status != 409 or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def set_backends(api: client.ApiClient, spec: DeploymentSpec, backends: list[Obj], *, held: bool,
                 attempts: int = 5) -> tuple[Obj, bool]:
    """Replace the model rule's backends (park: the hold proxy's Service; wake: the pools as they were) with
    one update guarded by the resourceVersion just read, as set_weights. Returns (the route as stored,
    whether it was written): a rerun finds it done and writes nothing."""
    custom = client.CustomObjectsApi(api)
    for attempt in range(attempts):
        route = read_route(api, spec)
        want = gateway.with_backends(route, spec, backends, held=held)
        if want["spec"]["rules"] == route["spec"]["rules"]:
            return route, False
        try:
            return custom.replace_namespaced_custom_object(GROUP, VERSION, spec.namespace, "httproutes",
                                                           gateway.route_name(spec), want), True
        except ApiException as exc:
            if exc.status != 409 or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def gmp_query_fn(base_url: str, project: str, *, token: Callable[[], str] | None = None,
                 http: httpx.Client | None = None) -> QueryFn:
    """PromQL at ``base_url``/v1/projects/PROJECT/location/global/prometheus/api/v1/query (GMP's API; on GCP
    base_url is https://monitoring.googleapis.com and ``token`` an ADC access token) -> one value or None."""
    session = http or httpx.Client(timeout=30)

    def query(text: str, at: float | None) -> float | None:
        headers = {"Authorization": f"Bearer {token()}"} if token else {}
        form = {"query": text} | ({"time": f"{at:.3f}"} if at is not None else {})
        r = session.post(f"{base_url.rstrip('/')}/v1/projects/{project}/location/global/prometheus/api/v1/query",
                         data=form, headers=headers)
        body = r.json()
        if r.status_code != 200 or body.get("status") != "success":
            raise CanaryError(f"PromQL query failed ({r.status_code}): {body.get('error', r.text)[:300]}",
                              f"fix the query in release.analysis: {text}")
        data = body["data"]
        if data["resultType"] == "scalar":
            return float(data["result"][1])
        return float(data["result"][0]["value"][1]) if len(data["result"]) == 1 else None
    return query


def product_query_fn(project: str) -> QueryFn:
    """GMP's query API where the settings point (monitoring.googleapis.com, or the sandbox's), with the
    product's Google credentials."""
    from tasks.clients import google_access_token
    from tasks.settings import get_settings

    s = get_settings()
    return gmp_query_fn(s.monitoring_endpoint, project,
                        token=None if s.gcp_auth == "anonymous" else lambda: google_access_token() or "")


def kube_api(kubeconfig: str | None) -> client.ApiClient:
    from tasks.clients import kube_client

    return kube_client(kubeconfig)


CUSTOM = {"Gateway": "gateways", "HTTPRoute": "httproutes", "InferencePool": "inferencepools",
          "InferenceObjective": "inferenceobjectives"}


def apply_gateway_objects(api: client.ApiClient, objs: list[Obj]) -> list[str]:
    """Create what is missing and update the rest of the Gateway kinds; an existing HTTPRoute keeps its
    weights (where traffic is now is the cluster's answer, not the render's). Other kinds: returned to the
    caller to apply with the product's server-side apply."""
    custom, rest = client.CustomObjectsApi(api), []
    for obj in objs:
        if obj["kind"] not in CUSTOM:
            rest.append(obj)
            continue
        group, version = obj["apiVersion"].split("/")
        ns, name, plural = obj["metadata"]["namespace"], obj["metadata"]["name"], CUSTOM[obj["kind"]]
        try:
            live = custom.get_namespaced_custom_object(group, version, ns, plural, name)
        except ApiException as exc:
            if exc.status != 404:
                raise
            custom.create_namespaced_custom_object(group, version, ns, plural, obj)
            continue
        if obj["kind"] == "HTTPRoute":
            split = canary.route_weights(live)
            for ref in obj["spec"]["rules"][0]["backendRefs"]:
                ref["weight"] = split.get(ref["name"], ref["weight"])
        if {k: v for k, v in obj.items() if k != "metadata"} != {k: v for k, v in live.items() if k not in (
                "metadata", "status")}:
            body = obj | {"metadata": obj["metadata"] | {"resourceVersion": live["metadata"]["resourceVersion"]}}
            custom.replace_namespaced_custom_object(group, version, ns, plural, name, body)
    return rest


def missing_crds(api: client.ApiClient) -> set[str]:
    names = {c["metadata"]["name"] for c in client.CustomObjectsApi(api).list_cluster_custom_object(
        "apiextensions.k8s.io", "v1", "customresourcedefinitions")["items"]}
    return set(gateway.REQUIRED_CRDS) - names


def check_gateway(spec: DeploymentSpec, *, kubeconfig: str | None) -> str:
    """The cluster has the Gateway API and Inference Extension CRDs and, for a regional Gateway, its region a
    proxy-only subnet; else one error naming each missing piece with its fix."""
    from tasks import compute

    gw = spec.expose.gateway
    missing = missing_crds(kube_api(kubeconfig))
    subnets = (compute.proxy_only_regions(project=spec.cluster.project)
               if gw is not None and gw.regional and not gw.existing else None)
    gateway.check_preflight(spec, crds=set(gateway.REQUIRED_CRDS) - missing, proxy_only_subnets=subnets)
    return (f"Gateway API and Inference Extension CRDs installed ({len(gateway.REQUIRED_CRDS)})"
            + ("; proxy-only subnet in the region" if subnets is not None else ""))


def measure(spec: DeploymentSpec, deployment: str, query: QueryFn, *, window_s: float, at: float | None
            ) -> dict[str, float | None]:
    """Every analysis query of ``spec`` for the pods of ``deployment`` over the window ending at ``at``."""
    sel = analysis.pod_selector(spec.namespace, deployment)
    return {q.name: query(analysis.render(q, selector=sel, window_s=window_s), at) for q in analysis.queries(spec)}


@dataclass
class CanaryOutcome:
    promoted: bool
    steps: list[canary.StepResult] = field(default_factory=list)
    failed_step: canary.StepResult | None = None

    def summary(self, total: int) -> str:
        return "\n".join(s.text(total) for s in self.steps)


def run_canary(*, api: client.ApiClient, spec: DeploymentSpec, live: Color, query: QueryFn,
               smoke: Callable[[], bool], sleep: Callable[[float], None], now: Callable[[], float] | None = None,
               on_step: Callable[[canary.Step, str], None] | None = None) -> CanaryOutcome:
    """Shift the HTTPRoute to the candidate step by step; judge each on the traffic of its window against the
    live color over the same window. A failed step puts the candidate's weight back to 0 at once.
    ``now``: the monitoring backend's clock (None: the query API evaluates at its own now, the window is
    the hold)."""
    candidate = other(live)
    steps = canary.plan(spec)
    qs = analysis.queries(spec)
    outcome = CanaryOutcome(promoted=False)
    for step in steps:
        set_weights(api, spec, gateway.weights(live, step.weight))
        if on_step:
            on_step(step, "weights set")
        extensions, windows, seen = 0, 0, 0.0
        started = now() if now else None
        while True:
            # a held step is judged over everything since its weights were set (the window grows), until
            # its candidate served enough requests to judge: the window counts requests, not time
            sleep(step.hold_s)
            windows += 1
            at = now() if now else None
            window = (max(1.0, at - started) if at is not None and started is not None
                      else step.hold_s * windows)
            cand = measure(spec, f"{spec.name}-{candidate}", query, window_s=window, at=at)
            live_fig = measure(spec, f"{spec.name}-{live}", query, window_s=window, at=at)
            verdict = analysis.judge(qs, cand, live_fig)
            served = cand.get("requests") or 0.0
            extensions = 0 if served > seen else extensions + (windows > 1)
            seen = max(seen, served)
            # The smoke prompts once the step is judged, not in every held window: they land on the candidate's
            # counters, and held windows of synthetic short prompts filled min_requests in place of real traffic.
            smoke_ok = True if verdict.inconclusive else smoke()
            action = canary.decide(verdict, smoke_ok=smoke_ok, extensions=extensions, windows=windows)
            result = canary.StepResult(step, verdict, smoke_ok, action, window)
            outcome.steps.append(result)
            if on_step:
                on_step(step, result.text(len(steps)))
            if action == "hold":
                continue
            break
        if action == "abort":
            set_weights(api, spec, gateway.weights(live, 0))  # at once: the live color is still warm
            outcome.failed_step = result
            return outcome
    outcome.promoted = True
    return outcome


def wall_sleep(time_scale: float) -> Callable[[float], None]:
    """Sleep ``cloud`` seconds on a clock scaled by ``time_scale`` (1.0 on GCP)."""
    return lambda cloud: time.sleep(cloud * time_scale)
