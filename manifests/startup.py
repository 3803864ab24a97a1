"""Fast-start paths of a spec (``startup:``): how a new GPU node gets the serving image and the weights, and
whether the engine captures CUDA graphs — validated, then rendered into the node pool, the cluster's add-ons
and the model pod. Pure: no I/O. Without a ``startup`` section nothing changes (today's path: the image
from its registry, the weights from the Hub through the HF cache).

    startup:
      image: {mirror: artifact-registry, streaming: true, secondary_boot_disk: vllm-serving-cache}
      weights: {source: gcs, bucket: my-weights, loader: runai_streamer}    # or gcsfuse
      # weights: {source: hyperdisk-ml, volume: gemma-weights}             # a read-only PVC already filled
      cuda_graphs: true                                                     # false: --enforce-eager
      nodes: fast-start    # GKE fast-starting nodes: the pods in Autopilot mode (then no secondary boot disk)

What each one buys (cloud seconds, ``sandbox/coldstart.py`` and docs/sandbox-contract.md): the image in
Artifact Registry streams (a few seconds instead of a 45 s pull); a secondary boot disk holds it on the
node from boot (29x faster than a pull); the weights stream from Cloud Storage at the VM's bandwidth
instead of a download from the Hub then a single-threaded load; fast-starting nodes boot a G2 node up to 4x
faster (GKE's pre-initialized capacity, best effort).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from manifests.spec import DeploymentSpec

Obj = dict[str, Any]
GCSFUSE_DRIVER = "gcsfuse.csi.storage.gke.io"
WEIGHTS_MOUNT = "/models"
MIN_SECONDARY_DISK_VERSION = (1, 28, 3)
BUCKET = r"^[a-z0-9][-_.a-z0-9]{1,61}[a-z0-9]$"
DISK_IMAGE = r"^(projects/[a-z][-a-z0-9]{4,28}[a-z0-9]/global/images/|global/images/)?[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"


class _Model(BaseModel):
    # Field docstrings are the Prefect UI form's help text (as in manifests/spec.py).
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, use_attribute_docstrings=True)


class ImageStartup(_Model):
    """How a new node gets the serving image."""

    mirror: Literal["none", "artifact-registry"] = "none"
    """Where the nodes pull the serving image from: its own registry (none), or through an Artifact Registry
    remote repository caching that registry (mirror_model creates it; the first pull fills the cache; image
    streaming serves it from there)."""
    repository: str | None = Field(None, pattern=r"^[a-z0-9-]+-docker\.pkg\.dev/[a-z][-a-z0-9]{4,28}[a-z0-9]/[a-z0-9-]+$",
                                   description="an Artifact Registry Docker repository: LOCATION-docker.pkg.dev/PROJECT/REPO")
    streaming: bool | None = None
    """Stream the image (GKE image streaming); empty: cluster.image_streaming."""
    secondary_boot_disk: str | None = Field(None, pattern=DISK_IMAGE, description=(
        "A Compute Engine disk image holding the serving image (built with gke-disk-image-builder), attached to "
        "each node as a secondary boot disk: no pull at all. Its name, global/images/NAME or "
        "projects/PROJECT/global/images/NAME"))


class WeightsStartup(_Model):
    """Where the engine reads the weights from."""

    source: Literal["hub", "gcs", "hyperdisk-ml"] = "hub"
    """hub: downloaded from the Hugging Face Hub; gcs: a Cloud Storage mirror (mirror_model copies it);
    hyperdisk-ml: a read-only volume already filled."""
    bucket: str | None = Field(None, pattern=BUCKET, description="a Cloud Storage bucket name")
    prefix: str = Field("models", pattern=r"^[-_.a-zA-Z0-9/]*$")
    """The folder in the bucket: the mirror is gs://BUCKET/PREFIX/ORG/NAME/COMMIT/."""
    loader: Literal["runai_streamer", "gcsfuse"] | None = None
    """gcs only: runai_streamer (vLLM streams gs:// itself) or gcsfuse (a Cloud Storage FUSE volume);
    empty: runai_streamer."""
    volume: str | None = Field(None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                               description="the name of a PersistentVolumeClaim (Hyperdisk ML, ReadOnlyMany)")


