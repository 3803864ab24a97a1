"""Pure park/wake decisions: the park record, hold proxy objects, schedules and prewarm, idle policy."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from manifests import names
from manifests import park as P
from manifests.spec import ScheduleSpec, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[2]
GEMMA = load_spec(ROOT / "deployments/gemma2-2b-it-vllm-l4.yaml")
PALI = load_spec(ROOT / "deployments/paligemma2-tgi-autopilot.yaml")
NOW = datetime(2026, 11, 24, 22, 0, tzinfo=UTC)  # Tuesday 23:00 in Brussels: outside gemma's window


def test_park_record_round_trips_through_an_annotation():
    rec = P.ParkRecord("green", 2, names.selector(GEMMA, "green"), NOW.isoformat(),
                       P.PoolState("gpupool", True, 1, 2, 2), held=True)
    assert P.ParkRecord.from_annotation(rec.to_annotation()) == rec
    svc = {"metadata": {"annotations": {P.PARK_RECORD: rec.to_annotation()}}}
    assert P.read_record(svc) == rec and P.read_record({"metadata": {}}) is None
    auto = P.ParkRecord("blue", 1, {}, "t")
    assert P.ParkRecord.from_annotation(auto.to_annotation()).pool is None


def test_pool_state_counts_nodes_per_zone():
    pool = {"name": "gpupool", "autoscaling": {"enabled": True, "min_node_count": 1, "max_node_count": 3},
            "locations": ["europe-west1-b", "europe-west1-c"]}
    assert P.pool_state(pool, 4, 2) == P.PoolState("gpupool", True, 1, 3, 2)


def test_park_record_keeps_what_park_changed_on_the_pool_and_reads_older_records():
    rec = P.ParkRecord("blue", 1, {}, "t", P.PoolState("gpupool", True, 1, 2, 1), pool_changed=("min",))
    assert P.ParkRecord.from_annotation(rec.to_annotation()) == rec
    older = '{"color":"blue","held":true,"parked_at":"t","pool":null,"replicas":1,"selector":{}}'
    assert P.ParkRecord.from_annotation(older).pool_changed is None  # parked before pools were shared



def test_park_record_keeps_the_endpoint_pickers_replicas_and_reads_older_records():
    read = {"m-blue-epp": {"spec": {"replicas": 2}}, "m-green-epp": {"spec": {"replicas": 0}}, "gone-epp": None}
    # a picker found at 0 comes back as the chart's 1: its pool gets traffic again once the route returns
    assert P.picker_replicas(read) == {"m-blue-epp": 2, "m-green-epp": 1}
    rec = P.ParkRecord("blue", 1, {}, "t", route={"m-blue": 100, "m-green": 0}, pickers=P.picker_replicas(read))
    assert P.ParkRecord.from_annotation(rec.to_annotation()) == rec
    older = '{"color":"blue","held":true,"parked_at":"t","pool":null,"replicas":1,"route":{"m-blue":100},"selector":{}}'
    assert P.ParkRecord.from_annotation(older).pickers is None  # park records them before scaling them down


NODES = ["gke-gpupool-1", "gke-gpupool-2"]


def pod(instance: str | None, node: str | None, *, ns: str = "default", phase: str = "Running", owner: str = "ReplicaSet",
        selector: dict | None = None, annotations: dict | None = None) -> dict:
    return {"metadata": {"name": f"{instance or 'x'}-pod", "namespace": ns, "annotations": annotations or {},
                         "labels": {"app.kubernetes.io/instance": instance} if instance else {},
                         "ownerReferences": [{"kind": owner, "name": "o"}]},
            "spec": {"nodeName": node, "nodeSelector": selector or {}}, "status": {"phase": phase}}


def deployment(instance: str, replicas: int, pool: str = "gpupool") -> dict:
    return {"metadata": {"name": instance, "namespace": "default", "labels": {"app.kubernetes.io/instance": instance}},
            "spec": {"replicas": replicas, "template": {"spec": {"nodeSelector": {P.POOL_LABEL: pool}}}}}


def test_pool_users_are_other_workloads_on_or_bound_for_the_pool():
    def users(pods=(), deps=()):
        return P.pool_users(model="a", namespace="default", pool="gpupool", nodes=NODES, pods=list(pods),
                            deployments=list(deps))

    assert users([pod("a", NODES[0]), pod("b", NODES[1])]) == ["b"]
    assert users([pod(None, NODES[0], ns="team")]) == ["team/x-pod"]  # not ours: still a user
    assert users([pod("b", None, selector={P.POOL_LABEL: "gpupool"})]) == ["b"]  # pending, bound for it
    assert users([pod("b", "gke-other-1")]) == []  # another pool's node
    assert users([pod("b", None, selector={P.POOL_LABEL: "cpu"})]) == []
    assert users([pod(None, NODES[0], owner="DaemonSet"),  # the node's own: device plugin, logging
                  pod(None, NODES[0], owner="Node", annotations={"kubernetes.io/config.mirror": "x"}),
                  pod(None, NODES[0], ns="kube-system"), pod(None, NODES[0], ns="gke-managed-system"),
                  pod("b", NODES[0], phase="Succeeded")]) == []
    # a Deployment asking for replicas there counts before its pods exist (a wake or release in flight)
    assert users(deps=[deployment("b", 1), deployment("c", 0), deployment("d", 1, pool="other"),
                       deployment("a", 1)]) == ["b"]
    # a model is its namespace and name: a same-named model in another namespace is another user
    # (failed before: it was taken for the model itself, so park could zero the pool under it)
    assert users([pod("a", NODES[0], ns="team")]) == ["team/a"]
    other = deployment("a", 1)
    other["metadata"]["namespace"] = "team"
    assert users(deps=[other]) == ["team/a"]


POOL = P.PoolState("gpupool", True, 1, 2, 1)


def test_park_zeroes_a_pool_nobody_else_needs_and_only_lowers_the_minimum_of_a_shared_one():
    alone = P.plan_park_pool(POOL, users=[])
    assert (alone.min_nodes, alone.size, alone.changed) == (0, 0, ("min", "size"))
    shared = P.plan_park_pool(POOL, users=["gemma-b"])
    assert (shared.min_nodes, shared.size, shared.changed) == (0, None, ("min",))
    assert "shared with gemma-b" in shared.note and "cluster autoscaler" in shared.note
    fixed = P.plan_park_pool(P.PoolState("gpupool", False, 0, 0, 2), users=["gemma-b"])
    assert (fixed.min_nodes, fixed.size, fixed.changed) == (None, None, ())
    assert "autoscaling is off" in fixed.note
    # a rerun on the zeroed pool changes nothing and keeps what the first run recorded
    again = P.plan_park_pool(P.PoolState("gpupool", True, 0, 2, 0), users=[], changed=("min", "size"))
    assert (again.min_nodes, again.size, again.changed) == (None, None, ("min", "size"))


def rec(changed, pool=POOL) -> P.ParkRecord:
    return P.ParkRecord("blue", 1, {}, "t", pool, pool_changed=changed)


def test_wake_undoes_exactly_what_its_park_changed_and_never_shrinks_the_pool():
    zeroed = P.PoolState("gpupool", True, 0, 2, 0)
    plan = P.plan_wake_pool(rec(("min", "size")), zeroed)
    assert (plan.min_nodes, plan.size) == (1, 1)
    assert (P.plan_wake_pool(rec(None), zeroed).min_nodes, P.plan_wake_pool(rec(None), zeroed).size) == (1, 1)
    # restored meanwhile (another model's wake, the autoscaler): left alone, never shrunk
    grown = P.plan_wake_pool(rec(("min", "size")), P.PoolState("gpupool", True, 1, 2, 2))
    assert (grown.min_nodes, grown.size) == (None, None) and "already restored" in grown.note
    # a shared park changed nothing: its wake changes nothing, also on a pool another park zeroed
    other = P.plan_wake_pool(rec(()), zeroed)
    assert (other.min_nodes, other.size) == (None, None) and "autoscaler adds nodes" in other.note
    # a minimum someone set again since is not ours to touch
    assert P.plan_wake_pool(rec(("min",)), P.PoolState("gpupool", True, 2, 3, 2)).min_nodes is None
    # at 0 without autoscaling nothing would ever bring a node: sized up
    assert P.plan_wake_pool(rec(()), P.PoolState("gpupool", False, 0, 0, 0)).size == 1
    assert P.plan_wake_pool(P.ParkRecord("blue", 1, {}, "t"), zeroed) == P.PoolPlan(note="Autopilot: nodes come with the pods")


def test_wake_sizes_the_pool_for_its_replicas_not_the_peak_park_saw():
    """Park right after a release sees two nodes (both colors); one replica needs one. Failed before: the
    wake restored the peak (2)."""
    peak = P.PoolState("gpupool", True, 1, 4, 2)
    one = P.ParkRecord("blue", 1, {}, "t", peak, pool_changed=("min", "size"))
    assert P.plan_wake_pool(one, P.PoolState("gpupool", True, 0, 4, 0)).size == 1
    two = P.ParkRecord("blue", 2, {}, "t", peak, pool_changed=("min", "size"))
    assert P.plan_wake_pool(two, P.PoolState("gpupool", True, 0, 4, 0)).size == 2


def test_two_models_on_one_pool_park_and_wake_in_any_order_without_evicting_each_other():
    """A and B share a pool (min 1, max 2 per zone, one node each): replay the plans against a pool model."""

    def apply(pool: P.PoolState, plan: P.PoolPlan) -> P.PoolState:
        if plan.min_nodes is not None:
            pool = P.PoolState(pool.name, True, plan.min_nodes, pool.max_nodes, max(pool.nodes_per_zone, plan.min_nodes))
        if plan.size is not None:
            pool = P.PoolState(pool.name, pool.autoscaling, pool.min_nodes, pool.max_nodes, plan.size)
        return pool

    start = P.PoolState("gpupool", True, 1, 2, 2)
    park_a = P.plan_park_pool(start, users=["b"])
    pool = apply(start, park_a)
    assert pool.nodes_per_zone == 2  # B's node stays; the autoscaler removes A's
    pool = P.PoolState("gpupool", True, 0, 2, 1)
    rec_b = rec(None, pool)
    park_b = P.plan_park_pool(pool, users=[])
    pool = apply(pool, park_b)
    assert pool.nodes_per_zone == 0 and park_b.changed == ("size",)
    rec_a, rec_b = rec(park_a.changed, start), P.ParkRecord("blue", 1, {}, "t", rec_b.pool, pool_changed=park_b.changed)
    for first, second in ((rec_a, rec_b), (rec_b, rec_a)):
        p = apply(pool, P.plan_wake_pool(first, pool))
        p = apply(p, P.plan_wake_pool(second, p))
        assert (p.min_nodes, p.nodes_per_zone) == (1, 1)  # A's minimum back, B's node back, nothing more


def test_hold_proxy_is_cpu_only_runs_this_package_and_carries_the_spec_limits():
    dep = P.hold_proxy_deployment(GEMMA, prefect_api_url="http://prefect:4200/api", spec_ref="deployments/g.yaml")
    pod = dep["spec"]["template"]
    c = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    assert c["command"] == ["python", "-m", "servers.holdproxy"]
    # Prefect credentials come from a Secret through the kubelet, never in the Deployment's text.
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
    assert {n: r["name"] for n, r in refs.items()} == {"PREFECT_API_AUTH_STRING": P.PREFECT_AUTH_SECRET,
                                                       "PREFECT_API_KEY": P.PREFECT_AUTH_SECRET}
    assert "nvidia.com/gpu" not in str(c["resources"]) and "nodeSelector" not in pod["spec"]
    assert env["HOLD_MAX_QUEUE"] == "10000" and env["HOLD_TIMEOUT_S"] == "300"
    assert env["PREFECT_API_URL"] == "http://prefect:4200/api" and env["HOLD_SPEC"] == "deployments/g.yaml"
    assert env["HOLD_UPSTREAM_SERVICE"] == P.awake_service_name(GEMMA)
    # the live Service's hold selector matches the proxy's pods, not the model's
    labels = pod["metadata"]["labels"]
    assert all(labels[k] == v for k, v in P.hold_selector(GEMMA).items())
    assert P.awake_service(GEMMA, "green")["spec"]["selector"] == names.selector(GEMMA, "green")


def test_kubernetes_validates_the_hold_objects():
    kv = pytest.importorskip("kubernetes_validate")
    for obj in (P.hold_proxy_deployment(GEMMA, prefect_api_url=None), P.awake_service(GEMMA, "blue"),
                P.hold_proxy_budget(GEMMA)):
        kv.validate(obj, "1.33", strict=True)


def test_hold_proxy_survives_one_disruption_and_its_queue_fits_its_memory():
    """Two proxy pods and a budget of one unavailable (before: one pod, no budget: a drain left a parked model
    with nobody holding); held bodies bounded in bytes below the memory limit (before: 10,000 × 64 MiB)."""
    dep = P.hold_proxy_deployment(GEMMA, prefect_api_url=None)
    c = dep["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    limit = int(c["resources"]["limits"]["memory"].removesuffix("Mi")) * 2**20
    assert 0 < int(env["HOLD_MAX_QUEUE_BYTES"]) <= limit // 2
    assert dep["spec"]["replicas"] >= 2
    pdb = P.hold_proxy_budget(GEMMA)
    assert pdb["spec"]["maxUnavailable"] == 1
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in pdb["spec"]["selector"]["matchLabels"].items())
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize(("cron", "minutes", "shifted"), [
    ("0 8 * * 1-5", 4, "56 7 * * 1-5"),
    ("0 8 * * *", 61, "59 6 * * *"),
    ("2 0 * * 1-5", 4, "58 23 * * 0,1,2,3,4"),  # across midnight: a day earlier
    ("0 0 * * 0", 1, "59 23 * * 6"),
    ("30 8,12 * * *", 30, "0 8,12 * * *"),
    ("0 8 * * *", 0, "0 8 * * *"),
    ("*/5 8 * * *", 3, None),  # not a fixed time: no shift
    ("0 8 1 * *", 3, None),
])
def test_shift_cron(cron, minutes, shifted):
    assert P.shift_cron(cron, minutes) == shifted


def test_prewarm_is_the_p95_of_measured_wakes_or_the_spec_default():
    sched = ScheduleSpec(park="0 20 * * *", wake="0 8 * * *", prewarm="5m")
    assert P.prewarm_s(sched, [100, 120]) == 300  # too few wakes measured yet
    wakes = [100.0] * 19 + [400.0]
    assert P.prewarm_s(sched, wakes) == 100.0 and P.p95([*wakes, 400.0]) == 400.0
    history: list[float] = []
    for i in range(30):
        history = P.add_wake(history, i)
    assert len(history) == P.WAKE_HISTORY and history[-1] == 29


def test_desired_schedules_carry_cron_timezone_and_a_prewarmed_wake():
    park, wake = P.desired_schedules(PALI, spec_ref="deployments/p.yaml", wake_seconds=[170, 180, 190])
    assert (park.deployment, park.cron, park.timezone) == ("park_model/park", "0 20 * * 1-5", "America/Chicago")
    assert (wake.deployment, wake.cron) == ("wake_model/wake-on-request", "56 7 * * 1-5")  # p95 190 s → 4 min early
    assert wake.parameters == {"spec": "deployments/p.yaml", "reason": "schedule"}
    no_sched = GEMMA.model_copy(update={"schedule": None})
    assert P.desired_schedules(no_sched, spec_ref="x", wake_seconds=[]) == []


def test_plan_schedules_creates_updates_deletes_and_leaves_hand_made_ones():
    want = P.desired_schedules(PALI, spec_ref="p.yaml", wake_seconds=[])
    existing = {"park_model/park": [
        {"id": "1", "slug": want[0].slug, "cron": "0 19 * * 1-5", "timezone": "America/Chicago",
         "parameters": want[0].parameters},
        {"id": "2", "slug": "llm-fleet-park-gone", "cron": "0 1 * * *", "timezone": "UTC", "parameters": {}},
        {"id": "3", "slug": None, "cron": "0 3 * * *", "timezone": "UTC", "parameters": {}}],
        "wake_model/wake-on-request": []}
    plan = {(c.slug, c.action) for c in P.plan_schedules(want, existing)}
    assert plan == {(want[0].slug, "update"), ("llm-fleet-park-gone", "delete"), (want[1].slug, "create")}
    same = {"park_model/park": [{"id": "1", "slug": want[0].slug, "cron": want[0].cron,
                                    "timezone": want[0].timezone, "parameters": want[0].parameters}]}
    assert {c.action for c in P.plan_schedules(want[:1], same)} == {"unchanged"}


def test_awake_window_follows_the_crons_in_their_time_zone():
    s = GEMMA.schedule  # 08:00-20:00 Europe/Brussels, every day
    assert P.in_awake_window(s, datetime(2026, 11, 24, 10, 0, tzinfo=UTC))  # 11:00 Brussels
    assert not P.in_awake_window(s, datetime(2026, 11, 24, 19, 30, tzinfo=UTC))  # 20:30 Brussels
    assert not P.in_awake_window(PALI.schedule, datetime(2026, 11, 28, 18, 0, tzinfo=UTC))  # Saturday
    assert not P.in_awake_window(ScheduleSpec(idle_after="5m"), NOW)


VLLM = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 5.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 7.0
"""
TGI = """# TYPE tgi_queue_size gauge
tgi_queue_size 3
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 1
# TYPE tgi_request_count counter
tgi_request_count 42
"""


