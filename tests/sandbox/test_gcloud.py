"""gcloud like gcloud: the env file's project is the bundled specs' (llm-fleet-demo), so the tutorials' lines
run as written — ``gcloud container clusters get-credentials NAME --region R`` then kubectl — and static IPs
are reserved with ``gcloud compute addresses create`` before an Ingress may name them."""

from __future__ import annotations

import os
import shutil
import subprocess

import httpx
import pytest
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import container_v1

from sandbox.app import Sandbox

pytestmark = pytest.mark.skipif(shutil.which("gcloud") is None or shutil.which("kubectl") is None,
                                reason="gcloud and kubectl are needed")
PROJECT = "llm-fleet-demo"


@pytest.fixture(scope="module")
def sb(tmp_path_factory):
    with Sandbox.running(time_scale=0.001, state_dir=tmp_path_factory.mktemp("state")) as sandbox:
        yield sandbox


def _run(sb: Sandbox, home, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **sb.env(), "HOME": str(home)}
    return subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=120)


def test_env_file_project_is_the_bundled_specs_project(sb):
    import yaml

    from tests.flows.conftest import ROOT

    assert sb.env()["CLOUDSDK_CORE_PROJECT"] == PROJECT
    projects = {yaml.safe_load(p.read_text())["cluster"]["project"] for p in (ROOT / "deployments").glob("*.yaml")}
    assert projects == {PROJECT}


