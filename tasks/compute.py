"""Thin tasks for Compute Engine: GPU quota and which zones offer an accelerator (REST reads, tasks/clients.py)."""

from __future__ import annotations

from google.api_core import exceptions as gexc
from prefect import task

from manifests.errors import PreflightError
from manifests.provision import GLOBAL_GPU_METRIC, QuotaReading
from tasks.clients import compute_aggregated, compute_get
from tasks.retry import task_retries


def _quota(resource: dict, metric: str, scope: str) -> QuotaReading:
    for q in resource.get("quotas") or []:
        if q.get("metric") == metric:
            return QuotaReading(metric, scope, float(q.get("limit", 0)), float(q.get("usage", 0)))
    return QuotaReading(metric, scope, 0, 0)  # GCP omits metrics the project has no quota for


@task(**task_retries())
def get_region_quota(*, project: str, region: str, metric: str) -> QuotaReading:
    try:
        info = compute_get("projects", project, "regions", region)
    except gexc.NotFound as exc:
        raise PreflightError(f"region {region} not found in project {project}",
                             "check cluster.location (e.g. us-central1)") from exc
    return _quota(info, metric, region)


@task(**task_retries())
def get_project_gpu_quota(*, project: str) -> QuotaReading:
    return _quota(compute_get("projects", project), GLOBAL_GPU_METRIC, "global")


@task(**task_retries())
def zones_offering(*, project: str, accelerator: str) -> dict[str, list[str]]:
    """region -> zones that offer ``accelerator`` (one aggregated call for the whole project)."""
    out: dict[str, list[str]] = {}
    for scope, types in compute_aggregated(project, "acceleratorTypes", filter=f"name = {accelerator}"):
        for acc in types:
            if acc.get("name") != accelerator:
                continue
            zone = str(acc.get("zone", "")).rsplit("/", 1)[-1] or scope.removeprefix("zones/")
            out.setdefault(zone.rsplit("-", 1)[0], []).append(zone)
    return {r: sorted(z) for r, z in out.items()}


@task(**task_retries())
def disk_image_exists(*, project: str, name: str) -> bool:
    """Whether Compute has the disk image (``images.get``; 404 -> False)."""
    try:
        compute_get("projects", project, "global", "images", name)
    except gexc.NotFound:
        return False
    return True


@task(**task_retries())
def proxy_only_regions(*, project: str, network: str = "default") -> set[str]:
    """Regions where ``network`` has an ACTIVE proxy-only subnet (purpose REGIONAL_MANAGED_PROXY), which a
    regional Gateway's Envoy proxies need (one aggregated call)."""
    out: set[str] = set()
    for scope, subnets in compute_aggregated(project, "subnetworks"):
        for sub in subnets:
            if (sub.get("purpose") == "REGIONAL_MANAGED_PROXY" and sub.get("role", "") in ("", "ACTIVE")
                    and str(sub.get("network", "")).rsplit("/", 1)[-1] == network):
                out.add(str(sub.get("region", "")).rsplit("/", 1)[-1] or scope.removeprefix("regions/"))
    return out
