"""Thin tasks over the real google-cloud-aiplatform client (aiplatform_v1, REST): one per Vertex AI verb.

Resources cross task boundaries as plain dicts (the REST JSON: camelCase). Long-running operations are
waited for inside the task that started them, polled with backoff. ``google.cloud.aiplatform_v1`` is
imported inside the tasks only (via tasks.clients), so ``import flows`` stays fast.
"""

from __future__ import annotations

import json
import time
from typing import Any

from google.api_core import exceptions as gexc
from prefect import task

from manifests.errors import DeployError, PreflightError
from tasks.clients import google_retry, vertex_clients
from tasks.retry import task_retries
from tasks.settings import get_settings


def _region(resource: str) -> str:
    return resource.split("/")[3]


def _dict(message: Any) -> dict[str, Any]:
    return json.loads(type(message).to_json(message, use_integers_for_enums=False))


def _wait(op: Any, what: str, timeout_s: float | None = None) -> Any:
    from google.api_core.future.polling import DEFAULT_POLLING

    s = get_settings()
    timeout = timeout_s or s.operation_timeout_s
    polling = DEFAULT_POLLING.with_delay(initial=s.poll_initial_s, maximum=s.poll_max_s, multiplier=1.5
                                         ).with_timeout(timeout)
    try:
        return op.result(timeout=timeout, retry=google_retry(), polling=polling)
    except gexc.GoogleAPICallError as exc:
        raise DeployError(f"Vertex AI {what} failed: {exc.message}", "see the operation's error above; fix the "
                          "spec (vertex.*) or the container and rerun", reason=type(exc).__name__) from None


def _call_kw() -> dict[str, Any]:
    return {"retry": google_retry(), "timeout": get_settings().call_timeout_s}


# ---- reads (preflights use only these: nothing is created) ----------------------------------------

@task(**task_retries())
def get_gpu_quota_limit(*, project: str, region: str, quota_id: str) -> int:
    """The regional limit of a Vertex serving GPU quota, from the Cloud Quotas API (QuotaInfo)."""
    c = vertex_clients(region)
    url = f"{c.quotas_url}/v1/projects/{project}/locations/global/services/aiplatform.googleapis.com/quotaInfos/{quota_id}"
    resp = c.session.get(url, timeout=get_settings().call_timeout_s)
    if resp.status_code == 404:
        return 0
    if resp.status_code >= 400:
        raise gexc.from_http_response(resp)
    for info in resp.json().get("dimensionsInfos") or []:
        if region in (info.get("applicableLocations") or []):
            return int((info.get("details") or {}).get("value") or 0)
    return 0


@task(**task_retries())
def list_endpoints(*, project: str, region: str, filter: str | None = None) -> list[dict[str, Any]]:  # noqa: A002
    c = vertex_clients(region)
    pager = c.endpoints.list_endpoints(request={"parent": f"projects/{project}/locations/{region}",
                                                "filter": filter or ""}, **_call_kw())
    return [_dict(e) for e in pager]


@task(**task_retries())
def list_models(*, project: str, region: str, filter: str | None = None) -> list[dict[str, Any]]:  # noqa: A002
    c = vertex_clients(region)
    pager = c.models.list_models(request={"parent": f"projects/{project}/locations/{region}",
                                          "filter": filter or ""}, **_call_kw())
    return [_dict(m) for m in pager]


@task(**task_retries())
def get_endpoint(*, name: str) -> dict[str, Any] | None:
    try:
        return _dict(vertex_clients(_region(name)).endpoints.get_endpoint(name=name, **_call_kw()))
    except gexc.NotFound:
        return None


# ---- writes (each waits for its long-running operation) ---------------------------------------------

@task(**task_retries())
def upload_model(*, project: str, region: str, model: dict[str, Any]) -> str:
    """Model.upload with the serving container; returns the model's resource name."""
    from google.cloud import aiplatform_v1

    c = vertex_clients(region)
    op = c.models.upload_model(parent=f"projects/{project}/locations/{region}", model=aiplatform_v1.Model(model),
                               **_call_kw())
    return _wait(op, "model upload").model


@task(**task_retries())
def create_endpoint(*, project: str, region: str, display_name: str, labels: dict[str, str]) -> dict[str, Any]:
    from google.cloud import aiplatform_v1

    c = vertex_clients(region)
    op = c.endpoints.create_endpoint(parent=f"projects/{project}/locations/{region}",
                                     endpoint=aiplatform_v1.Endpoint(display_name=display_name, labels=labels),
                                     **_call_kw())
    return _dict(_wait(op, "endpoint create"))


@task(**task_retries())
def deploy_model(*, endpoint: str, deployed_model: dict[str, Any], traffic_split: dict[str, int],
                 timeout_s: float) -> dict[str, Any]:
    """DeployModel and wait: done means Vertex's health checks of every replica passed."""
    from google.cloud import aiplatform_v1

    c = vertex_clients(_region(endpoint))
    try:
        op = c.endpoints.deploy_model(endpoint=endpoint, deployed_model=aiplatform_v1.DeployedModel(deployed_model),
                                      traffic_split=traffic_split, **_call_kw())
    except gexc.ResourceExhausted as exc:
        raise PreflightError(f"Vertex AI refused the deployment: {exc.message}",
                             "request more serving GPU quota for the region, or lower vertex.max_replica_count"
                             ) from None
    return _dict(_wait(op, "model deployment", timeout_s).deployed_model)


