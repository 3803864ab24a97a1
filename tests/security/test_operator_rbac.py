"""The operator's RBAC limits: flows run with the operator ServiceAccount's token (as a worker in the cluster
does: deploy, a release plan, park, wake), and with that same token each escalation is refused by the
sandbox's RBAC and Pod Security.

The RBAC and the namespace are applied once as the project owner (what a cluster admin does); then
deploy_model runs with the operator token, and the attacks: list Secrets, read a Secret it does not own,
bind a role (a new RoleBinding to cluster-admin, a patch of its own RoleBinding), drop the namespace's Pod
Security labels, create a privileged pod, or a Deployment of privileged pods. Nothing of it lands.
"""

from __future__ import annotations

import json
import os

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tasks.settings import reload_settings
from tests.flows.conftest import spec_dict
from tests.flows.test_cluster_auth import _operator_token, as_operator  # noqa: F401 - the fixture
from tests.flows.test_deploy_model import deploy, kube, provision, routed_model

pytestmark = [pytest.mark.long, pytest.mark.usefixtures("prefect_server")]
NS = "sec-operator"


def _refused(call, *args, **kwargs) -> str:
    """The call's 403 message (the product's client raises KubeForbidden for it, naming the permission)."""
    from tasks.clients import KubeForbidden

    with pytest.raises((ApiException, KubeForbidden)) as err:
        call(*args, **kwargs)
    if isinstance(err.value, ApiException):
        assert err.value.status == 403, err.value.body
        return json.loads(err.value.body)["message"]
    return str(err.value)


def test_flows_run_as_the_operator_and_every_escalation_is_refused(sbc, as_operator):  # noqa: F811
    # hold proxy off: its process start is test_park's subject, and the seconds count here
    spec = spec_dict("qwen2.5-7b-sglang.yaml", name="qwen-sec-op", namespace=NS, hold__enabled=False,
                     accelerator={"type": "nvidia-l4", "pool": {"max_nodes": 2}})
    provision(spec)
    admin_core, _, _ = kube(spec)
    token = _operator_token(spec)  # as the owner: namespace (with Pod Security labels) + operator RBAC
    admin_core.create_namespaced_secret(NS, {"metadata": {"name": "someone-elses"}, "stringData": {"k": "v"}})
    role_before = client.RbacAuthorizationV1Api(kube(spec)[2]).read_namespaced_role("llm-fleet-operator", NS).rules

    as_operator(token)
    deploy(spec)  # the flows need none of what follows
    assert routed_model(spec) == "Qwen/Qwen2.5-7B-Instruct"
    from flows.park import park_model, wake_model
    from flows.release_model import release_model

    assert release_model(spec=spec, dry_run=True)["dry_run"]
    park_model(spec=spec, reason="operator test")
    assert wake_model(spec=spec, reason="operator test")["woken"]  # answering again (wake checks the engine)

    core, apps, api = kube(spec)  # the operator's token from here on
    rbac = client.RbacAuthorizationV1Api(api)
    me = f"system:serviceaccount:{NS}:llm-fleet-operator"
    msg = _refused(core.list_namespaced_secret, NS)
    assert f'User "{me}" cannot list resource "secrets"' in msg
    _refused(core.read_namespaced_secret, "someone-elses", NS)
    assert core.read_namespaced_secret("hf-secret", NS).data  # its own, by name
    binding = {"metadata": {"name": "take-over"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io",
                                                              "kind": "ClusterRole", "name": "cluster-admin"},
               "subjects": [{"kind": "ServiceAccount", "name": "llm-fleet-operator", "namespace": NS}]}
    _refused(rbac.create_namespaced_role_binding, NS, binding)
    _refused(rbac.patch_namespaced_role_binding, "llm-fleet-operator", NS,
             {"subjects": [{"kind": "User", "name": "mallory"}]})
    _refused(rbac.patch_namespaced_role, "llm-fleet-operator", NS, {"rules": []})
    _refused(rbac.list_namespaced_role_binding, NS)
    _refused(core.patch_namespace, NS, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "privileged"}}})
    pod = {"metadata": {"name": "root-shell"}, "spec": {"containers": [
        {"name": "c", "image": "busybox", "securityContext": {"privileged": True}}]}}
    _refused(core.create_namespaced_pod, NS, pod)
    # The operator may write Deployments: Pod Security refuses their privileged pods (ReplicaSet FailedCreate).
    dep = {"metadata": {"name": "root-shell"},
           "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "root-shell"}},
                    "template": {"metadata": {"labels": {"app": "root-shell"}}, "spec": pod["spec"]}}}
    apps.create_namespaced_deployment(NS, dep)

    # Read as the owner again from here: what landed, and that nothing else changed.
    os.environ.pop("LLM_FLEET_KUBE_TOKEN_FILE", None)
    reload_settings()
    admin_core, admin_apps, admin = kube(spec)
    try:
        from tests.sandbox.kube_support import wait_for

        def refused_pod() -> list[str]:
            return [e.message for e in admin_core.list_namespaced_event(NS).items
                    if e.reason == "FailedCreate" and "root-shell" in (e.involved_object.name or "")]

        wait_for(lambda: refused_pod(), timeout=30)
        assert 'violates PodSecurity "baseline:latest": privileged' in refused_pod()[0]
        assert admin_core.list_namespaced_pod(NS, label_selector="app=root-shell").items == []
    finally:
        admin_apps.delete_namespaced_deployment("root-shell", NS)
    labels = admin_core.read_namespace(NS).metadata.labels
    assert labels["pod-security.kubernetes.io/enforce"] == "baseline"
    assert client.RbacAuthorizationV1Api(admin).read_namespaced_role("llm-fleet-operator", NS).rules == role_before
    assert [b.metadata.name for b in client.RbacAuthorizationV1Api(admin).list_namespaced_role_binding(NS).items] == [
        "llm-fleet-operator"]
