"""The hold proxy against stand-ins for the model and Prefect: probes and scrapes are answered by the proxy and
never ask for a wake; a request the model may have received is never sent twice; the queue is bounded in bytes."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler

import httpx
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from sandbox.core import PromptHTTPServer, free_port
from servers.holdproxy import Config, HoldProxy
from tests.sandbox.kube_support import wait_for


class _Recorder(BaseHTTPRequestHandler):
    """Prefect's ``POST /events`` and a model that answers ``/v1/models`` but drops every generation after
    reading it (a pod killed mid-request)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append((self.path, body))  # type: ignore[attr-defined]
        if self.path == "/events":
            self.send_response(204)
            self.end_headers()
            return
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)  # no answer: the request reached the model, then it died

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def recorder():
    srv = PromptHTTPServer(("127.0.0.1", 0), _Recorder)
    srv.seen = []  # type: ignore[attr-defined]
    srv.start_serving("prefect-api")
    yield srv
    srv.shutdown()


def _serve(app: web.Application) -> str:
    """An aiohttp app on a loop of its own in a daemon thread; its base URL."""
    port = free_port()
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        started.set()
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    assert started.wait(10)
    return f"http://127.0.0.1:{port}"


def _proxy(recorder, *, upstream: str, timeout_s: float = 5.0, **extra) -> tuple[str, HoldProxy]:
    base = f"http://127.0.0.1:{recorder.server_address[1]}"
    cfg = Config(model="m", engine="vllm", upstream=upstream, max_queue=100, timeout_s=timeout_s, retry_after_s=7,
                 event="llm-fleet.model.wake-requested", resource_id="llm-fleet.model.m", spec="m",
                 prefect_api_url=base, prefect_api_key=None, poll_s=0.05, **extra)
    proxy = HoldProxy(cfg)
    return _serve(proxy.app()), proxy


def _events(recorder) -> list:
    return [json.loads(b) for p, b in recorder.seen if p == "/events"]


def test_probes_and_scrapes_are_answered_at_once_and_never_ask_for_a_wake(recorder):
    """Before: a GoogleHC check or a Prometheus scrape was held like a request and asked for a wake."""
    url, _ = _proxy(recorder, upstream=f"http://127.0.0.1:{free_port()}")  # parked: nothing listens
    asks = [("/health", "GoogleHC/1.0"), ("/", "kube-probe/1.30"), ("/v1/models", "kube-probe/1.30"),
            ("/metrics", "Prometheus/2.45.3"), ("/anything", "Prometheus/2.45.3"), ("/metrics", "curl/8"),
            ("/healthz", "curl/8")]
    for path, agent in asks:
        resp = httpx.get(url + path, headers={"User-Agent": agent}, timeout=2)  # held would be a ReadTimeout
        assert resp.status_code == 200, (path, agent)
    time.sleep(0.3)
    assert _events(recorder) == []
    state = httpx.get(url + "/holdz", timeout=2).json()
    assert state["held"] == 0 and state["events_sent"] == 0 and not state["wake_requested"]
    text = httpx.get(url + "/metrics", timeout=2).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("llm_fleet_hold_wake_requests_total", ())] == 0
    assert samples[("llm_fleet_hold_requests_held_total", ())] == 0
    assert samples[("llm_fleet_hold_probe_requests_total", (("agent", "GoogleHC"),))] == 1
    assert samples[("llm_fleet_hold_probe_requests_total", (("agent", "Prometheus"),))] == 2
    assert samples[("llm_fleet_hold_probe_requests_total", (("agent", "kube-probe"),))] == 2

    # a real request is held and asks for a wake (once), and shows in the metrics
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json={"prompt": "hi"}, timeout=0.5)
    assert len(_events(recorder)) == 1
    text = httpx.get(url + "/metrics", timeout=2).text
    got = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels}
    assert got["llm_fleet_hold_requests_held_total"] == 1 and got["llm_fleet_hold_wake_requests_total"] == 1


def test_a_request_the_model_may_have_received_is_never_sent_twice(recorder):
    """Before: ServerDisconnectedError counted as 'not there', so the proxy held the request and sent it
    again (a generation ran twice, as often as the hold timeout allowed)."""
    upstream = f"http://127.0.0.1:{recorder.server_address[1]}"
    url, _ = _proxy(recorder, upstream=upstream, timeout_s=3)
    resp = httpx.post(url + "/v1/completions", json={"prompt": "once"}, timeout=10)
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "7"
    assert "not re-sent" in resp.json()["error"]["message"]
    assert [p for p, _ in recorder.seen if p == "/v1/completions"] == ["/v1/completions"]


