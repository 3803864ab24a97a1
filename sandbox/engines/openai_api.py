"""The OpenAI-compatible HTTP API the engines share: ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions``, and the base handler of every model server.

Mirrors the OpenAI completions and chat completions APIs as vLLM serves them
(``vllm/entrypoints/openai/api_server.py``, ``protocol.py``): ``prompt`` a string or a list of strings,
``echo``, ``stop``, ``n`` choices per prompt (``n < 1`` → 400), ``stream`` as SSE ``data: {...}`` chunks
then ``data: [DONE]`` (``stream_options.include_usage`` adds a usage chunk), ``usage`` token counts, the
context-length 400 ("This model's maximum context length is N tokens ..."), 404 for another model's name
(vLLM), 503 while loading. The engine modules (``vllm.py``, ``tgi.py``, ``sglang.py``) mount these routes
with their own error bodies and chat-template errors. :class:`_ModelHandler` drops the connection of a
dead pod, records arrivals, writes the engine's access log and streams chunked events.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from sandbox.core import HttpError, JsonHandler
from sandbox.engines.podserver import PodServer, _Pacer, _PodHTTPServer
from sandbox.engines.text import Completion, render_chat


class _ModelHandler(JsonHandler):
    service = "model"
    server: _PodHTTPServer

    @property
    def pod(self) -> PodServer:
        return self.server.state

    def _gate(self) -> bool:
        """Answer the request before routing (True if it did). For engines that are closed while loading."""
        return False

    def _model_dispatch(self) -> None:
        if self.pod._stop.is_set():
            self.close_connection = True
            return
        if self.command == "POST":
            self.pod.arrivals.append((time.time(), getattr(self, "opened_at", 0.0)))
        if self._gate():
            return
        JsonHandler._dispatch(self)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _model_dispatch

    def send_response(self, code: int, message: str | None = None) -> None:
        super().send_response(code, message)
        if self.url.path not in ("/health", "/metrics", "/ping"):
            self.pod.request_log(self.command, self.url.path, code)

    def stream(self, c: Completion, events: Callable[[_Pacer], Iterator[str]], *, prefix: str = "data: ",
               suffix: str = "\n\n", content_type: str = "text/event-stream; charset=utf-8") -> None:
        """Admit the generation (before any header is sent), then stream its events as chunks."""
        with self.pod.generation(c) as pacer:
            self.start_chunked(200, content_type, headers={"Cache-Control": "no-cache"})
            for ev in events(pacer):
                self.write_chunk(f"{prefix}{ev}{suffix}")
            self.end_chunked()


def _num(body: dict[str, Any], key: str, default: Any, cast: type = int) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise HttpError(400, f"{key} must be a number") from None


def _stops(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _oai_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _require_ready(h: _ModelHandler) -> None:
    if not h.pod.ready:
        raise HttpError(503, "The model is still loading.", reason="ServiceUnavailableError")


def _check_model(h: _ModelHandler, body: dict[str, Any]) -> str:
    name = h.pod.info.served_model_name or h.pod.info.model_id or ""
    asked = body.get("model")
    if asked and asked != name and h.pod.info.engine == "vllm":
        raise HttpError(404, f"The model `{asked}` does not exist.", reason="NotFoundError")
    return name


def _check_len(h: _ModelHandler, prompt_tokens: int, max_tokens: int, *, chat: bool) -> None:
    limit = h.pod.max_model_len
    if prompt_tokens + max_tokens > limit:
        where = "messages" if chat else "prompt"
        raise HttpError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                             f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {where}, {max_tokens} in "
                             f"the completion). Please reduce the length of the {where} or completion.",
                        reason="BadRequestError")


def _usage(c: Completion) -> dict[str, Any]:
    return {"prompt_tokens": c.prompt_tokens, "total_tokens": c.prompt_tokens + c.completion_tokens,
            "completion_tokens": c.completion_tokens, "prompt_tokens_details": None}


def _oai_models(h: _ModelHandler, owned_by: str) -> dict[str, Any]:
    i = h.pod.info
    name = i.served_model_name or i.model_id
    return {"object": "list", "data": [{
        "id": name, "object": "model", "created": int(h.pod.started_at), "owned_by": owned_by,
        "root": i.model_id, "parent": None, "max_model_len": h.pod.max_model_len,
        "permission": [{"id": f"modelperm-{uuid.uuid5(uuid.NAMESPACE_URL, name or '').hex}",
                        "object": "model_permission", "created": int(h.pod.started_at), "allow_create_engine": False,
                        "allow_sampling": True, "allow_logprobs": True, "allow_search_indices": False,
                        "allow_view": True, "allow_fine_tuning": False, "organization": "*", "group": None,
                        "is_blocking": False}]}]}


def _oai_completions(h: _ModelHandler) -> None:
    _require_ready(h)
    body = h.json_body()
    name = _check_model(h, body)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(p, str) for p in prompt):
            raise HttpError(400, "prompt must be a string or a list of strings", reason="BadRequestError")
        prompts = prompt
    elif isinstance(prompt, str):
        prompts = [prompt]
    else:
        raise HttpError(400, "prompt is required", reason="BadRequestError")
    max_tokens = _num(body, "max_tokens", 16)
    stop = _stops(body.get("stop"))
    echo = bool(body.get("echo"))
    plans = [h.pod.plan(p, max_tokens, stop=stop) for p in prompts]
    for c in plans:
        _check_len(h, c.prompt_tokens, max_tokens, chat=False)
    cid, created = _oai_id("cmpl"), int(time.time())
    fp = "tgi" if h.pod.info.engine == "tgi" else None
    if not body.get("stream"):
        choices, made = [], []
        n = _n_choices(body)
        for p, first in zip(prompts, plans, strict=True):
            for k in range(n):  # n draws per prompt: distinct when sampling, identical when greedy
                c = first if k == 0 or not _sampling(body) else h.pod.plan(p, max_tokens, stop=stop, sample=k)
                h.pod.run(c)
                made.append(c)
                choices.append({"index": len(choices), "text": (p if echo else "") + c.text, "logprobs": None,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                                "prompt_logprobs": None})
        prompt_tokens = sum(c.prompt_tokens for c in plans)
        completion_tokens = sum(c.completion_tokens for c in made)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": None}
        out = {"id": cid, "object": "text_completion", "created": created, "model": name, "choices": choices,
               "usage": usage, "service_tier": None, "system_fingerprint": fp, "kv_transfer_params": None}
        h.send_json(200, out)
        return
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    c = plans[0]

    def events(pacer: _Pacer) -> Iterator[str]:
        pacer.first()
        for k, piece in enumerate(c.pieces):
            if k:
                pacer.tokens()
            last = k == len(c.pieces) - 1
            yield json.dumps({"id": cid, "object": "text_completion", "created": created, "model": name,
                              "choices": [{"index": 0, "text": piece, "logprobs": None,
                                           "finish_reason": c.finish_reason if last else None,
                                           "stop_reason": c.stop_reason if last else None}]})
        if not c.pieces:
            yield json.dumps({"id": cid, "object": "text_completion", "created": created, "model": name,
                              "choices": [{"index": 0, "text": "", "logprobs": None,
                                           "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}]})
        if include_usage:
            yield json.dumps({"id": cid, "object": "text_completion", "created": created, "model": name,
                              "choices": [], "usage": _usage(c)})
        yield "[DONE]"

    h.stream(c, events)


def _sampling(body: dict[str, Any]) -> bool:
    """vLLM samples unless ``temperature`` is 0 (greedy); its default temperature is 1.0."""
    t = body.get("temperature")
    return t is None or (isinstance(t, int | float) and t > 0)


def _n_choices(body: dict[str, Any]) -> int:
    """OpenAI ``n``: that many choices per prompt (vLLM and TGI both honour it; must be >= 1)."""
    n = body.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise HttpError(400, f"n must be at least 1, got {n}.", reason="BadRequestError")
    return n


def _oai_chat(h: _ModelHandler, *, has_template: bool, template_error: HttpError) -> None:
    _require_ready(h)
    body = h.json_body()
    name = _check_model(h, body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, "messages must be a non-empty list", reason="BadRequestError")
    if not has_template:
        raise template_error
    prompt = render_chat(messages, h.pod.model_meta.get("family", "chatml"))
    mt = body.get("max_completion_tokens") or body.get("max_tokens")
    probe = h.pod.plan(prompt, 0)
    max_tokens = int(mt) if mt is not None else max(1, h.pod.max_model_len - probe.prompt_tokens)
    _check_len(h, probe.prompt_tokens, max_tokens, chat=True)
    c = h.pod.plan(prompt, max_tokens, stop=_stops(body.get("stop")))
    cid, created = _oai_id("chatcmpl"), int(time.time())
    fp = f"{h.pod.runtime.tgi_version(h.pod.info)}-sha-sandbox" if h.pod.info.engine == "tgi" else None
    if not body.get("stream"):
        n = _n_choices(body)
        made = [c if k == 0 or not _sampling(body) else
                h.pod.plan(prompt, max_tokens, stop=_stops(body.get("stop")), sample=k) for k in range(n)]
        for one in made:
            h.pod.run(one)
        usage = _usage(c)
        usage["completion_tokens"] = sum(one.completion_tokens for one in made)
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        h.send_json(200, {
            "id": cid, "object": "chat.completion", "created": created, "model": name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": one.text, "refusal": None,
                                                 "annotations": None, "audio": None, "function_call": None,
                                                 "tool_calls": [], "reasoning_content": None},
                         "logprobs": None, "finish_reason": one.finish_reason, "stop_reason": one.stop_reason}
                        for i, one in enumerate(made)],
            "service_tier": None, "system_fingerprint": fp, "usage": usage, "prompt_logprobs": None,
            "kv_transfer_params": None})
        return
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    def chunk(delta: dict[str, Any], finish: str | None) -> str:
        return json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                           "system_fingerprint": fp,
                           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    def events(pacer: _Pacer) -> Iterator[str]:
        yield chunk({"role": "assistant", "content": ""}, None)
        pacer.first()
        for k, piece in enumerate(c.pieces):
            if k:
                pacer.tokens()
            yield chunk({"content": piece}, None)
        yield chunk({}, c.finish_reason)
        if include_usage:
            yield json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                              "choices": [], "usage": _usage(c)})
        yield "[DONE]"

    h.stream(c, events)
