"""Pure core of the Vertex AI target: labels, request bodies, quota metric, traffic-split plans (no I/O)."""

from __future__ import annotations

import re
from typing import Any

from manifests.catalog import ACCELERATORS, Accelerator
from manifests.errors import PreflightError
from manifests.spec import AcceleratorSpec, DeploymentSpec

SPEC_LABEL = "llm-fleet-spec"
MANAGED_LABEL = "llm-fleet-managed-by"
REVISION_LABEL = "llm-fleet-revision"
PARKED_LABEL = "llm-fleet-parked"
PREVIOUS_LABEL = "llm-fleet-previous-revision"  # on the endpoint after a release: what rollback goes back to
MODEL_GARDEN_VLLM = "vertex-vision-model-garden-dockers/pytorch-vllm-serve"
# Vertex labels: lowercase letters, digits, '_' and '-', at most 63 characters.
_BAD = re.compile(r"[^a-z0-9_-]")


def label_value(text: str) -> str:
    return _BAD.sub("_", text.lower())[:63]


def endpoint_labels(spec: DeploymentSpec) -> dict[str, str]:
    """What the endpoint (and every model) of a spec carries; get-or-create and teardown select on it."""
    return {SPEC_LABEL: label_value(spec.name), MANAGED_LABEL: "llm-fleet"}


def model_labels(spec: DeploymentSpec, revision: str) -> dict[str, str]:
    return {**endpoint_labels(spec), REVISION_LABEL: label_value(revision), "hf-model": label_value(spec.model.id)}


def label_filter(labels: dict[str, str], display_name: str | None = None) -> str:
    terms = [f'display_name="{display_name}"'] if display_name else []
    return " AND ".join(terms + [f'labels.{k}="{v}"' for k, v in sorted(labels.items())])


def accelerator(spec: DeploymentSpec) -> Accelerator:
    """The catalog GPU behind vertex.accelerator_type (NVIDIA_L4 -> nvidia-l4)."""
    vx = spec.vertex
    assert vx is not None
    return next(a for a in ACCELERATORS.values() if a.vertex_name == vx.accelerator_type)


def fit_spec(spec: DeploymentSpec) -> DeploymentSpec:
    """The spec as the HF fit check sees it: the Vertex machine's GPUs, not the GKE accelerator section."""
    vx = spec.vertex
    assert vx is not None
    acc = AcceleratorSpec.model_construct(type=accelerator(spec).type, count=vx.accelerator_count,
                                          machine_type=vx.machine_type, spot=False)
    return spec.model_copy(update={"accelerator": acc})


def quota_metric(spec: DeploymentSpec) -> str:
    """The regional serving quota metric, e.g. custom_model_serving_nvidia_l4_gpus."""
    name = spec.vertex.accelerator_type.lower().removeprefix("nvidia_tesla_").removeprefix("nvidia_")
    return f"custom_model_serving_nvidia_{name.replace('h100_80gb', 'h100')}_gpus"


def quota_id(spec: DeploymentSpec) -> str:
    """The Cloud Quotas id of the same quota, e.g. CustomModelServingL4GPUsPerProjectPerRegion."""
    name = spec.vertex.accelerator_type.removeprefix("NVIDIA_TESLA_").removeprefix("NVIDIA_")
    return f"CustomModelServing{name.replace('_80GB', '80GB').replace('H10080GB', 'H100')}GPUsPerProjectPerRegion"


def gpus_per_deployment(spec: DeploymentSpec) -> int:
    """GPUs one deployed model may hold (max replicas: autoscaling must not hit the quota)."""
    vx = spec.vertex
    return vx.accelerator_count * max(vx.min_replica_count, vx.max_replica_count)


def deployed_gpus(endpoints: list[dict[str, Any]], accelerator_type: str) -> int:
    """GPUs the deployed models of these endpoints hold now (Vertex counts min replicas as allocated)."""
    total = 0
    for ep in endpoints:
        for dm in ep.get("deployedModels") or ep.get("deployed_models") or []:
            res = dm.get("dedicatedResources") or dm.get("dedicated_resources") or {}
            ms = res.get("machineSpec") or res.get("machine_spec") or {}
            if (ms.get("acceleratorType") or ms.get("accelerator_type")) == accelerator_type:
                total += int(ms.get("acceleratorCount") or ms.get("accelerator_count") or 0) * int(
                    res.get("minReplicaCount") or res.get("min_replica_count") or 1)
    return total


