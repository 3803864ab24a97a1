"""The fault campaign's invariant checkers (bench/campaign.py) against real things: I1/I2 read from a sandbox
cluster whose live Service is moved to a color with no Ready pods / whose selected template is patched; I3 by
the campaign's own client load pointed at a port that resets and at one that answers 502; I5 on the identity
tasks.locks really writes into the Lease. A checker that never fires would pass every campaign run."""

from __future__ import annotations

import os
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubernetes import client

from bench.campaign import COLOR_LABEL, MODEL_LABEL, Load, Watch, dead_holder_problem, look
from sandbox.core import Clock, Faults
from sandbox.kube import KubeCluster
from tests.sandbox.kube_support import StubRuntime, api_client, deployment, wait_for, write_kubeconfig

NS, NAME = "default", "m"


@pytest.fixture(scope="module")
def kube():
    clock = Clock(0.002)
    k = KubeCluster(clock=clock, faults=Faults(), runtime=StubRuntime(clock))
    k.start()
    k.add_node("node-1")
    yield k
    k.stop()


@pytest.fixture(scope="module")
def api(kube):
    api = api_client(kube)
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    for color, replicas in (("blue", 1), ("green", 0)):
        apps.create_namespaced_deployment(NS, deployment(f"{NAME}-{color}", replicas=replicas, labels={
            "app": f"{NAME}-{color}", MODEL_LABEL: NAME, COLOR_LABEL: color}))
    core.create_namespaced_service(NS, {"metadata": {"name": NAME}, "spec": {
        "selector": {MODEL_LABEL: NAME, COLOR_LABEL: "blue"}, "ports": [{"name": "http", "port": 80,
                                                                         "targetPort": "http"}]}})
    wait_for(lambda: look(api, NS, NAME).ready == 1, timeout=30)
    return api


def _watch() -> Watch:
    return Watch("unused", NS, NAME, violate=None, grace_s=2.0)


def test_i2_fires_when_the_selected_colors_template_is_patched(api):
    w = _watch()
    before = look(api, NS, NAME)
    assert (before.color, before.ready) == ("blue", 1)
    assert w.judge(before, now=0.0) == [] and w.judge(look(api, NS, NAME), now=0.5) == []  # clean: untouched
    client.AppsV1Api(api).patch_namespaced_deployment(f"{NAME}-blue", NS, {"spec": {"template": {"metadata": {
        "annotations": {"edited-by-hand": "yes"}}}}})
    after = wait_for(lambda: (s := look(api, NS, NAME)).template != before.template and s)
    assert [inv for inv, _ in w.judge(after, now=1.0)] == ["I2"]
    wait_for(lambda: look(api, NS, NAME).ready == 1, timeout=30)  # the rollout done, for the next test


def test_i1_fires_when_the_live_service_selects_a_color_without_ready_pods(api):
    core = client.CoreV1Api(api)
    w = _watch()
    assert w.judge(look(api, NS, NAME), now=0.0) == [] and w.judge(look(api, NS, NAME), now=3.0) == []
    core.patch_namespaced_service(NAME, NS, {"spec": {"selector": {MODEL_LABEL: NAME, COLOR_LABEL: "green"}}})
    try:
        # green runs no pod: once the endpoints controller has caught up with the switch, none is listed
        seen = wait_for(lambda: (s := look(api, NS, NAME)).color == "green" and s.ready == 0 and s)
        w = _watch()
        assert w.judge(seen, now=10.0) == []  # within the endpoint controller's grace
        found = w.judge(look(api, NS, NAME), now=12.5)
        assert [inv for inv, _ in found] == ["I1"] and "green" in found[0][1]
        # parked (the park record on the Service): the same empty color is no violation
        core.patch_namespaced_service(NAME, NS, {"metadata": {"annotations": {"llm-fleet.dev/park-record": "{}"}}})
        parked = wait_for(lambda: (s := look(api, NS, NAME)).parked and s)
        w = _watch()
        assert w.judge(parked, now=0.0) == [] and w.judge(look(api, NS, NAME), now=10.0) == []
    finally:
        core.patch_namespaced_service(NAME, NS, {"metadata": {"annotations": {"llm-fleet.dev/park-record": None}},
                                                 "spec": {"selector": {MODEL_LABEL: NAME, COLOR_LABEL: "blue"}}})


# ---- I3: the campaign's Load against a port that resets, one that answers 502, one that is fine ----------

def _resetting_port() -> tuple[int, threading.Event]:
    """Reads each request, then closes with SO_LINGER 0: the client sees a TCP reset."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    done = threading.Event()

    def run() -> None:
        while not done.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            conn.recv(65536)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
        srv.close()

    threading.Thread(target=run, daemon=True).start()
    return srv.getsockname()[1], done


def _answering(status: int, headers: dict[str, str]) -> ThreadingHTTPServer:
    class H(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = b'{"choices": [{"text": "ok"}]}'
            self.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def _load(url: str, until: int) -> tuple[list[tuple[str, str]], Load]:
    found: list[tuple[str, str]] = []
    load = Load(url, "m", threads=1, violate=lambda inv, detail: found.append((inv, detail)), rate=100)
    load.start()
    try:
        wait_for(lambda: load.sent >= until, timeout=20)
    finally:
        load.close()
    return found, load


def test_i3_fires_on_a_reset_and_on_a_502():
    port, done = _resetting_port()
    try:
        found, _ = _load(f"http://127.0.0.1:{port}", until=3)
    finally:
        done.set()
    assert found and {inv for inv, _ in found} == {"I3"} and "transport" in found[0][1]
    srv = _answering(502, {})
    try:
        found, _ = _load(f"http://127.0.0.1:{srv.server_port}", until=3)
    finally:
        srv.shutdown()
    assert found and {inv for inv, _ in found} == {"I3"} and "HTTP 502" in found[0][1]


def test_i3_is_quiet_on_2xx_and_503_with_retry_after():
    for status, headers in ((200, {}), (503, {"Retry-After": "5"})):
        srv = _answering(status, headers)
        try:
            found, load = _load(f"http://127.0.0.1:{srv.server_port}", until=5)
        finally:
            srv.shutdown()
        assert found == [] and load.outcomes[str(status)] >= 4


# ---- I5: on the holder identity tasks.locks writes -------------------------------------------------------

def test_i5_reads_the_pid_in_the_holder_tasks_locks_writes(kube, tmp_path, monkeypatch):
    from pathlib import Path

    from manifests.spec import load_spec
    from tasks.locks import lease_lock, lease_name

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # the Lease lock needs no Prefect
    spec = load_spec(Path(__file__).resolve().parents[2] / "deployments/gemma2-2b-it-vllm-l4.yaml")
    config = write_kubeconfig(kube, tmp_path / "config")
    with lease_lock(spec, purpose="release", kubeconfig=config, lease_s=4):
        holder = client.CoordinationV1Api(api_client(kube)).read_namespaced_lease(
            lease_name(spec), spec.namespace).spec.holder_identity
    assert dead_holder_problem(holder=holder, pid=os.getpid(), dead_for=20.0, lease_s=4)  # held 16 s past it
    assert dead_holder_problem(holder=holder, pid=os.getpid(), dead_for=4.0, lease_s=4) is None
    assert dead_holder_problem(holder=holder, pid=os.getpid() + 1, dead_for=20.0, lease_s=4) is None
