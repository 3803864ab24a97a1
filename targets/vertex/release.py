"""release and rollback: blue-green by traffic split on one endpoint (new model at 0 %, one split
update to 100 %, analysis, the old split back on any failure); rollback releases the kept Model."""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger

from manifests import vertex as vx
from manifests.errors import PreflightError
from manifests.spec import DeploymentSpec
from targets.vertex.analysis import analysis, smoke
from targets.vertex.serving import (
    _deploy_new,
    _model_revision,
    _where,
    ensure_model,
    find_endpoint,
    hub_check,
    quota_check,
    resolve_vertex_spec,
    serving,
    verb_run,
)
from tasks import vertex as tv
from tasks.report import Report
from tasks.settings import get_settings


def release(spec: DeploymentSpec | str | dict[str, Any], *, revision: str | None = None, dry_run: bool = False,
            ) -> dict[str, Any]:
    """Blue-green by traffic split on one endpoint; the old split comes back by itself on any failure."""
    log = get_run_logger()
    new_dm: dict[str, Any] | None = None
    ep: dict[str, Any] | None = None
    old_split: dict[str, int] = {}
    switched = False

    def undo(exc: Exception, report: Report) -> None:  # a failure: undone as far as the release got (lock released)
        if ep is not None and new_dm is not None:
            log.warning(_roll_back(ep["name"], old_split=old_split, new_id=new_dm["id"], switched=switched))

    with verb_run(spec, flow="release_model", before_fail=undo) as (spec, report, key):
        project, region = _where(spec)
        with report.step("Hugging Face preflight of the new revision") as step:
            token, model = hub_check(spec, revision)
            report.secrets.append(token.get_secret_value())
            step.detail = f"{revision or spec.model.revision} → {model.sha[:12]}"
        ep = find_endpoint(spec)
        if ep is None or not serving(ep):
            raise PreflightError(f"nothing serves {spec.name} on Vertex AI in {region}",
                                 "run deploy_model (or wake_model) with this spec first")
        old_split = {k: int(v) for k, v in (ep.get("trafficSplit") or {}).items()}
        models = tv.list_models(project=project, region=region, filter=vx.label_filter(vx.endpoint_labels(spec)))
        old = serving(ep)
        if all(_model_revision(d["model"], models) == vx.label_value(model.sha) for d in old):
            report.succeed(f"already serving {model.sha[:12]}: nothing to release")
            return {"released": False, "revision": model.sha, "endpoint": ep["name"], "traffic_split": old_split}
        with report.step("Vertex AI GPU quota for the new model beside the old") as step:
            step.detail = quota_check(spec, adding=vx.gpus_per_deployment(spec))
        if dry_run:
            report.succeed(f"dry run: would deploy {model.sha[:12]} at 0 % and move the split to it")
            return {"dry_run": True, "revision": model.sha, "traffic_split": old_split}
        with report.step("Upload the new model") as step:
            model_name = ensure_model(spec, revision=model.sha, token=token)
            step.detail = model_name.rsplit("/", 1)[-1]
        with report.step("Deploy the new model at 0 %") as step:
            new_dm = _deploy_new(spec, ep, model=model_name, revision=model.sha, split=vx.zero_split(old_split),
                                 params=model.params)
            step.detail = f"deployed model {new_dm['id']} ready (Vertex health checks passed), no traffic"
        with report.step("Move all traffic to the new model (one traffic-split update)") as step:
            tv.set_traffic_split(endpoint=ep["name"], traffic_split=vx.promote_split(new_dm["id"]))
            switched = True
            step.detail = f"{old_split} → {vx.promote_split(new_dm['id'])}"
        with report.step("Post-promotion analysis: smoke prompts, error rate, latency") as step:
            rows = smoke(spec, ep["name"], want_id=new_dm["id"])
            result = analysis(spec, ep["name"], want_id=new_dm["id"])
            step.detail = f"{result['errors']}/{result['requests']} failed, p95 {result['p95_latency_s']} s"
        report.table_artifact(f"{key}-smoke", rows, "Smoke prompts on the new model")
        delay = spec.release.scale_down_delay.total_seconds() * get_settings().time_scale
        with report.step("Undeploy the old model after the scale-down delay") as step:
            time.sleep(delay)
            for d in old:
                tv.undeploy_model(endpoint=ep["name"], deployed_model_id=d["id"])
            step.detail = f"{len(old)} undeployed after {delay:.1f} s"
        previous = _model_revision(old[0]["model"], models)
        if previous:  # the old Model is kept: rollback_model releases it again
            tv.set_endpoint_labels(endpoint=ep["name"], labels={**(ep.get("labels") or {}),
                                                                vx.PREVIOUS_LABEL: previous})
        report.succeed(f"{spec.model.id}@{model.sha[:12]} serves 100 % of {ep['name']}")
        return {"released": True, "revision": model.sha, "endpoint": ep["name"], "deployed_model_id": new_dm["id"],
                "traffic_split": vx.promote_split(new_dm["id"]), "analysis": result}


def rollback(spec: DeploymentSpec | str | dict[str, Any]) -> dict[str, Any]:
    """Back to the revision the last release replaced: a release of it (its Model was kept)."""
    spec = resolve_vertex_spec(spec, flow="rollback_model")
    ep = find_endpoint(spec)
    previous = ((ep or {}).get("labels") or {}).get(vx.PREVIOUS_LABEL)
    if not previous:
        raise PreflightError(f"no release of {spec.name} on Vertex AI to roll back",
                             "release_model records the replaced revision on the endpoint; run a release first")
    return release(spec, revision=previous)


def _roll_back(endpoint: str, *, old_split: dict[str, int], new_id: str, switched: bool) -> str:
    """The old split back in one update (only if it moved), then the new model undeployed (nothing billed)."""
    if switched:
        tv.set_traffic_split(endpoint=endpoint, traffic_split=old_split)
    tv.undeploy_model(endpoint=endpoint, deployed_model_id=new_id)
    return f"rolled back: traffic split {old_split} restored, deployed model {new_id} undeployed"
