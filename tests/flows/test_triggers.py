"""Every way a release starts, on a real local Prefect server (the test harness runs the events, triggers
and actions services): the REST API, `prefect deployment run`, the event from watch_revisions (through
the deployment trigger in prefect.yaml) and the Hugging Face Hub's own repo webhooks.

`release_model` is deployed with `prefect --no-prompt deploy` from this prefect.yaml to a work pool no
worker polls: the runs stay Scheduled, and the tests assert what each trigger created.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import subprocess
import threading
import time
import uuid

import httpx
import pytest
import yaml

from tests.flows.conftest import ROOT, spec_dict
from tests.flows.server_support import python

pytestmark = pytest.mark.usefixtures("prefect_server")

POOL = "triggers-test"  # no worker polls it
MODEL = "Qwen/Qwen2.5-7B-Instruct"


def _api() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def _cli_env() -> dict[str, str]:
    import os

    return {**os.environ, "PREFECT_API_URL": _api()}


def write_spec(tmp_path, *, branch: str) -> str:
    """The smallest bundled spec tracking ``branch`` of the model, in a project of its own."""
    data = spec_dict("qwen2.5-7b-sglang.yaml")
    data["model"] = {"id": MODEL, "revision": branch}
    path = tmp_path / f"{branch}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def release_deployment(prefect_server):
    """release_model/blue-green deployed from prefect.yaml (with its trigger) by the real CLI."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
    res = subprocess.run([*python("-m", "prefect"), "--no-prompt", "deploy", "--name",
                          "release_model/blue-green", "--pool", POOL], cwd=ROOT, env=_cli_env(),
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("release_model/blue-green")
    assert dep.work_pool_name == POOL
    return dep


def release_params() -> set[str]:
    from flows.release_model import release_model

    return set(inspect.signature(release_model.fn).parameters)


def runs_with(deployment_id, *, revision: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    return [r for r in runs if r.parameters.get("revision") == revision]


def wait_run(deployment_id, *, revision: str, timeout: float = 60) -> object:
    """The release run a trigger created for ``revision`` (triggers act asynchronously)."""
    deadline = time.monotonic() + timeout
    while not (found := runs_with(deployment_id, revision=revision)):
        assert time.monotonic() < deadline, f"no release_model run for {revision} after {timeout:.0f} s"
        time.sleep(0.2)
    assert len(found) == 1, f"{len(found)} runs for one revision"
    return found[0]


def test_rest_api_creates_a_release_run(release_deployment, tmp_path):
    spec, sha = write_spec(tmp_path, branch="main"), uuid.uuid4().hex + "abcdefgh"
    resp = httpx.post(f"{_api()}/deployments/{release_deployment.id}/create_flow_run",
                      json={"parameters": {"spec": spec, "revision": sha}}, timeout=30)
    assert resp.status_code == 201, resp.text
    run = wait_run(release_deployment.id, revision=sha, timeout=5)
    assert str(run.id) == resp.json()["id"]
    assert run.parameters["spec"] == spec
    # The deployment's defaults fill in the rest, and every parameter is one release_model takes.
    assert set(run.parameters) <= release_params()


def test_prefect_deployment_run_cli_creates_a_release_run(release_deployment, tmp_path):
    spec, sha = write_spec(tmp_path, branch="main"), uuid.uuid4().hex + "12345678"
    res = subprocess.run([*python("-m", "prefect"), "deployment", "run", "release_model/blue-green",
                          "--param", f"spec={spec}", "--param", f"revision={sha}"],
                         cwd=ROOT, env=_cli_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    run = wait_run(release_deployment.id, revision=sha, timeout=5)
    assert str(run.id) in res.stdout
    assert run.parameters["spec"] == spec and set(run.parameters) <= release_params()


def announced(spec_path: str) -> dict | None:
    from prefect.variables import Variable

    from flows.watch_revisions import record_name
    from manifests.spec import load_spec

    return Variable.get(record_name(load_spec(spec_path)))


def latest_table(key: str) -> list[dict]:
    import json

    from prefect.artifacts import Artifact

    data = Artifact.get(key).data
    return json.loads(data) if isinstance(data, str) else data


def test_watch_revisions_event_starts_a_release_of_the_new_commit(release_deployment, sandbox, sbc, tmp_path):
    from flows.deploy_model import deploy_model
    from flows.provision_cluster import provision_cluster
    from flows.watch_revisions import watch_revisions

    branch = f"watch-{uuid.uuid4().hex[:8]}"
    first = sbc.push_revision(MODEL, branch=branch, title="branch for the watch test")
    spec = write_spec(tmp_path, branch=branch)
    provision_cluster(spec=spec)
    assert deploy_model(spec=spec)["revision"] == first

    (row,) = watch_revisions(specs=[spec])
    assert (row["status"], row["head"], row["serving"]) == ("serving newest", first, first)

    new = sbc.push_revision(MODEL, branch=branch, title="Update model weights")
    (row,) = watch_revisions(specs=[spec])
    assert (row["status"], row["head"], row["serving"]) == ("announced", new, first)
    run = wait_run(release_deployment.id, revision=new)
    assert run.parameters["spec"] == spec and set(run.parameters) <= release_params()
    assert announced(spec)["revision"] == new
    table = latest_table("watch-revisions")
    assert [(r["spec"], r["status"], r["head"]) for r in table] == [(spec, "announced", new)]

    # Idempotent: the commit is announced once, whatever the next scans see.
    (row,) = watch_revisions(specs=[spec])
    assert row["status"] == "already announced" and not row["event_id"]


def test_untracked_and_undeployed_specs_announce_nothing(prefect_server, tmp_path):
    from flows.watch_revisions import watch_revisions

    pinned = write_spec(tmp_path, branch="0123456789abcdef0123456789abcdef01234567")
    tag = write_spec(tmp_path, branch="v1.0")
    undeployed = write_spec(tmp_path, branch="main")
    rows = watch_revisions(specs=[pinned, tag, undeployed])
    assert [r["status"] for r in rows] == ["pinned", "pinned", "not deployed"]
    assert not any(r["event_id"] for r in rows)


def hub_push_payload(sha: str, branch: str, repo: str = MODEL) -> dict:
    return {"event": {"action": "update", "scope": "repo.content"},
            "repo": {"type": "model", "name": repo, "id": "0" * 24, "private": False,
                     "url": {"web": f"https://huggingface.co/{repo}"}, "headSha": "f" * 40, "owner": {"id": "1" * 24}},
            "updatedRefs": [{"ref": f"refs/heads/{branch}", "oldSha": "e" * 40, "newSha": sha}],
            "webhook": {"id": "2" * 24, "version": 3}}


def deliveries(sbc, hook_id: str, n: int, timeout: float = 20) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        hook = next(h for h in sbc.hub_webhooks() if h["id"] == hook_id)
        if len(hook["deliveries"]) >= n:
            return hook["deliveries"]
        assert time.monotonic() < deadline, f"the Hub delivered {len(hook['deliveries'])} of {n} webhooks"
        time.sleep(0.1)


@pytest.fixture
def receiver(tmp_path):
    from servers.webhook import make_server

    branch = f"hook-{uuid.uuid4().hex[:8]}"
    spec = write_spec(tmp_path, branch=branch)
    server = make_server(secret="s3cret-" + uuid.uuid4().hex, specs=[spec])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, spec, branch
    server.shutdown()
    server.server_close()


def test_hub_webhook_starts_a_release_and_a_wrong_secret_starts_nothing(release_deployment, receiver, sbc):
    server, spec, branch = receiver
    # Straight at the receiver: no secret, a wrong one, the right one in the wrong place — 401, nothing emitted.
    fake = "a" * 40
    for headers, url in [({}, server.url), ({"X-Webhook-Secret": "guess"}, server.url),
                         ({"X-Webhook-Secret": server.secret[:-1]}, server.url),
                         ({"Authorization": f"Bearer {server.secret}"}, server.url)]:
        resp = httpx.post(url, json=hub_push_payload(fake, branch), headers=headers, timeout=10)
        assert resp.status_code == 401, resp.text

    # The Hub's own delivery with a wrong secret: refused, nothing announced.
    wrong = sbc.add_hub_webhook(server.url, secret="not-the-secret", repos=[MODEL])
    try:
        refused = sbc.push_revision(MODEL, branch=branch)
        assert deliveries(sbc, wrong["id"], 1)[-1]["status"] == 401
    finally:
        sbc.remove_hub_webhook(wrong["id"])
    assert announced(spec) is None

    # With the right secret: the push becomes a release of exactly that commit.
    right = sbc.add_hub_webhook(server.url, secret=server.secret, repos=[MODEL])
    try:
        new = sbc.push_revision(MODEL, branch=branch)
        assert deliveries(sbc, right["id"], 1)[-1]["status"] == 200
        run = wait_run(release_deployment.id, revision=new)
        assert run.parameters["spec"] == spec and set(run.parameters) <= release_params()
        assert announced(spec)["revision"] == new and announced(spec)["source"] == "hub-webhook"
        # The Hub replays a delivery: no second release.
        resp = httpx.post(server.url, json=hub_push_payload(new, branch), headers={"X-Webhook-Secret": server.secret})
        assert resp.json()["announced"][0]["status"] == "already announced"
        # A push to a branch no spec tracks is ignored; the secret in the query (where proxies log it) is refused.
        resp = httpx.post(server.url, json=hub_push_payload("b" * 40, "other"),
                          headers={"X-Webhook-Secret": server.secret})
        assert resp.status_code == 200 and "ignored" in resp.json()
        resp = httpx.post(f"{server.url}?secret={server.secret}", json=hub_push_payload("b" * 40, "other"))
        assert resp.status_code == 401
    finally:
        sbc.remove_hub_webhook(right["id"])
    # The refused commit was never released (its delivery came before the accepted one).
    assert runs_with(release_deployment.id, revision=refused) == []
    assert re.fullmatch(r"[0-9a-f]{40}", new)


def test_sandbox_hub_sends_the_payload_huggingface_hub_parses(sbc):
    """The sandbox Hub's delivery is what huggingface_hub's own WebhookPayload model reads, secret in the header."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from huggingface_hub import WebhookPayload

    got: list[tuple[dict, str | None]] = []

    class Capture(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            import json

            got.append((json.loads(self.rfile.read(int(self.headers["Content-Length"]))),
                        self.headers.get("X-Webhook-Secret")))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Capture)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hook = sbc.add_hub_webhook(f"http://127.0.0.1:{server.server_address[1]}/hook", secret="abc", repos=[MODEL])
    try:
        branch = f"payload-{uuid.uuid4().hex[:8]}"
        sha = sbc.push_revision(MODEL, branch=branch)
        assert deliveries(sbc, hook["id"], 1)[-1]["status"] == 204
    finally:
        sbc.remove_hub_webhook(hook["id"])
        server.shutdown()
    body, secret = got[-1]
    payload = WebhookPayload.model_validate(body)
    assert secret == "abc"
    assert (payload.event.action, payload.event.scope) == ("update", "repo.content")
    assert payload.repo.name == MODEL and payload.repo.type == "model" and payload.webhook.version == 3
    assert [(r.ref, r.oldSha, r.newSha) for r in payload.updatedRefs] == [(f"refs/heads/{branch}", None, sha)]
    assert re.fullmatch(r"[0-9a-f]{40}", body["repo"]["headSha"])  # main's head, as documented


def test_the_hold_proxy_s_event_starts_a_wake_with_the_event_s_time(prefect_server):
    """The wake trigger in prefect.yaml turns the hold proxy's llm-fleet.model.wake-requested event into a
    wake_model run whose requested_at is the event's own time. The server checks the rendered parameters
    against the deployment's schema (a bare '{{ event.occurred }}' renders with a space and is no date-time):
    a run exists only if they pass."""
    from datetime import UTC, datetime, timedelta

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
    res = subprocess.run([*python("-m", "prefect"), "--no-prompt", "deploy", "--name",
                          "wake_model/wake-on-request", "--pool", POOL], cwd=ROOT, env=_cli_env(),
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("wake_model/wake-on-request")
    assert dep.enforce_parameter_schema  # what makes the server refuse parameters its schema does not take
    occurred = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=3)
    model = f"held-{uuid.uuid4().hex[:8]}"
    event = {"id": str(uuid.uuid4()), "occurred": occurred.isoformat(), "event": "llm-fleet.model.wake-requested",
             "resource": {"prefect.resource.id": f"llm-fleet.model.{model}", "prefect.resource.name": model},
             "related": [], "payload": {"spec": "deployments/gemma2-2b-it-vllm-l4.yaml", "model": model, "held": 1}}
    resp = httpx.post(f"{_api()}/events", json=[event], timeout=30)  # what servers/holdproxy.py posts
    assert resp.status_code < 300, resp.text
    deadline = time.monotonic() + 60
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
        if runs:
            break
        assert time.monotonic() < deadline, "the wake trigger started no wake_model run"
        time.sleep(0.2)
    params = runs[0].parameters
    assert (params["reason"], params["source"]) == ("held request", "event")
    assert datetime.fromisoformat(params["requested_at"]) == occurred
