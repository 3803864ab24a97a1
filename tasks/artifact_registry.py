"""Artifact Registry: the image's mirror repository (REST v1 over httpx; no client library needed for two
calls). Get-or-create, idempotent: a rerun, or a racer's create (409), converges on the same repository."""

from __future__ import annotations

import time
from typing import Any

import httpx
from prefect import task

from manifests.errors import FleetError, PreflightError
from manifests.startup import ImageRepository
from tasks.clients import artifact_registry_http
from tasks.retry import task_retries

OPERATION_POLL_S = 1.0
OPERATION_TIMEOUT_S = 120.0


class RegistryError(FleetError):
    """Artifact Registry refused a request the spec led to."""


def _message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:300]


def _raise_for(r: httpx.Response, repo: ImageRepository, verb: str) -> None:
    if r.status_code == 403:
        raise PreflightError(f"no permission to {verb} Artifact Registry repository {repo.name}: {_message(r)}",
                             f"grant the flows' identity roles/artifactregistry.admin on project {repo.project} "
                             f"(or create it: gcloud artifacts repositories create {repo.repo_id} "
                             f"--location={repo.location} --repository-format=docker --mode=remote-repository "
                             f"{_gcloud_upstream(repo)})")
    if r.status_code == 400:
        raise RegistryError(f"Artifact Registry refused to {verb} {repo.name}: {_message(r)}",
                            "check startup.image.repository (LOCATION-docker.pkg.dev/PROJECT/REPO)")
    r.raise_for_status()  # 401, 5xx, ...: httpx.HTTPStatusError (5xx/429 retried by the task)


def _gcloud_upstream(repo: ImageRepository) -> str:
    if repo.upstream == "docker.io":
        return "--remote-docker-repo=DOCKER-HUB"
    return f"--remote-docker-repo=https://{repo.upstream}"


@task(**task_retries())
def get_repository(*, repo: ImageRepository) -> dict[str, Any] | None:
    """The repository as Artifact Registry returns it; None when it does not exist."""
    r = artifact_registry_http().get(repo.name)
    if r.status_code == 404:
        return None
    _raise_for(r, repo, "read")
    return r.json()


def _wait(http: httpx.Client, op: dict[str, Any], repo: ImageRepository) -> dict[str, Any]:
    deadline = time.monotonic() + OPERATION_TIMEOUT_S
    while not op.get("done"):
        if time.monotonic() > deadline:
            raise RegistryError(f"creating {repo.name} did not finish in {OPERATION_TIMEOUT_S:.0f} s "
                                f"(operation {op.get('name')})", "rerun: the create is idempotent")
        time.sleep(OPERATION_POLL_S)
        r = http.get(op["name"])
        _raise_for(r, repo, "create")
        op = r.json()
    if "error" in op:
        raise RegistryError(f"creating {repo.name} failed: {op['error'].get('message')}",
                            "check startup.image.repository")
    return {k: v for k, v in (op.get("response") or {}).items() if k != "@type"}  # the Repository


@task(**task_retries())
def ensure_repository(*, repo: ImageRepository) -> tuple[dict[str, Any], bool]:
    """(the repository, created now). Exists → nothing; missing → created once (a 409 from a concurrent
    create reads the winner's). A repository that cannot serve the image raises with the fix."""
    http = artifact_registry_http()
    live = get_repository.fn(repo=repo)
    created = False
    if live is None:
        parent = repo.name.rsplit("/repositories/", 1)[0]
        r = http.post(f"{parent}/repositories", params={"repositoryId": repo.repo_id}, json=repo.body())
        if r.status_code == 409:
            live = get_repository.fn(repo=repo)
        else:
            _raise_for(r, repo, "create")
            live, created = _wait(http, r.json(), repo), True
    problem = repo.problem(live or {})
    if problem:
        raise PreflightError(f"startup.image.repository: {problem}", "set startup.image.repository to another "
                             "LOCATION-docker.pkg.dev/PROJECT/REPO (mirror_model creates it), or delete this one")
    return live or {}, created
