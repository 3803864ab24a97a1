"""`llm-fleet webhook`: the Hugging Face Hub's repo webhooks in, ``llm-fleet.model.revision`` events out.

Register ``http(s)://<host>:<port>/webhooks/huggingface`` as a webhook on the Hub
(https://huggingface.co/settings/webhooks) with a secret; the Hub sends it verbatim in
``X-Webhook-Secret``, the only place it is accepted (a ``?secret=`` query ends up in proxies' logs).
A request without the right secret gets 401 and changes nothing. A push (``event.scope``
``repo.content``) to a branch that a spec tracks (``model.revision``) emits the same event as
``watch_revisions``, once per commit, and only when that commit is the branch's head on the Hub now
(a replayed or forged push names an old or unknown commit: ignored); the ``release_model``
deployment's trigger turns it into a release of that commit, which checks it again (tasks/trust.py).

The server is uvicorn (h11) + Starlette, hardened like Argo CD's and Flux's receivers: the secret is
checked from the headers before any body is read; the body is capped at ``MAX_BODY`` whatever its
framing (a ``Content-Length`` that is not a non-negative integer is a 400 from h11, a missing one means
no body, a chunked body is counted as it streams); each request's head and body must arrive within
``READ_TIMEOUT_S`` (slow clients are dropped, and cost a coroutine, not a thread); at most
``MAX_CONNECTIONS`` connections (503 beyond) and ``MAX_WORKERS`` handlers at once; errors are answered
without internals (the log has them, under the id the answer gives).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("llm_fleet.webhook")
PATH = "/webhooks/huggingface"
SECRET_ENV = "LLM_FLEET_WEBHOOK_SECRET"
SECRET_HEADER = "X-Webhook-Secret"
MAX_BODY = 1 << 20  # Hub payloads are a few KB
READ_TIMEOUT_S = 10.0  # for a request's head, and again for its body
MAX_CONNECTIONS = 256  # open connections (uvicorn answers 503 beyond: no unbounded fd/memory growth)
MAX_WORKERS = 8  # handlers at once (each reads the Hub and the Prefect API from a thread)


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class HubEvent(_Loose):
    action: str
    scope: str


class HubRepo(_Loose):
    type: str
    name: str
    headSha: str | None = None  # noqa: N815 - the Hub's field names


class UpdatedRef(_Loose):
    ref: str
    oldSha: str | None = None  # noqa: N815
    newSha: str | None = None  # noqa: N815


class HubPayload(_Loose):
    """The fields of the Hub's webhook payload (version 3) a release needs."""

    event: HubEvent
    repo: HubRepo
    updatedRefs: list[UpdatedRef] | None = None  # noqa: N815


def new_commit(payload: HubPayload, branch: str) -> str | None:
    """The commit ``branch`` moved to in this push, or None when the push did not move it."""
    if payload.updatedRefs is not None:
        return next((r.newSha for r in payload.updatedRefs if r.ref == f"refs/heads/{branch}" and r.newSha), None)
    return payload.repo.headSha if branch == "main" else None  # headSha is main's head


def _branch_head(model_id: str, branch: str) -> str | None:
    """The commit ``branch`` points at on the Hub now (HF_TOKEN for private repos)."""
    from tasks.clients import hf_api
    from tasks.settings import get_settings

    token = get_settings().hf_token
    refs = hf_api(token.get_secret_value() if token else None).list_repo_refs(model_id)
    return next((b.target_commit for b in refs.branches if b.name == branch), None)


def handle(payload: HubPayload, spec_paths: list[str],
           head: Callable[[str, str], str | None] = _branch_head) -> dict[str, Any]:
    """Announce the new commit for every spec tracking the pushed repo; returns what was done."""
    from flows.watch_revisions import announce_revision, spec_ref, tracked_branch
    from manifests.spec import SpecError, load_spec
    from manifests.triggers import COMMIT

    if payload.repo.type != "model" or not payload.event.scope.startswith("repo.content"):
        return {"ignored": f"{payload.repo.type} {payload.event.scope} event: only model pushes start releases"}
    results = []
    for path in spec_paths:
        try:
            spec = load_spec(path)
        except SpecError:
            continue  # watch_revisions reports broken specs; a webhook only acts on the good ones
        branch = tracked_branch(spec)
        if spec.target != "gke" or branch is None or spec.model.id.lower() != payload.repo.name.lower():
            continue
        sha = new_commit(payload, branch)
        if sha is None:
            continue
        ref = spec_ref(path)
        if not COMMIT.match(sha):
            results.append({"spec": ref, "revision": sha[:60], "status": "ignored: not a 40-hex commit"})
            continue
        # The payload is only a hint (the secret may leak, a delivery may be replayed days later): the
        # Hub decides. Only the branch's head now is announced; a replay of an older push is not.
        now = head(spec.model.id, branch)
        if now != sha:
            results.append({"spec": ref, "revision": sha, "status": f"ignored: not the head of {branch} "
                            f"on the Hub now ({(now or 'no such branch')[:12]}): an old or replayed push"})
            continue
        event_id = announce_revision(spec, spec_path=ref, revision=sha, source="hub-webhook")
        results.append({"spec": ref, "revision": sha,
                        "status": "announced" if event_id else "already announced", "event_id": event_id})
    if not results:
        return {"ignored": f"no spec tracks a branch this push to {payload.repo.name} moved"}
    return {"announced": results}


class _TooLarge(Exception):
    pass


