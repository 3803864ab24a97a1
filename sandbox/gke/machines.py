"""Compute Engine machine types as GKE node pools use them: the vCPUs and memory of a machine type
(a node's capacity and its ``CPUS`` quota) and which accelerators it can carry. Accelerator-optimized
machines come with their GPUs (g2 -> L4, a2 -> A100, a3 -> H100; GKE attaches them when the pool
names none), N1 takes T4 / P100 in 1, 2 or 4; GKE answers 400 for a machine type that does not
exist or cannot carry the requested accelerator.
"""

from __future__ import annotations

import re

_GPU_FAMILIES = {"g2": ("nvidia-l4", "nvidia-l4-vws"), "a2-highgpu": ("nvidia-tesla-a100",),
                 "a2-megagpu": ("nvidia-tesla-a100",), "a2-ultragpu": ("nvidia-a100-80gb",),
                 "a3-highgpu": ("nvidia-h100-80gb",)}
_G2_GPUS = {4: 1, 8: 1, 12: 1, 16: 1, 32: 1, 24: 2, 48: 4, 96: 8}


def machine_shape(machine_type: str) -> tuple[int, float, tuple[tuple[str, ...], int] | None]:
    """``(vCPUs, memory GiB, (allowed accelerators, implied count) | None)``; ValueError if unknown."""
    fixed = {"e2-micro": (2, 1.0), "e2-small": (2, 2.0), "e2-medium": (2, 4.0), "f1-micro": (1, 0.6),
             "g1-small": (1, 1.7)}
    if machine_type in fixed:
        return (*fixed[machine_type], None)
    m = re.fullmatch(r"(a2|a3)-(highgpu|megagpu|ultragpu)-(\d+)g", machine_type)
    if m:
        family = f"{m.group(1)}-{m.group(2)}"
        gpus = int(m.group(3))
        if family not in _GPU_FAMILIES or gpus not in (1, 2, 4, 8, 16):
            raise ValueError(machine_type)
        per_gpu = {"a2-highgpu": (12, 85.0), "a2-megagpu": (6, 85.0), "a2-ultragpu": (12, 170.0),
                   "a3-highgpu": (26, 234.0)}[family]
        return per_gpu[0] * gpus, per_gpu[1] * gpus, (_GPU_FAMILIES[family], gpus)
    m = re.fullmatch(r"([a-z][a-z0-9]*)-(standard|highmem|highcpu)-(\d+)", machine_type)
    if not m:
        raise ValueError(machine_type)
    family, kind, n = m.group(1), m.group(2), int(m.group(3))
    if family == "g2":
        if kind != "standard" or n not in _G2_GPUS:
            raise ValueError(machine_type)
        return n, 4.0 * n, (_GPU_FAMILIES["g2"], _G2_GPUS[n])
    if family not in ("n1", "n2", "n2d", "e2", "c2", "c2d", "c3", "c3d", "n4", "t2d"):
        raise ValueError(machine_type)
    per_cpu = {"standard": 3.75 if family == "n1" else 4.0, "highmem": 6.5 if family == "n1" else 8.0,
               "highcpu": 0.9 if family == "n1" else 1.0}[kind]
    return n, per_cpu * n, None


def _accepts(machine_type: str, accelerator: str, count: int) -> str | None:
    """An error message if ``machine_type`` cannot carry ``count`` × ``accelerator``."""
    _, _, implied = machine_shape(machine_type)
    if implied is not None:
        allowed, n = implied
        if accelerator not in allowed:
            return (f"Accelerator type \"{accelerator}\" is not supported with machine type {machine_type} "
                    f"(it comes with {n} x {allowed[0]}).")
        if count != n:
            return (f"Machine type {machine_type} comes with {n} x {allowed[0]}; accelerator count {count} "
                    f"is not compatible.")
        return None
    if machine_type.startswith("n1-") and accelerator.startswith(("nvidia-tesla-t4", "nvidia-tesla-p100")):
        if count not in (1, 2, 4):
            return f"Accelerator count {count} of type {accelerator} is not supported; use 1, 2 or 4."
        return None
    return f"Machine type {machine_type} does not support accelerators of type {accelerator}."
