"""Thin tasks for the Hugging Face Hub: token, model/revision, gated access — and the token itself.

The token is a secret end to end: it is read here, passed as a SecretStr, and never logged, put in
a flow parameter, an artifact, a Slack message or an exception message.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import SecretStr

from manifests.errors import PreflightError
from tasks.clients import hf_api
from tasks.retry import task_retries
from tasks.settings import get_settings

TOKENS_URL = "https://huggingface.co/settings/tokens"


@dataclass(frozen=True)
class HubModel:
    id: str
    revision: str  # as asked (branch, tag or commit)
    sha: str  # the commit it resolves to
    params: int | None
    gated: bool
    pipeline_tag: str | None


@task(retries=0, cache_policy=NO_CACHE)
def read_hf_token(*, block: str | None) -> SecretStr:
    """The HF token from a Prefect Secret block, else $HF_TOKEN. Never returned in clear."""
    if block:
        from prefect.blocks.system import Secret

        try:
            value = Secret.load(block).get()
        except ValueError:
            value = None  # no such block: fall back to the environment
        if value:
            return SecretStr(str(value))
    env = get_settings().hf_token or (SecretStr(os.environ["HF_TOKEN"]) if os.environ.get("HF_TOKEN") else None)
    if env is None:
        raise PreflightError("no Hugging Face token found",
                             f"create a read token at {TOKENS_URL} and store it in the Prefect Secret block "
                             f"'{block or 'hf-token'}' (or set HF_TOKEN)")
    return env


def _public_url(model_id: str) -> str:
    return f"https://huggingface.co/{model_id}"


@task(**task_retries())
def check_hf_token(*, token: SecretStr) -> str:
    """Who the token belongs to; a clear error when it is invalid."""
    try:
        who = hf_api(token.get_secret_value()).whoami()
    except HfHubHTTPError as exc:
        if exc.response is not None and exc.response.status_code == 401:
            raise PreflightError("the Hugging Face token is invalid or expired",
                                 f"create a read token at {TOKENS_URL} and update the Secret block") from None
        raise
    return who.get("name", "?")


@task(**task_retries())
def get_model(*, model_id: str, revision: str, token: SecretStr) -> HubModel:
    """The model at ``revision``: commit sha, parameter count (safetensors metadata), gating."""
    api = hf_api(token.get_secret_value())
    try:
        info = api.model_info(model_id, revision=revision, expand=["safetensors", "gated", "sha", "pipeline_tag"])
    except RevisionNotFoundError:
        raise PreflightError(f"revision {revision!r} of {model_id} does not exist",
                             f"use a branch, tag or commit listed at {_public_url(model_id)}/tree/main") from None
    except GatedRepoError:
        raise PreflightError(f"this token has no access to the gated model {model_id}",
                             f"accept the license at {_public_url(model_id)}") from None
    except RepositoryNotFoundError:
        raise PreflightError(f"model {model_id} was not found on the Hub (or is private to another account)",
                             "check model.id for typos") from None
    params = info.safetensors.total if info.safetensors else None
    return HubModel(id=model_id, revision=revision, sha=info.sha or revision, params=params,
                    gated=bool(info.gated), pipeline_tag=info.pipeline_tag)


@task(**task_retries())
def check_gated_access(*, model_id: str, token: SecretStr) -> None:
    """For gated repos: has this token's user accepted the license?"""
    try:
        hf_api(token.get_secret_value()).auth_check(model_id)
    except GatedRepoError:
        raise PreflightError(f"this token has no access to the gated model {model_id}",
                             f"accept the license at {_public_url(model_id)} with the token's account") from None
    except RepositoryNotFoundError:
        raise PreflightError(f"model {model_id} was not found on the Hub (or is private to another account)",
                             "check model.id for typos") from None


COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


@task(**task_retries())
def branch_head(*, model_id: str, revision: str, token: SecretStr | None) -> str | None:
    """The commit a branch points to now; None when ``revision`` is not a branch (a commit or a tag is pinned)."""
    if COMMIT_SHA.match(revision):
        return None
    name = revision.removeprefix("refs/heads/")
    try:
        refs = hf_api(token.get_secret_value() if token else None).list_repo_refs(model_id)
    except RepositoryNotFoundError:
        raise PreflightError(f"model {model_id} was not found on the Hub (or is private to another account)",
                             "check model.id for typos") from None
    return next((b.target_commit for b in refs.branches if b.name == name), None)
