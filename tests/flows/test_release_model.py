"""release_model against the sandbox: a blue-green swap under constant load, rollback of bad candidates,
crash-and-rerun convergence, and a watch proving the live Service never selects a color with no Ready pods.

One model is deployed once per module and released many times (each test pushes a new Hub revision). The
cluster is provisioned once per process and shared with tests/flows/test_promotion_gate.py: the tests that
need a model of their own deploy one of another name into it (the pool's max_nodes leaves room for them).
"""

from __future__ import annotations

import copy
import json
import logging
import re
import threading
import time
from typing import Any

import pytest

from tests.flows.conftest import spec_dict

pytestmark = pytest.mark.usefixtures("prefect_server")

MODEL = "Qwen/Qwen2.5-7B-Instruct"
COLOR = "llm-fleet.dev/color"
FAST_RELEASE = {
    # Small analyses keep each release to a few seconds on the sandbox's clock; the post-promotion window is
    # one batch (every batch is a task run) unless a test is about the window. No latency comparison with
    # the live color except where a test is about it (the bad candidates): it costs a second analysis per
    # release, and on a loaded machine side-by-side p50s are noise (a rerun once failed "9.8x slower").
    "pre_promotion": {"requests": 6, "concurrency": 3, "max_latency_ratio": None},
    "post_promotion": {"requests": 4, "window": "10s", "interval": "10s"},
    "scale_down_delay": "30s",
}
# The shared cluster's GPU pool (one GPU a node). At most: served and test_promotion_gate's model live, a
# second model live, two candidates at once (5).
POOL = {"max_nodes": 5, "min_nodes": 0, "initial_nodes": 1}
_CLUSTER: dict[int, dict] = {}


def in_shared_cluster(sandbox, filename: str, *, name: str, **overrides) -> dict:
    """A bundled spec renamed ``name``, placed in the cluster provisioned once for this process (and sandbox)."""
    from flows.provision_cluster import provision_cluster
    from manifests.spec import ClusterSpec

    spec = spec_dict(filename, name=name, **overrides)
    spec["accelerator"] = {"type": "nvidia-l4", "pool": dict(POOL)}
    cached = _CLUSTER.get(id(sandbox))
    # the clusters a module made end with it (tests/conftest.py): another module provisions its own
    if cached is None or not any((p, n) == (cached["project"], ClusterSpec.model_validate(cached).name)
                                 for p, _, n in sandbox.gke.cluster_keys()):
        provision_cluster(spec=spec)
        _CLUSTER[id(sandbox)] = spec["cluster"]
    spec["cluster"] = copy.deepcopy(_CLUSTER[id(sandbox)])
    return spec


_KUBE: dict[str, tuple] = {}


def kube(spec: dict):
    """Clients for the spec's cluster, built once per cluster the way the product builds them."""
    key = spec["cluster"]["project"]
    if key not in _KUBE:
        _KUBE[key] = _make_kube(spec)
    return _KUBE[key]


def _make_kube(spec: dict):
    from kubernetes import client

    from tasks.clients import kube_client
    from tasks.gke import get_credentials

    c = spec["cluster"]
    api = kube_client(get_credentials.fn(project=c["project"], location=c["location"], name=c.get("name", "llm-fleet")))
    return client.CoreV1Api(api), client.AppsV1Api(api), api


class _PacedClients:
    """Client threads that each pace themselves (``pause`` between requests) until the block ends, counting
    answers: tens of requests a second probe a switch all the way through without the load itself eating the
    CPU the release needs."""

    def __init__(self, threads: int, pause: float) -> None:
        self.pause = pause
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        raise NotImplementedError

    def _count(self, r: Any) -> None:
        if r.status_code == 200 and r.json()["choices"][0]["text"].strip():
            self.ok += 1
        else:
            self.failed.append(f"HTTP {r.status_code}")

    def __enter__(self) -> _PacedClients:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)


