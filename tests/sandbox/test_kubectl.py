"""Real kubectl against the sandbox API server: get, describe, apply, wait, scale, logs, delete."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import yaml

from sandbox.core import Clock, Faults
from sandbox.kube import KubeCluster
from tests.sandbox.kube_support import StubRuntime, kubeconfig_entry

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")

SCALE = 0.002

MANIFEST = """\
apiVersion: v1
kind: Namespace
metadata:
  name: demo
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: demo
  labels: {app: web}
spec:
  replicas: 1
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: vllm
        image: vllm/vllm-openai:v0.6.3
        args: ["--model=facebook/opt-125m"]
        ports: [{name: http, containerPort: 8000}]
        env: [{name: LEVEL, value: "1"}, {name: OTHER, value: "x"}]
        resources: {limits: {nvidia.com/gpu: "1"}}
      tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
"""


@pytest.fixture(scope="module")
def kube():
    clock = Clock(SCALE)
    k = KubeCluster(clock=clock, faults=Faults(), runtime=StubRuntime(clock))
    k.start()
    k.add_node("gpu-node-1", labels={"cloud.google.com/gke-accelerator": "nvidia-l4"},
               capacity={"nvidia.com/gpu": "4"}, taints=[{"key": "nvidia.com/gpu", "value": "present",
                                                          "effect": "NoSchedule"}])
    k.add_node("cpu-node-1", capacity={"cpu": "8", "memory": "32Gi"})
    yield k
    k.stop()


@pytest.fixture(scope="module")
def kubectl(kube, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    config = home / "kubeconfig"
    config.write_text(yaml.safe_dump(kubeconfig_entry(kube)))  # https + the cluster's CA + a token
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "KUBECONFIG": str(config)}

    def run(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["kubectl", f"--cache-dir={home / 'cache'}", *args], input=stdin, text=True,
                              capture_output=True, env=env, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run


def test_version_and_get_nodes(kubectl):
    version = json.loads(kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["minor"] == "30"
    out = kubectl("get", "nodes").stdout
    assert out.split("\n")[0].split() == ["NAME", "STATUS", "ROLES", "AGE", "VERSION"]
    assert "gpu-node-1" in out and "cpu-node-1" in out and " Ready " in out
    wide = kubectl("get", "nodes", "-o", "wide").stdout
    assert "INTERNAL-IP" in wide and "10.128." in wide
    labels = kubectl("get", "node", "gpu-node-1", "-o",
                     "jsonpath={.metadata.labels.cloud\\.google\\.com/gke-accelerator}").stdout
    assert labels == "nvidia-l4"


def test_apply_wait_describe_scale_logs_delete(kubectl, kube):
    out = kubectl("apply", "-f", "-", stdin=MANIFEST).stdout
    assert "namespace/demo created" in out and "deployment.apps/web created" in out and "service/web created" in out
    out = kubectl("wait", "--for=condition=Available", "deploy/web", "-n", "demo", "--timeout=30s").stdout
    assert "condition met" in out
    assert kubectl("get", "deploy", "web", "-n", "demo", "-o", "jsonpath={.status.readyReplicas}").stdout == "1"

    # re-apply with one env value changed: a strategic merge patch with $setElementOrder
    out = kubectl("apply", "-f", "-", stdin=MANIFEST.replace('value: "1"', 'value: "2"')).stdout
    assert "deployment.apps/web configured" in out and "service/web unchanged" in out
    env = kubectl("get", "deploy", "web", "-n", "demo", "-o",
                  "jsonpath={.spec.template.spec.containers[0].env[*].value}").stdout
    assert env == "2 x"
    assert "successfully rolled out" in kubectl("rollout", "status", "deploy/web", "-n", "demo",
                                                "--timeout=30s").stdout

    described = kubectl("describe", "deployment", "web", "-n", "demo").stdout
    for text in ("Replicas:               1 desired | 1 updated | 1 total | 1 available | 0 unavailable",
                 "StrategyType:           RollingUpdate", "RollingUpdateStrategy:  25% max unavailable, 25% max surge",
                 "Available      True    MinimumReplicasAvailable", "NewReplicaSet:", "ScalingReplicaSet",
                 "nvidia.com/gpu:  1"):
        assert text in described, described

    assert "deployment.apps/web scaled" in kubectl("scale", "deploy/web", "-n", "demo", "--replicas=2").stdout
    kubectl("wait", "--for=jsonpath={.status.readyReplicas}=2", "deploy/web", "-n", "demo", "--timeout=30s")
    table = kubectl("get", "pods", "-n", "demo", "-l", "app=web").stdout.splitlines()
    assert table[0].split() == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert len(table) == 3 and all("1/1" in row and "Running" in row for row in table[1:])
    assert len(kube.service_backends("demo", "web")) == 2

    logs = kubectl("logs", "deploy/web", "-n", "demo").stdout
    assert "Application startup complete." in logs
    pod = kubectl("get", "pods", "-n", "demo", "-o", "jsonpath={.items[0].metadata.name}").stdout
    assert "Scheduled" in kubectl("describe", "pod", pod, "-n", "demo").stdout
    assert kubectl("logs", pod, "-n", "demo", "--tail=1").stdout == "INFO Application startup complete.\n"

    out = kubectl("delete", "-f", "-", stdin=MANIFEST).stdout
    assert 'namespace "demo" deleted' in out
    gone = kubectl("get", "ns", "demo", check=False)
    assert gone.returncode == 1 and 'namespaces "demo" not found' in gone.stderr
    assert not [p for p in kube.snapshot()["pods"] if p["namespace"] == "demo"]


def test_server_side_apply_and_errors(kubectl):
    cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg, namespace: default}\ndata: {a: '1'}\n"
    assert "configmap/cfg serverside-applied" in kubectl("apply", "--server-side", "-f", "-", stdin=cm).stdout
    assert "serverside-applied" in kubectl("apply", "--server-side", "-f", "-",
                                           stdin=cm.replace("'1'", "'2'")).stdout
    assert kubectl("get", "cm", "cfg", "-o", "jsonpath={.data.a}").stdout == "2"
    missing = kubectl("get", "deploy", "nope", check=False)
    assert missing.returncode == 1
    assert 'Error from server (NotFound): deployments.apps "nope" not found' in missing.stderr
    bad = kubectl("create", "configmap", "Bad_Name", check=False)
    assert bad.returncode == 1 and "is invalid" in bad.stderr
    assert 'configmap "cfg" deleted' in kubectl("delete", "cm", "cfg").stdout


def test_get_all_namespaces_and_events(kubectl):
    kubectl("create", "namespace", "other")
    kubectl("create", "deployment", "plain", "--image=vllm/vllm-openai:v0.6.3", "-n", "other")
    kubectl("wait", "--for=condition=Available", "deploy/plain", "-n", "other", "--timeout=30s")
    out = kubectl("get", "pods", "-A").stdout
    assert out.split("\n")[0].split()[:2] == ["NAMESPACE", "NAME"] and "other" in out
    events = kubectl("get", "events", "-n", "other").stdout
    assert "LAST SEEN" in events and "ScalingReplicaSet" in events
    assert "deployment.apps/plain" in kubectl("get", "all", "-n", "other").stdout


def test_create_token_defaults_to_one_hour(kubectl):
    """``kubectl create token SA`` without ``--duration`` sends ``expirationSeconds: null``; the API server
    defaults it to 3600 s (TokenRequestSpec defaulting), and refuses below 10 minutes."""
    kubectl("create", "serviceaccount", "reader", "-n", "default")
    made = json.loads(kubectl("create", "token", "reader", "-n", "default", "-o", "json").stdout)
    assert made["spec"]["expirationSeconds"] == 3600 and made["status"]["token"].count(".") == 2
    short = kubectl("create", "token", "reader", "-n", "default", "--duration=5m", check=False)
    assert short.returncode == 1 and "may not specify a duration less than 10 minutes" in short.stderr


def test_get_columns_as_the_api_server_prints_them(kubectl, kube):
    """Server-side tables (printers.go): HPA TARGETS from status.currentMetrics, StorageClass / APIService /
    EndpointSlice columns, and an Ingress classed only by annotation has CLASS <none>."""
    from sandbox.kube import addons

    kubectl("create", "namespace", "cols")
    kubectl("create", "deployment", "hpa-web", "--image=vllm/vllm-openai:v0.6.3", "-n", "cols")
    kubectl("set", "resources", "deploy/hpa-web", "-n", "cols", "--requests=cpu=500m")
    kubectl("expose", "deployment", "hpa-web", "-n", "cols", "--port=80", "--target-port=8000")
    kubectl("apply", "-f", "-", stdin=(
        "apiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata: {name: hpa-web, namespace: cols}\n"
        "spec:\n  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: hpa-web}\n  minReplicas: 1\n"
        "  maxReplicas: 3\n  metrics: [{type: Resource, resource: {name: cpu, target: {type: Utilization, "
        "averageUtilization: 60}}}]\n"))
    kubectl("wait", "--for=jsonpath={.status.currentMetrics[0].resource.current.averageUtilization}",
            "hpa/hpa-web", "-n", "cols", "--timeout=30s")
    util = kubectl("get", "hpa", "hpa-web", "-n", "cols", "-o",
                   "jsonpath={.status.currentMetrics[0].resource.current.averageUtilization}").stdout
    row = kubectl("get", "hpa", "hpa-web", "-n", "cols").stdout.splitlines()
    assert row[0].split() == ["NAME", "REFERENCE", "TARGETS", "MINPODS", "MAXPODS", "REPLICAS", "AGE"]
    assert row[1].split()[:5] == ["hpa-web", "Deployment/hpa-web", f"{util}%/60%", "1", "3"]

    sc = kubectl("get", "sc").stdout.splitlines()
    assert sc[0].split() == ["NAME", "PROVISIONER", "RECLAIMPOLICY", "VOLUMEBINDINGMODE", "ALLOWVOLUMEEXPANSION",
                             "AGE"]
    assert any(r.split()[:5] == ["standard-rwo", "(default)", "pd.csi.storage.gke.io", "Delete",
                                 "WaitForFirstConsumer"] for r in sc[1:]), sc

    addons.install_custom_metrics_adapter(kube)
    api = kubectl("get", "apiservice", "v1beta1.custom.metrics.k8s.io").stdout.splitlines()
    assert api[0].split() == ["NAME", "SERVICE", "AVAILABLE", "AGE"]
    assert api[1].split()[:3] == ["v1beta1.custom.metrics.k8s.io", "custom-metrics/custom-metrics-stackdriver-adapter",
                                  "True"]

    kubectl("wait", "--for=condition=Available", "deploy/hpa-web", "-n", "cols", "--timeout=30s")
    slices = kubectl("get", "endpointslices", "-n", "cols").stdout.splitlines()
    assert slices[0].split() == ["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"]
    ip = kubectl("get", "pods", "-n", "cols", "-o", "jsonpath={.items[0].status.podIP}").stdout
    assert slices[1].split()[1:4] == ["IPv4", "8000", ip], slices

    ing = ("apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata:\n  name: by-annotation\n  namespace: cols\n"
           "  annotations: {kubernetes.io/ingress.class: gce}\nspec:\n  defaultBackend:\n"
           "    service: {name: hpa-web, port: {number: 80}}\n")
    kubectl("apply", "-f", "-", stdin=ing)
    rows = kubectl("get", "ingress", "-n", "cols").stdout.splitlines()
    assert rows[0].split()[:2] == ["NAME", "CLASS"] and rows[1].split()[:2] == ["by-annotation", "<none>"]


def _versioned_kubectl(minor: int) -> str | None:
    """gcloud's kubectl for one minor (kubectl.1.NN beside its dispatcher), if installed."""
    from pathlib import Path

    found = Path(shutil.which("kubectl") or "kubectl").resolve().parent / f"kubectl.1.{minor}"
    return str(found) if found.exists() else None


