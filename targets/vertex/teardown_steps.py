"""teardown: undeploy, delete the endpoint and the spec's models, forget the park record; verify."""

from __future__ import annotations

from typing import Any

from manifests import vertex as vx
from manifests.errors import FleetError
from manifests.spec import DeploymentSpec
from targets.vertex.serving import _where, resolve_vertex_spec
from tasks import vertex as tv
from tasks.locks import model_lock
from tasks.report import Report, artifact_key


def teardown(spec: DeploymentSpec | str | dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
    """Undeploy, delete the endpoint and every model of the spec, forget the park record; verify."""
    from prefect.variables import Variable

    spec = resolve_vertex_spec(spec, flow="teardown")
    project, region = _where(spec)
    report = Report("teardown", f"{spec.name} on Vertex AI {region}", spec.slack_channel)
    key = artifact_key("teardown", spec.name)
    labels = vx.endpoint_labels(spec)
    try:
        if dry_run:
            found = tv.list_endpoints(project=project, region=region, filter=vx.label_filter(labels)) + \
                tv.list_models(project=project, region=region, filter=vx.label_filter(labels))
            report.succeed(f"dry run: would delete {len(found)} resource(s)")
            return {"dry_run": True, "would_delete": [r["name"] for r in found]}
        with model_lock(spec, purpose="teardown"):
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
    except Exception as exc:
        report.fail(exc)
        raise
    finally:
        report.markdown_artifact(key)
