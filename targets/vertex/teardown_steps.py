"""teardown: undeploy, delete the endpoint and the spec's models, forget the park record; verify."""

from __future__ import annotations

from typing import Any

from manifests import vertex as vx
from manifests.errors import FleetError
from manifests.spec import DeploymentSpec
from targets.vertex.serving import _where, verb_run
from tasks import vertex as tv


def teardown(spec: DeploymentSpec | str | dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
    """Undeploy, delete the endpoint and every model of the spec, forget the park record; verify."""
    from prefect.variables import Variable

    with verb_run(spec, flow="teardown", lock=not dry_run) as (spec, report, _):
        project, region = _where(spec)
        labels = vx.endpoint_labels(spec)
        if dry_run:
            found = tv.list_endpoints(project=project, region=region, filter=vx.label_filter(labels)) + \
                tv.list_models(project=project, region=region, filter=vx.label_filter(labels))
            report.succeed(f"dry run: would delete {len(found)} resource(s)")
            return {"dry_run": True, "would_delete": [r["name"] for r in found]}
        with report.step("Undeploy and delete the endpoint") as step:
            eps = tv.list_endpoints(project=project, region=region, filter=vx.label_filter(labels))
            for ep in eps:
                for d in ep.get("deployedModels") or []:
                    tv.undeploy_model(endpoint=ep["name"], deployed_model_id=d["id"])
                tv.delete_endpoint(name=ep["name"])
            step.detail = f"{len(eps)} endpoint(s)"
        with report.step("Delete the models") as step:
            models = tv.list_models(project=project, region=region, filter=vx.label_filter(labels))
            for m in models:
                tv.delete_model(name=m["name"])
            step.detail = f"{len(models)} model(s)"
        Variable.unset(vx.park_variable(spec))
        with report.step("Verify nothing is left") as step:
            left = tv.list_endpoints(project=project, region=region, filter=vx.label_filter(labels)) + \
                tv.list_models(project=project, region=region, filter=vx.label_filter(labels))
            if left:
                raise FleetError(f"still there: {', '.join(r['name'] for r in left)}",
                                 "rerun teardown; delete them in the console if it persists")
            step.detail = "no endpoint, no model"
        report.succeed(f"nothing of {spec.name} is left on Vertex AI in {region}")
        return {"deleted_endpoints": [e["name"] for e in eps], "deleted_models": [m["name"] for m in models]}
