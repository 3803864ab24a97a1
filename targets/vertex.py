"""The Vertex AI target (seed 002): deploy, release, park/wake and teardown of one spec on one endpoint.

The main flows (deploy_model, release_model, rollback_model, park_model/wake_model, teardown) reach these
through ``VertexAI`` (``targets.target_for`` picks it for ``target: vertex``); they run inside the
caller's flow run. There is no cluster to provision, and no health probe or idle policy yet. Steps, as the seed does them by hand:

deploy   1. Hugging Face preflight (token, revision, gated access, fits the Vertex machine's GPUs)
         2. Vertex GPU quota in the region — nothing is created before these pass
         3. Upload the model (serving container image, args, env)
         4. Get or create the endpoint by display name + labels
         5. Deploy on the machine type / accelerator / replicas, wait for the operation
         6. Wait until it answers, smoke prompts through predict and rawPredict
release  new model at 0 % → one traffic-split update to 100 % → analysis (smoke, error rate, latency)
         → the old split back on any failure; the old model undeployed after release.scale_down_delay
park     undeploy everything (nothing billed; endpoint and model kept), settings in a Prefect Variable
wake     redeploy from that record, wait until it answers
teardown undeploy, delete the endpoint and the spec's models, verify nothing is left
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from prefect import get_run_logger

from manifests import vertex as vx
from manifests.errors import DeployError, FleetError, PreflightError, SmokeTestError
from manifests.spec import DeploymentSpec, SpecError, resolve_spec, with_revision
from targets.base import ServingTarget, SpecRef
from targets.hub import hub_preflight
from tasks import hf
from tasks import vertex as tv
from tasks.locks import model_lock
from tasks.report import Report, artifact_key
from tasks.settings import get_settings


def resolve_vertex_spec(spec: DeploymentSpec | str | dict[str, Any], *, flow: str) -> DeploymentSpec:
    spec = resolve_spec(spec)
    if spec.target != "vertex" or spec.vertex is None:
        raise SpecError("target", f"{flow} on Vertex AI needs target: vertex", "set target: vertex and a vertex section")
    if spec.engine.kind != "vllm":
        raise SpecError("engine.kind", f"target vertex serves vLLM's container, not {spec.engine.kind}",
                        "set engine: vllm (or target: gke for TGI/SGLang)")
    return spec


def _where(spec: DeploymentSpec) -> tuple[str, str]:
    return spec.cluster.project, spec.cluster.region


def _timeout_s(spec: DeploymentSpec, params: int | None) -> float:
    s = get_settings()
    return max(spec.default_load_timeout(params).total_seconds() * s.time_scale, s.min_load_timeout_s)


# ---- observe -------------------------------------------------------------------------------------------

def find_endpoint(spec: DeploymentSpec) -> dict[str, Any] | None:
    project, region = _where(spec)
    found = tv.list_endpoints(project=project, region=region,
                              filter=vx.label_filter(vx.endpoint_labels(spec), spec.vertex.endpoint_display_name))
    return found[0] if found else None


def serving(ep: dict[str, Any]) -> list[dict[str, Any]]:
    """Deployed models with traffic, most traffic first."""
    split = ep.get("trafficSplit") or {}
    live = [d for d in ep.get("deployedModels") or [] if split.get(d["id"], 0) > 0]
    return sorted(live, key=lambda d: -split.get(d["id"], 0))


def _model_revision(model: str, models: list[dict[str, Any]]) -> str | None:
    return next(((m.get("labels") or {}).get(vx.REVISION_LABEL) for m in models if m["name"] == model), None)


# ---- preflights ------------------------------------------------------------------------------------------

def hub_check(spec: DeploymentSpec, revision: str | None = None) -> tuple[Any, Any]:
    """Token, revision, gated access and fit on the Vertex machine's GPUs (the GKE preflight, reused)."""
    token = hf.read_hf_token(block=spec.secret.prefect_block)
    target = spec if revision is None else spec.model_copy(
        update={"model": spec.model.model_copy(update={"revision": revision})})
    return token, hub_preflight(vx.fit_spec(target), token)


def quota_check(spec: DeploymentSpec, *, adding: int) -> str:
    project, region = _where(spec)
    limit = tv.get_gpu_quota_limit(project=project, region=region, quota_id=vx.quota_id(spec))
    used = vx.deployed_gpus(tv.list_endpoints(project=project, region=region), spec.vertex.accelerator_type)
    vx.check_quota(spec, limit=limit, used=used, adding=adding)
    return f"{vx.quota_metric(spec)} in {region}: {used} used + {adding} needed of {limit}"


