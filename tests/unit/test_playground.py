"""The playground's rendered objects and its engine calls (pure: no server, no cluster)."""

from __future__ import annotations

import json

from manifests import playground
from manifests.render import render
from manifests.spec import load_spec
from servers.playground import Config, error_of, no_chat_template, piece_of, upstream_request
from tests.flows.conftest import ROOT


def _spec(file: str, **expose):
    spec = load_spec(str(ROOT / "deployments" / file))
    return spec.model_copy(update={"expose": spec.expose.model_copy(update={"playground": True, **expose})})


def test_off_by_default_and_rendered_with_the_model_when_asked():
    plain = load_spec(str(ROOT / "deployments" / "gemma2-2b-it-vllm-l4.yaml"))
    assert not any("playground" in o["metadata"]["name"] for o in render(plain))
    kinds = [(o["kind"], o["metadata"]["name"]) for o in render(_spec("gemma2-2b-it-vllm-l4.yaml"))
             if "playground" in o["metadata"]["name"]]
    assert kinds == [("ServiceAccount", "llm-fleet-playground"), ("Role", "llm-fleet-playground"),
                     ("RoleBinding", "llm-fleet-playground"), ("Deployment", "gemma2-2b-it-playground"),
                     ("Service", "gemma2-2b-it-playground")]


def test_no_gpu_restricted_security_and_a_reader_role_the_operator_cannot_create_or_patch():
    spec = _spec("gemma2-2b-it-vllm-l4.yaml")
    dep = playground.deployment(spec)
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert "nvidia.com/gpu" not in json.dumps(c["resources"]) and "nodeSelector" not in pod and "tolerations" not in pod
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["seccompProfile"]
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "privileged": False,
                                    "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["LLM_NAME"] == spec.model.id and env["LLM_SERVICE"] == "gemma2-2b-it" and env["PLAYGROUND_BASE"] == "/"
    assert c["image"] == spec.hold.image  # the product's own image, as the hold proxy's
    assert pod["serviceAccountName"] == "llm-fleet-playground"
    role = playground.rbac(spec)[1]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["services"], "verbs": ["get"]},
                             {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]}]
    operator = next(o for o in render(spec) if o["kind"] == "Role" and o["metadata"]["name"] == "llm-fleet-operator")
    on_rbac = [r for r in operator["rules"] if r["apiGroups"] == ["rbac.authorization.k8s.io"]]
    assert not any({"create", "patch", "bind", "escalate"} & set(r["verbs"]) for r in on_rbac)
    # the operator reads them by name (to see they are current) and teardown deletes them
    assert any("llm-fleet-playground" in r.get("resourceNames", []) and {"get", "delete"} <= set(r["verbs"])
               for r in on_rbac)


def test_behind_an_ingress_the_page_is_a_path_of_the_model_ingress_and_the_network_policy_admits_it():
    spec = _spec("mistral-7b-vllm-spot.yaml", network_policy=True)
    objs = {(o["kind"], o["metadata"]["name"]): o for o in render(spec)}
    paths = objs[("Ingress", "mistral-7b")]["spec"]["rules"][0]["http"]["paths"]
    assert [p["path"] for p in paths] == ["/playground", "/"]
    assert paths[0]["backend"]["service"]["name"] == "mistral-7b-playground"
    env = {e["name"]: e["value"] for e in
           objs[("Deployment", "mistral-7b-playground")]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PLAYGROUND_BASE"] == "/playground"
    peers = objs[("NetworkPolicy", "mistral-7b-ingress")]["spec"]["ingress"][0]["from"]
    assert {"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "mistral-7b",
                                            "app.kubernetes.io/component": "playground"}}} in peers


