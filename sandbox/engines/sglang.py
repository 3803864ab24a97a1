"""SGLang's HTTP server (``sglang/srt/entrypoints/http_server.py``).

``/health``, ``/health_generate`` (a real generation; gives up after ``HEALTH_CHECK_TIMEOUT``, 20 s,
when the model hangs), ``/get_model_info``, ``/get_server_info``, ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions``, ``/generate`` (``{"text", "sampling_params"}`` → ``{"text", "meta_info"}``),
``/metrics`` (with ``--enable-metrics``: ``sglang:num_running_reqs``, ``sglang:num_queue_reqs`` ...;
404 without). Errors are ``{"object": "error", "message", "type", "param", "code"}``.
"""

from __future__ import annotations

import json
import uuid
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
from sandbox.engines.podserver import _Aborted, _Pacer

_SGL: list = []


class SglangHandler(_ModelHandler):
    routes = _SGL

    def error_body(self, err: HttpError) -> Any:
        if err.body is not None:
            return err.body
        kind = err.reason if err.reason not in ("", HttpError(err.status, "").reason) else {
            400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}.get(err.status, "Error")
        return {"object": "error", "message": err.message, "type": kind, "param": None, "code": err.status}


@route(_SGL, "GET", r"/health")
def _sgl_health(h: SglangHandler):
    if not h.pod.ready:
        raise HttpError(503, "Server is not ready", reason="ServiceUnavailableError")
    h.send_text(200, b"", content_type="text/plain")


@route(_SGL, "GET", r"/health_generate")
def _sgl_health_generate(h: SglangHandler):
    if not h.pod.ready:
        raise HttpError(503, "Server is not ready", reason="ServiceUnavailableError")
    if h.pod.mode == "hang":
        # the real one gives up after HEALTH_CHECK_TIMEOUT (20 s)
        if h.pod._stop.wait(h.pod.clock.scaled(20.0)):
            raise _Aborted("pod stopped")
        raise HttpError(503, "health check timed out", reason="ServiceUnavailableError")
    if h.pod.mode == "http_500":
        raise HttpError(503, "health check failed", reason="ServiceUnavailableError")
    h.send_text(200, b"", content_type="text/plain")


@route(_SGL, "GET", r"/get_model_info")
def _sgl_model_info(h: SglangHandler):
    i, meta = h.pod.info, h.pod.model_meta
    return {"model_path": i.model_id, "tokenizer_path": i.model_id, "is_generation": True,
            "preferred_sampling_params": None, "weight_version": "default",
            "has_image_understanding": "paligemma" in (i.model_id or "").lower(), "has_audio_understanding": False,
            "model_type": (meta.get("config") or {}).get("model_type"),
            "architectures": (meta.get("config") or {}).get("architectures")}


@route(_SGL, "GET", r"/get_server_info")
def _sgl_server_info(h: SglangHandler):
    i = h.pod.info
    return {"model_path": i.model_id, "served_model_name": i.served_model_name, "revision": i.revision,
            "tp_size": i.tensor_parallel, "port": i.port, "context_length": h.pod.max_model_len,
            "max_running_requests": h.pod.max_batch, "enable_metrics": i.metrics_enabled, "version": "0.5.2",
            "internal_states": [{"last_gen_throughput": h.pod.tokens_per_s}]}


@route(_SGL, "GET", r"/v1/models")
def _sgl_models(h: SglangHandler):
    _require_ready(h)
    return _oai_models(h, "sglang")


@route(_SGL, "POST", r"/v1/completions")
def _sgl_completions(h: SglangHandler):
    _oai_completions(h)


@route(_SGL, "POST", r"/v1/chat/completions")
def _sgl_chat(h: SglangHandler):
    _oai_chat(h, has_template=h.pod.model_meta.get("chat_template", True), template_error=HttpError(
        400, "Chat template not found: the tokenizer does not define one; pass --chat-template",
        reason="BadRequestError"))


@route(_SGL, "POST", r"/generate")
def _sgl_generate(h: SglangHandler):
    _require_ready(h)
    body = h.json_body()
    text = body.get("text")
    if not isinstance(text, str):
        raise HttpError(400, "text is required (input_ids are not supported by the sandbox)",
                        reason="BadRequestError")
    sp = body.get("sampling_params") or {}
    max_new = _num(sp, "max_new_tokens", 128)
    c = h.pod.plan(text, max_new, stop=_stops(sp.get("stop")))
    _check_len(h, c.prompt_tokens, max_new, chat=False)
    rid = uuid.uuid4().hex

    def meta(k: int, done: bool) -> dict[str, Any]:
        _, total = h.pod.cloud_latency(c)
        fr = ({"type": "length", "length": max_new} if c.finish_reason == "length" else
              {"type": "stop", "matched": 151645}) if done else None
        return {"id": rid, "finish_reason": fr, "prompt_tokens": c.prompt_tokens, "completion_tokens": k,
                "cached_tokens": 0, "e2e_latency": round(total, 4)}

    if not body.get("stream"):
        h.pod.run(c)
        return {"text": c.text, "meta_info": meta(c.completion_tokens, True)}

    def events(pacer: _Pacer) -> Iterator[str]:
        pacer.first()
        for k in range(len(c.pieces)):
            if k:
                pacer.tokens()
            yield json.dumps({"text": "".join(c.pieces[:k + 1]),
                              "meta_info": meta(k + 1, k == len(c.pieces) - 1)})
        yield "[DONE]"

    h.stream(c, events)
    return None


@route(_SGL, "GET", r"/metrics")
def _sgl_metrics(h: SglangHandler):
    if not h.pod.info.metrics_enabled:
        raise HttpError(404, "Not Found", body={"detail": "Not Found"})
    h.send_text(200, h.pod.metrics_text(), content_type="text/plain; version=0.0.4; charset=utf-8")
