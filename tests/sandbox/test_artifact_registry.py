"""The Artifact Registry emulator: the repositories REST API through the product's own task (httpx with a
Google bearer token), its refusals, and a kubelet pulling a ``*-docker.pkg.dev`` image only once its
repository exists (a remote repository: first pull from the upstream, then from its cache)."""

from __future__ import annotations

import httpx
import pytest

from manifests.errors import PreflightError
from manifests.startup import ImageRepository
from sandbox import coldstart
from sandbox.artifact_registry import ArtifactRegistry
from sandbox.core import Clock, Faults
from sandbox.kube import KubeCluster
from sandbox.tokens import GoogleTokens
from tasks import artifact_registry as ar_tasks
from tests.sandbox.kube_support import StubRuntime, wait_for

P = "ar-test-project"
HUB = ImageRepository(P, "us-central1", "llm-fleet", "docker.io")
GHCR = ImageRepository(P, "us-central1", "llm-fleet-ghcr-io", "ghcr.io")


@pytest.fixture(scope="module")
def env():
    clock, faults = Clock(0.01), Faults()
    tokens = GoogleTokens(clock=clock, lifetime_s=3600)
    ar = ArtifactRegistry(clock=clock, faults=faults, tokens=tokens, project=P)
    ar.start()
    owner, _ = tokens.issue(f"flows@{P}.iam.gserviceaccount.com")
    stranger, _ = tokens.issue("someone@other-project.iam.gserviceaccount.com")
    yield ar, owner, stranger
    ar.stop()


def _http(ar: ArtifactRegistry, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=ar.url + "/v1/", headers=headers, timeout=10)


@pytest.fixture
def as_owner(env, monkeypatch):
    ar, owner, _ = env
    monkeypatch.setattr(ar_tasks, "artifact_registry_http", lambda: _http(ar, owner))
    return ar, owner


def test_ensure_repository_creates_once_then_finds_it(as_owner):
    ar, owner = as_owner
    assert ar_tasks.get_repository.fn(repo=HUB) is None
    live, created = ar_tasks.ensure_repository.fn(repo=HUB)
    assert created and live["name"] == HUB.name and live["mode"] == "REMOTE_REPOSITORY"
    assert live["remoteRepositoryConfig"]["dockerRepository"] == {"publicRepository": "DOCKER_HUB"}
    assert live["registryUri"] == HUB.registry
    again, created = ar_tasks.ensure_repository.fn(repo=HUB)
    assert not created and again == live
    live, created = ar_tasks.ensure_repository.fn(repo=GHCR)  # another registry: a custom upstream URI
    assert created and live["remoteRepositoryConfig"]["dockerRepository"] == {
        "customRepository": {"uri": "https://ghcr.io"}}
    listed = _http(ar, None).get(f"projects/{P}/locations/us-central1/repositories")
    assert listed.status_code == 401  # no token
    names = [r["name"] for r in _http(ar, owner).get(
        f"projects/{P}/locations/us-central1/repositories").json()["repositories"]]
    assert names == [HUB.name, GHCR.name]
    # a standard repository of that name is the user's own copy: accepted; a remote one of another upstream is not
    ar.add_repository(P, "europe-west4", "llm-fleet", mode="REMOTE_REPOSITORY",
                      remote={"dockerRepository": {"customRepository": {"uri": "https://quay.io"}}})
    with pytest.raises(PreflightError, match="not a remote repository of docker.io"):
        ar_tasks.ensure_repository.fn(repo=ImageRepository(P, "europe-west4", "llm-fleet", "docker.io"))


