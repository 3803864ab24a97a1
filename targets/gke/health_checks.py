"""GKE's observe verb (check_fleet): is the deployed model answering, and is it what its spec says?

Through the live Service: engine readiness, one smoke prompt and its latency, the engine's /metrics
(queue, KV-cache use, error counters); the live Deployment against what the spec renders (drift).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from manifests import names, park
from manifests.release import Observed, serving_problems
from manifests.render import model_deployment
from manifests.rollout import diagnose
from manifests.spec import DeploymentSpec
from targets.base import Check
from targets.gke.provision import find_cluster
from tasks import gke, health, k8s
from tasks.clients import kube_client, kube_http
from tasks.log import logger
from tasks.usage import ledger_name, record_usage

COMMIT = re.compile(r"^[0-9a-f]{40}$")


# Engine metrics worth a column: (engine, metric) -> column.
METRICS = {
    "vllm": {"vllm:num_requests_waiting": "queue", "vllm:num_requests_running": "running",
             "vllm:kv_cache_usage_perc": "kv_cache", "vllm:gpu_cache_usage_perc": "kv_cache"},
    "tgi": {"tgi_queue_size": "queue", "tgi_batch_current_size": "running", "tgi_request_failure": "errors"},
    "sglang": {"sglang:num_queue_reqs": "queue", "sglang:num_running_reqs": "running",
               "sglang:token_usage": "kv_cache"},
}


def parse_metrics(text: str, engine: str) -> dict[str, float]:
    """The engine's Prometheus text → {queue, running, kv_cache, errors} (summed over label sets)."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = METRICS.get(engine, {})
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            column = wanted.get(name) or wanted.get(name.removesuffix("_total"))
            if column is None and engine == "vllm" and name.startswith("vllm:request_success") and \
                    sample.labels.get("finished_reason") in ("abort", "error"):
                column = "errors"
            if column:
                out[column] = out.get(column, 0.0) + float(sample.value)
    return out


def drift(spec: DeploymentSpec, live: dict[str, Any], color: str) -> list[str]:
    """Fields where the live Deployment differs from what the spec renders (hand edits, stale spec)."""
    revision = (live["metadata"].get("annotations") or {}).get(names.REVISION_ANNOTATION, spec.model.revision)
    out: list[str] = []
    if COMMIT.match(spec.model.revision) and revision != spec.model.revision:
        out.append(f"revision {revision[:12]} (spec pins {spec.model.revision[:12]})")
    want = model_deployment(spec, color, revision=revision)  # type: ignore[arg-type]
    fields = k8s._diff({"spec": want["spec"]}, {"spec": live.get("spec", {})})
    if spec.autoscaling is not None:  # the HPA owns replicas
        fields = [f for f in fields if f != "spec.replicas"]
    for f in fields:
        if f == "spec.replicas":
            out.append(f"replicas {live['spec'].get('replicas')} (spec {want['spec']['replicas']})")
        else:
            out.append(f"hand edit: {f}")
    return out


