"""deploy_model through GKE-strict auth: expiring Google tokens, and the operator ServiceAccount's RBAC."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.flows.conftest import spec_dict
from tests.flows.test_deploy_model import deploy, kube, provision, routed_model

pytestmark = pytest.mark.usefixtures("prefect_server")
SPEC = "qwen2.5-7b-sglang.yaml"  # the smallest spec: no Ingress, HPA or cache


@pytest.fixture(scope="module")
def cluster(prefect_server):
    """One cluster for the file (what is tested is auth to it, not its making): each test deploys a model
    of its own name into a namespace of its own (its own operator Role), pool max 4 so they fit."""
    made: dict = {}

    def spec_for(name: str) -> dict:
        spec = spec_dict(SPEC, name=name, namespace=name, accelerator={"type": "nvidia-l4", "pool": {"max_nodes": 4}})
        if not made:
            provision(spec)
            made.update(spec["cluster"])
        spec["cluster"] = copy.deepcopy(made)
        return spec

    return spec_for


def _model_id(spec: dict) -> str:
    return spec["model"] if isinstance(spec["model"], str) else spec["model"]["id"]


def test_deploy_outlives_the_google_token(sandbox, sbc, tmp_path, cluster):
    """Google access tokens expire several times while the model loads: the client refreshes them
    before expiry; a token refused mid-run (revoked: 401) is retried once with a fresh one."""
    spec = cluster("qwen-token")
    core, _, _ = kube(spec)
    tokens = sandbox.tokens
    lifetime = tokens.lifetime_s
    try:
        tokens.lifetime_s = 1e6  # a token the client considers good for a long while...
        core.list_namespace()
        tokens.revoke_all(endpoint_only=True)  # ...refused from now on: 401, then one retry with a fresh token
        before = tokens.issued
        assert core.list_namespace().items
        assert tokens.issued == before + 1

        # a token lives 0.3 real s (150 cloud s); the model takes 600 cloud s (1.2 real s) to load
        tokens.lifetime_s = 150.0
        tokens.revoke_all(endpoint_only=True)  # (so no client still holds a long-lived token)
        sbc.add_behavior(mode="ok", load_seconds=600, match={"model": _model_id(spec)})
        before = tokens.issued
        result = deploy(spec)
    finally:
        tokens.lifetime_s = lifetime
    assert all(r["tokens"] > 0 for r in result["smoke"])
    assert routed_model(spec) == _model_id(spec)
    assert tokens.issued - before >= 4  # the deploy spanned at least four token lifetimes

    # the kubeconfig written for users holds no token that could expire: gcloud's exec-plugin form,
    # which real kubectl uses as it is
    path = _kubeconfig(spec)
    user = yaml.safe_load(Path(path).read_text())["users"][0]["user"]
    assert user == {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1",
                             "command": "gke-gcloud-auth-plugin", "installHint": user["exec"]["installHint"],
                             "provideClusterInfo": True}}
    if shutil.which("kubectl") and shutil.which("gke-gcloud-auth-plugin"):
        # A HOME of its own: gke-gcloud-auth-plugin caches tokens under ~/.kube, and a token cached for
        # another sandbox (another worker or session) would be refused here.
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "KUBECONFIG": path,
               **{k: v for k, v in sandbox.env().items() if k.startswith("CLOUDSDK_")}}
        out = subprocess.run(["kubectl", "get", "deploy", "-A", "-o", "name"], env=env, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0 and f"deployment.apps/{spec['name']}-blue" in out.stdout, out.stderr


def _operator_token(spec: dict, *, drop: tuple[str, str] | None = None) -> str:
    """Apply the rendered operator RBAC as the project owner (what a cluster admin does once) and
    return a TokenRequest token of its ServiceAccount. ``drop=(resource, verb)`` removes that verb."""
    from kubernetes import client

    from manifests.render import namespace, operator_rbac
    from manifests.spec import parse_spec
    from tasks.k8s import apply_object

    parsed = parse_spec(spec)
    _, _, api = kube(spec)
    objs = [namespace(parsed), *_without(operator_rbac(parsed), drop)]
    for obj in objs:
        apply_object.fn(kubeconfig=_kubeconfig(spec), obj=obj)
    sa = objs[1]["metadata"]
    req = client.CoreV1Api(api).create_namespaced_service_account_token(
        sa["name"], sa["namespace"], {"spec": {"expirationSeconds": 86400}})
    return req.status.token


def _without(objs: list[dict], drop: tuple[str, str] | None) -> list[dict]:
    """The operator RBAC with ``drop=(resource, verb)`` taken out of the Role (the resource in a rule of its own)."""
    for obj in objs:
        if drop and obj["kind"] == "Role":
            rule = next(r for r in obj["rules"] if drop[0] in r["resources"])
            rule["resources"] = [r for r in rule["resources"] if r != drop[0]]
            obj["rules"].append({**rule, "resources": [drop[0]], "verbs": [v for v in rule["verbs"] if v != drop[1]]})
    return objs


def _kubeconfig(spec: dict) -> str:
    from tasks.gke import get_credentials

    c = spec["cluster"]
    return get_credentials.fn(project=c["project"], location=c["location"], name=c.get("name", "llm-fleet"))


@pytest.fixture
def as_operator(tmp_path):
    """Run the product with a ServiceAccount token (LLM_FLEET_KUBE_TOKEN_FILE) instead of Google's."""
    from tasks.settings import reload_settings

    token_file = tmp_path / "token"

    def use(token: str) -> None:
        token_file.write_text(token)
        os.environ["LLM_FLEET_KUBE_TOKEN_FILE"] = str(token_file)
        reload_settings()

    yield use
    os.environ.pop("LLM_FLEET_KUBE_TOKEN_FILE", None)
    reload_settings()