def check_quota(spec: DeploymentSpec, *, limit: int, used: int, adding: int) -> None:
    if used + adding > limit:
        region, metric = spec.cluster.region, quota_metric(spec)
        raise PreflightError(
            f"Vertex AI quota aiplatform.googleapis.com/{metric} in {region}: {used} of {limit} GPUs in use, "
            f"{adding} more needed ({spec.vertex.max_replica_count} replica(s) × {spec.vertex.accelerator_count})",
            f"request more {metric} for {region} (IAM & Admin → Quotas, service aiplatform.googleapis.com), "
            f"lower vertex.max_replica_count, or set cluster.location to a region with quota")


def container_spec(spec: DeploymentSpec, *, revision: str, hf_token: str | None) -> dict[str, Any]:
    """ModelContainerSpec (snake_case, as aiplatform_v1.ModelContainerSpec takes it) for the vLLM server.

    The Model Garden vLLM image runs ``python -m vllm.entrypoints.api_server`` (Vertex's /generate format),
    like Google's Model Garden notebooks; any other image gets the spec's engine.command (or its entrypoint).
    """
    vx, eng = spec.vertex, spec.engine
    if eng.kind != "vllm":
        raise PreflightError(f"target vertex serves engine vllm, not {eng.kind}", "set engine: vllm")
    image = vx.serving_container_image_uri
    args = ["--host=0.0.0.0", f"--port={vx.port}", f"--model={spec.model.id}", f"--revision={revision}",
            f"--tensor-parallel-size={eng.tensor_parallel if eng.tensor_parallel > 1 else vx.accelerator_count}"]
    if eng.max_model_len:
        args.append(f"--max-model-len={eng.max_model_len}")
    if eng.gpu_memory_utilization:
        args.append(f"--gpu-memory-utilization={eng.gpu_memory_utilization}")
    if eng.dtype != "auto":
        args.append(f"--dtype={eng.dtype}")
    if eng.quantization:
        args.append(f"--quantization={eng.quantization}")
    args += eng.extra_args
    command = eng.command or (["python", "-m", "vllm.entrypoints.api_server"] if MODEL_GARDEN_VLLM in image else [])
    env = {"MODEL_ID": spec.model.id, "DEPLOY_SOURCE": "llm-fleet", **eng.env}
    if hf_token:
        env[spec.secret.env] = hf_token
    out: dict[str, Any] = {"image_uri": image, "args": args, "env": [{"name": k, "value": v} for k, v in env.items()],
                           "ports": [{"container_port": vx.port}], "predict_route": vx.predict_route,
                           "health_route": vx.health_route}
    if command:
        out["command"] = command
    return out


def model_body(spec: DeploymentSpec, *, revision: str, hf_token: str | None) -> dict[str, Any]:
    vx = spec.vertex
    body: dict[str, Any] = {"display_name": f"{spec.name}-{revision[:12]}", "labels": model_labels(spec, revision),
                            "description": f"{spec.model.id}@{revision} served by vLLM (llm-fleet)",
                            "container_spec": container_spec(spec, revision=revision, hf_token=hf_token)}
    if vx.artifact_uri:
        body["artifact_uri"] = vx.artifact_uri
    return body


def deployed_model_body(spec: DeploymentSpec, *, model: str, revision: str) -> dict[str, Any]:
    vx = spec.vertex
    return {"model": model, "display_name": f"{spec.name}-{revision[:12]}",
            "dedicated_resources": {"machine_spec": {"machine_type": vx.machine_type,
                                                     "accelerator_type": vx.accelerator_type,
                                                     "accelerator_count": vx.accelerator_count},
                                    "min_replica_count": vx.min_replica_count,
                                    "max_replica_count": max(vx.min_replica_count, vx.max_replica_count)}}


def smoke_instance(prompt: str, max_tokens: int) -> dict[str, Any]:
    """One predict instance in the Model Garden vLLM format (raw_response: the completion only)."""
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "raw_response": True}


def chat_body(prompt: str, max_tokens: int) -> dict[str, Any]:
    """An OpenAI-style chat body, sent raw through rawPredict."""
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}


def promote_split(new_id: str) -> dict[str, int]:
    """Blue-green: every request to the new deployed model, in one traffic-split update."""
    return {new_id: 100}


def zero_split(current: dict[str, int]) -> dict[str, int]:
    """DeployModel's split for a new model at 0 % ("0" is the model being deployed)."""
    return {**{k: int(v) for k, v in current.items()}, "0": 0}


def park_variable(spec: DeploymentSpec) -> str:
    """The Prefect Variable that records a parked model's deployment settings."""
    return label_value(f"vertex-park-{spec.cluster.project}-{spec.name}")
