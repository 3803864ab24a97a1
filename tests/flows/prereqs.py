"""What an operator installs in a fresh GKE cluster before deploying a spec that needs it, done the way
they do it (objects applied through the API, a static IP reserved through Compute), not by sandbox magic."""

from __future__ import annotations

from kubernetes import client
from kubernetes.client.rest import ApiException


def _ignore_exists(fn, *args) -> None:
    try:
        fn(*args)
    except ApiException as exc:
        if exc.status != 409:
            raise


def install_ingress_nginx(api) -> None:
    """The IngressClass the ingress-nginx chart creates."""
    _ignore_exists(client.NetworkingV1Api(api).create_ingress_class, {
        "metadata": {"name": "nginx", "labels": {"app.kubernetes.io/name": "ingress-nginx"}},
        "spec": {"controller": "k8s.io/ingress-nginx"}})


def install_stackdriver_adapter(api) -> None:
    """What adapter_new_resource_model.yaml registers: namespace, Service, custom/external metrics APIServices."""
    core = client.CoreV1Api(api)
    _ignore_exists(core.create_namespace, {"metadata": {"name": "custom-metrics"}})
    _ignore_exists(core.create_namespaced_service, "custom-metrics", {
        "metadata": {"name": "custom-metrics-stackdriver-adapter"},
        "spec": {"selector": {"k8s-app": "custom-metrics-stackdriver-adapter"},
                 "ports": [{"port": 443, "targetPort": 443, "protocol": "TCP"}]}})
    reg = client.ApiregistrationV1Api(api)
    for version, group in (("v1beta1", "custom.metrics.k8s.io"), ("v1beta2", "custom.metrics.k8s.io"),
                           ("v1beta1", "external.metrics.k8s.io")):
        _ignore_exists(reg.create_api_service, {
            "metadata": {"name": f"{version}.{group}"},
            "spec": {"group": group, "version": version, "insecureSkipTLSVerify": True,
                     "groupPriorityMinimum": 100, "versionPriority": 100,
                     "service": {"namespace": "custom-metrics", "name": "custom-metrics-stackdriver-adapter"}}})


def reserve_static_ip(project: str, name: str) -> None:
    """gcloud compute addresses create NAME --global (Compute answers 409 when it is reserved already)."""
    from tasks.clients import compute_http

    resp = compute_http().post(f"projects/{project}/global/addresses", json={"name": name})
    assert resp.status_code in (200, 409) and resp.json().get("status", "DONE") == "DONE", resp.text


def install_prerequisites(spec: dict, api) -> None:
    ing = (spec.get("expose") or {}).get("ingress") or {}
    if ing.get("class") == "nginx":
        install_ingress_nginx(api)
    if ing.get("static_ip_name"):
        reserve_static_ip(spec["cluster"]["project"], ing["static_ip_name"])
    if spec.get("autoscaling"):
        install_stackdriver_adapter(api)
