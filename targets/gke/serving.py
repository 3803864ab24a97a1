"""What GKE deploy, release, park and wake share: Hub preflight, observing the colors, bringing one up.

"Ready" here always means the new pods answer: the Deployment's rollout is complete (by its new
ReplicaSet), the Service's endpoints list exactly those pods, and the engine says the model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from manifests import names
from manifests.errors import PreflightError
from manifests.names import Color
from manifests.release import Observed
from manifests.render import model_deployment, render, spec_hash
from manifests.render import namespace as render_namespace
from manifests.spec import DeploymentSpec
from targets.gke.provision import find_cluster
from targets.hub import hub_preflight
from tasks import gke, health, hf, k8s
from tasks.report import Report
from tasks.settings import get_settings

# How long endpoints may lag behind Ready pods before that is a real problem (seconds, real time).
ENDPOINT_LAG_S = 60.0


def cluster_location(spec: DeploymentSpec) -> str:
    """Where provision_cluster put the cluster: the spec's location or a failover region."""
    location, cluster = find_cluster(spec)
    if cluster is None:
        raise PreflightError(f"cluster {spec.cluster.name} does not exist in {spec.cluster.project}/"
                             f"{spec.cluster.location}", "run provision_cluster with this spec first")
    return location


@dataclass
class Prepared:
    """One run's handle on a model: the spec, the resolved Hub revision, the cluster's kubeconfig."""

    spec: DeploymentSpec
    model: hf.HubModel
    token: SecretStr
    kubeconfig: str
    location: str

    @property
    def desired_hash(self) -> str:
        return spec_hash(self.spec, self.model.sha)

    def deployment(self, color: Color, replicas: int | None = None) -> dict[str, Any]:
        return model_deployment(self.spec, color, revision=self.model.sha, replicas=replicas)


def prepare(spec: DeploymentSpec, report: Report) -> Prepared:
    """Token, Hub preflight (before anything is created or paid for), cluster credentials."""
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    token = hf.read_hf_token(block=spec.secret.prefect_block)
    report.secrets.append(token.get_secret_value())
    for warning in spec.warnings:  # valid but risky choices (as `llm-fleet validate` says): once per run
        report.note(f"⚠️ {warning}")
    with ThreadPoolExecutor(max_workers=1) as pool:
        # The cluster lookup runs while the Hub is asked (independent reads, nothing created yet).
        located = pool.submit(contextvars.copy_context().run, _credentials, spec)  # in this flow run's context
        with report.step("Hugging Face preflight: token, revision, gated access, GPU fit") as step:
            model = hub_preflight(spec, token)
            size = f"{model.params / 1e9:.2f}B params" if model.params else "size unknown"
            step.detail = f"{spec.model.revision} → {model.sha[:12]}, {size}"
        with report.step("Get cluster credentials") as step:
            location, kubeconfig = located.result()
            step.detail = f"{spec.cluster.name} in {location}"
    return Prepared(spec, model, token, kubeconfig, location)


def _credentials(spec: DeploymentSpec) -> tuple[str, str]:
    location = cluster_location(spec)
    return location, gke.get_credentials(project=spec.cluster.project, location=location, name=spec.cluster.name)


def observe(spec: DeploymentSpec, kubeconfig: str) -> Observed:
    """The cluster is the source of truth: the live Service's selector and both colors' Deployments."""
    svc = k8s.get_object(kubeconfig=kubeconfig, api_version="v1", kind="Service", name=names.service(spec),
                         namespace=spec.namespace)
    deps = {c: k8s.get_object(kubeconfig=kubeconfig, api_version="apps/v1", kind="Deployment",
                              name=names.deployment(spec, c), namespace=spec.namespace) for c in names.COLORS}
    return Observed.from_objects(svc, deps)


def live_color(spec: DeploymentSpec, kubeconfig: str) -> Color | None:
    """Which color the live Service routes to now (None before the first deploy)."""
    return observe(spec, kubeconfig).live


