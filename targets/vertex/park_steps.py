"""park: undeploy every model (nothing billed), endpoint and model kept, settings in a Prefect Variable."""

from __future__ import annotations

import time
from typing import Any

from manifests import vertex as vx
from manifests.spec import DeploymentSpec
from targets.vertex.serving import find_endpoint, serving, verb_run
from tasks import vertex as tv


def park(spec: DeploymentSpec | str | dict[str, Any]) -> dict[str, Any]:
    """Undeploy every model (nothing billed); endpoint and model kept, settings recorded for wake."""
    from prefect.variables import Variable

    with verb_run(spec, flow="park_model", subject="{name} on Vertex AI") as (spec, report, _):
        ep = find_endpoint(spec)
        if ep is None or not ep.get("deployedModels"):
            report.succeed("nothing deployed: already parked")
            return {"parked": True, "changed": False}
        live = serving(ep) or ep["deployedModels"]
        record = {"endpoint": ep["name"], "model": live[0]["model"], "display_name": live[0].get("displayName"),
                  "dedicated_resources": live[0].get("dedicatedResources"), "parked_at": time.time()}
        with report.step("Record the deployment settings") as step:
            Variable.set(vx.park_variable(spec), record, overwrite=True)
            tv.set_endpoint_labels(endpoint=ep["name"], labels={**(ep.get("labels") or {}), vx.PARKED_LABEL: "true"})
            step.detail = f"Prefect Variable {vx.park_variable(spec)}"
        with report.step("Undeploy (endpoint and model kept)") as step:
            for d in ep["deployedModels"]:
                tv.undeploy_model(endpoint=ep["name"], deployed_model_id=d["id"])
            step.detail = f"{len(ep['deployedModels'])} deployed model(s) undeployed"
        report.succeed(f"parked: {ep['name']} has no deployed model (nothing billed)")
        return {"parked": True, "changed": True, "record": record}
