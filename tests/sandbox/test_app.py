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
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import container_v1

from sandbox.app import Sandbox
from sandbox.client import SandboxClient, SandboxError
from sandbox.compute import DEFAULT_PROJECT_QUOTAS

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


def _port_open(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
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
        assert env["LLM_FLEET_GCP_AUTH"] == "anonymous" and env["LLM_FLEET_CLUSTER_SCHEME"] == "http"
        assert env["LLM_FLEET_SLACK_API_URL"].endswith("/api/")
        assert env["CLOUDSDK_API_ENDPOINT_OVERRIDES_CONTAINER"] == env["LLM_FLEET_GKE_ENDPOINT"] + "/"
        assert env["CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE"] == env["LLM_FLEET_COMPUTE_ENDPOINT"] + "/compute/v1/"
        assert env["CLOUDSDK_CORE_PROJECT"] == "sandbox-project" and env["HF_TOKEN"] == "hf_sandbox_read"
        state = tmp_path / "state"
        assert env["KUBECONFIG"] == str(state / "kubeconfig") and env["CLOUDSDK_CONFIG"] == str(state / "gcloud")

        # `set -a; . env` yields exactly env()
        out = subprocess.run(["bash", "-c", f"set -a; . {state / 'env'}; env -0"], capture_output=True, check=True,
                             env={"PATH": os.environ["PATH"]}).stdout.decode()
        sourced = dict(line.split("=", 1) for line in out.split("\0") if "=" in line)
        assert {k: sourced[k] for k in env} == env

        import yaml

        kubeconfig = yaml.safe_load((state / "kubeconfig").read_text())
        (cluster,) = kubeconfig["clusters"]
        assert cluster["cluster"]["server"] == sandbox.kube.url
        assert kubeconfig["current-context"] == "sandbox"
        assert (state / "gcloud" / "configurations" / "config_default").read_text().count("sandbox-project") == 1
        urls = sandbox.urls()
        assert set(urls) == {"control", "gke", "compute", "kube", "hub", "slack"}
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
    parent = "projects/sandbox-project/locations/us-central1-c"
    client.add_fault(service="gke", method="GET", path=r"/clusters$", status=503, count=1)
    with pytest.raises(gexc.ServiceUnavailable):
        gke.list_clusters(parent=parent, retry=None)
    assert gke.list_clusters(parent=parent, retry=None).clusters == []
    assert client.faults()[0]["hits"] == 1


def test_gke_nodes_become_kubernetes_nodes(sb, client):
    from kubernetes import client as k8s

    gke = _gke(sb)
    loc = "projects/sandbox-project/locations/us-central1-a"
    op = gke.create_cluster(parent=loc, cluster=container_v1.Cluster(name="app-c1", initial_node_count=1), retry=None)
    httpx.post(f"{sb.gke.url}/v1/{loc}/operations/{op.name}:wait", timeout=10)
    pool = container_v1.NodePool(name="gpu", initial_node_count=1, config=container_v1.NodeConfig(
        machine_type="g2-standard-8", spot=True,
        accelerators=[container_v1.AcceleratorConfig(accelerator_count=1, accelerator_type="nvidia-l4")]))
    op = gke.create_node_pool(parent=f"{loc}/clusters/app-c1", node_pool=pool, retry=None)
    done = httpx.post(f"{sb.gke.url}/v1/{loc}/operations/{op.name}:wait", timeout=10).json()
    assert done["status"] == "DONE" and "error" not in done

    cluster = gke.get_cluster(name=f"{loc}/clusters/app-c1", retry=None)
    assert f"http://{cluster.endpoint}" == sb.kube.url
    cfg = k8s.Configuration(host=f"http://{cluster.endpoint}")
    core = k8s.CoreV1Api(k8s.ApiClient(cfg))
    gpu_nodes = core.list_node(label_selector="cloud.google.com/gke-nodepool=gpu").items
    assert len(gpu_nodes) == 1
    node = gpu_nodes[0]
    assert node.metadata.labels["cloud.google.com/gke-accelerator"] == "nvidia-l4"
    assert node.metadata.labels["cloud.google.com/gke-spot"] == "true"
    assert node.status.capacity["nvidia.com/gpu"] == "1"
    assert [(t.key, t.effect) for t in node.spec.taints or []] == [("nvidia.com/gpu", "NoSchedule")]
    assert client.quota_used()["regions"]["us-central1"]["PREEMPTIBLE_NVIDIA_L4_GPUS"] == 1

    op = gke.delete_cluster(name=f"{loc}/clusters/app-c1", retry=None)
    httpx.post(f"{sb.gke.url}/v1/{loc}/operations/{op.name}:wait", timeout=10)
    assert core.list_node(label_selector="cloud.google.com/gke-nodepool").items == []
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
    loc = "projects/sandbox-project/locations/europe-west1"
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
    from kubernetes import client as k8s

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

    core = k8s.CoreV1Api(k8s.ApiClient(k8s.Configuration(host=sb.kube.url)))
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
    from kubernetes import client as k8s

    gke = _gke(sb)
    loc = "projects/ap-project/locations/us-west1"
    op = gke.create_cluster(parent=loc, cluster=container_v1.Cluster(
        name="ap", autopilot=container_v1.Autopilot(enabled=True)), retry=None)
    httpx.post(f"{sb.gke.url}/v1/{loc}/operations/{op.name}:wait", timeout=10)
    core = k8s.CoreV1Api(k8s.ApiClient(k8s.Configuration(host=sb.kube.url)))
    core.create_namespaced_pod("default", _gpu_pod("ap-job"))
    try:
        assert _until(lambda: core.read_namespaced_pod("ap-job", "default").spec.node_name is not None)
        node = core.read_namespaced_pod("ap-job", "default").spec.node_name
        # node events reach GKE on the kube emulator's subscriber thread: a moment after the bind
        assert _until(lambda: sb.compute.quota("us-west1", "NVIDIA_L4_GPUS", project="ap-project")["usage"] == 1)
        held = {n["node"]: n for n in client.state()["gke"]["autopilot_nodes"]}
        assert held[node]["cluster"] == "ap" and held[node]["quota"]["NVIDIA_L4_GPUS"] == 1
    finally:
        core.delete_namespaced_pod("ap-job", "default", grace_period_seconds=0)
    op = gke.delete_cluster(name=f"{loc}/clusters/ap", retry=None)
    httpx.post(f"{sb.gke.url}/v1/{loc}/operations/{op.name}:wait", timeout=10)
    assert _until(lambda: sb.compute.quota("us-west1", "NVIDIA_L4_GPUS", project="ap-project")["usage"] == 0)
    assert client.state()["gke"]["autopilot_nodes"] == []