def test_parse_metrics_reads_the_engines_gauges_and_counters():
    assert P.parse_metrics(VLLM, "vllm") == P.Metrics(2.0, 1.0, 12.0)
    assert P.parse_metrics(TGI, "tgi") == P.Metrics(1.0, 3.0, 42.0)


def test_activity_moves_only_with_traffic():
    t1, t2 = NOW, NOW + timedelta(minutes=3)
    first, known = P.observe_activity(None, P.Metrics(0, 0, 10), t1)
    assert not known and first.last_active == t1.isoformat()
    same, known = P.observe_activity(first, P.Metrics(0, 0, 10), t2)
    assert known and same == first
    moved, _ = P.observe_activity(first, P.Metrics(0, 0, 11), t2)
    assert moved.last_active == t2.isoformat()
    busy, _ = P.observe_activity(first, P.Metrics(1, 0, 10), t2)
    assert busy.last_active == t2.isoformat()
    assert P.Activity.from_annotation(moved.to_annotation()) == moved


def obs(idle_min: float | None, **kw) -> P.Observed:
    last = None if idle_min is None else NOW - timedelta(minutes=idle_min)
    return P.Observed(**{"model": "m", "parked": False, "replicas": 1, "in_flight": 0, "last_active": last, **kw})


@pytest.mark.parametrize(("observed", "when", "action", "why"), [
    (obs(10), NOW, "park", "idle 10m00s ≥ idle_after 3m00s"),
    (obs(2), NOW, "keep", "idle 2m00s < idle_after"),
    (obs(None), NOW, "keep", "first observation"),
    (obs(10, in_flight=2), NOW, "keep", "2 request(s) in flight"),
    (obs(10, parked=True), NOW, "skip", "already parked"),
    (obs(10, replicas=0), NOW, "skip", "no replicas"),
    (obs(600), datetime(2026, 11, 24, 10, 0, tzinfo=UTC), "keep", "inside the scheduled awake window"),
])
def test_decide_park(observed, when, action, why):
    d = P.decide_park(observed, GEMMA.schedule, when)
    assert d.action == action and why in d.reason
    assert set(d.row()) == {"model", "idle for", "action", "reason"}