class Load(_PacedClients):
    """Constant load through the live Service (API server proxy), counting every failed request; the
    ServiceWatch is the exact check that no moment went without a Ready pod."""

    def __init__(self, spec: dict, threads: int = 2, pause: float = 0.05) -> None:
        from tasks.clients import kube_http

        _, _, api = kube(spec)
        self.http = kube_http(api, timeout=10)
        self.url = f"/api/v1/namespaces/default/services/{spec['name']}:http/proxy/v1/completions"
        super().__init__(threads, pause)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._count(self.http.post(self.url, json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}))
            except Exception as exc:  # noqa: BLE001 - every failure counts
                self.failed.append(type(exc).__name__)
            self._stop.wait(self.pause)


class AddressLoad(_PacedClients):
    """Keep-alive clients on the live Service's own loopback address (kube-proxy's path: a connection stays with
    the pod it first reached, so after the switch they keep talking to the old color until its pods close their
    connections at scale-down), paced like Load; every answer kept. A client sends a request again only when
    the server closed its reused connection before any answer (README, Releases), as the OpenAI SDK does."""

    def __init__(self, sbc, spec: dict, threads: int = 2, pause: float = 0.05) -> None:
        want = f"default/{spec['name']}"
        ports = [c["service_ports"][want]["port"] for c in (sbc.state().get("clusters_kube") or {}).values()
                 if want in (c.get("service_ports") or {})]
        assert len(ports) == 1, ports
        self.url = f"http://127.0.0.1:{ports[0]}"
        self.resent = 0
        super().__init__(threads, pause)

    def _run(self) -> None:
        import httpx

        from bench.campaign import post_as_a_client  # the one resend HTTP/1.1 allows, as the campaign's load

        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self._stop.is_set():
                try:
                    r, resent = post_as_a_client(http, "/v1/completions",
                                                 {"model": MODEL, "prompt": "Hi", "max_tokens": 2})
                    self.resent += resent
                    self._count(r)
                except httpx.HTTPError as exc:  # a reset or a refused connection: what I3 forbids
                    self.failed.append(f"{type(exc).__name__}: {exc}")
                self._stop.wait(self.pause)


class ServiceWatch:
    """Watches the live Service and its Endpoints for the whole test; records any moment the selected
    color had no Ready pod behind it (after the model first served)."""

    def __init__(self, spec: dict) -> None:
        self.core, _, _ = kube(spec)
        self.name = spec["name"]
        self.events: list[tuple[float, int]] = []
        self.selectors: list[str] = []
        self.switches: list[tuple[float, str]] = []  # (when seen, selected color)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._endpoints, daemon=True),
                         threading.Thread(target=self._service, daemon=True)]

    def _stream(self, list_fn, on_object) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            w = watch.Watch()
            try:
                for ev in w.stream(list_fn, "default", field_selector=f"metadata.name={self.name}", timeout_seconds=1,
                                     _request_timeout=5):
                    on_object(ev["object"])
                    if self._stop.is_set():
                        w.stop()
            except Exception:  # noqa: BLE001 - a dropped watch is resumed
                time.sleep(0.05)

    def _endpoints(self) -> None:
        def on(ep) -> None:
            ready = sum(len(s.addresses or []) for s in ep.subsets or [])
            self.events.append((time.time(), ready))

        self._stream(self.core.list_namespaced_endpoints, on)

    def _service(self) -> None:
        def on(svc) -> None:
            color = (svc.spec.selector or {}).get(COLOR)
            self.selectors.append(color)
            self.switches.append((time.time(), color))

        self._stream(self.core.list_namespaced_service, on)

    def first_seen(self, color: str) -> float:
        return next((t for t, c in self.switches if c == color), float("inf"))

    def gaps(self) -> list[tuple[float, int]]:
        seen_ready = False
        out = []
        for t, ready in self.events:
            if ready:
                seen_ready = True
            elif seen_ready:
                out.append((t, ready))
        return out

    def __enter__(self) -> ServiceWatch:
        for t in self._threads:
            t.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)


@pytest.fixture(scope="module")
def served(sandbox, prefect_server):
    """qwen-sglang serving on blue in the shared cluster, with room for both colors."""
    from flows.deploy_model import deploy_model

    spec = in_shared_cluster(sandbox, "qwen2.5-7b-sglang.yaml", name="qwen-sglang", release=dict(FAST_RELEASE))
    deploy_model(spec=spec)
    return spec


def live(spec: dict) -> str:
    core, _, _ = kube(spec)
    return core.read_namespaced_service(spec["name"], "default").spec.selector[COLOR]


