"""Artifact Registry emulator: the repositories REST API (v1) and what a node's pull of a ``*-docker.pkg.dev``
image finds there.

Reached by the product's httpx client at ``LLM_FLEET_ARTIFACTREGISTRY_ENDPOINT`` (the env file's); fault
service ``"artifactregistry"``.

=====================================================================  =============================================
``POST /v1/projects/{p}/locations/{l}/repositories?repositoryId=R``    create (a long-running Operation, done)
``GET  /v1/projects/{p}/locations/{l}/repositories/{r}``               the Repository (404 NOT_FOUND)
``GET  /v1/projects/{p}/locations/{l}/repositories``                   list (``pageSize``, ``pageToken``)
``GET  /v1/projects/{p}/locations/{l}/operations/{id}``                the create's Operation
=====================================================================  =============================================

As Artifact Registry does (sources in docs/sandbox-contract.md): every call needs a valid Google access token
(401 UNAUTHENTICATED) and, here, membership of the project (its service accounts own it, and the env file's
identity is an admin of every project the sandbox holds, as it creates clusters in any; anyone else gets
403 PERMISSION_DENIED "Permission 'artifactregistry.repositories.X' denied on resource ..."); a repository
id is lower case letters, digits and hyphens, starting with a letter, at most 63 (400 INVALID_ARGUMENT); a
second create of a name is 409 ALREADY_EXISTS; ``mode`` is STANDARD_REPOSITORY (default) or
REMOTE_REPOSITORY, and a remote repository needs a ``remoteRepositoryConfig`` whose one upstream matches its
format (``dockerRepository.publicRepository: DOCKER_HUB`` or ``dockerRepository.customRepository.uri``) —
a standard one must not have one (400). The mode cannot change after creation (no update here).

Pulls (:meth:`ArtifactRegistry.pull`, the kubelet's registry): ``LOCATION-docker.pkg.dev/PROJECT/REPO/PATH:TAG``
resolves only when the repository exists — a standard one when the image was pushed to it
(:meth:`push`), a remote one always (the upstream serves it; the first pull fills the repository's cache,
:attr:`Repo.cached`, the next ones are served from it). Otherwise the kubelet reports ``ErrImagePull`` with
containerd's "...: not found" (the registry's 404). Images in projects this sandbox does not hold (Google's
public repositories such as ``us-docker.pkg.dev/deeplearning-platform-release/...``) are not modelled: they
resolve.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from sandbox.core import Clock, Emulator, Faults, HttpError, JsonHandler, SandboxHTTPServer, route

REPO_ID = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
LOCATION = re.compile(r"^[a-z]+(-[a-z]+\d+)?$")  # us-central1, europe-west4, or the multi-regions us, eu, asia
FORMATS = ("DOCKER", "MAVEN", "NPM", "PYTHON", "APT", "YUM", "GO", "KFP", "GENERIC")
MODES = ("STANDARD_REPOSITORY", "REMOTE_REPOSITORY", "VIRTUAL_REPOSITORY")
HOST = re.compile(r"^(?P<location>[a-z0-9-]+)-docker\.pkg\.dev$")
_ROUTES: list = []
_P = r"/v1/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"


def _rfc3339(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1e6) % 1000000:06d}Z"


@dataclass
class Repo:
    project: str
    location: str
    repo_id: str
    format: str = "DOCKER"
    mode: str = "STANDARD_REPOSITORY"
    remote: dict[str, Any] | None = None  # remoteRepositoryConfig
    description: str = ""
    created: float = field(default_factory=time.time)
    images: set[str] = field(default_factory=set)  # standard: pushed "PATH:TAG"
    cached: set[str] = field(default_factory=set)  # remote: "PATH:TAG" fetched from the upstream once

    @property
    def name(self) -> str:
        return f"projects/{self.project}/locations/{self.location}/repositories/{self.repo_id}"

    @property
    def registry_uri(self) -> str:
        return f"{self.location}-docker.pkg.dev/{self.project}/{self.repo_id}"

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "format": self.format, "mode": self.mode,
                               "description": self.description, "createTime": _rfc3339(self.created),
                               "updateTime": _rfc3339(self.created), "sizeBytes": "0", "satisfiesPzs": False,
                               "registryUri": self.registry_uri}
        if self.remote is not None:
            out["remoteRepositoryConfig"] = self.remote
        return out


class ArtifactRegistry(Emulator):
    """Artifact Registry on 127.0.0.1 (service ``"artifactregistry"`` for faults)."""

    def __init__(self, *, clock: Clock, faults: Faults, tokens: Any, project: str,
                 admins: frozenset[str] = frozenset()) -> None:
        self.clock = clock
        self.admins = admins  # identities with roles/artifactregistry.admin in every project (the env file's)
        self.faults = faults
        self.tokens = tokens  # sandbox.tokens.GoogleTokens: who a bearer token is
        self.project = project
        self.repos: dict[tuple[str, str, str], Repo] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.pulls: list[tuple[str, str]] = []  # (image, "pushed" | "upstream" | "cache")
        self._lock = threading.RLock()
        self._handler = ArtifactRegistryHandler
        self._server: SandboxHTTPServer | None = None

    # ---- Python API for tests and the sandbox --------------------------------------------------------
    def add_repository(self, project: str, location: str, repo_id: str, *, mode: str = "STANDARD_REPOSITORY",
                       remote: dict[str, Any] | None = None) -> Repo:
        with self._lock:
            return self.repos.setdefault((project, location, repo_id), Repo(project, location, repo_id,
                                                                             mode=mode, remote=remote))

    def push(self, image: str) -> None:
        """``docker push`` of ``image`` into its (existing, standard) repository."""
        where = _parse(image)
        if where is None:
            raise ValueError(f"{image} is not an Artifact Registry image")
        with self._lock:
            repo = self.repos[where[:3]]
            if repo.mode != "STANDARD_REPOSITORY":
                raise ValueError(f"{repo.name} is {repo.mode}: it cannot be pushed to")
            repo.images.add(where[3])

    def pull(self, image: str, *, cluster_project: str | None = None) -> str | None:
        """A node pulls ``image``: None when the registry serves it, else the reason (containerd's
        "failed to resolve reference" text). Strict for the sandbox's project and the pulling cluster's."""
        where = _parse(image)
        if where is None or where[0] not in {self.project, cluster_project}:
            return None
        with self._lock:
            repo = self.repos.get(where[:3])
            path = where[3]
            if repo is not None and repo.mode == "REMOTE_REPOSITORY":
                self.pulls.append((image, "cache" if path in repo.cached else "upstream"))
                repo.cached.add(path)  # fetched from the upstream, then served from the repository
                return None
            if repo is not None and path in repo.images:
                self.pulls.append((image, "pushed"))
                return None
        ref = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
        return (f'failed to pull and unpack image "{image}": failed to resolve reference "{image}": '
                f"{ref}: not found")

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"repositories": {r.name: {**r.json(), "images": sorted(r.images), "cached": sorted(r.cached)}
                                     for r in self.repos.values()},
                    "pulls": list(self.pulls)}

    # ---- rules shared by the routes -----------------------------------------------------------------
    def caller(self, h: ArtifactRegistryHandler, permission: str, project: str, location: str,
               repo: str | None = None) -> str:
        auth = h.headers.get("Authorization") or ""
        who, expired = self.tokens.check(auth.removeprefix("Bearer ").strip()) if auth.startswith(
            "Bearer ") else (None, False)
        if who is None or expired:
            raise _error(401, "Request had invalid authentication credentials. Expected OAuth 2 access token, "
                         "login cookie or other valid authentication credential.", "UNAUTHENTICATED")
        if not who.endswith(f"@{project}.iam.gserviceaccount.com") and who not in self.admins:
            resource = f"projects/{project}/locations/{location}" + (f"/repositories/{repo}" if repo else "")
            raise _error(403, f"Permission '{permission}' denied on resource '//artifactregistry.googleapis.com/"
                         f"{resource}' (or it may not exist).", "PERMISSION_DENIED")
        return who


def _parse(image: str) -> tuple[str, str, str, str] | None:
    """(project, location, repository, "PATH:TAG") of an Artifact Registry Docker image, else None."""
    host, _, rest = image.partition("/")
    m = HOST.match(host)
    parts = rest.split("/", 2)
    if m is None or len(parts) < 3:
        return None
    path = parts[2].split("@")[0]
    return parts[0], m.group("location"), parts[1], path if ":" in path.rsplit("/", 1)[-1] else path + ":latest"


def _error(status: int, message: str, code: str) -> HttpError:
    """Google's JSON error shape (``error.status`` is the canonical code)."""
    return HttpError(status, message, body={"error": {"code": status, "message": message, "status": code}})


