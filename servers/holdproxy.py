"""The hold proxy: while a model is parked, its live Service points here.

Every request is held in a bounded queue (``HOLD_MAX_QUEUE``, Knative's activator: 10,000) until the
model answers again, then forwarded to it — streamed, status and headers as the model sent them. The
first held request asks for a wake, once (again only if none came within the hold timeout): a
Prefect event (``HOLD_EVENT``, ``llm-fleet.model.wake-requested``) posted to
``$PREFECT_API_URL/events``, which a deployment trigger turns into a ``wake_model`` run. A request held longer than ``HOLD_TIMEOUT_S`` (Knative: 300 s), or
one beyond the queue bound, gets ``503`` with ``Retry-After`` — never a hang or a reset.

The model is reached through ``HOLD_UPSTREAM_SERVICE`` (the ``<name>-awake`` Service on the model's
own pods): Kubernetes' service-link variables ``<SERVICE>_SERVICE_HOST/PORT`` when present, else its
cluster DNS name. "Answers" is the engine's own readiness: ``/v1/models`` (vLLM, SGLang) or ``/health``
(TGI) — never "a pod is Running". Once it answers, requests pass straight through (until the model
stops answering again, e.g. the next park, when holding resumes).

Traffic that is not demand is answered at once and never held, counted or allowed to ask for a wake
(Knative's activator answers its probes itself the same way): kubelet probes (``kube-probe/``), Google
load-balancer health checks (``GoogleHC/``), Prometheus/Managed Prometheus scrapes (``Prometheus/``) and
``/healthz`` get ``200 ok``, and ``/metrics`` (or any scrape) gets the proxy's own metrics in Prometheus
text format: requests held, forwarded, rejected (by reason), wakes requested, probes answered.

The queue is bounded by count and by bytes (``HOLD_MAX_QUEUE_BYTES``: the held bodies must fit the
container's memory limit). A request the model may have received (the connection dropped after it was
sent) is never sent again — it gets ``503`` with ``Retry-After``, since a generation must not run twice;
only a request that provably never reached the model (the connection was refused) is held again.

Run as ``python -m servers.holdproxy`` (listens on ``$HOST:$PORT``). ``/healthz`` is the proxy's
own probe; ``/holdz`` reports its state as JSON; ``/metrics`` its metrics.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import ClientResponse, ClientSession, ClientTimeout, TCPConnector, client_exceptions, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

log = logging.getLogger("holdproxy")
HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
       "transfer-encoding", "upgrade", "host", "content-length"}
READY_PATH = {"vllm": "/v1/models", "sglang": "/v1/models", "tgi": "/health"}
# Who probes or scrapes rather than asks for the model: answered here, never demand.
PROBE_AGENTS = {"kube-probe/": "kube-probe", "GoogleHC/": "GoogleHC", "Prometheus/": "Prometheus"}
OWN_PATHS = ("/healthz", "/metrics")
DEFAULT_MAX_QUEUE_BYTES = 128 * 2**20  # half the manifest's 256 Mi memory limit (manifests/park.py)
# A held streaming request gets an SSE comment this often: well inside clients' read timeouts (the openai
# client's default is 600 s, many set 30-60 s) and a proxy's idle timeout.
DEFAULT_KEEPALIVE_S = 5.0


def wants_stream(request: web.Request, body: bytes) -> bool:
    """An OpenAI-style streamed generation: a JSON body with ``"stream": true``."""
    if request.method != "POST" or b"stream" not in body:
        return False
    try:
        return json.loads(body).get("stream") is True
    except (ValueError, AttributeError):
        return False


@dataclass
class Config:
    model: str
    engine: str
    upstream: str
    max_queue: int
    timeout_s: float
    retry_after_s: int
    event: str
    resource_id: str
    spec: str
    prefect_api_url: str | None
    prefect_api_key: str | None
    prefect_api_auth_string: str | None = None  # a self-hosted server's PREFECT_SERVER_API_AUTH_STRING
    poll_s: float = 0.2
    max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES
    keepalive_s: float = DEFAULT_KEEPALIVE_S

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Config:
        e = dict(os.environ if env is None else env)
        service = e.get("HOLD_UPSTREAM_SERVICE", "")
        key = re.sub(r"[^A-Z0-9]", "_", service.upper())
        if e.get("HOLD_UPSTREAM_URL"):
            upstream = e["HOLD_UPSTREAM_URL"].rstrip("/")
        elif e.get(f"{key}_SERVICE_HOST"):
            upstream = f"http://{e[f'{key}_SERVICE_HOST']}:{e.get(f'{key}_SERVICE_PORT', '80')}"
        else:
            ns = e.get("HOLD_NAMESPACE", "default")
            upstream = f"http://{service}.{ns}.svc.cluster.local:{e.get('HOLD_UPSTREAM_PORT', '80')}"
        return cls(model=e.get("HOLD_MODEL", service), engine=e.get("HOLD_ENGINE", "vllm"), upstream=upstream,
                   max_queue=int(e.get("HOLD_MAX_QUEUE", "10000")), timeout_s=float(e.get("HOLD_TIMEOUT_S", "300")),
                   retry_after_s=int(e.get("HOLD_RETRY_AFTER_S", "30")),
                   event=e.get("HOLD_EVENT", "llm-fleet.model.wake-requested"),
                   resource_id=e.get("HOLD_RESOURCE_ID", f"llm-fleet.model.{service}"),
                   spec=e.get("HOLD_SPEC", ""), prefect_api_url=(e.get("PREFECT_API_URL") or "").rstrip("/") or None,
                   prefect_api_key=e.get("PREFECT_API_KEY") or None,
                   prefect_api_auth_string=e.get("PREFECT_API_AUTH_STRING") or None,
                   poll_s=float(e.get("HOLD_POLL_S", "0.2")),
                   max_queue_bytes=int(e.get("HOLD_MAX_QUEUE_BYTES", str(DEFAULT_MAX_QUEUE_BYTES))),
                   keepalive_s=float(e.get("HOLD_KEEPALIVE_S", str(DEFAULT_KEEPALIVE_S))))


@dataclass
class State:
    awake: bool = False  # the model answered at the last check
    held: int = 0
    held_bytes: int = 0  # bodies of the requests held now
    wake_requested_at: float | None = None
    events_sent: int = 0
    forwarded: int = 0
    rejected: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    poller: asyncio.Task | None = None


def prefect_auth_headers(cfg: Config) -> dict[str, str]:
    """What Prefect's own client sends (prefect.client.orchestration): the server's basic auth string
    (self-hosted, PREFECT_SERVER_API_AUTH_STRING) first, else Prefect Cloud's API key as a bearer token."""
    if cfg.prefect_api_auth_string:
        return {"Authorization": "Basic " + base64.b64encode(cfg.prefect_api_auth_string.encode()).decode()}
    if cfg.prefect_api_key:
        return {"Authorization": f"Bearer {cfg.prefect_api_key}"}
    return {}


