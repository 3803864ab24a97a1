"""Pod Security Admission as the kube-apiserver runs it: the namespace's enforce level refuses a Pod with the
real message (and a ReplicaSet's pods, as FailedCreate events), its warn level answers Warning headers, on
Pods and on Deployments. Real kubernetes client over HTTP."""

from __future__ import annotations

import json

import httpx
import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from sandbox.core import Clock, Faults
from sandbox.kube import KubeCluster
from tests.sandbox.access_support import configuration
from tests.sandbox.kube_support import StubRuntime, wait_for

NS = "models"
LABELS = {"pod-security.kubernetes.io/enforce": "baseline", "pod-security.kubernetes.io/warn": "restricted"}


@pytest.fixture
def api():
    clock = Clock(0.002)
    k = KubeCluster(clock=clock, faults=Faults(), runtime=StubRuntime(clock))
    k.start()
    api = client.ApiClient(configuration(k))
    client.CoreV1Api(api).create_namespace({"metadata": {"name": NS, "labels": LABELS}})
    yield api
    k.stop()


def _pod(name: str, **security) -> dict:
    return {"metadata": {"name": name}, "spec": {"containers": [
        {"name": "c", "image": "busybox", "command": ["sleep", "1"], "securityContext": security}]}}


def _post(api: client.ApiClient, path: str, body: dict) -> tuple[int, dict]:
    """Raw call to read the response headers (the typed client drops Warning headers)."""
    cfg = api.configuration
    headers = {**({"Authorization": cfg.api_key["authorization"]}
                                                      if cfg.api_key else {})}
    resp = httpx.post(cfg.host + path, headers=headers, json=body, verify=cfg.ssl_ca_cert or False, timeout=30)
    return resp.status_code, resp.headers


def test_privileged_pod_is_refused_with_the_api_servers_message(api):
    core = client.CoreV1Api(api)
    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod(NS, _pod("priv", privileged=True))
    assert err.value.status == 403
    assert json.loads(err.value.body)["message"] == ('pods "priv" is forbidden: violates PodSecurity "baseline:latest": privileged (container "c" must not '
            "set securityContext.privileged=true)")
    host = _pod("host")
    host["spec"]["hostNetwork"] = True
    host["spec"]["volumes"] = [{"name": "root", "hostPath": {"path": "/"}}]
    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod(NS, host)
    assert 'host namespaces (hostNetwork=true), hostPath volumes (volume "root")' in json.loads(err.value.body)["message"]
    assert core.list_namespaced_pod(NS).items == []
    # a namespace without labels is privileged: the same pod is admitted there
    assert core.create_namespaced_pod("default", _pod("priv", privileged=True)).metadata.name == "priv"


def test_restricted_warning_header_on_pods_and_deployments(api):
    status, headers = _post(api, f"/api/v1/namespaces/{NS}/pods", _pod("plain"))
    assert status == 201  # baseline allows it...
    warning = headers.get("Warning", "")
    assert warning.startswith('299 - "would violate PodSecurity \\"restricted:latest\\": allowPrivilegeEscalation')
    assert 'runAsNonRoot != true (pod or container \\"c\\" must set securityContext.runAsNonRoot=true)' in warning
    ok = _pod("strict", allowPrivilegeEscalation=False, capabilities={"drop": ["ALL"]}, runAsNonRoot=True)
    ok["spec"]["securityContext"] = {"seccompProfile": {"type": "RuntimeDefault"}}
    status, headers = _post(api, f"/api/v1/namespaces/{NS}/pods", ok)
    assert status == 201 and "Warning" not in headers


def test_deployment_of_privileged_pods_gets_no_pod(api):
    """Enforce applies to Pods: the Deployment is stored (with a warning), its ReplicaSet cannot create pods."""
    tmpl = _pod("x", privileged=True)
    dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "evil"},
           "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "evil"}},
                    "template": {"metadata": {"labels": {"app": "evil"}}, "spec": tmpl["spec"]}}}
    status, headers = _post(api, f"/apis/apps/v1/namespaces/{NS}/deployments", dep)
    assert status == 201 and "privileged" in headers.get("Warning", "")
    core = client.CoreV1Api(api)
    wait_for(lambda: any(e.reason == "FailedCreate" for e in core.list_namespaced_event(NS).items))
    (event,) = [e for e in core.list_namespaced_event(NS).items if e.reason == "FailedCreate"][:1]
    assert 'violates PodSecurity "baseline:latest": privileged' in event.message
    assert core.list_namespaced_pod(NS).items == []


def test_unknown_level_label_is_invalid(api):
    with pytest.raises(ApiException) as err:
        client.CoreV1Api(api).create_namespace(
            {"metadata": {"name": "typo", "labels": {"pod-security.kubernetes.io/enforce": "strict"}}})
    assert err.value.status == 422
    assert "must be one of privileged, baseline, restricted" in json.loads(err.value.body)["message"]