def _check_body(body: dict[str, Any], repo_id: str) -> tuple[str, str, dict[str, Any] | None]:
    """(format, mode, remoteRepositoryConfig) of a create's body, or 400 INVALID_ARGUMENT as AR answers."""
    if not REPO_ID.match(repo_id or ""):
        raise _error(400, f"Invalid repository ID \"{repo_id}\": it must start with a letter, contain only "
                     "lowercase letters, numbers and hyphens, end with a letter or number, and be at most 63 "
                     "characters.", "INVALID_ARGUMENT")
    fmt = str(body.get("format") or "")
    if fmt not in FORMATS:
        raise _error(400, f"Invalid format {fmt!r}: the repository format is required (one of "
                     f"{', '.join(FORMATS)}).", "INVALID_ARGUMENT")
    mode = str(body.get("mode") or "STANDARD_REPOSITORY")
    if mode not in MODES:
        raise _error(400, f"Invalid value for field 'repository.mode': {mode!r}", "INVALID_ARGUMENT")
    remote = body.get("remoteRepositoryConfig")
    if mode != "REMOTE_REPOSITORY":
        if remote is not None:
            raise _error(400, "remoteRepositoryConfig is only allowed for REMOTE_REPOSITORY mode",
                         "INVALID_ARGUMENT")
        return fmt, mode, None
    sources = [k for k in (remote or {}) if k.endswith("Repository")]
    if len(sources) != 1 or (fmt == "DOCKER" and sources != ["dockerRepository"]):
        raise _error(400, f"a {fmt} remote repository needs exactly one upstream in remoteRepositoryConfig "
                     f"({'dockerRepository' if fmt == 'DOCKER' else fmt.lower() + 'Repository'})",
                     "INVALID_ARGUMENT")
    if fmt == "DOCKER":
        docker = remote["dockerRepository"] or {}
        public, custom = docker.get("publicRepository"), (docker.get("customRepository") or {}).get("uri")
        if bool(public) == bool(custom):
            raise _error(400, "dockerRepository needs one of publicRepository or customRepository",
                         "INVALID_ARGUMENT")
        if public and public != "DOCKER_HUB":
            raise _error(400, f"Invalid value for field 'publicRepository': {public!r}", "INVALID_ARGUMENT")
        if custom and not re.match(r"^https?://[^/\s]+", custom):
            raise _error(400, f"Invalid custom repository URI {custom!r}: an http(s) URI", "INVALID_ARGUMENT")
    return fmt, mode, dict(remote)


