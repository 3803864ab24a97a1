"""The fault campaign's invariant checkers (bench/campaign.py) fire on a violating observation and stay quiet on
a clean one: a checker that never fires would pass every campaign run. Each is a decision on given
observations; tests/sandbox/test_campaign_checks.py drives I1/I2/I3 against a real sandbox cluster and sockets."""

from __future__ import annotations

import socket
import threading

import httpx
import pytest

from bench.campaign import COLOR_LABEL, Seen, Watch, dead_holder_problem, judge_answer, policy_problem


def _watch() -> Watch:
    return Watch("unused-kubeconfig", "default", "m", violate=None, grace_s=2.0)


# ---- I1: the live Service selects a color without Ready endpoints while not parked ----------------------

def test_i1_fires_once_after_the_grace_and_not_while_parked_or_ready():
    w = _watch()
    assert w.judge(Seen("blue", False, "t", ready=0), now=0.0) == []
    assert w.judge(Seen("blue", False, "t", ready=0), now=1.5) == []  # the endpoint controller's own lag
    found = w.judge(Seen("blue", False, "t", ready=0), now=2.5)
    assert [inv for inv, _ in found] == ["I1"] and "blue" in found[0][1]
    assert w.judge(Seen("blue", False, "t", ready=0), now=9.0) == []  # reported once per outage
    # clean: Ready endpoints, or parked (no color, or the park record), however long
    w = _watch()
    for t in range(10):
        assert w.judge(Seen("blue", False, "t", ready=2), now=float(t)) == []
        assert w.judge(Seen(None, True), now=t + 0.5) == []
    w = _watch()
    assert [w.judge(Seen("blue", True, "t", ready=0), now=float(t)) for t in range(10)] == [[]] * 10


def test_i1_an_outage_that_ends_starts_the_grace_again():
    w = _watch()
    w.judge(Seen("blue", False, "t", ready=0), now=0.0)
    w.judge(Seen("blue", False, "t", ready=1), now=1.9)
    assert w.judge(Seen("blue", False, "t", ready=0), now=3.0) == []
    assert [inv for inv, _ in w.judge(Seen("blue", False, "t", ready=0), now=5.1)] == ["I1"]


# ---- I2: the selected color's pod template changes while selected ---------------------------------------

def test_i2_fires_on_a_template_change_while_selected_not_on_a_switch():
    w = _watch()
    assert w.judge(Seen("blue", False, "template-1", ready=1), now=0.0) == []
    found = w.judge(Seen("blue", False, "template-2", ready=1), now=0.2)
    assert [inv for inv, _ in found] == ["I2"] and "blue" in found[0][1]
    # clean: a switch to another color with its own template, the same template again, a park in between
    w = _watch()
    assert w.judge(Seen("blue", False, "template-1", ready=1), now=0.0) == []
    assert w.judge(Seen("blue", False, "template-1", ready=1), now=0.2) == []
    assert w.judge(Seen("green", False, "template-2", ready=1), now=0.4) == []
    assert w.judge(Seen(None, True), now=0.6) == []
    assert w.judge(Seen("green", False, "template-3", ready=1), now=0.8) == []  # woke with a new template


# ---- I3: every request gets a 2xx or a 503 with Retry-After ---------------------------------------------

REQ = httpx.Request("POST", "http://127.0.0.1:1/v1/completions")


@pytest.mark.parametrize("answer", [
    httpx.Response(502, text="no healthy upstream", request=REQ),
    httpx.Response(503, text="no endpoints", request=REQ),
    httpx.Response(500, text="boom", request=REQ),
    httpx.Response(404, text="not found", request=REQ),
    httpx.ReadError("[Errno 104] Connection reset by peer", request=REQ),
    httpx.RemoteProtocolError("Server disconnected without sending a response.", request=REQ),
    httpx.ConnectError("[Errno 111] Connection refused", request=REQ),
], ids=["502", "503-no-retry-after", "500", "404", "reset", "disconnected", "refused"])
def test_i3_fires_on_a_reset_a_502_or_a_5xx_without_retry_after(answer):
    kind, problem = judge_answer(answer)
    assert problem is not None and kind in problem  # the status, or the transport error's class


@pytest.mark.parametrize("answer", [
    httpx.Response(200, json={"choices": [{"text": "hi"}]}, request=REQ),
    httpx.Response(503, headers={"Retry-After": "30"}, text="held past its limit", request=REQ),
    httpx.ReadTimeout("timed out", request=REQ),
], ids=["200", "503-retry-after", "client-timeout"])
def test_i3_allows_a_2xx_a_503_with_retry_after_and_a_held_request(answer):
    assert judge_answer(answer)[1] is None


# ---- I4: GPU pods and nodes are what the policy calls for after an op -----------------------------------

CLEAN = {"parked": False, "selector": {COLOR_LABEL: "blue"}, "pods": {"m-blue-a": "blue", "m-blue-b": "blue"},
         "live_replicas": 2, "other_pods": 1, "gpu_nodes": 3}


