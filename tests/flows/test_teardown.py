"""teardown against the sandbox: the spec's inventory ends empty, another spec in the namespace is untouched."""

from __future__ import annotations

import pytest

from tests.flows.conftest import spec_dict

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.timeout(300)]

INSTANCE = "app.kubernetes.io/instance"


def inventory(sandbox, spec: dict) -> dict[str, dict]:
    """Every object in the spec's cluster labelled for it, straight from the sandbox's store."""
    c = spec["cluster"]
    kube = sandbox.cluster_kube(c.get("name", "llm-fleet"), c["location"], c["project"])
    if kube is None:
        return {}
    out = {}
    for _, objs in kube.store.all_objects().items():
        for o in objs:
            meta = o["metadata"]
            if (meta.get("labels") or {}).get(INSTANCE) == spec["name"]:
                out[f"{o.get('kind')}/{meta.get('namespace', '')}/{meta['name']}"] = o
    return out


def namespaces(sandbox, spec: dict) -> set[str]:
    c = spec["cluster"]
    kube = sandbox.cluster_kube(c.get("name", "llm-fleet"), c["location"], c["project"])
    return {o["metadata"]["name"] for k, objs in kube.store.all_objects().items() for o in objs
            if o.get("kind") == "Namespace"}


def pools(sandbox, spec: dict) -> list[str]:
    c = spec["cluster"]
    return [p["name"] for p in sandbox.gke.snapshot()["node_pools"]
            if p.get("project") == c["project"] and p.get("cluster") == c.get("name", "llm-fleet")]


def clusters(sandbox, spec: dict) -> list[str]:
    c = spec["cluster"]
    return [c.get("name", "llm-fleet")] if sandbox.gke.cluster(c.get("name", "llm-fleet"), c["location"], c["project"]) else []


@pytest.fixture
def two_specs():
    """Two models in one namespace of one cluster, sharing the HF Secret, the operator RBAC and the pool."""
    a = spec_dict("qwen2.5-7b-sglang.yaml", namespace="team-a", cache__enabled=True)
    b = spec_dict("qwen2.5-7b-sglang.yaml", name="qwen-b", namespace="team-a")
    b["cluster"] = dict(a["cluster"])
    return a, b


