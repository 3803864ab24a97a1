"""Local images: a pod whose image is `local/...` runs its command as a real process behind its Service."""

from __future__ import annotations

import pytest
from kubernetes import client

from sandbox.core import Clock, Faults
from sandbox.kube import KubeCluster, localproc
from tests.sandbox.kube_support import StubRuntime, api_client, http_client, process_gone, wait_for

# A tiny program: answers its env as JSON on $PORT (stdlib only), exits 3 on /exit.
PROGRAM = r"""
import http.server, json, os, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/exit":
            os._exit(3)
        body = json.dumps({k: v for k, v in os.environ.items() if k.endswith(("_SERVICE_HOST", "_SERVICE_PORT"))
                           or k in ("GREETING", "PORT")}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
print("listening", flush=True)
http.server.HTTPServer((os.environ["HOST"], int(os.environ["PORT"])), H).serve_forever()
"""


@pytest.fixture
def kube():
    k = KubeCluster(clock=Clock(0.002), faults=Faults(), runtime=StubRuntime(Clock(0.002)))
    k.start()
    k.add_node("cpu-1", labels={}, capacity={"cpu": "4", "memory": "16Gi"})
    yield k
    k.stop()


def pod(name: str, image: str = "local/echo") -> dict:
    return {"metadata": {"name": name, "labels": {"app": name}},
            "spec": {"containers": [{"name": "c", "image": image, "command": ["python", "-c", PROGRAM],
                                     "env": [{"name": "GREETING", "value": "hi $(PORT)"}],
                                     "ports": [{"name": "http", "containerPort": 8080}],
                                     "readinessProbe": {"httpGet": {"path": "/", "port": "http"}}}]}}


def test_local_images():
    assert localproc.is_local("local/anything") and not localproc.is_local("nginx:1.27")


