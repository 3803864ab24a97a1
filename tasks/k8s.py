"""Thin tasks, one per Kubernetes verb. Apply is server-side apply with our field manager."""

from __future__ import annotations

import base64
import json
import queue
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException
from prefect import task
from pydantic import SecretStr

from manifests.errors import DeployError, FleetError
from manifests.names import FIELD_MANAGER
from manifests.render import admin_object_current
from manifests.rollout import TEMPLATE_HASH, Progress, diagnose, new_replicaset, rollout_progress
from tasks.clients import kube_client
from tasks.fencing import fence
from tasks.log import logger
from tasks.progress import WaitProgress
from tasks.retry import is_transient, task_retries
from tasks.settings import get_settings
from tasks.watching import Informer, watch_until

# (apiVersion, kind) -> (plural, namespaced) for every kind the product renders or reads.
KINDS: dict[tuple[str, str], tuple[str, bool]] = {
    ("v1", "Namespace"): ("namespaces", False),
    ("v1", "ServiceAccount"): ("serviceaccounts", True),
    ("v1", "Secret"): ("secrets", True),
    ("v1", "ConfigMap"): ("configmaps", True),
    ("v1", "Service"): ("services", True),
    ("v1", "PersistentVolumeClaim"): ("persistentvolumeclaims", True),
    ("v1", "Pod"): ("pods", True),
    ("v1", "Node"): ("nodes", False),
    ("v1", "Endpoints"): ("endpoints", True),
    ("apps/v1", "Deployment"): ("deployments", True),
    ("policy/v1", "PodDisruptionBudget"): ("poddisruptionbudgets", True),
    ("networking.k8s.io/v1", "Ingress"): ("ingresses", True),
    ("networking.k8s.io/v1", "NetworkPolicy"): ("networkpolicies", True),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): ("horizontalpodautoscalers", True),
    ("rbac.authorization.k8s.io/v1", "Role"): ("roles", True),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("rolebindings", True),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): ("clusterroles", False),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): ("clusterrolebindings", False),
    ("monitoring.googleapis.com/v1", "PodMonitoring"): ("podmonitorings", True),
    ("monitoring.googleapis.com/v1", "Rules"): ("rules", True),
    ("monitoring.coreos.com/v1", "PrometheusRule"): ("prometheusrules", True),
    ("cloud.google.com/v1", "ComputeClass"): ("computeclasses", False),  # capacity options
    ("cloud.google.com/v1", "BackendConfig"): ("backendconfigs", True),  # GCE Ingress backend timeout
    # the Inference Gateway (expose.gateway)
    ("gateway.networking.k8s.io/v1", "Gateway"): ("gateways", True),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): ("httproutes", True),
    ("inference.networking.k8s.io/v1", "InferencePool"): ("inferencepools", True),
    ("inference.networking.x-k8s.io/v1alpha2", "InferenceObjective"): ("inferenceobjectives", True),
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"): ("customresourcedefinitions", False),
    ("v1", "Event"): ("events", True),  # the cluster autoscaler's word on where pods landed
}


def object_path(api_version: str, kind: str, name: str | None = None, namespace: str | None = None) -> str:
    plural, namespaced = KINDS[(api_version, kind)]
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    if namespaced:
        base += f"/namespaces/{namespace}"
    return f"{base}/{plural}" + (f"/{name}" if name else "")


def _call(api: k8s.ApiClient, method: str, path: str, *, body: Any = None, query: list | None = None,
          content_type: str = "application/json") -> Any:
    """One raw API call for kinds the typed client has no method for (CRDs) or verbs it lacks (apply)."""
    params = api.param_serialize(method, path, query_params=query or [], body=body, auth_settings=["BearerToken"],
                                 header_params={"Accept": "application/json", "Content-Type": content_type})
    resp = api.call_api(*params, _request_timeout=get_settings().call_timeout_s)
    resp.read()
    if not 200 <= resp.status < 300:
        raise ApiException(http_resp=resp)
    return json.loads(resp.data) if resp.data else {}


@dataclass
class Applied:
    kind: str
    name: str
    action: str  # created | configured | unchanged
    changed: list[str] = field(default_factory=list)  # fields that differed from the live object


def _diff(desired: Any, live: Any, path: str = "") -> list[str]:
    """Fields of ``desired`` whose live value differs (server-added fields are not drift)."""
    if isinstance(desired, dict) and isinstance(live, dict):
        out: list[str] = []
        for k, v in desired.items():
            out += _diff(v, live.get(k), f"{path}.{k}" if path else k)
        return out
    if isinstance(desired, list) and isinstance(live, list) and len(desired) == len(live):
        out = []
        for i, (d, lv) in enumerate(zip(desired, live, strict=True)):
            out += _diff(d, lv, f"{path}[{i}]")
        return out
    if desired != live and not (isinstance(desired, int | str) and str(desired) == str(live)):
        return [path]
    return []


