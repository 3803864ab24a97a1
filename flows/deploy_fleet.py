"""deploy_fleet: N models from a fleet file, concurrently, with one summary.

1. Load the fleet file (a list of spec paths) and check no two specs claim the same model
2. Provision each cluster once — pools of one cluster one after another (GKE runs one operation per
   cluster at a time), different clusters side by side
3. Deploy every model as soon as its cluster and pool are ready, side by side (subflows in threads)
4. One model's failure is one row: the others carry on; the run fails at the end if any did
"""

from __future__ import annotations

import contextvars
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal

from prefect import Flow, flow
from prefect.flows import load_flow_from_entrypoint
from pydantic import Field

from manifests.errors import FleetError
from manifests.fleet import SpecParam, bundled_fleets, check_fleet_specs, cluster_key, load_fleet, pool_key
from manifests.spec import DeploymentSpec, resolve_gke_spec
from tasks.log import logger
from tasks.report import Report

# The UI offers the bundled fleet files; any other path works from the CLI and the API.
FleetPath = Literal[tuple(bundled_fleets())]  # type: ignore[valid-type]
# One tab per kind in the UI form (untitled, "str | str" looked like two identical choices)
FleetParam = Annotated[FleetPath, Field(title="bundled fleet")] | Annotated[str, Field(title="fleet file")]


class FleetFailed(FleetError):
    """Some models of the fleet did not deploy (the others did)."""


@dataclass
class Outcome:
    model: str
    cluster: str
    status: str = "pending"  # deployed | failed | skipped
    seconds: float = 0.0
    revision: str = ""
    endpoint: str = ""
    cause: str = ""


def _in_thread(pool: ThreadPoolExecutor, fn, *args, **kwargs) -> Future:
    """Submit with the caller's context, so Prefect links the subflow runs to this flow run."""
    ctx = contextvars.copy_context()
    return pool.submit(ctx.run, fn, *args, **kwargs)


def _subflow(name: str) -> Flow:
    """The flow ``flows/<name>.py:<name>``, named by its entrypoint as prefect.yaml names it (flows never
    import each other); called from this flow it runs as a subflow, linked to this run."""
    return load_flow_from_entrypoint(f"flows.{name}:{name}", use_placeholder_flow=False)


def _provision_cluster_group(group: list[tuple[Any, DeploymentSpec]]) -> dict[tuple, BaseException | None]:
    """Provision one cluster's pools in turn; returns each pool's error (None when ready)."""
    provision_cluster = _subflow("provision_cluster")
    out: dict[tuple, BaseException | None] = {}
    for ref, spec in group:
        try:
            provision_cluster(spec=ref)
            out[pool_key(spec)] = None
        except BaseException as exc:  # noqa: BLE001 - reported per model
            out[pool_key(spec)] = exc
    return out


def _deploy_one(ref: Any, spec: DeploymentSpec, ready: Future, outcome: Outcome, started: float) -> Outcome:
    try:
        errors = ready.result()
        if errors.get(pool_key(spec)) is not None:
            raise errors[pool_key(spec)]
        result = _subflow("deploy_model")(spec=ref)
        outcome.status, outcome.revision = "deployed", str(result.get("revision", ""))[:12]
        outcome.endpoint = result.get("endpoint", "")
    except BaseException as exc:  # noqa: BLE001 - one model's failure must not stop the others
        outcome.status, outcome.cause = "failed", str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    outcome.seconds = round(time.monotonic() - started, 2)
    return outcome


@flow(name="deploy_fleet", log_prints=True)
def deploy_fleet(fleet: FleetParam = "deployments/fleets/demo.yaml",
                 specs: tuple[SpecParam, ...] = (), max_parallel: int = 20,
                 dry_run: bool = False) -> dict[str, Any]:
    """Provision each cluster once and deploy every model of the fleet concurrently; one summary.

    Args:
        fleet: The fleet file: a bundled one (deployments/fleets/*.yaml) or another (unused when specs are given).
        specs: Specs to deploy instead of the fleet file's.
        max_parallel: At most this many provisions and deploys at once.
        dry_run: Show each model's plan, change nothing.
    """
    log = logger()
    refs: list[Any] = list(specs) if specs else [str(p) for p in load_fleet(fleet)]
    loaded = [resolve_gke_spec(r, flow="deploy_fleet") for r in refs]
    check_fleet_specs(loaded)
    clusters: dict[tuple, list[tuple[Any, DeploymentSpec]]] = {}
    for ref, s in zip(refs, loaded, strict=True):
        group = clusters.setdefault(cluster_key(s), [])
        if all(pool_key(s) != pool_key(o) for _, o in group):
            group.append((ref, s))  # one provision per pool; specs sharing a pool share its provision
    report = Report("deploy_fleet", f"{len(loaded)} models on {len(clusters)} cluster(s)", None)
    outcomes = [Outcome(s.name, "/".join(cluster_key(s))) for s in loaded]
    if dry_run:
        rows = [asdict(o) | {"status": "would deploy"} for o in outcomes]
        report.table_artifact("deploy-fleet-plan", rows, "What deploy_fleet would roll out")
        report.succeed(f"dry run: {len(loaded)} models on {len(clusters)} cluster(s)")
        return {"dry_run": True, "models": rows}
    started = time.monotonic()
    with report.run("deploy-fleet-run"):
        with report.step(f"Provision {len(clusters)} cluster(s) and deploy {len(loaded)} model(s) concurrently") \
                as step, ThreadPoolExecutor(max_workers=max(1, min(max_parallel, len(loaded) + len(clusters)))) as pool:
            ready = {key: _in_thread(pool, _provision_cluster_group, group) for key, group in clusters.items()}
            futures = [_in_thread(pool, _deploy_one, r, s, ready[cluster_key(s)], o, started)
                       for r, s, o in zip(refs, loaded, outcomes, strict=True)]
            for f in futures:
                o = f.result()
                log.info("%s: %s in %.1f s %s", o.model, o.status, o.seconds, o.cause)
            ok = sum(o.status == "deployed" for o in outcomes)
            step.detail = f"{ok}/{len(outcomes)} deployed in {time.monotonic() - started:.1f} s"
        rows = [asdict(o) for o in outcomes]
        report.table_artifact("deploy-fleet", rows, f"deploy_fleet: {ok}/{len(outcomes)} models deployed")
        failed = [o for o in outcomes if o.status != "deployed"]
        if failed:
            raise FleetFailed(f"{len(failed)} of {len(outcomes)} models failed: " +
                              "; ".join(f"{o.model}: {o.cause}" for o in failed),
                              "see each model's deploy_model run (linked as a subflow) and rerun deploy_fleet: "
                              "deployed models are a no-op")
        report.succeed(f"{ok} models serving, wall time {time.monotonic() - started:.1f} s")
        return {"models": rows, "seconds": round(time.monotonic() - started, 2)}