def test_kubectl_132_plus_protobuf_creates_are_read_as_kube_apiserver_reads_them(kube, tmp_path):
    """kubectl 1.32+ sends protobuf bodies on typed creates (the dispatcher's kubectl.1.33 on a 1.33 cluster):
    the tutorials' `kubectl create namespace|secret|serviceaccount|configmap|token` and `auth can-i` work and
    store what the JSON bodies of kubectl 1.31 store; a kind the sandbox does not decode is one 415 naming the
    kinds it reads, never half-read. (Before: every protobuf body got 415, the access review 400.)"""
    old, new = _versioned_kubectl(31), _versioned_kubectl(33)
    if not (old and new):
        pytest.skip("gcloud's kubectl.1.31 and kubectl.1.33 are needed")
    config = tmp_path / "kubeconfig"
    config.write_text(yaml.safe_dump(kubeconfig_entry(kube)))
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "KUBECONFIG": str(config)}

    def run(binary: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([binary, f"--cache-dir={tmp_path / 'cache'}", *args], text=True, capture_output=True,
                              env=env, timeout=60)
        assert (done.returncode == 0) == ok, (args, done.stdout, done.stderr)
        return done

    for binary, ns in ((old, "json-ns"), (new, "proto-ns")):
        run(binary, "create", "namespace", ns, "--dry-run=server")
        run(binary, "create", "namespace", ns)
        run(binary, "create", "secret", "generic", "hf-secret", "--from-literal=hf_api_token=hf_x", "-n", ns)
        run(binary, "create", "configmap", "cfg", "--from-literal=k=v", "-n", ns)
        run(binary, "create", "serviceaccount", "reader", "-n", ns)
        token = json.loads(run(binary, "create", "token", "reader", "-n", ns, "--audience=a", "-o", "json").stdout)
        assert token["spec"]["expirationSeconds"] == 3600 and token["spec"]["audiences"] == ["a"]
        assert run(binary, "auth", "can-i", "create", "pods", "-n", ns).stdout.strip() == "yes"
        # the README's operator binding (production step 4) and a Role with the core group ("")
        run(binary, "create", "role", "pod-reader", "--verb=get,list", "--resource=pods,deployments.apps", "-n", ns)
        run(binary, "create", "rolebinding", "llm-fleet-operator", "--role=pod-reader", "-n", ns,
            "--user=llm-fleet-operator@llm-fleet-demo.iam.gserviceaccount.com", f"--serviceaccount={ns}:reader")
    got = {ns: json.loads(run(new, "get", "secret,configmap,serviceaccount,role,rolebinding", "-n", ns, "-o", "json"
                              ).stdout)["items"] for ns in ("json-ns", "proto-ns")}

    def shape(items: list[dict]) -> list[tuple]:
        def same(i: dict) -> str:
            body = {k: i.get(k) for k in ("data", "type", "rules", "subjects", "roleRef")}
            return json.dumps(body, sort_keys=True).replace("json-ns", "NS").replace("proto-ns", "NS")
        return sorted((i["kind"], i["metadata"]["name"], same(i)) for i in items)

    assert shape(got["proto-ns"]) == shape(got["json-ns"]) and len(got["proto-ns"]) >= 5
    assert json.loads(run(new, "get", "namespace", "proto-ns", "-o", "json").stdout)["status"]["phase"] == "Active"
    refused = run(new, "create", "deployment", "web", "--image=nginx", "-n", "proto-ns", ok=False)
    assert "accepted media types include: application/json, application/yaml" in refused.stderr
    assert "the sandbox reads protobuf bodies of ClusterRole, ClusterRoleBinding, ConfigMap, Namespace" in \
        refused.stderr and "not: Deployment (apps/v1)" in refused.stderr


def _varint(n: int) -> bytes:
    out = b""
    while True:
        out += bytes([n & 0x7F | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return out


def _pb(number: int, payload: bytes | str) -> bytes:
    """One length-delimited protobuf field."""
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def test_a_protobuf_field_the_sandbox_does_not_read_is_refused_not_dropped(kube):
    """A Namespace whose ObjectMeta carries managedFields (field 17, not in the sandbox's table) is refused
    with 415 naming the field — the object is not created without it."""
    from tests.sandbox.kube_support import http_client

    raw = _pb(1, _pb(1, "half-read") + _pb(17, b""))
    body = b"k8s\x00" + _pb(1, _pb(1, "v1") + _pb(2, "Namespace")) + _pb(2, raw)
    with http_client(kube) as http:
        r = http.post("/api/v1/namespaces", content=body,
                      headers={"Content-Type": "application/vnd.kubernetes.protobuf"})
        assert r.status_code == 415 and r.json()["reason"] == "UnsupportedMediaType"
        assert "field 17 of ObjectMeta" in r.json()["message"]
        assert http.get("/api/v1/namespaces/half-read").status_code == 404
        ok = http.post("/api/v1/namespaces", content=b"k8s\x00" + _pb(1, _pb(1, "v1") + _pb(2, "Namespace"))
                       + _pb(2, _pb(1, _pb(1, "whole"))), headers={"Content-Type": "application/vnd.kubernetes.protobuf"})
        assert ok.status_code == 201 and ok.json()["metadata"]["name"] == "whole"