@pytest.mark.parametrize("change, words", [
    ({"pods": {**CLEAN["pods"], "m-green-a": "green"}, "gpu_nodes": 4}, "stray GPU pods of the non-live color"),
    ({"live_replicas": 0, "pods": {}}, "blue is at 0 replicas and not parked"),
    ({"selector": {"app.kubernetes.io/instance": "m"}}, "selects no color"),
    ({"parked": True, "selector": {"app": "hold"}}, "parked, yet 2 GPU pods run"),
    ({"gpu_nodes": 5}, "5 GPU nodes for 3 GPU pods"),
    ({"parked": True, "pods": {}, "live_replicas": None, "other_pods": 0, "gpu_nodes": 2}, "2 GPU nodes for 0"),
])
def test_i4_reports_exactly_what_is_beyond_the_policy(change, words):
    assert policy_problem(**CLEAN) == ""
    problem = policy_problem(**{**CLEAN, **change})
    assert words in problem, problem


def test_i4_clean_parked_and_one_spare_node():
    assert policy_problem(parked=True, selector={"app": "hold"}, pods={}, live_replicas=None, other_pods=0,
                          gpu_nodes=0) == ""
    # one GPU node left by the autoscaler's scale-down delay is not a leak
    assert policy_problem(parked=True, selector={"app": "hold"}, pods={}, live_replicas=None, other_pods=0,
                          gpu_nodes=1) == ""


# ---- I5: a lock held past the lease after its holder died -----------------------------------------------

def test_i5_fires_when_a_dead_holder_keeps_the_lease_past_it():
    holder = "release@host-1:4242:1a2b3c4d"  # tasks.locks' purpose@host:pid:nonce
    problem = dead_holder_problem(holder=holder, pid=4242, dead_for=50.0, lease_s=30.0)
    assert problem and "pid 4242" in problem and "lease 30 s" in problem
    # clean: still within the lease (+ slack), or the Lease is another process's / free
    assert dead_holder_problem(holder=holder, pid=4242, dead_for=40.0, lease_s=30.0) is None
    assert dead_holder_problem(holder="release@host-1:42421:ffff0000", pid=4242, dead_for=500.0, lease_s=30.0) is None
    assert dead_holder_problem(holder="", pid=4242, dead_for=500.0, lease_s=30.0) is None



# ---- I3's client: the one retry HTTP/1.1 allows, and nothing else ------------------------------------------

@pytest.mark.parametrize(("exc", "reused", "retry"), [
    (httpx.RemoteProtocolError("Server disconnected without sending a response.", request=REQ), True, True),
    (httpx.WriteError("[Errno 104] Connection reset by peer", request=REQ), True, True),
    (httpx.RemoteProtocolError("Server disconnected without sending a response.", request=REQ), False, False),
    (httpx.RemoteProtocolError("peer closed connection without sending complete message body", request=REQ),
     True, False),
    (httpx.ReadError("[Errno 104] Connection reset by peer", request=REQ), True, False),
    (httpx.ConnectError("[Errno 111] Connection refused", request=REQ), True, False),
    (httpx.ReadTimeout("timed out", request=REQ), True, False),
], ids=["closed-idle", "reset-while-sending", "new-connection", "cut-midway", "reset-reading", "refused",
        "timeout"])
def test_only_a_reused_connection_closed_before_an_answer_is_sent_again(exc, reused, retry):
    from bench.campaign import keep_alive_close_race

    assert keep_alive_close_race(exc, reused=reused) is retry


def _closing_server(close_on: set[int], total: int) -> tuple[str, list[int], threading.Thread]:
    """A local HTTP/1.1 server that answers each request with keep-alive, except the requests whose
    (1-based) number is in ``close_on``: those it reads, then closes the connection without an answer.
    It stops after ``total`` requests."""
    srv = socket.create_server(("127.0.0.1", 0))
    seen: list[int] = []

    def serve() -> None:
        while len(seen) < total:
            conn, _ = srv.accept()
            with conn:
                buf = b""
                while len(seen) < total:
                    while b"\r\n\r\n" not in buf:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        buf += chunk
                    if b"\r\n\r\n" not in buf:
                        break
                    head, _, rest = buf.partition(b"\r\n\r\n")
                    length = int(next((h.split(b":")[1] for h in head.split(b"\r\n")
                                       if h.lower().startswith(b"content-length")), b"0"))
                    while len(rest) < length:
                        rest += conn.recv(65536)
                    buf = rest[length:]
                    seen.append(len(seen) + 1)
                    if seen[-1] in close_on:
                        break  # closed with no answer
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok")
        srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}", seen, t


def test_the_load_sends_again_once_when_a_reused_connection_is_closed_before_its_answer():
    """Request 2 goes on request 1's connection and the server closes it unanswered (what uvicorn does to an
    idle connection at SIGTERM): sent again on a new connection, answered, counted apart — not an I3."""
    from bench.campaign import Load

    url, seen, t = _closing_server({2}, total=3)
    load = Load(url, "m", threads=0, violate=lambda *a: None)
    with httpx.Client(base_url=url, timeout=5) as http:
        assert load._post(http).status_code == 200
        assert load._post(http).status_code == 200
    t.join(5)
    assert seen == [1, 2, 3]
    assert sum(n for k, n in load.outcomes.items() if k.startswith("sent again")) == 1


def test_a_new_connection_closed_before_its_answer_is_not_sent_again():
    """The first request of a connection closed unanswered may have been applied: the error is judged (I3)."""
    from bench.campaign import Load

    url, seen, t = _closing_server({1}, total=1)
    load = Load(url, "m", threads=0, violate=lambda *a: None)
    with httpx.Client(base_url=url, timeout=5) as http, pytest.raises(httpx.RemoteProtocolError):
        load._post(http)
    t.join(5)
    assert seen == [1] and not load.outcomes
