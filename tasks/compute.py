"""Thin tasks for Compute Engine: GPU quota and which zones offer an accelerator."""

from __future__ import annotations

from google.api_core import exceptions as gexc
from prefect import task

from manifests.errors import PreflightError
from manifests.provision import GLOBAL_GPU_METRIC, QuotaReading
from tasks.clients import compute_clients, google_retry, images_client, subnetworks_client
from tasks.retry import task_retries
from tasks.settings import get_settings


def _opts():
    return {"retry": google_retry(), "timeout": get_settings().call_timeout_s}


@task(**task_retries())
def get_region_quota(*, project: str, region: str, metric: str) -> QuotaReading:
    regions, _, _ = compute_clients()
    try:
        info = regions.get(project=project, region=region, **_opts())
    except gexc.NotFound as exc:
        raise PreflightError(f"region {region} not found in project {project}",
                             "check cluster.location (e.g. us-central1)") from exc
    for q in info.quotas:
        if q.metric == metric:
            return QuotaReading(metric, region, q.limit, q.usage)
    return QuotaReading(metric, region, 0, 0)  # GCP omits metrics the project has no quota for


@task(**task_retries())
def get_project_gpu_quota(*, project: str) -> QuotaReading:
    _, projects, _ = compute_clients()
    info = projects.get(project=project, **_opts())
    for q in info.quotas:
        if q.metric == GLOBAL_GPU_METRIC:
            return QuotaReading(GLOBAL_GPU_METRIC, "global", q.limit, q.usage)
    return QuotaReading(GLOBAL_GPU_METRIC, "global", 0, 0)


@task(**task_retries())
def zones_offering(*, project: str, accelerator: str) -> dict[str, list[str]]:
    """region -> zones that offer ``accelerator`` (one aggregated call for the whole project)."""
    _, _, types = compute_clients()
    out: dict[str, list[str]] = {}
    pages = types.aggregated_list(request={"project": project, "filter": f"name = {accelerator}"}, **_opts())
    for scope, scoped in pages:
        for acc in scoped.accelerator_types:
            if acc.name != accelerator:
                continue
            zone = acc.zone.rsplit("/", 1)[-1] or scope.removeprefix("zones/")
            out.setdefault(zone.rsplit("-", 1)[0], []).append(zone)
    return {r: sorted(z) for r, z in out.items()}


@task(**task_retries())
def disk_image_exists(*, project: str, name: str) -> bool:
    """Whether Compute has the disk image (``images.get``; 404 -> False)."""
    try:
        images_client().get(project=project, image=name, **_opts())
    except gexc.NotFound:
        return False
    return True


@task(**task_retries())
def proxy_only_regions(*, project: str, network: str = "default") -> set[str]:
    """Regions where ``network`` has an ACTIVE proxy-only subnet (purpose REGIONAL_MANAGED_PROXY), which a
    regional Gateway's Envoy proxies need (one aggregated call)."""
    out: set[str] = set()
    for scope, scoped in subnetworks_client().aggregated_list(request={"project": project}, **_opts()):
        for sub in scoped.subnetworks:
            if (sub.purpose == "REGIONAL_MANAGED_PROXY" and sub.role in ("", "ACTIVE")
                    and sub.network.rsplit("/", 1)[-1] == network):
                out.add(sub.region.rsplit("/", 1)[-1] or scope.removeprefix("regions/"))
    return out
