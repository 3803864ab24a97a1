"""The Inference Gateway objects a spec renders: valid against the vendored upstream CRD schemas, routed by
the model field, one pool per color, and a preflight that names each missing piece with its fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from manifests import gateway, yamlio
from manifests.spec import SpecError, parse_spec
from sandbox.kube.crds import apply_defaults, validate_object

ADDONS = Path(__file__).resolve().parents[2] / "sandbox" / "addons"
SPEC = {"name": "mistral", "model": "mistralai/Mistral-7B-Instruct-v0.3", "engine": "vllm",
        "cluster": {"project": "llm-fleet-demo", "location": "us-central1", "name": "llm"},
        "accelerator": "nvidia-l4", "expose": {"gateway": {"class": "gke-l7-regional-external-managed"}},
        "release": {"strategy": "canary"}}


def _schemas() -> dict[tuple[str, str], dict]:
    out = {}
    for f in ("gateway-api-crds.yaml", "inference-extension-crds.yaml"):
        for doc in yamlio.load_all((ADDONS / f).read_text()):
            if doc:
                for v in doc["spec"]["versions"]:
                    if v.get("served"):
                        out[(f"{doc['spec']['group']}/{v['name']}", doc["spec"]["names"]["kind"])] = \
                            v["schema"]["openAPIV3Schema"]
    return out


def test_rendered_gateway_objects_validate_against_the_upstream_crds():
    spec = parse_spec(SPEC)
    schemas = _schemas()
    custom = [o for o in gateway.objects(spec, "blue") if (o["apiVersion"], o["kind"]) in schemas]
    assert sorted(o["kind"] for o in custom) == ["Gateway", "HTTPRoute", "InferenceObjective", "InferenceObjective",
                                                 "InferencePool", "InferencePool"]
    for obj in custom:
        schema = schemas[(obj["apiVersion"], obj["kind"])]
        assert validate_object(schema, apply_defaults(schema, yaml.safe_load(yaml.safe_dump(obj)))) == [], obj["kind"]


def test_a_parked_models_route_goes_to_its_live_service_valid_and_back_exactly():
    """park: the route's one backend is the live Service (the hold proxy's while parked) with its port and a
    timeout long enough to hold and then generate; wake: the pools and weights exactly as before. Both
    forms validate against the vendored HTTPRoute schema."""
    spec = parse_spec(SPEC)
    schema = _schemas()[("gateway.networking.k8s.io/v1", "HTTPRoute")]
    route = gateway.http_route(spec, gateway.weights("green", 0))
    assert not gateway.is_held(route, spec)
    held = gateway.with_backends(route, spec, gateway.held_backends(spec), held=True)
    rule = held["spec"]["rules"][0]
    assert rule["backendRefs"] == [{"group": "", "kind": "Service", "name": "mistral", "port": spec.expose.port,
                                    "weight": 1}]
    assert rule["timeouts"]["request"] == f"{int(spec.hold.timeout.total_seconds()) + 300}s"
    assert rule["matches"] == route["spec"]["rules"][0]["matches"] and gateway.is_held(held, spec)
    back = gateway.with_backends(held, spec, route["spec"]["rules"][0]["backendRefs"], held=False)
    assert back == route
    for obj in (held, back):
        assert validate_object(schema, apply_defaults(schema, yaml.safe_load(yaml.safe_dump(obj)))) == []


def test_the_schema_check_catches_a_broken_object():
    schema = _schemas()[("inference.networking.k8s.io/v1", "InferencePool")]
    pool = gateway.inference_pool(parse_spec(SPEC), "blue")
    del pool["spec"]["endpointPickerRef"]
    pool["spec"]["targetPorts"] = [{"number": "8000"}]
    problems = validate_object(schema, pool)
    assert any("endpointPickerRef" in m for _, m in problems)
    assert any(f == "spec.targetPorts[0].number" for f, _ in problems)


def test_route_matches_the_model_field_and_weights_follow_the_live_color():
    spec = parse_spec(SPEC)
    route = gateway.http_route(spec, gateway.weights("blue", 25))
    rule = route["spec"]["rules"][0]
    assert rule["matches"][0]["headers"] == [{"type": "Exact", "name": "X-Gateway-Model-Name",
                                              "value": "mistralai/Mistral-7B-Instruct-v0.3"}]
    assert {b["name"]: b["weight"] for b in rule["backendRefs"]} == {"mistral-blue": 75, "mistral-green": 25}
    pools = {o["metadata"]["name"]: o for o in gateway.objects(spec) if o["kind"] == "InferencePool"}
    assert pools["mistral-green"]["spec"]["selector"]["matchLabels"]["llm-fleet.dev/color"] == "green"


def test_two_specs_share_an_existing_gateway():
    a = parse_spec(SPEC | {"expose": {"gateway": {"existing": "shared"}}})
    b = parse_spec(SPEC | {"name": "qwen", "model": "Qwen/Qwen2.5-7B-Instruct",
                               "expose": {"gateway": {"existing": "shared"}}})
    assert not [o for o in gateway.objects(a) + gateway.objects(b) if o["kind"] == "Gateway"]
    routes = [o for o in gateway.objects(a) + gateway.objects(b) if o["kind"] == "HTTPRoute"]
    assert {r["spec"]["parentRefs"][0]["name"] for r in routes} == {"shared"}
    assert len({r["spec"]["rules"][0]["matches"][0]["headers"][0]["value"] for r in routes}) == 2


def test_preflight_names_each_missing_piece_with_its_fix():
    spec = parse_spec(SPEC)
    problems = gateway.preflight_problems(spec, crds={"gateways.gateway.networking.k8s.io",
                                                      "httproutes.gateway.networking.k8s.io"},
                                          proxy_only_subnets=set())
    assert len(problems) == 3
    assert any("inferencepools" in p and "kubectl apply" in p for p in problems)
    assert any("proxy-only subnet in us-central1" in p and "--purpose=REGIONAL_MANAGED_PROXY" in p for p in problems)
    assert gateway.preflight_problems(spec, crds=set(gateway.REQUIRED_CRDS), proxy_only_subnets={"us-central1"}) == []
    with pytest.raises(gateway.GatewayPreflightError, match="--gateway-api=standard"):
        gateway.check_preflight(spec, crds=set(), proxy_only_subnets=None)


def test_canary_needs_a_gateway_and_steps_that_end_at_100():
    with pytest.raises(SpecError, match="release.strategy"):
        parse_spec(SPEC | {"expose": {}})
    with pytest.raises(SpecError, match="release.steps"):
        parse_spec(SPEC | {"release": {"strategy": "canary", "steps": [{"weight": 50}, {"weight": 25}]}})


def test_the_pickers_role_is_a_grant_the_admin_applies_with_the_operators_rbac():
    from manifests.render import operator_rbac

    spec = parse_spec(SPEC)
    admin = {(o["kind"], o["metadata"]["name"]) for o in operator_rbac(spec)}
    assert {("Role", "mistral-blue-epp"), ("RoleBinding", "mistral-green-epp")} <= admin
    rules = next(o for o in operator_rbac(spec) if o["kind"] == "Role" and o["metadata"]["name"] ==
                 "llm-fleet-operator")["rules"]
    assert any(r["apiGroups"] == ["gateway.networking.k8s.io"] and "update" in r["verbs"] for r in rules)
    assert not any("create" in r["verbs"] for r in rules if r["apiGroups"] == ["rbac.authorization.k8s.io"])