def test_refusals_as_artifact_registry_answers(env, monkeypatch):
    ar, owner, stranger = env
    http = _http(ar, owner)
    parent = f"projects/{P}/locations/us-east1"

    def create(repo_id: str, body: dict, client: httpx.Client = http) -> httpx.Response:
        return client.post(f"{parent}/repositories", params={"repositoryId": repo_id}, json=body)

    remote = {"format": "DOCKER", "mode": "REMOTE_REPOSITORY",
              "remoteRepositoryConfig": {"dockerRepository": {"publicRepository": "DOCKER_HUB"}}}
    cases = [("Bad_Id", remote, "Invalid repository ID"),
             ("r1", {"mode": "REMOTE_REPOSITORY"}, "format is required"),
             ("r1", {"format": "DOCKER", "mode": "REMOTE_REPOSITORY"}, "exactly one upstream"),
             ("r1", {**remote, "mode": "STANDARD_REPOSITORY"}, "only allowed for REMOTE_REPOSITORY"),
             ("r1", {**remote, "remoteRepositoryConfig": {"dockerRepository": {"publicRepository": "QUAY"}}},
              "publicRepository")]
    for repo_id, body, message in cases:
        r = create(repo_id, body)
        assert r.status_code == 400 and r.json()["error"]["status"] == "INVALID_ARGUMENT", (repo_id, r.text)
        assert message in r.json()["error"]["message"]
    r = create("r1", remote, _http(ar, stranger))
    assert r.status_code == 403 and r.json()["error"]["status"] == "PERMISSION_DENIED"
    assert "Permission 'artifactregistry.repositories.create' denied" in r.json()["error"]["message"]
    op = create("r1", remote).json()
    assert op["done"] and op["response"]["name"] == f"{parent}/repositories/r1"
    assert http.get(op["name"]).json()["done"]  # the long-running operation, read back
    r = create("r1", remote)
    assert r.status_code == 409 and r.json()["error"]["status"] == "ALREADY_EXISTS"
    r = http.get(f"{parent}/repositories/nope")
    assert r.status_code == 404 and r.json()["error"]["status"] == "NOT_FOUND"
    # the product's task says what to grant when the flows' identity may not create it
    monkeypatch.setattr(ar_tasks, "artifact_registry_http", lambda: _http(ar, stranger))
    with pytest.raises(PreflightError, match="roles/artifactregistry.admin"):
        ar_tasks.ensure_repository.fn(repo=ImageRepository(P, "us-east1", "r2", "docker.io"))


def test_a_node_pulls_through_the_repository_only_once_it_exists(env):
    """ErrImagePull/ImagePullBackOff with containerd's "not found" while the repository is missing; once it
    is created the kubelet's next try pulls (from Docker Hub, at a plain pull's speed), and a second pod's
    pull is served from the remote repository's cache."""
    from sandbox.kube.controllers import PODS
    from sandbox.kube.controllers.common import T
    from tests.sandbox.kube_support import deployment

    ar, _, _ = env
    image = f"asia-east1-docker.pkg.dev/{P}/hub/vllm/vllm-openai:v0.10.2"
    runtime = StubRuntime(Clock(0.002))
    k = KubeCluster(clock=runtime.clock, faults=Faults(), runtime=runtime)
    k.project = P
    k.controller.registry = ar.pull
    k.start()
    try:
        for node in ("a", "b"):
            k.add_node(node, labels={"pool": node}, capacity={"nvidia.com/gpu": "4"})
        k.api.create(T[("apps", "deployments")], "default", deployment("m", image=image, node_selector={"pool": "a"}))

        def waiting() -> str:
            pods = k.store.list(PODS, "default")[0]
            st = ((pods[0]["status"].get("containerStatuses") or [{}])[0].get("state") or {}) if pods else {}
            return (st.get("waiting") or {}).get("reason", "") + " " + (st.get("waiting") or {}).get("message", "")

        assert "not found" in wait_for(lambda: "ErrImagePull" in waiting() and waiting(), timeout=20)
        assert f'failed to resolve reference "{image}"' in waiting()
        wait_for(lambda: "ImagePullBackOff" in waiting(), timeout=20)
        ar.add_repository(P, "asia-east1", "hub", mode="REMOTE_REPOSITORY",
                          remote={"dockerRepository": {"publicRepository": "DOCKER_HUB"}})
        wait_for(lambda: len(k.ready_pod_ports("default", {"app": "m"})) == 1, timeout=30)
        from sandbox.kube.resources import BY_KEY

        events = [e["message"] for e in k.store.list(BY_KEY[("", "events")], "default")[0] if e["reason"] == "Pulled"]
        plain = coldstart.image_pull(image, "registry").seconds  # from the upstream: a plain pull by size
        assert any(f'Successfully pulled image "{image}" in {plain:.3g}s' in m for m in events), events
        # another node: its pull is served from the repository's cache (node a has the image: no pull)
        k.api.create(T[("apps", "deployments")], "default", deployment("m2", image=image, node_selector={"pool": "b"}))
        wait_for(lambda: len(k.ready_pod_ports("default", {"app": "m2"})) == 1, timeout=30)
        assert [how for i, how in ar.pulls if i == image] == ["upstream", "cache"]
        assert ar.snapshot()["repositories"][f"projects/{P}/locations/asia-east1/repositories/hub"]["cached"] == [
            "vllm/vllm-openai:v0.10.2"]
        # another project's repository (Google's public images) is not modelled: it resolves
        assert ar.pull("us-docker.pkg.dev/deeplearning-platform-release/gcr.io/x:1", cluster_project=P) is None
    finally:
        k.stop()
