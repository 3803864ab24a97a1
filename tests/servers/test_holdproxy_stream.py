"""A streaming client of a parked model, through the hold proxy, with the real ``openai`` client: the response
starts at once, SSE comments keep the connection (and the client's read timeout) alive while the model
wakes, then the model's own stream follows. The model is the sandbox's vLLM engine, loading (``/v1/models``
answers 503 until its weights are in: the wake)."""

from __future__ import annotations

import contextlib
import time
from http.server import BaseHTTPRequestHandler

import httpx
import pytest

from sandbox.core import Clock, Faults, PromptHTTPServer
from sandbox.engines import ModelRuntime
from sandbox.hub import Hub
from tests.lazy import lazy
from tests.sandbox.kube_support import wait_for
from tests.servers.test_holdproxy import _proxy, recorder  # noqa: F401 - the Prefect stand-in fixture

openai = lazy("openai")  # in the worker that runs these tests only (tests/lazy.py)

MODEL = "google/gemma-2-2b-it"


def _waking_model(load_s: float):
    """A vLLM pod that just started: up, loading for ``load_s`` real seconds."""
    faults = Faults()
    runtime = ModelRuntime(clock=Clock(1.0), faults=faults, hub=Hub(faults=faults))
    runtime.behaviors.add(mode="ok", load_seconds=load_s, tokens_per_s=200.0)
    pod = {"metadata": {"name": "m-0", "namespace": "default", "uid": "u-m-0"},
           "spec": {"nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
                    "containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.10.2", "args": [f"--model={MODEL}"],
                                    "ports": [{"containerPort": 8000}],
                                    "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}
    return runtime, runtime.start(pod)


def _warm_openai() -> None:
    """The openai client's first request works out its platform headers (~1-2 s here): done before timing."""
    with pytest.raises(openai.APIConnectionError):
        openai.OpenAI(base_url="http://127.0.0.1:9/v1", api_key="x", max_retries=0).models.list()


def _stream_through(url: str, *, read_timeout: float) -> tuple[float, str, float]:
    """(seconds to the first bytes, the streamed text, seconds to the end) with the openai client."""
    _warm_openai()
    raw = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0,
                        timeout=httpx.Timeout(read_timeout, connect=5.0))
    t0 = time.monotonic()
    with raw.chat.completions.with_streaming_response.create(
            model=MODEL, messages=[{"role": "user", "content": "What is Kubernetes?"}], max_tokens=20,
            stream=True) as resp:
        first = time.monotonic() - t0  # headers are back: the proxy answered at once
        text = ""
        for chunk in resp.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
    return first, text, time.monotonic() - t0


def _keepalives_within(url: str, seconds: float) -> list[str]:
    """The SSE comments a raw reader sees in its first ``seconds``."""
    seen: list[str] = []
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=httpx.Timeout(seconds + 5),
                      json={"model": MODEL, "stream": True, "max_tokens": 5,
                            "messages": [{"role": "user", "content": "hi"}]}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        t0 = time.monotonic()
        for line in resp.iter_lines():
            if line.startswith(":"):
                seen.append(line)
            if time.monotonic() - t0 > seconds or line.startswith("data:"):
                break
    return seen


def test_non_streaming_requests_are_held_as_before(recorder):  # noqa: F811
    runtime, server = _waking_model(load_s=1.5)
    try:
        url, _ = _proxy(recorder, upstream=server.url, timeout_s=30.0, keepalive_s=0.5)
        t0 = time.monotonic()
        resp = httpx.post(url + "/v1/chat/completions", timeout=20, json={
            "model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"]
        assert time.monotonic() - t0 >= 1.0  # held until the model answered, one plain JSON answer
    finally:
        runtime.stop()


def test_hold_timeout_ends_the_stream_with_an_error_the_client_raises(recorder):  # noqa: F811
    runtime, server = _waking_model(load_s=60.0)
    try:
        url, proxy = _proxy(recorder, upstream=server.url, timeout_s=1.5, keepalive_s=0.5)
        with pytest.raises(openai.APIError, match="m is waking up: not answering after 1.5 s"):
            _stream_through(url, read_timeout=5.0)
        assert proxy.state.rejected == 1
    finally:
        runtime.stop()


@pytest.mark.long
def test_thirty_second_read_timeout_survives_a_forty_second_wake(recorder):  # noqa: F811
    """The issue's figures: keep-alive bytes within 5 s, the full stream after the wake, a 30 s read timeout.
    Without the keep-alive (the proxy sent nothing until the model answered) the client's read times out.

    The promise's only test: a 2 s-read-timeout copy of it (0.5 s keep-alive) flaked beside a loaded worker,
    because client, proxy and model share one process here and a 1.5 s stall of it is a missed keep-alive on
    the wall clock; at the real figures (5 s keep-alive, 30 s read timeout) that margin is 25 s."""
    _warm_openai()  # its import and first request before the 40 s start, not out of them (took >= 38 below)
    runtime, server = _waking_model(load_s=40.0)
    try:
        url, proxy = _proxy(recorder, upstream=server.url, timeout_s=120.0)  # the default keep-alive interval
        comments = _keepalives_within(url, 0.0)  # a raw reader: the first line is the comment, sent at once
        assert comments and comments[0].startswith(": waking m, 0 s"), comments
        first, text, took = _stream_through(url, read_timeout=30.0)
        assert first < 5.0 and took >= 38.0 and text.strip()
        # the proxy counts a forward after its last write, and the early-closed raw reader leaves the hold at
        # its next poll: both may trail the client's last read by a moment
        deadline = time.monotonic() + 10
        while not (proxy.state.forwarded >= 1 and proxy.state.held == 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proxy.state.forwarded >= 1 and proxy.state.held == 0, proxy.state
    finally:
        runtime.stop()


class _ModelThatEndsLate(BaseHTTPRequestHandler):
    """A model whose stream sends ``data: [DONE]`` and ends its body half a second later: a client that stops
    reading at ``[DONE]`` (the openai client does) has closed its connection before the proxy's last write."""

    protocol_version = "HTTP/1.0"  # the body ends when the connection closes

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"object": "list", "data": [{"id": "m"}]}')

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self.wfile.write(b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\ndata: [DONE]\n\n')
        self.wfile.flush()
        time.sleep(0.5)

    def log_message(self, *args) -> None:
        pass


def test_a_client_that_leaves_at_done_is_counted_as_forwarded(recorder):  # noqa: F811
    """Held (the first request, a stream to a parked proxy) or not (the second), an answered stream is a
    forward, though its client closed at ``[DONE]`` before the proxy ended the response. Before, the proxy's
    end of the response raised on the closed connection and the forward went uncounted (a CI run's held
    stream: the client had its whole answer, the proxy said forwarded=0)."""
    model = PromptHTTPServer(("127.0.0.1", 0), _ModelThatEndsLate)
    model.start_serving("model-that-ends-late")
    try:
        url, proxy = _proxy(recorder, upstream=f"http://127.0.0.1:{model.server_address[1]}")
        for _ in range(2):
            lines = []
            with httpx.stream("POST", url + "/v1/chat/completions", timeout=10,
                              json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
                              ) as resp:
                for line in resp.iter_lines():
                    lines.append(line)
                    if line == "data: [DONE]":
                        break  # and close, as the openai client does
            assert resp.status_code == 200 and any("hi" in line for line in lines), lines
        with contextlib.suppress(AssertionError):  # the count follows the proxy's last write: a moment later
            wait_for(lambda: proxy.state.forwarded >= 2, timeout=5)
        assert proxy.state.forwarded == 2 and proxy.state.held == 0, proxy.state
    finally:
        model.shutdown()
