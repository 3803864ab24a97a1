"""mirror_model against the sandbox's Hub and Cloud Storage: a copy killed mid-file (SIGKILL of the process
doing it), the flow's rerun resumes the cut file's upload and completes the rest, the bucket holds every file
of the revision with the Hub's checksum, and a third run changes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from tests.flows.conftest import ROOT, spec_dict

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.timeout(300)]

KIB = 1024
KILL_IN = "model-00002-of-00003.safetensors"


def mirror_spec(sandbox, model_id: str, bucket: str) -> dict:
    """Weights from the bucket, the image through its Artifact Registry remote repository (of Docker Hub)."""
    return spec_dict("gemma2-2b-it-vllm-l4.yaml", model__id=model_id, service_account="vllm",
                     startup__weights={"source": "gcs", "bucket": bucket},
                     startup__image={"mirror": "artifact-registry"})


def image_repo(sandbox, spec: dict):
    """The image's repository in the sandbox's Artifact Registry (None: not there), and the image the pods run."""
    from manifests import startup
    from manifests.spec import parse_spec

    parsed = parse_spec(spec)
    repo = startup.image_repository(parsed)
    return sandbox.artifact_registry.repos.get((repo.project, repo.location, repo.repo_id)), startup.image_ref(parsed)


@pytest.fixture
def tiny(sandbox):
    """A 6 MiB model in three 2 MiB shards, a bucket of the sandbox project's, and the mirror's prefix."""
    model_id = f"sandbox-org/tiny-mirror-{uuid.uuid4().hex[:6]}"
    commit = sandbox.hub.add_model(model_id, params=3_000_000, shard_bytes=2 * 2**20)
    bucket = f"weights-{uuid.uuid4().hex[:8]}"
    sandbox.gcs.add_bucket(bucket)
    return model_id, commit, bucket, f"models/{model_id}/{commit}/"


def hub_checksums(sandbox, model_id: str, commit: str) -> dict[str, tuple[int, str]]:
    """path -> (size, checksum) as the Hub states them (its tree), for comparing with the bucket's bytes."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=sandbox.hub.url, token="hf_sandbox_read")
    return {f.path: (f.size, f"sha256:{f.lfs.sha256}" if f.lfs else f"git-blob:{f.blob_id}")
            for f in api.list_repo_tree(model_id, revision=commit, recursive=True)}


def bytes_checksum(data: bytes, kind: str) -> str:
    if kind == "sha256":
        return f"sha256:{hashlib.sha256(data).hexdigest()}"
    return f"git-blob:{hashlib.sha1(b'blob %d' % len(data) + bytes(1) + data).hexdigest()}"  # noqa: S324


def kill_mid_copy(*, model_id: str, commit: str, bucket: str, prefix: str) -> subprocess.CompletedProcess:
    """The copy in its own process (the flow's steps, small chunks), SIGKILLed by itself 1 MiB into the second
    shard: no exception handler, no finally, no last chunk — what an OOM kill or a node loss leaves."""
    script = textwrap.dedent(f"""
        import os, signal
        from pydantic import SecretStr
        import targets.gke.mirror_steps as steps

        real = steps.copy_file
        def copy_file(**kw):
            if kw["file"].path == {KILL_IN!r}:
                kw["on_chunk"] = lambda sent: sent >= 2**20 and os.kill(os.getpid(), signal.SIGKILL)
            return real(**kw)
        steps.copy_file = copy_file
        steps.copy_revision(model_id={model_id!r}, commit={commit!r}, token=SecretStr("hf_sandbox_read"),
                            project="any", bucket={bucket!r}, prefix={prefix!r}, chunk_bytes={256 * KIB})
    """)
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=dict(os.environ), capture_output=True,
                          text=True, timeout=120)


