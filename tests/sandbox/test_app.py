"""The composed sandbox: start/stop, env file, kubeconfig, control API, and real clients against it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import container_v1

from sandbox.app import Sandbox
from sandbox.client import SandboxClient, SandboxError
from sandbox.compute import DEFAULT_PROJECT_QUOTAS
from tests.sandbox.kube_support import deployment

ROOT = Path(__file__).resolve().parents[2]
CONTRACT_ENV = {
    "LLM_FLEET_GKE_ENDPOINT", "LLM_FLEET_COMPUTE_ENDPOINT", "LLM_FLEET_GCP_AUTH", "LLM_FLEET_SANDBOX_URL",
    "HF_ENDPOINT", "HF_TOKEN", "SLACK_BOT_TOKEN", "LLM_FLEET_SLACK_API_URL", "KUBECONFIG",
    "CLOUDSDK_API_ENDPOINT_OVERRIDES_CONTAINER", "CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE",
    "CLOUDSDK_AUTH_ACCESS_TOKEN", "CLOUDSDK_CORE_PROJECT", "CLOUDSDK_CONFIG",
}


@pytest.fixture(scope="module")
def sb(tmp_path_factory):
    with Sandbox.running(time_scale=0.001, state_dir=tmp_path_factory.mktemp("sb")) as sandbox:
        yield sandbox


@pytest.fixture
def client(sb):
    c = SandboxClient(sb.url)
    yield c
    c.clear_faults()
    c.clear_stockouts()
    c.close()


def _gke(sb: Sandbox) -> container_v1.ClusterManagerClient:
    return container_v1.ClusterManagerClient(credentials=AnonymousCredentials(), transport="rest",
                                             client_options={"api_endpoint": sb.env()["LLM_FLEET_GKE_ENDPOINT"]})


def _kube_core(sb: Sandbox, endpoint: str, ca_b64: str):
    """A CoreV1Api for a cluster endpoint the way gcloud's kubeconfig reaches it: https, trusting only the
    CA GKE returned in masterAuth, with a Google access token."""
    import base64
    import tempfile

    from kubernetes import client as k8s

    with tempfile.NamedTemporaryFile("wb", prefix="tests-ca-", suffix=".crt", delete=False) as f:
        f.write(base64.b64decode(ca_b64))
    cfg = k8s.Configuration(host=f"https://{endpoint.removeprefix('https://')}")
    cfg.ssl_ca_cert = f.name
    cfg.api_key["BearerToken"] = sb.env()["CLOUDSDK_AUTH_ACCESS_TOKEN"]
    cfg.api_key_prefix["BearerToken"] = "Bearer"
    return k8s.CoreV1Api(k8s.ApiClient(cfg))


def _port_open(url: str) -> bool:
    host, port = url.split("://")[-1].split(":")
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, int(port))) == 0


def test_start_is_fast_env_file_and_clean_stop(tmp_path):
    t0 = time.monotonic()
    sandbox = Sandbox(time_scale=0.01, state_dir=tmp_path / "state")
    sandbox.start()
    try:
        assert time.monotonic() - t0 < 3.0
        env = sandbox.env()
        assert set(env) >= CONTRACT_ENV
        assert env["LLM_FLEET_GCP_AUTH"] == "adc" and "LLM_FLEET_CLUSTER_SCHEME" not in env
        adc = json.loads(Path(env["GOOGLE_APPLICATION_CREDENTIALS"]).read_text())
        assert adc["type"] == "service_account" and adc["token_uri"] == sandbox.oauth.url + "/token"
        assert env["LLM_FLEET_SLACK_API_URL"].endswith("/api/")
        assert env["CLOUDSDK_API_ENDPOINT_OVERRIDES_CONTAINER"] == env["LLM_FLEET_GKE_ENDPOINT"] + "/"
        assert env["CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE"] == env["LLM_FLEET_COMPUTE_ENDPOINT"] + "/compute/v1/"
        # the project the bundled specs use, so `gcloud container clusters list` shows the demo's clusters
        assert env["CLOUDSDK_CORE_PROJECT"] == "llm-fleet-demo" and env["HF_TOKEN"] == "hf_sandbox_read"
        state = tmp_path / "state"
        assert env["KUBECONFIG"] == str(state / "kubeconfig") and env["CLOUDSDK_CONFIG"] == str(state / "gcloud")

        # `set -a; . env` yields exactly env()
        out = subprocess.run(["bash", "-c", f"set -a; . {state / 'env'}; env -0"], capture_output=True, check=True,
                             env={"PATH": os.environ["PATH"]}).stdout.decode()
        sourced = dict(line.split("=", 1) for line in out.split("\0") if "=" in line)
        assert {k: sourced[k] for k in env} == env

        kubeconfig = yaml.safe_load((state / "kubeconfig").read_text())
        (cluster,) = kubeconfig["clusters"]
        assert cluster["cluster"]["server"] == sandbox.kube.url
        assert kubeconfig["current-context"] == "sandbox"
        assert (state / "gcloud" / "configurations" / "config_default").read_text().count("llm-fleet-demo") == 1
        urls = sandbox.urls()
        assert set(urls) == {"control", "gke", "compute", "kube", "hub", "slack", "oauth", "vertex", "gcs",
                             "artifactregistry"}
        assert all(_port_open(u) for u in urls.values())
        assert httpx.get(f"{urls['control']}/healthz").json() == {"ok": True}
    finally:
        t1 = time.monotonic()
        sandbox.stop()
    assert time.monotonic() - t1 < 3.0
    assert not any(_port_open(u) for u in urls.values())
    assert (tmp_path / "state" / "env").exists()  # a given state dir is kept


def test_temp_state_dir_is_removed(tmp_path):
    with Sandbox.running(time_scale=0.01) as sandbox:
        state = sandbox.state_dir
        assert (state / "env").exists() and (state / "kubeconfig").exists()
        written = sandbox.write_env(tmp_path / "elsewhere")
        assert written == (tmp_path / "elsewhere" / "env").resolve()
        assert f"export KUBECONFIG={tmp_path / 'elsewhere' / 'kubeconfig'}" in written.read_text()
    assert not state.exists()


def test_control_api_state_faults_stockouts_quota(sb, client):
    assert client.health()
    state = client.state()
    assert {"urls", "env", "quota_used", "faults", "compute", "gke", "kube", "runtime", "hub", "slack"} <= set(state)
    assert state["urls"]["control"] == sb.url and state["env"] == sb.env()

    rule = client.add_fault(service="gke", method="POST", path=r"/clusters$", status=503, count=2)
    assert rule["id"] and rule["hits"] == 0 and rule["status"] == 503
    assert [f["id"] for f in client.faults()] == [rule["id"]]
    with pytest.raises(SandboxError) as err:
        client.add_fault(service="gke", path="(", status=500)
    assert err.value.status == 400
    with pytest.raises(SandboxError):
        client.add_fault(service="gke", colour="red")
    # even a catch-all rule cannot lock the control API
    catch_all = client.add_fault(service="*", status=500, count=None)
    assert client.health() and len(client.faults()) == 2
    client.remove_fault(catch_all["id"])
    with pytest.raises(SandboxError) as err:
        client.remove_fault(catch_all["id"])
    assert err.value.status == 404
    client.clear_faults(service="compute")
    assert len(client.faults()) == 1
    client.clear_faults()
    assert client.faults() == []

    assert client.set_stockout("us-central1-a", "nvidia-l4") == [{"zone": "us-central1-a", "accelerator": "nvidia-l4"}]
    assert sb.compute.stocked_out("us-central1-a", "nvidia-l4")
    client.set_stockout("us-central1-a", "nvidia-l4", on=False)
    assert client.stockouts() == []
    with pytest.raises(SandboxError):
        client.set_stockout("atlantis-1a")

    got = client.set_quota("us-central1", "NVIDIA_L4_GPUS", 2)
    assert got["limit"] == 2 and got["usage"] == 0
    got = client.set_quota(None, "GPUS_ALL_REGIONS", 4, project="other-project")
    assert got["project"] == "other-project" and got["limit"] == 4
    # the sandbox project is untouched
    assert sb.compute.quota(None, "GPUS_ALL_REGIONS")["limit"] == DEFAULT_PROJECT_QUOTAS["GPUS_ALL_REGIONS"]
    assert client.quota_used() == {"project": {}, "regions": {}}
    client.set_quota("us-central1", "NVIDIA_L4_GPUS", 8)


def test_faults_through_control_api_reach_real_gke_client(sb, client):
    gke = _gke(sb)
    parent = f"projects/{sb.project}/locations/us-central1-c"
    client.add_fault(service="gke", method="GET", path=r"/clusters$", status=503, count=1)
    with pytest.raises(gexc.ServiceUnavailable):
        gke.list_clusters(parent=parent, retry=None)
    assert gke.list_clusters(parent=parent, retry=None).clusters == []
    assert client.faults()[0]["hits"] == 1


def test_gke_nodes_become_kubernetes_nodes(sb, client):

    gke = _gke(sb)
    loc = f"projects/{sb.project}/locations/us-central1-a"
    op = gke.create_cluster(parent=loc, cluster=container_v1.Cluster(name="app-c1", initial_node_count=1), retry=None)
    httpx.post(f"{sb.gke.url}/v1/{loc}/operations/{op.name}:wait", timeout=10)
    pool = container_v1.NodePool(name="gpu", initial_node_count=1, config=container_v1.NodeConfig(
        machine_type="g2-standard-8", spot=True,
        accelerators=[container_v1.AcceleratorConfig(accelerator_count=1, accelerator_type="nvidia-l4")]))
    op = gke.create_node_pool(parent=f"{loc}/clusters/app-c1", node_pool=pool, retry=None)
    done = httpx.post(f"{sb.gke.url}/v1/{loc}/operations/{op.name}:wait", timeout=10).json()
    assert done["status"] == "DONE" and "error" not in done

    cluster = gke.get_cluster(name=f"{loc}/clusters/app-c1", retry=None)
    # the cluster's own API server, not the default one
    assert f"https://{cluster.endpoint}" == sb.cluster_kube("app-c1").url != sb.kube.url
    assert cluster.master_auth.cluster_ca_certificate == sb.cluster_kube("app-c1").tls.ca_b64
    core = _kube_core(sb, cluster.endpoint, cluster.master_auth.cluster_ca_certificate)
    gpu_nodes = core.list_node(label_selector="cloud.google.com/gke-nodepool=gpu").items
    assert len(gpu_nodes) == 1
    node = gpu_nodes[0]
    assert node.metadata.labels["cloud.google.com/gke-accelerator"] == "nvidia-l4"
    assert node.metadata.labels["cloud.google.com/gke-spot"] == "true"
    assert node.status.capacity["nvidia.com/gpu"] == "1"
    assert [(t.key, t.effect) for t in node.spec.taints or []] == [("nvidia.com/gpu", "NoSchedule")]
    assert client.quota_used()["regions"]["us-central1"]["PREEMPTIBLE_NVIDIA_L4_GPUS"] == 1

    assert sb.kube.nodes() == []  # the default API has none of it
    op = gke.delete_cluster(name=f"{loc}/clusters/app-c1", retry=None)
    httpx.post(f"{sb.gke.url}/v1/{loc}/operations/{op.name}:wait", timeout=10)
    assert not _port_open(f"https://{cluster.endpoint}")  # its API server went with it
    assert sb.cluster_kube("app-c1") is None
    assert client.quota_used() == {"project": {}, "regions": {}}


def test_slack_messages_are_visible(sb, client):
    from slack_sdk import WebClient

    env = sb.env()
    slack = WebClient(token=env["SLACK_BOT_TOKEN"], base_url=env["LLM_FLEET_SLACK_API_URL"])
    first = slack.chat_postMessage(channel="#app-test", text="hello from the test")
    slack.chat_postMessage(channel="#app-test", text="in the thread", thread_ts=first["ts"])
    slack.chat_postMessage(channel="#elsewhere", text="not this one")
    texts = [m["text"] for m in client.slack_messages(channel="#app-test")]
    assert "hello from the test" in texts and "not this one" not in texts
    assert any(m["text"] == "not this one" for m in client.slack_messages())


def test_behaviors_are_forwarded_to_the_runtime(sb, client):
    before = len(client.behaviors())
    client.add_behavior(match={"labels": {"app.kubernetes.io/instance": "demo"}}, mode="slow_load")
    assert len(client.behaviors()) == before + 1
    client.clear_behaviors()
    assert client.behaviors() == []


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="gcloud is not installed")
def test_real_gcloud_against_the_sandbox(sb):
    env = {**os.environ, **sb.env()}
    gke = _gke(sb)
    loc = f"projects/{sb.project}/locations/europe-west1"
    op = gke.create_cluster(parent=loc, cluster=container_v1.Cluster(
        name="gcloud-c1", autopilot=container_v1.Autopilot(enabled=True)), retry=None)
    httpx.post(f"{sb.gke.url}/v1/{loc}/operations/{op.name}:wait", timeout=10)

    # the two commands run side by side: gcloud's own start-up dominates
    procs = [subprocess.Popen(["gcloud", *args, "--format=json"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for args in (["container", "clusters", "list"], ["compute", "project-info", "describe"])]
    (listed, listed_err), (info, info_err) = (p.communicate(timeout=60) for p in procs)
    assert procs[0].returncode == 0, listed_err
    (cluster,) = [c for c in json.loads(listed) if c["name"] == "gcloud-c1"]
    assert cluster["location"] == "europe-west1" and cluster["status"] == "RUNNING"
    assert procs[1].returncode == 0, info_err
    quotas = {q["metric"]: q for q in json.loads(info)["quotas"]}
    assert quotas["GPUS_ALL_REGIONS"]["limit"] == DEFAULT_PROJECT_QUOTAS["GPUS_ALL_REGIONS"]


def test_main_serves_until_sigterm(tmp_path):
    state = tmp_path / "cli"
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from sandbox.app import main; "
                             "sys.exit(main(sys.argv[1:]))", "--state-dir", str(state), "--time-scale", "0.01"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (state / "env").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.05)
        env = dict(line.removeprefix("export ").split("=", 1) for line in (state / "env").read_text().splitlines()
                   if line.startswith("export "))
        assert SandboxClient(env["LLM_FLEET_SANDBOX_URL"]).health()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "kubectl get pods -A" in out and f". {state.resolve() / 'env'}" in out and "stopped" in out


def _gpu_pod(name: str, accelerator: str = "nvidia-l4") -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"nodeSelector": {"cloud.google.com/gke-accelerator": accelerator},
                     "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                     "containers": [{"name": "main", "image": "busybox:1.36", "command": ["sleep", "3600"],
                                     "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}


def _until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_cluster_autoscaler_with_the_real_kube(sb, client):

    gke = _gke(sb)
    loc = "projects/ca-project/locations/us-east1-b"
    op = gke.create_cluster(parent=loc, cluster=container_v1.Cluster(name="ca", initial_node_count=1), retry=None)
    httpx.post(f"{sb.gke.url}/v1/{loc}/operations/{op.name}:wait", timeout=10)
    pool = container_v1.NodePool(
        name="gpu-ca", initial_node_count=0,
        autoscaling=container_v1.NodePoolAutoscaling(enabled=True, min_node_count=0, max_node_count=1),
        config=container_v1.NodeConfig(machine_type="n1-standard-8", accelerators=[
            container_v1.AcceleratorConfig(accelerator_count=1, accelerator_type="nvidia-tesla-t4")]))
    op = gke.create_node_pool(parent=f"{loc}/clusters/ca", node_pool=pool, retry=None)
    assert "error" not in httpx.post(f"{sb.gke.url}/v1/{loc}/operations/{op.name}:wait", timeout=10).json()

    got = gke.get_cluster(name=f"{loc}/clusters/ca", retry=None)
    core = _kube_core(sb, got.endpoint, got.master_auth.cluster_ca_certificate)
    core.create_namespaced_pod("default", _gpu_pod("t4-job", "nvidia-tesla-t4"))

    def node_of_pod():
        return core.read_namespaced_pod("t4-job", "default").spec.node_name

    try:
        assert _until(lambda: node_of_pod() is not None)
        node = core.read_node(node_of_pod())
        assert node.metadata.labels["cloud.google.com/gke-nodepool"] == "gpu-ca"
        assert sb.compute.quota("us-east1", "NVIDIA_T4_GPUS", project="ca-project")["usage"] == 1  # reserved first
    finally:
        core.delete_namespaced_pod("t4-job", "default", grace_period_seconds=0)
    assert _until(lambda: not core.list_node(label_selector="cloud.google.com/gke-nodepool=gpu-ca").items)
    assert sb.compute.quota("us-east1", "NVIDIA_T4_GPUS", project="ca-project")["usage"] == 0
    op = gke.delete_cluster(name=f"{loc}/clusters/ca", retry=None)
    httpx.post(f"{sb.gke.url}/v1/{loc}/operations/{op.name}:wait", timeout=10)


def test_autopilot_nodes_hold_quota(sb, client):

    gke = _gke(sb)
    loc = "projects/ap-project/locations/us-west1"
    op = gke.create_cluster(parent=loc, cluster=container_v1.Cluster(
        name="ap", autopilot=container_v1.Autopilot(enabled=True)), retry=None)
    httpx.post(f"{sb.gke.url}/v1/{loc}/operations/{op.name}:wait", timeout=10)
    got = gke.get_cluster(name=f"{loc}/clusters/ap", retry=None)
    core = _kube_core(sb, got.endpoint, got.master_auth.cluster_ca_certificate)
    core.create_namespaced_pod("default", _gpu_pod("ap-job"))
    try:
        assert _until(lambda: core.read_namespaced_pod("ap-job", "default").spec.node_name is not None)
        node = core.read_namespaced_pod("ap-job", "default").spec.node_name
        # node events reach GKE on the kube emulator's subscriber thread: a moment after the bind
        assert _until(lambda: sb.compute.quota("us-west1", "NVIDIA_L4_GPUS", project="ap-project")["usage"] == 1)
        held = {n["node"]: n for n in client.state()["gke"]["autopilot_nodes"]}
        assert held[node]["cluster"] == "ap" and held[node]["quota"]["NVIDIA_L4_GPUS"] == 1
        assert held[node]["project"] == "ap-project"
        assert [n["name"] for n in client.state()["clusters_kube"]["ap-project/us-west1/ap"]["nodes"]] == [node]
    finally:
        core.delete_namespaced_pod("ap-job", "default", grace_period_seconds=0)
    op = gke.delete_cluster(name=f"{loc}/clusters/ap", retry=None)
    httpx.post(f"{sb.gke.url}/v1/{loc}/operations/{op.name}:wait", timeout=10)
    assert _until(lambda: sb.compute.quota("us-west1", "NVIDIA_L4_GPUS", project="ap-project")["usage"] == 0)
    assert client.state()["gke"]["autopilot_nodes"] == []


# ---- one Kubernetes API per GKE cluster -----------------------------------------------------------------

def _kubectl(home: Path, kubeconfig: Path, *args: str, sb: Sandbox) -> subprocess.CompletedProcess:
    """Real kubectl with a fresh HOME (the dispatcher caches the server version per host:port there), and
    gcloud's settings from the env file (gke-gcloud-auth-plugin, the kubeconfig's credential, reads them)."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home),
           **{k: v for k, v in sb.env().items() if k.startswith("CLOUDSDK_")}}
    return subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", f"--cache-dir={home / 'cache'}", *args],
                          capture_output=True, text=True, env=env, timeout=60)