def test_decide_park_in_the_window_only_when_the_spec_allows_it():
    allow = GEMMA.schedule.model_copy(update={"idle_in_awake_window": True})
    in_window = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
    assert P.decide_park(obs(600, last_active=in_window - timedelta(hours=1)), allow, in_window).action == "park"
    assert P.decide_park(obs(600), None, NOW).reason == "no schedule.idle_after in the spec"


def test_hold_proxy_finds_its_upstream_by_service_link_then_dns():
    from servers.holdproxy import Config

    env = {e["name"]: e["value"] for e in
           P.hold_proxy_deployment(GEMMA, prefect_api_url="http://p/api")["spec"]["template"]["spec"]["containers"][0]["env"]
           if "value" in e}
    dns = Config.from_env(env)
    assert dns.upstream == "http://gemma2-2b-it-awake.default.svc.cluster.local:8000"
    assert (dns.max_queue, dns.timeout_s, dns.retry_after_s) == (10_000, 300.0, 30)
    assert dns.prefect_api_url == "http://p/api" and dns.event == P.WAKE_EVENT
    linked = Config.from_env({**env, "GEMMA2_2B_IT_AWAKE_SERVICE_HOST": "10.0.0.7",
                              "GEMMA2_2B_IT_AWAKE_SERVICE_PORT": "8000"})
    assert linked.upstream == "http://10.0.0.7:8000"