def test_killed_mid_copy_the_rerun_resumes_completes_verified_and_a_third_run_changes_nothing(sandbox, tiny, sbc):
    from flows.mirror_model import mirror_model

    model_id, commit, bucket, prefix = tiny
    want = hub_checksums(sandbox, model_id, commit)
    spec = mirror_spec(sandbox, model_id, bucket)
    assert len(want) == 9 and sum(1 for _, c in want.values() if c.startswith("sha256:")) == 3

    killed = kill_mid_copy(model_id=model_id, commit=commit, bucket=bucket, prefix=prefix)
    assert killed.returncode == -9, killed.stderr[-2000:]
    there = sandbox.gcs.objects(bucket, prefix)
    assert f"{prefix}model-00001-of-00003.safetensors" in there and f"{prefix}{KILL_IN}" not in there
    (cut,) = [s for s in sandbox.gcs.snapshot()["sessions"].values() if s["name"] == prefix + KILL_IN]
    assert not cut["done"] and cut["persisted"] == 2**20  # an unfinished upload: 1 MiB held, no object
    before = {n: o.generation for n, o in there.items()}

    assert image_repo(sandbox, spec)[0] is None
    got = mirror_model(spec=spec)
    assert got["commit"] == commit and got["uri"] == f"gs://{bucket}/{prefix}"
    repo, _ = image_repo(sandbox, spec)  # the image's mirror: a remote repository of Docker Hub, made once
    assert got["image"]["created"] and repo.mode == "REMOTE_REPOSITORY"
    assert repo.remote == {"description": "docker.io", "dockerRepository": {"publicRepository": "DOCKER_HUB"}}
    assert set(got["skipped"]) == {n.removeprefix(prefix) for n in before}  # what the killed run finished
    assert set(got["copied"]) == set(want) - set(got["skipped"]) and KILL_IN in got["copied"]
    objects = sandbox.gcs.objects(bucket, prefix)
    assert {n.removeprefix(prefix) for n in objects} == set(want)
    for path, (size, checksum) in want.items():
        obj = objects[prefix + path]
        assert len(obj.data) == size and bytes_checksum(obj.data, checksum.split(":")[0]) == checksum, path
        assert obj.metadata["hf-checksum"] == checksum and obj.metadata["hf-revision"] == commit
    assert all(objects[n].generation == g for n, g in before.items())  # skipped means untouched
    # the cut file was resumed on its session: the bytes it held were not sent again, only the rest (one chunk)
    (resumed,) = [s for s in sandbox.gcs.snapshot()["sessions"].values() if s["name"] == prefix + KILL_IN]
    assert resumed["done"] and resumed["chunks"] == cut["chunks"] + 1
    assert not list((sandbox.state_dir / "uploads").glob("*.json"))  # no session left to resume

    # the pods cannot read the bucket yet (no grant to their Kubernetes service account): said, with the fix
    warned = [m["text"] for m in sbc.slack_messages() if f"gs://{bucket} grants no object read to the pods" in m["text"]]
    assert len(warned) == 1 and "gcloud storage buckets add-iam-policy-binding" in warned[0]
    from manifests.mirror import pod_identity
    from manifests.spec import parse_spec

    member, _ = pod_identity(parse_spec(spec))
    sandbox.gcs.grant(bucket, member.replace("PROJECT_NUMBER", "123456789"))

    sessions = len(sandbox.gcs.snapshot()["sessions"])
    again = mirror_model(spec=spec)
    assert again["copied"] == [] and set(again["skipped"]) == set(want)
    assert not again["image"]["created"] and image_repo(sandbox, spec)[0] is repo  # found, not made again
    assert {n: o.generation for n, o in sandbox.gcs.objects(bucket, prefix).items()} == {
        n: o.generation for n, o in objects.items()}
    assert len(sandbox.gcs.snapshot()["sessions"]) == sessions  # no upload was even started
    dry = mirror_model(spec=spec, dry_run=True)
    assert dry["dry_run"] and {r["action"] for r in dry["plan"]} == {"already mirrored"}
    assert len([m for m in sbc.slack_messages() if f"gs://{bucket} grants no" in m["text"]]) == 1  # granted now


