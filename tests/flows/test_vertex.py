"""The Vertex AI target (seed 002) end to end on the sandbox: real aiplatform clients, real Prefect server."""

from __future__ import annotations

import threading

import pytest

from tests.flows.conftest import spec_dict

pytestmark = pytest.mark.usefixtures("prefect_server")
REGION = "us-central1"


def _run(name: str, spec: dict, **kw):
    """The main flows, which hand target: vertex specs to targets/vertex/ (through targets.target_for)."""
    if name == "deploy":
        from flows.deploy_model import deploy_model as fn
    elif name == "release":
        from flows.release_model import release_model as fn
    elif name == "park":
        from flows.park import park_model as fn
    elif name == "wake":
        from flows.park import wake_model as fn
    else:
        from flows.teardown import teardown as fn
    return fn(spec, **kw)


def _endpoints(sandbox, project: str) -> list[dict]:
    prefix = f"projects/{project}/locations/{REGION}/endpoints/"
    return [dict(e, name=n) for n, e in sandbox.vertex.snapshot()["endpoints"].items() if n.startswith(prefix)]


def _models(sandbox, project: str) -> list[str]:
    return [m for m in sandbox.vertex.snapshot()["models"] if m.startswith(f"projects/{project}/")]


def _seed_predict(sandbox, endpoint: str, project: str):
    """The seed's own high-level call, through the sandbox."""
    from google.cloud import aiplatform

    from tasks.clients import gcp_credentials

    # the credentials the sandbox's env file gives every client (what the product uses too)
    aiplatform.init(project=project, location=REGION, api_endpoint=sandbox.vertex.url, api_transport="rest",
                    credentials=gcp_credentials())
    return aiplatform.Endpoint(endpoint).predict(instances=[{"prompt": "What is Vertex AI?", "max_tokens": 16}])


def _deploy(sandbox):
    # fewer analysis requests than the default 20: the same code path, a shorter test
    spec = spec_dict("gemma-vertex.yaml", release__post_promotion={"requests": 5})
    return spec, _run("deploy", spec)


def _load(endpoint: str, stop: threading.Event, counts: dict) -> None:
    from tasks import vertex as tv

    while not stop.is_set():
        try:
            tv.predict_once(endpoint=endpoint, instances=[{"prompt": "Hi", "max_tokens": 2, "raw_response": True}])
            counts["ok"] += 1
        except Exception as exc:  # noqa: BLE001
            counts["failed"] += 1
            counts["last"] = repr(exc)


def test_deploy_answers_the_seeds_endpoint_predict_then_park_wake_teardown(sandbox, sbc):
    # two 503s on DeployModel: retried by the task (google_retry), deployed once
    rule = sbc.add_fault(service="vertex", method="POST", path=r":deployModel$", status=503, count=2)
    spec, out = _deploy(sandbox)
    assert next(f for f in sbc.faults() if f["id"] == rule["id"])["hits"] == 2
    project = spec["cluster"]["project"]
    [ep] = _endpoints(sandbox, project)
    assert ep["displayName"] == "gemma-endpoint" and ep["labels"]["llm-fleet-spec"] == "gemma-vertex"
    assert ep["trafficSplit"] == {out["deployed_model_id"]: 100} and ep["deployedModels"] == [out["deployed_model_id"]]
    got = _seed_predict(sandbox, out["endpoint"], project)
    assert got.deployed_model_id == out["deployed_model_id"]
    assert "Vertex AI" in got.predictions[0]
    assert {r["via"] for r in out["smoke"]} == {"predict", "rawPredict"}
    # rerun: nothing new uploaded or deployed
    again = _run("deploy", spec)
    assert again["deployed_model_id"] == out["deployed_model_id"] and len(_models(sandbox, project)) == 1

    # park: no deployed model, no replica (nothing billed); endpoint and model kept
    _run("park", spec)
    [ep] = _endpoints(sandbox, project)
    assert ep["deployedModels"] == [] and ep["trafficSplit"] == {}
    assert not [k for k in sandbox.vertex.snapshot()["replicas"] if k.startswith(out["endpoint"])]
    assert len(_models(sandbox, project)) == 1
    woke = _run("wake", spec)
    assert _seed_predict(sandbox, out["endpoint"], project).deployed_model_id == woke["deployed_model_id"]

    _run("teardown", spec)
    assert _endpoints(sandbox, project) == [] and _models(sandbox, project) == []
    assert not [k for k in sandbox.vertex.snapshot()["replicas"] if k.startswith(f"projects/{project}/")]


def test_bad_models_roll_back_with_the_split_unchanged_then_a_release_loses_no_request(sandbox, sbc):
    from manifests.vertex import REVISION_LABEL

    spec, out = _deploy(sandbox)
    project = spec["cluster"]["project"]
    for mode in ("http_500", "wrong_answers"):
        bad = sandbox.hub.push_revision(spec["model"]["id"])
        sbc.add_behavior(mode=mode, labels={REVISION_LABEL: bad})
        with pytest.raises(Exception, match="analysis failed|smoke prompt"):
            _run("release", spec, revision=bad)
        [ep] = _endpoints(sandbox, project)
        assert ep["trafficSplit"] == {out["deployed_model_id"]: 100}, mode
        assert ep["deployedModels"] == [out["deployed_model_id"]], mode
        assert _seed_predict(sandbox, out["endpoint"], project).deployed_model_id == out["deployed_model_id"]

    good = sandbox.hub.push_revision(spec["model"]["id"])
    stop, counts = threading.Event(), {"ok": 0, "failed": 0}
    load = threading.Thread(target=_load, args=(out["endpoint"], stop, counts), daemon=True)
    load.start()
    try:
        res = _run("release", spec, revision=good)
    finally:
        stop.set()
        load.join(10)
    assert res["released"] and counts["failed"] == 0 and counts["ok"] > 0, counts
    [ep] = _endpoints(sandbox, project)
    assert ep["trafficSplit"] == {res["deployed_model_id"]: 100}
    assert ep["deployedModels"] == [res["deployed_model_id"]]  # the old one undeployed after the delay

    # rollback_model: a release of the replaced revision, whose Model was kept
    from flows.release_model import rollback_model

    back = rollback_model(spec)
    [ep] = _endpoints(sandbox, project)
    assert back["released"] and back["revision"] == out["revision"]
    assert ep["trafficSplit"] == {back["deployed_model_id"]: 100} and ep["deployedModels"] == [back["deployed_model_id"]]


@pytest.mark.parametrize(("case", "match"), [
    ("quota", "custom_model_serving_nvidia_l4_gpus in us-central1"),
    ("gated", "no access to the gated model"),
    ("token", "token is invalid"),
])
def test_preflight_failures_create_nothing(sandbox, sbc, monkeypatch, case, match):
    spec = spec_dict("gemma-vertex.yaml")
    project = spec["cluster"]["project"]
    if case == "quota":
        sbc.set_vertex_quota(REGION, "NVIDIA_L4", 0, project=project)
    else:
        monkeypatch.setenv("HF_TOKEN", "hf_sandbox_nogate" if case == "gated" else "hf_not_a_token")
        spec["secret"] = {"prefect_block": None}
        from tasks.settings import reload_settings

        reload_settings()
    try:
        with pytest.raises(Exception, match=match):
            _run("deploy", spec)
    finally:
        monkeypatch.undo()
        from tasks.settings import reload_settings

        reload_settings()
    assert _endpoints(sandbox, project) == [] and _models(sandbox, project) == []