@pytest.fixture
def own_sb(tmp_path):
    """A sandbox of its own: the kubeconfig's contexts depend on every cluster created in it."""
    with Sandbox.running(time_scale=0.001, state_dir=tmp_path / "state") as sandbox:
        yield sandbox


def test_every_cluster_has_its_own_kubernetes_api(own_sb, tmp_path):
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    sb = own_sb
    gke = _gke(sb)
    projects = ("iso-one", "iso-two")
    parents = {p: f"projects/{p}/locations/us-central1-a" for p in projects}
    ops = {p: gke.create_cluster(parent=parents[p], cluster=container_v1.Cluster(name="llm", initial_node_count=1),
                                 retry=None) for p in projects}
    for p in projects:
        assert "error" not in httpx.post(f"{sb.gke.url}/v1/{parents[p]}/operations/{ops[p].name}:wait",
                                         timeout=10).json()
    got = {p: gke.get_cluster(name=f"{parents[p]}/clusters/llm", retry=None) for p in projects}
    endpoints = {p: got[p].endpoint for p in projects}
    assert len({*endpoints.values(), sb.kube.url.removeprefix("https://")}) == 3
    core = {p: _kube_core(sb, endpoints[p], got[p].master_auth.cluster_ca_certificate) for p in projects}
    default_core = _kube_core(sb, sb.kube.url, sb.kube.tls.ca_b64)

    # the same Secret in the same namespace of both clusters: each sees its own
    for p in projects:
        core[p].create_namespaced_secret("default", {"metadata": {"name": "hf-secret"},
                                                     "stringData": {f"token-{p}": "x"}})
    assert {p: set(core[p].read_namespaced_secret("hf-secret", "default").data) for p in projects} == {
        p: {f"token-{p}"} for p in projects}
    core["iso-one"].create_namespaced_config_map("default", {"metadata": {"name": "only-in-one"}})
    for other in (core["iso-two"], default_core):
        with pytest.raises(ApiException) as err:
            other.read_namespaced_config_map("only-in-one", "default")
        assert err.value.status == 404

    # a node pool's nodes appear in its own cluster only
    pool = container_v1.NodePool(name="gpu", initial_node_count=1, config=container_v1.NodeConfig(
        machine_type="g2-standard-8",
        accelerators=[container_v1.AcceleratorConfig(accelerator_count=1, accelerator_type="nvidia-l4")]))
    op = gke.create_node_pool(parent=f"{parents['iso-two']}/clusters/llm", node_pool=pool, retry=None)
    assert "error" not in httpx.post(f"{sb.gke.url}/v1/{parents['iso-two']}/operations/{op.name}:wait",
                                     timeout=10).json()
    gpu = "cloud.google.com/gke-nodepool=gpu"
    assert len(core["iso-two"].list_node(label_selector=gpu).items) == 1
    assert core["iso-one"].list_node(label_selector=gpu).items == [] and default_core.list_node().items == []
    assert len(core["iso-one"].list_node().items) == 1  # its default-pool node

    # a model server in iso-two
    k8s.AppsV1Api(core["iso-two"].api_client).create_namespaced_deployment("default", deployment(
        "opt", gpus=1, args=["--model=facebook/opt-125m"], node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]))
    key_two, key_one = "iso-two/us-central1-a/llm", "iso-one/us-central1-a/llm"

    def ready_port() -> int | None:
        pods = SandboxClient(sb.url).state()["clusters_kube"][key_two]["pods"]
        return next((p["port"] for p in pods if p["ready"] and p["port"]), None)

    assert _until(lambda: ready_port() is not None, timeout=20)
    model_port = ready_port()
    assert httpx.get(f"http://127.0.0.1:{model_port}/v1/models").json()["data"][0]["id"] == "facebook/opt-125m"

    # the control API shows each cluster's objects apart; "kube" stays the default API
    state = SandboxClient(sb.url).state()
    assert state["kube"]["url"] == sb.kube.url and state["kube"]["context"] == "sandbox"
    assert set(state["clusters_kube"]) == {key_one, key_two}
    two = state["clusters_kube"][key_two]
    assert two["url"] == f"https://{endpoints['iso-two']}" and two["context"] == "gke_iso-two_us-central1-a_llm"
    assert two["project"] == "iso-two" and two["cluster"] == "llm"
    assert [p["name"] for p in state["clusters_kube"][key_one]["pods"]] == [] and len(two["pods"]) == 1
    assert "only-in-one" in {o["metadata"]["name"] for o in state["clusters_kube"][key_one]["objects"]["configmaps"]}
    assert state["kube_contexts"]["current"] == "gke_iso-two_us-central1-a_llm"

    # the state dir's kubeconfig: a context per cluster, the newest current; real kubectl uses them
    kubeconfig = sb.state_dir / "kubeconfig"
    config = yaml.safe_load(kubeconfig.read_text())
    contexts = [c["name"] for c in config["contexts"]]
    assert contexts == ["sandbox", "gke_iso-one_us-central1-a_llm", "gke_iso-two_us-central1-a_llm"]
    assert config["current-context"] == "gke_iso-two_us-central1-a_llm"
    servers = {c["name"]: c["cluster"]["server"] for c in config["clusters"]}
    assert servers["gke_iso-one_us-central1-a_llm"] == f"https://{endpoints['iso-one']}"
    if shutil.which("kubectl"):
        home = tmp_path / "home"
        out = _kubectl(home, kubeconfig, "--context", "gke_iso-two_us-central1-a_llm", "get", "nodes",
                       "-l", gpu, "-o", "name", sb=sb)
        assert out.returncode == 0, out.stderr
        assert out.stdout.count("node/") == 1
        out = _kubectl(home, kubeconfig, "--context", "gke_iso-one_us-central1-a_llm", "get", "nodes", "-l", gpu, sb=sb)
        assert out.returncode == 0 and "No resources found" in out.stderr, out.stderr
        out = _kubectl(home, kubeconfig, "get", "secret", "hf-secret", "-o", "jsonpath={.data}", sb=sb)  # current: iso-two
        assert out.returncode == 0 and "token-iso-two" in out.stdout, out.stderr

    # deleting a cluster stops its API server and its model servers and drops its context
    op = gke.delete_cluster(name=f"{parents['iso-two']}/clusters/llm", retry=None)
    done = httpx.post(f"{sb.gke.url}/v1/{parents['iso-two']}/operations/{op.name}:wait", timeout=10).json()
    assert done["status"] == "DONE" and "error" not in done
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"https://{endpoints['iso-two']}/version", verify=False)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{model_port}/health")
    state = SandboxClient(sb.url).state()
    assert set(state["clusters_kube"]) == {key_one}
    assert not [p for p in state["runtime"]["pods"] if p["port"] == model_port]
    config = yaml.safe_load(kubeconfig.read_text())
    assert [c["name"] for c in config["contexts"]] == ["sandbox", "gke_iso-one_us-central1-a_llm"]
    assert config["current-context"] == "gke_iso-one_us-central1-a_llm"  # the newest remaining one
    assert core["iso-one"].read_namespaced_config_map("only-in-one", "default").metadata.name == "only-in-one"
    op = gke.delete_cluster(name=f"{parents['iso-one']}/clusters/llm", retry=None)
    httpx.post(f"{sb.gke.url}/v1/{parents['iso-one']}/operations/{op.name}:wait", timeout=10)
    config = yaml.safe_load(kubeconfig.read_text())
    assert [c["name"] for c in config["contexts"]] == ["sandbox"] and config["current-context"] == "sandbox"
    assert sb.cluster_kubes == {}