def test_a_spec_without_a_bucket_source_and_a_missing_bucket_are_named_with_the_fix(sandbox, tiny):
    from flows.mirror_model import mirror_model
    from manifests.errors import PreflightError
    from manifests.spec import SpecError

    model_id, _, _, _ = tiny
    hub_spec = spec_dict("gemma2-2b-it-vllm-l4.yaml", model__id=model_id)
    with pytest.raises(SpecError, match=r"startup\.weights\.source: mirror_model copies the weights into Cloud "
                                        r"Storage; this spec reads them from hub — set startup\.weights: "):
        mirror_model(spec=hub_spec)
    with pytest.raises(PreflightError, match=r"bucket gs://no-such-bucket-x \(startup\.weights\.bucket\) does not "
                                             r"exist — gcloud storage buckets create gs://no-such-bucket-x"):
        mirror_model(spec=mirror_spec(sandbox, model_id, "no-such-bucket-x"))
    assert json.dumps(sandbox.gcs.snapshot()).count("no-such-bucket-x") == 0  # nothing was created
    assert image_repo(sandbox, mirror_spec(sandbox, model_id, "no-such-bucket-x"))[0] is None  # nor a repository


def test_deploy_of_a_gcs_spec_mirrors_first_and_the_engine_streams_from_the_mirror(sandbox, tiny):
    """deploy_model with startup.weights.source gcs and startup.image.mirror: artifact-registry: the missing
    mirror is copied and the image's repository made before anything is created, the pod pulls its image through
    that repository (the first pull: from Docker Hub, then cached there), its engine loads gs://…/COMMIT/ with the
    Run:ai streamer (the sandbox times it at Cloud Storage's bandwidth), and the model answers."""
    from flows.deploy_model import deploy_model
    from flows.provision_cluster import provision_cluster
    from flows.teardown import teardown

    model_id, commit, bucket, prefix = tiny
    spec = mirror_spec(sandbox, model_id, bucket)
    provision_cluster(spec=spec)
    try:
        deploy_model(spec=spec)
        assert {n.removeprefix(prefix) for n in sandbox.gcs.objects(bucket, prefix)} == set(
            hub_checksums(sandbox, model_id, commit))
        (server,) = [s for s in sandbox.runtime.servers() if s.start_plan.load and s.start_plan.load.source == "gcs"
                     and s.name.startswith(spec["name"])]
        args = " ".join(server.pod["spec"]["containers"][0].get("args") or [])
        assert f"--model=gs://{bucket}/{prefix.rstrip('/')}" in args and "--load-format=runai_streamer" in args
        repo, image = image_repo(sandbox, spec)
        assert server.pod["spec"]["containers"][0]["image"] == image and image.startswith(repo.registry_uri + "/")
        assert (image, "upstream") in sandbox.artifact_registry.pulls and repo.cached
    finally:
        teardown(spec=spec, cluster=True)


def test_a_chunk_refused_or_cut_mid_file_is_sent_again_on_the_same_session(sandbox, tiny, sbc):
    """Cloud Storage answers 503, then the connection is reset, on the second shard's chunks: the client sends the
    chunk again on the same session (no restart, no duplicate bytes) and the object is whole (no Prefect)."""
    from pydantic import SecretStr

    from targets.gke.mirror_steps import copy_revision

    model_id, commit, bucket, prefix = tiny
    refused = sbc.add_fault(service="gcs", method="PUT", query=KILL_IN.replace(".", r"\."), status=503, count=1)
    cut = sbc.add_fault(service="gcs", method="PUT", query=KILL_IN.replace(".", r"\."), action="reset", count=1)
    copy_revision(model_id=model_id, commit=commit, token=SecretStr("hf_sandbox_read"), project="any", bucket=bucket,
                  prefix=prefix, chunk_bytes=256 * KIB)
    hits = {f["id"]: f["hits"] for f in sbc.faults()}
    assert hits[refused["id"]] == 1 and hits[cut["id"]] == 1
    (session,) = [s for s in sandbox.gcs.snapshot()["sessions"].values() if s["name"] == prefix + KILL_IN]
    assert session["done"] and session["chunks"] == 8  # 2 MiB in 256 KiB chunks, each persisted once
    size, checksum = hub_checksums(sandbox, model_id, commit)[KILL_IN]
    data = sandbox.gcs.objects(bucket, prefix)[prefix + KILL_IN].data
    assert len(data) == size and bytes_checksum(data, "sha256") == checksum
