"""park: undeploy every model (nothing billed), endpoint and model kept, settings in a Prefect Variable."""

from __future__ import annotations

import time
from typing import Any

from manifests import vertex as vx
from manifests.spec import DeploymentSpec
from targets.vertex.serving import find_endpoint, resolve_vertex_spec, serving
from tasks import vertex as tv
from tasks.locks import model_lock
from tasks.report import Report, artifact_key


def park(spec: DeploymentSpec | str | dict[str, Any]) -> dict[str, Any]:
    """Undeploy every model (nothing billed); endpoint and model kept, settings recorded for wake."""
    from prefect.variables import Variable

    spec = resolve_vertex_spec(spec, flow="park_model")
    report = Report("park_model", f"{spec.name} on Vertex AI", spec.slack_channel)
    key = artifact_key("park", spec.name)
    try:
        with model_lock(spec, purpose="park"):
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
    except Exception as exc:
        report.fail(exc)
        raise
    finally:
        report.markdown_artifact(key)
