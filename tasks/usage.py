"""The GPU usage ledger: sightings of a pool's GPU nodes (a Prefect Variable per pool) and its GKE operations.

Any flow that looks at a cluster can fold a sighting in (``record_usage``): check_fleet on its schedule,
teardown before it removes a pool, gpu_report itself, and park/wake around their capacity changes.
"""

from __future__ import annotations

import re
import time
from typing import Any

from prefect import task
from prefect.variables import Variable

from manifests import names, startup
from manifests import usage as U
from manifests.render import has_compute_class
from manifests.spec import DeploymentSpec
from tasks.clients import cluster_manager, compute_aggregated
from tasks.gke import _call_opts, _parent, _to_dict
from tasks.inventory import list_kind
from tasks.log import logger
from tasks.retry import task_retries

GPU = "nvidia.com/gpu"
MAX_CHARS = 4800  # Prefect Variables hold at most 5,000 characters of JSON


def pool_selector(spec: DeploymentSpec) -> str:
    """The GPU nodes a spec runs on: its node pool (Standard), its ComputeClass's nodes (capacity options:
    every option's pool carries the class label), or GKE's accelerator nodes (Autopilot)."""
    if has_compute_class(spec):  # Autopilot-mode nodes (fast-starting nodes) carry the class label too
        return f"{names.COMPUTE_CLASS_LABEL}={names.compute_class(spec)}"
    if spec.cluster.mode == "autopilot":
        return f"cloud.google.com/gke-accelerator={spec.accelerator.type}"
    return f"cloud.google.com/gke-nodepool={spec.accelerator.pool.name}"


def ledger_name(spec: DeploymentSpec) -> str:
    c = spec.cluster
    pool = spec.accelerator.type if startup.autopilot_mode(spec) else spec.accelerator.pool.name
    return re.sub(r"[^a-z0-9_-]", "-", f"llm-fleet-usage-{c.project}-{c.name}-{pool}".lower())[:250]


def gpu_nodes(*, kubeconfig: str, spec: DeploymentSpec) -> list[dict[str, Any]]:
    nodes = list_kind(kubeconfig=kubeconfig, api_version="v1", kind="Node", label_selector=pool_selector(spec))
    out = []
    for n in nodes:
        gpus = int(((n.get("status") or {}).get("capacity") or {}).get(GPU, 0) or 0)
        if gpus:
            out.append({"name": n["metadata"]["name"], "created": U.ts(n["metadata"]["creationTimestamp"]),
                        "gpus": gpus})
    return out


@task(**task_retries())
def pool_operations(*, project: str, location: str, cluster: str, pool: str | None) -> list[U.Op]:
    """The cluster's GKE operations that can change the pool's size (precise start/end times)."""
    resp = cluster_manager().list_operations(parent=_parent(project, location), **_call_opts())
    out = []
    for op in (_to_dict(o) for o in resp.operations):
        target = op.get("target_link", "")
        if f"/clusters/{cluster}" not in target:
            continue
        if pool and "/nodePools/" in target and not target.endswith(f"/nodePools/{pool}"):
            continue
        out.append(U.Op(op.get("operation_type", ""), U.ts(op.get("start_time")) or 0.0,
                        U.ts(op.get("end_time")) if op.get("end_time") else None))
    return out


def vm_bases(ledger: dict[str, Any], pool: dict[str, Any] | None) -> set[str]:
    """The pool's VM name stems (``gke-<cluster>-<pool>-<hash>``): its managed instance groups' names without
    ``-grp`` (while the pool exists), and the stems of every node the ledger ever saw (after it is gone)."""
    bases = {name.rsplit("-", 1)[0] for name in (ledger.get("nodes") or {})}
    for url in (pool or {}).get("instance_group_urls") or []:
        bases.add(url.rsplit("/", 1)[-1].removesuffix("-grp"))
    return bases


@task(**task_retries())
def vm_operations(*, project: str, bases: set[str] | list[str]) -> list[U.VmOp]:
    """Insert/delete operations of the VMs named ``<base>-xxxx`` (one aggregated call over every zone): each
    GPU node's own creation and deletion, with millisecond times."""
    stems = tuple(f"{b}-" for b in bases)
    if not stems:
        return []
    out = []
    for _scope, ops in compute_aggregated(project, "operations"):
        for op in ops:
            target = str(op.get("targetLink", ""))
            name = target.rsplit("/", 1)[-1]
            kind = str(op.get("operationType", "")).rsplit(".", 1)[-1]  # compute.instances.insert (a MIG's)
            if "/instances/" in target and name.startswith(stems) and kind in ("insert", "delete") \
                    and op.get("endTime"):
                out.append(U.VmOp(name, kind, U.ts(op["endTime"])))
    return out


def read_ledger(spec: DeploymentSpec) -> dict[str, Any]:
    value = Variable.get(ledger_name(spec), default=None)
    return value if isinstance(value, dict) else {"nodes": {}}


def save_ledger(spec: DeploymentSpec, ledger: dict[str, Any]) -> None:
    import json

    while len(json.dumps(ledger)) > MAX_CHARS:
        ended = sorted((v[2], k) for k, v in ledger["nodes"].items() if v[2] is not None)
        if not ended:
            break
        logger().warning("usage ledger %s is full: dropping node %s (gone since %s)", ledger_name(spec),
                         ended[0][1], ended[0][0])
        ledger["nodes"].pop(ended[0][1])
    Variable.set(ledger_name(spec), ledger, overwrite=True)


def record_usage(spec: DeploymentSpec, *, kubeconfig: str) -> dict[str, Any]:
    """Fold one sighting of the spec's GPU nodes into its pool's ledger; returns the ledger."""
    ledger = U.observe(read_ledger(spec), gpu_nodes(kubeconfig=kubeconfig, spec=spec), time.time())
    save_ledger(spec, ledger)
    return ledger
