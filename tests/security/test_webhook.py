"""Attacks on the Hub webhook receiver (servers/webhook.py), each refused with nothing announced.

Raw sockets where the attack is in the framing (negative or missing Content-Length, a 5 MB chunked
body, slow clients); the sandbox Hub for replayed and older pushes. ``handle`` is where anything would
be announced: a spy on it proves a refused request never got that far.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import httpx
import pytest

import servers.webhook as webhook
from sandbox.core import Faults
from sandbox.hub import Hub

SECRET = "s3cret-for-the-attack-tests"
MODEL = "Qwen/Qwen2.5-7B-Instruct"


@pytest.fixture
def handled(monkeypatch):
    """Every payload that reached ``handle`` (the only code that announces anything)."""
    seen: list = []
    monkeypatch.setattr(webhook, "handle", lambda payload, specs: seen.append(payload) or {"ignored": "spy"})
    return seen


@pytest.fixture
def receiver(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\n")
    server = webhook.make_server(secret=SECRET, specs=[str(spec)], read_timeout=0.5)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _wait_up(server)
    yield server
    server.shutdown()
    server.server_close()


def _wait_up(server) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            httpx.get(f"http://{server.server_address[0]}:{server.server_address[1]}/healthz", timeout=1)
            return
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the receiver did not start"
            time.sleep(0.02)


def _connect(server) -> socket.socket:
    return socket.create_connection(server.server_address, timeout=5)


def _head(extra: str = "", *, secret: str = SECRET) -> bytes:
    return (f"POST {webhook.PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"X-Webhook-Secret: {secret}\r\n{extra}\r\n").encode()


def _status(sock: socket.socket) -> tuple[int, bytes]:
    """The answer's status and its raw head and body: the body read to its Content-Length (uvicorn writes
    the head and the body separately, so one recv can return the head alone), or to the server's close."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    assert data, "the receiver closed without an answer"
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    while length is not None and len(body) < int(length.group(1)):
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            break
        if not chunk:
            break
        body += chunk
    return int(data.split(b" ", 2)[1]), head + b"\r\n\r\n" + body