def _has_lock(sandbox, spec: dict) -> bool:
    """The model's lock exists: its Lease in its namespace (the model lock on GKE) or a Prefect limit."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from manifests import names
    from manifests.spec import parse_spec
    from sandbox.kube.resources import BY_KEY
    from tasks.locks import lock_name

    parsed = parse_spec(spec)
    c = parsed.cluster
    kube = sandbox.cluster_kube(c.name, None, c.project)
    if kube is not None and kube.store.get(BY_KEY[("coordination.k8s.io", "leases")], parsed.namespace,
                                           names.lock_lease(parsed)) is not None:
        return True
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(lock_name(parsed))
        except ObjectNotFound:
            return False
    return True


def test_teardown_leaves_nothing_of_the_spec_and_spares_the_other(sandbox, two_specs):
    from flows.deploy_model import deploy_model
    from flows.provision_cluster import provision_cluster
    from flows.teardown import teardown

    a, b = two_specs
    provision_cluster(spec=a)
    deploy_model(spec=b)
    deploy_model(spec=a)  # applied last: the shared ServiceAccount is labelled for `a`; the operator RBAC stays
    # labelled for `b`, which applied it first (flows never rewrite RBAC that already grants the same)
    before_b = {k: o["metadata"]["resourceVersion"] for k, o in inventory(sandbox, b).items() if "Pod/" not in k}
    mine = inventory(sandbox, a)
    kinds = {k.split("/")[0] for k in mine}
    assert {"Deployment", "Service", "PersistentVolumeClaim", "Pod", "PodMonitoring"} <= kinds

    assert _has_lock(sandbox, a)  # deploy_model's lock
    plan = teardown(spec=a, dry_run=True)
    assert inventory(sandbox, a).keys() == mine.keys(), "a dry run changed something"
    planned = {(r["kind"], r["name"]): r["action"] for r in plan["plan"]}
    assert planned[("Deployment", f"{a['name']}-blue")] == "delete"
    assert planned.get(("Secret", "hf-secret"), "hand over") == "hand over"  # qwen-b mounts it (its creator's label)
    assert planned[("ServiceAccount", "llm-fleet-operator")] == "hand over"
    for shared in [("Role", "llm-fleet-operator"), ("RoleBinding", "llm-fleet-operator"),
                   ("ClusterRole", "llm-fleet-operator-team-a"), ("ClusterRoleBinding", "llm-fleet-operator-team-a")]:
        assert planned[shared] == "keep", shared  # the admin's RBAC, shared: left as it is for the last model

    out = teardown(spec=a)
    assert inventory(sandbox, a) == {}, "objects labelled for the spec remain"
    assert not _has_lock(sandbox, a), "the torn-down model's lock was left behind"
    removed = {(r["kind"], r["name"]) for r in out["removed"]}
    assert ("PersistentVolumeClaim", f"{a['name']}-cache") in removed
    assert any(k == "Service" and n.endswith("-preview") for k, n in removed)
    # The other model: every object unchanged (same resourceVersion), the shared ones handed to it.
    after_b = inventory(sandbox, b)
    for key, rv in before_b.items():
        assert key in after_b and after_b[key]["metadata"]["resourceVersion"] == rv, key
    for shared in ["Secret/team-a/hf-secret", "Role/team-a/llm-fleet-operator",
                   "RoleBinding/team-a/llm-fleet-operator", "ServiceAccount/team-a/llm-fleet-operator",
                   "ClusterRole//llm-fleet-operator-team-a", "ClusterRoleBinding//llm-fleet-operator-team-a"]:
        assert shared in after_b, f"{shared} should stay, handed to the model that still uses it"
    assert "team-a" in namespaces(sandbox, a) and pools(sandbox, a) and clusters(sandbox, a)

    # Idempotent: a rerun finds nothing and still verifies.
    again = teardown(spec=a)
    assert again["removed"] == []

    # The last model with cluster: true takes the namespace, the pool and the cluster with it.
    teardown(spec=b, cluster=True)
    assert clusters(sandbox, b) == [] and pools(sandbox, b) == []
    assert sandbox.cluster_kube("llm-fleet", b["cluster"]["location"], b["cluster"]["project"]) is None
    teardown(spec=b, cluster=True)  # nothing left at all: still converges


def test_cluster_teardown_keeps_what_another_spec_uses(sandbox, two_specs):
    from flows.deploy_model import deploy_model
    from flows.provision_cluster import provision_cluster
    from flows.teardown import teardown

    a, b = two_specs
    a = {**a, "cache": {"enabled": True, "keep_on_teardown": True}}
    provision_cluster(spec=a)
    deploy_model(spec=a)
    deploy_model(spec=b)
    out = teardown(spec=a, cluster=True)
    kept = {(r["kind"], r["name"]): r["why"] for r in out["kept"]}
    assert "qwen-b" in kept[("NodePool", "gpu-pool")]
    assert "qwen-b" in kept[("Cluster", "llm-fleet")]
    assert ("PersistentVolumeClaim", f"{a['name']}-cache") in kept
    left = inventory(sandbox, a)
    # The admin's RBAC stays, as it is, with the model that still runs in the namespace (kept, not relabelled:
    # the operator may only get and delete it); teardown says so.
    shared_rbac = {"Role/team-a/llm-fleet-operator", "RoleBinding/team-a/llm-fleet-operator",
                   "ClusterRole//llm-fleet-operator-team-a", "ClusterRoleBinding//llm-fleet-operator-team-a"}
    assert set(left) == {f"PersistentVolumeClaim/team-a/{a['name']}-cache"} | shared_rbac
    assert all("qwen-b" in kept[(k.split("/")[0], k.split("/")[-1])] for k in shared_rbac)
    assert pools(sandbox, a) and clusters(sandbox, a)
    teardown(spec=b, cluster=True)
    assert clusters(sandbox, b) == []