# ---- building blocks ----------------------------------------------------------------------------------------

def ensure_model(spec: DeploymentSpec, *, revision: str, token: Any) -> str:
    """The spec's Model for this revision: reused when one exists (reruns), uploaded otherwise."""
    project, region = _where(spec)
    labels = vx.model_labels(spec, revision)
    found = tv.list_models(project=project, region=region, filter=vx.label_filter(labels))
    if found:
        return found[0]["name"]
    # The API has no secret reference for serving containers (EnvVar is name + value): see docs/vertex.md.
    secret = None if spec.vertex.artifact_uri else token.get_secret_value()
    return tv.upload_model(project=project, region=region, model=vx.model_body(spec, revision=revision,
                                                                                 hf_token=secret))


def ensure_endpoint(spec: DeploymentSpec) -> dict[str, Any]:
    ep = find_endpoint(spec)
    if ep is not None:
        return ep
    project, region = _where(spec)
    return tv.create_endpoint(project=project, region=region, display_name=spec.vertex.endpoint_display_name,
                              labels=vx.endpoint_labels(spec))


def smoke(spec: DeploymentSpec, endpoint: str, *, want_id: str | None = None) -> list[dict[str, Any]]:
    """Every smoke prompt through predict, the last one again as an OpenAI chat body through rawPredict."""
    from google.api_core import exceptions as gexc

    rel = spec.release
    rows = []
    try:
        for prompt in rel.smoke_prompts:
            got = tv.predict_once(endpoint=endpoint, instances=[vx.smoke_instance(prompt, rel.smoke_max_tokens)])
            answer = str(got["predictions"][0]) if got["predictions"] else ""
            rows.append({"via": "predict", "prompt": prompt, "answer": answer,
                         "latency_s": round(got["latency_s"], 3), "deployed_model_id": got["deployed_model_id"]})
        raw = tv.raw_predict_once(endpoint=endpoint, body=vx.chat_body(rel.smoke_prompts[-1], rel.smoke_max_tokens))
    except gexc.GoogleAPICallError as exc:
        raise SmokeTestError(f"smoke prompt failed: {exc.code} {exc.message[:200]}",
                             "read the deployed model's logs; the engine failed the request") from None
    choices = (raw["json"] or {}).get("choices") or [{}]
    rows.append({"via": "rawPredict", "prompt": rel.smoke_prompts[-1],
                 "answer": str((choices[0].get("message") or {}).get("content") or ""),
                 "latency_s": round(raw["latency_s"], 3), "deployed_model_id": raw["deployed_model_id"]})
    for r in rows:
        if not r["answer"].strip() or (rel.expect and not re.search(rel.expect, r["answer"])):
            raise SmokeTestError(f"smoke prompt {r['prompt']!r} via {r['via']} got {r['answer'][:80]!r}",
                                 "check the model's dtype/quantization and release.expect")
        if want_id and r["deployed_model_id"] != want_id:
            raise SmokeTestError(f"{r['via']} was answered by deployed model {r['deployed_model_id']}, "
                                 f"not {want_id}", "check the endpoint's traffic split")
    return rows


def analysis(spec: DeploymentSpec, endpoint: str, *, want_id: str) -> dict[str, Any]:
    """post-promotion analysis: N requests through predict; error rate and p95 latency vs the thresholds."""
    a = spec.release.post_promotion
    prompt = spec.release.smoke_prompts[0]
    errors, lat, others = 0, [], 0
    for _ in range(a.requests):
        try:
            got = tv.predict_once(endpoint=endpoint, instances=[vx.smoke_instance(prompt, spec.release.smoke_max_tokens)])
            if not got["predictions"] or not str(got["predictions"][0]).strip():
                errors += 1
            others += got["deployed_model_id"] != want_id
            lat.append(got["latency_s"])
        except Exception:  # noqa: BLE001 - every failed request counts, whatever its kind
            errors += 1
    lat.sort()
    p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else float("inf")
    rate = errors / a.requests
    out = {"requests": a.requests, "errors": errors, "error_rate": rate, "p95_latency_s": round(p95, 3),
           "answered_by_other": others}
    if rate > a.max_error_rate or p95 > a.max_p95_latency_s or others:
        raise SmokeTestError(f"post-promotion analysis failed: {errors}/{a.requests} failed, p95 {p95:.2f} s, "
                             f"{others} answered by another model",
                             f"thresholds: release.post_promotion.max_error_rate {a.max_error_rate}, "
                             f"max_p95_latency_s {a.max_p95_latency_s}")
    return out