def _closed(sock: socket.socket, within: float = 5.0) -> bool:
    """The server closed the connection (recv reads EOF or a reset) within ``within`` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def payload(sha: str, branch: str = "main") -> dict:
    return {"event": {"action": "update", "scope": "repo.content"},
            "repo": {"type": "model", "name": MODEL, "headSha": sha},
            "updatedRefs": [{"ref": f"refs/heads/{branch}", "oldSha": "e" * 40, "newSha": sha}]}


def test_negative_content_length_is_a_400_before_any_read(receiver, handled):
    with _connect(receiver) as s:
        s.sendall(_head("Content-Length: -1\r\n") + b"{}" * 1000)
        status, _ = _status(s)
        assert status == 400 and _closed(s)
    assert handled == []


def test_missing_content_length_means_no_body_and_the_rest_is_not_read(receiver, handled):
    body = json.dumps(payload("a" * 40)).encode()
    with _connect(receiver) as s:
        s.sendall(_head() + body)  # neither Content-Length nor chunked: HTTP/1.1 says no body
        status, raw = _status(s)
        assert status == 400 and b"not a Hub webhook payload" in raw
        assert _closed(s)  # the unframed bytes after it are not taken as a next request
    assert handled == []


def test_five_megabyte_chunked_body_is_refused_413(receiver, handled):
    with _connect(receiver) as s:
        s.sendall(_head("Transfer-Encoding: chunked\r\n"))
        chunk = b"x" * 65536
        sent = 0
        try:
            while sent < 5 * 2**20:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the receiver stopped reading and closed: the rest was never buffered
        status, raw = _status(s)
        assert status == 413, raw
    assert handled == []
    assert sent <= 5 * 2**20


def test_declared_oversize_body_is_refused_before_it_is_sent(receiver, handled):
    with _connect(receiver) as s:
        s.sendall(_head(f"Content-Length: {5 * 2**20}\r\n"))
        status, _ = _status(s)
        assert status == 413 and _closed(s)
    assert handled == []


def test_secret_only_in_the_header_and_never_in_the_answer(receiver, handled):
    body = payload("a" * 40)
    for url, headers in [(f"{receiver.url}?secret={SECRET}", {}), (receiver.url, {"Authorization": f"Bearer {SECRET}"}),
                         (receiver.url, {"X-Webhook-Secret": SECRET[:-1]}), (receiver.url, {})]:
        resp = httpx.post(url, json=body, headers=headers, timeout=5)
        assert resp.status_code == 401 and SECRET not in resp.text
    assert handled == []
    assert httpx.post(receiver.url, json=body, headers={"X-Webhook-Secret": SECRET}, timeout=5).status_code == 200
    assert len(handled) == 1


def test_an_error_is_answered_without_internals(receiver, monkeypatch):
    def boom(payload, specs):
        raise RuntimeError("token hf_internal at /opt/llm-fleet/tasks/hf.py line 42")

    monkeypatch.setattr(webhook, "handle", boom)
    resp = httpx.post(receiver.url, json=payload("a" * 40), headers={"X-Webhook-Secret": SECRET}, timeout=5)
    assert resp.status_code == 500
    assert "hf_internal" not in resp.text and "RuntimeError" not in resp.text and "/opt" not in resp.text
    assert set(resp.json()) == {"error", "id"}


def test_fifty_slow_clients_do_not_starve_a_webhook_call(receiver, handled):
    """Slowloris: 50 connections that send half a head, then a byte now and then. A real call is still
    answered at once (asyncio: a slow client costs a coroutine, not a worker), and each slow one is cut off
    after the read timeout (0.5 s here)."""
    slow = []
    for _ in range(50):
        s = _connect(receiver)
        s.sendall(b"POST " + webhook.PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n")
        slow.append(s)
    for s in slow:
        s.sendall(b"X-Slow: 1\r\n")
    t0 = time.monotonic()
    resp = httpx.post(receiver.url, json=payload("a" * 40), headers={"X-Webhook-Secret": SECRET}, timeout=5)
    elapsed = time.monotonic() - t0
    assert resp.status_code == 200 and len(handled) == 1
    assert elapsed < 1.0, f"a webhook call took {elapsed:.2f} s behind 50 slow clients"
    # ... and the slow ones are dropped, not kept forever.
    assert all(_closed(s, within=5) for s in slow)
    for s in slow:
        s.close()


def test_slow_body_is_cut_off_408(receiver, handled):
    with _connect(receiver) as s:
        s.sendall(_head("Content-Length: 100\r\n") + b"{")
        status, _ = _status(s)
        assert status == 408 and _closed(s)
    assert handled == []


# ---- replayed and older pushes: the Hub decides, not the payload -----------------------------------

@pytest.fixture
def hub(monkeypatch):
    h = Hub(faults=Faults())
    h.start()
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    monkeypatch.setenv("HF_TOKEN", "hf_sandbox_read")
    from tasks.settings import reload_settings

    reload_settings()
    yield h
    h.stop()
    monkeypatch.undo()
    reload_settings()


def test_replayed_or_older_push_announces_nothing(hub, tmp_path, monkeypatch):
    import yaml

    from tests.flows.conftest import spec_dict

    announced: list = []
    monkeypatch.setattr("flows.watch_revisions.announce_revision",
                        lambda spec, **kw: announced.append(kw) or "event-id")
    spec = tmp_path / "spec.yaml"
    data = spec_dict("qwen2.5-7b-sglang.yaml")
    data["model"] = {"id": MODEL, "revision": "track"}
    spec.write_text(yaml.safe_dump(data))
    old = hub.push_revision(MODEL, "track")
    new = hub.push_revision(MODEL, "track")
    other = hub.push_revision(MODEL, "elsewhere")

    def handle(sha: str) -> dict:
        return webhook.handle(webhook.HubPayload.model_validate(payload(sha, "track")), [str(spec)])

    # A replay of the earlier push, a commit from another branch, a made-up commit, a non-commit: ignored.
    for sha in (old, other, "c" * 40, "main"):
        (row,) = handle(sha)["announced"]
        assert row["status"].startswith("ignored"), row
    assert announced == []
    # The branch's head now: announced.
    (row,) = handle(new)["announced"]
    assert row["status"] == "announced" and [a["revision"] for a in announced] == [new]
