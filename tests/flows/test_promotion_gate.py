"""release.auto_promote: false against the sandbox and a real Prefect server: the release pauses its flow run
at the promotion gate with the preview up, and a person's resume (promote true/false) or the timeout decides.

One model is deployed once per module (on blue) and released a few times; each test pushes a new Hub commit.
It lives in the cluster test_release_model provisions once per process (a model of its own name there).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from tests.flows.conftest import spec_dict
from tests.flows.test_release_model import (
    COLOR,
    FAST_RELEASE,
    MODEL,
    RUN_LOGGERS,
    deployment,
    history,
    in_shared_cluster,
    kube,
    live,
    pod_uids,
    wait_service,
)

pytestmark = pytest.mark.usefixtures("prefect_server")

# 24 h of spec time is ~170 s on the sandbox's clock: long enough for the assertions while paused.
# No latency comparison with the live color: it is not what these tests are about, and on a loaded
# machine side-by-side p50s are noise.
GATED = dict(FAST_RELEASE, auto_promote=False, promotion_timeout="24h",
             pre_promotion={"requests": 6, "concurrency": 3, "max_latency_ratio": None})


@pytest.fixture(scope="module")
def gated(sandbox, prefect_server):
    from flows.deploy_model import deploy_model

    # load_timeout 2h (~14 s scaled): a rollout wait sized for the model, not for a busy test machine.
    spec = in_shared_cluster(sandbox, "qwen2.5-7b-sglang.yaml", name="qwen-gated", release=dict(GATED),
                             load_timeout="2h")
    deploy_model(spec=spec)  # the first deploy has nothing to protect: no gate
    return spec


class Background:
    """release_model in a thread, as a worker would run it; join() returns its result or raises its error."""

    def __init__(self, spec: dict, revision: str) -> None:
        self.box: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, args=(spec, revision), daemon=True)

    def _run(self, spec: dict, revision: str) -> None:
        from flows.release_model import release_model

        try:
            self.box["result"] = release_model(spec=spec, revision=revision)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.box["error"] = exc

    def __enter__(self) -> Background:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.thread.join(timeout=120)

    def join(self) -> dict[str, Any]:
        self.thread.join(timeout=120)
        assert not self.thread.is_alive(), "the release did not finish"
        if "error" in self.box:
            raise self.box["error"]
        return self.box["result"]


def notices(sbc, sha: str) -> list[str]:
    return [m["text"] for m in sbc.slack_messages() if "Preview ready" in m["text"] and sha[:12] in m["text"]]


def gate_run(svc) -> str | None:
    """The flow run whose gate the live Service's in-flight release annotation names."""
    from manifests.release import RELEASE_ANNOTATION

    raw = (svc.metadata.annotations or {}).get(RELEASE_ANNOTATION)
    return ((json.loads(raw) if raw else {}).get("gate") or {}).get("flow_run")


def wait_gate(spec: dict, sbc, sha: str, run: Background, *, skip: int = 0, timeout: float = 90) -> tuple[str, str]:
    """The gate's Slack notice for ``sha`` (the ``skip``+1-th), and the flow run once it is Paused.

    The release names its gate's flow run on the live Service just before it announces it: a watch on the
    Service waits for that (no polling of the Slack history while the candidate comes up)."""
    deadline = time.time() + timeout
    earlier = {m.group(1) for t in notices(sbc, sha)[:skip] if (m := re.search(r"/flow_runs/([0-9a-f-]{36})/", t))}
    while time.time() < deadline and run.thread.is_alive():
        if wait_service(spec, lambda s: gate_run(s) not in (None, *earlier), timeout=2):
            break
    while time.time() < deadline:
        if not run.thread.is_alive():
            run.join()  # raises the release's own error
            raise AssertionError("the release finished without opening its promotion gate")
        found = notices(sbc, sha)
        if len(found) > skip:
            text = found[skip]
            run_id = re.search(r"/flow_runs/([0-9a-f-]{36})/resume", text).group(1)
            while time.time() < deadline and run.thread.is_alive() and flow_state(run_id) != "PAUSED":
                time.sleep(0.1)
            return run_id, text
        time.sleep(0.1)
    raise AssertionError(f"no promotion gate opened for {sha[:12]}")


