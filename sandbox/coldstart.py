"""The cold-start clock: how long a GPU node, an image pull, a weight load and an engine warm-up take
on GCP, from what the node, the pod and the storage are (pure: no I/O, no clock).

Every figure is in cloud seconds or bytes per second and is traced to its public source in
``docs/sandbox-contract.md`` ("The cold-start clock"); the kubelet, the GKE node pools / autoscaler
and the model runtime read them here, and ``bench/cold_start.py`` prints them phase by phase.

* node boot = the VM's start and the kubelet's registration by machine family, plus the GPU driver
  install GKE runs at boot (``gpuDriverInstallationConfig``; without it the driver comes later from
  the installer DaemonSet the user applies);
* image pull by size and path: a plain registry pull (download + unpack), GKE image streaming from
  Artifact Registry (the container starts once the filesystem is mounted; what the entrypoint reads
  at start streams in), a secondary boot disk holding the image (up to 29x faster than a pull), or
  an image already on the node (``IfNotPresent``: no pull at all);
* weight load by size and source: the Hub over the internet (download, then the default safetensors
  loader), a PersistentVolume that holds the weights (pd-balanced), Cloud Storage through vLLM's
  ``--load-format runai_streamer``, Cloud Storage FUSE (serving profile: parallel downloads + file
  cache), Hyperdisk ML (read-only, many nodes);
* engine warm-up: process start + CUDA init, then CUDA graph capture unless ``--enforce-eager``
  (vLLM), ``--disable-cuda-graph`` (SGLang) or ``CUDA_GRAPHS=0`` (TGI).
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
MIB = 2**20

# ---- node boot (cloud seconds) -----------------------------------------------------------------------
# VM create + guest boot + kubelet registration (Ready) by machine family; bigger accelerator VMs
# (a2/a3: many GPUs, NVSwitch, large memory) take longer.
VM_BOOT_S = {"e2": 30.0, "n1": 35.0, "n2": 30.0, "n2d": 30.0, "c2": 30.0, "c3": 30.0, "n4": 30.0,
             "g2": 40.0, "a2": 60.0, "a3": 75.0}
DEFAULT_VM_BOOT_S = 35.0
# GKE-managed driver install at boot (COS precompiled driver, loaded by the installer before the
# device plugin advertises nvidia.com/gpu), per GPU family.
DRIVER_INSTALL_S = {"nvidia-l4": 20.0, "nvidia-tesla-t4": 20.0, "nvidia-tesla-a100": 30.0,
                    "nvidia-a100-80gb": 30.0, "nvidia-h100-80gb": 35.0}
DEFAULT_DRIVER_INSTALL_S = 25.0
# Without gpuDriverInstallationConfig the user's installer DaemonSet downloads and installs the
# driver after the node registers (kubectl apply ... daemonset-preloaded.yaml): a pull and an install.
MANUAL_DRIVER_INSTALL_S = 90.0


def node_boot_s(machine_type: str, *, accelerator: str | None = None, driver: str | None = None) -> float:
    """Cloud seconds from a resize (or an autoscaler scale-up) to a GPU node the scheduler can use.

    ``driver``: the pool's ``gpuDriverVersion`` (``DEFAULT``/``LATEST``: GKE installs it at boot;
    ``INSTALLATION_DISABLED`` or none: the user's installer DaemonSet does, later)."""
    family = machine_type.split("-")[0]
    boot = VM_BOOT_S.get(family, DEFAULT_VM_BOOT_S)
    if not accelerator:
        return boot
    if driver and driver.upper() in ("DEFAULT", "LATEST"):
        return boot + DRIVER_INSTALL_S.get(accelerator, DEFAULT_DRIVER_INSTALL_S)
    return boot + MANUAL_DRIVER_INSTALL_S


# ---- images --------------------------------------------------------------------------------------------
# Compressed size of the serving images (what a pull downloads), by repository (any registry or mirror).
IMAGE_BYTES = {"vllm-openai": 9.0 * GB, "text-generation-inference": 5.0 * GB, "sglang": 11.0 * GB,
               "pytorch-vllm-serve": 9.5 * GB, "hf-tgi-serve": 5.0 * GB, "pytorch-inference": 6.0 * GB}
DEFAULT_IMAGE_BYTES = 1.0 * GB
PULL_BPS = 200e6  # download + unpack of a plain pull (containerd, one image at a time)
SECONDARY_DISK_SPEEDUP = 29.0  # "up to 29x faster" container image load from a secondary boot disk
STREAM_MOUNT_S = 2.0  # image streaming: the remote filesystem is mounted, the container starts
STREAM_WORKING_SET = 0.25  # share of the image an engine reads at start (Python, torch, CUDA libraries)
STREAM_BPS = 500e6  # image streaming backend reads, served from its cache in the region