@task(**task_retries())
def undeploy_model(*, endpoint: str, deployed_model_id: str, traffic_split: dict[str, int] | None = None) -> None:
    c = vertex_clients(_region(endpoint))
    try:
        op = c.endpoints.undeploy_model(endpoint=endpoint, deployed_model_id=deployed_model_id,
                                        traffic_split=traffic_split or {}, **_call_kw())
    except gexc.NotFound:
        return  # already gone (a retried call, or a rerun)
    _wait(op, "undeploy")


@task(**task_retries())
def set_traffic_split(*, endpoint: str, traffic_split: dict[str, int]) -> dict[str, Any]:
    """One UpdateEndpoint of the traffic split: the switch is atomic for new requests."""
    from google.cloud import aiplatform_v1
    from google.protobuf import field_mask_pb2

    c = vertex_clients(_region(endpoint))
    ep = c.endpoints.update_endpoint(endpoint=aiplatform_v1.Endpoint(name=endpoint, traffic_split=traffic_split),
                                     update_mask=field_mask_pb2.FieldMask(paths=["traffic_split"]), **_call_kw())
    return _dict(ep)


@task(**task_retries())
def set_endpoint_labels(*, endpoint: str, labels: dict[str, str]) -> dict[str, Any]:
    from google.cloud import aiplatform_v1
    from google.protobuf import field_mask_pb2

    c = vertex_clients(_region(endpoint))
    ep = c.endpoints.update_endpoint(endpoint=aiplatform_v1.Endpoint(name=endpoint, labels=labels),
                                     update_mask=field_mask_pb2.FieldMask(paths=["labels"]), **_call_kw())
    return _dict(ep)


@task(**task_retries())
def delete_endpoint(*, name: str) -> None:
    c = vertex_clients(_region(name))
    try:
        _wait(c.endpoints.delete_endpoint(name=name, **_call_kw()), "endpoint delete")
    except gexc.NotFound:
        return


@task(**task_retries())
def delete_model(*, name: str) -> None:
    c = vertex_clients(_region(name))
    try:
        _wait(c.models.delete_model(name=name, **_call_kw()), "model delete")
    except gexc.NotFound:
        return


# ---- prediction -------------------------------------------------------------------------------------

def predict_once(*, endpoint: str, instances: list[dict[str, Any]], timeout_s: float = 120.0) -> dict[str, Any]:
    """One :predict (no retries: the analysis counts failures). ``{"predictions", "deployed_model_id",
    "latency_s"}``."""
    c = vertex_clients(_region(endpoint))
    t0 = time.perf_counter()
    resp = c.predictions.predict(endpoint=endpoint, instances=instances, timeout=timeout_s)
    out = _dict(resp)
    return {"predictions": out.get("predictions", []), "deployed_model_id": out.get("deployedModelId", ""),
            "latency_s": time.perf_counter() - t0}


def raw_predict_once(*, endpoint: str, body: dict[str, Any], timeout_s: float = 120.0) -> dict[str, Any]:
    """One :rawPredict with the model's own (OpenAI-style) body, posted raw the way the SDK's
    Endpoint.raw_predict and curl do (the GAPIC REST method wraps it in an HttpBody message instead)."""
    c = vertex_clients(_region(endpoint))
    t0 = time.perf_counter()
    resp = c.session.post(f"{c.base_url}/v1/{endpoint}:rawPredict", data=json.dumps(body),
                          headers={"Content-Type": "application/json"}, timeout=timeout_s)
    if resp.status_code >= 400:
        raise gexc.from_http_response(resp)
    return {"json": resp.json(), "deployed_model_id": resp.headers.get("X-Vertex-AI-Deployed-Model-Id", ""),
            "latency_s": time.perf_counter() - t0}


@task(retries=0)
def wait_answering(*, endpoint: str, instance: dict[str, Any], timeout_s: float, want_id: str | None = None
                   ) -> dict[str, Any]:
    """Predict until the model answers (a deployed vLLM may still load behind an early health check)."""
    s = get_settings()
    deadline = time.monotonic() + timeout_s
    delay, last = s.poll_initial_s, "no answer yet"
    while True:
        try:
            got = predict_once(endpoint=endpoint, instances=[instance])
            if got["predictions"] and (want_id is None or got["deployed_model_id"] == want_id):
                return got
            last = f"answered by {got['deployed_model_id']}, waiting for {want_id}"
        except (gexc.ServiceUnavailable, gexc.FailedPrecondition, gexc.TooManyRequests) as exc:
            last = exc.message
        if time.monotonic() > deadline:
            raise DeployError(f"the Vertex endpoint did not answer within {timeout_s:.0f} s: {last}",
                              "check the deployed model's logs (Cloud Logging, resource aiplatform.googleapis.com/"
                              "Endpoint) and vertex.health_route / predict_route", reason="LoadTimeout")
        time.sleep(delay)
        delay = min(delay * 1.5, s.poll_max_s)
