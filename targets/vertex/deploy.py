"""deploy: Hub preflight, GPU quota, upload the model, get or create the endpoint, deploy at 100 %, wait
until it answers, smoke prompts; a rerun reuses what exists."""

from __future__ import annotations

from typing import Any

from manifests import vertex as vx
from manifests.errors import PreflightError
from manifests.spec import DeploymentSpec
from targets.vertex.analysis import smoke
from targets.vertex.serving import (
    _deploy_new,
    _model_revision,
    _timeout_s,
    _where,
    ensure_endpoint,
    ensure_model,
    find_endpoint,
    hub_check,
    quota_check,
    serving,
    verb_run,
)
from tasks import vertex as tv


def deploy(spec: DeploymentSpec | str | dict[str, Any], *, revision: str | None = None,
           dry_run: bool = False) -> dict[str, Any]:
    with verb_run(spec, flow="deploy_model", subject="{name} ({model}) on Vertex AI {region}",
                  revision=revision) as (spec, report, key):
        project, region = _where(spec)
        with report.step("Hugging Face preflight: token, revision, gated access, GPU fit") as step:
            token, model = hub_check(spec)
            report.secrets.append(token.get_secret_value())
            step.detail = f"{spec.model.revision} → {model.sha[:12]}"
        ep = find_endpoint(spec)
        current = serving(ep) if ep else []
        models = tv.list_models(project=project, region=region,
                                filter=vx.label_filter(vx.endpoint_labels(spec))) if current else []
        same = [d for d in current if _model_revision(d["model"], models) == vx.label_value(model.sha)]
        if current and not same:
            raise PreflightError(f"endpoint {spec.vertex.endpoint_display_name} already serves another revision",
                                 "use release_model to move it to this revision")
        with report.step("Vertex AI GPU quota") as step:
            step.detail = quota_check(spec, adding=0 if same else vx.gpus_per_deployment(spec))
        if dry_run:
            plan = ["reuse" if same else "upload model", "reuse endpoint" if ep else "create endpoint",
                    "keep deployed model" if same else "deploy model (100 %)"]
            report.succeed("dry run: " + ", ".join(plan))
            return {"dry_run": True, "plan": plan, "revision": model.sha}
        with report.step("Upload the model (serving container)") as step:
            model_name = ensure_model(spec, revision=model.sha, token=token)
            step.detail = model_name.rsplit("/", 1)[-1]
        with report.step("Get or create the endpoint") as step:
            ep = ensure_endpoint(spec)
            step.detail = ep["name"].rsplit("/", 1)[-1]
        with report.step(f"Deploy on {spec.vertex.machine_type} + {spec.vertex.accelerator_count} × "
                         f"{spec.vertex.accelerator_type}") as step:
            if same:
                dm = same[0]
                step.detail = f"deployed model {dm['id']} already serving"
            else:
                dm = _deploy_new(spec, ep, model=model_name, revision=model.sha, split={"0": 100},
                                 params=model.params)
                step.detail = f"deployed model {dm['id']}"
        with report.step("Wait until the model answers") as step:
            tv.wait_answering(endpoint=ep["name"], instance=vx.smoke_instance("Hello", 4),
                              timeout_s=_timeout_s(spec, model.params), want_id=dm["id"])
        with report.step("Smoke prompts through predict and rawPredict") as step:
            rows = smoke(spec, ep["name"], want_id=dm["id"])
            step.detail = ", ".join(f"{r['via']} {r['latency_s'] * 1000:.0f} ms" for r in rows)
        report.table_artifact(f"{key}-smoke", rows, "Smoke prompts (Vertex AI)")
        report.succeed(f"{spec.model.id}@{model.sha[:12]} serving on {ep['name']} (deployed model {dm['id']})")
        return {"name": spec.name, "target": "vertex", "endpoint": ep["name"], "model": model_name,
                "deployed_model_id": dm["id"], "revision": model.sha, "smoke": rows}
