"""Hugging Face Text Generation Inference (TGI): the router's HTTP API (``router/src/server.rs``).

``/health`` (200 only when ready), ``/info``, ``/generate``, ``/generate_stream`` (``data:{"token":...}``
events, the last one with ``generated_text``), ``POST /`` (what ``InferenceClient.text_generation``
calls; a list of one result, or the stream with ``"stream": true``), ``/v1/models``,
``/v1/completions``, ``/v1/chat/completions`` ("Template error: template not found" for a model without
chat template, like PaliGemma pt), ``/metrics`` (``tgi_queue_size``, ``tgi_batch_current_size``,
``tgi_request_success``, ``tgi_request_duration`` histogram ...). Until the shards are ready every route
but ``/metrics`` answers 503 ``{"error": "Model is loading", "error_type": "unhealthy"}``. Errors are
``{"error", "error_type"}``; input validation is 422 with TGI's own messages (``max_new_tokens``, up to 4
stop sequences, ``inputs`` tokens + ``max_new_tokens`` <= ``max_total_tokens``); answers carry the
router's ``x-compute-*`` / ``x-*-time`` headers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from sandbox.core import HttpError, route
from sandbox.engines.openai_api import _ModelHandler, _num, _oai_chat, _oai_completions, _stops
from sandbox.engines.podserver import _Pacer
from sandbox.engines.text import Completion, _h

_TGI: list = []


class TgiHandler(_ModelHandler):
    routes = _TGI

    def error_body(self, err: HttpError) -> Any:
        if err.body is not None:
            return err.body
        kind = {400: "validation", 422: "validation", 429: "overloaded", 500: "generation",
                503: "unhealthy", 404: "not_found"}.get(err.status, "error")
        if err.reason == "template_error":
            kind = "template_error"
        return {"error": err.message, "error_type": kind}

    def _gate(self) -> bool:
        if not self.pod.ready and self.url.path != "/metrics":
            # the router only serves once the shards are ready
            self.__dict__.pop("_body", None)
            self.body_bytes()
            self.send_json(503, {"error": "Model is loading", "error_type": "unhealthy"})
            return True
        return False


def _tgi_params(h: TgiHandler, body: dict[str, Any]) -> tuple[str, dict[str, Any], Completion]:
    inputs = body.get("inputs")
    if not isinstance(inputs, str) or not inputs:
        raise HttpError(422, "Input validation error: `inputs` cannot be empty")
    params = body.get("parameters") or {}
    max_new = _num(params, "max_new_tokens", 100)
    if max_new < 1:
        raise HttpError(422, "Input validation error: `max_new_tokens` must be strictly positive")
    stop = _stops(params.get("stop"))
    if len(stop) > 4:
        raise HttpError(422, f"Input validation error: `stop` supports up to 4 stop sequences. Given: {len(stop)}")
    c = h.pod.plan(inputs, max_new, stop=stop)
    limit = h.pod.max_model_len
    if c.prompt_tokens + max_new > limit:
        raise HttpError(422, f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {limit}. "
                             f"Given: {c.prompt_tokens} `inputs` tokens and {max_new} `max_new_tokens`")
    return inputs, params, c


def _tok(piece: str, i: int) -> dict[str, Any]:
    return {"id": _h(piece) % 32000, "text": piece, "logprob": -round(0.05 + (_h(piece, str(i)) % 200) / 100, 4),
            "special": False}


def _tgi_finish(c: Completion, params: dict[str, Any]) -> str:
    if c.finish_reason == "length":
        return "length"
    return "stop_sequence" if _stops(params.get("stop")) else "eos_token"


def _tgi_details(c: Completion, params: dict[str, Any]) -> dict[str, Any]:
    return {"finish_reason": _tgi_finish(c, params), "generated_tokens": c.completion_tokens,
            "seed": params.get("seed"), "prefill": [], "tokens": [_tok(p, i) for i, p in enumerate(c.pieces)],
            "top_tokens": None, "best_of_sequences": None}


def _tgi_text(c: Completion, inputs: str, params: dict[str, Any]) -> str:
    return (inputs if params.get("return_full_text") else "") + c.text


def _tgi_headers(h: TgiHandler, c: Completion) -> dict[str, str]:
    ttft, total = h.pod.cloud_latency(c)
    ms = max(1, int(total * 1000))
    return {"x-compute-type": "gpu+optimized", "x-compute-time": f"{total:.6f}",
            "x-compute-characters": str(len(c.text)), "x-total-time": str(ms), "x-validation-time": "0",
            "x-queue-time": "0", "x-inference-time": str(ms), "x-time-per-token": str(int(1000 / h.pod.tokens_per_s)),
            "x-prompt-tokens": str(c.prompt_tokens), "x-generated-tokens": str(c.completion_tokens)}


def _tgi_generate_json(h: TgiHandler, *, as_list: bool = False) -> None:
    inputs, params, c = _tgi_params(h, h.json_body())
    h.pod.run(c)
    out: dict[str, Any] = {"generated_text": _tgi_text(c, inputs, params)}
    if params.get("details"):
        out["details"] = _tgi_details(c, params)
    h.send_json(200, [out] if as_list else out, headers=_tgi_headers(h, c))


def _tgi_stream(h: TgiHandler, body: dict[str, Any] | None = None) -> None:
    inputs, params, c = _tgi_params(h, body if body is not None else h.json_body())

    def events(pacer: _Pacer) -> Iterator[str]:
        pacer.first()
        n = len(c.pieces)
        for k, piece in enumerate(c.pieces):
            if k:
                pacer.tokens()
            last = k == n - 1
            yield json.dumps({"index": k + 1, "token": _tok(piece, k), "top_tokens": None,
                              "generated_text": _tgi_text(c, inputs, params) if last else None,
                              "details": {"finish_reason": _tgi_finish(c, params), "generated_tokens": n,
                                          "seed": params.get("seed"), "input_length": c.prompt_tokens}
                              if last else None})

    h.stream(c, events, prefix="data:")


@route(_TGI, "GET", r"/health")
def _tgi_health(h: TgiHandler):
    h.send_text(200, b"", content_type="application/json")


@route(_TGI, "GET", r"/info")
def _tgi_info(h: TgiHandler):
    i, pod = h.pod.info, h.pod
    version = pod.runtime.tgi_version(i)
    return {"model_id": i.model_id, "model_sha": pod.model_meta.get("sha"), "model_pipeline_tag":
            pod.model_meta.get("pipeline_tag", "text-generation"), "max_concurrent_requests": pod.max_concurrent,
            "max_best_of": 2, "max_stop_sequences": 4, "max_input_tokens": pod.max_model_len - 1,
            "max_total_tokens": pod.max_model_len, "validation_workers": 2, "max_client_batch_size": 4,
            "router": "text-generation-router", "version": version, "sha": "sandbox", "docker_label": None}


@route(_TGI, "POST", r"/generate")
def _tgi_generate(h: TgiHandler):
    _tgi_generate_json(h)


@route(_TGI, "POST", r"/generate_stream")
def _tgi_generate_stream(h: TgiHandler):
    _tgi_stream(h)


@route(_TGI, "POST", r"/")
def _tgi_compat(h: TgiHandler):
    body = h.json_body()
    if body.get("stream"):
        _tgi_stream(h, body)
        return
    inputs, params, c = _tgi_params(h, body)
    h.pod.run(c)
    out: dict[str, Any] = {"generated_text": _tgi_text(c, inputs, params)}
    if params.get("details"):
        out["details"] = _tgi_details(c, params)
    h.send_json(200, [out], headers=_tgi_headers(h, c))


@route(_TGI, "GET", r"/v1/models")
def _tgi_models(h: TgiHandler):
    i = h.pod.info
    return {"object": "list", "data": [{"id": i.model_id, "object": "model", "created": 0, "owned_by": i.model_id}]}


@route(_TGI, "POST", r"/v1/completions")
def _tgi_completions(h: TgiHandler):
    _oai_completions(h)


@route(_TGI, "POST", r"/v1/chat/completions")
def _tgi_chat(h: TgiHandler):
    _oai_chat(h, has_template=h.pod.model_meta.get("chat_template", True),
              template_error=HttpError(422, "Template error: template not found", reason="template_error"))


@route(_TGI, "GET", r"/metrics")
def _tgi_metrics(h: TgiHandler):
    h.send_text(200, h.pod.metrics_text(), content_type="text/plain; version=0.0.4")
