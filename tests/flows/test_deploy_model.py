"""deploy_model against the sandbox: every bundled scenario end to end, preflight and failure causes."""

from __future__ import annotations

import copy
import os

import pytest

from tests.flows.conftest import spec_dict

pytestmark = pytest.mark.usefixtures("prefect_server")

SCENARIOS = ["paligemma2-tgi-autopilot.yaml", "gemma2-2b-it-vllm-l4.yaml", "llama2-7b-tgi-nginx.yaml",
             "mistral-7b-vllm-spot.yaml", "qwen2.5-7b-sglang.yaml"]


def provision(spec: dict) -> None:
    from flows.provision_cluster import provision_cluster

    provision_cluster(spec=spec)


@pytest.fixture(scope="module")
def shared(prefect_server):
    """Clusters provisioned once for the tests here that are not about a bundled spec end to end: each
    test deploys a model of its own name into one (pool max 4, so they fit side by side).

    None of these tests is about the load timeout unless it sets one: the default is 8h (~58 s scaled), not
    the bundled spec's (50 min for gemma: 6 s of wall time, which a loaded CI machine once spent between the
    pod turning Ready and the Deployment counting it available, failing test_token_never_leaks)."""
    made: dict[str, dict] = {}

    def spec_for(filename: str, name: str, **overrides) -> dict:
        overrides.setdefault("load_timeout", "8h")
        spec = spec_dict(filename, name=name, **overrides)
        acc = spec["accelerator"]
        spec["accelerator"] = acc = {"type": acc} if isinstance(acc, str) else acc
        acc.setdefault("pool", {})["max_nodes"] = 4
        if filename not in made:
            provision(spec)
            made[filename] = spec["cluster"]
        spec["cluster"] = copy.deepcopy(made[filename])
        return spec

    return spec_for


def deploy(spec: dict, **kw):
    from flows.deploy_model import deploy_model

    return deploy_model(spec=spec, **kw)


def kube(spec: dict):
    """A kubernetes client for the spec's cluster, built the way the product builds it."""
    from kubernetes import client

    from tasks.gke import get_credentials

    c = spec["cluster"]
    path = get_credentials.fn(project=c["project"], location=c["location"], name=c.get("name", "llm-fleet"))
    from tasks.clients import kube_client

    api = kube_client(path)
    return client.CoreV1Api(api), client.AppsV1Api(api), api


def managed_objects(spec: dict) -> set[tuple[str, str]]:
    """(kind, name) of every llm-fleet object of this spec in its namespace, read from the sandbox."""
    core, apps, api = kube(spec)
    from kubernetes import client

    ns = spec.get("namespace", "default")
    sel = f"app.kubernetes.io/instance={spec['name']}"
    found = set()
    for kind, items in [
        ("Deployment", apps.list_namespaced_deployment(ns, label_selector=sel).items),
        ("Service", core.list_namespaced_service(ns, label_selector=sel).items),
        ("PersistentVolumeClaim", core.list_namespaced_persistent_volume_claim(ns, label_selector=sel).items),
        ("ServiceAccount", core.list_namespaced_service_account(ns, label_selector=sel).items),
        ("Ingress", client.NetworkingV1Api(api).list_namespaced_ingress(ns, label_selector=sel).items),
        ("HorizontalPodAutoscaler",
         client.AutoscalingV2Api(api).list_namespaced_horizontal_pod_autoscaler(ns, label_selector=sel).items),
        ("Role", client.RbacAuthorizationV1Api(api).list_namespaced_role(ns, label_selector=sel).items),
        ("RoleBinding", client.RbacAuthorizationV1Api(api).list_namespaced_role_binding(ns, label_selector=sel).items),
        ("ClusterRole", client.RbacAuthorizationV1Api(api).list_cluster_role(label_selector=sel).items),
        ("ClusterRoleBinding", client.RbacAuthorizationV1Api(api).list_cluster_role_binding(label_selector=sel).items),
    ]:
        found |= {(kind, o.metadata.name) for o in items}
    custom = client.CustomObjectsApi(api)
    for group, plural, kind in [("monitoring.googleapis.com", "podmonitorings", "PodMonitoring"),
                                ("monitoring.googleapis.com", "rules", "Rules"),
                                ("cloud.google.com", "backendconfigs", "BackendConfig")]:  # GCE Ingress timeout
        items = custom.list_namespaced_custom_object(group, "v1", ns, plural, label_selector=sel)["items"]
        found |= {(kind, o["metadata"]["name"]) for o in items}
    classes = custom.list_cluster_custom_object("cloud.google.com", "v1", "computeclasses", label_selector=sel)
    found |= {("ComputeClass", o["metadata"]["name"]) for o in classes["items"]}  # capacity options (seed 004)
    return found