def _popen(sb: Sandbox, home, *args: str) -> subprocess.Popen:
    env = {**os.environ, **sb.env(), "HOME": str(home)}
    return subprocess.Popen(list(args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_tutorial_lines_get_credentials_and_a_reserved_static_ip(sb, tmp_path):
    from google.api_core import exceptions as gexc
    from google.cloud import compute_v1

    gke = container_v1.ClusterManagerClient(credentials=AnonymousCredentials(), transport="rest",
                                            client_options=ClientOptions(api_endpoint=sb.env()["LLM_FLEET_GKE_ENDPOINT"]))
    parent = f"projects/{PROJECT}/locations/us-east1"
    op = gke.create_cluster(parent=parent, cluster=container_v1.Cluster(name="tutorial", initial_node_count=1),
                            retry=None)
    httpx.post(f"{sb.gke.url}/v1/{parent}/operations/{op.name}:wait", timeout=30)
    addresses = compute_v1.GlobalAddressesClient(credentials=AnonymousCredentials(), transport="rest",
                                                 client_options=ClientOptions(
                                                     api_endpoint=sb.env()["LLM_FLEET_COMPUTE_ENDPOINT"]))
    with pytest.raises(gexc.NotFound):  # not reserved yet: an Ingress naming it would never get it
        addresses.get(project=PROJECT, address="ingress-vllm", retry=None)

    # gcloud is slow to start: the two tutorial lines run side by side; no --project, no endpoint flags
    creds = _popen(sb, tmp_path, "gcloud", "container", "clusters", "get-credentials", "tutorial", "--region",
                   "us-east1")
    made = _popen(sb, tmp_path / "other", "gcloud", "compute", "addresses", "create", "ingress-vllm", "--global")
    code, _, err = _wait(creds)
    assert code == 0 and "kubeconfig entry generated for tutorial" in err, err
    code, _, err = _wait(made)
    assert code == 0, err
    nodes = _run(sb, tmp_path, "kubectl", f"--cache-dir={tmp_path / 'cache'}", "get", "nodes", "-o", "name")
    assert nodes.returncode == 0 and nodes.stdout.strip().startswith("node/"), nodes.stderr
    addr = addresses.get(project=PROJECT, address="ingress-vllm", retry=None)
    assert addr.status == "RESERVED" and addr.address.count(".") == 3
    with pytest.raises(gexc.Conflict):
        addresses.insert(project=PROJECT, address_resource={"name": "ingress-vllm"}, retry=None).result()


def test_kubectl_and_gcloud_answer_as_on_gke(sb, tmp_path):
    """One version end to end (GKE API = API server /version = kubelets), nodes' providerID in the real
    project, and ``gcloud compute addresses list`` (an aggregated list) across global and regional scopes."""
    import json

    from sandbox.compute import reserve_address

    gke = container_v1.ClusterManagerClient(credentials=AnonymousCredentials(), transport="rest",
                                            client_options=ClientOptions(api_endpoint=sb.env()["LLM_FLEET_GKE_ENDPOINT"]))
    parent = f"projects/{PROJECT}/locations/us-east1"
    op = gke.create_cluster(parent=parent, cluster=container_v1.Cluster(
        name="versions", initial_node_count=1,
        release_channel=container_v1.ReleaseChannel(channel=container_v1.ReleaseChannel.Channel.RAPID)), retry=None)
    httpx.post(f"{sb.gke.url}/v1/{parent}/operations/{op.name}:wait", timeout=30)
    reserve_address(sb.compute, PROJECT, "global", "web-ip")
    reserve_address(sb.compute, PROJECT, "us-east1", "regional-ip")
    listed = _popen(sb, tmp_path / "gcloud", "gcloud", "compute", "addresses", "list", "--format=json")

    cluster = gke.get_cluster(name=f"{parent}/clusters/versions", retry=None)
    kubectl = ["kubectl", f"--cache-dir={tmp_path / 'cache'}", f"--context=gke_{PROJECT}_us-east1_versions"]
    version = _run(sb, tmp_path, *kubectl, "version", "-o", "json")
    assert version.returncode == 0, version.stderr
    assert json.loads(version.stdout)["serverVersion"]["gitVersion"] == f"v{cluster.current_master_version}"
    nodes = json.loads(_run(sb, tmp_path, *kubectl, "get", "nodes", "-o", "json").stdout)["items"]
    assert nodes and {n["status"]["nodeInfo"]["kubeletVersion"] for n in nodes} == {
        f"v{cluster.node_pools[0].version}"}
    assert all(n["spec"]["providerID"].startswith(f"gce://{PROJECT}/us-east1-") for n in nodes)

    code, out, err = _wait(listed)
    assert code == 0, err
    assert {(a["name"], a.get("region", "").rsplit("/", 1)[-1]) for a in json.loads(out)} >= {
        ("web-ip", ""), ("regional-ip", "us-east1")}


AUTOSCALED_PODS = """\
apiVersion: v1
kind: Pod
metadata: {name: needs-claim, namespace: default}
spec:
  containers: [{name: vllm, image: vllm/vllm-openai:v0.6.3, resources: {limits: {nvidia.com/gpu: "1"}},
                volumeMounts: [{name: cache, mountPath: /cache}]}]
  volumes: [{name: cache, persistentVolumeClaim: {claimName: missing}}]
---
apiVersion: v1
kind: Pod
metadata: {name: wrong-accelerator, namespace: default}
spec:
  nodeSelector: {cloud.google.com/gke-accelerator: nvidia-h100-80gb}
  containers: [{name: vllm, image: vllm/vllm-openai:v0.6.3, resources: {limits: {nvidia.com/gpu: "1"}}}]
---
apiVersion: v1
kind: Pod
metadata: {name: fits, namespace: default}
spec:
  containers: [{name: vllm, image: vllm/vllm-openai:v0.6.3, resources: {limits: {nvidia.com/gpu: "1"}}}]
"""


def test_cluster_autoscaler_skips_pods_pending_on_a_claim_and_says_why(sb, tmp_path):
    """GKE's cluster autoscaler runs the scheduler's filters on a template node: a pod whose claim is missing
    fails VolumeBinding there too, so it adds no node (only the pod that fits does) and each pod gets the
    autoscaler's event -- ``TriggeredScaleUp`` or ``NotTriggerScaleUp`` with the reasons per node group."""
    import json
    import time

    gke = container_v1.ClusterManagerClient(credentials=AnonymousCredentials(), transport="rest",
                                            client_options=ClientOptions(api_endpoint=sb.env()["LLM_FLEET_GKE_ENDPOINT"]))
    parent = f"projects/{PROJECT}/locations/us-central1-a"
    op = gke.create_cluster(parent=parent, cluster=container_v1.Cluster(name="scaler", initial_node_count=1),
                            retry=None)
    httpx.post(f"{sb.gke.url}/v1/{parent}/operations/{op.name}:wait", timeout=30)
    pool = container_v1.NodePool(
        name="gpu", initial_node_count=0, locations=["us-central1-a"],
        autoscaling=container_v1.NodePoolAutoscaling(enabled=True, min_node_count=0, max_node_count=3),
        config=container_v1.NodeConfig(machine_type="g2-standard-8", accelerators=[container_v1.AcceleratorConfig(
            accelerator_count=1, accelerator_type="nvidia-l4")]))
    op = gke.create_node_pool(parent=f"{parent}/clusters/scaler", node_pool=pool, retry=None)
    httpx.post(f"{sb.gke.url}/v1/{parent}/operations/{op.name}:wait", timeout=30)

    from sandbox.kube.controllers import NODES, PODS
    from sandbox.kube.controllers.common import EVENTS

    env = {**os.environ, **sb.env(), "HOME": str(tmp_path)}
    kubectl = ["kubectl", f"--cache-dir={tmp_path / 'cache'}", f"--context=gke_{PROJECT}_us-central1-a_scaler"]
    applied = subprocess.run([*kubectl, "apply", "-f", "-"], input=AUTOSCALED_PODS, env=env, capture_output=True,
                             text=True, timeout=120)
    assert applied.returncode == 0, applied.stderr
    kube = sb.cluster_kube("scaler", "us-central1-a")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the fitting pod runs and both others were told why not
        told = {(e["involvedObject"]["name"], e["reason"]) for e in kube.store.list(EVENTS, "default")[0]}
        if (kube.store.get(PODS, "default", "fits")["status"].get("phase") == "Running"
                and {("needs-claim", "NotTriggerScaleUp"), ("wrong-accelerator", "NotTriggerScaleUp")} <= told):
            break
        time.sleep(0.05)
    got = subprocess.run([*kubectl, "get", "events", "-o", "json"], env=env, capture_output=True, text=True,
                         timeout=120)
    said = {(e["involvedObject"]["name"], e["reason"]): e for e in json.loads(got.stdout)["items"]
            if e["source"]["component"] == "cluster-autoscaler"}
    assert said[("needs-claim", "NotTriggerScaleUp")]["message"] == \
        'pod didn\'t trigger scale-up: 1 persistentvolumeclaim "missing" not found'
    assert said[("wrong-accelerator", "NotTriggerScaleUp")]["message"] == \
        "pod didn't trigger scale-up: 1 node(s) didn't match Pod's node affinity/selector"
    triggered = said[("fits", "TriggeredScaleUp")]["message"]
    assert triggered.startswith(f"pod triggered scale-up: [{{https://www.googleapis.com/compute/v1/projects/{PROJECT}"
                                "/zones/us-central1-a/instanceGroups/gke-scaler-gpu-"), triggered
    assert triggered.endswith("-grp 0->1 (max: 3)}]"), triggered
    assert {e["type"] for e in said.values()} == {"Normal"}
    # only the pod that fits added a node: the claim-less GPU pod would have asked for a second one
    gpu_nodes = [n for n in kube.store.list(NODES)[0]
                 if n["metadata"]["labels"].get("cloud.google.com/gke-nodepool") == "gpu"]
    assert len(gpu_nodes) == 1


def test_on_a_133_cluster_the_dispatchers_kubectl_runs_the_tutorials_creates(sb, tmp_path):
    """A cluster on the RAPID 1.33 patch gets kubectl.1.33 from gcloud's dispatcher, which sends protobuf bodies
    on typed creates: the seeds' `kubectl create namespace` / `create secret generic` / `create serviceaccount`
    work there as on GKE (they got 415 before the sandbox read protobuf)."""
    import json

    gke = container_v1.ClusterManagerClient(credentials=AnonymousCredentials(), transport="rest",
                                            client_options=ClientOptions(api_endpoint=sb.env()["LLM_FLEET_GKE_ENDPOINT"]))
    parent = f"projects/{PROJECT}/locations/us-east1"
    op = gke.create_cluster(parent=parent, cluster=container_v1.Cluster(
        name="newest", initial_node_count=1, initial_cluster_version="1.33",
        release_channel=container_v1.ReleaseChannel(channel=container_v1.ReleaseChannel.Channel.RAPID)), retry=None)
    httpx.post(f"{sb.gke.url}/v1/{parent}/operations/{op.name}:wait", timeout=30)
    kubectl = ["kubectl", f"--cache-dir={tmp_path / 'cache'}", f"--context=gke_{PROJECT}_us-east1_newest"]
    version = json.loads(_run(sb, tmp_path, *kubectl, "version", "-o", "json").stdout)
    assert version["serverVersion"]["minor"] == "33" and version["clientVersion"]["minor"] == "33"
    for args in (("create", "namespace", "llm-inference"),
                 ("create", "secret", "generic", "hf-secret", "--from-literal=hf_api_token=hf_x", "-n", "llm-inference"),
                 ("create", "serviceaccount", "llm-inference", "-n", "llm-inference")):
        done = _run(sb, tmp_path, *kubectl, *args)
        assert done.returncode == 0, (args, done.stderr)
    secret = json.loads(_run(sb, tmp_path, *kubectl, "get", "secret", "hf-secret", "-n", "llm-inference",
                             "-o", "json").stdout)
    assert secret["type"] == "Opaque" and secret["data"] == {"hf_api_token": "aGZfeA=="}
