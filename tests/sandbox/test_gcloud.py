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
