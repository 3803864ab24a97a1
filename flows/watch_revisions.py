"""watch_revisions: a new commit on a model's tracked branch becomes a release, through a Prefect event.

1. Read each spec's tracked branch on the Hub (``model.revision`` when it names a branch; a commit or a
   tag is pinned and never tracked)
2. Read what the cluster serves: the live color's Deployment revision annotation
3. For a new commit, emit ``llm-fleet.model.revision`` once — the ``release_model`` deployment's trigger
   in prefect.yaml turns it into a release of that commit

The Hub webhook receiver (``llm-fleet webhook``) announces through the same ``announce_revision``, so a
commit announced by either is never announced again.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.events import emit_event
from prefect.variables import Variable

from manifests.errors import FleetError
from manifests.spec import DeploymentSpec, SpecError, load_spec
from targets import target_for
from tasks import hf
from tasks.log import logger

ROOT = Path(__file__).resolve().parents[1]
EVENT = "llm-fleet.model.revision"


class WatchError(FleetError):
    """One or more specs could not be checked (the others were)."""


@dataclass
class Finding:
    spec: str
    name: str = ""
    model: str = ""
    branch: str = ""
    head: str = ""
    serving: str = ""
    status: str = ""  # announced | already announced | serving newest | not deployed | pinned | error
    detail: str = ""
    event_id: str = ""


def default_specs() -> list[str]:
    """Every GKE spec bundled under deployments/ (a spec that does not load is reported, not skipped)."""
    out = []
    for path in sorted((ROOT / "deployments").glob("*.yaml")):
        try:
            if load_spec(path).target != "gke":
                continue
        except SpecError:
            pass
        out.append(spec_ref(path))
    return out


def spec_ref(path: str | Path) -> str:
    """The path a worker can open: relative to the project root (workers run there), else absolute."""
    p = Path(path).resolve()
    try:
        return p.relative_to(ROOT).as_posix()
    except ValueError:
        return str(p)


def tracked_branch(spec: DeploymentSpec) -> str | None:
    rev = spec.model.revision
    return None if hf.COMMIT_SHA.match(rev) else rev.removeprefix("refs/heads/")


def record_name(spec: DeploymentSpec) -> str:
    # A Prefect Variable per model (project + name, like the model lock); names allow [a-z0-9_-].
    return f"llm-fleet-announced-{spec.cluster.project}-{spec.name}"


def announce_revision(spec: DeploymentSpec, *, spec_path: str, revision: str, source: str) -> str | None:
    """Emit the revision event once per commit; returns its id, or None when already announced."""
    name = record_name(spec)
    last = Variable.get(name) or {}
    if isinstance(last, dict) and last.get("revision") == revision:
        return None
    event = emit_event(
        EVENT,
        resource={"prefect.resource.id": f"llm-fleet.model.{spec.name}", "prefect.resource.name": spec.name,
                  "llm-fleet.model-id": spec.model.id, "llm-fleet.project": spec.cluster.project},
        payload={"spec": spec_path, "revision": revision, "model": spec.model.id,
                 "branch": tracked_branch(spec) or "", "source": source},
    )
    if event is None:
        raise WatchError("Prefect events are not being sent (no Prefect API configured)",
                         "set PREFECT_API_URL to the Prefect server the release_model deployment lives on")
    Variable.set(name, {"revision": revision, "event_id": str(event.id), "source": source,
                        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, overwrite=True)
    return str(event.id)


def check_spec(path: str) -> Finding:
    found = Finding(spec=spec_ref(path))
    try:
        spec = load_spec(path)
    except SpecError as exc:
        found.status, found.detail = "error", str(exc)
        return found
    found.name, found.model = spec.name, spec.model.id
    branch = tracked_branch(spec)
    if spec.target != "gke" or branch is None:
        found.status = "pinned"
        found.detail = ("target is not gke" if spec.target != "gke"
                        else f"revision {spec.model.revision[:12]} is a commit")
        return found
    found.branch = branch
    try:
        token = hf.read_hf_token(block=spec.secret.prefect_block)
    except FleetError:
        token = None  # public repos answer anonymously; private ones fail below with a clear error
    try:
        head = hf.branch_head(model_id=spec.model.id, revision=spec.model.revision, token=token)
        if head is None:
            found.status, found.detail = "pinned", f"{branch!r} is a tag, not a branch"
            return found
        found.head = head
        serving = target_for(spec).served_revision(spec=spec)
        found.serving = serving or ""
        if serving is None:
            found.status, found.detail = "not deployed", "nothing serves this spec: deploy_model first"
        elif serving == head:
            found.status = "serving newest"
        elif event_id := announce_revision(spec, spec_path=found.spec, revision=head, source="watch_revisions"):
            found.status, found.event_id = "announced", event_id
            found.detail = f"{serving[:12]} → {head[:12]}"
        else:
            found.status, found.detail = "already announced", f"{head[:12]} waits for (or failed) its release"
    except Exception as exc:  # noqa: BLE001 - one spec's failure must not hide the others; re-raised at the end
        found.status, found.detail = "error", str(exc) if isinstance(exc, FleetError) else f"{type(exc).__name__}: {exc}"
    return found


@flow(name="watch_revisions", log_prints=True)
def watch_revisions(specs: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Each spec's tracked branch on the Hub vs the live revision; a new commit emits llm-fleet.model.revision.

    Args:
        specs: Spec files to watch (empty: every bundled GKE spec).
    """
    log = logger()
    findings = [check_spec(p) for p in (specs or default_specs())]
    for f in findings:
        log.info("%s: %s%s", f.spec, f.status, f" ({f.detail})" if f.detail else "")
    rows = [asdict(f) for f in findings]
    create_table_artifact(key="watch-revisions", table=rows,
                          description="Tracked branch head vs live revision, per spec")
    errors = [f for f in findings if f.status == "error"]
    if errors:
        raise WatchError(f"{len(errors)} of {len(findings)} spec(s) could not be checked: "
                         + "; ".join(f"{f.spec}: {f.detail}" for f in errors),
                         "fix those specs or credentials; the others were checked and announced")
    return rows
