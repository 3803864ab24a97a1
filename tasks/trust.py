"""Checks that run before an event-started flow does anything: the spec path and the commit (on the Hub).

The pure rules are ``manifests/triggers.py``; this asks the Hub for the tracked branch's history. Both
raise ``TriggerRefused`` (one line, nothing created) — the flow calls them first when its ``source`` is
``event``.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from prefect import task
from pydantic import SecretStr

from manifests.spec import DeploymentSpec
from manifests.triggers import TriggerRefused, revision_refusal, trusted_spec_path
from tasks.clients import hf_api
from tasks.hf import COMMIT_SHA
from tasks.retry import task_retries
from tasks.settings import get_settings

ROOT = Path(__file__).resolve().parents[1]


def trusted_dirs() -> list[Path]:
    """The directories event-named specs may live in: $LLM_FLEET_TRUSTED_SPEC_DIRS, else deployments/."""
    return get_settings().trusted_spec_dirs or [ROOT / "deployments"]


def event_spec_path(spec: object) -> Path:
    """The spec file an event named, when it is allowed (a path, under a trusted directory)."""
    return trusted_spec_path(spec, allowed_dirs=trusted_dirs(), root=ROOT)


def tracked_branch(spec: DeploymentSpec) -> str | None:
    rev = spec.model.revision
    return None if COMMIT_SHA.match(rev) else rev.removeprefix("refs/heads/")


@task(**task_retries())
def branch_history(*, model_id: str, branch: str, token: SecretStr | None) -> list[str] | None:
    """The branch's commits, newest first (None when the repo has no such branch)."""
    api = hf_api(token.get_secret_value() if token else None)
    refs = api.list_repo_refs(model_id)
    if branch not in {b.name for b in refs.branches}:
        return None  # a tag or a PR ref is not a tracked branch, even when the Hub resolves it
    try:
        return [c.commit_id for c in api.list_repo_commits(model_id, revision=branch)]
    except (RevisionNotFoundError, RepositoryNotFoundError):
        return None


def check_event_revision(*, spec: DeploymentSpec, revision: object, serving: str | None,
                         token: SecretStr | None) -> str:
    """The commit an event may release (on the tracked branch, newer than ``serving``); else TriggerRefused."""
    branch = tracked_branch(spec)
    history = None
    if isinstance(revision, str) and COMMIT_SHA.match(revision) and branch is not None:
        history = branch_history(model_id=spec.model.id, branch=branch, token=token)
    why = revision_refusal(revision=revision, branch=branch, history=history, serving=serving)
    if why is not None:
        raise TriggerRefused(why, "start the release from the UI/CLI if this commit is really wanted")
    assert isinstance(revision, str)
    return revision