class _DeadlineH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head (uvicorn only times out idle
    keep-alive connections, so a client sending its headers a byte at a time would stay forever)."""

    read_timeout = READ_TIMEOUT_S
    _head_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.read_timeout, self._head_expired)

    def _head_expired(self) -> None:
        # A request in flight has its own body deadline (in the app); otherwise no head came in time.
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    # Close after every refusal: an unread body must not be drained, nor parsed as a next request.
    return JSONResponse({"error": message, **extra}, status_code=status, headers={"Connection": "close"})


class WebhookServer:
    """The receiver on its own socket; ``serve_forever``/``shutdown``/``server_close`` like socketserver."""

    def __init__(self, address: tuple[str, int], *, secret: str, spec_paths: Callable[[], list[str]],
                 verbose: bool = False, read_timeout: float = READ_TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS, max_workers: int = MAX_WORKERS) -> None:
        if not secret:
            raise ValueError("a webhook secret is required: every request without it is refused")
        self.secret = secret
        self.spec_paths = spec_paths
        self.verbose = verbose
        self.read_timeout = read_timeout
        self._workers = anyio.CapacityLimiter(max_workers)
        self._sock = socket.create_server(address, backlog=max_connections)
        self.server_address = self._sock.getsockname()[:2]
        protocol = type("_Protocol", (_DeadlineH11,), {"read_timeout": read_timeout})
        app = Starlette(routes=[Route("/healthz", self._healthz, methods=["GET"]),
                                Route(PATH, self._receive, methods=["POST"])])
        config = uvicorn.Config(app, http=protocol, lifespan="off", log_config=None, access_log=False,
                                server_header=False, limit_concurrency=max_connections, backlog=max_connections,
                                timeout_keep_alive=5, timeout_graceful_shutdown=5,
                                h11_max_incomplete_event_size=16 * 1024)
        self._server = uvicorn.Server(config)
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://{host}:{port}{PATH}"

    # ---- requests -----------------------------------------------------------------------------
    async def _healthz(self, request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and int(declared) > MAX_BODY:  # h11 let only digits through
            raise _TooLarge
        body = bytearray()
        async for chunk in request.stream():  # chunked or not: counted as it arrives
            body += chunk
            if len(body) > MAX_BODY:
                raise _TooLarge
        return bytes(body)

    async def _receive(self, request: Request) -> JSONResponse:
        # Secret first, from the header only, before a byte of body is read; constant-time compare
        # (the time to refuse must not tell how much of a guess was right).
        given = request.headers.get(SECRET_HEADER, "")
        if not hmac.compare_digest(given.encode(), self.secret.encode()):
            self._log(request, 401)
            return _error(401, f"missing or wrong {SECRET_HEADER}")
        try:
            body = await asyncio.wait_for(self._read_body(request), timeout=self.read_timeout)
        except _TooLarge:
            self._log(request, 413)
            return _error(413, f"payload too large (limit {MAX_BODY} bytes)")
        except TimeoutError:
            self._log(request, 408)
            return _error(408, f"body not received within {self.read_timeout:g} s")
        except ClientDisconnect:
            return _error(400, "client disconnected")
        try:
            payload = HubPayload.model_validate_json(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            self._log(request, 400)
            return _error(400, f"not a Hub webhook payload: {first['msg']}",
                          field=".".join(map(str, first["loc"])))
        try:
            result = await anyio.to_thread.run_sync(lambda: handle(payload, self.spec_paths()),
                                                    limiter=self._workers)
        except Exception:  # a 500 lets the Hub's operator replay it; the details stay in our log
            incident = uuid.uuid4().hex[:12]
            log.exception("webhook %s failed", incident)
            return _error(500, "internal error: the receiver's log has the details", id=incident)
        self._log(request, 200)
        return JSONResponse(result)

    def _log(self, request: Request, status: int) -> None:
        if self.verbose:  # the path only: never a query (it may carry a secret someone put there)
            sys.stderr.write(f"webhook: {request.method} {request.url.path} {status}\n")

    # ---- lifecycle ----------------------------------------------------------------------------
    def serve_forever(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        self._server.should_exit = True
        self._stopped.wait(timeout=15)

    def server_close(self) -> None:
        self._sock.close()


def make_server(*, host: str = "127.0.0.1", port: int = 0, secret: str, specs: list[str] | None = None,
                verbose: bool = False, **limits: Any) -> WebhookServer:
    """The receiver; ``specs`` are spec paths (default: every spec under deployments/, re-read per request)."""
    if specs:
        paths: Callable[[], list[str]] = lambda: list(specs)  # noqa: E731
    else:
        from flows.watch_revisions import default_specs

        paths = default_specs
    return WebhookServer((host, port), secret=secret, spec_paths=paths, verbose=verbose, **limits)


def read_secret(block: str | None) -> str | None:
    """The webhook secret from a Prefect Secret block, else $LLM_FLEET_WEBHOOK_SECRET (never a CLI argument)."""
    if block:
        from prefect.blocks.system import Secret

        return str(Secret.load(block).get())
    return os.environ.get(SECRET_ENV) or None


def main(*, host: str, port: int, specs: list[Path], secret_block: str | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    secret = read_secret(secret_block)
    if not secret:
        print(f"✗ no webhook secret: set {SECRET_ENV} (or pass --secret-block NAME of a Prefect Secret block) "
              "and use the same secret in the Hub's webhook settings", file=sys.stderr)
        return 2
    server = make_server(host=host, port=port, secret=secret, specs=[str(p) for p in specs] or None, verbose=True)
    print(f"listening on {server.url} — Hub pushes to tracked branches become llm-fleet.model.revision events",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
