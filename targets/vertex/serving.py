"""What every Vertex AI verb shares: how its run opens (the spec check, the Slack thread, the model's lock:
``verb_run``), observing the endpoint, the preflights, and the building blocks that get or create the model
and the endpoint and deploy a model on it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

from manifests import vertex as vx
from manifests.spec import DeploymentSpec, SpecError, resolve_spec, with_revision
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


class Opened(NamedTuple):
    spec: DeploymentSpec
    report: Report
    key: str  # the run's artifact key: its tables are keyed from it


@contextmanager
def verb_run(spec: DeploymentSpec | str | dict[str, Any], *, flow: str, subject: str = "{name} on Vertex AI {region}",
             revision: str | None = None, lock: bool = True,
             before_fail: Callable[[Exception, Report], None] | None = None) -> Iterator[Opened]:
    """How every verb opens: the spec checked for Vertex AI (``revision`` served instead of its own), the
    run's Slack thread (``subject`` with the spec's name, model id and region), and the model's lock for the
    block (``lock=False``: a dry run, which changes nothing). A failure is told and raised again, after
    ``before_fail(exc, report)``; the run's artifact is written either way (``Report.run``)."""
    spec = with_revision(resolve_vertex_spec(spec, flow=flow), revision)
    verb = flow.removesuffix("_model")
    _, region = _where(spec)
    report = Report(flow, subject.format(name=spec.name, model=spec.model.id, region=region), spec.slack_channel)
    key = artifact_key(verb, spec.name)
    with report.run(key, before_fail=before_fail), model_lock(spec, purpose=verb) if lock else nullcontext():
        yield Opened(spec, report, key)


def _where(spec: DeploymentSpec) -> tuple[str, str]:
    return spec.cluster.project, spec.cluster.region


def _timeout_s(spec: DeploymentSpec, params: int | None) -> float:
    return get_settings().load_timeout_s(spec.default_load_timeout(params))


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



def _deploy_new(spec: DeploymentSpec, ep: dict[str, Any], *, model: str, revision: str, split: dict[str, int],
                params: int | None) -> dict[str, Any]:
    return tv.deploy_model(endpoint=ep["name"], deployed_model=vx.deployed_model_body(spec, model=model,
                                                                                        revision=revision),
                           traffic_split=split, timeout_s=_timeout_s(spec, params) + get_settings().operation_timeout_s)