def _deploy_new(spec: DeploymentSpec, ep: dict[str, Any], *, model: str, revision: str, split: dict[str, int],
                params: int | None) -> dict[str, Any]:
    return tv.deploy_model(endpoint=ep["name"], deployed_model=vx.deployed_model_body(spec, model=model,
                                                                                        revision=revision),
                           traffic_split=split, timeout_s=_timeout_s(spec, params) + get_settings().operation_timeout_s)


# ---- deploy ------------------------------------------------------------------------------------------------

def deploy(spec: DeploymentSpec | str | dict[str, Any], *, revision: str | None = None,
           dry_run: bool = False) -> dict[str, Any]:
    spec = with_revision(resolve_vertex_spec(spec, flow="deploy_model"), revision)
    project, region = _where(spec)
    report = Report("deploy_model", f"{spec.name} ({spec.model.id}) on Vertex AI {region}", spec.slack_channel)
    key = artifact_key("deploy", spec.name)
    try:
        with model_lock(spec, purpose="deploy"):
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
    except Exception as exc:
        report.fail(exc)
        raise
    finally:
        report.markdown_artifact(key)


# ---- release -----------------------------------------------------------------------------------------------

def release(spec: DeploymentSpec | str | dict[str, Any], *, revision: str | None = None, dry_run: bool = False,
            ) -> dict[str, Any]:
    """Blue-green by traffic split on one endpoint; the old split comes back by itself on any failure."""
    spec = resolve_vertex_spec(spec, flow="release_model")
    log = get_run_logger()
    project, region = _where(spec)
    report = Report("release_model", f"{spec.name} on Vertex AI {region}", spec.slack_channel)
    key = artifact_key("release", spec.name)
    new_dm: dict[str, Any] | None = None
    ep: dict[str, Any] | None = None
    old_split: dict[str, int] = {}
    switched = False
    try:
        with model_lock(spec, purpose="release"):
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
    except Exception as exc:
        if ep is not None and new_dm is not None:
            log.warning(_roll_back(ep["name"], old_split=old_split, new_id=new_dm["id"], switched=switched))
        report.fail(exc)
        raise
    finally:
        report.markdown_artifact(key)


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


# ---- park / wake ---------------------------------------------------------------------------------------------

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


def wake(spec: DeploymentSpec | str | dict[str, Any]) -> dict[str, Any]:
    """Redeploy from the park record, wait until it answers."""
    from prefect.variables import Variable

    spec = resolve_vertex_spec(spec, flow="wake_model")
    report = Report("wake_model", f"{spec.name} on Vertex AI", spec.slack_channel)
    key = artifact_key("wake", spec.name)
    try:
        with model_lock(spec, purpose="wake"):
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
    except Exception as exc:
        report.fail(exc)
        raise
    finally:
        report.markdown_artifact(key)


def _snake(d: Any) -> Any:
    """REST JSON (camelCase) back into the snake_case mapping the proto-plus types take."""
    if isinstance(d, dict):
        return {re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), k): _snake(v) for k, v in d.items()}
    return [_snake(v) for v in d] if isinstance(d, list) else d


# ---- teardown ------------------------------------------------------------------------------------------------

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


class VertexAI(ServingTarget):
    name = "vertex"

    def provision(self, *, spec: SpecRef, dry_run: bool = False) -> dict[str, Any]:
        raise self._unsupported("provision_cluster", "Vertex AI provisions the machines itself",
                                "run deploy_model with this spec: it creates the endpoint and deploys")

    def deploy(self, *, spec: SpecRef, revision: str | None = None, dry_run: bool = False) -> dict[str, Any]:
        return deploy(spec, revision=revision, dry_run=dry_run)

    def release(self, *, spec: SpecRef, revision: str | None = None, dry_run: bool = False) -> dict[str, Any]:
        return release(spec, revision=revision, dry_run=dry_run)

    def rollback(self, *, spec: SpecRef, release_again: Callable[..., dict[str, Any]]) -> dict[str, Any]:
        return rollback(spec)  # a release of the kept Model, inside this flow run

    def park(self, *, spec: SpecRef, reason: str = "manual") -> dict[str, Any]:
        return park(spec)

    def wake(self, *, spec: SpecRef, reason: str = "manual", requested_at: datetime | None = None) -> dict[str, Any]:
        return wake(spec)  # no hold proxy on Vertex AI: no held request's wait to count

    def teardown(self, *, spec: SpecRef, cluster: bool = False, dry_run: bool = False) -> dict[str, Any]:
        return teardown(spec, dry_run=dry_run)  # no cluster: the endpoint and the models are everything


__all__ = ["VertexAI", "deploy", "release", "rollback", "park", "wake", "teardown", "DeployError"]