def deployment(spec: dict, color: str):
    _, apps, _ = kube(spec)
    return apps.read_namespaced_deployment(f"{spec['name']}-{color}", "default")


def pod_uids(spec: dict, color: str) -> set[str]:
    core, _, _ = kube(spec)
    pods = core.list_namespaced_pod("default", label_selector=f"app.kubernetes.io/instance={spec['name']},{COLOR}={color}")
    return {p.metadata.uid for p in pods.items if not p.metadata.deletion_timestamp}


def history(spec: dict) -> list[dict]:
    core, _, _ = kube(spec)
    return service_history(core.read_namespaced_service(spec["name"], "default"))


def service_history(svc) -> list[dict]:
    return json.loads((svc.metadata.annotations or {}).get("llm-fleet.dev/release-history", "[]"))


def wait_service(spec: dict, until, *, timeout: float = 60.0) -> bool:
    """Block until ``until(service)`` holds for the live Service, by a watch (its first event is the Service
    as it is now), not a polling loop. False on timeout."""
    from kubernetes import watch

    core, _, _ = kube(spec)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        w = watch.Watch()
        try:
            for ev in w.stream(core.list_namespaced_service, "default", field_selector=f"metadata.name={spec['name']}",
                               timeout_seconds=max(1, min(5, int(deadline - time.monotonic()))), _request_timeout=15):
                if ev["type"] != "DELETED" and until(ev["object"]):
                    w.stop()
                    return True
        except Exception:  # noqa: BLE001 - a dropped watch is resumed
            time.sleep(0.1)
    return False


def release(spec: dict, **kw):
    from flows.release_model import release_model

    return release_model(spec=spec, **kw)


def test_release_swaps_under_load_with_no_failed_request(served, sandbox, sbc, caplog):
    spec = served
    before = live(spec)
    sha = sandbox.hub.push_revision(MODEL, title="new weights")
    with ServiceWatch(spec) as watch, Load(spec) as load, AddressLoad(sbc, spec) as direct, \
            caplog.at_level(logging.INFO):
        result = release(spec, revision=sha)
        time.sleep(0.3)
    # a normal release is no hand edit: its run logs no WARNING (issue 21: "differed from the spec … reapplied")
    warned = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.WARNING and r.name in (*RUN_LOGGERS, "llm_fleet")]
    assert warned == [], warned
    after = "green" if before == "blue" else "blue"
    assert result["color"] == after and result["revision"] == sha
    assert live(spec) == after
    assert deployment(spec, after).metadata.annotations["llm-fleet.dev/model-revision"] == sha
    assert deployment(spec, before).spec.replicas == 0  # retired after scale_down_delay
    assert load.failed == [] and load.ok > 20
    # through kube-proxy too: the clients that stayed on the old color were closed cleanly by its pods' shutdown
    assert direct.failed == [] and direct.ok > 20, direct.failed[:3]
    assert watch.gaps() == [], "the live Service selected a color with no Ready pod"
    assert set(watch.selectors) <= {"blue", "green"} and after in watch.selectors
    rec = history(spec)[-1]
    assert rec["revision"] == sha and rec["result"] == "promoted" and rec["previous_color"] == before
    # Analysis passed before the selector moved, and the figures are kept.
    assert result["times"]["analysis_passed"] <= result["times"]["switched"]
    assert result["figures"]["pre"]["errors"] == 0


# A flow run's own log lines (what `prefect flow-run logs` and the UI show): Prefect's client plumbing logs
# elsewhere (prefect.client, prefect.events, ...) and is not what these tests count.
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")

BAD = [
    ("crash_loop", {"mode": "crash_loop"}, "crash"),
    ("oom", {"mode": "oom"}, "memory"),
    ("load_timeout", {"mode": "slow_load", "load_seconds": 100_000}, "loading the model"),
    ("http_500", {"mode": "http_500"}, "HTTP 500"),
    ("wrong_answer", {"mode": "wrong_answers"}, "bad answer"),
    ("slower", {"mode": "ok", "tokens_per_s": 0.05}, "slower than the live color|p95 latency"),
]