def test_a_hold_proxy_on_its_way_out_finishes_the_request_it_forwards():
    """What wake's scale-down of the proxy relies on: SIGTERM stops new connections, not answers in flight."""
    import http.server
    import os
    import signal
    import subprocess
    import sys
    import threading

    import httpx

    from sandbox.core import free_port

    arrived = threading.Event()

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # /v1/models: the model answers
            self._reply(b'{"data": []}')

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            arrived.set()
            time.sleep(1.5)  # a long generation
            self._reply(b'{"choices": [{"text": "done"}]}')

        def _reply(self, body):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = free_port()
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "HOLD_MODEL": "m", "HOLD_TIMEOUT_S": "10",
           "HOLD_UPSTREAM_URL": f"http://127.0.0.1:{upstream.server_address[1]}", "HOLD_POLL_S": "0.05"}
    proxy = subprocess.Popen([sys.executable, "-m", "servers.holdproxy"], env=env, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(url + "/healthz", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the hold proxy did not start"
                time.sleep(0.05)
        answer: dict = {}
        t = threading.Thread(target=lambda: answer.update(
            resp=httpx.post(url + "/v1/completions", json={"prompt": "x"}, timeout=10)))
        t.start()
        assert arrived.wait(5)
        proxy.send_signal(signal.SIGTERM)  # what the kubelet does when wake scales the proxy to 0
        t.join(10)
        assert answer["resp"].status_code == 200 and answer["resp"].json()["choices"][0]["text"] == "done"
        assert proxy.wait(10) == 0
    finally:
        proxy.kill()
        upstream.shutdown()


def test_the_hold_image_is_the_flows_image_and_checked_before_park(monkeypatch):
    """hold.image defaults to LLM_FLEET_IMAGE (the README's flows image, the sandbox's env file sets it); none
    set is one error naming the field and the fix, before park changes anything."""
    from manifests.errors import PreflightError

    monkeypatch.setenv("LLM_FLEET_IMAGE", "us-docker.pkg.dev/p/llm-fleet/flows:abc123")
    spec = parse_spec({**GEMMA.model_dump(mode="json", by_alias=True), "hold": {}})
    assert P.require_image(spec, "the hold proxy") == "us-docker.pkg.dev/p/llm-fleet/flows:abc123"
    monkeypatch.delenv("LLM_FLEET_IMAGE")
    bare = parse_spec({**GEMMA.model_dump(mode="json", by_alias=True), "hold": {}})
    with pytest.raises(PreflightError, match="hold.image") as err:
        P.require_image(bare, "the hold proxy")
    assert "LLM_FLEET_IMAGE" in err.value.fix and "docker build" in err.value.fix


# ---- learned arrivals: park at once in quiet hours ----------------------------------------------------

BRUSSELS = P.ZoneInfo("Europe/Brussels")


def learned(rate_per_h: float, *, days: int = 3, at: datetime = NOW) -> P.Arrivals:
    """Arrivals observed once an hour for ``days`` days, ``rate_per_h`` requests each hour."""
    t, counter = at - timedelta(days=days), 0.0
    a = P.observe_arrivals(None, counter, t, BRUSSELS)
    while t < at:
        t, counter = t + timedelta(hours=1), counter + rate_per_h
        a = P.observe_arrivals(a, counter, t, BRUSSELS)
    return a


def test_arrivals_credit_parked_hours_and_count_a_fresh_engines_requests():
    t0 = datetime(2026, 11, 24, 0, 30, tzinfo=UTC)  # 01:30 in Brussels
    a = P.observe_arrivals(None, 40.0, t0, BRUSSELS)
    assert a.hours == (0.0,) * 24 and a.requests == 40.0
    # parked 01:30 -> 04:15; the woken engine's counter restarted and has served the 3 held requests
    a = P.observe_arrivals(a, 3.0, t0 + timedelta(hours=2, minutes=45), BRUSSELS)
    assert a.hours[1] == pytest.approx(0.5) and a.hours[2] == a.hours[3] == pytest.approx(1.0)
    assert a.hours[4] == pytest.approx(0.25) and a.counts[4] == 3.0 and sum(a.counts) == 3.0
    assert P.Arrivals.from_annotation(a.to_annotation()) == a
    assert a.rate(2) is None  # one hour of 02:00 seen: not known yet


def test_arrivals_fade_so_a_changed_pattern_is_learned_again():
    busy = learned(100.0, days=20)
    assert busy.hours[23] == P.ARRIVAL_MEMORY_HOURS and busy.rate(23) == pytest.approx(100.0)
    t, quiet = NOW, busy
    for _ in range(14 * 24):  # two quiet weeks
        t += timedelta(hours=1)
        quiet = P.observe_arrivals(quiet, quiet.requests, t, BRUSSELS)
    assert quiet.rate(23) < 0.5 * busy.rate(23)


@pytest.mark.parametrize(("arrivals", "wake_s", "action", "why"), [
    (learned(0.7), 90.0, "park", "23:00-23:59 sees 0.7 req/h (next in ~1h25m) > 2 × wake 1m30s"),
    (learned(0.0), 90.0, "park", "next in ~never"),
    (learned(60.0), 90.0, "keep", "idle 1m00s < idle_after 3m00s"),  # next in 1 min < 2 wakes: wait it out
    (learned(0.7, days=1), 90.0, "keep", "idle_after"),  # one 23:00 seen: not known yet
    (learned(0.7), None, "keep", "idle_after"),  # no wake measured nor schedule
    (None, 90.0, "keep", "idle_after"),
])
def test_decide_park_early_in_hours_whose_next_request_is_far(arrivals, wake_s, action, why):
    d = P.decide_park(obs(1), GEMMA.schedule, NOW, arrivals=arrivals, wake_s=wake_s)
    assert d.action == action and why in d.reason, d.reason


def test_decide_park_early_needs_one_idle_tick_the_window_and_the_spec():
    quiet = learned(0.0)
    assert P.decide_park(obs(0.5), GEMMA.schedule, NOW, arrivals=quiet, wake_s=90.0).action == "keep"
    off = GEMMA.schedule.model_copy(update={"learned_idle": False})
    assert P.decide_park(obs(1), off, NOW, arrivals=quiet, wake_s=90.0).action == "keep"
    in_window = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
    d = P.decide_park(obs(1, last_active=in_window - timedelta(minutes=1)), GEMMA.schedule, in_window,
                      arrivals=learned(0.0, at=in_window), wake_s=90.0)
    assert d.action == "keep" and "awake window" in d.reason


def test_learned_idle_must_be_a_boolean():
    from manifests.spec import SpecError

    data = {**GEMMA.model_dump(mode="json", by_alias=True, exclude_none=True)}
    data["schedule"] = {**data["schedule"], "learned_idle": "sometimes"}
    with pytest.raises(SpecError, match=r"schedule\.learned_idle.*'sometimes' is not a boolean.*use true or false"):
        parse_spec(data)