def probe(spec: DeploymentSpec, kubeconfig: str, check: Check, *, smoke: bool) -> None:
    """Fill ``check`` from the live objects and the engine, through the Service (no retries: a probe
    that fails is the data point)."""
    svc = k8s.get_object.fn(kubeconfig=kubeconfig, api_version="v1", kind="Service", name=names.service(spec),
                            namespace=spec.namespace)
    if svc is None:
        check.status = "not deployed"
        return
    if park.read_record(svc) is not None:  # park_model's record: parked on purpose (maybe behind the hold proxy)
        check.status, check.ready = "parked", "0/0"
        return
    color = (svc.get("spec", {}).get("selector") or {}).get(names.COLOR_LABEL, "")
    check.color = color
    dep = k8s.get_object.fn(kubeconfig=kubeconfig, api_version="apps/v1", kind="Deployment",
                            name=names.deployment(spec, color), namespace=spec.namespace) if color else None
    if dep is None:
        check.status, check.problems = "unhealthy", [f"the Service selects color {color!r}, which has no Deployment"]
        return
    desired = int(dep["spec"].get("replicas") or 0)
    rel = spec.release
    settle = spec.default_load_timeout() + rel.post_promotion.window + rel.scale_down_delay + timedelta(minutes=10)
    check.problems += serving_problems(Observed.from_objects(svc, {
        c: dep if c == color else k8s.get_object.fn(kubeconfig=kubeconfig, api_version="apps/v1", kind="Deployment",
                                                    name=names.deployment(spec, c), namespace=spec.namespace)
        for c in names.COLORS}), now=datetime.now(UTC), settle=settle)
    if desired == 0:  # not parked (no park record): nothing serves the model
        check.status, check.ready = "unhealthy", "0/0"
        return
    check.drift = drift(spec, dep, color)
    api = kube_client(kubeconfig)
    pods = k8s.list_objects.fn(kubeconfig=kubeconfig, api_version="v1", kind="Pod", namespace=spec.namespace,
                               label_selector=",".join(f"{k}={v}" for k, v in names.selector(spec, color).items()))
    progress = diagnose(pods, desired=desired)
    ready = sum(1 for p in pods if any(c.get("type") == "Ready" and c.get("status") == "True"
                                       for c in (p.get("status") or {}).get("conditions") or []))
    check.ready = f"{ready}/{desired}"
    if progress.state == "failed" or ready < desired:
        check.problems.append(progress.message if progress.state != "ready" else f"{ready} of {desired} pods Ready")
    try:
        health.check_engine_ready.fn(kubeconfig=kubeconfig, namespace=spec.namespace, service=names.service(spec),
                                     engine=spec.engine.kind, model_id=spec.model.id)
        # A prompt every few minutes would look like traffic to park_idle: models it may park get none.
        if smoke and not (spec.schedule and spec.schedule.idle_after):
            result = health.smoke_test.fn(kubeconfig=kubeconfig, namespace=spec.namespace,
                                          service=names.service(spec), engine=spec.engine.kind,
                                          model_id=spec.model.id, prompts=spec.release.smoke_prompts[:1],
                                          max_tokens=min(spec.release.smoke_max_tokens, 16),
                                          expect=spec.release.expect, stream=False)
            check.latency_ms = round(result[0].latency_s * 1000, 1)
    except Exception as exc:  # noqa: BLE001 - any failure to answer is the finding
        check.problems.insert(0, f"not answering through the Service: {str(exc).splitlines()[0][:160]}")
    try:
        resp = kube_http(api, timeout=10).get(f"{health.service_base(spec.namespace, names.service(spec))}/metrics")
        if resp.status_code == 200:
            for k, v in parse_metrics(resp.text, spec.engine.kind).items():
                setattr(check, k, round(v, 3))
    except Exception as exc:  # noqa: BLE001
        logger().info("%s: /metrics unreadable (%s)", spec.name, exc)
    if check.problems:
        check.status = "unhealthy"


def check_one(spec: DeploymentSpec, kubeconfigs: dict[tuple[str, str], tuple[str, str | None]], *,
              smoke: bool, observed: set[str]) -> Check:
    c = spec.cluster
    check = Check(spec.name, spec.namespace, c.name)
    key = (c.project, c.name)
    if key not in kubeconfigs:
        location, found = find_cluster(spec)
        kubeconfigs[key] = (location, gke.get_credentials(project=c.project, location=location, name=c.name)
                            if found else None)
    _, kubeconfig = kubeconfigs[key]
    if kubeconfig is None:
        check.status = "not deployed"
        return check
    if ledger_name(spec) not in observed:  # a sighting of the GPU nodes for gpu_report, once per pool
        observed.add(ledger_name(spec))
        try:
            record_usage(spec, kubeconfig=kubeconfig)
        except Exception as exc:  # noqa: BLE001 - the report loses precision, the health check goes on
            logger().warning("%s: usage not recorded (%s)", spec.name, exc)
    probe(spec, kubeconfig, check, smoke=smoke)
    return check
