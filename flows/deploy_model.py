"""deploy_model: from `kubectl create secret` to `curl /generate`, as one flow.

1. Hugging Face preflight: token, revision, gated access, fits the GPU — before touching the cluster
2. Get cluster credentials
3. Create the namespace and the Hugging Face token Secret
4. Apply the cache, Deployment, Services, Ingress, autoscaler and monitoring
5. Wait until the model answers (not until a pod is Running)
6. Smoke test through the Service
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from pydantic import SecretStr

from flows.provision_cluster import find_cluster
from flows.report import Report, artifact_key
from manifests import names
from manifests.errors import DeployError, PreflightError
from manifests.names import Color
from manifests.render import model_deployment, object_key, render
from manifests.spec import DeploymentSpec, check_fit, fit_fix, resolve_gke_spec
from tasks import gke, health, hf, k8s
from tasks.settings import get_settings


def hub_preflight(spec: DeploymentSpec, token: SecretStr) -> hf.HubModel:
    hf.check_hf_token(token=token)
    model = hf.get_model(model_id=spec.model.id, revision=spec.model.revision, token=token)
    if model.gated:
        hf.check_gated_access(model_id=spec.model.id, token=token)
    if model.params:
        fit = check_fit(spec, model.params)
        if not fit.fits:
            raise PreflightError(fit.message(spec), fit_fix(spec, fit))
    return model


def live_color(spec: DeploymentSpec, kubeconfig: str) -> Color | None:
    """Which color the live Service routes to now (None before the first deploy)."""
    svc = k8s.get_object(kubeconfig=kubeconfig, api_version="v1", kind="Service", name=names.service(spec),
                         namespace=spec.namespace)
    color = ((svc or {}).get("spec", {}).get("selector") or {}).get(names.COLOR_LABEL)
    return color if color in names.COLORS else None


def load_timeout_s(spec: DeploymentSpec, params: int | None) -> float:
    s = get_settings()
    return max(spec.default_load_timeout(params).total_seconds() * s.time_scale, s.min_load_timeout_s)


def wait_until_answering(spec: DeploymentSpec, *, kubeconfig: str, color: Color, replicas: int,
                         timeout_s: float, service: str) -> dict[str, Any]:
    """Pods Ready (watched), then the engine itself says the model is loaded, through ``service``."""
    progress = k8s.wait_pods_ready(kubeconfig=kubeconfig, namespace=spec.namespace,
                                   selector=names.selector(spec, color), desired=replicas, timeout_s=timeout_s)
    engine = health.check_engine_ready(kubeconfig=kubeconfig, namespace=spec.namespace, service=service,
                                       engine=spec.engine.kind, model_id=spec.model.id)
    return {"ready_pods": progress.ready, **engine}


def park_failed_color(spec: DeploymentSpec, *, kubeconfig: str, color: Color) -> str:
    """After a failed rollout, stop paying for GPUs: scale the color to 0 (unless keep_for_debug)."""
    if spec.keep_for_debug:
        return "kept running for debugging (keep_for_debug: true) — it costs GPU time until removed"
    k8s.scale_deployment(kubeconfig=kubeconfig, namespace=spec.namespace, name=names.deployment(spec, color),
                         replicas=0)
    return f"{names.deployment(spec, color)} scaled to 0 so no GPU stays paid for"


def smoke_rows(results: list[health.SmokeResult]) -> list[dict[str, Any]]:
    return [{"prompt": r.prompt, "answer": r.answer[:80], "latency_s": r.latency_s, "tokens": r.tokens,
             "tokens_per_s": r.tokens_per_s, "streamed": r.streamed} for r in results]


@flow(name="deploy_model", log_prints=True)
def deploy_model(spec: str | dict[str, Any] = "deployments/gemma2-2b-it-vllm-l4.yaml",
                 dry_run: bool = False) -> dict[str, Any]:
    """HF preflight → Secret → cache, Deployment, Service, Ingress, HPA, monitoring → model answers → smoke test."""
    log = get_run_logger()
    spec = resolve_gke_spec(spec, flow="deploy_model")
    c = spec.cluster
    report = Report("deploy_model", f"{spec.name} ({spec.model.id})", spec.slack_channel)
    key = artifact_key("deploy", spec.name)
    kubeconfig: str | None = None
    color: Color = "blue"
    applied_deployment = False
    try:
        token = hf.read_hf_token(block=spec.secret.prefect_block)
        report.secrets.append(token.get_secret_value())
        with report.step("Hugging Face preflight: token, revision, gated access, GPU fit") as step:
            model = hub_preflight(spec, token)
            size = f"{model.params / 1e9:.2f}B params" if model.params else "size unknown"
            step.detail = f"{spec.model.revision} → {model.sha[:12]}, {size}"

        with report.step("Get cluster credentials") as step:
            kubeconfig = gke.get_credentials(project=c.project, location=_cluster_location(spec), name=c.name)
            color = live_color(spec, kubeconfig) or "blue"
            step.detail = f"live color {color}"

        objs = render(spec, color=color, revision=model.sha)
        if dry_run:
            rows = []
            for obj in objs:
                api_version, kind, ns, name = object_key(obj)
                live = k8s.get_object(kubeconfig=kubeconfig, api_version=api_version, kind=kind, name=name,
                                      namespace=ns or None)
                rows.append({"kind": kind, "name": name, "namespace": ns, "action": "apply" if live else "create"})
                log.info("plan: %s %s/%s", rows[-1]["action"], kind, name)
            report.table_artifact(f"{key}-plan", rows, "What deploy_model would apply")
            report.succeed("dry run: nothing was changed")
            return {"dry_run": True, "plan": rows, "revision": model.sha}

        with report.step("Create the namespace and the Hugging Face token Secret") as step:
            k8s.apply_object(kubeconfig=kubeconfig, obj=objs[0])
            step.detail = k8s.ensure_secret(kubeconfig=kubeconfig, namespace=spec.namespace, name=spec.secret.name,
                                            key=spec.secret.key, value=token, labels=names.instance_labels(spec))

        with report.step("Apply cache, Deployment, Services, Ingress, autoscaler, monitoring") as step:
            applied = [k8s.apply_object(kubeconfig=kubeconfig, obj=o) for o in objs[1:]]
            applied_deployment = True
            counts = {a: sum(x.action == a for x in applied) for a in ("created", "configured", "unchanged")}
            step.detail = ", ".join(f"{n} {a}" for a, n in counts.items() if n)

        replicas = model_deployment(spec, color)["spec"]["replicas"]
        with report.step("Wait until the model answers") as step:
            ready = wait_until_answering(spec, kubeconfig=kubeconfig, color=color, replicas=replicas,
                                         timeout_s=load_timeout_s(spec, model.params), service=names.service(spec))
            step.detail = f"{ready['ready_pods']} pod(s) Ready, serving {ready['model']}"

        with report.step("Smoke test through the Service") as step:
            results = health.smoke_test(kubeconfig=kubeconfig, namespace=spec.namespace, service=names.service(spec),
                                        engine=spec.engine.kind, model_id=spec.model.id,
                                        prompts=spec.release.smoke_prompts, max_tokens=spec.release.smoke_max_tokens,
                                        expect=spec.release.expect)
            step.detail = f"{len(results)} prompt(s) answered, " + ", ".join(
                f"{r.latency_s * 1000:.0f} ms" for r in results)
        report.table_artifact(f"{key}-smoke", smoke_rows(results), "Smoke prompts")
        endpoint = f"http://{names.service(spec)}.{spec.namespace}.svc.cluster.local:{spec.expose.port}"
        report.succeed(f"{spec.model.id}@{model.sha[:12]} serving at {endpoint} ({replicas} replica(s), {color})")
        return {"name": spec.name, "namespace": spec.namespace, "color": color, "revision": model.sha,
                "endpoint": endpoint, "replicas": replicas, "objects": [a.__dict__ for a in applied],
                "smoke": smoke_rows(results), "kubeconfig": kubeconfig}
    except Exception as exc:
        if isinstance(exc, DeployError) and exc.logs:
            log.error("last log lines of the failing pod:\n%s", report.scrub("\n".join(exc.logs)))
            exc.fix = (exc.fix + "\nLast log lines:\n" + "\n".join(exc.logs[-5:])) if exc.fix else exc.fix
        if applied_deployment and kubeconfig and isinstance(exc, DeployError):
            log.warning(park_failed_color(spec, kubeconfig=kubeconfig, color=color))
        report.fail(exc)
        raise
    finally:
        report.markdown_artifact(key)


def _cluster_location(spec: DeploymentSpec) -> str:
    """Where provision_cluster put the cluster: the spec's location or a failover region."""
    location, cluster = find_cluster(spec)
    if cluster is None:
        raise PreflightError(f"cluster {spec.cluster.name} does not exist in {spec.cluster.project}/"
                             f"{spec.cluster.location}", "run provision_cluster with this spec first")
    return location
