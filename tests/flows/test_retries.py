"""Issue 13.2: each transient class is retried and each permanent class is not — over real HTTP.

Every fault here is consumed by the first request(s) it matches; a retried call then succeeds, so a
permanent error that was wrongly retried would show up as a success (and as more hits than one).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
import yaml
from google.api_core import exceptions as gexc
from kubernetes.client.rest import ApiException

from manifests.provision import cluster_body
from manifests.spec import parse_spec
from sandbox import fault_presets as fp
from tasks import gke, k8s
from tests.flows.conftest import spec_dict

pytestmark = pytest.mark.usefixtures("prefect_server")


def _hits(sbc, rule: dict) -> int:
    return next(f["hits"] for f in sbc.faults() if f["id"] == rule["id"])


@pytest.fixture
def kubeconfig(sandbox, tmp_path):
    """The sandbox's default API (context "sandbox"), in a kubeconfig of our own: the shared one's
    current context follows the newest GKE cluster."""
    config = yaml.safe_load(Path(sandbox.env()["KUBECONFIG"]).read_text())
    config["current-context"] = "sandbox"
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture
def short_call_timeout(monkeypatch):
    from tasks.settings import reload_settings

    monkeypatch.setenv("LLM_FLEET_CALL_TIMEOUT_S", "0.5")
    reload_settings()
    yield 0.5
    monkeypatch.delenv("LLM_FLEET_CALL_TIMEOUT_S")
    reload_settings()


def _namespace(kubeconfig: str) -> str:
    ns = f"r-{uuid.uuid4().hex[:8]}"
    k8s.apply_object(kubeconfig=kubeconfig, obj={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    return ns


# ---- Google (GKE REST via requests) ---------------------------------------------------------------

GOOGLE_TRANSIENT = {
    "connection reset (requests ConnectionError)": lambda p: fp.connection_reset(service="gke", method="GET", path=p),
    "cut-off body (requests ChunkedEncodingError)": lambda p: fp.truncated_body(service="gke", method="GET", path=p),
    "read timeout (requests ReadTimeout)": lambda p: fp.read_timeout(service="gke", method="GET", path=p, seconds=2),
    "503": lambda p: {"service": "gke", "method": "GET", "path": p, "status": 503},
}


@pytest.mark.parametrize("case", list(GOOGLE_TRANSIENT))
def test_google_transient_errors_are_retried(sbc, short_call_timeout, case):
    project = f"t-{uuid.uuid4().hex[:12]}"
    rule = sbc.add_fault(**GOOGLE_TRANSIENT[case](f"/projects/{project}/"))
    assert gke.list_clusters(project=project, location="us-central1") == []
    assert _hits(sbc, rule) == 1


@pytest.mark.parametrize("status", [400, 403, 404, 409])
def test_google_permanent_errors_are_not_retried(sbc, status):
    project = f"t-{uuid.uuid4().hex[:12]}"
    rule = sbc.add_fault(service="gke", method="GET", path=f"/projects/{project}/", status=status)
    with pytest.raises(gexc.GoogleAPICallError) as err:
        gke.list_clusters(project=project, location="us-central1")
    assert err.value.code == status
    assert _hits(sbc, rule) == 1


# ---- Compute (REST via httpx, tasks/clients.py) ----------------------------------------------------

COMPUTE_TRANSIENT = {
    "connection reset (httpx)": lambda p: fp.connection_reset(service="compute", method="GET", path=p),
    "cut-off body (httpx)": lambda p: fp.truncated_body(service="compute", method="GET", path=p),
    "read timeout (httpx)": lambda p: fp.read_timeout(service="compute", method="GET", path=p, seconds=2),
    "503": lambda p: {"service": "compute", "method": "GET", "path": p, "status": 503},
    "429": lambda p: {"service": "compute", "method": "GET", "path": p, "status": 429},
}


@pytest.mark.parametrize("case", list(COMPUTE_TRANSIENT))
def test_compute_transient_errors_are_retried(sbc, short_call_timeout, case):
    from tasks import compute

    project = f"t-{uuid.uuid4().hex[:12]}"
    rule = sbc.add_fault(**COMPUTE_TRANSIENT[case](f"/projects/{project}$"))
    assert compute.get_project_gpu_quota.fn(project=project).limit > 0
    assert _hits(sbc, rule) == 1


@pytest.mark.parametrize("status", [400, 403, 409])
def test_compute_permanent_errors_are_not_retried(sbc, status):
    from tasks import compute

    project = f"t-{uuid.uuid4().hex[:12]}"
    rule = sbc.add_fault(service="compute", method="GET", path=f"/projects/{project}$", status=status)
    with pytest.raises(gexc.GoogleAPICallError) as err:
        compute.get_project_gpu_quota.fn(project=project)
    assert err.value.code == status
    assert f"GET {os.environ['LLM_FLEET_COMPUTE_ENDPOINT']}/compute/v1/projects/{project}: " in str(err.value)
    assert _hits(sbc, rule) == 1


def test_an_unknown_region_is_a_preflight_error_naming_the_field():
    from manifests.errors import PreflightError
    from tasks import compute

    with pytest.raises(PreflightError) as err:
        compute.get_region_quota.fn(project="p-region", region="mars-north1", metric="NVIDIA_L4_GPUS")
    assert "region mars-north1 not found" in str(err.value) and "cluster.location" in str(err.value)


def test_a_name_is_one_path_segment_of_the_compute_request():
    """A name is quoted into its own segment, as the client library did: ``ip?x`` never reads address ``ip``."""
    from manifests.errors import PreflightError
    from tasks.clients import compute_http
    from tasks.cluster_checks import check_static_ip

    project = f"t-{uuid.uuid4().hex[:12]}"
    assert compute_http().post(f"projects/{project}/global/addresses", json={"name": "ip"}).status_code == 200
    assert check_static_ip.fn(project=project, name="ip").startswith("static IP ip = ")
    with pytest.raises(PreflightError, match="expose.ingress.static_ip_name"):
        check_static_ip.fn(project=project, name="ip?x")


def test_an_aggregated_list_is_read_to_its_last_page():
    """Compute pages an aggregated list (maxResults a page, nextPageToken for the rest): every page is read, and a
    token Compute never gave is refused as Compute refuses it."""
    from tasks.clients import compute_aggregated, compute_http

    whole = list(compute_aggregated("p-pages", "acceleratorTypes"))
    paged = list(compute_aggregated("p-pages", "acceleratorTypes", maxResults="2"))
    zones = {scope for scope, _ in whole}
    assert len(zones) > 4 and sum(len(t) for _, t in whole) > 2
    assert sorted((s, t["name"]) for s, types in paged for t in types) == \
        sorted((s, t["name"]) for s, types in whole for t in types)
    bad = compute_http().get("projects/p-pages/aggregated/acceleratorTypes", params={"pageToken": "nope"})
    assert bad.status_code == 400 and "pageToken" in bad.json()["error"]["message"]


def test_gke_busy_cluster_waits_and_retries_the_mutation(sbc):
    """'Cluster is running incompatible operation' (400 FAILED_PRECONDITION): wait, retry, cluster created."""
    spec = parse_spec(spec_dict("gemma2-2b-it-vllm-l4.yaml"))
    project, location = spec.cluster.project, spec.cluster.location
    rule = sbc.add_fault(**fp.gke_incompatible_operation(path=f"/projects/{project}/.*/clusters$", count=2))
    body = cluster_body(spec, location=location, zones=list(spec.cluster.zones or []) or [f"{location}-a"])
    op = gke.create_cluster(project=project, location=location, body=body)
    assert op is not None
    gke.wait_operation(project=project, location=location, operation=op)
    assert (gke.get_cluster(project=project, location=location, name=spec.cluster.name) or {})["status"] == "RUNNING"
    assert _hits(sbc, rule) == 2


def test_node_pool_create_waits_out_the_cluster_create(sbc):
    """No injected fault: GKE itself refuses a pool while the cluster's create operation runs
    ("Operation … is currently running on cluster …. Please wait and try again once it is done.")."""
    from manifests.provision import node_pool_body

    spec = parse_spec(spec_dict("gemma2-2b-it-vllm-l4.yaml"))
    project, location, zone = spec.cluster.project, spec.cluster.location, f"{spec.cluster.location}-b"
    op = gke.create_cluster(project=project, location=location, body=cluster_body(spec, location=location,
                                                                                   zones=[zone]))
    pool_op = gke.create_node_pool(project=project, location=location, cluster=spec.cluster.name,
                                   body=node_pool_body(spec, zone=zone))  # while the cluster is PROVISIONING
    assert pool_op is not None
    gke.wait_operation(project=project, location=location, operation=op)
    gke.wait_operation(project=project, location=location, operation=pool_op)
    pool = gke.get_node_pool(project=project, location=location, cluster=spec.cluster.name,
                             name=spec.accelerator.pool.name)
    assert pool is not None and pool["status"] == "RUNNING"


def test_gke_other_failed_precondition_is_not_retried(sbc):
    project = f"t-{uuid.uuid4().hex[:12]}"
    body = {"error": {"code": 400, "status": "FAILED_PRECONDITION",
                      "message": "Cluster c is being deleted and cannot be modified."}}
    rule = sbc.add_fault(service="gke", method="GET", path=f"/projects/{project}/", status=400, body=body)
    with pytest.raises(gexc.BadRequest):
        gke.list_clusters(project=project, location="us-central1")
    assert _hits(sbc, rule) == 1


# ---- Kubernetes (kubernetes client via urllib3) ----------------------------------------------------

def _kube_transient(path: str) -> dict[str, dict]:
    return {
        "connection reset": fp.connection_reset(service="kube", method="GET", path=path, count=3),
        "cut-off body": fp.truncated_body(service="kube", method="GET", path=path, count=3),
        "read timeout": fp.read_timeout(service="kube", method="GET", path=path, seconds=2, count=3),
        "500": fp.kube_status(500, "InternalError", "Internal error occurred: etcdserver: leader changed", path=path),
        "503": fp.kube_status(503, "ServiceUnavailable", "the server is currently unable to handle the request",
                              path=path),
        "504": fp.kube_status(504, "Timeout", "the server was unable to return a response in the time allotted",
                              path=path),
    }


KUBE_TRANSIENT = list(_kube_transient("x"))


@pytest.mark.parametrize("case", KUBE_TRANSIENT)
def test_kube_transient_errors_are_retried(sbc, kubeconfig, short_call_timeout, case):
    ns = _namespace(kubeconfig)
    rule = sbc.add_fault(**_kube_transient(f"/namespaces/{ns}/configmaps$")[case])
    assert k8s.list_objects(kubeconfig=kubeconfig, api_version="v1", kind="ConfigMap", namespace=ns) == []
    # every injected failure was met (urllib3 may retry a reset GET itself; the task retries the rest)
    assert _hits(sbc, rule) == rule["count"]


def test_kube_429_waits_for_retry_after(sbc, kubeconfig):
    ns = _namespace(kubeconfig)
    rule = sbc.add_fault(**fp.kube_too_many_requests(retry_after=1, path=f"/namespaces/{ns}/configmaps$"))
    start = time.monotonic()
    assert k8s.list_objects(kubeconfig=kubeconfig, api_version="v1", kind="ConfigMap", namespace=ns) == []
    assert time.monotonic() - start >= 1.0  # a lower bound: the retry waited out Retry-After (test retries: 10 ms)
    assert _hits(sbc, rule) == 1


@pytest.mark.parametrize("code,reason", [(400, "BadRequest"), (403, "Forbidden"), (404, "NotFound"),
                                         (409, "Conflict"), (422, "Invalid")])
def test_kube_permanent_errors_are_not_retried(sbc, kubeconfig, code, reason):
    ns = _namespace(kubeconfig)
    rule = sbc.add_fault(**fp.kube_status(code, reason, f"injected {reason}", path=f"/namespaces/{ns}/configmaps/c$",
                                          method="PATCH"))
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": ns}, "data": {"a": "1"}}
    with pytest.raises(Exception) as err:  # noqa: B017 - ApiException, or KubeForbidden for a 403
        k8s.apply_object(kubeconfig=kubeconfig, obj=cm)
    assert isinstance(err.value, ApiException) and err.value.status == code or (
        code == 403 and "forbidden" in str(err.value).lower())
    assert _hits(sbc, rule) == 1
    assert k8s.get_object(kubeconfig=kubeconfig, api_version="v1", kind="ConfigMap", name="c", namespace=ns) is None


def test_secret_create_503_is_retried_and_a_lost_reply_converges(sbc, kubeconfig):
    from kubernetes import client
    from pydantic import SecretStr

    from tasks.clients import kube_client

    ns = _namespace(kubeconfig)
    rule = sbc.add_fault(**fp.kube_status(503, "ServiceUnavailable", "etcd leader changed", method="POST",
                                          path=f"/namespaces/{ns}/secrets$"))
    assert k8s.ensure_secret(kubeconfig=kubeconfig, namespace=ns, name="hf", key="t", value=SecretStr("v1")) == "created"
    assert _hits(sbc, rule) == 1
    # A create whose reply was lost: the retry finds the Secret (409) and converges instead of failing.
    sbc.add_fault(**fp.kube_status(404, "NotFound", 'secrets "hf" not found', method="GET",
                                   path=f"/namespaces/{ns}/secrets/hf$"))
    assert k8s.ensure_secret(kubeconfig=kubeconfig, namespace=ns, name="hf", key="t", value=SecretStr("v2")) == "updated"
    data = client.CoreV1Api(kube_client(kubeconfig)).read_namespaced_secret("hf", ns).data
    assert data == {"t": "djI="}
