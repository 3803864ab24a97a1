"""RBAC for ServiceAccount tokens, as the Kubernetes RBAC authorizer decides, through real clients."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from sandbox.core import Clock, Faults
from sandbox.kube import KubeCluster
from tests.sandbox.kube_support import StubRuntime, api_client, deployment, http_client, kubeconfig_entry

RBAC = "rbac.authorization.k8s.io"


@pytest.fixture(scope="module")
def kube():
    clock = Clock(0.002)
    k = KubeCluster(clock=clock, faults=Faults(), runtime=StubRuntime(clock))
    k.start()
    k.add_node("cpu-1", capacity={"cpu": "16", "memory": "64Gi"})
    admin = api_client(k)  # a Google identity: the project owner, allowed everything
    client.CoreV1Api(admin).create_namespace({"metadata": {"name": "team"}})
    client.AppsV1Api(admin).create_namespaced_deployment("team", deployment("web", replicas=1))
    client.CoreV1Api(admin).create_namespaced_service("team", {"metadata": {"name": "web"}, "spec": {
        "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8000}]}})
    yield k
    k.stop()


def account(kube, name: str, rules: list[dict], *, cluster_rules: list[dict] | None = None,
            namespace: str = "team") -> str:
    """A ServiceAccount bound to a Role with ``rules`` (and a ClusterRole with ``cluster_rules``); its token."""
    admin = api_client(kube)
    core, rbac = client.CoreV1Api(admin), client.RbacAuthorizationV1Api(admin)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": name}})
    subject = [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]
    rbac.create_namespaced_role(namespace, {"metadata": {"name": name}, "rules": rules})
    rbac.create_namespaced_role_binding(namespace, {"metadata": {"name": name}, "subjects": subject,
                                                    "roleRef": {"apiGroup": RBAC, "kind": "Role", "name": name}})
    if cluster_rules:
        rbac.create_cluster_role({"metadata": {"name": name}, "rules": cluster_rules})
        rbac.create_cluster_role_binding({"metadata": {"name": name}, "subjects": subject,
                                          "roleRef": {"apiGroup": RBAC, "kind": "ClusterRole", "name": name}})
    return core.create_namespaced_service_account_token(name, namespace, {"spec": {}}).status.token


def forbidden(call) -> str:
    with pytest.raises(ApiException) as info:
        call()
    assert info.value.status == 403, info.value.body
    body = json.loads(info.value.body)
    assert body["kind"] == "Status" and body["reason"] == "Forbidden" and body["code"] == 403
    return body["message"]


def test_verbs_and_the_real_denial_message(kube):
    token = account(kube, "reader", [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}])
    core = client.CoreV1Api(api_client(kube, token=token))
    pod = client.CoreV1Api(api_client(kube)).list_namespaced_pod("team").items[0].metadata.name
    assert core.read_namespaced_pod(pod, "team").metadata.name == pod
    assert forbidden(lambda: core.list_namespaced_pod("team")) == (
        'pods is forbidden: User "system:serviceaccount:team:reader" cannot list resource "pods" in API group "" '
        'in the namespace "team"')
    assert forbidden(lambda: core.read_namespaced_pod(pod, "default")) == (
        f'pods "{pod}" is forbidden: User "system:serviceaccount:team:reader" cannot get resource "pods" in API '
        'group "" in the namespace "default"')  # a RoleBinding grants in its own namespace only
    assert forbidden(lambda: core.list_node()) == (
        'nodes is forbidden: User "system:serviceaccount:team:reader" cannot list resource "nodes" in API group '
        '"" at the cluster scope')
    assert "cannot delete resource" in forbidden(lambda: core.delete_namespaced_pod(pod, "team"))
    assert "cannot watch resource" in forbidden(lambda: core.list_namespaced_pod("team", watch=True,
                                                                                timeout_seconds=1))


def test_subresources_resource_names_api_groups_and_wildcards(kube):
    token = account(kube, "scaler", [
        {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["get", "patch"]},
        {"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": ["web"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["services/proxy"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
        {"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["get"]},
    ])
    api = api_client(kube, token=token)
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    assert apps.patch_namespaced_deployment_scale("web", "team", {"spec": {"replicas": 2}}).spec.replicas == 2
    assert apps.read_namespaced_deployment("web", "team").metadata.name == "web"  # its name is listed
    assert apps.read_namespaced_deployment_status("web", "team").metadata.name == "web"  # */status
    # the scale subresource is not the resource: no patch of the Deployment itself
    msg = forbidden(lambda: apps.patch_namespaced_deployment("web", "team", {"spec": {"replicas": 3}}))
    assert 'cannot patch resource "deployments" in API group "apps"' in msg
    # resourceNames: another name, and list (no name), are not covered
    assert 'cannot get resource "deployments"' in forbidden(lambda: apps.read_namespaced_deployment("db", "team"))
    assert 'cannot list resource "deployments"' in forbidden(lambda: apps.list_namespaced_deployment("team"))
    # "*/status" covers the status subresource only, of any resource in any group: not pods themselves
    assert 'cannot get resource "pods" in API group ""' in forbidden(lambda: core.read_namespaced_pod("x", "team"))
    with http_client(kube, token=token) as http:
        r = http.get("/api/v1/namespaces/team/services/web:http/proxy/health")
        assert r.status_code != 403  # allowed through to the (stub) backend
        r = http.post("/api/v1/namespaces/team/services/web:http/proxy/echo", json={})
        assert r.status_code == 403 and 'cannot create resource "services/proxy"' in r.json()["message"]


def test_cluster_roles_and_cluster_role_bindings(kube):
    token = account(kube, "ops", [], cluster_rules=[{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]},
                                                    {"nonResourceURLs": ["/metrics"], "verbs": ["get"]}])
    core = client.CoreV1Api(api_client(kube, token=token))
    assert [n.metadata.name for n in core.list_node().items] == ["cpu-1"]
    assert "cannot get resource \"nodes\"" in forbidden(lambda: core.read_node("cpu-1"))
    # a ClusterRole bound by a RoleBinding grants in that namespace only
    admin = client.RbacAuthorizationV1Api(api_client(kube))
    admin.create_namespaced_role_binding("team", {
        "metadata": {"name": "ops-view"}, "roleRef": {"apiGroup": RBAC, "kind": "ClusterRole", "name": "view"},
        "subjects": [{"kind": "ServiceAccount", "name": "ops", "namespace": "team"}]})
    assert core.list_namespaced_service("team").items
    assert "in the namespace \"default\"" in forbidden(lambda: core.list_namespaced_service("default"))
    with http_client(kube, token=token) as http:
        assert http.get("/api").status_code == 200  # system:discovery: every authenticated user
        assert http.get("/openapi/v2").status_code == 200


def test_apply_that_creates_needs_create(kube):
    token = account(kube, "patcher", [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "patch"]}])
    core = client.CoreV1Api(api_client(kube, token=token))
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"a": "1"}}
    msg = forbidden(lambda: core.patch_namespaced_config_map("cfg", "team", body, field_manager="me",
                                                             _content_type="application/apply-patch+yaml"))
    assert 'cannot create resource "configmaps"' in msg
    client.CoreV1Api(api_client(kube)).create_namespaced_config_map("team", {"metadata": {"name": "cfg"}})
    out = core.patch_namespaced_config_map("cfg", "team", body, field_manager="me",
                                           _content_type="application/apply-patch+yaml")
    assert out.data == {"a": "1"}


def test_no_escalation_through_roles(kube):
    token = account(kube, "selfish", [
        {"apiGroups": [""], "resources": ["services"], "verbs": ["get"]},
        {"apiGroups": [RBAC], "resources": ["roles"], "resourceNames": ["selfish"], "verbs": ["get", "patch"]}])
    rbac = client.RbacAuthorizationV1Api(api_client(kube, token=token))
    role = rbac.read_namespaced_role("selfish", "team")
    same = {"apiVersion": f"{RBAC}/v1", "kind": "Role", "metadata": {"name": "selfish"},
            "rules": [client.ApiClient().sanitize_for_serialization(r) for r in role.rules]}
    rbac.patch_namespaced_role("selfish", "team", same, field_manager="me",
                               _content_type="application/apply-patch+yaml")  # what it holds: fine
    more = {**same, "rules": [*same["rules"], {"apiGroups": [""], "resources": ["services"], "verbs": ["patch"]}]}
    msg = forbidden(lambda: rbac.patch_namespaced_role("selfish", "team", more, field_manager="me",
                                                       _content_type="application/apply-patch+yaml"))
    assert "is attempting to grant RBAC permissions not currently held" in msg
    assert '{APIGroups:[""], Resources:["services"], Verbs:["patch"]}' in msg


def test_self_subject_access_review_and_kubectl_auth_can_i(kube, tmp_path):
    token = account(kube, "viewer", [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}])
    authz = client.AuthorizationV1Api(api_client(kube, token=token))

    def can(verb: str, resource: str, namespace: str = "team") -> bool:
        review = authz.create_self_subject_access_review({"spec": {"resourceAttributes": {
            "verb": verb, "resource": resource, "namespace": namespace}}})
        return review.status.allowed

    assert can("list", "pods") and not can("delete", "pods") and not can("list", "pods", "default")
    if not shutil.which("kubectl"):
        pytest.skip("kubectl not installed")
    (tmp_path / "config").write_text(yaml.safe_dump(kubeconfig_entry(kube, token=token)))
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "config")}

    def kubectl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["kubectl", f"--cache-dir={tmp_path / 'cache'}", *args], capture_output=True,
                              text=True, env=env, timeout=60)

    assert kubectl("auth", "can-i", "list", "pods", "-n", "team").stdout.strip() == "yes"
    no = kubectl("auth", "can-i", "delete", "pods", "-n", "team")
    assert no.stdout.strip() == "no" and no.returncode == 1
    out = kubectl("get", "pods", "-n", "default")
    assert out.returncode != 0 and ('User "system:serviceaccount:team:viewer" cannot list resource "pods"'
                                    in out.stderr)
    listing = kubectl("auth", "can-i", "--list", "-n", "team").stdout
    assert "pods" in listing and "[get list]" in listing
