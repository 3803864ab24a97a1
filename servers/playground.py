"""The chat playground: seed 004's web client (``vllm-client``), one per model when ``expose.playground``.

A small aiohttp app beside the model: a page (``playground.html``, no build step) and two JSON/SSE routes
under ``$PLAYGROUND_BASE`` (``/`` by default; ``/playground`` behind the model's Ingress):

* ``GET  {base}api/info`` — what the page shows: the served model id and engine (the engine's own
  ``/v1/models`` or TGI's ``/info``), the color the live Service selects and that color's model revision
  (read from the Kubernetes API with the pod's ServiceAccount token, whose Role may only ``get`` Services
  and Deployments), and whether the model is serving or parked (the hold proxy's
  ``/holdz`` answers through the live Service only while parked).
* ``POST {base}api/chat`` — one answer as Server-Sent Events to the page: ``status`` while the request is
  held (the model is parked and waking: elapsed seconds, whether a wake was asked), ``token`` per streamed piece, then
  ``done`` with time to first token and tokens/s, or ``error`` (the hold proxy's or the engine's own error event
  included). The prompt goes through the model's **live
  Service** (``LLM_URL``), so it reaches the color that serves — or the hold proxy, which holds it until the
  wake. A ``503`` with ``Retry-After`` (held past the proxy's limit) is retried after that delay: nothing
  reached the model, so the prompt is not lost and never runs twice.

APIs, as the engines serve them: vLLM and SGLang through the OpenAI chat API (``/v1/chat/completions``,
``stream: true``); TGI through its Messages API, or ``/generate_stream`` for a model without a chat
template (PaliGemma: the image goes into the prompt as ``![](data:...)``, the way TGI reads images).
Run as ``python -m servers.playground`` (listens on ``$HOST:$PORT``; ``/healthz`` is its probe).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, ClientTimeout, client_exceptions, web

log = logging.getLogger("playground")
PAGE = Path(__file__).with_name("playground.html")
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"  # where the kubelet mounts the pod's token
COLOR_LABEL = "llm-fleet.dev/color"
REVISION_ANNOTATION = "llm-fleet.dev/model-revision"
STATUS_EVERY_S = 1.0
GIVE_UP_AFTER_S = 900.0  # a held prompt retried past this is reported, not retried forever


@dataclass(frozen=True)
class Config:
    upstream: str  # the model's live Service
    model: str  # the served model id (LLM_NAME, as in seed 004)
    engine: str
    api: str  # "chat" (OpenAI / Messages API) or "generate" (TGI /generate_stream)
    vision: bool
    base: str
    namespace: str
    live_service: str
    deployment_prefix: str  # "<name>-": the color Deployments are <prefix>blue / <prefix>green
    sa_dir: str

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Config:
        e = dict(os.environ if env is None else env)
        service = e.get("LLM_SERVICE", "")
        key = re.sub(r"[^A-Z0-9]", "_", service.upper())
        namespace = e.get("LLM_NAMESPACE", "default")
        if e.get(f"{key}_SERVICE_HOST"):  # Kubernetes' service links: the same Service as LLM_URL, no DNS needed
            upstream = f"http://{e[f'{key}_SERVICE_HOST']}:{e.get(f'{key}_SERVICE_PORT', '80')}"
        elif e.get("LLM_URL"):
            upstream = e["LLM_URL"].rstrip("/")
        else:
            upstream = f"http://{service}.{namespace}.svc.cluster.local:{e.get('LLM_PORT', '80')}"
        base = "/" + e.get("PLAYGROUND_BASE", "/").strip("/")
        return cls(upstream=upstream, model=e.get("LLM_NAME", service), engine=e.get("LLM_ENGINE", "vllm"),
                   api=e.get("LLM_API", "chat"), vision=e.get("LLM_VISION", "") == "1",
                   base=base.rstrip("/") + "/", namespace=namespace, live_service=service,
                   deployment_prefix=e.get("LLM_DEPLOYMENT_PREFIX", f"{service}-"),
                   sa_dir=e.get("SERVICEACCOUNT_DIR", SA_DIR))


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


# Without a chat template the model answers a plain prompt: TGI's /generate_stream, the others' completions.
PLAIN = {"tgi": "generate"}
API_NAMES = {"chat": "OpenAI chat API /v1/chat/completions", "completions": "OpenAI completions API /v1/completions",
             "generate": "TGI /generate_stream"}


def upstream_request(cfg: Config, body: dict[str, Any], api: str) -> tuple[str, dict[str, Any]]:
    """The engine call for one chat turn on ``api`` (chat, completions or generate): (path, JSON body)."""
    messages = [m for m in body.get("messages") or [] if m.get("content")]
    params = {"max_tokens": int(body.get("max_tokens") or 128), "temperature": float(body.get("temperature") or 0)}
    image = body.get("image") or ""
    prompt = messages[-1]["content"] if messages else ""  # a plain prompt is the last user turn
    if api == "generate":  # the image inline, as TGI reads it
        inputs = f"![]({image}){prompt}\n" if image else prompt
        return "/generate_stream", {"inputs": inputs, "parameters": {
            "max_new_tokens": params["max_tokens"], "temperature": params["temperature"] or None}}
    if api == "completions":
        return "/v1/completions", {"model": cfg.model, "prompt": prompt, "stream": True, **params}
    if image and messages:  # OpenAI vision content parts
        last = messages[-1]
        messages = [*messages[:-1], {"role": last["role"], "content": [
            {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": last["content"]}]}]
    return "/v1/chat/completions", {"model": cfg.model, "messages": messages, "stream": True, **params}


def piece_of(api: str, data: str) -> str | None:
    """The text one upstream SSE ``data:`` line carries (None: no text, e.g. a role or usage chunk)."""
    if data.strip() == "[DONE]":
        return None
    event = json.loads(data)
    if api == "generate":
        token = event.get("token") or {}
        return None if token.get("special") else token.get("text")
    choice = (event.get("choices") or [{}])[0]
    return choice.get("text") if api == "completions" else (choice.get("delta") or {}).get("content")


def error_of(event: str | None, data: str) -> dict[str, Any] | None:
    """The error one upstream SSE event carries, as the page's ``error`` data, or None. The hold proxy ends a
    held stream it cannot answer with ``event: error`` (hold timeout, a model that dropped the request); vLLM
    and TGI send an error mid-stream as a ``data:`` chunk with an ``error`` field. Read as text, neither is a
    piece: the page showed an empty answer as done."""
    try:
        payload = json.loads(data)
    except ValueError:
        return {"status": 502, "message": data[:500]} if event == "error" else None
    if not isinstance(payload, dict) or ("error" not in payload and event != "error"):
        return None
    error = payload.get("error", payload)
    if isinstance(error, dict):
        return {"status": error.get("code") or 502, "message": str(error.get("message") or error)[:500]}
    return {"status": 502, "message": str(error)[:500]}


def no_chat_template(status: int, text: str) -> bool:
    """vLLM's 400 / TGI's 422 for a model whose tokenizer has no chat template."""
    return status in (400, 422) and "template" in text.lower()


class Playground:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.http: ClientSession | None = None
        self.kube: ClientSession | None = None
        self._kube_ssl: ssl.SSLContext | None = None
        self.api = cfg.api  # becomes the plain-prompt API once the engine says the model has no chat template

    # ---- what the page shows ---------------------------------------------------------------
    async def _kube_get(self, path: str) -> dict[str, Any] | None:
        sa = Path(self.cfg.sa_dir)
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        if not host or not (sa / "token").exists():
            return None
        if self.kube is None:
            if (sa / "ca.crt").exists():
                self._kube_ssl = ssl.create_default_context(cafile=str(sa / "ca.crt"))
            self.kube = ClientSession(base_url=f"https://{host}:{port}")
        headers = {"Authorization": f"Bearer {(sa / 'token').read_text().strip()}"}  # re-read: tokens rotate
        try:
            async with self.kube.get(path, headers=headers, ssl=self._kube_ssl, timeout=ClientTimeout(total=5)) as r:
                return await r.json() if r.status == 200 else None
        except (TimeoutError, client_exceptions.ClientError, OSError):
            return None

    async def live(self) -> dict[str, Any]:
        """The color the live Service selects and that color's revision, from the cluster."""
        ns, cfg = self.cfg.namespace, self.cfg
        svc = await self._kube_get(f"/api/v1/namespaces/{ns}/services/{cfg.live_service}")
        if svc is None:
            return {"color": None, "revision": None}
        color = ((svc.get("spec") or {}).get("selector") or {}).get(COLOR_LABEL)
        dep = await self._kube_get(f"/apis/apps/v1/namespaces/{ns}/deployments/{cfg.deployment_prefix}{color}")
        revision = (((dep or {}).get("metadata") or {}).get("annotations") or {}).get(REVISION_ANNOTATION)
        return {"color": color, "revision": revision}

    async def hold_state(self) -> dict[str, Any] | None:
        """The hold proxy's state while parked (its ``/holdz`` through the live Service), else None."""
        assert self.http is not None
        try:
            async with self.http.get(self.cfg.upstream + "/holdz", timeout=ClientTimeout(total=3)) as r:
                if r.status != 200:
                    return None
                body = await r.json(content_type=None)
                return body if isinstance(body, dict) and "held" in body else None
        except (TimeoutError, client_exceptions.ClientError, OSError, ValueError):
            return None

    async def info(self, request: web.Request) -> web.Response:
        cfg = self.cfg
        live, hold = await asyncio.gather(self.live(), self.hold_state())
        # While the live Service selects the hold proxy, the model is parked — or just woken, answering
        # through the proxy until the wake switches the Service back to its color.
        state = "serving" if hold is None else "waking" if hold.get("awake") else "parked"
        return web.json_response({
            "model": cfg.model, "engine": cfg.engine, "vision": cfg.vision, **live,
            "api": f"{cfg.engine} {API_NAMES[self.api]}" + (
                " (the model has no chat template)" if self.api != "chat" else ""),
            "state": state, "held": (hold or {}).get("held", 0),
            "wake_requested": bool((hold or {}).get("wake_requested"))})

    # ---- one answer ------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "the body must be JSON: {messages, max_tokens, temperature}"},
                                     status=400)
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await out.prepare(request)
        sent = time.monotonic()
        reporter = asyncio.create_task(self._report_hold(out, sent))
        try:
            await self._relay(out, body, sent, reporter)
        except (ConnectionResetError, client_exceptions.ClientConnectionResetError):
            pass  # the page went away
        except (TimeoutError, client_exceptions.ClientError, OSError) as exc:
            reporter.cancel()
            log.warning("the model's Service did not answer: %s", exc)
            await out.write(_sse("error", {"status": 502, "message": f"the model's Service did not answer: {exc}"}))
        finally:
            reporter.cancel()
        return out

    async def _report_hold(self, out: web.StreamResponse, sent: float) -> None:
        """Until the first token: every second, how long the prompt has waited and what the proxy holds."""
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            hold = await self.hold_state()
            status = {"elapsed_s": round(time.monotonic() - sent, 1), "parked": hold is not None,
                      "held": (hold or {}).get("held", 0), "wake_requested": bool((hold or {}).get("wake_requested"))}
            await out.write(_sse("status", status))

    async def _relay(self, out: web.StreamResponse, body: dict[str, Any], sent: float, reporter: asyncio.Task) -> None:
        assert self.http is not None
        cfg, first, pieces = self.cfg, None, 0
        while True:
            api = self.api
            path, payload = upstream_request(cfg, body, api)
            async with self.http.post(cfg.upstream + path, json=payload,
                                      timeout=ClientTimeout(total=None, sock_connect=10)) as resp:
                if resp.status == 503 and "Retry-After" in resp.headers and time.monotonic() - sent < GIVE_UP_AFTER_S:
                    await resp.read()  # held past the proxy's limit: nothing ran, so send it again later
                    await asyncio.sleep(float(resp.headers["Retry-After"]))
                    continue
                if resp.status != 200:
                    text = (await resp.text())[:500]
                    if api == "chat" and no_chat_template(resp.status, text):
                        self.api = PLAIN.get(cfg.engine, "completions")
                        continue
                    reporter.cancel()
                    await out.write(_sse("error", {"status": resp.status, "message": text}))
                    return
                event = None
                async for raw in resp.content:
                    line = raw.decode("utf-8", "replace").strip()
                    if not line:
                        event = None  # a blank line ends an SSE event
                        continue
                    if line.startswith("event:"):
                        event = line[6:].strip()
                        continue
                    if not line.startswith("data:"):
                        continue  # an SSE comment (a hold proxy's keep-alive)
                    data = line[5:].strip()
                    if (error := error_of(event, data)) is not None:
                        reporter.cancel()
                        await out.write(_sse("error", error))
                        return
                    piece = piece_of(api, data)
                    if not piece:
                        continue
                    if first is None:
                        first = time.monotonic()
                        reporter.cancel()
                    pieces += 1
                    await out.write(_sse("token", {"text": piece}))
                break
        done = time.monotonic()
        ttft = (first or done) - sent
        rate = pieces / (done - first) if first is not None and done > first else 0.0
        await out.write(_sse("done", {"ttft_s": round(ttft, 3), "tokens": pieces, "tokens_per_s": round(rate, 1),
                                      "total_s": round(done - sent, 3)}))

    # ---- app --------------------------------------------------------------------------------
    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE.read_text(), content_type="text/html")

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    def app(self) -> web.Application:
        base = self.cfg.base
        app = web.Application(client_max_size=16 * 2**20)  # an uploaded image, base64
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get(base, self.page)
        if base != "/":
            async def to_base(request: web.Request) -> web.Response:
                raise web.HTTPFound(base)

            app.router.add_get(base.rstrip("/"), to_base)
        app.router.add_get(base + "api/info", self.info)
        app.router.add_post(base + "api/chat", self.chat)

        async def open_client(app: web.Application) -> None:
            self.http = ClientSession(auto_decompress=False)

        async def close_clients(app: web.Application) -> None:
            for s in (self.http, self.kube):
                if s is not None:
                    await s.close()

        app.on_startup.append(open_client)
        app.on_cleanup.append(close_clients)
        return app


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s playground: %(message)s")
    cfg = Config.from_env()
    log.info("playground for %s (%s, %s API) at %s, model at %s", cfg.model, cfg.engine, cfg.api, cfg.base,
             cfg.upstream)
    web.run_app(Playground(cfg).app(), host=os.environ.get("HOST", "0.0.0.0"),
                port=int(os.environ.get("PORT", "8080")), print=None, access_log=None)


if __name__ == "__main__":
    main()