def test_deploy_as_the_operator_service_account(sbc, as_operator, cluster):
    spec = cluster("qwen-operator")
    as_operator(_operator_token(spec))
    result = deploy(spec)
    assert all(r["tokens"] > 0 for r in result["smoke"])
    assert routed_model(spec) == _model_id(spec)


def test_operator_role_lacking_a_verb_fails_with_the_permission_named(sbc, as_operator, cluster, monkeypatch):
    import manifests.render
    from manifests.errors import FleetError

    spec = cluster("qwen-no-patch")
    as_operator(_operator_token(spec, drop=("services", "patch")))
    # The admin applied this Role; the flow renders the same one (else it would ask to re-apply the RBAC,
    # which only an admin may: the error would name "patch roles").
    real = manifests.render.operator_rbac
    monkeypatch.setattr(manifests.render, "operator_rbac", lambda s: _without(real(s), ("services", "patch")))
    with pytest.raises(FleetError) as err:
        deploy(spec)
    message = str(err.value)
    ns = spec.get("namespace", "default")
    assert f'missing permission: patch services (API group "") in namespace "{ns}"' in message
    assert "operator Role" in message and "operator_rbac" in message
    assert f"system:serviceaccount:{ns}:llm-fleet-operator" in message




def test_a_process_keeps_one_google_client_per_api(sbc):
    """Tasks share one Google client per API in a process: each new client copies the credentials, and each
    copy looks up its regional access boundary (an HTTPS call to iamcredentials) and opens connections of its
    own. Twenty GKE reads and twenty Compute reads: at most one lookup per API, not one per read."""
    import time

    import httpx
    from google.cloud import container_v1

    from tasks import clients, compute, gke

    cfg = spec_dict(SPEC)["cluster"]
    rule = sbc.add_fault(service="iamcredentials", path="/allowedLocations$", count=None)  # passes, counts
    for _ in range(20):
        assert gke.get_cluster.fn(project=cfg["project"], location=cfg["location"], name="none-such") is None
        assert compute.get_project_gpu_quota.fn(project=cfg["project"]).scope == "global"
    time.sleep(1.0)  # the lookups run in background threads
    hits = next(r["hits"] for r in sbc.faults() if r["id"] == rule["id"])
    assert hits <= 2, f"{hits} boundary lookups for 40 reads: a client per call"
    assert clients.cluster_manager() is clients.cluster_manager()
    assert isinstance(clients.cluster_manager(), container_v1.ClusterManagerClient)
    assert isinstance(clients.compute_http(), httpx.Client) and clients.compute_http() is clients.compute_http()