class StartupSpec(_Model):
    """Fast-start paths of a new replica: the image, the weights, the engine's warm-up."""

    image: ImageStartup = ImageStartup()
    """How a new node gets the serving image."""
    weights: WeightsStartup = WeightsStartup()
    """Where the engine reads the weights from."""
    cuda_graphs: bool = True
    """Capture CUDA graphs at start (faster decoding, ~15 s more warm-up); false: --enforce-eager."""
    nodes: Literal["pool", "fast-start"] = "pool"
    """pool: GPU nodes from the spec's node pool (or capacity options' pools). fast-start: the model's pods run
    in Autopilot mode (on Standard, a ComputeClass with autopilot enabled; an Autopilot cluster already is), so
    GKE starts their G2 nodes from its pre-initialized capacity: up to 4x faster, best effort. On-demand L4
    only, Rapid channel, GKE 1.33.1-gke.1107000+ on Standard (1.31+ on Autopilot), no local SSD."""

    @property
    def is_default(self) -> bool:
        return self == StartupSpec()


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("-")[0].split(".")[:3] if x.isdigit())


def streaming_on(spec: DeploymentSpec) -> bool:
    s = spec.startup.image.streaming
    return spec.cluster.image_streaming if s is None else s


def loader(spec: DeploymentSpec) -> str | None:
    """How the engine reads the weights: the Run:ai streamer (vLLM: concurrent reads, from gs:// or a local
    volume), GCS FUSE, or None — the engine's default loader (the Hub path)."""
    w = spec.startup.weights
    if w.source == "gcs":
        return w.loader or "runai_streamer"
    if w.source == "hyperdisk-ml":
        return w.loader or ("runai_streamer" if spec.engine.kind == "vllm" else None)
    return None


def check(spec: DeploymentSpec, error: type[Exception]) -> None:
    """Each field's rule; raises ``error(field, problem, fix)`` (the spec's SpecError) for the first broken one."""
    st, eng, c = spec.startup, spec.engine, spec.cluster
    img, w = st.image, st.weights
    if img.repository and img.mirror != "artifact-registry":
        raise error("startup.image.repository", "a repository is only used by the Artifact Registry mirror",
                    "set startup.image.mirror: artifact-registry or drop repository")
    if streaming_on(spec) and spec.startup.image.streaming and img.mirror != "artifact-registry" and not _in_ar(
            eng.image_ref):
        raise error("startup.image.streaming", f"image streaming serves images from Artifact Registry; "
                    f"{eng.image_ref} is not there", "set startup.image.mirror: artifact-registry (mirror_model "
                    "creates its remote repository) or use an image from LOCATION-docker.pkg.dev")
    if img.secondary_boot_disk:
        if c.mode == "autopilot":
            raise error("startup.image.secondary_boot_disk", "Autopilot picks secondary boot disks per workload "
                        "(a ComputeClass), not per node pool", "drop it, or use cluster.mode: standard")
        if not streaming_on(spec):
            raise error("startup.image.secondary_boot_disk", "a container image cache on a secondary boot disk "
                        "needs image streaming on the node pool", "set startup.image.streaming: true "
                        "(or cluster.image_streaming: true)")
        if c.version and _version(c.version) < MIN_SECONDARY_DISK_VERSION:
            raise error("startup.image.secondary_boot_disk", f"needs GKE 1.28.3-gke.1067000 or later, "
                        f"cluster.version is {c.version}", "raise cluster.version or drop it to follow the channel")
    if w.source == "gcs":
        if not w.bucket:
            raise error("startup.weights.bucket", "weights from Cloud Storage need the bucket they are in",
                        "set startup.weights.bucket (mirror_model copies the Hub revision there once)")
        if (w.loader or "runai_streamer") == "runai_streamer" and eng.kind != "vllm":
            raise error("startup.weights.loader", f"the Run:ai streamer is vLLM's loader (--load-format "
                        f"runai_streamer); {eng.kind} cannot use it", "use loader: gcsfuse")
        if not (c.workload_identity and spec.service_account):
            raise error("startup.weights.source", "the pods read the bucket as their Kubernetes service account "
                        "through Workload Identity", "set service_account (with cluster.workload_identity: true) "
                        "and grant it roles/storage.objectViewer on the bucket")
    else:
        if w.bucket:
            raise error("startup.weights.bucket", f"only used with source gcs (source is {w.source})",
                        "drop startup.weights.bucket or set source: gcs")
        if w.loader and (w.source == "hub" or w.loader == "gcsfuse"):
            raise error("startup.weights.loader", f"loader {w.loader} does not read weights from {w.source}",
                        "drop startup.weights.loader, or use runai_streamer with source gcs or hyperdisk-ml")
        if w.loader == "runai_streamer" and eng.kind != "vllm":
            raise error("startup.weights.loader", f"the Run:ai streamer is vLLM's loader; {eng.kind} cannot use "
                        "it", "drop startup.weights.loader")
    if st.nodes == "fast-start":
        _check_fast_nodes(spec, error)
    if w.source == "hyperdisk-ml":
        if not w.volume:
            raise error("startup.weights.volume", "Hyperdisk ML weights are read from a read-only volume that "
                        "already holds them", "set startup.weights.volume to its PersistentVolumeClaim's name")
    elif w.volume:
        raise error("startup.weights.volume", f"only used with source hyperdisk-ml (source is {w.source})",
                    "drop startup.weights.volume or set source: hyperdisk-ml")