@pytest.mark.parametrize(("case", "behavior", "cause"), BAD, ids=[b[0] for b in BAD])
def test_bad_candidate_is_rolled_back_and_live_untouched(served, sandbox, sbc, case, behavior, cause, caplog):
    # The release policy's default latency comparison with the live color is on (the "slower" case needs it).
    spec = dict(served, release=dict(FAST_RELEASE, pre_promotion={"requests": 6, "concurrency": 3}))
    stable = live(spec)
    candidate = "green" if stable == "blue" else "blue"
    stable_pods = pod_uids(spec, stable)
    stable_rev = deployment(spec, stable).metadata.annotations["llm-fleet.dev/model-revision"]
    sbc.add_behavior(labels={COLOR: candidate, "app.kubernetes.io/instance": spec["name"]}, **behavior)
    sha = sandbox.hub.push_revision(MODEL, title=f"bad: {case}")
    with caplog.at_level("INFO"), ServiceWatch(spec) as watch, Load(spec) as load, \
            pytest.raises(Exception) as err:
        release(spec, revision=sha)
    assert re.search(cause, str(err.value)), err.value
    # one ERROR line, the rollback's, naming the cause (the failing task's and the run's tracebacks at DEBUG)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and r.name in RUN_LOGGERS]
    assert len(errors) == 1 and "rolled back automatically" in errors[0] and re.search(cause, errors[0]), errors
    assert live(spec) == stable
    assert pod_uids(spec, stable) == stable_pods  # the live pods were never touched
    assert deployment(spec, stable).metadata.annotations["llm-fleet.dev/model-revision"] == stable_rev
    assert deployment(spec, candidate).spec.replicas == 0
    assert load.failed == [] and load.ok > 0
    assert watch.gaps() == []
    assert history(spec)[-1]["result"] == "rolled_back"
    thread = [m["text"] for m in sbc.slack_messages() if "release_model" in m["text"] or "Rolled back" in m["text"]]
    assert any("Rolled back" in t and re.search(cause, t) and f"stayed on {stable}" in t for t in thread)


def test_deploy_of_a_changed_spec_whose_candidate_crashes_is_one_error_line(served, sbc, caplog):
    """deploy_model of a changed pod template is a release: its rollback is one ERROR line with the cause, and
    the failing pod's last log lines are shown beside it (INFO), not as a second error."""
    from flows.deploy_model import deploy_model

    spec = dict(served, engine={"kind": "sglang", "extra_args": ["--mem-fraction-static", "0.8"]})
    stable = live(spec)
    candidate = "green" if stable == "blue" else "blue"
    stable_pods = pod_uids(spec, stable)
    sbc.add_behavior(labels={COLOR: candidate, "app.kubernetes.io/instance": spec["name"]}, mode="crash_loop")
    with caplog.at_level("INFO"), pytest.raises(Exception) as err:
        deploy_model(spec=spec)
    assert "crash" in str(err.value), err.value
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and r.name in RUN_LOGGERS]
    assert len(errors) == 1 and "rolled back automatically" in errors[0] and "crash" in errors[0], errors
    assert any(r.levelname == "INFO" and r.getMessage().startswith("last log lines of the failing pod")
               for r in caplog.records)
    assert live(spec) == stable and pod_uids(spec, stable) == stable_pods
    assert deployment(spec, candidate).spec.replicas == 0


