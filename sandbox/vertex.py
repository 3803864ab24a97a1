"""Vertex AI (aiplatform v1 REST) and the Cloud Quotas quotaInfos it is checked with, on one loopback server.

The real ``google-cloud-aiplatform`` clients talk to it unchanged::

    from google.cloud import aiplatform_v1
    opts = {"api_endpoint": sandbox.vertex.url}          # http://127.0.0.1:PORT
    models = aiplatform_v1.ModelServiceClient(credentials=AnonymousCredentials(), transport="rest",
                                              client_options=opts)
    aiplatform.init(project=P, location=L, api_endpoint=url, api_transport="rest", credentials=...)
    aiplatform.Endpoint(name).predict(instances=[...])   # the seed's own call

What it serves (``/v1/...``; operations also under ``/ui/...``, which the REST operations client polls):

* Models: ``models:upload`` (LRO → UploadModelResponse), get, list (``filter`` on display_name / labels),
  delete (LRO; FAILED_PRECONDITION while the model is deployed).
* Endpoints: create (LRO, optional ``endpointId``), get, list (``filter``), patch (``updateMask``:
  traffic_split, labels, display_name, description), delete (LRO; FAILED_PRECONDITION while models are
  deployed).
* ``:deployModel`` / ``:undeployModel`` / ``:mutateDeployedModel`` LROs with traffic split. A deploy
  checks the machine type against the accelerator and the regional serving quota
  (``aiplatform.googleapis.com/custom_model_serving_nvidia_l4_gpus`` ...; 429 RESOURCE_EXHAUSTED), then
  provisions replicas: each one is a model server started by the sandbox's :class:`ModelRuntime` from the
  Model's container spec (image, command, args, env + the ``AIP_*`` variables Vertex sets), so the
  weight-load time is the runtime's (scaled by the clock) and behaviors (``crash_loop``, ``http_500``,
  ``wrong_answers`` ...) apply, matched on the Model's labels or the replica name
  ``<deployed display name>-<deployed id>-<n>``. The LRO completes when every replica's health route
  answers 200 — fails with "Model server exited unexpectedly" if a container dies, "never became ready"
  after the container's deployment timeout (default 1800 s). Only then does the DeployedModel appear on
  the endpoint and the traffic split change.
* ``:predict`` (``{"instances", "parameters"}`` POSTed to the container's predict route; its
  ``predictions`` wrapped in a PredictResponse with ``deployedModelId``) and ``:rawPredict`` (the raw body
  to the predict route, the raw answer back with ``X-Vertex-AI-Deployed-Model-Id`` / ``X-Vertex-AI-Model``),
  routed per request by the endpoint's traffic split (weighted), replicas round-robin.
* Cloud Quotas: ``GET /v1/projects/P/locations/global/services/aiplatform.googleapis.com/quotaInfos/ID``
  (``CustomModelServingL4GPUsPerProjectPerRegion`` ...) with the per-region limits.

The Model Garden vLLM image (``.../vertex-vision-model-garden-dockers/pytorch-vllm-serve``) gets its own
model-server handler (registered in :data:`sandbox.engines.runtime.HANDLER_OVERRIDES`): ``/ping`` answers 200 only
once the model is loaded, and ``/generate`` also takes Vertex's ``{"instances": [...]}`` (a prompt per
instance, or ``"@requestFormat": "chatCompletions"`` with messages) and answers ``{"predictions": [...]}``;
a raw OpenAI chat body (``messages``) answers a chat completion.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import random
import re
import threading
import time
import uuid
from typing import Any
from urllib.parse import unquote

from sandbox.core import Clock, Emulator, Faults, HttpError, JsonHandler, now_rfc3339, route
from sandbox.engines import openai_api as oai
from sandbox.engines.runtime import HANDLER_OVERRIDES
from sandbox.engines.text import render_chat
from sandbox.engines.vllm import VllmHandler, _vllm_generate

TYPE_PREFIX = "type.googleapis.com/google.cloud.aiplatform.v1."
QUOTA_SERVICE = "aiplatform.googleapis.com"
# Vertex serving accelerators: quota id (Cloud Quotas) and quota metric, as gcloud's model-garden
# utilities map them; the GKE node label of the same GPU (for the runtime's GPU memory).
ACCELERATORS: dict[str, tuple[str, str, str]] = {
    "NVIDIA_L4": ("CustomModelServingL4GPUsPerProjectPerRegion", "custom_model_serving_nvidia_l4_gpus", "nvidia-l4"),
    "NVIDIA_TESLA_T4": ("CustomModelServingT4GPUsPerProjectPerRegion", "custom_model_serving_nvidia_t4_gpus",
                        "nvidia-tesla-t4"),
    "NVIDIA_TESLA_A100": ("CustomModelServingA100GPUsPerProjectPerRegion", "custom_model_serving_nvidia_a100_gpus",
                          "nvidia-tesla-a100"),
    "NVIDIA_A100_80GB": ("CustomModelServingA10080GBGPUsPerProjectPerRegion",
                         "custom_model_serving_nvidia_a100_80gb_gpus", "nvidia-a100-80gb"),
    "NVIDIA_H100_80GB": ("CustomModelServingH100GPUsPerProjectPerRegion", "custom_model_serving_nvidia_h100_gpus",
                         "nvidia-h100-80gb"),
}
DEFAULT_GPU_QUOTA = 8
REGIONS = ("us-central1", "us-east1", "us-east4", "us-west1", "europe-west4", "asia-southeast1")
# machine type -> (accelerator type, GPUs it comes with); g2/a2/a3 have fixed GPU counts, n1 takes T4s.
_FIXED = {**{f"g2-standard-{n}": ("NVIDIA_L4", 1) for n in (4, 8, 12, 16, 32)},
          "g2-standard-24": ("NVIDIA_L4", 2), "g2-standard-48": ("NVIDIA_L4", 4), "g2-standard-96": ("NVIDIA_L4", 8),
          **{f"a2-highgpu-{n}g": ("NVIDIA_TESLA_A100", n) for n in (1, 2, 4, 8)},
          **{f"a2-ultragpu-{n}g": ("NVIDIA_A100_80GB", n) for n in (1, 2, 4, 8)},
          **{f"a3-highgpu-{n}g": ("NVIDIA_H100_80GB", n) for n in (1, 2, 4, 8)}}
# Cloud seconds, scaled by the clock.
VERTEX_DELAYS = {"model_upload": 20.0, "endpoint_create": 5.0, "deploy_provision": 240.0, "undeploy": 30.0,
                 "delete": 5.0, "deployment_timeout": 1800.0}
_GRPC = {400: 3, 403: 7, 404: 5, 409: 6, 429: 8, 500: 13, 503: 14, 412: 9}
_STATUS = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 409: "ALREADY_EXISTS",
           429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE", 412: "FAILED_PRECONDITION"}
_LABEL = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")


def _precondition(message: str) -> HttpError:
    return HttpError(400, message, reason="FAILED_PRECONDITION")


def _pb(type_name: str, body: Any) -> dict[str, Any]:
    """Validate a request body the way the real API does (unknown fields are 400) and normalize it:
    camelCase keys, enum names, int64 as strings."""
    from google.cloud import aiplatform_v1
    from google.protobuf import json_format

    cls = getattr(aiplatform_v1, type_name)
    msg = cls.pb()()
    try:
        json_format.ParseDict(body if isinstance(body, dict) else {}, msg)
    except json_format.ParseError as exc:
        raise HttpError(400, f"Invalid JSON payload received. {exc}") from None
    return json_format.MessageToDict(msg)


class _Deployment:
    """A DeployedModel being deployed or serving: its replicas (model servers)."""

    def __init__(self, dm: dict[str, Any], endpoint: str) -> None:
        self.dm = dm
        self.endpoint = endpoint
        self.replicas: list[Any] = []  # PodServer
        self.next = itertools.count()
        self.failed: tuple[str, list[str]] | None = None
        self.live = False  # on the endpoint (deploy finished)

    @property
    def gpus(self) -> int:
        res = self.dm.get("dedicatedResources") or {}
        spec = res.get("machineSpec") or {}
        return int(spec.get("acceleratorCount") or 0) * int(res.get("minReplicaCount") or 1)


class Vertex(Emulator):
    def __init__(self, *, clock: Clock, faults: Faults, runtime: Any, project: str = "sandbox-project",
                 tokens: Any = None) -> None:
        self.clock = clock
        self.faults = faults
        self.runtime = runtime
        self.project = project
        # sandbox.tokens.GoogleTokens: when given, every call needs a live access token it issued (as on
        # GCP: 401 UNAUTHENTICATED otherwise); None accepts any caller (unit tests, AnonymousCredentials)
        self.tokens = tokens
        self._handler = VertexHandler
        self._lock = threading.RLock()
        self._ids = itertools.count(int(time.time()) % 10**6 * 10**12 + 1000)
        self.models: dict[str, dict[str, Any]] = {}
        self.endpoints: dict[str, dict[str, Any]] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.deployments: dict[tuple[str, str], _Deployment] = {}  # (endpoint name, deployed id)
        self.quota_limits: dict[tuple[str, str, str], int] = {}  # (project, region, quota id)
        self.predictions = 0

    def stop(self) -> None:
        with self._lock:
            deps = list(self.deployments.values())
        for dep in deps:
            for server in dep.replicas:
                with contextlib.suppress(Exception):
                    server.stop()
        super().stop()

    # ---- ids, operations -------------------------------------------------------------------------
    def _id(self) -> str:
        return str(next(self._ids))

    def _operation(self, parent: str, meta_type: str, work: Any, *, delay: float) -> dict[str, Any]:
        """Start an LRO: after ``delay`` cloud seconds ``work()`` returns ``(response_type, response)`` or
        raises HttpError (the operation's error)."""
        name = f"{parent}/operations/{self._id()}"
        now = now_rfc3339()
        op = {"name": name, "metadata": {"@type": TYPE_PREFIX + meta_type,
                                         "genericMetadata": {"createTime": now, "updateTime": now}}}
        with self._lock:
            self.operations[name] = op

        def run() -> None:
            if not self.clock.sleep(delay, self.faults.stop):
                return
            try:
                rtype, response = work()
                result: dict[str, Any] = {"response": {"@type": rtype, **response}}
            except HttpError as err:
                result = {"error": {"code": _GRPC.get(err.status, 2), "message": err.message}}
            except Exception as exc:  # noqa: BLE001 - the emulator's own bug surfaces as the LRO's error
                result = {"error": {"code": 13, "message": f"internal error: {exc!r}"}}
            with self._lock:
                op.update(result, done=True)
                op["metadata"]["genericMetadata"]["updateTime"] = now_rfc3339()

        threading.Thread(target=run, name=f"vertex-op-{name.rsplit('/', 1)[-1]}", daemon=True).start()
        return dict(op)

    def get_operation(self, name: str) -> dict[str, Any]:
        with self._lock:
            op = self.operations.get(name)
            if op is None:
                raise HttpError(404, f"Operation {name} not found.")
            return json.loads(json.dumps(op))

    # ---- models ------------------------------------------------------------------------------------
    def upload_model(self, parent: str, body: dict[str, Any]) -> dict[str, Any]:
        req = _pb("UploadModelRequest", body)
        model = req.get("model") or {}
        if not model.get("displayName"):
            raise HttpError(400, "Model.display_name is required.")
        if not (model.get("containerSpec") or {}).get("imageUri"):
            raise HttpError(400, "Model.container_spec.image_uri is required for a custom container model.")
        _check_labels(model.get("labels") or {})
        mid = req.get("modelId") or self._id()
        name = f"{parent}/models/{mid}"
        with self._lock:
            if name in self.models:
                raise HttpError(409, f"Model {name} already exists.")
        now = now_rfc3339()
        model.update(name=name, versionId="1", versionAliases=["default"], createTime=now, updateTime=now,
                     versionCreateTime=now, versionUpdateTime=now, etag=uuid.uuid4().hex,
                     supportedDeploymentResourcesTypes=["DEDICATED_RESOURCES"],
                     supportedInputStorageFormats=["jsonl"], supportedOutputStorageFormats=["jsonl"])

        def done():
            with self._lock:
                self.models[name] = model
            return TYPE_PREFIX + "UploadModelResponse", {"model": name, "modelVersionId": "1"}

        return self._operation(name, "UploadModelOperationMetadata", done, delay=VERTEX_DELAYS["model_upload"])

    def get_model(self, name: str) -> dict[str, Any]:
        with self._lock:
            model = self.models.get(name.split("@", 1)[0])
            if model is None:
                raise HttpError(404, f"Model `{name}` does not exist.")
            out = json.loads(json.dumps(model))
            deployed = [{"endpoint": d.endpoint, "deployedModelId": d.dm["id"]}
                        for d in self.deployments.values() if d.dm.get("model") == model["name"] and d.live]
        if deployed:
            out["deployedModels"] = deployed
        return out

    def list_models(self, parent: str, flt: str | None) -> dict[str, Any]:
        with self._lock:
            names = [n for n in self.models if n.startswith(parent + "/models/")]
        items = [self.get_model(n) for n in names]
        return {"models": [m for m in items if _matches(m, flt)]}

    def delete_model(self, name: str) -> dict[str, Any]:
        model = self.get_model(name)
        if model.get("deployedModels"):
            where = ", ".join(d["endpoint"] for d in model["deployedModels"])
            raise _precondition(f"The model {name} is deployed or being deployed at the following endpoints: "
                                f"{where}. Undeploy it first.")

        def done():
            with self._lock:
                self.models.pop(name, None)
            return "type.googleapis.com/google.protobuf.Empty", {}

        return self._operation(name, "DeleteOperationMetadata", done, delay=VERTEX_DELAYS["delete"])

    # ---- endpoints ---------------------------------------------------------------------------------
    def create_endpoint(self, parent: str, body: dict[str, Any], endpoint_id: str | None) -> dict[str, Any]:
        ep = _pb("Endpoint", body)
        if not ep.get("displayName"):
            raise HttpError(400, "Endpoint.display_name is required.")
        if ep.get("deployedModels") or ep.get("trafficSplit"):
            raise HttpError(400, "deployed_models and traffic_split are output only on create.")
        _check_labels(ep.get("labels") or {})
        eid = endpoint_id or self._id()
        name = f"{parent}/endpoints/{eid}"
        with self._lock:
            if name in self.endpoints:
                raise HttpError(409, f"Endpoint {name} already exists.")
        now = now_rfc3339()
        ep.update(name=name, createTime=now, updateTime=now, etag=uuid.uuid4().hex)

        def done():
            with self._lock:
                self.endpoints[name] = ep
            return TYPE_PREFIX + "Endpoint", self.get_endpoint(name)

        return self._operation(name, "CreateEndpointOperationMetadata", done, delay=VERTEX_DELAYS["endpoint_create"])

    def _endpoint(self, name: str) -> dict[str, Any]:
        ep = self.endpoints.get(name)
        if ep is None:
            raise HttpError(404, f"Endpoint `{name}` not found.")
        return ep

    def get_endpoint(self, name: str) -> dict[str, Any]:
        with self._lock:
            return json.loads(json.dumps(self._endpoint(name)))

    def list_endpoints(self, parent: str, flt: str | None) -> dict[str, Any]:
        with self._lock:
            items = [json.loads(json.dumps(e)) for n, e in self.endpoints.items()
                     if n.startswith(parent + "/endpoints/")]
        return {"endpoints": [e for e in items if _matches(e, flt)]}

    def update_endpoint(self, name: str, body: dict[str, Any], mask: str | None) -> dict[str, Any]:
        patch = _pb("Endpoint", body)
        fields = [_camel(f.strip()) for f in (mask or "").split(",") if f.strip()]
        if not fields:
            raise HttpError(400, "update_mask is required.")
        with self._lock:
            ep = self._endpoint(name)
            for f in fields:
                if f == "trafficSplit":
                    split = {k: int(v) for k, v in (patch.get("trafficSplit") or {}).items()}
                    _check_split(split, {d["id"] for d in ep.get("deployedModels") or []})
                    ep["trafficSplit"] = split
                elif f == "labels":
                    _check_labels(patch.get("labels") or {})
                    ep["labels"] = patch.get("labels") or {}
                elif f in ("displayName", "description"):
                    ep[f] = patch.get(f, "")
                else:
                    raise HttpError(400, f"Unsupported update_mask path: {f}.")
            ep["updateTime"] = now_rfc3339()
            ep["etag"] = uuid.uuid4().hex
            return json.loads(json.dumps(ep))

    def delete_endpoint(self, name: str) -> dict[str, Any]:
        with self._lock:
            ep = self._endpoint(name)
            busy = ep.get("deployedModels") or [d for (e, _), d in self.deployments.items() if e == name]
        if busy:
            raise _precondition(f"Endpoint {name} has deployed models. Undeploy all models from the endpoint "
                                f"before deleting it.")

        def done():
            with self._lock:
                self.endpoints.pop(name, None)
            return "type.googleapis.com/google.protobuf.Empty", {}

        return self._operation(name, "DeleteOperationMetadata", done, delay=VERTEX_DELAYS["delete"])

    # ---- quota -------------------------------------------------------------------------------------
    def set_quota(self, region: str, accelerator: str, limit: int, *, project: str | None = None) -> None:
        if accelerator not in ACCELERATORS:
            raise ValueError(f"unknown accelerator {accelerator!r}; valid: {', '.join(ACCELERATORS)}")
        with self._lock:
            self.quota_limits[(project or self.project, region, ACCELERATORS[accelerator][0])] = int(limit)

    def quota_limit(self, project: str, region: str, quota_id: str) -> int:
        with self._lock:
            return self.quota_limits.get((project, region, quota_id), DEFAULT_GPU_QUOTA)

    def gpu_usage(self, project: str, region: str, accelerator: str) -> int:
        prefix = f"projects/{project}/locations/{region}/"
        with self._lock:
            return sum(d.gpus for (e, _), d in self.deployments.items() if e.startswith(prefix)
                       and ((d.dm.get("dedicatedResources") or {}).get("machineSpec") or {}).get("acceleratorType")
                       == accelerator)

    def quota_info(self, project: str, quota_id: str) -> dict[str, Any]:
        metric = next((m for q, m, _ in ACCELERATORS.values() if q == quota_id), None)
        if metric is None:
            raise HttpError(404, f"QuotaInfo {quota_id} not found for service {QUOTA_SERVICE}.")
        with self._lock:
            regions = sorted(set(REGIONS) | {r for (p, r, q) in self.quota_limits if p == project and q == quota_id})
        return {
            "name": f"projects/{project}/locations/global/services/{QUOTA_SERVICE}/quotaInfos/{quota_id}",
            "quotaId": quota_id, "metric": f"{QUOTA_SERVICE}/{metric}", "service": QUOTA_SERVICE,
            "isPrecise": True, "containerType": "PROJECT", "dimensions": ["region"], "metricUnit": "1",
            "quotaDisplayName": quota_id, "metricDisplayName": metric,
            "dimensionsInfos": [{"dimensions": {"region": r}, "applicableLocations": [r],
                                 "details": {"value": str(self.quota_limit(project, r, quota_id))}}
                                for r in regions],
        }

    # ---- deploy / undeploy / mutate ------------------------------------------------------------------
    def deploy_model(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        req = _pb("DeployModelRequest", body)
        dm = req.get("deployedModel") or {}
        project, region = endpoint.split("/")[1], endpoint.split("/")[3]
        with self._lock:
            self._endpoint(endpoint)
        model = self.get_model(dm.get("model") or "")
        res = dm.get("dedicatedResources")
        if not res:
            raise HttpError(400, "Model does not support automatic resources: set dedicated_resources.")
        spec = res.get("machineSpec") or {}
        machine, acc, count = spec.get("machineType", ""), spec.get("acceleratorType"), int(spec.get("acceleratorCount")
                                                                                               or 0)
        _check_machine(machine, acc, count)
        mn, mx = int(res.get("minReplicaCount") or 0), int(res.get("maxReplicaCount") or 0)
        if mn < 1:
            raise HttpError(400, "dedicated_resources.min_replica_count must be at least 1.")
        if mx and mx < mn:
            raise HttpError(400, "dedicated_resources.max_replica_count must be >= min_replica_count.")
        res.setdefault("maxReplicaCount", mn)
        split = {k: int(v) for k, v in (req.get("trafficSplit") or {}).items()}
        with self._lock:
            live = {d["id"] for d in self._endpoint(endpoint).get("deployedModels") or []}
        if split:
            _check_split(split, live | {"0"})
        if acc:
            quota_id, metric, _ = ACCELERATORS[acc]
            limit, used = self.quota_limit(project, region, quota_id), self.gpu_usage(project, region, acc)
            if used + count * mn > limit:
                raise HttpError(429, f"The following quota metrics exceed quota limits: {QUOTA_SERVICE}/{metric}",
                                reason="RESOURCE_EXHAUSTED")
        dm_id = dm.get("id") or self._id()
        dm.update(id=dm_id, model=model["name"], modelVersionId=model.get("versionId", "1"),
                  createTime=now_rfc3339(), dedicatedResources=res)
        dm.setdefault("displayName", model.get("displayName", ""))
        dep = _Deployment(dm, endpoint)
        with self._lock:
            if (endpoint, dm_id) in self.deployments:
                raise HttpError(409, f"DeployedModel {dm_id} already exists on {endpoint}.")
            self.deployments[(endpoint, dm_id)] = dep

        def done():
            try:
                self._provision(dep, model, mn)
            except HttpError:
                self._drop(dep)
                raise
            with self._lock:
                ep = self._endpoint(endpoint)
                ep.setdefault("deployedModels", []).append(dm)
                if split:
                    ep["trafficSplit"] = {(dm_id if k == "0" else k): v for k, v in split.items()}
                ep["updateTime"] = now_rfc3339()
                dep.live = True
            return TYPE_PREFIX + "DeployModelResponse", {"deployedModel": dm}

        return self._operation(endpoint, "DeployModelOperationMetadata", done,
                               delay=VERTEX_DELAYS["deploy_provision"])

    def _pod(self, dep: _Deployment, model: dict[str, Any], index: int) -> dict[str, Any]:
        """What the runtime needs to start a model server: the Model's container as a pod-like dict."""
        cs = model.get("containerSpec") or {}
        res = dep.dm["dedicatedResources"]
        spec = res.get("machineSpec") or {}
        ports = cs.get("ports") or [{"containerPort": 8080}]
        port = int(ports[0].get("containerPort") or 8080)
        project, region = dep.endpoint.split("/")[1], dep.endpoint.split("/")[3]
        aip = {"AIP_HTTP_PORT": str(port), "AIP_HEALTH_ROUTE": cs.get("healthRoute") or "/health",
               "AIP_PREDICT_ROUTE": cs.get("predictRoute") or "/predict", "AIP_MODE": "PREDICTION",
               "AIP_DEPLOYED_MODEL_ID": dep.dm["id"], "AIP_ENDPOINT_ID": dep.endpoint.rsplit("/", 1)[-1],
               "AIP_PROJECT_NUMBER": project, "AIP_STORAGE_URI": model.get("artifactUri", ""),
               "CLOUD_ML_REGION": region}
        env = [{"name": e.get("name"), "value": e.get("value", "")} for e in cs.get("env") or []]
        env += [{"name": k, "value": v} for k, v in aip.items()]
        acc = ACCELERATORS.get(spec.get("acceleratorType") or "")
        container: dict[str, Any] = {"name": "model-server", "image": cs.get("imageUri", ""), "env": env,
                                     "command": cs.get("command") or [], "args": cs.get("args") or [],
                                     "ports": [{"containerPort": port}]}
        pod: dict[str, Any] = {"metadata": {"namespace": f"vertex-{region}", "uid": uuid.uuid4().hex,
                                            "name": f"{dep.dm.get('displayName') or 'deployed'}-{dep.dm['id']}-{index}",
                                            "labels": dict(model.get("labels") or {})},
                               "spec": {"containers": [container]}}
        if acc is not None:
            container["resources"] = {"limits": {"nvidia.com/gpu": str(spec.get("acceleratorCount") or 1)}}
            pod["spec"]["nodeSelector"] = {"cloud.google.com/gke-accelerator": acc[2]}
        return pod

    def _start_replica(self, dep: _Deployment, model: dict[str, Any]) -> Any:
        pod = self._pod(dep, model, next(dep.next))
        holder: dict[str, Any] = {}

        def on_exit(code: int, reason: str) -> None:
            server = holder.get("server")
            if not dep.live:
                dep.failed = ("exited", server.logs()[-20:] if server else [])
                return
            # serving: Vertex restarts the container (the runtime's behaviors decide how the next start goes)
            with self._lock:
                if server in dep.replicas:
                    dep.replicas.remove(server)
            if not self.faults.stop.is_set():
                with contextlib.suppress(Exception):
                    dep.replicas.append(self._start_replica(dep, model))

        server = self.runtime.start_pod(pod, on_exit=on_exit)
        holder["server"] = server
        return server

    def _provision(self, dep: _Deployment, model: dict[str, Any], replicas: int) -> None:
        health = (model.get("containerSpec") or {}).get("healthRoute") or "/health"
        timeout = (model.get("containerSpec") or {}).get("deploymentTimeout")
        budget = float(str(timeout).rstrip("s")) if timeout else VERTEX_DELAYS["deployment_timeout"]
        with self._lock:
            dep.replicas = [self._start_replica(dep, model) for _ in range(replicas)]
        deadline = time.monotonic() + self.clock.scaled(budget)
        pending = list(dep.replicas)
        while pending:
            if dep.failed is not None:
                logs = "\n".join(dep.failed[1][-5:])
                raise HttpError(400, "Model server exited unexpectedly. Model server logs can be found at "
                                     f"https://console.cloud.google.com/logs/viewer (last lines:\n{logs})",
                                reason="FAILED_PRECONDITION")
            if self.faults.stop.is_set():
                raise HttpError(503, "sandbox stopping")
            pending = [s for s in pending if _http_status(s.url, health) != 200]
            if pending and time.monotonic() > deadline:
                raise HttpError(400, "Model server never became ready. Please validate that your model file or "
                                     "container configuration are valid.", reason="FAILED_PRECONDITION")
            if pending:
                time.sleep(0.02)

    def _drop(self, dep: _Deployment) -> None:
        with self._lock:
            self.deployments.pop((dep.endpoint, dep.dm["id"]), None)
            servers, dep.replicas = dep.replicas, []
        for s in servers:
            with contextlib.suppress(Exception):
                s.stop()

    def undeploy_model(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        req = _pb("UndeployModelRequest", body)
        dm_id = req.get("deployedModelId") or ""
        split = {k: int(v) for k, v in (req.get("trafficSplit") or {}).items()}
        with self._lock:
            ep = self._endpoint(endpoint)
            ids = {d["id"] for d in ep.get("deployedModels") or []}
            if dm_id not in ids:
                raise HttpError(404, f"DeployedModel {dm_id} not found on {endpoint}.")
            rest = ids - {dm_id}
            if split:
                _check_split(split, rest)
            elif rest and (ep.get("trafficSplit") or {}).get(dm_id, 0) > 0:
                raise _precondition(f"DeployedModel {dm_id} receives traffic; update the traffic split to move it "
                                    f"to the other deployed models before undeploying it.")
            # traffic stops at once; the replicas go away with the operation
            ep["trafficSplit"] = split or {k: v for k, v in (ep.get("trafficSplit") or {}).items() if k != dm_id}
            ep["deployedModels"] = [d for d in ep.get("deployedModels") or [] if d["id"] != dm_id]
            ep["updateTime"] = now_rfc3339()
            dep = self.deployments.get((endpoint, dm_id))
            if dep is not None:
                dep.live = False

        def done():
            if dep is not None:
                self._drop(dep)
            return TYPE_PREFIX + "UndeployModelResponse", {}

        return self._operation(endpoint, "UndeployModelOperationMetadata", done, delay=VERTEX_DELAYS["undeploy"])

    def mutate_deployed_model(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        req = _pb("MutateDeployedModelRequest", body)
        patch = req.get("deployedModel") or {}
        fields = {_camel(f.strip()) for f in (req.get("updateMask") or "").split(",") if f.strip()}
        with self._lock:
            dep = self.deployments.get((endpoint, patch.get("id", "")))
            if dep is None or not dep.live:
                raise HttpError(404, f"DeployedModel {patch.get('id')} not found on {endpoint}.")
        bad = fields - {"dedicatedResources", "dedicatedResources.minReplicaCount",
                        "dedicatedResources.maxReplicaCount"}
        if not fields or bad:
            raise HttpError(400, "update_mask may name dedicated_resources.min_replica_count / max_replica_count.")
        new = patch.get("dedicatedResources") or {}
        model = self.get_model(dep.dm["model"])

        def done():
            res = dep.dm["dedicatedResources"]
            mn = int(new.get("minReplicaCount") or res.get("minReplicaCount") or 1)
            res["minReplicaCount"] = mn
            res["maxReplicaCount"] = max(mn, int(new.get("maxReplicaCount") or res.get("maxReplicaCount") or mn))
            with self._lock:
                extra = dep.replicas[mn:]
                dep.replicas = dep.replicas[:mn]
                while len(dep.replicas) < mn:
                    dep.replicas.append(self._start_replica(dep, model))
            for s in extra:
                s.stop()
            return TYPE_PREFIX + "MutateDeployedModelResponse", {"deployedModel": dep.dm}

        return self._operation(endpoint, "MutateDeployedModelOperationMetadata", done,
                               delay=VERTEX_DELAYS["undeploy"])

    # ---- prediction --------------------------------------------------------------------------------
    def route(self, endpoint: str) -> tuple[_Deployment, Any]:
        """The deployed model and replica one request goes to: weighted by the traffic split, round-robin."""
        with self._lock:
            ep = self._endpoint(endpoint)
            split = {k: v for k, v in (ep.get("trafficSplit") or {}).items() if v > 0}
            if not ep.get("deployedModels"):
                raise _precondition(f"Endpoint `{endpoint}` does not have any deployed models.")
            if not split:
                raise _precondition(f"Endpoint `{endpoint}` has no traffic split: no deployed model receives "
                                    f"traffic.")
            dm_id = random.choices(list(split), weights=list(split.values()))[0]
            dep = self.deployments.get((endpoint, dm_id))
            servers = [s for s in (dep.replicas if dep else []) if s.alive]
            if dep is None or not servers:
                raise HttpError(503, "The deployed model has no serving replica.", reason="UNAVAILABLE")
            self.predictions += 1
            return dep, servers[self.predictions % len(servers)]

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"models": sorted(self.models), "predictions": self.predictions,
                    "endpoints": {n: {"displayName": e.get("displayName"), "labels": e.get("labels", {}),
                                      "trafficSplit": e.get("trafficSplit", {}),
                                      "deployedModels": [d["id"] for d in e.get("deployedModels") or []]}
                                  for n, e in self.endpoints.items()},
                    "replicas": {f"{e}/deployedModels/{i}": len(d.replicas) for (e, i), d in self.deployments.items()},
                    "quota_limits": {"/".join(k): v for k, v in self.quota_limits.items()}}


# ---- pure helpers ------------------------------------------------------------------------------------

def _camel(path: str) -> str:
    return re.sub(r"_([a-z])", lambda m: m.group(1).upper(), path)


def _check_labels(labels: dict[str, str]) -> None:
    if len(labels) > 64:
        raise HttpError(400, "At most 64 labels are allowed.")
    for k, v in labels.items():
        if not _LABEL.match(k) or not _LABEL_VALUE.match(str(v)):
            raise HttpError(400, f"Invalid label {k}={v!r}: keys and values may contain only lowercase letters, "
                                 f"digits, '_' and '-' (at most 63 characters; keys start with a letter).")


def _check_split(split: dict[str, int], ids: set[str]) -> None:
    unknown = set(split) - ids
    if unknown:
        raise HttpError(400, f"Traffic split references unknown DeployedModel id(s): {', '.join(sorted(unknown))}.")
    if any(v < 0 for v in split.values()) or (split and sum(split.values()) != 100):
        raise HttpError(400, f"The traffic split percentages must add up to 100, got {sum(split.values())}.")


def _check_machine(machine: str, acc: str | None, count: int) -> None:
    if not machine:
        raise HttpError(400, "machine_spec.machine_type is required.")
    if acc and acc not in ACCELERATORS:
        raise HttpError(400, f"Accelerator type {acc} is not supported for serving.")
    fixed = _FIXED.get(machine)
    if fixed is not None:
        if acc != fixed[0] or count != fixed[1]:
            raise HttpError(400, f"Machine type {machine} requires accelerator_type {fixed[0]} with "
                                 f"accelerator_count {fixed[1]}; got {acc or 'none'} × {count}.")
    elif machine.startswith("n1-"):
        if acc not in (None, "NVIDIA_TESLA_T4") or (acc and count not in (1, 2, 4)):
            raise HttpError(400, f"Machine type {machine} supports NVIDIA_TESLA_T4 × 1, 2 or 4; got {acc} × {count}.")
    elif machine.split("-")[0] not in ("e2", "n2", "n2d", "c2", "c3"):
        raise HttpError(400, f"Machine type {machine} is not supported for online prediction.")
    elif acc:
        raise HttpError(400, f"Machine type {machine} does not support accelerators.")


_TERM = re.compile(r'^\s*(labels\.)?([A-Za-z_][\w.-]*)\s*(=|:)\s*("([^"]*)"|\*|[\w.-]+)\s*$')


def _matches(resource: dict[str, Any], flt: str | None) -> bool:
    """AIP-160 filters as Vertex list calls take them: ``display_name="x" AND labels.k="v"`` (``labels.k:*``)."""
    if not flt:
        return True
    for term in re.split(r"\s+AND\s+", flt.strip()):
        m = _TERM.match(term)
        if not m:
            raise HttpError(400, f"Unsupported filter term: {term!r}.")
        is_label, key, op, raw, quoted = m.groups()
        value = quoted if quoted is not None else raw
        if is_label:
            have = (resource.get("labels") or {}).get(key)
            if (op == ":" and value == "*" and have is None) or (value != "*" and have != value):
                return False
        else:
            if str(resource.get(_camel(key), "")) != value:
                return False
    return True


def _http_status(base: str, path: str, timeout: float = 2.0) -> int:
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError:
        return 0
    finally:
        conn.close()


def _forward(base: str, path: str, body: bytes, content_type: str, timeout: float = 600.0
             ) -> tuple[int, str, bytes]:
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": content_type})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "application/json", resp.read()
    except OSError as exc:
        raise HttpError(503, f"The model server did not answer: {exc}", reason="UNAVAILABLE") from None
    finally:
        conn.close()


# ---- HTTP ----------------------------------------------------------------------------------------------

_ROUTES: list = []
_P = r"/v1/(?P<parent>projects/[^/]+/locations/[^/]+)"
_E = r"/v1/(?P<endpoint>projects/[^/]+/locations/[^/]+/endpoints/[^/:]+)"


class VertexHandler(JsonHandler):
    service = "vertex"
    routes = _ROUTES

    @property
    def vx(self) -> Vertex:
        return self.server.state

    def _dispatch(self) -> None:
        tokens = self.server.state.tokens
        if tokens is not None:
            auth = self.headers.get("Authorization") or ""
            email, expired = tokens.check(auth[7:]) if auth.startswith("Bearer ") else (None, False)
            if email is None or expired:
                self.body_bytes()
                err = HttpError(401, "Request had invalid authentication credentials. Expected OAuth 2 access "
                                     "token, login cookie or other valid authentication credential.",
                                reason="UNAUTHENTICATED")
                self.send_json(401, self.error_body(err), headers={"WWW-Authenticate": "Bearer"})
                return
        JsonHandler._dispatch(self)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _dispatch

    def error_body(self, err: HttpError) -> Any:
        if err.body is not None:
            return err.body
        status = err.reason if err.reason and err.reason.isupper() else _STATUS.get(err.status, "UNKNOWN")
        return {"error": {"code": err.status, "message": err.message, "status": status}}


@route(_ROUTES, "GET", r"/(?:v1|ui)/(?P<name>projects/[^/]+/locations/[^/]+/(?:[^/]+/[^/]+/)?operations/[^/:]+)")
def _get_op(h: VertexHandler, name: str):
    return h.vx.get_operation(name)


@route(_ROUTES, "POST", _P + r"/models:upload")
def _upload(h: VertexHandler, parent: str):
    return h.vx.upload_model(parent, h.json_body())


@route(_ROUTES, "GET", _P + r"/models")
def _list_models(h: VertexHandler, parent: str):
    return h.vx.list_models(parent, h.q("filter"))


@route(_ROUTES, "GET", r"/v1/(?P<name>projects/[^/]+/locations/[^/]+/models/[^/:]+)")
def _get_model(h: VertexHandler, name: str):
    return h.vx.get_model(unquote(name))


@route(_ROUTES, "DELETE", r"/v1/(?P<name>projects/[^/]+/locations/[^/]+/models/[^/:]+)")
def _delete_model(h: VertexHandler, name: str):
    return h.vx.delete_model(name)


@route(_ROUTES, "POST", _P + r"/endpoints")
def _create_endpoint(h: VertexHandler, parent: str):
    return h.vx.create_endpoint(parent, h.json_body(), h.q("endpointId") or h.q("endpoint_id"))


@route(_ROUTES, "GET", _P + r"/endpoints")
def _list_endpoints(h: VertexHandler, parent: str):
    return h.vx.list_endpoints(parent, h.q("filter"))


@route(_ROUTES, "GET", _E)
def _get_endpoint(h: VertexHandler, endpoint: str):
    return h.vx.get_endpoint(endpoint)


@route(_ROUTES, "PATCH", _E)
def _patch_endpoint(h: VertexHandler, endpoint: str):
    return h.vx.update_endpoint(endpoint, h.json_body(), h.q("updateMask") or h.q("update_mask"))


@route(_ROUTES, "DELETE", _E)
def _delete_endpoint(h: VertexHandler, endpoint: str):
    return h.vx.delete_endpoint(endpoint)


@route(_ROUTES, "POST", _E + r":deployModel")
def _deploy(h: VertexHandler, endpoint: str):
    return h.vx.deploy_model(endpoint, h.json_body())


@route(_ROUTES, "POST", _E + r":undeployModel")
def _undeploy(h: VertexHandler, endpoint: str):
    return h.vx.undeploy_model(endpoint, h.json_body())


@route(_ROUTES, "POST", _E + r":mutateDeployedModel")
def _mutate(h: VertexHandler, endpoint: str):
    return h.vx.mutate_deployed_model(endpoint, h.json_body())


def _model_headers(dep: _Deployment) -> dict[str, str]:
    return {"X-Vertex-AI-Deployed-Model-Id": dep.dm["id"], "X-Vertex-AI-Model": dep.dm["model"],
            "X-Vertex-AI-Model-Display-Name": dep.dm.get("displayName", "")}


@route(_ROUTES, "POST", _E + r":predict")
def _predict(h: VertexHandler, endpoint: str):
    req = h.json_body()
    if not isinstance(req, dict) or not isinstance(req.get("instances"), list) or not req["instances"]:
        raise HttpError(400, "instances must be a non-empty list.")
    unknown = set(req) - {"instances", "parameters"}
    if unknown:
        raise HttpError(400, f"Invalid JSON payload received. Unknown name \"{sorted(unknown)[0]}\".")
    dep, server = h.vx.route(endpoint)
    cs = h.vx.get_model(dep.dm["model"]).get("containerSpec") or {}
    status, _, data = _forward(server.url, cs.get("predictRoute") or "/predict", json.dumps(req).encode(),
                               "application/json")
    if status != 200:
        raise HttpError(status if status in _STATUS else 500, data.decode(errors="replace")[:2000])
    try:
        answer = json.loads(data)
        predictions = answer["predictions"]
    except (ValueError, KeyError, TypeError):
        raise HttpError(500, "The model server's response is not a JSON object with a `predictions` field.",
                        reason="INTERNAL") from None
    return {"predictions": predictions if isinstance(predictions, list) else [predictions],
            "deployedModelId": dep.dm["id"], "model": dep.dm["model"], "modelVersionId": dep.dm.get("modelVersionId",
                                                                                                     "1"),
            "modelDisplayName": dep.dm.get("displayName", "")}


@route(_ROUTES, "POST", _E + r":rawPredict")
def _raw_predict(h: VertexHandler, endpoint: str):
    body = h.body_bytes()
    dep, server = h.vx.route(endpoint)
    cs = h.vx.get_model(dep.dm["model"]).get("containerSpec") or {}
    status, ctype, data = _forward(server.url, cs.get("predictRoute") or "/predict", body,
                                   h.headers.get("Content-Type") or "application/json")
    h.send_text(status, data, content_type=ctype, headers=_model_headers(dep))
    return None


@route(_ROUTES, "GET", r"/v1/projects/(?P<project>[^/]+)/locations/global/services/aiplatform\.googleapis\.com"
                      r"/quotaInfos/(?P<quota_id>[^/]+)")
def _quota_info(h: VertexHandler, project: str, quota_id: str):
    return h.vx.quota_info(project, quota_id)


# ---- the Model Garden vLLM serving container ------------------------------------------------------------

def _model_garden_handler(info: Any) -> type | None:
    """HANDLER_OVERRIDES hook: Vertex Model Garden's vLLM image speaks Vertex's prediction format."""
    if info.engine == "vllm" and "vertex-vision-model-garden-dockers/pytorch-vllm-serve" in info.image:
        return ModelGardenVllmHandler
    return None


def _model_garden_routes() -> list:
    routes: list = []

    @route(routes, "GET", r"/ping")
    def _ping(h):  # Vertex's health route for this image: 200 once the model can answer
        if not h.pod.ready:
            raise HttpError(503, "The model is still loading.", reason="ServiceUnavailableError")
        h.send_text(200, b"", content_type="application/json")

    @route(routes, "POST", r"/generate")
    def _generate(h):
        body = h.json_body()
        if isinstance(body, dict) and "messages" in body:  # a raw OpenAI chat body (rawPredict)
            return oai._oai_chat(h, has_template=h.pod.model_meta.get("chat_template", True),
                               template_error=HttpError(400, "the model has no chat template"))
        if not (isinstance(body, dict) and "instances" in body):
            return _vllm_generate(h)
        oai._require_ready(h)
        instances = body.get("instances")
        if not isinstance(instances, list) or not instances:
            raise HttpError(400, "instances must be a non-empty list", reason="BadRequestError")
        return {"predictions": [_mg_instance(h, inst) for inst in instances]}

    return routes


def _mg_instance(h: Any, inst: Any) -> Any:
    if not isinstance(inst, dict):
        raise HttpError(400, "each instance must be an object", reason="BadRequestError")
    max_tokens = oai._num(inst, "max_tokens", 16)
    if inst.get("@requestFormat") == "chatCompletions":
        messages = inst.get("messages")
        if not isinstance(messages, list) or not messages:
            raise HttpError(400, "messages must be a non-empty list", reason="BadRequestError")
        prompt = render_chat(messages, h.pod.model_meta.get("family", "chatml"))
        c = h.pod.plan(prompt, max_tokens, stop=oai._stops(inst.get("stop")))
        h.pod.run(c)
        name = h.pod.info.served_model_name or h.pod.info.model_id
        return {"id": oai._oai_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish_reason}], "usage": oai._usage(c)}
    prompt = inst.get("prompt")
    if not isinstance(prompt, str):
        raise HttpError(400, "each instance needs a prompt (or @requestFormat chatCompletions)",
                        reason="BadRequestError")
    c = h.pod.plan(prompt, max_tokens, stop=oai._stops(inst.get("stop")))
    oai._check_len(h, c.prompt_tokens, max_tokens, chat=False)
    h.pod.run(c)
    return c.text if inst.get("raw_response") else f"Prompt:\n{prompt}\nOutput:\n{c.text}"


def _make_handler() -> type:
    class _MG(VllmHandler):
        routes = _model_garden_routes() + VllmHandler.routes

    _MG.__name__ = _MG.__qualname__ = "ModelGardenVllmHandler"
    return _MG


ModelGardenVllmHandler = _make_handler()


def _register() -> None:
    if _model_garden_handler not in HANDLER_OVERRIDES:
        HANDLER_OVERRIDES.append(_model_garden_handler)


_register()