def flow_state(run_id: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(UUID(run_id)).state
    return state.type.value if state else "?"


def ready_pods(spec: dict, color: str) -> set[str]:
    core, _, _ = kube(spec)
    pods = core.list_namespaced_pod("default", label_selector=f"app.kubernetes.io/instance={spec['name']},{COLOR}={color}")
    return {p.metadata.name for p in pods.items if not p.metadata.deletion_timestamp
            and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])}


def endpoint_pods(spec: dict, service: str) -> set[str]:
    core, _, _ = kube(spec)
    ep = core.read_namespaced_endpoints(service, "default")
    return {a.target_ref.name for s in ep.subsets or [] for a in s.addresses or []}


def other(color: str) -> str:
    return "green" if color == "blue" else "blue"


def test_paused_at_the_gate_then_promoted_with_the_notice_s_own_command(gated, sandbox, sbc):
    from prefect.settings import PREFECT_API_URL

    from manifests.spec import parse_spec
    from tasks.gke import get_credentials
    from tasks.locks import LockTimeout, model_lock

    spec = gated
    stable, candidate = live(spec), other(live(spec))
    stable_pods = pod_uids(spec, stable)
    template = deployment(spec, stable).spec.template.to_dict()
    sha = sandbox.hub.push_revision(MODEL, title="manual gate: promote")
    with Background(spec, sha) as run:
        run_id, notice = wait_gate(spec, sbc, sha, run)
        assert flow_state(run_id) == "PAUSED"
        # While paused: traffic on the old color, the preview lists the candidate's Ready pods.
        assert live(spec) == stable and pod_uids(spec, stable) == stable_pods
        ready = ready_pods(spec, candidate)
        assert ready and endpoint_pods(spec, f"{spec['name']}-preview") == ready
        assert f"service/{spec['name']}-preview" in notice and "p95" in notice
        # The release is still in flight: the model's lock (its Lease on the cluster) is held and renewed.
        c = parse_spec(spec).cluster
        kubeconfig = get_credentials.fn(project=c.project, location=c.location, name=c.name)
        with pytest.raises(LockTimeout, match="release@"), \
                model_lock(parse_spec(spec), purpose="test", timeout_s=1, kubeconfig=kubeconfig):
            pass
        assert any(t.name == f"lease-{spec['name']}-lock" and t.is_alive() for t in threading.enumerate())
        # Resume exactly as the notice says (Prefect's CLI against the API), with a reason and a name.
        cli = re.search(r"`(prefect api POST [^`]+)`", notice).group(1)
        cli = cli.replace('"reason": "..."', '"reason": "checked the preview"').replace('"by": "..."', '"by": "alice"')
        argv = shlex.split(cli)
        argv[0] = str(Path(sys.executable).with_name("prefect"))
        env = dict(os.environ, PREFECT_API_URL=str(PREFECT_API_URL.value()))
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "ACCEPT" in done.stdout, done.stdout + done.stderr
        result = run.join()
    assert result["color"] == candidate and live(spec) == candidate
    assert deployment(spec, candidate).metadata.annotations["llm-fleet.dev/model-revision"] == sha
    assert deployment(spec, stable).spec.template.to_dict() == template  # never changed in place
    rec = history(spec)[-1]
    assert rec["revision"] == sha and rec["result"] == "promoted" and rec["color"] == candidate
    assert rec["cause"] == "promoted by alice: checked the preview"
    assert flow_state(run_id) == "COMPLETED"
    assert any("Promoted by alice" in m["text"] or "promoted by alice" in m["text"] for m in sbc.slack_messages())