def served_revision(spec: DeploymentSpec) -> str | None:
    """The commit the live color runs (its Deployment's revision annotation); None when nothing serves."""
    location, cluster = find_cluster(spec)
    if cluster is None:
        return None
    kubeconfig = gke.get_credentials(project=spec.cluster.project, location=location, name=spec.cluster.name)
    color = live_color(spec, kubeconfig)
    if color is None:
        return None
    dep = k8s.get_object(kubeconfig=kubeconfig, api_version="apps/v1", kind="Deployment",
                         name=names.deployment(spec, color), namespace=spec.namespace)
    return ((dep or {}).get("metadata", {}).get("annotations") or {}).get(names.REVISION_ANNOTATION)


def load_timeout_s(spec: DeploymentSpec, params: int | None) -> float:
    return get_settings().load_timeout_s(spec.default_load_timeout(params))


def scaled(seconds: float) -> float:
    """A policy duration on the sandbox's clock (1:1 on GCP)."""
    return seconds * get_settings().time_scale


def wait_until_answering(spec: DeploymentSpec, *, kubeconfig: str, color: Color, replicas: int,
                         timeout_s: float, service: str) -> dict[str, Any]:
    """Rollout complete (new ReplicaSet), ``service``'s endpoints are exactly its pods, engine loaded."""
    if replicas == 0:
        return {"ready_pods": 0, "pods": [], "model": None}
    rollout = k8s.wait_rollout(kubeconfig=kubeconfig, namespace=spec.namespace, name=names.deployment(spec, color),
                               timeout_s=timeout_s)
    k8s.wait_endpoints(kubeconfig=kubeconfig, namespace=spec.namespace, service=service, pods=set(rollout.pods),
                       timeout_s=ENDPOINT_LAG_S)
    engine = health.check_engine_ready(kubeconfig=kubeconfig, namespace=spec.namespace, service=service,
                                       engine=spec.engine.kind, model_id=spec.model.id)
    return {"ready_pods": rollout.ready, "pods": list(rollout.pods), "replicaset": rollout.replicaset, **engine}


def smoke(spec: DeploymentSpec, *, kubeconfig: str, service: str) -> list[health.SmokeResult]:
    return health.smoke_test(kubeconfig=kubeconfig, namespace=spec.namespace, service=service,
                             engine=spec.engine.kind, model_id=spec.model.id, prompts=spec.release.smoke_prompts,
                             max_tokens=spec.release.smoke_max_tokens, expect=spec.release.expect)


def smoke_rows(results: list[health.SmokeResult]) -> list[dict[str, Any]]:
    return [{"prompt": r.prompt, "answer": r.answer[:80], "latency_s": r.latency_s, "tokens": r.tokens,
             "tokens_per_s": r.tokens_per_s, "streamed": r.streamed} for r in results]


def scale_down_color(spec: DeploymentSpec, *, kubeconfig: str, color: Color) -> str:
    """Stop paying for a color's GPUs (unless keep_for_debug)."""
    if spec.keep_for_debug:
        return f"{names.deployment(spec, color)} kept running for debugging (keep_for_debug: true) — it costs GPU time"
    k8s.scale_deployment(kubeconfig=kubeconfig, namespace=spec.namespace, name=names.deployment(spec, color),
                         replicas=0)
    return f"{names.deployment(spec, color)} scaled to 0 so no GPU stays paid for"


def ensure_namespace_and_secret(t: Prepared) -> str:
    k8s.apply_object(kubeconfig=t.kubeconfig, obj=render_namespace(t.spec))
    return k8s.ensure_secret(kubeconfig=t.kubeconfig, namespace=t.spec.namespace, name=t.spec.secret.name,
                             key=t.spec.secret.key, value=t.token, labels=names.instance_labels(t.spec))


def in_place_objects(spec: DeploymentSpec, *, live: Color, revision: str) -> list[dict[str, Any]]:
    """What may change under a serving model: everything but the model Deployments and the preview (the
    playground's Deployment is not a model's: it is updated in place).

    The live Service is rendered with its current color (its selector does not move), the HPA keeps
    targeting the live color; the preview Service belongs to the release.
    """
    models = {names.deployment(spec, "blue"), names.deployment(spec, "green"), names.preview_service(spec)}
    return [o for o in render(spec, color=live, revision=revision)[1:] if o["metadata"]["name"] not in models]
