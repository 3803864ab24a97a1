"""wake: redeploy from the park record, wait until it answers."""

from __future__ import annotations

import re
from typing import Any

from manifests import vertex as vx
from manifests.errors import PreflightError
from manifests.spec import DeploymentSpec
from targets.vertex.analysis import smoke
from targets.vertex.serving import (
    _timeout_s,
    find_endpoint,
    quota_check,
    serving,
    verb_run,
)
from tasks import vertex as tv
from tasks.settings import get_settings


def wake(spec: DeploymentSpec | str | dict[str, Any]) -> dict[str, Any]:
    """Redeploy from the park record, wait until it answers."""
    from prefect.variables import Variable

    with verb_run(spec, flow="wake_model", subject="{name} on Vertex AI") as (spec, report, _):
        ep = find_endpoint(spec)
        if ep is not None and serving(ep):
            report.succeed("already serving")
            return {"woken": False, "endpoint": ep["name"]}
        record = Variable.get(vx.park_variable(spec), default=None)
        if ep is None or not record:
            raise PreflightError(f"no park record for {spec.name} (Prefect Variable {vx.park_variable(spec)})",
                                 "run deploy_model with this spec instead")
        with report.step("Vertex AI GPU quota") as step:
            step.detail = quota_check(spec, adding=vx.gpus_per_deployment(spec))
        with report.step("Redeploy from the recorded settings") as step:
            body = {"model": record["model"], "display_name": record.get("display_name") or spec.name,
                    "dedicated_resources": _snake(record["dedicated_resources"])}
            dm = tv.deploy_model(endpoint=ep["name"], deployed_model=body, traffic_split={"0": 100},
                                 timeout_s=_timeout_s(spec, None) + get_settings().operation_timeout_s)
            step.detail = f"deployed model {dm['id']}"
        with report.step("Wait until the model answers") as step:
            tv.wait_answering(endpoint=ep["name"], instance=vx.smoke_instance("Hello", 4),
                              timeout_s=_timeout_s(spec, None), want_id=dm["id"])
            smoke(spec, ep["name"], want_id=dm["id"])
        labels = {k: v for k, v in (ep.get("labels") or {}).items() if k != vx.PARKED_LABEL}
        tv.set_endpoint_labels(endpoint=ep["name"], labels=labels)
        report.succeed(f"awake: {ep['name']} serves deployed model {dm['id']}")
        return {"woken": True, "endpoint": ep["name"], "deployed_model_id": dm["id"]}


def _snake(d: Any) -> Any:
    """REST JSON (camelCase) back into the snake_case mapping the proto-plus types take."""
    if isinstance(d, dict):
        return {re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), k): _snake(v) for k, v in d.items()}
    return [_snake(v) for v in d] if isinstance(d, list) else d