def test_resume_with_promote_false_aborts_and_rolls_back(gated, sandbox, sbc):
    from prefect.flow_runs import resume_flow_run

    spec = gated
    stable, candidate = live(spec), other(live(spec))
    stable_pods = pod_uids(spec, stable)
    sha = sandbox.hub.push_revision(MODEL, title="manual gate: abort")
    with Background(spec, sha) as run:
        run_id, _ = wait_gate(spec, sbc, sha, run)
        with pytest.raises(RuntimeError, match="promote"):  # a resume must say promote true or false
            resume_flow_run(UUID(run_id))
        assert flow_state(run_id) == "PAUSED"
        resume_flow_run(UUID(run_id), run_input={"promote": False, "reason": "answers too terse", "by": "bob"})
        with pytest.raises(Exception) as err:
            run.join()
    assert "aborted at the promotion gate by bob: answers too terse" in str(err.value)
    assert live(spec) == stable and pod_uids(spec, stable) == stable_pods  # the same live pods
    assert deployment(spec, candidate).spec.replicas == 0
    assert history(spec)[-1]["result"] == "rolled_back" and "bob" in history(spec)[-1]["cause"]
    thread = [m["text"] for m in sbc.slack_messages() if "Rolled back" in m["text"]]
    assert any("aborted at the promotion gate by bob: answers too terse" in t and f"stayed on {stable}" in t
               for t in thread)
    assert flow_state(run_id) == "FAILED"


def test_no_answer_within_the_timeout_rolls_back(gated, sandbox, sbc, caplog):
    """The run ends Failed with the cause in its state message and one ERROR line (Prefect's server would
    replace any state of a run whose pause expired with "The flow was failed and never resumed.")."""
    from prefect.client.orchestration import get_client

    spec = dict(gated, release=dict(GATED, promotion_timeout="10m"))  # ~1.2 s on the sandbox's clock
    stable, candidate = live(spec), other(live(spec))
    stable_pods = pod_uids(spec, stable)
    sha = sandbox.hub.push_revision(MODEL, title="manual gate: nobody answers")
    with caplog.at_level("INFO"), Background(spec, sha) as run:
        run_id, _ = wait_gate(spec, sbc, sha, run)
        with pytest.raises(Exception) as err:
            run.join()
    assert "nobody promoted" in str(err.value) and "release.promotion_timeout (10m)" in str(err.value)
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(UUID(run_id)).state
    assert state.type.value == "FAILED"
    assert "rolled back automatically" in state.message and "nobody promoted" in state.message, state.message
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and r.name in RUN_LOGGERS]
    assert len(errors) == 1 and "nobody promoted" in errors[0], errors
    assert live(spec) == stable and pod_uids(spec, stable) == stable_pods
    assert deployment(spec, candidate).spec.replicas == 0
    assert history(spec)[-1]["result"] == "rolled_back"
    assert any("Rolled back: nobody promoted" in m["text"] and f"stayed on {stable}" in m["text"]
               for m in sbc.slack_messages())


def test_killed_while_paused_then_rerun_gates_again_and_converges(gated, sandbox, sbc, monkeypatch):
    """A SIGKILL while paused leaves the run Paused with no process behind it and the candidate up. The
    rerun re-observes, previews and gates again (cancelling the dead run's gate), and promotes once."""
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run
    from prefect.states import Paused

    from targets.gke import promotion_gate

    class Killed(BaseException):  # like SIGKILL: no rollback code runs
        pass

    def killed(**_: Any):
        raise Killed("while paused")

    spec = gated
    stable, candidate = live(spec), other(live(spec))
    sha = sandbox.hub.push_revision(MODEL, title="manual gate: killed while paused")
    monkeypatch.setattr(promotion_gate, "pause_flow_run", killed)
    with Background(spec, sha) as first, pytest.raises(Killed):
        first.join()
    monkeypatch.undo()
    dead_run = re.search(r"/flow_runs/([0-9a-f-]{36})/resume", notices(sbc, sha)[0]).group(1)
    with get_client(sync_client=True) as client:  # what the dead process leaves on the server
        client.set_flow_run_state(UUID(dead_run), Paused(timeout_seconds=600, reschedule=False), force=True)
    assert live(spec) == stable and deployment(spec, candidate).spec.replicas > 0  # candidate left up
    with Background(spec, sha) as rerun:
        run_id, _ = wait_gate(spec, sbc, sha, rerun, skip=1)
        assert run_id != dead_run and flow_state(dead_run) == "CANCELLED"
        assert live(spec) == stable
        resume_flow_run(UUID(run_id), run_input={"promote": True, "by": "carol"})
        result = rerun.join()
    assert result["color"] == candidate and live(spec) == candidate
    assert deployment(spec, stable).spec.replicas == 0
    promoted = [h for h in history(spec) if h["revision"] == sha and h["result"] == "promoted"]
    assert len(promoted) == 1 and promoted[0]["cause"] == "promoted by carol"