def probe_kind(request: web.Request) -> str | None:
    """Which non-demand traffic this is (a probe or scrape by user agent, or the proxy's own paths), or None."""
    agent = request.headers.get("User-Agent", "")
    for prefix, kind in PROBE_AGENTS.items():
        if agent.startswith(prefix):
            return kind
    return "own" if request.path in OWN_PATHS else None


class Metrics:
    """The proxy's own Prometheus metrics (a registry per proxy, so tests can run several)."""

    def __init__(self, state: State) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.held = Counter("llm_fleet_hold_requests_held", "Requests that waited for the model", registry=r)
        self.forwarded = Counter("llm_fleet_hold_requests_forwarded", "Requests forwarded to the model", registry=r)
        self.rejected = Counter("llm_fleet_hold_requests_rejected", "Requests answered 503 with Retry-After",
                                ["reason"], registry=r)
        self.wakes = Counter("llm_fleet_hold_wake_requests", "Wake events posted to Prefect", registry=r)
        self.probes = Counter("llm_fleet_hold_probe_requests", "Probes and scrapes answered by the proxy itself",
                              ["agent"], registry=r)
        Gauge("llm_fleet_hold_requests_waiting", "Requests held now", registry=r).set_function(lambda: state.held)
        Gauge("llm_fleet_hold_queue_bytes", "Bytes of the request bodies held now",
              registry=r).set_function(lambda: state.held_bytes)
        Gauge("llm_fleet_hold_model_answering", "1 when the model answered at the last check",
              registry=r).set_function(lambda: float(state.awake))
        Gauge("llm_fleet_hold_wake_pending", "1 while a wake was asked for and the model does not answer yet",
              registry=r).set_function(lambda: float(state.wake_requested_at is not None))


