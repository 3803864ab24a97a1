"""Static facts about GPUs, machine types and serving engines (pure data, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Accelerator:
    type: str  # GKE accelerator type, as in --accelerator type=...
    memory_gib: int
    quota_metric: str  # regional Compute quota metric; spot uses PREEMPTIBLE_<metric>
    machine_types: dict[int, str]  # GPUs per node -> default machine type
    vertex_name: str  # Vertex AI's enum name for the same GPU

    def spot_quota_metric(self) -> str:
        return f"PREEMPTIBLE_{self.quota_metric}"

    def quota_metric_for(self, *, spot: bool) -> str:
        return self.spot_quota_metric() if spot else self.quota_metric


ACCELERATORS: dict[str, Accelerator] = {
    a.type: a
    for a in (
        Accelerator("nvidia-l4", 24, "NVIDIA_L4_GPUS",
                    {1: "g2-standard-8", 2: "g2-standard-24", 4: "g2-standard-48", 8: "g2-standard-96"},
                    "NVIDIA_L4"),
        # The virtual-workstation flavour seed 001 uses; same silicon, its own quota metric.
        Accelerator("nvidia-l4-vws", 24, "NVIDIA_L4_VWS_GPUS",
                    {1: "g2-standard-8", 2: "g2-standard-24", 4: "g2-standard-48", 8: "g2-standard-96"},
                    "NVIDIA_L4"),
        Accelerator("nvidia-tesla-t4", 16, "NVIDIA_T4_GPUS",
                    {1: "n1-standard-8", 2: "n1-standard-16", 4: "n1-standard-32"}, "NVIDIA_TESLA_T4"),
        Accelerator("nvidia-tesla-a100", 40, "NVIDIA_A100_GPUS",
                    {1: "a2-highgpu-1g", 2: "a2-highgpu-2g", 4: "a2-highgpu-4g", 8: "a2-highgpu-8g"},
                    "NVIDIA_TESLA_A100"),
        Accelerator("nvidia-a100-80gb", 80, "NVIDIA_A100_80GB_GPUS",
                    {1: "a2-ultragpu-1g", 2: "a2-ultragpu-2g", 4: "a2-ultragpu-4g", 8: "a2-ultragpu-8g"},
                    "NVIDIA_A100_80GB"),
        Accelerator("nvidia-h100-80gb", 80, "NVIDIA_H100_GPUS",
                    {1: "a3-highgpu-1g", 2: "a3-highgpu-2g", 4: "a3-highgpu-4g", 8: "a3-highgpu-8g"},
                    "NVIDIA_H100_80GB"),
    )
}

# vCPUs and memory (GiB) of the GPU machine types (cloud.google.com/compute/docs/gpus): what a model pod
# may request once the kubelet, GKE's system daemons and eviction threshold have taken their share.
MACHINE_SHAPES: dict[str, tuple[int, int]] = {
    "g2-standard-8": (8, 32), "g2-standard-12": (12, 48), "g2-standard-16": (16, 64),
    "g2-standard-24": (24, 96), "g2-standard-32": (32, 128), "g2-standard-48": (48, 192),
    "g2-standard-96": (96, 384),
    "n1-standard-4": (4, 15), "n1-standard-8": (8, 30), "n1-standard-16": (16, 60), "n1-standard-32": (32, 120),
    "a2-highgpu-1g": (12, 85), "a2-highgpu-2g": (24, 170), "a2-highgpu-4g": (48, 340), "a2-highgpu-8g": (96, 680),
    "a2-ultragpu-1g": (12, 170), "a2-ultragpu-2g": (24, 340), "a2-ultragpu-4g": (48, 680),
    "a2-ultragpu-8g": (96, 1360),
    "a3-highgpu-1g": (26, 234), "a3-highgpu-2g": (52, 468), "a3-highgpu-4g": (104, 936),
    "a3-highgpu-8g": (208, 1872),
}


def pod_resources(machine_type: str) -> tuple[str, str]:
    """(cpu, memory) a one-pod-per-node model server requests and is limited to on ``machine_type``:
    the node's allocatable minus room for system pods (~1.5 vCPU, 20% of memory), so the pod schedules
    and gets the Guaranteed QoS class (requests == limits, with its GPUs)."""
    vcpus, mem_gib = MACHINE_SHAPES.get(machine_type, (8, 32))
    cpu = max(1.0, vcpus - 1.5 if vcpus <= 16 else vcpus * 0.9)
    return f"{cpu:g}", f"{max(4, int(mem_gib * 0.8))}Gi"


# Bytes per parameter by weight format; quantization wins over dtype.
BYTES_PER_PARAM: dict[str, float] = {
    "float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "auto": 2.0,
    "fp8": 1.0, "int8": 1.0, "bitsandbytes": 0.5, "awq": 0.5, "gptq": 0.5, "eetq": 1.0,
}

# Weights are not the whole story: CUDA context, activations and a minimal KV cache.
FIT_HEADROOM = 1.2
FIT_OVERHEAD_GIB = 1.0


@dataclass(frozen=True)
class Engine:
    kind: str
    image: str
    port: int
    # Prometheus gauge of queued requests: what an HPA should scale on.
    queue_metric: str
    running_metric: str
    # Whether the engine can serve image+text models (PaliGemma, LLaVA, ...).
    serves_vision: bool
    streams: bool


ENGINES: dict[str, Engine] = {
    "vllm": Engine("vllm", "vllm/vllm-openai:v0.10.2", 8000,
                   "vllm:num_requests_waiting", "vllm:num_requests_running", True, True),
    "tgi": Engine("tgi", "ghcr.io/huggingface/text-generation-inference:3.3.4", 8080,
                  "tgi_queue_size", "tgi_batch_current_size", True, True),
    "sglang": Engine("sglang", "lmsysorg/sglang:v0.5.2-cu126", 30000,
                     "sglang:num_queue_reqs", "sglang:num_running_reqs", True, True),
}

# Vision-language architectures each engine can serve (by HF model id prefix). TGI serves
# PaliGemma natively; vLLM serves PaliGemma 1/2 as well; SGLang does not list PaliGemma.
VLM_SUPPORT: dict[str, tuple[str, ...]] = {
    "vllm": ("paligemma", "llava", "qwen2-vl", "qwen2.5-vl", "idefics", "gemma-3", "pixtral", "llama-3.2"),
    "tgi": ("paligemma", "llava", "idefics", "qwen2-vl", "gemma-3"),
    "sglang": ("llava", "qwen2-vl", "qwen2.5-vl", "gemma-3", "llama-3.2"),
}


def weights_gib(params: int, fmt: str) -> float:
    return params * BYTES_PER_PARAM[fmt] / 2**30


def required_gib(params: int, fmt: str) -> float:
    return weights_gib(params, fmt) * FIT_HEADROOM + FIT_OVERHEAD_GIB
