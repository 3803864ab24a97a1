"""The gate every event-started run passes first, whatever the target: what an event may ask for.

A run whose ``source`` is ``event`` (the deployment triggers in prefect.yaml pass it as a constant) may
only name a spec file under a trusted directory, and a release only a commit on the spec's tracked
branch, newer than the one serving — asked of the Hub and of the target before anything is created.
Otherwise ``TriggerRefused``: one line, nothing started. The rules are ``manifests/triggers.py``.
"""

from __future__ import annotations

from typing import Any

from manifests.errors import FleetError
from manifests.spec import load_spec
from tasks import hf, trust


def admit_event_spec(spec: Any) -> str:
    """The trusted spec file an event named (resolved), else TriggerRefused."""
    return str(trust.event_spec_path(spec))


def admit_event_release(*, spec: Any, revision: Any) -> tuple[str, str]:
    """(spec path, commit) an event may release: a trusted file, a commit of its tracked branch on the Hub,
    newer than the one serving; else TriggerRefused."""
    from targets import target_for

    path = admit_event_spec(spec)
    loaded = load_spec(path)
    serving = target_for(loaded).served_revision(spec=loaded) if trust.tracked_branch(loaded) else None
    try:
        token = hf.read_hf_token(block=loaded.secret.prefect_block)
    except FleetError:
        token = None  # public repos answer anonymously
    return path, trust.check_event_revision(spec=loaded, revision=revision, serving=serving, token=token)
