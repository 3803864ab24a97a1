"""The release-strategy seam: a strategy is an ordered list of named, idempotent steps (Argo Rollouts'
bluegreen.go / canary.go shape), a pure plan that picks them, and how a failed release is undone.

``run_release`` runs any strategy's plan, step by step, each one a line in the Slack thread; a failed
step hands over to the strategy's rollback. A new strategy (canary on a Gateway) is a new module with
a class like ``bluegreen.BlueGreen`` and one line in ``strategy_for``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from contextvars import ContextVar
from typing import Any, Protocol

from prefect import get_run_logger

from manifests import names
from manifests.errors import FleetError
from manifests.names import Color
from manifests.release import Desired, Observed, ReleasePlan
from manifests.spec import DeploymentSpec
from targets.gke.bluegreen import BlueGreen
from targets.gke.canary import Canary
from targets.gke.release_steps import Release, Step, candidate_replicas
from targets.gke.serving import Prepared, observe, scaled
from tasks import k8s
from tasks.locks import model_lock
from tasks.report import Report, artifact_key


class ReleaseStrategy(Protocol):
    name: str
    steps: dict[str, tuple[str, Step]]  # name -> (title, step); the plan's names select them in order

    def plan(self, spec: DeploymentSpec, observed: Observed, desired: Desired) -> ReleasePlan: ...

    def roll_back(self, r: Release, exc: BaseException) -> str: ...


def strategy_for(spec: DeploymentSpec) -> ReleaseStrategy:
    """release.strategy -> its implementation (recreate is blue-green's plan with stop_live first)."""
    # on a Gateway traffic moves by HTTPRoute weights: blue-green there is the one-step canary (0 -> 100)
    gateway = spec.expose.gateway is not None
    return {"blue-green": Canary if gateway else BlueGreen, "recreate": BlueGreen, "canary": Canary}[
        spec.release.strategy]()


class RollbackFailed(FleetError):
    """A step failed and so did its rollback: both causes, and how to find where traffic is."""


ROLLED_BACK_TO = "llm_fleet_rolled_back_to"  # set on the step's exception once the rollback succeeded


# True while a release's steps run: whatever fails there is rolled back (the run's one ERROR line names it)
# or its rollback fails (RollbackFailed, at ERROR with both causes), so no failing task needs its own line.
_IN_STEPS: ContextVar[bool] = ContextVar("llm_fleet_in_release_steps", default=False)


class _RolledBackAtDebug(logging.Filter):
    """Prefect's engine logs the exception of every failed run with its traceback at ERROR ("Engine execution
    exited with unexpected exception"), and of every failed task ("Task run failed with exception: …", then
    "Finished in state Failed(…)"); after an automatic rollback the run's one ERROR line already said what
    happened. So the flow run's traceback of a rolled-back exception goes to DEBUG, and while a release's
    steps run a task's traceback goes to DEBUG and its one-line "Finished in state Failed" to INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and getattr(exc, ROLLED_BACK_TO, None):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        elif record.name == "prefect.task_runs" and record.levelno >= logging.ERROR and _IN_STEPS.get():
            record.levelno, record.levelname = (logging.DEBUG, "DEBUG") if exc is not None else (logging.INFO, "INFO")
        return True


for _name in ("prefect.flow_runs", "prefect.task_runs"):
    if not any(isinstance(f, _RolledBackAtDebug) for f in logging.getLogger(_name).filters):
        logging.getLogger(_name).addFilter(_RolledBackAtDebug())


@contextlib.contextmanager
def _release_steps() -> Any:
    token = _IN_STEPS.set(True)
    try:
        yield
    finally:
        _IN_STEPS.reset(token)


def rolled_back(exc: BaseException, report: Report) -> Any:
    """An automatic rollback that worked is an outcome, not a crash: one ERROR line with the cause (the
    step's traceback at DEBUG), and the run ends Failed with that message (no Prefect traceback), still
    raising ``exc`` to an in-process caller. None when ``exc`` was not rolled back (re-raise it)."""
    from prefect.states import Failed

    stable = getattr(exc, ROLLED_BACK_TO, None)
    if stable is None:
        return None
    log = get_run_logger()
    log.debug("the step that failed", exc_info=exc)
    message = report.scrub(f"rolled back automatically, {stable} keeps serving — cause: {exc}")
    log.error(message.splitlines()[0])
    return Failed(message=message, data=exc)


def run_release(t: Prepared, report: Report, observed: Observed, plan: ReleasePlan, *,
                extra_steps: dict[str, tuple[str, Step]] | None = None) -> tuple[dict[str, Any], Color | None]:
    """Run the plan's steps in order (caller holds the model's lock). Returns (result, color to retire later).
    ``extra_steps``: named steps beside the strategy's own (the move back to a preferred capacity option's
    placement check), undone by the same rollback."""
    strategy = strategy_for(t.spec)
    steps = {**strategy.steps, **(extra_steps or {})}
    if plan.action == "clean_up":
        r = Release(t, report, plan, observed, stable=plan.retire, candidate=plan.live, switched=True)  # type: ignore[arg-type]
    else:
        r = Release(t, report, plan, observed, stable=plan.live, candidate=plan.candidate)  # type: ignore[arg-type]
    for row in plan.table():
        get_run_logger().info("plan: %s — %s", row["step"], row["detail"])
    report.table_artifact(artifact_key("release", t.spec.name, "plan"), plan.table(), "Release plan")
    try:
        with _release_steps():
            for name in plan.steps:
                if name == "scale_down":
                    continue  # after the lock, see finish_retire
                title, fn = steps[name]
                with report.step(title) as step:
                    step.detail = fn(r)
    except Exception as exc:
        try:
            strategy.roll_back(r, exc)
        except Exception as rollback_exc:  # say both: the first cause is what the user must fix
            raise RollbackFailed(f"{exc}; then the rollback failed: {rollback_exc}",
                                 f"check which color the live Service {names.service(r.spec)} selects (kubectl get "
                                 "svc -o jsonpath='{.spec.selector}'), then run rollback_model") from rollback_exc
        with contextlib.suppress(AttributeError):  # exceptions with __slots__ keep the plain path
            setattr(exc, ROLLED_BACK_TO, r.stable)
        raise
    result = {"color": r.candidate, "previous_color": r.stable, "replicas": candidate_replicas(r),
              "action": "released" if plan.action == "release" else plan.action, "figures": r.figures,
              "times": r.times, "smoke": r.figures.get("smoke", [])}
    return result, (plan.retire if "scale_down" in plan.steps else None)


def finish_retire(t: Prepared, report: Report, color: Color) -> None:
    """Keep the old color warm for scale_down_delay (rollback_model can switch back meanwhile), then stop it."""
    spec = t.spec
    delay = spec.release.scale_down_delay.total_seconds()
    with report.step(f"Keep {color} warm {delay:g}s, then scale it to 0") as step:
        time.sleep(scaled(delay))
        with model_lock(spec, purpose="scale down", kubeconfig=t.kubeconfig):
            now = observe(spec, t.kubeconfig)
            if now.live == color:
                step.detail = f"{color} is live again (rolled back meanwhile): kept"
                return
            k8s.scale_deployment(kubeconfig=t.kubeconfig, namespace=spec.namespace,
                                 name=names.deployment(spec, color), replicas=0)
            step.detail = f"{names.deployment(spec, color)} scaled to 0"


def refuse_if_parked(spec: DeploymentSpec, plan: ReleasePlan) -> None:
    if plan.action == "parked":
        raise FleetError(f"{spec.name} is parked ({plan.reason}); a change needs a warm color to fall back to",
                         f"run wake_model for {spec.name}, then release again (the hold proxy keeps "
                         "requests meanwhile)")
