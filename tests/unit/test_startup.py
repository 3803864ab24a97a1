"""Fast-start paths (``startup:``): each field validated with one error naming it and the fix; rendered into the
node pool, the cluster add-ons and the pod; absent, nothing changes."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from manifests import provision, startup
from manifests.render import model_deployment, render, spec_hash
from manifests.spec import SpecError, parse_spec

ROOT = Path(__file__).resolve().parents[2]
SEED1 = ROOT / "deployments/gemma2-2b-it-vllm-l4.yaml"
FAST = {"image": {"mirror": "artifact-registry", "streaming": True, "secondary_boot_disk": "vllm-serving-cache"},
        "weights": {"source": "gcs", "bucket": "llm-fleet-weights", "loader": "runai_streamer"}}


def seed1(**top) -> dict:
    data = yaml.safe_load(SEED1.read_text())
    data.update(top)
    return data


def fast(startup_section: dict | None = None, **top):
    return parse_spec(seed1(startup=startup_section or FAST, service_account="vllm", **top))


def pod_of(spec, revision="abc"):
    dep = model_deployment(spec, "blue", revision=revision)
    return dep["spec"]["template"], dep["spec"]["template"]["spec"]["containers"][0]


def test_default_renders_todays_path():
    """No startup section: the same pod template and hash as an explicit default one (today's path kept)."""
    plain, explicit = parse_spec(seed1()), parse_spec(seed1(startup={}))
    assert spec_hash(plain, "abc") == spec_hash(explicit, "abc")
    tpl, c = pod_of(plain)
    assert c["image"] == plain.engine.image_ref and "--model=google/gemma-2-2b-it" in c["args"]
    assert "weights" not in {v["name"] for v in tpl["spec"]["volumes"]}
    assert provision.node_pool_body(plain, zone="europe-west1-b")["config"]["gcfs_config"] == {"enabled": True}
    assert "secondary_boot_disks" not in provision.node_pool_body(plain, zone="europe-west1-b")["config"]


def test_gcs_streamer_and_secondary_boot_disk_render():
    spec = fast()
    tpl, c = pod_of(spec, revision="c0ffee")
    # through the Artifact Registry remote repository of Docker Hub: the upstream path kept (vllm/vllm-openai)
    assert c["image"] == "europe-west1-docker.pkg.dev/llm-fleet-demo/llm-fleet/" + spec.engine.image_ref
    assert c["args"][:2] == ["--model=gs://llm-fleet-weights/models/google/gemma-2-2b-it/c0ffee",
                             "--served-model-name=google/gemma-2-2b-it"]
    assert "--load-format=runai_streamer" in c["args"] and not any(a.startswith("--revision") for a in c["args"])
    assert tpl["spec"]["serviceAccountName"] == "vllm"
    config = provision.node_pool_body(spec, zone="europe-west1-b")["config"]
    assert config["gcfs_config"] == {"enabled": True}
    assert config["secondary_boot_disks"] == [{"disk_image": "global/images/vllm-serving-cache",
                                               "mode": "CONTAINER_IMAGE_CACHE"}]
    kinds = [r.kind for r in startup.requirements(spec, "c0ffee")]
    assert kinds == ["repository", "disk-image", "bucket", "weights"]
    for obj in render(spec, color="blue"):
        if not obj["apiVersion"].startswith(("monitoring.googleapis.com/", "monitoring.coreos.com/")):
            kubernetes_validate.validate(obj, "1.33.0", strict=True)
    assert spec_hash(spec, "abc") != spec_hash(parse_spec(seed1(service_account="vllm")), "abc")


def test_gcsfuse_and_hyperdisk_ml_mount_the_weights():
    spec = fast({"weights": {"source": "gcs", "bucket": "llm-fleet-weights", "loader": "gcsfuse"},
                 "cuda_graphs": False})
    tpl, c = pod_of(spec)
    assert tpl["metadata"]["annotations"]["gke-gcsfuse/volumes"] == "true"
    (vol,) = [v for v in tpl["spec"]["volumes"] if v["name"] == "weights"]
    assert vol["csi"]["driver"] == "gcsfuse.csi.storage.gke.io" and vol["csi"]["readOnly"]
    assert vol["csi"]["volumeAttributes"]["bucketName"] == "llm-fleet-weights"
    assert {"name": "weights", "mountPath": "/models", "readOnly": True} in c["volumeMounts"]
    assert c["args"][0] == "--model=/models/models/google/gemma-2-2b-it/abc" and "--enforce-eager" in c["args"]
    assert provision.cluster_body(spec, location="europe-west1", zones=["europe-west1-b"])["addons_config"] == {
        "gcs_fuse_csi_driver_config": {"enabled": True}}
    hd = fast({"weights": {"source": "hyperdisk-ml", "volume": "gemma-weights"}})
    tpl, c = pod_of(hd)
    assert {"name": "weights", "persistentVolumeClaim": {"claimName": "gemma-weights", "readOnly": True}} in \
        tpl["spec"]["volumes"]
    assert c["args"][0] == "--model=/models/google/gemma-2-2b-it"
    assert "--load-format=runai_streamer" in c["args"]  # concurrent reads of the local volume (vLLM's default)
    for obj in render(hd, color="blue") + render(spec, color="blue"):
        if not obj["apiVersion"].startswith(("monitoring.googleapis.com/", "monitoring.coreos.com/")):
            kubernetes_validate.validate(obj, "1.33.0", strict=True)


@pytest.mark.parametrize("section, extra, field, fix", [
    ({"weights": {"source": "gcs"}}, {"service_account": "vllm"}, "startup.weights.bucket", "set startup.weights.bucket"),
    ({"weights": {"source": "gcs", "bucket": "b-1"}}, {}, "startup.weights.source", "set service_account"),
    ({"weights": {"source": "hub", "bucket": "b-1"}}, {}, "startup.weights.bucket", "set source: gcs"),
    ({"weights": {"source": "hyperdisk-ml"}}, {}, "startup.weights.volume", "set startup.weights.volume"),
    ({"weights": {"source": "hyperdisk-ml", "volume": "w", "loader": "gcsfuse"}}, {}, "startup.weights.loader",
     "use runai_streamer with source gcs or hyperdisk-ml"),
    ({"image": {"streaming": True}}, {}, "startup.image.streaming", "mirror: artifact-registry"),
    ({"image": {"secondary_boot_disk": "cache", "streaming": False}}, {}, "startup.image.secondary_boot_disk",
     "streaming: true"),
    ({"image": {"mirror": "artifact-registry", "secondary_boot_disk": "cache"}},
     {"cluster": {"project": "llm-fleet-demo", "location": "europe-west1", "version": "1.27.8"}},
     "startup.image.secondary_boot_disk", "raise cluster.version"),
    ({"image": {"repository": "us-docker.pkg.dev/p-12345/r"}}, {}, "startup.image.repository", "mirror"),
    ({"weights": {"source": "s3"}}, {}, "startup.weights.source", ""),
    ({"image": {"secondary_boot_disk": "Not A Disk"}}, {}, "startup.image.secondary_boot_disk", ""),
])
def test_each_field_one_clear_error(section, extra, field, fix):
    with pytest.raises(SpecError) as err:
        parse_spec(seed1(startup=section, **extra))
    assert err.value.field == field, str(err.value)
    assert fix in str(err.value)


def test_sglang_cannot_use_the_runai_streamer():
    data = seed1(startup={"weights": {"source": "gcs", "bucket": "b-1"}}, service_account="vllm")
    data["engine"] = {"kind": "sglang"}
    with pytest.raises(SpecError, match="startup.weights.loader: the Run:ai streamer is vLLM's loader"):
        parse_spec(data)


def test_gce_ingress_backend_timeout_outlasts_a_held_request():
    """Behind a GCE Ingress the LB cuts a response after its backend timeout (30 s by default): the live Service
    names a BackendConfig whose timeout covers hold.timeout plus the generation (read_timeout_s)."""
    spec = parse_spec(yaml.safe_load((ROOT / "deployments/mistral-7b-vllm-spot.yaml").read_text()))
    objs = render(spec, color="blue")
    (bc,) = [o for o in objs if o["kind"] == "BackendConfig"]
    assert bc["spec"]["timeoutSec"] == 300 + spec.expose.ingress.read_timeout_s
    (live,) = [o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "mistral-7b"]
    assert live["metadata"]["annotations"]["cloud.google.com/backend-config"] == '{"default": "mistral-7b-backend"}'
    assert not [o for o in render(parse_spec(seed1()), color="blue") if o["kind"] == "BackendConfig"]  # no Ingress


def test_preflight_names_a_missing_disk_image_and_how_to_build_it():
    spec = fast()
    assert startup.disk_image_ref(spec) == ("llm-fleet-demo", "vllm-serving-cache")
    ok = startup.disk_image_check(spec, exists=True)
    assert ok.ok and ok.detail == "projects/llm-fleet-demo/global/images/vllm-serving-cache"
    missing = startup.disk_image_check(spec, exists=False)
    assert not missing.ok and "does not exist" in missing.detail
    assert missing.fix.startswith("build it with gke-disk-image-builder --container-image=europe-west1-docker.pkg.dev/")
    assert startup.disk_image_ref(parse_spec(seed1())) is None


def test_image_mirror_is_a_remote_repository_of_the_image_registry():
    """mirror: artifact-registry renders the image through a remote repository of its registry (Docker Hub by
    name, ghcr.io by URI), names it as what preflight needs, and the check says what is missing and the fix."""
    spec = parse_spec({**seed1(), "startup": {"image": {"mirror": "artifact-registry"}}})
    repo = startup.image_repository(spec)
    assert repo == startup.ImageRepository("llm-fleet-demo", "europe-west1", "llm-fleet", "docker.io")
    assert startup.image_ref(spec) == f"europe-west1-docker.pkg.dev/llm-fleet-demo/llm-fleet/{spec.engine.image_ref}"
    assert repo.body() == {"format": "DOCKER", "mode": "REMOTE_REPOSITORY", "description": repo.body()["description"],
                           "remoteRepositoryConfig": {"description": "docker.io",
                                                      "dockerRepository": {"publicRepository": "DOCKER_HUB"}}}
    (req,) = startup.requirements(spec, "abc")
    assert req.kind == "repository" and req.name == repo.registry and req.fix.startswith("run mirror_model")
    missing = startup.image_repository_check(spec, live=None)
    assert not missing.ok and "does not exist" in missing.detail and missing.fix == req.fix
    later = startup.image_repository_check(spec, live=None, created_later=True)  # provision: deploy_model makes it
    assert later.ok and "does not exist yet" in later.detail and later.fix == req.fix
    live = {"name": repo.name, "format": "DOCKER", "mode": "REMOTE_REPOSITORY",
            "remoteRepositoryConfig": {"dockerRepository": {"publicRepository": "DOCKER_HUB"}}}
    assert startup.image_repository_check(spec, live=live).ok
    other = {**live, "remoteRepositoryConfig": {"dockerRepository": {"customRepository": {"uri": "https://quay.io"}}}}
    bad = startup.image_repository_check(spec, live=other)
    assert not bad.ok and "not a remote repository of docker.io" in bad.detail
    assert startup.image_repository_check(spec, live={**live, "mode": "STANDARD_REPOSITORY"}).ok  # the user's copy
    # another registry: its own repository, a custom upstream; Docker Hub's official images under library/
    assert startup.upstream("ghcr.io/huggingface/text-generation-inference:3.0") == (
        "ghcr.io", "huggingface/text-generation-inference:3.0")
    assert startup.upstream("nginx:1.27") == ("docker.io", "library/nginx:1.27")
    assert startup.upstream("docker.io/vllm/vllm-openai:v1") == ("docker.io", "vllm/vllm-openai:v1")
    tgi = parse_spec({**seed1(), "engine": {"kind": "tgi"}, "startup": {"image": {"mirror": "artifact-registry"}}})
    ghcr = startup.image_repository(tgi)
    assert ghcr.repo_id == "llm-fleet-ghcr-io" and ghcr.docker_upstream == {"customRepository": {"uri": "https://ghcr.io"}}
    assert startup.image_ref(tgi).startswith("europe-west1-docker.pkg.dev/llm-fleet-demo/llm-fleet-ghcr-io/huggingface/")
    # the spec's own repository; an image already in Artifact Registry needs none; no mirror: nothing
    own = parse_spec({**seed1(), "startup": {"image": {"mirror": "artifact-registry",
                                                       "repository": "us-docker.pkg.dev/other-proj/cache"}}})
    assert startup.image_ref(own) == f"us-docker.pkg.dev/other-proj/cache/{own.engine.image_ref}"
    assert startup.image_repository(parse_spec(seed1())) is None
    assert startup.image_repository_check(parse_spec(seed1()), live=None) is None


# ---- GKE fast-starting nodes (startup.nodes: fast-start) ------------------------------------------------------

def test_fast_start_nodes_render_an_autopilot_class_the_pods_select_and_no_pool():
    """Standard cluster: the pods select a ComputeClass with autopilot enabled (GKE makes their G2 nodes, from its
    pre-initialized capacity), provision plans no GPU pool, the operator may apply and delete the class."""
    from manifests.render import compute_class, has_compute_class

    spec = parse_spec(seed1(startup={"nodes": "fast-start"}, cluster={**seed1()["cluster"], "version": "1.33"}))
    assert startup.autopilot_mode(spec) and has_compute_class(spec)
    cls = compute_class(spec)
    assert cls["spec"]["autopilot"] == {"enabled": True}
    (rule,) = cls["spec"]["priorities"]
    assert rule["gpu"]["type"] == "nvidia-l4" and "spot" not in rule
    assert rule["storage"] == {"bootDiskType": "pd-balanced", "bootDiskSize": 200}
    tpl, _ = pod_of(spec)
    assert tpl["spec"]["nodeSelector"] == {"cloud.google.com/compute-class": cls["metadata"]["name"]}
    objs = render(spec)
    assert [o for o in objs if o["kind"] == "ComputeClass"] == [cls]
    role = next(o for o in objs if o["kind"] == "ClusterRole")
    assert any("computeclasses" in r["resources"] for r in role["rules"])
    plan = provision.plan_provision(spec, cluster=None, pool=None, preflight=provision.Preflight())
    assert not any(a.target.startswith("node pool") for a in plan)
    # without it: today's pool, no class
    plain = parse_spec(seed1())
    assert not startup.autopilot_mode(plain) and compute_class(plain) is None


@pytest.mark.parametrize(("change", "field"), [
    ({"accelerator": {"type": "nvidia-l4", "machine_type": "g2-standard-8", "spot": True}}, "accelerator.spot"),
    ({"accelerator": {"type": "nvidia-tesla-t4"}}, "accelerator.type"),
    ({"accelerator": {"type": "nvidia-l4", "pool": {"local_ssd_count": 1}}}, "accelerator.pool.local_ssd_count"),
    ({"accelerator": {"type": "nvidia-l4", "pool": {"disk_size_gb": 600}}}, "accelerator.pool.disk_size_gb"),
    ({"cluster": {"release_channel": "regular"}}, "cluster.release_channel"),
    ({"cluster": {"version": "1.30"}}, "cluster.version"),
    ({"cluster": {"version": "1.33.1-gke.1000000"}}, "cluster.version"),
    ({"startup": {"image": {"mirror": "artifact-registry", "secondary_boot_disk": "vllm-serving-cache"}}},
     "startup.image.secondary_boot_disk"),
    ({"capacity": [{"gpu": "nvidia-l4", "provisioning": "on-demand"}, {"gpu": "nvidia-l4", "provisioning": "spot"}],
      "accelerator": {"pool": {"name": "gpupool"}}}, "capacity[1].provisioning"),
])
def test_fast_start_nodes_refuse_what_gke_would_start_at_the_normal_time(change, field):
    """One error naming the field and the fix, at load time: before anything is created or paid for."""
    data = seed1(on_spot_preemption="accept_gap")
    for key, value in change.items():
        data[key] = {**data[key], **value} if key == "cluster" else value
    data["startup"] = {**data.get("startup", {}), "nodes": "fast-start"}
    with pytest.raises(SpecError) as err:
        parse_spec(data)
    assert err.value.field == field
    assert "startup.nodes: pool" in str(err.value)  # the way out is always named


def test_fast_start_nodes_preflight_reads_the_version_the_cluster_runs_or_gets():
    spec = parse_spec(seed1(startup={"nodes": "fast-start"}))  # rapid, no pinned version: valid at load
    new = startup.fast_nodes_check(spec, version="1.30.14-gke.1009000", live=False)
    assert not new.ok and "1.33.1-gke.1107000" in new.detail and 'cluster.version: "1.33"' in new.fix
    live = startup.fast_nodes_check(spec, version="1.30.14-gke.1009000", live=True)
    assert not live.ok and "--master --cluster-version=1.33" in live.fix
    assert startup.fast_nodes_check(spec, version="1.33.5-gke.2019000", live=True).ok
    assert startup.fast_nodes_check(parse_spec(seed1()), version="1.30.14-gke.1009000", live=False) is None
    server = {"channels": [{"channel": "RAPID", "default_version": "1.30.14-gke.1009000"}]}
    assert provision.new_cluster_version(spec, server) == "1.30.14-gke.1009000"
