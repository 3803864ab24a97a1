"""vLLM's HTTP servers: the OpenAI server and the legacy ``vllm.entrypoints.api_server``.

* OpenAI server (``vllm.entrypoints.openai.api_server`` / ``vllm serve``,
  ``vllm/entrypoints/openai/api_server.py``): ``/health`` (200 as soon as the process is up, before the
  model can answer), ``/ping``, ``/version``, ``/v1/models``, ``/v1/completions``,
  ``/v1/chat/completions`` (``stream``: SSE ``data: {...}`` chunks then ``data: [DONE]``), ``/metrics``
  (``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:gpu_cache_usage_perc``,
  ``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``, ``vllm:e2e_request_latency_seconds``
  ...). Until the model is loaded, everything but ``/health``, ``/ping``, ``/version`` and ``/metrics``
  answers 503. OpenAI routes only: ``/generate`` is 404 ``{"detail": "Not Found"}``. Errors are
  ``{"object": "error", "message", "type", "param", "code"}``; a model without a chat template gets
  transformers' "default chat template is no longer allowed" 400.
* legacy server (``vllm.entrypoints.api_server``, ``vllm/entrypoints/api_server.py``): ``/health`` and
  ``/generate`` only (``{"prompt", "max_tokens"}`` → ``{"text": [prompt + completion]}``, streamed as
  NUL-separated JSON objects); no ``/v1`` routes (404), like the real one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from sandbox.core import HttpError, route
from sandbox.engines.openai_api import (
    _check_len,
    _ModelHandler,
    _num,
    _oai_chat,
    _oai_completions,
    _oai_models,
    _require_ready,
    _stops,
)
from sandbox.engines.podserver import _Pacer

_VLLM: list = []


class VllmHandler(_ModelHandler):
    routes = _VLLM

    def error_body(self, err: HttpError) -> Any:
        if err.body is not None:
            return err.body
        if err.status == 404 and err.reason == "NotFound":
            return {"detail": "Not Found"}
        kind = err.reason if err.reason not in ("", HttpError(err.status, "").reason) else {
            400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError",
            503: "ServiceUnavailableError"}.get(err.status, "Error")
        return {"object": "error", "message": err.message, "type": kind, "param": None, "code": err.status}


def _no_legacy(h: _ModelHandler) -> None:
    if h.pod.info.legacy_api:
        raise HttpError(404, "Not Found", reason="NotFound")


@route(_VLLM, "GET", r"/health")
def _vllm_health(h: VllmHandler):
    h.send_text(200, b"", content_type="application/json")


@route(_VLLM, "GET", r"/ping")
def _vllm_ping(h: VllmHandler):
    _no_legacy(h)
    h.send_text(200, b"", content_type="application/json")


@route(_VLLM, "GET", r"/version")
def _vllm_version(h: VllmHandler):
    _no_legacy(h)
    return {"version": "0.10.2"}


@route(_VLLM, "GET", r"/v1/models")
def _vllm_models(h: VllmHandler):
    _no_legacy(h)
    _require_ready(h)
    return _oai_models(h, "vllm")


@route(_VLLM, "POST", r"/v1/completions")
def _vllm_completions(h: VllmHandler):
    _no_legacy(h)
    _oai_completions(h)


@route(_VLLM, "POST", r"/v1/chat/completions")
def _vllm_chat(h: VllmHandler):
    _no_legacy(h)
    _oai_chat(h, has_template=h.pod.model_meta.get("chat_template", True), template_error=HttpError(
        400, "As of transformers v4.44, default chat template is no longer allowed, so you must provide a chat "
             "template if the tokenizer does not define one.", reason="BadRequestError"))


@route(_VLLM, "POST", r"/generate")
def _vllm_generate(h: VllmHandler):
    if not h.pod.info.legacy_api:  # the OpenAI server (vllm.entrypoints.openai.api_server) has no /generate
        raise HttpError(404, "Not Found", reason="NotFound")
    _require_ready(h)
    body = h.json_body()
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise HttpError(400, "prompt is required", reason="BadRequestError")
    max_tokens = _num(body, "max_tokens", 16)
    c = h.pod.plan(prompt, max_tokens, stop=_stops(body.get("stop")))
    _check_len(h, c.prompt_tokens, max_tokens, chat=False)
    if not body.get("stream"):
        h.pod.run(c)
        return {"text": [prompt + c.text]}

    def events(pacer: _Pacer) -> Iterator[str]:
        pacer.first()
        for k in range(len(c.pieces)):
            if k:
                pacer.tokens()
            yield json.dumps({"text": [prompt + "".join(c.pieces[:k + 1])]})

    # the legacy server streams NUL-separated JSON objects
    h.stream(c, events, prefix="", suffix="\0", content_type="application/json")
    return None


@route(_VLLM, "GET", r"/metrics")
def _vllm_metrics(h: VllmHandler):
    _no_legacy(h)
    h.send_text(200, h.pod.metrics_text(), content_type="text/plain; version=0.0.4; charset=utf-8")