def test_post_promotion_failure_switches_back(served, sandbox, sbc):
    """The candidate breaks right after the switch: traffic returns to the still-warm old color."""
    spec = dict(served, release=dict(FAST_RELEASE, post_promotion={"requests": 24, "window": "1h",
                                                                    "interval": "5m"}))
    stable = live(spec)
    candidate = "green" if stable == "blue" else "blue"
    _, _, api = kube(spec)
    core, _, _ = kube(spec)
    sha = sandbox.hub.push_revision(MODEL, title="breaks after promotion")
    broke = threading.Event()

    def switch_done() -> bool:
        # The release's own word that the switch step finished (its Slack head, updated in place): breaking
        # on the selector change alone raced the switch's endpoints check, which then failed first.
        return any(sha in m["text"] and "✅ Switch the live Service's selector" in m["text"]
                   for m in sbc.slack_messages())

    def break_after_switch() -> None:
        deadline = time.monotonic() + 120
        while not switch_done():
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        # Replacement pods crash: the candidate has no Ready pod while the live Service points at it.
        sbc.add_behavior(labels={COLOR: candidate, "app.kubernetes.io/instance": spec["name"]}, mode="crash_loop")
        sel = f"app.kubernetes.io/instance={spec['name']},{COLOR}={candidate}"
        for p in core.list_namespaced_pod("default", label_selector=sel).items:
            core.delete_namespaced_pod(p.metadata.name, "default", grace_period_seconds=0)
        broke.set()

    breaker = threading.Thread(target=break_after_switch, daemon=True)
    breaker.start()
    with pytest.raises(Exception) as err:
        release(spec, revision=sha)
    breaker.join(timeout=30)
    assert broke.is_set()
    assert "post-promotion" in str(err.value)
    assert live(spec) == stable
    assert deployment(spec, candidate).spec.replicas == 0
    assert history(spec)[-1]["result"] == "rolled_back"


def test_failed_endpoints_check_after_the_switch_switches_back(served, sandbox, monkeypatch):
    """The selector patch succeeded, then the live Service's endpoints check failed (endpoint lag, a
    candidate pod's readiness flapping under full traffic): traffic goes back to the stable color, which
    keeps its replicas, and the candidate — live for a moment — is scaled down only once it is not live.
    Failed before the fix: the switch was recorded only after the check, so the rollback left the Service
    on the candidate and scaled the candidate (the live color) to 0."""
    from tasks import k8s

    spec = served
    stable = live(spec)
    candidate = "green" if stable == "blue" else "blue"
    replicas = deployment(spec, stable).spec.replicas
    real, failed = k8s.wait_endpoints, []

    def flaky(**kw):
        if kw["service"] == spec["name"] and not failed and live(spec) == candidate:
            failed.append(kw["pods"])
            raise k8s.EndpointsNotReady(f"Service {spec['name']} endpoints did not converge in 60s", "test")
        return real(**kw)

    monkeypatch.setattr(k8s, "wait_endpoints", flaky)
    sha = sandbox.hub.push_revision(MODEL, title="endpoints check fails after the switch")
    with pytest.raises(Exception, match="endpoints did not converge"):
        release(spec, revision=sha)
    assert failed, "the endpoints check after the switch never ran"
    assert live(spec) == stable
    assert deployment(spec, stable).spec.replicas == replicas
    assert deployment(spec, candidate).spec.replicas == 0
    assert history(spec)[-1]["result"] == "rolled_back"


# Before the switch, after it, and (in tests/unit/test_release.py) during the scale-down delay.
@pytest.mark.parametrize("crash_after", ["bring_up", "switch"])
def test_killed_at_each_step_then_rerun_converges(served, sandbox, monkeypatch, crash_after):
    from targets.gke import bluegreen

    class Killed(BaseException):  # like SIGKILL: no rollback code runs
        pass

    spec = served
    before = live(spec)
    after = "green" if before == "blue" else "blue"
    sha = sandbox.hub.push_revision(MODEL, title=f"crash after {crash_after}")
    title, fn = bluegreen.STEPS[crash_after]

    def crashing(r):
        fn(r)
        raise Killed(crash_after)

    monkeypatch.setitem(bluegreen.STEPS, crash_after, (title, crashing))
    with ServiceWatch(spec) as watch:
        with pytest.raises(Killed):
            release(spec, revision=sha)
        monkeypatch.setitem(bluegreen.STEPS, crash_after, (title, fn))
        result = release(spec, revision=sha)
    assert live(spec) == after and result["color"] == after
    assert deployment(spec, after).metadata.annotations["llm-fleet.dev/model-revision"] == sha
    assert deployment(spec, before).spec.replicas == 0
    assert watch.gaps() == []
    promoted = [h for h in history(spec) if h["revision"] == sha and h["result"] == "promoted"]
    assert len(promoted) == 1