def test_a_vlm_on_tgi_is_asked_through_generate_stream_with_the_image_inline():
    spec = _spec("paligemma2-tgi-autopilot.yaml")
    env = {e["name"]: e["value"] for e in playground.deployment(spec)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LLM_API"] == "generate" and env["LLM_VISION"] == "1"
    cfg = Config.from_env(env)
    path, body = upstream_request(cfg, {"messages": [{"role": "user", "content": "caption en"}], "max_tokens": 20,
                                        "image": "data:image/png;base64,AAAA"}, "generate")
    assert path == "/generate_stream"
    assert body["inputs"] == "![](data:image/png;base64,AAAA)caption en\n"
    assert body["parameters"]["max_new_tokens"] == 20


def test_engine_calls_and_stream_pieces_per_api():
    cfg = Config.from_env({"LLM_SERVICE": "gemma2", "GEMMA2_SERVICE_HOST": "127.0.0.1", "GEMMA2_SERVICE_PORT": "9",
                           "LLM_NAME": "google/gemma-2-2b-it"})
    assert cfg.upstream == "http://127.0.0.1:9"  # Kubernetes' service links win over the DNS name
    turn = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}], "temperature": 0.5}
    path, body = upstream_request(cfg, turn, "chat")
    assert path == "/v1/chat/completions" and body["stream"] is True and body["model"] == "google/gemma-2-2b-it"
    assert body["messages"] == [{"role": "user", "content": "Hi"}] and body["temperature"] == 0.5
    assert upstream_request(cfg, turn, "completions")[1]["prompt"] == "Hi"
    assert piece_of("chat", json.dumps({"choices": [{"delta": {"content": "Hel"}}]})) == "Hel"
    assert piece_of("chat", json.dumps({"choices": [{"delta": {"role": "assistant"}}]})) is None
    assert piece_of("completions", json.dumps({"choices": [{"text": "lo"}]})) == "lo"
    assert piece_of("generate", json.dumps({"token": {"text": "<eos>", "special": True}})) is None
    assert piece_of("generate", json.dumps({"token": {"text": "a"}})) == "a"
    assert piece_of("chat", "[DONE]") is None
    assert no_chat_template(400, "As of transformers v4.44, default chat template is no longer allowed")
    assert no_chat_template(422, "Template error: template not found")
    assert not no_chat_template(500, "template")


def test_an_error_in_the_stream_is_an_error_not_a_piece():
    """The hold proxy's ``event: error``, vLLM's error chunk and TGI's are the page's ``error``; a piece is not."""
    held = json.dumps({"error": {"message": "m is waking up: not answering after 120 s", "code": 503}})
    assert error_of("error", held) == {"status": 503, "message": "m is waking up: not answering after 120 s"}
    assert error_of(None, json.dumps({"error": {"message": "bad", "code": 400}})) == {"status": 400, "message": "bad"}
    assert error_of(None, json.dumps({"error": "Input validation error", "error_type": "validation"})) == \
        {"status": 502, "message": "Input validation error"}
    assert error_of("error", "not json") == {"status": 502, "message": "not json"}
    assert error_of(None, json.dumps({"choices": [{"delta": {"content": "Hel"}}]})) is None
    assert error_of(None, "[DONE]") is None


def test_teardown_keeps_the_shared_reader_account_for_a_model_whose_playground_still_uses_it():
    from targets.gke.teardown_steps import plan_namespace

    spec = _spec("gemma2-2b-it-vllm-l4.yaml")
    other = _spec("gemma2-2b-it-vllm-l4.yaml").model_copy(update={"name": "other"})
    mine = [o for o in render(spec) if o["metadata"].get("namespace")]
    others = [o for o in render(other) if o["kind"] == "Deployment"]
    actions = {(o["kind"], o["metadata"]["name"]): item.action for o, item in plan_namespace(spec, mine=mine,
                                                                                            others=others)}
    # the account is relabelled to the model still using it; its RBAC (a cluster admin's) stays as it is
    assert actions[("ServiceAccount", "llm-fleet-playground")] == "hand over"
    for kind in ("Role", "RoleBinding"):
        assert actions[(kind, "llm-fleet-playground")] == "keep"
    assert actions[("Deployment", "gemma2-2b-it-playground")] == "delete"
    alone = {(o["kind"], o["metadata"]["name"]): item.action for o, item in plan_namespace(spec, mine=mine, others=[])}
    assert alone[("Role", "llm-fleet-playground")] == "delete"


def test_a_serving_model_gets_its_playground_in_place_but_never_a_model_deployment():
    from targets.gke.serving import in_place_objects

    names_ = [(o["kind"], o["metadata"]["name"]) for o in in_place_objects(_spec("gemma2-2b-it-vllm-l4.yaml"),
                                                                          live="blue", revision="a" * 40)]
    assert ("Deployment", "gemma2-2b-it-playground") in names_
    assert not {("Deployment", "gemma2-2b-it-blue"), ("Deployment", "gemma2-2b-it-green")} & set(names_)
    assert ("Service", "gemma2-2b-it-preview") not in names_
