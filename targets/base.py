"""The serving-target seam: the verbs every place a model can serve on implements, and nothing else.

A flow resolves its target once (``targets.target_for(spec)``) and calls one verb; it never asks
which target it holds. A target that cannot do a verb inherits the default here, which raises
``Unsupported`` with one line saying so and what to do instead.

Verbs take the spec as the flow got it (a path, a mapping or a ``DeploymentSpec``): a target resolves
and checks it itself (GKE refuses a Vertex spec and the other way round, naming the field).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from manifests.errors import FleetError

SpecRef = Any  # DeploymentSpec | path | mapping: what a flow parameter holds


class Unsupported(FleetError):
    """This target cannot do this verb (one line: which verb, which target, why, what instead)."""

    def __init__(self, *, target: str, verb: str, why: str, fix: str = "") -> None:
        super().__init__(f"{verb} is not supported on target {target}: {why}", fix)
        self.target, self.verb, self.why = target, verb, why


@dataclass
class Check:
    """One model's health as ``observe`` reports it (one row of check_fleet's table)."""

    model: str
    namespace: str = ""
    cluster: str = ""
    status: str = "healthy"  # healthy | unhealthy | parked | not deployed | error
    color: str = ""
    ready: str = ""
    latency_ms: float | None = None
    queue: float | None = None
    running: float | None = None
    kv_cache: float | None = None
    errors: float | None = None
    drift: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d["drift"] = ", ".join(self.drift)
        d["problems"] = "; ".join(self.problems)
        return d


class ServingTarget:
    """One place models serve on (GKE, Vertex AI, ...). Each verb returns the flow's result mapping; a verb
    a target does not override says, in one line, that this target cannot do it."""

    name: str = "?"

    def _unsupported(self, verb: str, why: str, fix: str = "") -> Unsupported:
        return Unsupported(target=self.name, verb=verb, why=why, fix=fix)

    def provision(self, *, spec: SpecRef, dry_run: bool = False) -> dict[str, Any]:
        """Capacity the model will run on (a cluster and its GPU pool)."""
        raise self._unsupported("provision_cluster", "the target has no capacity step")

    def deploy(self, *, spec: SpecRef, revision: str | None = None, dry_run: bool = False) -> dict[str, Any]:
        """From nothing (or a serving model) to the spec serving (at ``revision`` if given: a Hub commit,
        branch or tag instead of the spec's), checked by smoke prompts."""
        raise self._unsupported("deploy_model", "not implemented")

    def release(self, *, spec: SpecRef, revision: str | None = None, dry_run: bool = False) -> dict[str, Any]:
        """A new revision beside the live one, checked, then switched to; any failure goes back."""
        raise self._unsupported("release_model", "not implemented")

    def rollback(self, *, spec: SpecRef, release_again: Callable[..., dict[str, Any]]) -> dict[str, Any]:
        """Back to the previous revision; ``release_again(spec=..., revision=...)`` releases it anew."""
        raise self._unsupported("rollback_model", "not implemented")

    def park(self, *, spec: SpecRef, reason: str = "manual") -> dict[str, Any]:
        """No GPU paid for while nobody needs the model; what was changed is recorded for wake."""
        raise self._unsupported("park_model", "not implemented")

    def wake(self, *, spec: SpecRef, reason: str = "manual", requested_at: datetime | None = None) -> dict[str, Any]:
        """Undo park from its record, wait until the model answers. ``requested_at``: the wake event's time
        (the first held request), from which the client's wait is counted."""
        raise self._unsupported("wake_model", "not implemented")

    def teardown(self, *, spec: SpecRef, cluster: bool = False, dry_run: bool = False) -> dict[str, Any]:
        """Remove everything the spec created, then verify nothing labelled for it is left."""
        raise self._unsupported("teardown", "not implemented")

    def migrate_back(self, *, spec: SpecRef) -> dict[str, Any]:
        """Move a model serving on a fallback capacity option back to the preferred one when it has room."""
        raise self._unsupported("migrate_back", "the target places the model itself (no capacity options)")

    def mirror(self, *, spec: SpecRef, revision: str | None = None, dry_run: bool = False) -> dict[str, Any]:
        """Copy the revision's weights once to where the target's fast start reads them (resumable, idempotent)."""
        raise self._unsupported("mirror_model", "the target reads the weights from the Hub itself")

    def served_revision(self, *, spec: Any) -> str | None:
        """The model commit the live deployment runs (None when nothing serves): what an event-started
        release must be newer than (targets/trust.py)."""
        raise self._unsupported("release_model by event", "the target cannot say which commit serves",
                                "start the release from the UI/CLI")

    def observe(self, *, spec: Any, smoke: bool, seen: dict[str, Any]) -> Check:
        """Health of a resolved spec's deployed model (``seen``: what this scan already looked up)."""
        raise self._unsupported("check_fleet", "no health probe for this target")

    def idle(self, *, spec: Any, now: datetime) -> Any:
        """The idle policy's decision for a resolved spec (manifests.park.Decision)."""
        raise self._unsupported("park_idle", "no idle metrics for this target")
