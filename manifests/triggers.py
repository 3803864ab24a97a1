"""What an event (or a Hub webhook) may ask a flow to do: the pure check, no I/O but reading a path.

Anyone who can post a Prefect event chooses the payload, and the deployment triggers in prefect.yaml
copy it into the flow's parameters. So a run that came from an event only gets:

- ``spec``: a path (never an inline dict: that would be any image, command, env) to a file inside an
  allow-listed directory (the bundled ``deployments/``, or ``LLM_FLEET_TRUSTED_SPEC_DIRS``), after
  resolving symlinks and ``..``;
- ``revision`` (releases): a 40-hex commit that is on the spec's tracked branch on the Hub and newer
  than the one serving (``revision_refusal`` decides from the branch's history the task read).

A person starting a run from the UI or ``prefect deployment run`` is not an event: they may pass any
path or dict, as Prefect access already lets them. Argo CD and Flux's receivers do the same: the
webhook only says "look again", the repository decides what runs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from manifests.errors import FleetError

COMMIT = re.compile(r"^[0-9a-f]{40}$")
# The value the deployment triggers in prefect.yaml pass as ``source``: a constant in the trigger, not
# templated from the event, so an event cannot choose it.
EVENT_SOURCE = "event"
SPEC_SUFFIXES = (".yaml", ".yml")


class TriggerRefused(FleetError):
    """An event asked for something an event may not ask for; nothing was started."""


def trusted_spec_path(spec: object, *, allowed_dirs: Sequence[Path], root: Path) -> Path:
    """The spec file an event named, resolved, when it lies in an allowed directory; else TriggerRefused."""
    dirs = ", ".join(str(d) for d in allowed_dirs)
    fix = f"name a spec file under {dirs} (LLM_FLEET_TRUSTED_SPEC_DIRS), or start the run from the UI/CLI"
    if not isinstance(spec, str) or not spec:
        kind = "an inline spec (a mapping)" if isinstance(spec, dict) else f"a {type(spec).__name__}"
        raise TriggerRefused(f"event refused: spec must be the path of a bundled spec file, got {kind}", fix)
    path = Path(spec)
    resolved = (path if path.is_absolute() else root / path).resolve()
    if resolved.suffix not in SPEC_SUFFIXES:
        raise TriggerRefused(f"event refused: spec {spec!r} is not a .yaml file", fix)
    for d in allowed_dirs:
        base = (d if d.is_absolute() else root / d).resolve()
        if resolved.is_relative_to(base):
            if not resolved.is_file():
                raise TriggerRefused(f"event refused: spec {spec!r} does not exist", fix)
            return resolved
    raise TriggerRefused(f"event refused: spec {spec!r} is outside the trusted spec directories", fix)


def revision_refusal(*, revision: object, branch: str | None, history: Sequence[str] | None,
                     serving: str | None) -> str | None:
    """Why an event's ``revision`` may not be released, or None when it may.

    ``history`` is the tracked branch's commits, newest first, as the Hub lists them; ``serving`` the
    commit the live color runs (None when nothing serves).
    """
    if not isinstance(revision, str) or not COMMIT.match(revision):
        return (f"event refused: revision {str(revision)[:60]!r} is not a 40-hex commit "
                "(an event may only release a commit of the tracked branch)")
    if branch is None:
        return "event refused: the spec pins model.revision (no tracked branch): release it from the UI/CLI"
    if history is None or revision not in history:
        return f"event refused: commit {revision[:12]} is not on the tracked branch {branch!r}"
    if serving is not None:
        if revision == serving:
            return f"event refused: commit {revision[:12]} is already serving"
        if serving in history and history.index(revision) > history.index(serving):
            return (f"event refused: commit {revision[:12]} is older than the serving {serving[:12]} on "
                    f"{branch!r} (a replayed or stale event)")
    return None
