"""Pure park/wake decisions: the park record, hold proxy objects, schedules and prewarm, idle policy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from manifests import names
from manifests import park as P
from manifests.spec import ScheduleSpec, load_spec

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


def test_hold_proxy_is_cpu_only_runs_this_package_and_carries_the_spec_limits():
    dep = P.hold_proxy_deployment(GEMMA, prefect_api_url="http://prefect:4200/api", spec_ref="deployments/g.yaml")
    pod = dep["spec"]["template"]
    c = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert c["command"] == ["python", "-m", "llm_fleet.holdproxy"]
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
    for obj in (P.hold_proxy_deployment(GEMMA, prefect_api_url=None), P.awake_service(GEMMA, "blue")):
        kv.validate(obj, "1.33", strict=True)


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
    assert (park.deployment, park.cron, park.timezone) == ("park_model/default", "0 20 * * 1-5", "America/Chicago")
    assert (wake.deployment, wake.cron) == ("wake_model/default", "56 7 * * 1-5")  # p95 190 s → 4 min early
    assert wake.parameters == {"spec": "deployments/p.yaml", "reason": "schedule"}
    no_sched = GEMMA.model_copy(update={"schedule": None})
    assert P.desired_schedules(no_sched, spec_ref="x", wake_seconds=[]) == []


def test_plan_schedules_creates_updates_deletes_and_leaves_hand_made_ones():
    want = P.desired_schedules(PALI, spec_ref="p.yaml", wake_seconds=[])
    existing = {"park_model/default": [
        {"id": "1", "slug": want[0].slug, "cron": "0 19 * * 1-5", "timezone": "America/Chicago",
         "parameters": want[0].parameters},
        {"id": "2", "slug": "llm-fleet-park-gone", "cron": "0 1 * * *", "timezone": "UTC", "parameters": {}},
        {"id": "3", "slug": None, "cron": "0 3 * * *", "timezone": "UTC", "parameters": {}}],
        "wake_model/default": []}
    plan = {(c.slug, c.action) for c in P.plan_schedules(want, existing)}
    assert plan == {(want[0].slug, "update"), ("llm-fleet-park-gone", "delete"), (want[1].slug, "create")}
    same = {"park_model/default": [{"id": "1", "slug": want[0].slug, "cron": want[0].cron,
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
    from llm_fleet.holdproxy import Config

    env = {e["name"]: e["value"] for e in
           P.hold_proxy_deployment(GEMMA, prefect_api_url="http://p/api")["spec"]["template"]["spec"]["containers"][0]["env"]}
    dns = Config.from_env(env)
    assert dns.upstream == "http://gemma2-2b-it-awake.default.svc.cluster.local:8000"
    assert (dns.max_queue, dns.timeout_s, dns.retry_after_s) == (10_000, 300.0, 30)
    assert dns.prefect_api_url == "http://p/api" and dns.event == P.WAKE_EVENT
    linked = Config.from_env({**env, "GEMMA2_2B_IT_AWAKE_SERVICE_HOST": "10.0.0.7",
                              "GEMMA2_2B_IT_AWAKE_SERVICE_PORT": "8000"})
    assert linked.upstream == "http://10.0.0.7:8000"