def test_rollback_model_after_a_dead_gate_retires_the_candidate_instead_of_switching_to_it(gated, sandbox, sbc,
                                                                                            monkeypatch):
    """The candidate of a release killed at its gate is warm but was never promoted: rollback_model keeps the
    live color and scales the candidate to 0 (switching "back" to it would promote an unapproved revision)."""
    from flows import release_model as rm
    from targets.gke import promotion_gate

    class Killed(BaseException):
        pass

    def killed(**_: Any):
        raise Killed("while paused")

    spec = gated
    stable, candidate = live(spec), other(live(spec))
    stable_pods = pod_uids(spec, stable)
    sha = sandbox.hub.push_revision(MODEL, title="manual gate: killed, then rollback_model")
    monkeypatch.setattr(promotion_gate, "pause_flow_run", killed)
    with Background(spec, sha) as first, pytest.raises(Killed):
        first.join()
    monkeypatch.undo()
    assert deployment(spec, candidate).spec.replicas > 0
    out = rm.rollback_model(spec=spec)
    assert out["action"] == "abandoned_candidate" and out["color"] == stable
    assert live(spec) == stable and pod_uids(spec, stable) == stable_pods
    assert deployment(spec, candidate).spec.replicas == 0
    rec = history(spec)[-1]
    assert rec["revision"] == sha and rec["result"] == "rolled_back" and "never promoted" in rec["cause"]


def test_dry_run_shows_the_gate(gated, sandbox):
    from flows.release_model import release_model

    sha = sandbox.hub.push_revision(MODEL, title="manual gate: dry run")
    out = release_model(spec=gated, revision=sha, dry_run=True)
    gate = next(r for r in out["plan"] if r["step"] == "promotion_gate")
    assert gate["detail"].startswith("wait for promotion") and "24h" in gate["detail"]


def test_a_lease_that_cannot_be_renewed_stops_the_holder_loudly(monkeypatch):
    """A long pause keeps the lock only while Prefect can renew its lease; when it cannot, the holder is
    stopped with LockLost (it never goes on believing it holds the model)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.concurrency import _leases

    from manifests.spec import parse_spec
    from tasks.locks import LockLost, model_lock

    def gone(self, **_: Any) -> None:
        raise RuntimeError("410 Gone: lease not found - it may have expired or been revoked")

    monkeypatch.setattr(_leases, "_RENEWAL_RETRY_BASE_DELAY", 0.01)
    monkeypatch.setattr(_leases, "_RENEWAL_RETRY_MAX_DELAY", 0.01)
    monkeypatch.setattr(SyncPrefectClient, "renew_concurrency_lease", gone)
    spec = parse_spec(spec_dict("qwen2.5-7b-sglang.yaml"))
    start = time.monotonic()
    with pytest.raises(LockLost) as err, model_lock(spec, purpose="release"):
        while time.monotonic() - start < 30:
            time.sleep(0.05)  # a paused release polls like this
    assert "could not be renewed" in str(err.value) and "rerun release" in err.value.fix
    assert time.monotonic() - start < 10