@task(**task_retries())
def apply_object(*, kubeconfig: str | None, obj: dict[str, Any]) -> Applied:
    """Server-side apply (idempotent); reports what a hand edit or an older spec had changed."""
    meta = obj["metadata"]
    fence(meta.get("namespace"))
    api = kube_client(kubeconfig)
    path = object_path(obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace"))
    try:
        live = _call(api, "GET", path)
    except ApiException as exc:
        if exc.status != 404:
            raise
        live = None
    if admin_object_current(obj, live):  # RBAC / the namespace: an admin's; the operator may not write them
        return Applied(obj["kind"], meta["name"], "unchanged", [])
    # Drift is a field we set that someone else changed since (a hand edit): the API server's managedFields
    # give it to that writer. What we change ourselves (a release's new template, an older spec's values)
    # is no drift. A first apply onto something that exists (a fresh cluster's `default` namespace, an
    # object made by hand) adopts it quietly.
    ours = live is not None and any(m.get("manager") == FIELD_MANAGER
                                    for m in live["metadata"].get("managedFields") or [])
    desired = {k: v for k, v in obj.items() if k in ("metadata", "spec", "data", "rules", "roleRef", "subjects")}
    edits = _foreign_edits(desired, live) if ours else {}
    changed = sorted(edits)
    result = _call(api, "PATCH", path, body=obj, content_type="application/apply-patch+yaml",
                   query=[("fieldManager", FIELD_MANAGER), ("force", "true")])
    if live is None:
        action = "created"
    elif result["metadata"].get("resourceVersion") == live["metadata"].get("resourceVersion"):
        action = "unchanged"
    else:
        action = "configured"
    if changed:
        logger().warning("%s/%s: %s changed by %s since llm-fleet applied it (a hand edit): reapplied",
                         obj["kind"], meta["name"], ", ".join(changed[:5]),
                         ", ".join(sorted({edits[c] for c in changed})))
    return Applied(obj["kind"], meta["name"], action, changed)


def _owned(fields: dict[str, Any], desired: Any, prefix: str) -> list[str]:
    """The paths of ``desired`` (our object) that a managedFields ``fieldsV1`` tree owns; a list is a leaf."""
    out: list[str] = []
    for key, sub in (fields or {}).items():
        if not key.startswith("f:") or not isinstance(desired, dict) or key[2:] not in desired:
            continue
        path, value = f"{prefix}.{key[2:]}" if prefix else key[2:], desired[key[2:]]
        if isinstance(value, dict) and sub:
            out += _owned(sub, value, path) or ([path] if "." in sub else [])
        else:
            out.append(path)
    return out


def _foreign_edits(desired: dict[str, Any], live: dict[str, Any]) -> dict[str, str]:
    """Fields of ``desired`` another writer owns now (path -> its field manager): not ours, not a
    subresource (the HPA's scale, a controller's status)."""
    out: dict[str, str] = {}
    for m in live["metadata"].get("managedFields") or []:
        if m.get("manager") == FIELD_MANAGER or m.get("subresource"):
            continue
        for path in _owned(m.get("fieldsV1") or {}, desired, ""):
            if not path.startswith(("metadata.namespace", "metadata.name")):
                out[path] = m.get("manager") or "?"
    return out


def get_path(kubeconfig: str | None, path: str) -> dict[str, Any] | None:
    """GET an API path; None when it is not there (404)."""
    try:
        return _call(kube_client(kubeconfig), "GET", path)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


@task(**task_retries())
def get_object(*, kubeconfig: str | None, api_version: str, kind: str, name: str,
               namespace: str | None = None) -> dict[str, Any] | None:
    return get_path(kubeconfig, object_path(api_version, kind, name, namespace))


@task(**task_retries())
def list_objects(*, kubeconfig: str | None, api_version: str, kind: str, namespace: str | None = None,
                 label_selector: str = "") -> list[dict[str, Any]]:
    query = [("labelSelector", label_selector)] if label_selector else []
    return _call(kube_client(kubeconfig), "GET", object_path(api_version, kind, None, namespace),
                 query=query).get("items", [])


@task(**task_retries())
def delete_object(*, kubeconfig: str | None, api_version: str, kind: str, name: str,
                  namespace: str | None = None) -> bool:
    """Delete (foreground for owners); False when it was already gone."""
    fence(namespace)
    try:
        _call(kube_client(kubeconfig), "DELETE", object_path(api_version, kind, name, namespace),
              body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Foreground"})
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


@task(**task_retries())
def ensure_secret(*, kubeconfig: str | None, namespace: str, name: str, key: str, value: SecretStr,
                  labels: dict[str, str] | None = None) -> str:
    """Create or update one key of an Opaque Secret. Returns created|updated|unchanged, never the value."""
    fence(namespace)
    core = k8s.CoreV1Api(kube_client(kubeconfig))
    encoded = base64.b64encode(value.get_secret_value().encode()).decode()
    try:
        live = core.read_namespaced_secret(name, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise
        body = k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=name, namespace=namespace, labels=labels),
                            type="Opaque", data={key: encoded})
        try:
            core.create_namespaced_secret(namespace, body)
        except ApiException as exc2:
            if is_transient(exc2):
                raise  # 429/5xx: the task retries it
            if exc2.status != 409:
                raise FleetError(f"could not create Secret {namespace}/{name} (HTTP {exc2.status})",
                                 "check the operator's RBAC for secrets") from None
            live = core.read_namespaced_secret(name, namespace)  # a retried create whose reply was lost
        else:
            return "created"
    if (live.data or {}).get(key) == encoded:
        return "unchanged"
    core.patch_namespaced_secret(name, namespace, {"data": {key: encoded}})
    return "updated"


@task(**task_retries())
def read_secret_key(*, kubeconfig: str | None, namespace: str, name: str, key: str) -> SecretStr | None:
    try:
        live = k8s.CoreV1Api(kube_client(kubeconfig)).read_namespaced_secret(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    raw = (live.data or {}).get(key)
    return SecretStr(base64.b64decode(raw).decode()) if raw else None


class SelectorConflict(FleetError):
    """The Service changed since it was read (resourceVersion mismatch): re-observe and re-decide."""


@task(**task_retries())
def patch_service_selector(*, kubeconfig: str | None, namespace: str, name: str,
                           selector: dict[str, str], expect: dict[str, str] | None = None,
                           resource_version: str | None = None) -> dict[str, Any]:
    """Point a Service at other pods: one merge-patch guarded by the resourceVersion the caller read.

    ``expect`` is the selector the caller believes is live; a Service that moved meanwhile, or a 409
    from the API server, raises SelectorConflict and nothing is changed. Returns the patched Service.
    """
    fence(namespace)
    api = kube_client(kubeconfig)
    path = object_path("v1", "Service", name, namespace)
    if resource_version is None or expect is not None:
        live = _call(api, "GET", path)
        if expect is not None and (live["spec"].get("selector") or {}) != expect:
            raise SelectorConflict(f"Service {name} selects {live['spec'].get('selector')}, expected {expect}",
                                   "another release moved it or someone edited the Service; rerun release_model")
        resource_version = resource_version or live["metadata"]["resourceVersion"]
    body = {"metadata": {"resourceVersion": resource_version}, "spec": {"selector": selector}}
    try:  # as llm-fleet (its field manager): the next apply must not take our own switch for a hand edit
        patched = _call(api, "PATCH", path, body=body, content_type="application/merge-patch+json",
                        query=[("fieldManager", FIELD_MANAGER)])
    except ApiException as exc:
        if exc.status == 409:
            raise SelectorConflict(f"Service {name} changed since it was read (resourceVersion "
                                   f"{resource_version})", "re-observe and decide again") from None
        raise
    if (patched["spec"].get("selector") or {}) != selector:
        raise FleetError(f"Service {name} selector is {patched['spec'].get('selector')} after the patch",
                         "rerun the release")
    return patched


@task(**task_retries())
def annotate(*, kubeconfig: str | None, api_version: str, kind: str, name: str, namespace: str | None,
             annotations: dict[str, str | None]) -> dict[str, Any]:
    """Merge-patch annotations (None removes one): the product's records live on the cluster itself."""
    fence(namespace)
    return _call(kube_client(kubeconfig), "PATCH", object_path(api_version, kind, name, namespace),
                 body={"metadata": {"annotations": annotations}}, content_type="application/merge-patch+json",
                 query=[("fieldManager", FIELD_MANAGER)])


@task(**task_retries())
def scale_deployment(*, kubeconfig: str | None, namespace: str, name: str, replicas: int) -> int:
    fence(namespace)
    apps = k8s.AppsV1Api(kube_client(kubeconfig))
    apps.patch_namespaced_deployment_scale(name, namespace, {"spec": {"replicas": replicas}},
                                           _content_type="application/merge-patch+json")
    return replicas


@task(**task_retries())
def pod_logs(*, kubeconfig: str | None, namespace: str, pod: str, previous: bool = False,
             tail: int = 20) -> list[str]:
    core = k8s.CoreV1Api(kube_client(kubeconfig))
    try:
        text = core.read_namespaced_pod_log(pod, namespace, tail_lines=tail, previous=previous)
    except ApiException:
        if not previous:
            return []
        text = core.read_namespaced_pod_log(pod, namespace, tail_lines=tail)
    return [ln for ln in str(text).splitlines() if ln.strip()][-tail:]


def _selector(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items())


@task(**task_retries())
def wait_pods_ready(*, kubeconfig: str | None, namespace: str, selector: dict[str, str], desired: int,
                    timeout_s: float) -> Progress:
    """Watch the pods (no sleep loop) until ``desired`` are Ready; fail fast with the real cause.

    Pending for lack of a GPU node keeps waiting (an autoscaler may add one) but is named if the
    timeout hits; image pull errors, crash loops and OOM kills fail at once with the pod's last logs.
    """
    api = kube_client(kubeconfig)
    core = k8s.CoreV1Api(api)
    # An informer, not a single watch: an expired (410) or dropped watch relists instead of failing.
    pods = Informer(api, core.list_namespaced_pod, queue.Queue(), namespace=namespace,
                    label_selector=_selector(selector))
    # the load timeout has about 3x margin over a typical load: that is the progress bar's 100 %
    bar = WaitProgress(f"model load ({desired} pod(s) in {namespace})", expected_s=timeout_s / 3)
    progress = watch_until([pods], lambda: diagnose(list(pods.items.values()), desired=desired),
                           timeout_s=timeout_s, log_prefix="waiting", progress=bar)
    if progress is None:
        raise DeployError(f"the cluster's API server did not answer within {timeout_s:.0f}s",
                          "check the cluster in the GKE console; rerun deploy_model", reason="LoadTimeout")
    if progress.state == "ready":
        return progress
    if progress.state == "waiting":
        minutes = timeout_s / 60
        raise DeployError(f"the model was not ready after {minutes:.1f} min: {progress.message}",
                          progress.fix or "raise load_timeout, or check the pod's logs",
                          reason="Unschedulable" if progress.reason == "Unschedulable" else "LoadTimeout",
                          logs=pod_logs.fn(kubeconfig=kubeconfig, namespace=namespace, pod=progress.pod)
                          if progress.pod else [])
    raise DeployError(progress.message, progress.fix, reason=progress.reason,
                      logs=pod_logs.fn(kubeconfig=kubeconfig, namespace=namespace, pod=progress.pod,
                                       previous=progress.previous_logs) if progress.pod else [])


# ---- rollout waits: Informer + watch_until (tasks.watching) relist when a watch ends or expires ----

def _raise_for(progress: Progress | None, *, kubeconfig: str | None, namespace: str, timeout_s: float,
               what: str) -> Progress:
    if progress is not None and progress.state == "ready":
        return progress
    if progress is None:
        raise DeployError(f"{what}: the cluster did not answer within {timeout_s:.0f}s", "check the API server",
                          reason="LoadTimeout")
    logs = (pod_logs.fn(kubeconfig=kubeconfig, namespace=namespace, pod=progress.pod,
                        previous=progress.previous_logs) if progress.pod else [])
    if progress.state == "waiting":
        raise DeployError(f"{what} was not ready after {timeout_s / 60:.1f} min: {progress.message}",
                          progress.fix or "raise load_timeout, or check the pod's logs",
                          reason="Unschedulable" if progress.reason == "Unschedulable" else "LoadTimeout",
                          logs=logs)
    raise DeployError(f"{what}: {progress.message}", progress.fix or "read the pod's logs", reason=progress.reason,
                      logs=logs)


@task(**task_retries())
def wait_rollout(*, kubeconfig: str | None, namespace: str, name: str, timeout_s: float) -> Progress:
    """Like `kubectl rollout status`, watched: observedGeneration, updated == available == desired.

    Only the new ReplicaSet's pods count (by pod-template-hash), and their causes fail the wait
    at once: image pull errors, crash loops, OOM kills; an unschedulable pod or the Deployment's
    progress deadline fails it once the deadline passes — with the pod's last log lines.
    """
    api = kube_client(kubeconfig)
    core, apps = k8s.CoreV1Api(api), k8s.AppsV1Api(api)
    changed: queue.Queue = queue.Queue()
    dep_inf = Informer(api, apps.list_namespaced_deployment, changed, namespace=namespace,
                        field_selector=f"metadata.name={name}")
    dep = apps.read_namespaced_deployment(name, namespace)
    selector = _selector(dep.spec.selector.match_labels or {})
    pod_inf = Informer(api, core.list_namespaced_pod, changed, namespace=namespace, label_selector=selector)
    rs_inf = Informer(api, apps.list_namespaced_replica_set, changed, namespace=namespace, label_selector=selector)

    def evaluate() -> Progress:
        d = dep_inf.items.get(name)
        if d is None:
            return Progress("failed", "Deleted", f"Deployment {name} was deleted during the rollout")
        rs = new_replicaset(d, list(rs_inf.items.values()))
        if rs is None:
            return rollout_progress(d, [])
        pod_hash = (rs["metadata"].get("labels") or {}).get(TEMPLATE_HASH)
        pods = [p for p in pod_inf.items.values() if (p["metadata"].get("labels") or {}).get(TEMPLATE_HASH) == pod_hash]
        return rollout_progress(d, pods, replicaset=rs["metadata"]["name"])

    bar = WaitProgress(f"model load: rollout of {name}", expected_s=timeout_s / 3)  # timeout ≈ 3× a typical load
    progress = watch_until([dep_inf, pod_inf, rs_inf], evaluate, timeout_s=timeout_s, log_prefix=f"rollout {name}",
                           progress=bar)
    return _raise_for(progress, kubeconfig=kubeconfig, namespace=namespace, timeout_s=timeout_s,
                      what=f"Deployment {name}")


def endpoint_pods(endpoints: dict[str, Any] | None) -> set[str]:
    """Names of the Ready pods an Endpoints object lists (what kube-proxy routes to)."""
    out: set[str] = set()
    for subset in (endpoints or {}).get("subsets") or []:
        for addr in subset.get("addresses") or []:
            ref = addr.get("targetRef") or {}
            out.add(ref.get("name") or addr.get("ip"))
    return out


class EndpointsNotReady(FleetError):
    """The Service's endpoints never listed exactly the expected pods."""


@task(**task_retries())
def wait_endpoints(*, kubeconfig: str | None, namespace: str, service: str, pods: set[str] | list[str],
                   timeout_s: float) -> set[str]:
    """Until the Service's endpoints list exactly ``pods`` (endpoint lag after Ready is normal, not fatal)."""
    api = kube_client(kubeconfig)
    core = k8s.CoreV1Api(api)
    want = set(pods)
    changed: queue.Queue = queue.Queue()
    inf = Informer(api, core.list_namespaced_endpoints, changed, namespace=namespace,
                    field_selector=f"metadata.name={service}")

    def evaluate() -> Progress:
        have = endpoint_pods(inf.items.get(service))
        if have == want:
            return Progress("ready", "Endpoints", f"{service} lists {len(want)} pod(s)", ready=len(want),
                            pods=tuple(sorted(want)))
        extra, missing = sorted(have - want), sorted(want - have)
        return Progress("waiting", "EndpointLag", f"{service} endpoints: waiting for {missing or '-'}, "
                        f"still listing {extra or '-'}")

    progress = watch_until([inf], evaluate, timeout_s=timeout_s, log_prefix=f"endpoints {service}")
    if progress is None or progress.state != "ready":
        raise EndpointsNotReady(f"Service {service} endpoints did not converge in {timeout_s:.0f}s: "
                                f"{progress.message if progress else 'no answer'}",
                                "check the Service selector and the pods' readiness probes")
    return want


class PodsRemain(FleetError):
    """Pods that should be gone are still there after the wait."""


@task(**task_retries())
def wait_pods_gone(*, kubeconfig: str | None, namespace: str, selector: dict[str, str], timeout_s: float) -> int:
    """Watch until no pod matches ``selector`` (Terminating ones count until they are deleted)."""
    api = kube_client(kubeconfig)
    core = k8s.CoreV1Api(api)
    changed: queue.Queue = queue.Queue()
    inf = Informer(api, core.list_namespaced_pod, changed, namespace=namespace, label_selector=_selector(selector))

    def evaluate() -> Progress:
        left = sorted(inf.items)
        if not left:
            return Progress("ready", "Gone", "no pods left")
        return Progress("waiting", "Terminating", f"{len(left)} pod(s) left: {', '.join(left[:3])}")

    progress = watch_until([inf], evaluate, timeout_s=timeout_s, log_prefix=f"pods {_selector(selector)}")
    if progress is None or progress.state != "ready":
        raise PodsRemain(f"pods {_selector(selector)} still exist after {timeout_s:.0f}s: "
                         f"{progress.message if progress else 'no answer'}",
                         "check for finalizers or a controller scaling them back up (an HPA, another run)")
    return 0
