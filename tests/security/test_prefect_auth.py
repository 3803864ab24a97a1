"""Wake events on a Prefect server that requires auth (PREFECT_SERVER_API_AUTH_STRING): the hold proxy, with
the credential the kubelet reads from the llm-fleet-prefect-auth Secret, gets its wake event in and the held
request is answered once the model is back; an event without (or with a wrong) credential is refused and
stored nowhere.

A real `prefect server start` (SQLite in a temp dir, the event persister on) and the hold proxy as a real
process, its environment taken from the rendered Deployment. The test plays the kubelet (secretKeyRef)
and the deployment trigger (it brings the model up once the event is in), as tests/flows/test_park.py does.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from manifests import park as P
from manifests.spec import load_spec
from sandbox.core import free_port
from tests.flows.harness import NO_BLOCK_REGISTRATION
from tests.flows.server_support import python, stop_process, wait_answering

pytestmark = pytest.mark.long
ROOT = Path(__file__).resolve().parents[2]
AUTH = "fleet-admin:" + uuid.uuid4().hex
BASIC = {"Authorization": "Basic " + base64.b64encode(AUTH.encode()).decode()}


@pytest.fixture(scope="module")
def prefect_with_auth(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-auth")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_API_AUTH_STRING": AUTH,
                "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
                "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "0.2", **NO_BLOCK_REGISTRATION,
                **{f"PREFECT_SERVER_SERVICES_{s}_ENABLED": "false" for s in (
                    "TASK_RUN_RECORDER", "SCHEDULER", "LATE_RUNS", "FOREMAN", "DB_VACUUM", "CLEANUP_RECONCILER",
                    "CANCELLATION_CLEANUP", "PAUSE_EXPIRATIONS", "REPOSSESSOR", "TRIGGERS", "ACTIONS")}})
    log = (home / "server.log").open("w")
    proc = subprocess.Popen([*python("-m", "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        # health answers without auth (Kubernetes probes)
        wait_answering(f"{api}/health", proc, timeout=180, log=home / "server.log")
        yield api
    finally:
        stop_process(proc, timeout=20)
        log.close()


def _event(name: str = P.WAKE_EVENT) -> dict:
    return {"id": str(uuid.uuid4()), "occurred": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
            "event": name, "resource": {"prefect.resource.id": "llm-fleet.model.attack"}, "payload": {}}


def _events(api: str, resource_id: str) -> list[dict]:
    body = {"filter": {"resource": {"id": [resource_id]}}, "limit": 50}
    resp = httpx.post(f"{api}/events/filter", json=body, headers=BASIC, timeout=10)
    resp.raise_for_status()
    return resp.json()["events"]


def test_an_event_without_the_credential_is_refused(prefect_with_auth):
    api = prefect_with_auth
    for headers in ({}, {"Authorization": "Basic " + base64.b64encode(b"fleet-admin:guess").decode()},
                    {"Authorization": "Bearer " + AUTH}):
        resp = httpx.post(f"{api}/events", json=[_event()], headers=headers, timeout=10)
        assert resp.status_code == 401, resp.text
    time.sleep(1)  # past the persister's flush: nothing of those was stored
    assert _events(api, "llm-fleet.model.attack") == []


class _Model(BaseHTTPRequestHandler):
    """The woken model: vLLM's readiness and one completion."""

    def do_GET(self):  # noqa: N802
        self._json({"data": [{"id": "m"}]} if self.path == "/v1/models" else {"error": "nf"},
                   200 if self.path == "/v1/models" else 404)

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._json({"choices": [{"text": "awake"}]})

    def _json(self, body: dict, status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def _proxy_env(spec, *, api: str, secret: dict[str, str], upstream: str, port: int) -> dict[str, str]:
    """The container's environment as the kubelet builds it from the rendered Deployment."""
    dep = P.hold_proxy_deployment(spec, prefect_api_url=api, spec_ref="deployments/qwen2.5-7b-sglang.yaml")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    env = {"PATH": os.environ["PATH"], "HOST": "127.0.0.1", "HOLD_UPSTREAM_URL": upstream, "HOLD_POLL_S": "0.1"}
    for item in c["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == P.PREFECT_AUTH_SECRET and ref.get("optional") is True
            if ref["key"] in secret:
                env[item["name"]] = secret[ref["key"]]
    assert AUTH not in json.dumps(dep)  # the credential is never in the manifest
    env["PORT"] = str(port)
    return env


def test_held_request_is_answered_after_the_wake_on_an_auth_enabled_server(prefect_with_auth, tmp_path):
    api = prefect_with_auth
    spec = load_spec(ROOT / "deployments" / "qwen2.5-7b-sglang.yaml")
    model_port, proxy_port = free_port(), free_port()
    env = _proxy_env(spec, api=api, secret={"auth-string": AUTH}, upstream=f"http://127.0.0.1:{model_port}",
                     port=proxy_port)
    log = (tmp_path / "proxy.log").open("w")
    proxy = subprocess.Popen([sys.executable, "-m", "servers.holdproxy"], cwd=ROOT, env=env, stdout=log,
                             stderr=subprocess.STDOUT)
    model = None
    try:
        wait_answering(f"http://127.0.0.1:{proxy_port}/healthz", proxy, timeout=60)
        answer: dict = {}

        def send() -> None:
            answer["resp"] = httpx.post(f"http://127.0.0.1:{proxy_port}/v1/completions",
                                        json={"model": "m", "prompt": "hi"}, timeout=120)

        client = threading.Thread(target=send)
        client.start()
        resource = P.resource_id(spec)
        deadline = time.monotonic() + 60
        while not (events := _events(api, resource)):
            assert time.monotonic() < deadline, "no wake event reached the auth-enabled server:\n" + \
                (tmp_path / "proxy.log").read_text()
            time.sleep(0.3)
        assert events[0]["event"] == P.WAKE_EVENT
        assert "resp" not in answer  # still held: the model is not back yet

        model = ThreadingHTTPServer(("127.0.0.1", model_port), _Model)  # the wake brings the model back
        threading.Thread(target=model.serve_forever, daemon=True).start()
        client.join(timeout=60)
        assert answer["resp"].status_code == 200 and answer["resp"].json()["choices"][0]["text"] == "awake"
        holdz = httpx.get(f"http://127.0.0.1:{proxy_port}/holdz", timeout=5).json()
        assert holdz["events_sent"] == 1 and holdz["forwarded"] == 1
    finally:
        proxy.terminate()
        proxy.wait(timeout=20)
        log.close()
        if model is not None:
            model.shutdown()


def test_without_the_secret_the_hold_proxy_is_refused_and_says_why(prefect_with_auth, tmp_path):
    api = prefect_with_auth
    spec = load_spec(ROOT / "deployments" / "qwen2.5-7b-sglang.yaml")
    proxy_port = free_port()
    env = _proxy_env(spec, api=api, secret={}, upstream=f"http://127.0.0.1:{free_port()}", port=proxy_port)
    env["HOLD_MODEL"] = env["HOLD_RESOURCE_ID"] = "llm-fleet.model.no-secret"
    log_path = tmp_path / "proxy.log"
    with log_path.open("w") as log:
        proxy = subprocess.Popen([sys.executable, "-m", "servers.holdproxy"], cwd=ROOT, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
        try:
            wait_answering(f"http://127.0.0.1:{proxy_port}/healthz", proxy, timeout=60)
            def held() -> None:
                with contextlib.suppress(httpx.HTTPError):  # cut off when the proxy is killed below
                    httpx.post(f"http://127.0.0.1:{proxy_port}/v1/completions", json={}, timeout=30)

            threading.Thread(target=held, daemon=True).start()
            deadline = time.monotonic() + 30
            while "refused the wake event (401)" not in log_path.read_text():
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
            assert httpx.get(f"http://127.0.0.1:{proxy_port}/holdz", timeout=5).json()["events_sent"] == 0
        finally:
            proxy.kill()  # a SIGTERM would wait out the held request (hold.timeout)
            proxy.wait(timeout=20)
    assert _events(api, "llm-fleet.model.no-secret") == []


def test_park_hands_the_proxy_this_runs_own_credential_only():
    """park_model writes llm-fleet-prefect-auth from the run's Prefect settings: the auth string or the API
    key when set, nothing for a server without auth."""
    import prefect.settings as ps

    from targets.gke.park_steps import _prefect_credentials

    assert _prefect_credentials() == {} or os.environ.get("PREFECT_API_AUTH_STRING") or os.environ.get("PREFECT_API_KEY")
    with ps.temporary_settings(updates={ps.PREFECT_API_AUTH_STRING: AUTH}):
        got = _prefect_credentials()
    assert {k: v.get_secret_value() for k, v in got.items()} == {"auth-string": AUTH}
    assert set(P.PREFECT_AUTH_KEYS) >= set(got)  # a key the proxy's Deployment reads


def test_the_webhook_receiver_announces_on_an_auth_enabled_server(prefect_with_auth, tmp_path):
    """`llm-fleet webhook` (the CLI, as a process) with PREFECT_API_AUTH_STRING: Prefect's own client sends
    the basic auth for the announcement record (a Variable) and the event, which the server stores."""
    import yaml

    from sandbox.core import Faults
    from sandbox.hub import Hub
    from tests.flows.conftest import spec_dict

    api = prefect_with_auth
    hub = Hub(faults=Faults())
    hub.start()
    branch = f"auth-{uuid.uuid4().hex[:6]}"
    sha = hub.push_revision("Qwen/Qwen2.5-7B-Instruct", branch)
    data = spec_dict("qwen2.5-7b-sglang.yaml", name=f"qwen-{branch}")
    data["model"] = {"id": "Qwen/Qwen2.5-7B-Instruct", "revision": branch}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    port, secret = free_port(), uuid.uuid4().hex
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_API_URL": api, "PREFECT_API_AUTH_STRING": AUTH, "HF_ENDPOINT": hub.url,
           "HF_TOKEN": "hf_sandbox_read", "LLM_FLEET_WEBHOOK_SECRET": secret}
    log_path = tmp_path / "webhook.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "llm_fleet.cli", "webhook", "--port", str(port),
                                 "--spec", str(spec)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_answering(f"http://127.0.0.1:{port}/healthz", proc, timeout=60)
            body = {"event": {"action": "update", "scope": "repo.content"},
                    "repo": {"type": "model", "name": "Qwen/Qwen2.5-7B-Instruct", "headSha": "e" * 40},
                    "updatedRefs": [{"ref": f"refs/heads/{branch}", "oldSha": None, "newSha": sha}]}
            resp = httpx.post(f"http://127.0.0.1:{port}/webhooks/huggingface", json=body,
                              headers={"X-Webhook-Secret": secret}, timeout=60)
            assert resp.status_code == 200, resp.text + log_path.read_text()
            assert resp.json()["announced"][0]["status"] == "announced"
            deadline = time.monotonic() + 30
            while not (events := _events(api, f"llm-fleet.model.qwen-{branch}")):
                assert time.monotonic() < deadline, "the announcement never reached the server\n" + log_path.read_text()
                time.sleep(0.3)
            assert events[0]["payload"]["revision"] == sha
        finally:
            proc.terminate()
            proc.wait(timeout=20)
            hub.stop()
