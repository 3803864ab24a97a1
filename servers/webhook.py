"""`llm-fleet webhook`: the Hugging Face Hub's repo webhooks in, ``llm-fleet.model.revision`` events out.

Register ``http(s)://<host>:<port>/webhooks/huggingface`` as a webhook on the Hub
(https://huggingface.co/settings/webhooks) with a secret; the Hub sends it verbatim in
``X-Webhook-Secret`` (or ``?secret=`` in the URL). A request without the right secret gets 401 and
changes nothing. A push (``event.scope`` ``repo.content``) to a branch that a spec tracks
(``model.revision``) emits the same event as ``watch_revisions``, once per commit; the
``release_model`` deployment's trigger turns it into a release of that commit.
"""

from __future__ import annotations

import hmac
import json
import os
import sys
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, ConfigDict, ValidationError

PATH = "/webhooks/huggingface"
SECRET_ENV = "LLM_FLEET_WEBHOOK_SECRET"
MAX_BODY = 1 << 20  # Hub payloads are a few KB


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


def handle(payload: HubPayload, spec_paths: list[str]) -> dict[str, Any]:
    """Announce the new commit for every spec tracking the pushed repo; returns what was done."""
    from flows.watch_revisions import announce_revision, spec_ref, tracked_branch
    from manifests.spec import SpecError, load_spec

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
        event_id = announce_revision(spec, spec_path=spec_ref(path), revision=sha, source="hub-webhook")
        results.append({"spec": spec_ref(path), "revision": sha,
                        "status": "announced" if event_id else "already announced", "event_id": event_id})
    if not results:
        return {"ignored": f"no spec tracks a branch this push to {payload.repo.name} moved"}
    return {"announced": results}


class _Handler(BaseHTTPRequestHandler):
    server: WebhookServer
    disable_nagle_algorithm = True  # else each reply stalls ~40 ms
    protocol_version = "HTTP/1.1"

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # The path only: a query may carry ?secret=, which must never reach a log.
        self.log_message("%s %s %s", self.command, urlsplit(self.path).path, code)

    def log_message(self, fmt: str, *args: Any) -> None:
        if self.server.verbose:
            sys.stderr.write("webhook: " + (fmt % args).replace(self.server.secret, "***") + "\n")

    def _reply(self, status: int, body: dict[str, Any], *, close: bool = False) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if urlsplit(self.path).path == "/healthz":
            self._reply(200, {"ok": True})
        else:
            self._reply(404, {"error": "not found"})

    def do_POST(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            return self._reply(413, {"error": "payload too large"}, close=True)
        body = self.rfile.read(length)
        if url.path != PATH:
            return self._reply(404, {"error": f"not found: webhooks go to {PATH}"})
        given = self.headers.get("X-Webhook-Secret") or (parse_qs(url.query).get("secret") or [""])[0]
        # Constant-time compare: the time to refuse must not tell how much of a guess was right.
        if not hmac.compare_digest(given.encode(), self.server.secret.encode()):
            return self._reply(401, {"error": "missing or wrong X-Webhook-Secret"})
        try:
            payload = HubPayload.model_validate_json(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            return self._reply(400, {"error": f"not a Hub webhook payload: {first['msg']}",
                                     "field": ".".join(map(str, first["loc"]))})
        try:
            result = handle(payload, self.server.spec_paths())
        except Exception as exc:  # noqa: BLE001 - the Hub shows the status; a 500 lets the operator replay it
            return self._reply(500, {"error": f"{type(exc).__name__}: {exc}"})
        self._reply(200, result)


class WebhookServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], *, secret: str, spec_paths: Callable[[], list[str]],
                 verbose: bool = False) -> None:
        if not secret:
            raise ValueError("a webhook secret is required: every request without it is refused")
        super().__init__(address, _Handler)
        self.secret = secret
        self.spec_paths = spec_paths
        self.verbose = verbose

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}{PATH}"


def make_server(*, host: str = "127.0.0.1", port: int = 0, secret: str, specs: list[str] | None = None,
                verbose: bool = False) -> WebhookServer:
    """The receiver; ``specs`` are spec paths (default: every spec under deployments/, re-read per request)."""
    from flows.watch_revisions import default_specs

    paths = (lambda: list(specs)) if specs else default_specs
    return WebhookServer((host, port), secret=secret, spec_paths=paths, verbose=verbose)


def read_secret(block: str | None) -> str | None:
    """The webhook secret from a Prefect Secret block, else $LLM_FLEET_WEBHOOK_SECRET (never a CLI argument)."""
    if block:
        from prefect.blocks.system import Secret

        return str(Secret.load(block).get())
    return os.environ.get(SECRET_ENV) or None


def main(*, host: str, port: int, specs: list[Path], secret_block: str | None) -> int:
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