def test_a_held_prompt_the_model_dropped_is_an_error_on_the_playground_not_an_empty_answer(recorder):
    """The playground's prompt to a parked model is held in an SSE stream; when the model then drops it, the
    hold proxy ends that stream with ``event: error``. The playground read only the pieces of ``data:`` lines,
    so the page showed an empty answer as done (a clean-clone run: 'done', 0 tokens, after a wake). Now the
    error reaches the page as an error, with the proxy's reason."""
    from servers.playground import Config as PageConfig
    from servers.playground import Playground

    url, _ = _proxy(recorder, upstream=f"http://127.0.0.1:{recorder.server_address[1]}", timeout_s=3)
    page = _serve(Playground(PageConfig(upstream=url, model="m", engine="vllm", api="chat", vision=False, base="/",
                                        namespace="default", live_service="m", deployment_prefix="m-",
                                        sa_dir="/nonexistent")).app())
    events = []
    with httpx.stream("POST", page + "/api/chat", json={"messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 8, "temperature": 0}, timeout=30) as resp:
        for block in resp.read().decode().split("\n\n"):
            lines = dict(ln.split(": ", 1) for ln in block.splitlines() if ": " in ln)
            if "event" in lines:
                events.append((lines["event"], json.loads(lines["data"])))
    assert [e for e, _ in events if e != "status"] == ["error"], events
    assert "dropped after the request was sent" in events[-1][1]["message"]
    assert [p for p, _ in recorder.seen if p == "/v1/chat/completions"] == ["/v1/chat/completions"]  # sent once


class _CutModel(_Recorder):
    """A model that answers its health check, then starts a streamed answer and dies after one piece."""

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        piece = b'data: {"choices": [{"delta": {"content": "Hel"}}]}\n\n'
        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.flush()
        time.sleep(0.2)
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)  # killed mid-answer


def test_a_held_stream_the_model_cuts_mid_answer_ends_with_an_error_event(recorder):
    """A held streaming client gets the model's answer inside the proxy's own SSE response. When the model
    died mid-answer the proxy ended that response plainly, and the client read the cut answer as a whole
    one. Now it ends with an ``error`` event after what the model had sent (failed before: no error event)."""
    model = PromptHTTPServer(("127.0.0.1", 0), _CutModel)
    model.start_serving("model")
    try:
        url, _ = _proxy(recorder, upstream=f"http://127.0.0.1:{model.server_address[1]}")
        with httpx.stream("POST", url + "/v1/chat/completions", json={"stream": True, "messages": []},
                          timeout=30) as resp:
            assert resp.status_code == 200
            text = resp.read().decode()
        assert '"Hel"' in text and "event: error" in text, text
        assert text.index('"Hel"') < text.index("event: error") and "mid-stream" in text
    finally:
        model.shutdown()


def test_the_queue_is_bounded_in_bytes(recorder):
    """Before: only a count bound (10,000 requests of up to 64 MiB each against a 256 Mi container)."""
    url, proxy = _proxy(recorder, upstream=f"http://127.0.0.1:{free_port()}", timeout_s=3, max_queue_bytes=1000)
    held = threading.Thread(target=lambda: httpx.post(url + "/v1/completions", content=b"x" * 800, timeout=10),
                            daemon=True)
    held.start()
    deadline = time.monotonic() + 5
    while proxy.state.held_bytes < 800 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proxy.state.held_bytes == 800
    resp = httpx.post(url + "/v1/completions", content=b"y" * 800, timeout=2)
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "7" and "bytes" in resp.json()["error"]["message"]
    text = httpx.get(url + "/metrics", timeout=2).text
    rejected = {s.labels.get("reason"): s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                if s.name == "llm_fleet_hold_requests_rejected_total"}
    assert rejected == {"queue_bytes": 1}
    held.join(10)


class _Model(BaseHTTPRequestHandler):
    """A model that answers every generation (keep-alive)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        self._answer(b"{}")

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer(b'{"choices": [{"text": "hello"}]}')

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_once_the_model_answers_each_client_connection_is_closed_after_its_answer(recorder):
    """kube-proxy keeps a client's connection on the pod it first reached, so after a wake the clients of the
    hold proxy keep sending to it until it closes their connections — which it did only at SIGTERM, when
    closing idle keep-alive connections races a client sending on one (seen in the campaign: 'Server
    disconnected without sending a response'). Now an answer forwarded from the model says
    ``Connection: close``: each client's next request opens a new connection, which the Service routes to the
    model. (Failed before: the answers kept the connection alive.)"""
    model = PromptHTTPServer(("127.0.0.1", 0), _Model)
    model.start_serving("model")
    try:
        url, proxy = _proxy(recorder, upstream=f"http://127.0.0.1:{model.server_address[1]}")
        with httpx.Client(base_url=url, timeout=10) as http:
            for _ in range(3):
                r = http.post("/v1/completions", json={"prompt": "hi"})
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == "hello"
                assert r.headers["connection"] == "close"
        # the proxy counts a forward after its last write, which the client may read first
        wait_for(lambda: proxy.state.forwarded >= 3, timeout=10)
        assert proxy.state.forwarded == 3
    finally:
        model.shutdown()
