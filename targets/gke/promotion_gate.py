"""release.auto_promote: false — the preview is announced and the flow run pauses for a person's decision
(Prefect's pause_flow_run with a RunInput, like Argo Rollouts' autoPromotionEnabled: false)."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

from prefect import get_run_logger
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from manifests import names
from manifests.errors import DeployError, FleetError
from manifests.release import RELEASE_ANNOTATION, promotion_notice
from manifests.spec import human_duration
from targets.gke.release_steps import Release
from targets.gke.serving import scaled
from tasks import k8s

GATE_POLL_S = 5.0  # how often a paused release checks whether it was resumed


class Promotion(RunInput):
    """The decision at the promotion gate: the Prefect UI's Resume form, or ``run_input`` of the resume API."""

    promote: bool = Field(description="true: switch traffic to the candidate; false: abort and roll back")
    reason: str = Field("", description="why (kept in the release history and the Slack thread)")
    by: str = Field("", description="who decided (Prefect OSS does not record who resumed a run)")


class PromotionRefused(DeployError):
    """The promotion gate closed without a promotion: aborted by a person, or nobody answered in time."""

    def __init__(self, problem: str, fix: str, *, reason: str, figures: dict[str, Any]) -> None:
        super().__init__(problem, fix, reason=reason)
        self.figures = figures


def step_promotion_gate(r: Release) -> str:
    """Announce the preview, then pause this flow run until a person promotes or aborts (or time runs out).

    The model's lock stays held while paused — the release is still in flight — and Prefect's lease
    renewal thread keeps it alive while this process lives (tasks/locks.py). If the process dies, the
    lease lapses, the paused run can never continue, and a rerun re-observes: the candidate is up, so it
    is previewed, analysed and gated again (the stale paused run is cancelled so nobody resumes it).
    """
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_UI_URL

    spec = r.spec
    run_id = flow_run.get_id()
    if run_id is None:
        raise FleetError("release.auto_promote is false but this release is not a Prefect flow run",
                         "run release_model as a flow (the gate pauses the flow run)")
    timeout_s = spec.release.promotion_timeout.total_seconds()
    ui = PREFECT_UI_URL.value()
    notice = promotion_notice(spec, live=r.stable, candidate=r.candidate, revision=r.t.model.sha,
                              figures=r.figures, flow_run_id=run_id,
                              ui_url=f"{ui}/flow-runs/flow-run/{run_id}" if ui else None, timeout_s=timeout_s)
    cancel_stale_gate(r.observed.in_flight, current=run_id)
    # On the cluster, for a rerun's plan and for anyone reading the Service: which run waits, since when.
    gate = {"flow_run": run_id, "opened": datetime.now(UTC).isoformat(timespec="seconds")}
    r.in_flight = dict(r.in_flight, gate=gate)
    k8s.annotate(kubeconfig=r.kubeconfig, api_version="v1", kind="Service", name=names.service(spec),
                 namespace=spec.namespace, annotations={RELEASE_ANNOTATION: json.dumps(r.in_flight, sort_keys=True)})
    r.report.note(notice)
    wait = scaled(timeout_s)  # the sandbox's clock, like every spec duration
    try:
        answer = pause_flow_run(wait_for_input=Promotion.with_initial_data(description=notice),
                                timeout=math.ceil(wait), poll_interval=max(0.25, min(GATE_POLL_S, scaled(GATE_POLL_S))))
    except FlowPauseTimeout:
        reopen_expired_pause(run_id)
        raise PromotionRefused(f"nobody promoted {r.candidate} within release.promotion_timeout "
                               f"({human_duration(timeout_s)})",
                               "no traffic moved; release again when someone can check the preview, or raise "
                               "release.promotion_timeout", reason="PromotionTimeout",
                               figures=r.figures.get("pre") or {}) from None
    who = answer.by.strip() or "someone"
    why = f": {answer.reason.strip()}" if answer.reason.strip() else ""
    if not answer.promote:
        raise PromotionRefused(f"aborted at the promotion gate by {who}{why}",
                               "no traffic moved; release again when the candidate is fixed",
                               reason="PromotionAborted", figures=r.figures.get("pre") or {})
    r.approval = f"promoted by {who}{why}"
    r.report.note(f"▶️ {r.approval} — switching traffic {r.stable} → {r.candidate}")
    return r.approval


def reopen_expired_pause(run_id: str) -> None:
    """The gate timed out: put this run back to Running before rolling back. Prefect's server replaces any
    state proposed for a run whose pause expired with "The flow was failed and never resumed." (its
    HandleResumingPausedFlows rule; the pause_expirations service does the same), so without this the run's
    final state would hide the cause the rollback names. ``force`` skips that rule, as a worker's does."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.states import Running

    try:
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(UUID(run_id), Running(message="promotion gate timed out: rolling back"),
                                      force=True)
    except Exception as exc:  # noqa: BLE001 - the rollback matters more than the run's final message
        get_run_logger().warning("could not reopen the timed-out paused run %s: %s", run_id, exc)


def cancel_stale_gate(in_flight: dict[str, Any] | None, *, current: str) -> None:
    """The run that opened the last gate is gone (this run holds the lock): if the server still shows it
    Paused (its process died) or Running (resumed after that, with nothing behind it), cancel it so nobody
    presses a Resume button that can do nothing."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    old = ((in_flight or {}).get("gate") or {}).get("flow_run")
    if not old or old == current:
        return
    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(UUID(old))
            if run.state is not None and (run.state.is_paused() or run.state.is_running()):
                client.set_flow_run_state(UUID(old), Cancelled(message=f"superseded by flow run {current}: "
                                                                      "its process is gone"))
                get_run_logger().info("cancelled the stale paused release run %s", old)
    except Exception as exc:  # noqa: BLE001 - a stale run is cosmetic; the gate that matters is this run's
        get_run_logger().warning("could not cancel the stale paused run %s: %s", old, exc)