PATHS = ("registry", "streaming", "secondary-boot-disk", "present")


def image_bytes(image: str) -> float:
    repo = image.split("@")[0].rsplit("/", 1)[-1].split(":")[0]
    return IMAGE_BYTES.get(repo, DEFAULT_IMAGE_BYTES)


def is_artifact_registry(image: str) -> bool:
    """Image streaming serves images in Artifact Registry (``LOCATION-docker.pkg.dev/...``)."""
    return image.split("/", 1)[0].endswith("-docker.pkg.dev")


@dataclass(frozen=True)
class Pull:
    path: str  # one of PATHS
    seconds: float  # kubelet's "Pulled ... in Xs"
    start_penalty_s: float = 0.0  # reads the container makes at start over the stream (image streaming)
    bytes: float = 0.0


def image_pull(image: str, path: str) -> Pull:
    size = image_bytes(image)
    if path == "present":
        return Pull(path, 0.0, 0.0, size)
    if path == "secondary-boot-disk":
        return Pull(path, size / PULL_BPS / SECONDARY_DISK_SPEEDUP, 0.0, size)
    if path == "streaming":
        return Pull(path, STREAM_MOUNT_S, size * STREAM_WORKING_SET / STREAM_BPS, size)
    return Pull("registry", size / PULL_BPS, 0.0, size)


# ---- weights ---------------------------------------------------------------------------------------------
# Bytes per second from each source into host memory, on one G2-class VM.
SOURCE_BPS = {
    "hub": 100e6,  # huggingface_hub over the internet, without hf_transfer
    "pvc": 168 * MIB,  # pd-balanced 100 GiB: 140 MiB/s baseline + 0.28 MiB/s per GiB
    "gcs": 1.0e9,  # Cloud Storage read with the Run:ai streamer's concurrent range reads
    "gcsfuse": 0.7e9,  # Cloud Storage FUSE, serving profile (parallel downloads, file cache)
    "hyperdisk-ml": 1200 * MIB,  # Hyperdisk ML read-only volume, per-VM limit of a G2 VM
}
DEFAULT_LOADER_BPS = 15e9 / 47.99  # vLLM's default safetensors loader: 15 GB in 47.99 s (NVIDIA)
SOURCES = tuple(SOURCE_BPS)


@dataclass(frozen=True)
class WeightLoad:
    source: str
    bytes: float
    download_s: float  # Hub only: the download to local disk before loading
    load_s: float  # storage -> GPU
    loader: str  # "safetensors" | "runai_streamer"

    @property
    def seconds(self) -> float:
        return self.download_s + self.load_s

    @property
    def floor_s(self) -> float:
        """The physical floor: the bytes at the source's bandwidth."""
        return self.bytes / SOURCE_BPS[self.source]


def weight_load(nbytes: float, source: str, *, streamer: bool = False) -> WeightLoad:
    """``streamer``: the Run:ai Model Streamer (concurrent reads: the source's bandwidth); otherwise the
    default safetensors loader (bounded by its own rate)."""
    bps = SOURCE_BPS[source]
    if source == "hub":  # download to the cache, then load from local disk
        loader_bps = bps if streamer else DEFAULT_LOADER_BPS
        return WeightLoad(source, nbytes, nbytes / bps, nbytes / loader_bps,
                          "runai_streamer" if streamer else "safetensors")
    rate = bps if streamer else min(bps, DEFAULT_LOADER_BPS)
    return WeightLoad(source, nbytes, 0.0, nbytes / rate, "runai_streamer" if streamer else "safetensors")


# ---- engine warm-up --------------------------------------------------------------------------------------
ENGINE_INIT_S = {"vllm": 10.0, "tgi": 8.0, "sglang": 12.0}  # process start, CUDA context, tokenizer, KV profile
CUDA_GRAPH_S = {"vllm": 15.0, "tgi": 6.0, "sglang": 15.0}  # graph capture over the batch sizes


@dataclass(frozen=True)
class Warmup:
    init_s: float
    graphs_s: float

    @property
    def seconds(self) -> float:
        return self.init_s + self.graphs_s


def engine_warmup(engine: str, *, cuda_graphs: bool = True) -> Warmup:
    if engine not in ENGINE_INIT_S:
        return Warmup(0.0, 0.0)
    return Warmup(ENGINE_INIT_S[engine], CUDA_GRAPH_S[engine] if cuda_graphs else 0.0)