# ---- GKE fast-starting nodes (startup.nodes: fast-start) ------------------------------------------------
# cloud.google.com/kubernetes-engine/docs/concepts/fast-starting-nodes: Autopilot mode, G2 (L4), pd-balanced boot
# disk <= 500 GiB, Rapid channel, G2 on GKE >= 1.31; not Spot VMs, local SSDs, CMEK, placement policies.
# .../how-to/autopilot-classes-standard-clusters: a Standard cluster runs a ComputeClass in Autopilot mode
# from 1.33.1-gke.1107000 (Rapid channel).
FAST_NODES_GPU = "nvidia-l4"
FAST_NODES_MAX_DISK_GB = 500
FAST_NODES_MIN = {"autopilot": (1, 31, 0, 0), "standard": (1, 33, 1, 1107000)}


def fast_nodes(spec: DeploymentSpec) -> bool:
    return spec.startup.nodes == "fast-start"


def autopilot_mode(spec: DeploymentSpec) -> bool:
    """The model's pods run in Autopilot mode: GKE makes their nodes, there is no GPU node pool to size."""
    return spec.cluster.mode == "autopilot" or fast_nodes(spec)


def _meets(version: str, need: tuple[int, ...]) -> bool:
    """``1.33`` (a minor: the channel's newest patch of it), ``1.33.5`` or ``1.33.5-gke.2019000`` against ``need``."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?(?:-gke\.(\d+))?", version or "")
    if not m:
        return False
    got = [int(x) for x in m.groups() if x is not None]
    return tuple(got) >= tuple(need[:len(got)])


def fast_nodes_min_version(spec: DeploymentSpec) -> str:
    return "1.31" if spec.cluster.mode == "autopilot" else "1.33.1-gke.1107000"


def _check_fast_nodes(spec: DeploymentSpec, error: type[Exception]) -> None:
    c, pool, off = spec.cluster, spec.accelerator.pool, "or set startup.nodes: pool"
    for i, opt in enumerate(spec.capacity_options):
        at = f"capacity[{i}]" if spec.capacity else "accelerator"
        if opt.gpu != FAST_NODES_GPU:
            raise error(f"{at}.{'gpu' if spec.capacity else 'type'}", f"GKE's fast-starting nodes are G2 machines "
                        f"with NVIDIA L4 GPUs; {opt.gpu} nodes start at the normal time", f"use {FAST_NODES_GPU}, {off}")
        if opt.machine_type and not opt.machine_type.startswith("g2-"):
            raise error(f"{at}.machine_type", f"fast-starting nodes are G2 machines, not {opt.machine_type}",
                        f"drop machine_type (Autopilot sizes the G2 node to the pod), {off}")
        if opt.provisioning == "spot":
            raise error(f"{at}.{'provisioning' if spec.capacity else 'spot'}", "Spot VMs are incompatible with "
                        "fast-starting nodes (GKE boots them at the normal time)",
                        f"use on-demand VMs ({at}.{'provisioning: on-demand' if spec.capacity else 'spot: false'}), "
                        f"{off}")
    if pool.local_ssd_count:
        raise error("accelerator.pool.local_ssd_count", "local SSDs are incompatible with fast-starting nodes",
                    f"set local_ssd_count: 0, {off}")
    if pool.disk_size_gb > FAST_NODES_MAX_DISK_GB:
        raise error("accelerator.pool.disk_size_gb", f"fast-starting nodes have a pd-balanced boot disk of at most "
                    f"{FAST_NODES_MAX_DISK_GB} GiB, not {pool.disk_size_gb}", f"set disk_size_gb: "
                    f"{FAST_NODES_MAX_DISK_GB} or less, {off}")
    if c.release_channel != "rapid":
        raise error("cluster.release_channel", f"fast-starting nodes need the Rapid release channel, not "
                    f"{c.release_channel}", f"set cluster.release_channel: rapid, {off}")
    if c.version and not _meets(c.version, FAST_NODES_MIN[c.mode]):
        what = "G2 fast-starting nodes" if c.mode == "autopilot" else "pods of a Standard cluster in Autopilot mode"
        raise error("cluster.version", f"{c.version} is older than {fast_nodes_min_version(spec)}, the first GKE "
                    f"version that runs {what}", f"set cluster.version: \"1.33\" or later, {off}")
    if spec.startup.image.secondary_boot_disk:
        raise error("startup.image.secondary_boot_disk", "Autopilot-mode nodes take no node pool settings, so no "
                    "secondary boot disk", "drop it (Autopilot streams the image from Artifact Registry: "
                    f"startup.image.mirror: artifact-registry), {off}")


def fast_nodes_check(spec: DeploymentSpec, *, version: str, live: bool) -> Any:
    """The preflight line for fast-starting nodes: the version the cluster runs (``live``) or will be created
    at (the pinned one, or its channel's default) is new enough. None without ``startup.nodes: fast-start``."""
    from manifests.checks import Check

    if not fast_nodes(spec):
        return None
    need = fast_nodes_min_version(spec)
    what = f"cluster {spec.cluster.name} runs {version}" if live else f"a new cluster gets {version}"
    if _meets(version, FAST_NODES_MIN[spec.cluster.mode]):
        return Check("fast-starting nodes", True, f"{what} (>= {need}), Rapid channel, on-demand L4")
    fix = ("upgrade the cluster's control plane to 1.33 or later (gcloud container clusters upgrade "
           f"{spec.cluster.name} --master --cluster-version=1.33)" if live else "set cluster.version: \"1.33\"")
    return Check("fast-starting nodes", False, f"{what}, older than {need}: GKE would start its GPU nodes at the "
                 "normal time" + ("" if spec.cluster.mode == "autopilot" else " (no Autopilot-mode ComputeClass)"),
                 f"{fix}, or set startup.nodes: pool")


def _in_ar(image: str) -> bool:
    return image.split("/", 1)[0].endswith("-docker.pkg.dev")


# ---- rendering -----------------------------------------------------------------------------------------

# ---- the image's mirror (startup.image.mirror: artifact-registry) --------------------------------------
# An Artifact Registry *remote* repository, not a copy into a standard one: a remote repository is a
# pull-through cache of Docker Hub (publicRepository: DOCKER_HUB) or any registry (customRepository.uri,
# e.g. https://ghcr.io) — the first pull of LOCATION-docker.pkg.dev/PROJECT/REPO/<upstream path>:tag fetches
# the image from the upstream and caches it, later pulls are served from the repository — so mirror_model
# copies nothing (no docker/crane, no 9 GB through the flows' worker), and GKE image streaming serves
# images "stored in a standard or remote repository in Artifact Registry" (its requirements), so once
# cached the pods stream it. Sources: docs/sandbox-contract.md ("Artifact Registry").
DOCKER_HUB = "docker.io"
_DOCKER_HUB_HOSTS = {"docker.io", "index.docker.io", "registry-1.docker.io"}


def upstream(image: str) -> tuple[str, str]:
    """(registry host, path:tag) of an image reference; Docker Hub's official images under ``library/``."""
    first, _, rest = image.partition("/")
    host, path = (first, rest) if rest and ("." in first or ":" in first or first == "localhost") else (
        DOCKER_HUB, image)
    if host in _DOCKER_HUB_HOSTS:
        return DOCKER_HUB, path if "/" in path else f"library/{path}"
    return host, path


@dataclass(frozen=True)
class ImageRepository:
    """The Artifact Registry Docker remote repository the pods pull the serving image through."""

    project: str
    location: str
    repo_id: str
    upstream: str  # the registry it caches: docker.io, ghcr.io, ...

    @property
    def name(self) -> str:
        return f"projects/{self.project}/locations/{self.location}/repositories/{self.repo_id}"

    @property
    def registry(self) -> str:
        return f"{self.location}-docker.pkg.dev/{self.project}/{self.repo_id}"

    @property
    def docker_upstream(self) -> Obj:
        """``remoteRepositoryConfig.dockerRepository``: Docker Hub by name, any other registry by URI."""
        if self.upstream == DOCKER_HUB:
            return {"publicRepository": "DOCKER_HUB"}
        return {"customRepository": {"uri": f"https://{self.upstream}"}}

    def body(self) -> Obj:
        """The create request's Repository (projects.locations.repositories.create, ?repositoryId=repo_id)."""
        what = f"pull-through cache of {self.upstream} (llm-fleet mirror_model)"
        return {"format": "DOCKER", "mode": "REMOTE_REPOSITORY", "description": what,
                "remoteRepositoryConfig": {"description": self.upstream, "dockerRepository": self.docker_upstream}}

    def problem(self, live: Obj) -> str | None:
        """Why an existing repository of this name cannot serve the image; None when it can. A standard
        repository is the user's own copy (they pushed the image there): accepted as it is."""
        if live.get("format") != "DOCKER":
            return f"{self.registry} is a {live.get('format')} repository, not DOCKER"
        if live.get("mode", "STANDARD_REPOSITORY") == "STANDARD_REPOSITORY":
            return None
        docker = (live.get("remoteRepositoryConfig") or {}).get("dockerRepository") or {}
        if live.get("mode") != "REMOTE_REPOSITORY" or docker != self.docker_upstream:
            return (f"{self.registry} is a {live.get('mode')} with upstream {docker or 'none'}, not a remote "
                    f"repository of {self.upstream}")
        return None


def image_repository(spec: DeploymentSpec) -> ImageRepository | None:
    """The remote repository the spec's image is pulled through; None without the mirror (or for an image
    already in Artifact Registry). Default: the cluster's region (image streaming serves a repository in
    the nodes' region), ``llm-fleet`` for Docker Hub, ``llm-fleet-<host>`` for another registry."""
    image = spec.engine.image_ref
    if spec.startup.image.mirror != "artifact-registry" or _in_ar(image):
        return None
    host = upstream(image)[0]
    if spec.startup.image.repository:
        loc_host, project, repo_id = spec.startup.image.repository.split("/")
        return ImageRepository(project, loc_host.removesuffix("-docker.pkg.dev"), repo_id, host)
    repo_id = "llm-fleet" if host == DOCKER_HUB else "llm-fleet-" + re.sub(r"[^a-z0-9]+", "-", host.lower()).strip("-")
    return ImageRepository(spec.cluster.project, spec.cluster.region, repo_id[:63].rstrip("-"), host)


def repository(spec: DeploymentSpec) -> str:
    repo = image_repository(spec)
    return repo.registry if repo else ""


def image_ref(spec: DeploymentSpec) -> str:
    """The image the pods run: the spec's, or the same image through its Artifact Registry remote repository
    (``LOCATION-docker.pkg.dev/PROJECT/REPO/<upstream path>:tag``)."""
    repo = image_repository(spec)
    if repo is None:
        return spec.engine.image_ref
    return f"{repo.registry}/{upstream(spec.engine.image_ref)[1]}"


def image_repository_check(spec: DeploymentSpec, *, live: Obj | None, created_later: bool = False) -> Any:
    """The preflight line for the image's repository (``live``: the repository as Artifact Registry
    returns it, None when it does not exist). None without the mirror. ``created_later``: a missing one is
    not a failure (provision_cluster: deploy_model creates it before anything pulls), only said."""
    from manifests.checks import Check

    repo = image_repository(spec)
    if repo is None:
        return None
    (req,) = [r for r in requirements(spec, spec.model.revision) if r.kind == "repository"]
    if live is None and created_later:
        return Check("image mirror", True, f"Artifact Registry repository {repo.registry} does not exist yet: "
                     f"deploy_model creates it before the pods pull {image_ref(spec)}", req.fix)
    if live is None:
        return Check("image mirror", False, f"Artifact Registry repository {repo.registry} does not exist: the "
                     f"pods' image {image_ref(spec)} cannot be pulled (ErrImagePull)", req.fix)
    problem = repo.problem(live)
    if problem:
        return Check("image mirror", False, f"{problem}: the pods' image {image_ref(spec)} cannot be pulled "
                     "through it", "set startup.image.repository to another LOCATION-docker.pkg.dev/PROJECT/REPO "
                     "(mirror_model creates it), or delete this one")
    how = ("remote repository: the first pull caches it" if live.get("mode") == "REMOTE_REPOSITORY" else
           "standard repository: the image must have been pushed there")
    return Check("image mirror", True, f"{image_ref(spec)} ({how})")


def weights_uri(spec: DeploymentSpec, revision: str) -> str:
    """Where mirror_model puts a Hub revision: ``gs://BUCKET/PREFIX/ORG/NAME/REVISION``."""
    w = spec.startup.weights
    return "/".join(p for p in (f"gs://{w.bucket}", w.prefix.strip("/"), spec.model.id, revision) if p)


def model_path(spec: DeploymentSpec, revision: str) -> str | None:
    """The engine's model argument when the weights do not come from the Hub; None = the Hub id."""
    w = spec.startup.weights
    if w.source == "gcs" and loader(spec) == "runai_streamer":
        return weights_uri(spec, revision)
    if w.source == "gcs":  # the bucket mounted by the GCS FUSE CSI driver
        return weights_uri(spec, revision).replace(f"gs://{w.bucket}", WEIGHTS_MOUNT, 1)
    if w.source == "hyperdisk-ml":
        return f"{WEIGHTS_MOUNT}/{spec.model.id}"
    return None


def adjust_container(spec: DeploymentSpec, container: Obj, revision: str) -> None:
    """The engine container for the startup paths: the mirrored image, the weights' path and loader, the
    served name kept as the Hub id (clients still ask for it), eager mode; the volume mount."""
    st, kind = spec.startup, spec.engine.kind
    container["image"] = image_ref(spec)
    args: list[str] = list(container.get("args") or [])
    env: list[Obj] = container.setdefault("env", [])
    path = model_path(spec, revision)
    if path is not None:
        if kind == "vllm":
            args = [a for a in args if not a.startswith(("--model=", "--revision="))]
            args[:0] = [f"--model={path}", f"--served-model-name={spec.model.id}"]
            if loader(spec) == "runai_streamer":
                args.append("--load-format=runai_streamer")
        elif kind == "tgi":
            for e in env:
                if e.get("name") == "MODEL_ID":
                    e["value"] = path
            env[:] = [e for e in env if e.get("name") != "REVISION"]
        else:  # sglang
            i = args.index("--model-path")
            args[i + 1] = path
            j = args.index("--revision")
            del args[j:j + 2]
            args += ["--served-model-name", spec.model.id]
        if st.weights.source != "gcs" or loader(spec) == "gcsfuse":
            container.setdefault("volumeMounts", []).append(
                {"name": "weights", "mountPath": WEIGHTS_MOUNT, "readOnly": True})
    if not st.cuda_graphs:
        if kind == "vllm":
            args.append("--enforce-eager")
        elif kind == "sglang":
            args.append("--disable-cuda-graph")
        else:
            env.append({"name": "CUDA_GRAPHS", "value": "0"})
    if args:
        container["args"] = args


def volumes(spec: DeploymentSpec) -> list[Obj]:
    w = spec.startup.weights
    if w.source == "gcs" and loader(spec) == "gcsfuse":
        # GKE's serving profile for model weights: parallel downloads into the file cache, metadata
        # prefetched at mount, read-only.
        return [{"name": "weights", "csi": {"driver": GCSFUSE_DRIVER, "readOnly": True, "volumeAttributes": {
            "bucketName": w.bucket, "mountOptions": "implicit-dirs,file-cache:enable-parallel-downloads:true,"
            "file-cache:max-parallel-downloads:-1,file-system:kernel-list-cache-ttl-secs:-1",
            "fileCacheCapacity": "-1", "fileCacheForRangeRead": "true",
            "gcsfuseMetadataPrefetchOnMount": "true"}}}]
    if w.source == "hyperdisk-ml":
        return [{"name": "weights", "persistentVolumeClaim": {"claimName": w.volume, "readOnly": True}}]
    return []


def pod_annotations(spec: DeploymentSpec) -> dict[str, str]:
    if spec.startup.weights.source == "gcs" and loader(spec) == "gcsfuse":
        return {"gke-gcsfuse/volumes": "true"}  # the CSI driver injects its sidecar into this pod
    return {}


def node_config(spec: DeploymentSpec) -> Obj:
    """The GPU node pool's config fields (proto names) for image streaming and the secondary boot disk."""
    img, out = spec.startup.image, {}
    if streaming_on(spec):
        out["gcfs_config"] = {"enabled": True}
    if img.secondary_boot_disk:
        name = img.secondary_boot_disk
        ref = name if "/" in name else f"global/images/{name}"
        out["secondary_boot_disks"] = [{"disk_image": ref, "mode": "CONTAINER_IMAGE_CACHE"}]
        out["secondary_boot_disk_update_strategy"] = {}
    return out


def cluster_addons(spec: DeploymentSpec) -> Obj:
    if spec.startup.weights.source == "gcs" and loader(spec) == "gcsfuse" and spec.cluster.mode != "autopilot":
        return {"gcs_fuse_csi_driver_config": {"enabled": True}}
    return {}


# ---- what must exist before a deploy (preflight) ----------------------------------------------------------

def disk_image_ref(spec: DeploymentSpec) -> tuple[str, str] | None:
    """(project, image name) of the secondary boot disk's image, or None."""
    ref = spec.startup.image.secondary_boot_disk
    if not ref:
        return None
    parts = ref.split("/")
    return (parts[1], parts[-1]) if ref.startswith("projects/") else (spec.cluster.project, parts[-1])


def disk_image_check(spec: DeploymentSpec, *, exists: bool) -> Any:
    """The preflight line for the secondary boot disk's image (GKE refuses the pool without it)."""
    from manifests.checks import Check

    project, name = disk_image_ref(spec) or ("", "")
    if exists:
        return Check("secondary boot disk image", True, f"projects/{project}/global/images/{name}")
    (req,) = [r for r in requirements(spec, spec.model.revision) if r.kind == "disk-image"]
    return Check("secondary boot disk image", False, f"projects/{project}/global/images/{name} does not exist "
                 "(GKE refuses a node pool whose secondary boot disk has no image)", req.fix)


@dataclass(frozen=True)
class Requirement:
    kind: Literal["disk-image", "bucket", "weights", "repository", "volume"]
    name: str
    fix: str


def requirements(spec: DeploymentSpec, revision: str) -> list[Requirement]:
    """What the startup paths read at a node's or a pod's start, each with how to make it exist."""
    st, out = spec.startup, []
    if (repo := image_repository(spec)) is not None:
        out.append(Requirement("repository", repo.registry, f"run mirror_model (creates the Artifact Registry "
                               f"remote repository {repo.registry}, a pull-through cache of {repo.upstream}: the "
                               f"first pull of {image_ref(spec)} caches {spec.engine.image_ref})"))
    if st.image.secondary_boot_disk:
        out.append(Requirement("disk-image", st.image.secondary_boot_disk,
                               f"build it with gke-disk-image-builder --container-image={image_ref(spec)} "
                               f"--project-name={spec.cluster.project} --image-name="
                               f"{st.image.secondary_boot_disk.rsplit('/', 1)[-1]}"))
    if st.weights.source == "gcs":
        out.append(Requirement("bucket", st.weights.bucket or "", f"gcloud storage buckets create gs://"
                               f"{st.weights.bucket} --location={spec.cluster.region}, then grant the pods' "
                               f"service account roles/storage.objectViewer"))
        out.append(Requirement("weights", weights_uri(spec, revision), "run mirror_model (copies the revision's "
                               "weights there once, verified by sha256)"))
    if st.weights.source == "hyperdisk-ml":
        out.append(Requirement("volume", st.weights.volume or "", "create a Hyperdisk ML volume holding the "
                               "weights and a ReadOnlyMany PersistentVolumeClaim bound to it"))
    return out
