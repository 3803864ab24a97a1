"""Seed 003 (Llama-2 on TGI, RWX cache, queue HPA, nginx Ingress) as it must be on real GKE.

provision_cluster enables the Filestore CSI add-on (the spec's cache is ReadWriteMany on standard-rwx),
so the claim binds; with the Custom Metrics Stackdriver Adapter installed the HPA scales on TGI's
queue under load and back down; without the adapter deploy_model refuses before applying anything
and names the install step.
"""

from __future__ import annotations

import threading

import pytest
from kubernetes import client

from tests.flows.conftest import spec_dict
from tests.flows.prereqs import install_ingress_nginx, install_prerequisites

pytestmark = pytest.mark.usefixtures("prefect_server")
SEED = "llama2-7b-tgi-nginx.yaml"


def _kube(spec: dict):
    from tasks.clients import kube_client
    from tasks.gke import get_credentials

    c = spec["cluster"]
    return kube_client(get_credentials.fn(project=c["project"], location=c["location"], name=c["name"]))


def _spec() -> dict:
    # small batches and a low queue target so a handful of slow requests queue up in the sandbox
    return spec_dict(SEED, engine__env={"MAX_BATCH_PREFILL_TOKENS": "4096", "MAX_BATCH_TOTAL_TOKENS": "8192",
                                        "MAX_BATCH_SIZE": "2"},
                     autoscaling__target_queue=2, autoscaling__max_replicas=4)


def test_seed003_refuses_without_its_prerequisites_then_binds_the_rwx_cache_and_scales_on_the_queue(sbc):
    """One cluster for both halves (a provision each would cost as much as the checks): first what a
    fresh cluster lacks, refused naming the install step; then, installed, the seed as it must run."""
    from flows.deploy_model import deploy_model
    from flows.provision_cluster import provision_cluster
    from tasks.clients import kube_http

    spec = _spec()
    # a cluster made earlier for an RWO cache has no Filestore add-on: the RWX spec turns it on in place
    provision_cluster(spec={**spec, "cache": {**spec["cache"], "storage_class": "standard-rwo",
                                               "access_mode": "ReadWriteOnce"}})
    api = _kube(spec)
    storage = client.StorageV1Api(api)
    assert "standard-rwx" not in {s.metadata.name for s in storage.list_storage_class().items}
    provision_cluster(spec=spec)
    assert "standard-rwx" in {s.metadata.name for s in storage.list_storage_class().items}
    _refused_without_ingress_nginx_or_the_adapter(spec, api)
    install_prerequisites(spec, api)
    sbc.add_behavior(mode="ok", match={"namespace": spec["namespace"]}, tokens_per_s=0.5)
    deploy_model(spec=spec)

    ns = spec["namespace"]
    core, auto = client.CoreV1Api(api), client.AutoscalingV2Api(api)
    pvc = next(c for c in core.list_namespaced_persistent_volume_claim(ns).items)
    assert pvc.status.phase == "Bound" and pvc.status.access_modes == ["ReadWriteMany"]
    assert pvc.spec.storage_class_name == "standard-rwx" and pvc.status.capacity["storage"] == "1Ti"  # Filestore min

    _tutorial_access(spec, api)

    hpa = auto.list_namespaced_horizontal_pod_autoscaler(ns).items[0]
    assert hpa.spec.metrics[0].pods.metric.name == "prometheus.googleapis.com|tgi_queue_size|gauge"

    def desired() -> int:
        h = auto.read_namespaced_horizontal_pod_autoscaler(hpa.metadata.name, ns)
        return h.status.desired_replicas or 0

    stop = threading.Event()

    http = kube_http(api)  # the product's shared client (thread-safe; not ours to close)

    def load() -> None:
        while not stop.is_set():
            http.post(f"/api/v1/namespaces/{ns}/services/{spec['name']}:http/proxy/generate",
                      json={"inputs": "Tell me about Kubernetes", "parameters": {"max_new_tokens": 100}},
                      timeout=60)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(16)]
    for t in threads:
        t.start()
    try:
        _wait(lambda: desired() > 2, "the HPA to scale up under queued load")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    _wait(lambda: desired() == 2, "the HPA to scale back down to minReplicas")
    reasons = [e.message for e in core.list_namespaced_event(ns).items if e.reason == "SuccessfulRescale"]
    assert any("tgi_queue_size" in m and "above target" in m for m in reasons), reasons