def test_a_local_image_runs_as_a_process_and_its_service_routes_to_it(kube):
    core = client.CoreV1Api(api_client(kube))
    core.create_namespaced_service("default", {"metadata": {"name": "other"}, "spec": {
        "selector": {"app": "nobody"}, "ports": [{"name": "http", "port": 80}]}})
    core.create_namespaced_service("default", {"metadata": {"name": "echo"}, "spec": {
        "selector": {"app": "echo"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
    core.create_namespaced_pod("default", pod("echo"))
    wait_for(lambda: any(c.type == "Ready" and c.status == "True"
                         for c in core.read_namespaced_pod("echo", "default").status.conditions or []), timeout=30)
    with http_client(kube) as http:
        got = http.get("/api/v1/namespaces/default/services/echo:http/proxy/").json()
        assert got["GREETING"] == f"hi {got['PORT']}"  # $(VAR) expanded like the kubelet does
        assert got["OTHER_SERVICE_HOST"] == "127.0.0.1" and "OTHER_SERVICE_PORT" in got  # service links
        assert "listening" in http.get("/api/v1/namespaces/default/pods/echo/log").text
        http.get("/api/v1/namespaces/default/services/echo:http/proxy/exit")
    wait_for(lambda: (core.read_namespaced_pod("echo", "default").status.container_statuses[0].restart_count or 0) >= 1,
             timeout=30)
    last = core.read_namespaced_pod("echo", "default").status.container_statuses[0].last_state.terminated
    assert last.exit_code == 3


def test_a_patterned_image_and_a_missing_command(kube, monkeypatch):
    monkeypatch.setenv("SANDBOX_LOCAL_IMAGES", "ghcr.io/acme/*")
    assert localproc.is_local("ghcr.io/acme/tool:1")
    core = client.CoreV1Api(api_client(kube))
    bad = pod("nocmd", image="ghcr.io/acme/tool:1")
    del bad["spec"]["containers"][0]["command"]
    core.create_namespaced_pod("default", bad)
    wait_for(lambda: (core.read_namespaced_pod("nocmd", "default").status.container_statuses or [None])[0] is not None
             and core.read_namespaced_pod("nocmd", "default").status.container_statuses[0].last_state.terminated
             is not None, timeout=30)
    term = core.read_namespaced_pod("nocmd", "default").status.container_statuses[0].last_state.terminated
    assert (term.exit_code, term.reason) == (128, "StartError")


def test_secret_key_refs_are_resolved_like_the_kubelet(kube):
    """env valueFrom.secretKeyRef: the decoded key; optional and missing: unset; required and missing: the
    container never starts (CreateContainerConfigError)."""
    core = client.CoreV1Api(api_client(kube))
    core.create_namespaced_secret("default", {"metadata": {"name": "creds"}, "stringData": {"greeting": "from a secret"}})
    core.create_namespaced_service("default", {"metadata": {"name": "sec"}, "spec": {
        "selector": {"app": "sec"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
    p = pod("sec")
    p["spec"]["containers"][0]["env"] = [
        {"name": "GREETING", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "greeting"}}},
        {"name": "PORT", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "x", "optional": True}}}]
    core.create_namespaced_pod("default", p)
    wait_for(lambda: any(c.type == "Ready" and c.status == "True"
                         for c in core.read_namespaced_pod("sec", "default").status.conditions or []), timeout=30)
    with http_client(kube) as http:
        assert http.get("/api/v1/namespaces/default/services/sec:http/proxy/").json()["GREETING"] == "from a secret"
    bad = pod("nosecret")
    bad["spec"]["containers"][0]["env"] = [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "x"}}}]
    core.create_namespaced_pod("default", bad)
    wait_for(lambda: (core.read_namespaced_pod("nosecret", "default").status.container_statuses or [None])[0] is not None
             and core.read_namespaced_pod("nosecret", "default").status.container_statuses[0].last_state.terminated
             is not None, timeout=30)
    with http_client(kube) as http:
        assert 'CreateContainerConfigError: secret "absent" not found' in \
            http.get("/api/v1/namespaces/default/pods/nosecret/log").text


def test_a_local_container_listens_on_a_port_the_kernel_never_hands_out(kube):
    """The program binds its ``PORT`` a second or more after the pick (a Python server's imports): a port from
    the kernel's ephemeral range could meanwhile go to any ``bind(0)`` or outgoing connection on the machine,
    and the container would exit "address already in use", a crash no GKE pod has (its own network
    namespace). The port is outside that range, and free_port never gives one out twice while it may be bound."""
    from sandbox.core import _ephemeral_range, free_port
    from sandbox.kube.controllers.kubelet import PORT_ANNOTATION

    lo, hi = _ephemeral_range()
    core = client.CoreV1Api(api_client(kube))
    core.create_namespaced_pod("default", pod("echo"))
    wait_for(lambda: any(c.type == "Ready" and c.status == "True"
                         for c in core.read_namespaced_pod("echo", "default").status.conditions or []), timeout=30)
    port = int(core.read_namespaced_pod("echo", "default").metadata.annotations[PORT_ANNOTATION])
    assert not lo <= port <= hi, (port, lo, hi)
    given = [free_port() for _ in range(200)]
    assert len(set(given + [port])) == 201 and not any(lo <= p <= hi for p in given)


def test_a_killed_owner_takes_its_local_pods_processes_along(tmp_path):
    """A local pod's process runs under the sandbox's process: killed with SIGKILL (a test session, a demo), the
    sandbox could not stop its pods, and they kept running (a playground seen 17 min after its test was killed).
    Now the kernel stops them with it (the parent-death signal). Fails before: the pod's process is still there."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    pidfile = tmp_path / "pod.pid"
    owner_code = f"""
import time
from kubernetes import client
from sandbox.core import Clock, Faults
from sandbox.kube import KubeCluster
from tests.sandbox.kube_support import StubRuntime, api_client
k = KubeCluster(clock=Clock(0.002), faults=Faults(), runtime=StubRuntime(Clock(0.002)))
k.start()
k.add_node("cpu-1", labels={{}}, capacity={{"cpu": "4", "memory": "16Gi"}})
program = "import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
client.CoreV1Api(api_client(k)).create_namespaced_pod("default", {{
    "metadata": {{"name": "sleeper"}},
    "spec": {{"containers": [{{"name": "c", "image": "local/sleeper", "command": ["python", "-c", program]}}]}}}})
time.sleep(600)
"""
    root = Path(__file__).resolve().parents[2]
    # its own temp dir: the pod's ServiceAccount dir stays behind with a SIGKILLed owner (the test's tmp_path)
    owner = subprocess.Popen([sys.executable, "-c", owner_code], cwd=root, stdout=subprocess.DEVNULL,
                             env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=60)
        pod_pid = int(pidfile.read_text())
        os.kill(pod_pid, 0)  # running
        owner.kill()
        owner.wait(30)
        assert process_gone(pod_pid, within=10), f"the pod's process {pod_pid} outlived its SIGKILLed owner"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