def test_killed_recreate_release_then_failed_rerun_restores_the_original_count(served, sandbox, sbc, monkeypatch):
    """strategy recreate, killed right after it stopped the live color; the rerun's candidate crashes: the
    rollback brings the stable color back to the count it had (stored on its Deployment), not to the 0 the
    rerun observed. Failed before the fix: the model stayed at 0 replicas."""
    from targets.gke import bluegreen

    class Killed(BaseException):  # like SIGKILL: no rollback code runs
        pass

    spec = dict(served, release=dict(FAST_RELEASE, strategy="recreate"))
    stable = live(spec)
    replicas = deployment(spec, stable).spec.replicas
    assert replicas > 0
    sha = sandbox.hub.push_revision(MODEL, title="recreate: killed, then a crashing candidate")
    title, fn = bluegreen.STEPS["stop_live"]

    def crashing(r):
        fn(r)
        raise Killed("stop_live")

    monkeypatch.setitem(bluegreen.STEPS, "stop_live", (title, crashing))
    with pytest.raises(Killed):
        release(spec, revision=sha)
    monkeypatch.setitem(bluegreen.STEPS, "stop_live", (title, fn))
    assert deployment(spec, stable).spec.replicas == 0
    sbc.add_behavior(revision=sha, mode="crash_loop")
    with pytest.raises(Exception):  # noqa: B017 - the candidate's crash, whatever its class
        release(spec, revision=sha)
    assert live(spec) == stable
    assert deployment(spec, stable).spec.replicas == replicas
    assert "llm-fleet.dev/replicas-before-stop" not in (deployment(spec, stable).metadata.annotations or {})


def test_deploy_of_changed_spec_releases_instead_of_updating_in_place(served):
    from flows.deploy_model import deploy_model

    spec = dict(served)
    stable = live(spec)
    candidate = "green" if stable == "blue" else "blue"
    stable_pods = pod_uids(spec, stable)
    template_before = deployment(spec, stable).spec.template.to_dict()
    spec["engine"] = {"kind": "sglang", "extra_args": ["--mem-fraction-static", "0.85"]}
    events: list[tuple[float, str, str, bool]] = []  # every change to a stable pod: (when, type, uid, deleting)
    stop = threading.Event()

    def watch_stable() -> None:
        from kubernetes import watch

        core, _, _ = kube(spec)
        sel = f"app.kubernetes.io/instance={spec['name']},{COLOR}={stable}"
        while not stop.is_set():
            w = watch.Watch()
            try:
                for ev in w.stream(core.list_namespaced_pod, "default", label_selector=sel, timeout_seconds=1,
                                   _request_timeout=5):
                    p = ev["object"]
                    events.append((time.time(), ev["type"], p.metadata.uid, p.metadata.deletion_timestamp is not None))
                    if stop.is_set():
                        w.stop()
            except Exception:  # noqa: BLE001 - a dropped watch is resumed
                time.sleep(0.05)

    t = threading.Thread(target=watch_stable, daemon=True)
    t.start()
    try:
        with ServiceWatch(spec) as svc_watch:
            result = deploy_model(spec=spec)
    finally:
        # also when the deploy raised: a watcher left running retried 20 times a second once the module's
        # cluster was deleted, a new TLS connection each time (0.5 of a core for the rest of a CI run)
        stop.set()
        t.join(timeout=10)
    assert result["action"] == "released" and live(spec) == candidate
    switched = svc_watch.first_seen(candidate)
    before = [e for e in events if e[0] < switched]
    assert before, "the stable pods were never observed before the switch"
    assert all(typ != "DELETED" and uid in stable_pods and not deleting for _, typ, uid, deleting in before), (
        "a live pod was replaced before the switch")
    assert deployment(spec, stable).spec.template.to_dict() == template_before  # never changed in place
    args = deployment(spec, candidate).spec.template.spec.containers[0].args
    assert "--mem-fraction-static" in args


@pytest.fixture(scope="module")
def second(sandbox, served):
    """A second model (another engine) in the same cluster and GPU pool, serving on blue."""
    from flows.deploy_model import deploy_model

    spec = in_shared_cluster(sandbox, "gemma2-2b-it-vllm-l4.yaml", name="gemma2-2b-it", release=dict(FAST_RELEASE))
    deploy_model(spec=spec)
    return spec