def rendered(spec: dict) -> set[tuple[str, str]]:
    from manifests.render import render
    from manifests.spec import parse_spec

    return {(o["kind"], o["metadata"]["name"]) for o in render(parse_spec(spec)) if o["kind"] != "Namespace"}


def routed_model(spec: dict) -> str:
    """Ask the live Service which model answers — through the API server's service proxy."""
    from tasks.clients import kube_http

    _, _, api = kube(spec)
    ns = spec.get("namespace", "default")
    with kube_http(api) as http:
        base = f"/api/v1/namespaces/{ns}/services/{spec['name']}:http/proxy"
        if spec["engine"] == "tgi" or (isinstance(spec["engine"], dict) and spec["engine"]["kind"] == "tgi"):
            return http.get(f"{base}/info").json()["model_id"]
        return http.get(f"{base}/v1/models").json()["data"][0]["id"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_end_to_end(name, sbc):
    from tests.flows.prereqs import install_prerequisites

    spec = spec_dict(name, hold__image="local/llm-fleet")  # the product's image (seed 004's playground)
    provision(spec)
    install_prerequisites(spec, kube(spec)[2])  # ingress-nginx, metrics adapter, static IP: what GKE lacks
    result = deploy(spec)
    model_id = spec["model"] if isinstance(spec["model"], str) else spec["model"]["id"]
    assert result["color"] == "blue" and len(result["revision"]) == 40
    assert all(r["tokens"] > 0 for r in result["smoke"])
    assert routed_model(spec) == model_id
    core, apps, _ = kube(spec)
    ns = spec.get("namespace", "default")
    dep = apps.read_namespaced_deployment(f"{spec['name']}-blue", ns)
    assert dep.status.ready_replicas == spec.get("replicas", 1)
    assert managed_objects(spec) == rendered(spec)
    # The token Secret exists with the key the pods read, and nothing else carries the token.
    secret = core.read_namespaced_secret(spec.get("secret", {}).get("name", "hf-secret"), ns)
    assert set(secret.data) == {spec.get("secret", {}).get("key", "hf_token")}


def test_rerun_changes_nothing(sbc, shared):
    spec = shared("qwen2.5-7b-sglang.yaml", "qwen-rerun")
    deploy(spec)
    _, apps, _ = kube(spec)
    rv = apps.read_namespaced_deployment("qwen-rerun-blue", "default").metadata.resource_version
    again = deploy(spec)
    assert {o["action"] for o in again["objects"]} == {"unchanged"}
    assert apps.read_namespaced_deployment("qwen-rerun-blue", "default").metadata.resource_version == rv


@pytest.mark.parametrize(("token", "model", "match", "fix"), [
    ("hf_not_a_token", None, "token is invalid", "settings/tokens"),
    ("hf_sandbox_nogate", None, "no access to the gated model", "accept the license at https://huggingface.co/"),
    (None, {"id": "google/gemma-2-2b-it", "revision": "no-such-branch"}, "revision 'no-such-branch'", "tree/main"),
    (None, {"id": "meta-llama/Llama-3.1-70B-Instruct"}, "GiB", "accelerator"),
    (None, {"id": "google/gemma-3000"}, "was not found", "model.id"),
])
def test_hub_preflight_fails_before_any_kubernetes_object(token, model, match, fix, sbc, monkeypatch, shared):
    from manifests.errors import PreflightError
    from tasks.settings import reload_settings

    spec = shared("gemma2-2b-it-vllm-l4.yaml", "gemma-preflight")
    if model:
        spec["model"] = model
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
        reload_settings()
    try:
        with pytest.raises(PreflightError) as info:
            deploy(spec)
    finally:
        monkeypatch.undo()
        reload_settings()
    assert match in str(info.value) and fix in info.value.fix
    assert managed_objects(spec) == set()


@pytest.mark.parametrize(("mode", "reason"), [
    ("image_pull_error", "ImagePullBackOff|ErrImagePull"),
    ("crash_loop", "CrashLoopBackOff"),
    ("oom", "OOMKilled"),
    ("hang_load", "LoadTimeout"),
])
def test_rollout_failures_name_the_cause_and_stop_paying(mode, reason, sbc, shared):
    import re

    from manifests.errors import DeployError

    # Only hang_load waits for its load timeout (40m: ~5 s on the sandbox's clock). The others fail at their
    # cause, so their timeout is long enough (8h: ~58 s) that a loaded machine cannot reach it first.
    spec = shared("qwen2.5-7b-sglang.yaml", f"fail-{mode.replace('_', '-')}",
                  **({"load_timeout": "40m"} if mode == "hang_load" else {}))
    if mode == "hang_load":
        sbc.add_behavior(match={"labels": {"app.kubernetes.io/instance": spec["name"]}}, mode="slow_load",
                         load_seconds=10_000)
    else:
        sbc.add_behavior(match={"labels": {"app.kubernetes.io/instance": spec["name"]}}, mode=mode)
    with pytest.raises(DeployError) as info:
        deploy(spec)
    assert re.fullmatch(reason, info.value.reason), info.value.reason
    if mode in ("crash_loop", "oom"):
        assert info.value.logs, "the pod's last log lines are attached"
    if mode == "oom":
        assert any("out of memory" in line.lower() for line in info.value.logs)
    _, apps, _ = kube(spec)
    assert apps.read_namespaced_deployment(f"{spec['name']}-blue", "default").spec.replicas == 0


def test_token_never_leaks(sbc, caplog, shared):
    import asyncio

    from prefect.client.orchestration import get_client

    spec = shared("gemma2-2b-it-vllm-l4.yaml", "gemma-leak", slack_channel="#deploy-leak")
    with caplog.at_level("DEBUG"):
        deploy(spec)
    token = os.environ["HF_TOKEN"]
    assert token not in caplog.text

    async def artifacts_and_logs():
        async with get_client() as client:
            arts = await client.read_artifacts()
            logs = await client.read_logs()
            runs = await client.read_flow_runs()
            return ([str(a.data) for a in arts], [lg.message for lg in logs],
                    [str(r.parameters) for r in runs])

    arts, logs, params = asyncio.run(artifacts_and_logs())
    assert arts and not any(token in a for a in arts)
    assert not any(token in m for m in logs)
    assert not any(token in p for p in params)
    texts = [m["text"] for m in sbc.slack_messages(channel="#deploy-leak")]
    assert texts and not any(token in t for t in texts)


def test_dry_run_touches_nothing(sbc, shared):
    spec = shared("gemma2-2b-it-vllm-l4.yaml", "gemma-dry-run")
    result = deploy(spec, dry_run=True)
    assert result["dry_run"] and {r["action"] for r in result["plan"]} <= {"create", "apply"}
    assert managed_objects(spec) == set()


def test_hand_edit_is_reported_and_reverted(sbc, shared):
    spec = shared("qwen2.5-7b-sglang.yaml", "qwen-hand-edit")
    deploy(spec)
    core, _, _ = kube(spec)
    # Someone relabels the live Service by hand (kubectl label --overwrite ...).
    core.patch_namespaced_service("qwen-hand-edit", "default", {"metadata": {"labels": {"llm-fleet.dev/role": "x"}}})
    again = deploy(spec)
    svc = next(o for o in again["objects"] if o["kind"] == "Service" and o["name"] == "qwen-hand-edit")
    assert svc["action"] == "configured"
    assert svc["changed"] == ["metadata.labels.llm-fleet.dev/role"]
    assert core.read_namespaced_service("qwen-hand-edit", "default").metadata.labels["llm-fleet.dev/role"] == "live"


def test_noop_deploy_leaves_the_live_deployment_alone(sbc, shared):
    """A deploy with nothing to release never re-applies the serving color's Deployment: that would change
    a hand-edited template of the live color in place (its only pod replaced before the new one loads) and,
    with an HPA, drop the replica count the HPA owns. Failed before the fix: the hand edit was reverted in
    place (the template changed under traffic)."""
    spec = shared("qwen2.5-7b-sglang.yaml", "qwen-noop")
    deploy(spec)
    _, apps, _ = kube(spec)
    dep = apps.read_namespaced_deployment("qwen-noop-blue", "default")
    # a field deploy_model owns (another manager's own fields survive a server-side apply anyway)
    env = next(e for e in dep.spec.template.spec.containers[0].env if e.name == "HF_HOME")
    env.value = "/tmp/hf-debug"
    apps.replace_namespaced_deployment("qwen-noop-blue", "default", dep)
    edited = apps.read_namespaced_deployment("qwen-noop-blue", "default").spec.template.to_dict()
    again = deploy(spec)
    assert again["action"] == "unchanged" and again["replicas"] == dep.spec.replicas
    assert apps.read_namespaced_deployment("qwen-noop-blue", "default").spec.template.to_dict() == edited


def test_an_image_that_is_no_engine_names_the_cause_and_stops_paying(sbc, shared):
    """A dict spec whose image serves a web page, not the engine: the deploy fails on one DeployError saying
    what answered (never a bare JSONDecodeError), and the GPU Deployment it applied is scaled to 0."""
    from manifests.errors import DeployError

    spec = shared("qwen2.5-7b-sglang.yaml", "not-an-engine")
    spec["engine"] = {**(spec["engine"] if isinstance(spec["engine"], dict) else {"kind": spec["engine"]}),
                      "image": "nginx:1.27", "command": ["nginx", "-g", "daemon off;"]}  # nginx's default site: 200 + HTML
    with pytest.raises(DeployError) as info:
        deploy(spec)
    assert info.value.reason == "NotAnEngine" and "not sglang's JSON" in str(info.value), info.value
    assert "engine.image" in (info.value.fix or "")
    _, apps, _ = kube(spec)
    assert apps.read_namespaced_deployment(f"{spec['name']}-blue", "default").spec.replicas == 0


def test_a_first_deploy_that_fails_on_anything_else_stops_paying_too(sbc, shared, monkeypatch):
    """Issue 19: a first deploy has no traffic to protect, so any failure after its Deployment was applied
    scales it to 0 — not only a DeployError (an API error, a reset mid smoke test, a lost lock's LockLost).
    Failed before the fix (first_deploy caught DeployError only): the GPU Deployment kept its replica."""
    from targets.gke import deploy as gke_deploy

    def reset(*args, **kwargs):
        raise ConnectionResetError("connection reset during the smoke test (test)")

    monkeypatch.setattr(gke_deploy, "smoke", reset)
    spec = shared("qwen2.5-7b-sglang.yaml", "first-fails")
    with pytest.raises(ConnectionResetError, match="during the smoke test"):
        deploy(spec)
    _, apps, _ = kube(spec)
    assert apps.read_namespaced_deployment(f"{spec['name']}-blue", "default").spec.replicas == 0