class ArtifactRegistryHandler(JsonHandler):
    service = "artifactregistry"
    routes = _ROUTES

    @property
    def ar(self) -> ArtifactRegistry:
        return self.server.state


@route(_ROUTES, "POST", _P + r"/repositories")
def _create(h: ArtifactRegistryHandler, project: str, location: str):
    ar = h.ar
    ar.caller(h, "artifactregistry.repositories.create", project, location)
    if not LOCATION.match(location):
        raise _error(400, f"Invalid location {location!r}", "INVALID_ARGUMENT")
    body = h.json_body() or {}
    repo_id = h.q("repositoryId") or ""
    fmt, mode, remote = _check_body(body, repo_id)
    with ar._lock:
        if (project, location, repo_id) in ar.repos:
            raise _error(409, f"the repository already exists: projects/{project}/locations/{location}/"
                         f"repositories/{repo_id}", "ALREADY_EXISTS")
        repo = ar.repos[(project, location, repo_id)] = Repo(project, location, repo_id, fmt, mode, remote,
                                                              str(body.get("description") or ""))
        op_name = f"projects/{project}/locations/{location}/operations/{uuid.uuid4()}"
        op = {"name": op_name, "done": True,
              "metadata": {"@type": "type.googleapis.com/google.devtools.artifactregistry.v1.OperationMetadata"},
              "response": {"@type": "type.googleapis.com/google.devtools.artifactregistry.v1.Repository",
                           **repo.json()}}
        ar.operations[op_name] = op
    return op


@route(_ROUTES, "GET", _P + r"/repositories/(?P<repo>[^/]+)")
def _get(h: ArtifactRegistryHandler, project: str, location: str, repo: str):
    h.ar.caller(h, "artifactregistry.repositories.get", project, location, repo)
    with h.ar._lock:
        r = h.ar.repos.get((project, location, repo))
    if r is None:
        raise _error(404, "Requested entity was not found.", "NOT_FOUND")
    return r.json()


@route(_ROUTES, "GET", _P + r"/repositories")
def _list(h: ArtifactRegistryHandler, project: str, location: str):
    h.ar.caller(h, "artifactregistry.repositories.list", project, location)
    size = max(1, min(int(h.q("pageSize") or 1000), 1000))
    start = h.q("pageToken") or ""
    with h.ar._lock:
        repos = sorted((r for (p, loc, _), r in h.ar.repos.items() if p == project and loc == location),
                       key=lambda r: r.repo_id)
    repos = [r for r in repos if r.repo_id > start]
    out: dict[str, Any] = {"repositories": [r.json() for r in repos[:size]]} if repos else {}
    if len(repos) > size:
        out["nextPageToken"] = repos[size - 1].repo_id
    return out


@route(_ROUTES, "GET", _P + r"/operations/(?P<op>[^/]+)")
def _operation(h: ArtifactRegistryHandler, project: str, location: str, op: str):
    h.ar.caller(h, "artifactregistry.repositories.get", project, location)
    with h.ar._lock:
        found = h.ar.operations.get(f"projects/{project}/locations/{location}/operations/{op}")
    if found is None:
        raise _error(404, "Requested entity was not found.", "NOT_FOUND")
    return found