class HoldProxy:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.state = State()
        self.http: ClientSession | None = None
        self.metrics = Metrics(self.state)

    # ---- the model's readiness -------------------------------------------------------------
    async def answers(self) -> bool:
        assert self.http is not None
        try:
            async with self.http.get(self.cfg.upstream + READY_PATH.get(self.cfg.engine, "/health"),
                                     timeout=ClientTimeout(total=5)) as resp:
                await resp.read()
                return resp.status == 200
        except (TimeoutError, client_exceptions.ClientError, OSError):
            return False

    async def _poll(self) -> None:
        """While requests are held: check the model every poll_s; release them when it answers."""
        st = self.state
        while not await self.answers():
            if st.wake_requested_at is not None and time.monotonic() - st.wake_requested_at > self.cfg.timeout_s:
                st.wake_requested_at = None  # that wake never came (failed run?): ask again
            await self.request_wake()  # once per parked spell (a no-op while one is pending)
            await asyncio.sleep(self.cfg.poll_s)
        st.awake = True
        st.wake_requested_at = None
        st.ready.set()
        log.info("%s answers again: forwarding %d held request(s)", self.cfg.model, st.held)

    def _ensure_poller(self) -> None:
        st = self.state
        if st.poller is None or st.poller.done():
            st.ready = asyncio.Event()
            st.poller = asyncio.create_task(self._poll())

    # ---- asking for a wake, once ------------------------------------------------------------
    async def request_wake(self) -> None:
        st, cfg = self.state, self.cfg
        if st.wake_requested_at is not None:
            return
        st.wake_requested_at = time.monotonic()
        if not cfg.prefect_api_url:
            log.warning("PREFECT_API_URL is not set: cannot ask for a wake of %s", cfg.model)
            return
        event = {"id": str(uuid.uuid4()), "occurred": datetime.now(UTC).isoformat(), "event": cfg.event,
                 "resource": {"prefect.resource.id": cfg.resource_id, "prefect.resource.name": cfg.model},
                 "related": [], "payload": {"spec": cfg.spec, "model": cfg.model, "held": st.held}}
        headers = prefect_auth_headers(cfg)
        assert self.http is not None
        for attempt in range(5):  # the event is the only way out of the hold: retry a flaky API
            try:
                async with self.http.post(f"{cfg.prefect_api_url}/events", json=[event], headers=headers,
                                          timeout=ClientTimeout(total=10)) as resp:
                    await resp.read()
                    if resp.status < 300:
                        st.events_sent += 1
                        self.metrics.wakes.inc()
                        log.info("asked for a wake of %s (%s)", cfg.model, cfg.event)
                        return
                    if resp.status in (401, 403):  # not transient: say what to fix; asked again after hold.timeout
                        log.error("the Prefect API refused the wake event (%s): give the hold proxy "
                                  "PREFECT_API_AUTH_STRING or PREFECT_API_KEY (the llm-fleet-prefect-auth Secret)",
                                  resp.status)
                        return
                    log.warning("Prefect API answered %s to the wake event", resp.status)
            except (TimeoutError, client_exceptions.ClientError, OSError) as exc:
                log.warning("could not post the wake event (%s)", exc)
            await asyncio.sleep(min(10.0, 0.5 * 2 ** attempt))
        st.wake_requested_at = None  # let the next held request try again

    # ---- requests ---------------------------------------------------------------------------
    def busy(self, why: str, *, reason: str = "timeout") -> web.Response:
        self.state.rejected += 1
        self.metrics.rejected.labels(reason=reason).inc()
        body = {"error": {"message": f"{self.cfg.model} is waking up: {why}", "type": "model_waking",
                          "code": 503}}
        return web.json_response(body, status=503, headers={"Retry-After": str(self.cfg.retry_after_s)})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        st, cfg = self.state, self.cfg
        kind = probe_kind(request)
        if kind is not None:  # never demand: answered now, nothing held, no wake
            return await self.answer_probe(request, kind)
        body = await request.read()
        if not st.awake and wants_stream(request, body):
            return await self.hold_stream(request, body)
        deadline = time.monotonic() + cfg.timeout_s
        while True:
            if not st.awake:
                if st.held >= cfg.max_queue:
                    return self.busy(f"{st.held} requests already held (hold.max_queue)", reason="queue_full")
                if st.held_bytes + len(body) > cfg.max_queue_bytes:
                    return self.busy(f"{st.held_bytes} bytes already held (HOLD_MAX_QUEUE_BYTES "
                                     f"{cfg.max_queue_bytes})", reason="queue_bytes")
                st.held += 1
                st.held_bytes += len(body)
                self.metrics.held.inc()
                try:
                    self._ensure_poller()
                    try:
                        await asyncio.wait_for(st.ready.wait(), timeout=max(0.0, deadline - time.monotonic()))
                    except TimeoutError:
                        return self.busy(f"not answering after {cfg.timeout_s:g} s (hold.timeout)")
                finally:
                    st.held -= 1
                    st.held_bytes -= len(body)
            result = await self.forward(request, body)
            if result is not None:
                return result
            st.awake = False  # the model stopped answering (parked again): hold this one too
            if time.monotonic() >= deadline:
                return self.busy(f"not answering after {cfg.timeout_s:g} s (hold.timeout)")

    async def hold_stream(self, request: web.Request, body: bytes) -> web.StreamResponse:
        """A streaming client of a parked model: the SSE response starts now, an SSE comment (``: waking <model>,
        <n> s``, which SSE clients skip) every ``keepalive_s`` keeps its connection and read timeout alive
        while the model wakes, then the model's own stream follows in the same response (kedacore/http-add-on
        #1592). What cannot be a status any more (hold timeout, a full queue, a dropped model) ends the stream
        with an OpenAI-style ``error`` event, which the openai client raises as an APIError."""
        st, cfg = self.state, self.cfg
        if st.held >= cfg.max_queue:
            return self.busy(f"{st.held} requests already held (hold.max_queue)", reason="queue_full")
        if st.held_bytes + len(body) > cfg.max_queue_bytes:
            return self.busy(f"{st.held_bytes} bytes already held (HOLD_MAX_QUEUE_BYTES {cfg.max_queue_bytes})",
                             reason="queue_bytes")
        out = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                                      "X-Accel-Buffering": "no"})
        await out.prepare(request)
        started = time.monotonic()
        deadline = started + cfg.timeout_s
        st.held += 1
        st.held_bytes += len(body)
        self.metrics.held.inc()
        try:
            while True:
                self._ensure_poller()
                await out.write(f": waking {cfg.model}, {time.monotonic() - started:.0f} s\n\n".encode())
                left = deadline - time.monotonic()
                if left <= 0:
                    return await self._stream_error(out, f"not answering after {cfg.timeout_s:g} s (hold.timeout)")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(st.ready.wait(), timeout=min(cfg.keepalive_s, left))
                if st.ready.is_set() and st.awake:
                    if await self._forward_into(out, request, body):
                        return out
                    st.awake = False  # parked again before it answered: keep holding
        except ConnectionResetError:  # the client went away while held
            return out
        finally:
            st.held -= 1
            st.held_bytes -= len(body)

    async def _stream_error(self, out: web.StreamResponse, why: str, *, reason: str = "timeout") -> web.StreamResponse:
        self.state.rejected += 1
        self.metrics.rejected.labels(reason=reason).inc()
        error = {"error": {"message": f"{self.cfg.model} is waking up: {why}", "type": "model_waking", "code": 503}}
        await out.write(f"event: error\ndata: {json.dumps(error)}\n\n".encode())
        await out.write_eof()
        return out

    async def _forward_into(self, out: web.StreamResponse, request: web.Request, body: bytes) -> bool:
        """The model's answer into a response already started; False if the model is not there after all."""
        assert self.http is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        try:
            upstream = await self.http.request(request.method, self.cfg.upstream + request.rel_url.path_qs,
                                               data=body, headers=headers,
                                               timeout=ClientTimeout(total=None, sock_connect=5))
        except (client_exceptions.ClientConnectorError, client_exceptions.ConnectionTimeoutError):
            return False  # never reached the model: holding it again is safe
        except (client_exceptions.ClientError, OSError):
            await self._stream_error(out, "the connection to the model dropped after the request was sent; it was "
                                     "not re-sent (it may have run)", reason="upstream_dropped")
            return True
        async with upstream:
            if upstream.status == 503 and "Retry-After" not in upstream.headers:
                await upstream.read()
                return False
            if upstream.status != 200:  # the status line is gone: the model's error as an error event
                text = (await upstream.read()).decode(errors="replace")
                await self._stream_error(out, f"the model answered {upstream.status}: {text[:500]}", reason="upstream")
                return True
            out.force_close()  # closed after this stream, as forward() does (already started: no header)
            await self._pump(upstream, out, held=True)
            return True

    async def _pump(self, upstream: ClientResponse, out: web.StreamResponse, *, held: bool = False) -> None:
        """The model's answer to the client as it comes, then counted as forwarded (both answer paths): the
        model had the request whether or not its client stayed to the end. A client that stops reading at
        ``data: [DONE]`` (the openai client does) may close before the proxy ends the response; ending it
        then raised, and the forward went uncounted. A held stream the model drops mid-answer ends with an
        ``error`` event, as a hold timeout does: ended plainly, a cut answer read as a whole one (an empty one
        as done)."""
        try:
            try:
                async for chunk in upstream.content.iter_any():
                    try:
                        await out.write(chunk)
                    except ConnectionResetError:  # the client left mid-answer: nothing more to send it
                        return
            except (TimeoutError, client_exceptions.ClientError):
                log.warning("the model dropped a response mid-stream")
                if held:
                    with contextlib.suppress(ConnectionResetError):
                        await self._stream_error(out, "the model dropped its answer mid-stream; it was not re-sent "
                                                 "(it ran)", reason="upstream_dropped")
                    return
            with contextlib.suppress(ConnectionResetError):  # the client has closed: nothing left to end
                await out.write_eof()
        finally:
            self.state.forwarded += 1
            self.metrics.forwarded.inc()

    async def forward(self, request: web.Request, body: bytes) -> web.StreamResponse | None:
        """Send to the model and stream the answer back; None if it is not there (connect error, 503)."""
        assert self.http is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        url = self.cfg.upstream + request.rel_url.path_qs
        try:
            upstream = await self.http.request(request.method, url, data=body or None, headers=headers,
                                               timeout=ClientTimeout(total=None, sock_connect=5))
        except (client_exceptions.ClientConnectorError, client_exceptions.ConnectionTimeoutError):
            return None  # the connection was never made: the model never saw it, holding it again is safe
        except (client_exceptions.ClientError, OSError) as exc:
            # Sent, then the connection dropped: the model may be generating it. Never send it twice.
            log.warning("the model dropped the connection after the request was sent (%s): not re-sent", exc)
            return self.busy("the connection to the model dropped after the request was sent; it was not re-sent "
                             "(it may have run)", reason="upstream_dropped")
        async with upstream:
            if upstream.status == 503 and "Retry-After" not in upstream.headers:
                await upstream.read()
                return None  # nothing behind the Service (yet): the model has not answered
            out = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                     headers={k: v for k, v in upstream.headers.items() if k.lower() not in HOP})
            # The model answers again: this client's next request should open a new connection, which the
            # Service routes to the model once the wake has switched it (kube-proxy keeps a connection on the
            # pod it first reached). So no client is left here when the proxy is scaled to 0 — closing idle
            # keep-alive connections at SIGTERM races a client sending on one.
            out.force_close()
            await out.prepare(request)
            await self._pump(upstream, out)
            return out

    async def answer_probe(self, request: web.Request, kind: str) -> web.Response:
        """A probe or scrape: the proxy's own health (``200 ok``) or its metrics (``/metrics`` or a scrape)."""
        self.metrics.probes.labels(agent=kind).inc()
        if request.path == "/metrics" or kind == "Prometheus":
            return web.Response(body=generate_latest(self.metrics.registry),
                                headers={"Content-Type": CONTENT_TYPE_LATEST})
        return web.Response(text="ok\n")

    async def metrics_page(self, request: web.Request) -> web.Response:
        return await self.answer_probe(request, probe_kind(request) or "own")

    async def healthz(self, request: web.Request) -> web.Response:
        return await self.answer_probe(request, probe_kind(request) or "own")

    async def holdz(self, request: web.Request) -> web.Response:
        st = self.state
        return web.json_response({"model": self.cfg.model, "awake": st.awake, "held": st.held,
                                  "wake_requested": st.wake_requested_at is not None, "events_sent": st.events_sent,
                                  "forwarded": st.forwarded, "rejected": st.rejected,
                                  "upstream": self.cfg.upstream})

    # ---- app --------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/holdz", self.holdz)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_route("*", "/{tail:.*}", self.handle)

        async def open_client(app: web.Application) -> None:
            self.http = ClientSession(connector=TCPConnector(limit=0), auto_decompress=False)

        async def close_client(app: web.Application) -> None:
            if self.http is not None:
                await self.http.close()
            if self.state.poller is not None:
                self.state.poller.cancel()
                with contextlib.suppress(BaseException):
                    await self.state.poller

        app.on_startup.append(open_client)
        app.on_cleanup.append(close_client)
        return app


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s holdproxy: %(message)s")
    cfg = Config.from_env()
    log.info("holding requests for %s (queue %d, timeout %gs), upstream %s", cfg.model, cfg.max_queue,
             cfg.timeout_s, cfg.upstream)
    web.run_app(HoldProxy(cfg).app(), host=os.environ.get("HOST", "0.0.0.0"), port=int(os.environ.get("PORT", "8080")),
                print=None, access_log=None, shutdown_timeout=cfg.timeout_s)


if __name__ == "__main__":
    main()
