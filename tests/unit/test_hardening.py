"""Issue 13.7 (pure part): pod security contexts per engine, the optional NetworkPolicy, trust_remote_code."""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from manifests.render import render
from manifests.spec import SpecError, parse_spec

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.33.0"


def spec_of(filename: str, **changes):
    data = copy.deepcopy(yaml.safe_load((ROOT / "deployments" / filename).read_text()))
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for p in parents:
            if isinstance(node.get(p), str):  # shorthand, e.g. engine: sglang
                node[p] = {"kind" if p == "engine" else "id": node[p]}
            node = node.setdefault(p, {})
        node[leaf] = value
    return parse_spec(data)


def pod_and_container(objs):
    (dep,) = [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith(("-blue", "-green"))]
    pod = dep["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def validate_all(objs):
    for obj in objs:
        if not obj["apiVersion"].startswith(("monitoring.googleapis.com/", "monitoring.coreos.com/",
                                             "cloud.google.com/")):  # CRDs: no upstream schema offline
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_vllm_runs_as_non_root_on_a_read_only_root():
    objs = render(spec_of("gemma2-2b-it-vllm-l4.yaml"))
    validate_all(objs)
    pod, c = pod_and_container(objs)
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000 and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["fsGroup"] == 1000  # the cache PVC becomes writable for uid 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    # every path vLLM writes is a volume: /tmp (HOME), /dev/shm, the HF cache
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/tmp", "/dev/shm", "/data"} <= mounts
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["HOME"] == "/tmp" and env["USER"]


@pytest.mark.parametrize("filename", ["llama2-7b-tgi-nginx.yaml", "qwen2.5-7b-sglang.yaml",
                                      "paligemma2-tgi-autopilot.yaml"])
def test_root_images_keep_root_but_lose_every_capability(filename):
    objs = render(spec_of(filename))
    validate_all(objs)
    pod, c = pod_and_container(objs)
    sc = c["securityContext"]
    assert "runAsNonRoot" not in sc and "readOnlyRootFilesystem" not in sc
    assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}


def test_vllm_on_a_filestore_cache_stays_root():
    """NFS ignores fsGroup: uid 1000 could not write a ReadWriteMany cache."""
    _, c = pod_and_container(render(spec_of("gemma2-2b-it-vllm-l4.yaml", cache__access_mode="ReadWriteMany",
                                            cache__storage_class="standard-rwx")))
    assert "runAsNonRoot" not in c["securityContext"]


def test_no_network_policy_unless_asked():
    assert not [o for o in render(spec_of("gemma2-2b-it-vllm-l4.yaml")) if o["kind"] == "NetworkPolicy"]


def test_network_policy_nginx_admits_the_ingress_namespace_prometheus_and_the_api_proxy():
    spec = spec_of("llama2-7b-tgi-nginx.yaml", expose__network_policy=True, expose__allow_from_namespaces=["apps"])
    objs = render(spec)
    validate_all(objs)
    (np,) = [o for o in objs if o["kind"] == "NetworkPolicy"]
    assert np["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = np["spec"]["ingress"]
    peers = {p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for p in rule["from"]
             if "namespaceSelector" in p}
    assert peers == {"ingress-nginx", "gmp-system", "kube-system", "apps"}
    assert rule["ports"] == [{"protocol": "TCP", "port": spec.engine.container_port}]
    # it selects the model pods of both colors, nothing else
    (dep,) = [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith(("-blue", "-green"))]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels[k] == v for k, v in np["spec"]["podSelector"]["matchLabels"].items())
    assert "llm-fleet.dev/color" not in np["spec"]["podSelector"]["matchLabels"]


def test_network_policy_gce_admits_google_front_ends():
    objs = render(spec_of("mistral-7b-vllm-spot.yaml", expose__network_policy=True))
    validate_all(objs)
    (np,) = [o for o in objs if o["kind"] == "NetworkPolicy"]
    cidrs = {p["ipBlock"]["cidr"] for p in np["spec"]["ingress"][0]["from"] if "ipBlock" in p}
    assert cidrs == {"130.211.0.0/22", "35.191.0.0/16"}


def test_network_policy_with_a_bare_load_balancer_is_refused():
    with pytest.raises(SpecError) as err:
        spec_of("gemma2-2b-it-vllm-l4.yaml", expose__network_policy=True, expose__service_type="LoadBalancer")
    assert err.value.field == "expose.network_policy" and "expose.ingress" in err.value.fix


@pytest.mark.parametrize(("filename", "where"), [("mistral-7b-vllm-spot.yaml", "args"),
                                                ("qwen2.5-7b-sglang.yaml", "args"),
                                                ("llama2-7b-tgi-nginx.yaml", "env")])
def test_trust_remote_code_only_when_the_spec_says_so(filename, where):
    on = spec_of(filename, engine__trust_remote_code=True)
    off = spec_of(filename, engine__trust_remote_code=False)

    def flagged(spec) -> bool:
        _, c = pod_and_container(render(spec))
        if where == "args":
            return "--trust-remote-code" in c.get("args", [])
        return {e["name"]: e.get("value") for e in c["env"]}.get("TRUST_REMOTE_CODE") == "true"

    assert flagged(on) and not flagged(off)
    assert any("trust_remote_code" in w for w in on.warnings) and not off.warnings


def test_trust_remote_code_smuggled_in_extra_args_is_refused():
    with pytest.raises(SpecError) as err:
        spec_of("gemma2-2b-it-vllm-l4.yaml", engine__extra_args=["--trust-remote-code"])
    assert err.value.field == "engine.extra_args" and "engine.trust_remote_code: true" in err.value.fix


def test_warning_is_quiet_about_a_pinned_commit():
    spec = spec_of("mistral-7b-vllm-spot.yaml", model__revision="0" * 40)
    (warning,) = spec.warnings
    assert "pin" not in warning


def test_a_network_policy_spec_gets_a_cluster_that_enforces_it():
    from manifests.provision import cluster_body

    on = spec_of("llama2-7b-tgi-nginx.yaml", expose__network_policy=True)
    body = cluster_body(on, location=on.cluster.location, zones=[])
    assert body["network_config"] == {"datapath_provider": "ADVANCED_DATAPATH"}
    off = spec_of("llama2-7b-tgi-nginx.yaml")
    assert "network_config" not in cluster_body(off, location=off.cluster.location, zones=[])
    from google.cloud import container_v1

    container_v1.Cluster(body)  # a valid container v1 Cluster


def test_network_policy_admits_the_hold_proxy_from_the_models_own_namespace():
    """Held requests reach the model through the hold proxy in the model's namespace; a policy without that
    peer (before: only kube-system, gmp-system, the ingress) never lets a held request through after a wake."""
    from manifests import park as P

    spec = spec_of("llama2-7b-tgi-nginx.yaml", expose__network_policy=True)
    (np,) = [o for o in render(spec) if o["kind"] == "NetworkPolicy"]
    own = [p for p in np["spec"]["ingress"][0]["from"] if "podSelector" in p and "namespaceSelector" not in p]
    assert len(own) == 1  # a bare podSelector peer: pods of the policy's own namespace
    hold_labels = P.hold_proxy_deployment(spec, prefect_api_url=None)["spec"]["template"]["metadata"]["labels"]
    assert all(hold_labels[k] == v for k, v in own[0]["podSelector"]["matchLabels"].items())
    assert np["metadata"]["namespace"] == P.hold_proxy_deployment(spec, prefect_api_url=None)["metadata"]["namespace"]