def test_capacity_preflight_refuses_before_creating_anything(second, sandbox):
    spec = dict(second, replicas=POOL["max_nodes"])  # both colors at once: one more than the pool's max
    _, apps, _ = kube(spec)

    def deployments() -> dict[str, str]:
        items = apps.list_namespaced_deployment("default", label_selector=f"app.kubernetes.io/instance={spec['name']}")
        return {d.metadata.name: d.metadata.resource_version for d in items.items}

    before = deployments()
    sha = sandbox.hub.push_revision(second["model"]["id"], title="no room")
    with pytest.raises(Exception) as err:
        release(spec, revision=sha)
    assert "max_nodes" in str(err.value) and "recreate" in str(err.value)
    assert deployments() == before  # nothing created, nothing scaled
    assert f"{spec['name']}-{live(spec)}" in before


def test_dry_run_prints_the_plan_and_changes_nothing(served, sandbox):
    spec = served
    stable = live(spec)
    rv = kube(spec)[0].read_namespaced_service(spec["name"], "default").metadata.resource_version
    sha = sandbox.hub.push_revision(MODEL, title="dry")
    out = release(spec, revision=sha, dry_run=True)
    assert out["action"] == "release"
    assert [row["step"] for row in out["plan"]][1:] == ["capacity", "bring_up", "preview", "pre_analysis", "switch",
                                                        "post_analysis", "record", "scale_down"]
    assert live(spec) == stable
    assert kube(spec)[0].read_namespaced_service(spec["name"], "default").metadata.resource_version == rv


def test_rollback_model_switches_back_while_warm_then_redeploys_after(served, sandbox):
    from flows.release_model import rollback_model

    spec = dict(served, release=dict(FAST_RELEASE, scale_down_delay="1h"))  # 7 s warm on the sandbox clock
    first = live(spec)
    old_rev = deployment(spec, first).metadata.annotations["llm-fleet.dev/model-revision"]
    sha = sandbox.hub.push_revision(MODEL, title="to be rolled back")
    box: dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.setdefault("r", release(spec, revision=sha)), daemon=True)
    t.start()
    assert wait_service(spec, lambda s: any(h["revision"] == sha for h in service_history(s)))
    out = rollback_model(spec=spec)  # during scale_down_delay: the old color is still warm
    assert out["action"] == "switched_back" and live(spec) == first
    assert deployment(spec, first).metadata.annotations["llm-fleet.dev/model-revision"] == old_rev
    t.join(timeout=60)
    assert live(spec) == first  # the release's delayed scale-down saw the rollback and kept it
    # Once the other color is cold, rollback_model redeploys the previous revision from the history.
    second = "green" if first == "blue" else "blue"
    assert deployment(spec, second).spec.replicas == 0
    out = rollback_model(spec=dict(spec, release=dict(FAST_RELEASE)))
    assert out["action"] == "released" and out["revision"] == sha and live(spec) == second


def test_two_releases_of_one_model_are_serialized(served, sandbox):
    spec = served
    revs = [sandbox.hub.push_revision(MODEL, title=f"concurrent {i}") for i in range(2)]
    threads = [threading.Thread(target=release, args=(spec,), kwargs={"revision": r}, daemon=True) for r in revs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    done = [h for h in history(spec) if h["revision"] in revs]
    assert [h["result"] for h in done] == ["promoted", "promoted"]
    # Never interleaved: the second release started from what the first one promoted.
    assert done[1]["previous_revision"] == done[0]["revision"]
    assert deployment(spec, live(spec)).metadata.annotations["llm-fleet.dev/model-revision"] == done[1]["revision"]


def test_two_models_release_in_parallel(served, second, sandbox):
    other = second
    jobs = [(served, sandbox.hub.push_revision(MODEL, title="parallel")),
            (other, sandbox.hub.push_revision(other["model"]["id"], title="parallel"))]
    spans: dict[str, tuple[float, float]] = {}

    def run(spec: dict, rev: str) -> None:
        start = time.monotonic()
        release(spec, revision=rev)
        spans[spec["name"]] = (start, time.monotonic())

    threads = [threading.Thread(target=run, args=job, daemon=True) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert len(spans) == 2
    (s1, e1), (s2, e2) = spans.values()
    assert max(s1, s2) < min(e1, e2), "the two models' releases did not overlap"
    assert history(other)[-1]["result"] == "promoted"