def _refused_without_ingress_nginx_or_the_adapter(spec: dict, api) -> None:
    """On a cluster as GKE makes it: deploy_model fails naming the install step, before applying anything."""
    from flows.deploy_model import deploy_model
    from manifests.errors import PreflightError

    with pytest.raises(PreflightError) as info:
        deploy_model(spec=spec)
    assert "IngressClass 'nginx'" in info.value.problem and "helm upgrade --install ingress-nginx" in info.value.fix
    install_ingress_nginx(api)
    with pytest.raises(PreflightError) as info:
        deploy_model(spec=spec)
    assert "custom.metrics.k8s.io" in info.value.problem
    assert "custom-metrics-stackdriver-adapter" in info.value.fix
    # refused before anything of the model was applied
    assert not _ns_exists(api, spec["namespace"]) or not client.AppsV1Api(api).list_namespaced_deployment(
        spec["namespace"]).items


def _tutorial_access(spec: dict, api) -> None:
    """The tutorial's lines against the deployed spec: kubectl port-forward service/<svc> 8080:<port> and curl;
    curl to the Ingress address with its Host header (ingress-nginx basic auth from the spec's secret)."""
    import base64
    import hashlib
    import os
    import shutil
    import subprocess
    import tempfile

    import httpx

    from sandbox.core import free_port
    from tasks.gke import get_credentials

    ns, svc = spec["namespace"], spec["name"]
    c = spec["cluster"]
    kubeconfig = get_credentials.fn(project=c["project"], location=c["location"], name=c["name"])
    if shutil.which("kubectl"):
        local = free_port()
        home = tempfile.mkdtemp(prefix="tests-kubectl-")
        proc = subprocess.Popen(["kubectl", f"--kubeconfig={kubeconfig}", f"--cache-dir={home}/cache", "-n", ns,
                                 "port-forward", f"service/{svc}", f"{local}:{spec['expose']['port']}"],
                                env={**os.environ, "HOME": home}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            line = proc.stdout.readline()
            assert line.startswith(f"Forwarding from 127.0.0.1:{local}"), (line, proc.stderr.read())
            with httpx.Client(base_url=f"http://localhost:{local}", timeout=60) as http:
                assert http.get("/health").status_code == 200
                gen = http.post("/generate", json={"inputs": "What is Kubernetes?",
                                                    "parameters": {"max_new_tokens": 8}})
                assert gen.status_code == 200 and gen.json()["generated_text"]
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    ing = client.NetworkingV1Api(api).list_namespaced_ingress(ns).items[0]
    addr = ing.status.load_balancer.ingress[0]
    url = f"http://{addr.ip}:{addr.ports[0].port}"
    host = {"Host": spec["expose"]["ingress"]["host"]}
    assert httpx.get(f"{url}/health", headers=host, timeout=30).status_code == 503  # auth secret not created yet
    sha = base64.b64encode(hashlib.sha1(b"pw").digest()).decode()  # noqa: S324 - htpasswd -s
    client.CoreV1Api(api).create_namespaced_secret(ns, {"metadata": {"name": spec["expose"]["ingress"]["auth_secret"]},
                                                        "data": {"auth": base64.b64encode(
                                                            f"ops:{{SHA}}{sha}".encode()).decode()}})
    assert httpx.get(f"{url}/health", headers=host, timeout=30).status_code == 401
    assert httpx.get(f"{url}/health", headers=host, auth=("ops", "pw"), timeout=30).status_code == 200


def _ns_exists(api, ns: str) -> bool:
    return any(n.metadata.name == ns for n in client.CoreV1Api(api).list_namespace().items)


def _wait(pred, what: str, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
