"""deploy_fleet against the sandbox: models roll out side by side, sharing a cluster; one failure stays one row."""

from __future__ import annotations

import pytest

from tests.flows.conftest import spec_dict

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.timeout(300)]


def _serves(spec: dict) -> str | None:
    """The model the spec's Service answers with (through the API server's service proxy)."""
    from tasks.clients import kube_client, kube_http
    from tasks.gke import get_credentials

    c = spec["cluster"]
    kc = get_credentials.fn(project=c["project"], location=c["location"], name=c.get("name", "llm-fleet"))
    ns = spec.get("namespace", "default")
    resp = kube_http(kube_client(kc)).get(f"/api/v1/namespaces/{ns}/services/{spec['name']}:http/proxy/v1/models")
    return resp.json()["data"][0]["id"] if resp.status_code == 200 else None


def test_fleet_shares_a_cluster_and_survives_one_failure(sandbox, tmp_path):
    import yaml
    from prefect.artifacts import Artifact

    from flows.deploy_fleet import deploy_fleet

    a = spec_dict("qwen2.5-7b-sglang.yaml", name="fleet-a")
    b = spec_dict("qwen2.5-7b-sglang.yaml", name="fleet-b")
    b["cluster"] = dict(a["cluster"])  # same cluster, same pool
    c = spec_dict("gemma2-2b-it-vllm-l4.yaml", name="fleet-c")
    broken = spec_dict("qwen2.5-7b-sglang.yaml", name="fleet-broken")
    broken["cluster"] = dict(a["cluster"])
    broken["model"] = {"id": "Qwen/Qwen2.5-7B-Instruct", "revision": "no-such-branch"}
    files = []
    for s in (a, b, c, broken):
        path = tmp_path / f"{s['name']}.yaml"
        path.write_text(yaml.safe_dump(s))
        files.append(path.name)
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"specs": files}))

    plan = deploy_fleet(fleet=str(fleet), dry_run=True)
    assert [m["model"] for m in plan["models"]] == ["fleet-a", "fleet-b", "fleet-c", "fleet-broken"]

    state = deploy_fleet(fleet=str(fleet), return_state=True)
    assert state.is_failed() and "fleet-broken" in state.message and "1 of 4" in state.message
    assert _serves(a) == _serves(b) == "Qwen/Qwen2.5-7B-Instruct"
    assert _serves(c) == "google/gemma-2-2b-it"
    assert _serves(broken) is None
    # a and b share one cluster (one provision): two GKE clusters for four models in two projects.
    assert len({(s["cluster"]["project"], s["cluster"].get("name", "llm-fleet")) for s in (a, b, c, broken)}) == 2
    assert sandbox.gke.cluster("llm-fleet", a["cluster"]["location"], a["cluster"]["project"]) is not None
    rows = {r["model"]: r for r in yaml.safe_load(Artifact.get("deploy-fleet").data)}
    assert {m: r["status"] for m, r in rows.items()} == {"fleet-a": "deployed", "fleet-b": "deployed",
                                                          "fleet-c": "deployed", "fleet-broken": "failed"}
    assert "no-such-branch" in rows["fleet-broken"]["cause"]