def test_kubeconfig_keeps_foreign_entries_and_writes_what_gcloud_writes(own_sb, tmp_path):
    sb = own_sb
    kubeconfig = sb.state_dir / "kubeconfig"
    config = yaml.safe_load(kubeconfig.read_text())
    # someone else's entry, and the user's choice of context, survive cluster changes
    config["clusters"].append({"name": "elsewhere", "cluster": {"server": "https://10.0.0.1"}})
    config["users"].append({"name": "elsewhere", "user": {"token": "t"}})
    config["contexts"].append({"name": "elsewhere", "context": {"cluster": "elsewhere", "user": "elsewhere"}})
    kubeconfig.write_text(yaml.safe_dump(config))
    gke = _gke(sb)
    parent = "projects/kc-project/locations/us-central1-a"
    op = gke.create_cluster(parent=parent, cluster=container_v1.Cluster(name="kc", initial_node_count=1), retry=None)
    context = "gke_kc-project_us-central1-a_kc"
    config = yaml.safe_load(kubeconfig.read_text())  # written when the create was accepted
    assert [c["name"] for c in config["contexts"]] == ["elsewhere", "sandbox", context]
    assert config["current-context"] == context
    httpx.post(f"{sb.gke.url}/v1/{parent}/operations/{op.name}:wait", timeout=10)
    got = gke.get_cluster(name=f"{parent}/clusters/kc", retry=None)

    # the entries are the ones `gcloud container clusters get-credentials` writes: https, the CA GKE
    # returns in masterAuth, gke-gcloud-auth-plugin as the credential (so nothing needs rewriting)
    assert {c["name"]: c["cluster"] for c in config["clusters"]}[context] == {
        "certificate-authority-data": got.master_auth.cluster_ca_certificate, "server": f"https://{got.endpoint}"}
    assert {u["name"]: u["user"] for u in config["users"]}[context]["exec"]["command"] == "gke-gcloud-auth-plugin"
    if shutil.which("gcloud"):
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **sb.env(),
               "KUBECONFIG": str(tmp_path / "gcloud-kubeconfig")}
        out = subprocess.run(["gcloud", "container", "clusters", "get-credentials", "kc", "--project", "kc-project",
                              "--zone", "us-central1-a"], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        written = yaml.safe_load((tmp_path / "gcloud-kubeconfig").read_text())
        assert written["clusters"] == [c for c in config["clusters"] if c["name"] == context]
        assert written["users"][0]["user"]["exec"]["command"] == "gke-gcloud-auth-plugin"

    config["current-context"] = "elsewhere"
    kubeconfig.write_text(yaml.safe_dump(config))
    op = gke.delete_cluster(name=f"{parent}/clusters/kc", retry=None)
    httpx.post(f"{sb.gke.url}/v1/{parent}/operations/{op.name}:wait", timeout=10)
    config = yaml.safe_load(kubeconfig.read_text())
    assert [c["name"] for c in config["contexts"]] == ["elsewhere", "sandbox"]
    assert config["current-context"] == "elsewhere"  # the user's choice
    assert {c["name"]: c["cluster"] for c in config["clusters"]}["elsewhere"] == {"server": "https://10.0.0.1"}


def test_endpoint_lag_is_set_per_sandbox_and_through_the_client(client, sb):
    """kube-proxy's programming delay: realistic by default, settable while running (tests of release safety
    raise it), refused when negative."""
    from sandbox.core import DEFAULT_DELAYS

    assert client.endpoint_lag() == sb.endpoint_lag_s == DEFAULT_DELAYS["endpoint_propagation"] > 0
    try:
        assert client.set_endpoint_lag(7.5) == 7.5 and sb.kube.kube_proxy.lag_s == 7.5
        background = client.state()["kube"]["background"]  # what the cluster does on its own, in the state
        assert background["endpoint_lag_s"] == 7.5 and {"gmp_targets", "lb_health", "kubelet_probes"} <= set(background)
        with pytest.raises(SandboxError):
            client.set_endpoint_lag(-1)
    finally:
        client.set_endpoint_lag(DEFAULT_DELAYS["endpoint_propagation"])


def test_the_env_files_product_image_runs_locally(sb):
    """`llm-fleet sandbox up` runs the product's own image as the demo does: the env file names it
    (LLM_FLEET_IMAGE, the README's flows image) and the sandbox starts its pods as local processes,
    without SANDBOX_LOCAL_IMAGES."""
    from sandbox.kube import localproc

    image = sb.env()["LLM_FLEET_IMAGE"]
    assert image == f"us-docker.pkg.dev/{sb.project}/llm-fleet/flows:sandbox"
    assert localproc.is_local(image)
