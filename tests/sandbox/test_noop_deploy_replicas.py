"""Issue 19: a noop deploy_model under an HPA keeps the live color's replica count (fix d794ac7).

A release applies its candidate with ``spec.replicas`` (llm-fleet's field manager then owns the field); with
an HPA the rendered Deployment leaves ``replicas`` out (the HPA's). Before d794ac7 a noop deploy re-applied
that rendered Deployment, and server-side apply removes a field its manager stops sending: the API server
defaulted it to 1 under the HPA. What the noop applies (targets.gke.deploy.serving_apply) is applied here
with the product's own apply task onto a sandbox API server, and the count is read back."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client

from manifests import names
from manifests.render import applied_deployment, model_deployment
from manifests.spec import load_spec
from sandbox.core import Clock, Faults
from sandbox.kube import KubeCluster
from targets.gke.deploy import serving_apply
from tasks import k8s
from tests.sandbox.kube_support import StubRuntime, api_client, write_kubeconfig

ROOT = Path(__file__).resolve().parents[2]
SPEC = load_spec(ROOT / "deployments/llama2-7b-tgi-nginx.yaml")  # autoscaling: min 2, max 10
REV = "a" * 40
LIVE = "green"


@pytest.fixture(scope="module")
def kube():
    # Real-time clock and no nodes: nothing schedules, so no controller (the HPA's 5 min stabilization
    # included) moves the count during the test; only the applies do.
    clock = Clock(1.0)
    k = KubeCluster(clock=clock, faults=Faults(), runtime=StubRuntime(clock))
    k.start()
    client.CoreV1Api(api_client(k)).create_namespace({"metadata": {"name": SPEC.namespace}})
    yield k
    k.stop()


@pytest.fixture(scope="module")
def kubeconfig(kube, tmp_path_factory):
    return write_kubeconfig(kube, tmp_path_factory.mktemp("kube") / "config")


def _released_at(kube, kubeconfig, name_suffix: str, replicas: int) -> str:
    """The live color as a release leaves it: applied by llm-fleet with the count the release chose."""
    obj = model_deployment(SPEC, LIVE, revision=REV, replicas=replicas)
    obj["metadata"]["name"] += name_suffix
    k8s.apply_object.fn(kubeconfig=kubeconfig, obj=obj)
    return obj["metadata"]["name"]


def _replicas(kube, name: str) -> int:
    return client.AppsV1Api(api_client(kube)).read_namespaced_deployment(name, SPEC.namespace).spec.replicas


def test_a_noop_deploy_under_an_hpa_keeps_the_live_replica_count(kube, kubeconfig):
    assert SPEC.autoscaling is not None and SPEC.autoscaling.min_replicas == 2
    live = _released_at(kube, kubeconfig, "", replicas=3)
    assert _replicas(kube, live) == 3
    applied = serving_apply(SPEC, action="noop", live=LIVE, revision=REV)
    for obj in applied:
        k8s.apply_object.fn(kubeconfig=kubeconfig, obj=obj)
    assert _replicas(kube, live) == 3  # before the fix: 2 (dropped, defaulted to 1, the HPA back at its minimum)
    # the noop may apply the live Deployment only with the cluster's count (today it leaves it alone)
    assert all(o["spec"].get("replicas") == 3 for o in applied
               if o["kind"] == "Deployment" and o["metadata"]["name"] == live)
    hpa = next(o for o in applied if o["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == names.deployment(SPEC, LIVE)  # the HPA stays on the live color


def test_the_sandbox_drops_replicas_a_manager_stops_applying(kube, kubeconfig):
    """Why the noop must not re-apply the rendered Deployment: the API server's server-side apply (the
    sandbox's, as Kubernetes' "Server-Side Apply: transferring ownership" and the HPA migration note) removes
    spec.replicas when its only manager applies the object without it, and defaults it to 1."""
    name = _released_at(kube, kubeconfig, "-ssa", replicas=3)
    rendered = applied_deployment(SPEC, LIVE, revision=REV)  # what the noop applied before d794ac7
    assert "replicas" not in rendered["spec"]
    rendered["metadata"]["name"] = name
    k8s.apply_object.fn(kubeconfig=kubeconfig, obj=rendered)
    assert _replicas(kube, name) == 1
