"""Seed 004's capacity list through the real flows (issue 23): a wake at 08:00 with the spot L4s gone is
answered on the on-demand option within its boot time — the held request too — and says so in Slack;
with every option gone the wake fails at once naming each option's refusal, and nothing is left Pending
or paid for. (The autoscaler's own behaviour — preemption, migration back, quota walls — is tested at
the sandbox level, tests/sandbox/test_capacity.py.)
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.flows.conftest import spec_dict
from tests.flows.test_park import complete, gpu_pods, live_service, slack_heads

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.long]
ZONES = ("us-central1-a", "us-central1-b")
STARTED: dict[str, float] = {}


def nodes_by_pool(kubeconfig: str) -> dict[str, str]:
    from tasks import k8s

    return {n["metadata"]["name"]: n["metadata"]["labels"].get("cloud.google.com/gke-nodepool", "")
            for n in k8s.list_objects.fn(kubeconfig=kubeconfig, api_version="v1", kind="Node")
            if "cloud.google.com/gke-accelerator" in n["metadata"]["labels"]}


def pod_pools(spec: dict, kubeconfig: str) -> list[str]:
    from tasks import k8s

    pools = nodes_by_pool(kubeconfig)
    return sorted(pools.get(p["spec"].get("nodeName"), "-") for p in k8s.list_objects.fn(
        kubeconfig=kubeconfig, api_version="v1", kind="Pod", namespace=spec["namespace"],
        label_selector=f"app.kubernetes.io/instance={spec['name']},app.kubernetes.io/component=model-server")
        if not p["metadata"].get("deletionTimestamp"))


@pytest.fixture(scope="module")
def seed004(prefect_server):
    from flows.deploy_model import deploy_model
    from flows.provision_cluster import provision_cluster

    spec = spec_dict("mistral-7b-vllm-spot.yaml", namespace="default", hold__image="local/llm-fleet",
                     hold__timeout=120, expose__ingress=None, expose__service_type="ClusterIP", schedule=None,
                     expose__playground=False)
    STARTED["at"] = time.time()
    prov = provision_cluster(spec=spec)
    assert prov["node_pool"] == "g2-standard-8"  # the first option's pool; the fallback's exists beside it
    out = deploy_model(spec=spec)
    assert pod_pools(spec, out["kubeconfig"]) == ["g2-standard-8"]  # spot, the preferred option
    return spec, out["kubeconfig"]


def test_the_hub_preflight_checks_the_fit_on_every_option(sandbox):
    """The real parameter count (7.24 B) fits the A100 option but not the L4 one at 70 % of its memory,
    though the id's "7B" did at validate time: the preflight names the option and the fix."""
    from pydantic import SecretStr

    from manifests.errors import PreflightError
    from manifests.spec import parse_spec
    from targets.hub import hub_preflight

    spec = parse_spec(spec_dict("mistral-7b-vllm-spot.yaml", engine__gpu_memory_utilization=0.70, capacity=[
        {"gpu": "nvidia-tesla-a100", "provisioning": "on-demand", "zones": ["us-central1-b"]},
        {"gpu": "nvidia-l4", "machine_type": "g2-standard-8", "provisioning": "on-demand", "zones": list(ZONES)}]))
    with pytest.raises(PreflightError) as err:
        hub_preflight(spec, SecretStr("hf_sandbox_read"))
    assert str(err.value).startswith("capacity[1]: mistralai/Mistral-7B-v0.1 needs ~17.2 GiB (7.24B params")
    assert "1 × nvidia-l4 has 17 GiB at engine.gpu_memory_utilization 0.7" in str(err.value)
    assert "set capacity[1].count: 2" in err.value.fix


def test_spot_gone_at_wake_answers_on_demand_and_the_held_request_too(seed004, sbc, sandbox):
    from flows.park import park_model, wake_model

    spec, kubeconfig = seed004
    park_model(spec=spec)
    seen = len(sandbox.gke.autoscaler.events)
    assert gpu_pods(spec, kubeconfig) == []
    for zone in ZONES:  # 08:00: the spot L4s are gone in both zones, on-demand ones are not
        sbc.set_stockout(zone, "nvidia-l4", spot=True)
    answer: dict = {}
    held = threading.Thread(target=lambda: answer.update(resp=complete(spec, kubeconfig, timeout=150)))
    held.start()
    time.sleep(1.0)
    woke = wake_model(spec=spec, reason="event")
    held.join(150)
    assert answer["resp"].status_code == 200, answer["resp"].text
    assert woke["woken"] and pod_pools(spec, kubeconfig) == ["g2-standard-8-od"]
    # the fallback's boot + load, not a flow timeout: the wake ended once the on-demand node served (its
    # wall time on this clock is mostly the loaded machine's flow overhead: 1 s real = 500 s cloud)
    # GKE's autoscaler tried spot in each zone, then started one on-demand node (after that, active
    # migration keeps asking for spot now and then, refused while it is gone: no second node)
    tried = [(e["kind"], e["pool"]) for e in sandbox.gke.autoscaler.events[seen:]
             if e["kind"] in ("scale_up", "scale_up_failed")]
    assert tried[:3] == [("scale_up_failed", "g2-standard-8")] * 2 + [("scale_up", "g2-standard-8-od")], tried
    assert ("scale_up", "g2-standard-8") not in tried and len(nodes_by_pool(kubeconfig)) == 1
    thread = [m["text"] for m in sbc.slack_messages() if "Capacity: served by option 1" in m.get("text", "")]
    assert thread and "— a fallback" in thread[-1]
    assert "option 0 (1× nvidia-l4 spot in us-central1-a, us-central1-b) skipped: us-central1-a: GCE out of " \
           "resources (ZONE_RESOURCE_POOL_EXHAUSTED)" in thread[-1]
    assert "Wait for GPU nodes (capacity options in priority order)" in slack_heads(sbc, "wake_model", spec["name"])[-1]


def test_every_option_gone_fails_the_wake_at_once_and_leaves_nothing_pending(seed004, sbc):
    from flows.park import park_model, wake_model
    from manifests.capacity import CapacityExhausted
    from manifests.park import read_record
    from tasks import k8s

    spec, kubeconfig = seed004
    parked = park_model(spec=spec)
    # the last wake's on-demand node goes with the pods, not after the autoscaler's unneeded time
    assert nodes_by_pool(kubeconfig) == {}, parked
    for zone in ZONES:
        sbc.set_stockout(zone, "nvidia-l4")  # spot and on-demand
    start = time.monotonic()
    with pytest.raises(CapacityExhausted) as err:
        wake_model(spec=spec, reason="manual")
    assert time.monotonic() - start < 60
    msg = str(err.value)
    assert "option 0 (1× nvidia-l4 spot" in msg and "option 1 (1× nvidia-l4 on-demand" in msg
    assert "GCE out of resources (ZONE_RESOURCE_POOL_EXHAUSTED)" in msg
    dep = k8s.get_object.fn(kubeconfig=kubeconfig, api_version="apps/v1", kind="Deployment",
                            name=f"{spec['name']}-blue", namespace=spec["namespace"])
    assert dep["spec"]["replicas"] == 0
    deadline = time.monotonic() + 20
    while gpu_pods(spec, kubeconfig) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert gpu_pods(spec, kubeconfig) == [] and nodes_by_pool(kubeconfig) == {}  # nothing Pending, nothing paid
    assert read_record(live_service(spec, kubeconfig)) is not None  # still parked: held requests keep their 503s
    sbc.clear_stockouts()
    assert wake_model(spec=spec, reason="manual")["woken"]  # once capacity is back, a wake works


def test_a_release_candidate_lands_on_the_first_option_with_capacity(seed004, sbc, sandbox):
    """Spot gone while a release brings up its candidate: the candidate runs on on-demand beside the live
    color, the release promotes it, and the capacity step counted every option's room."""
    from flows.release_model import release_model

    spec, kubeconfig = seed004
    for zone in ZONES:
        sbc.set_stockout(zone, "nvidia-l4", spot=True)
    sha = sandbox.hub.push_revision(spec["model"]["id"], title="new weights while spot is gone")
    seen = len(sandbox.gke.autoscaler.events)
    result = release_model(spec=spec, revision=sha)
    assert result["revision"] == sha and result["color"] == "green"
    # the candidate's node: spot refused in each zone, then on-demand (once the old color's spot node is
    # empty, active migration may move the new color onto it: that node already exists)
    grown = [(e["kind"], e["pool"]) for e in sandbox.gke.autoscaler.events[seen:]
             if e["kind"] in ("scale_up", "scale_up_failed")]
    assert grown[:3] == [("scale_up_failed", "g2-standard-8")] * 2 + [("scale_up", "g2-standard-8-od")], grown
    assert ("scale_up", "g2-standard-8") not in grown
    head = slack_heads(sbc, "release_model", spec["name"])[-1]
    assert "room per option: [0]" in head and "[1]" in head


def _live_address(sbc, spec: dict) -> str:
    want = f"{spec['namespace']}/{spec['name']}"
    for c in (sbc.state().get("clusters_kube") or {}).values():
        port = (c.get("service_ports") or {}).get(want)
        if port:
            return f"http://127.0.0.1:{port['port']}"
    raise AssertionError(f"no loopback address for {want}")


class _Load:
    """Constant completions through the live Service's own address (kube-proxy's path): every answer kept."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model, self.codes, self.errors = url, model, [], []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]

    def _run(self) -> None:
        import httpx

        # The one resend HTTP/1.1 allows every client (the keep-alive race at the retired color's SIGTERM), as
        # the campaign's load and test_release_model's; a refused or reset connection still counts.
        from bench.campaign import post_as_a_client

        with httpx.Client(base_url=self.url, timeout=60) as http:
            while not self.stop.is_set():
                try:
                    r, _ = post_as_a_client(http, "/v1/completions",
                                            {"model": self.model, "prompt": "Hi", "max_tokens": 2})
                    self.codes.append(r.status_code)
                except httpx.HTTPError as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.02)

    def __enter__(self) -> _Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(70)


def _no_idle_gpu_node(spec: dict, kubeconfig: str) -> None:
    """What the 30 minutes between two migrate_back runs give: the autoscaler has removed every idle GPU node
    (after its 10 unneeded minutes). A stockout refuses new VMs only, and the scheduler puts a candidate on
    a node with room before any scale-up, whatever the ComputeClass's order: an idle node left by the tests
    above (spot or on-demand) would decide where the candidate lands."""
    deadline = time.monotonic() + 30
    while len(nodes_by_pool(kubeconfig)) > len(pod_pools(spec, kubeconfig)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(nodes_by_pool(kubeconfig)) == len(pod_pools(spec, kubeconfig)), nodes_by_pool(kubeconfig)


def test_preferred_option_back_moves_a_single_replica_back_with_no_dropped_request(seed004, sbc, sandbox):
    """Issue 23: the single replica landed on on-demand while spot was gone. migrate_back decides from the
    cluster (live color on option 1, option 0 preferred) and brings a new color up beside the live one:
    while spot is still gone it lands on on-demand again and is scaled back to 0 (traffic never moved);
    once spot is back it lands there, is switched to, and the on-demand color is retired — all under
    constant load through the live Service, 0 failed requests."""
    from flows.migrate_back import migrate_back
    from tasks import k8s

    spec, kubeconfig = seed004
    assert pod_pools(spec, kubeconfig) == ["g2-standard-8-od"]  # the release above, while spot was gone
    live = live_service(spec, kubeconfig)["spec"]["selector"]["llm-fleet.dev/color"]
    for zone in ZONES:  # spot still gone
        sbc.set_stockout(zone, "nvidia-l4", spot=True)
    _no_idle_gpu_node(spec, kubeconfig)
    with _Load(_live_address(sbc, spec), spec["model"]["id"]) as load:
        stayed = migrate_back(spec=spec)  # spot still stocked out
        assert stayed["action"] == "stayed" and "no better than option 1" in stayed["reason"], stayed
        assert live_service(spec, kubeconfig)["spec"]["selector"]["llm-fleet.dev/color"] == live
        other = k8s.get_object.fn(kubeconfig=kubeconfig, api_version="apps/v1", kind="Deployment",
                                  name=f"{spec['name']}-{'green' if live == 'blue' else 'blue'}",
                                  namespace=spec["namespace"])
        assert other["spec"]["replicas"] == 0
        sbc.clear_stockouts()
        _no_idle_gpu_node(spec, kubeconfig)  # the on-demand node the scaled-back candidate used
        moved = migrate_back(spec=spec)
        assert moved["action"] == "migrated_back" and moved["color"] != live, moved
        mark = len(load.codes)
        deadline = time.monotonic() + 30
        while len(load.codes) < mark + 20 and time.monotonic() < deadline:
            time.sleep(0.1)
    assert load.errors == [] and set(load.codes) == {200}, (load.errors[:3], sorted(set(load.codes)))
    assert len(load.codes) > 50
    assert pod_pools(spec, kubeconfig) == ["g2-standard-8"]  # spot again, the old color retired
    assert migrate_back(spec=spec)["action"] == "none"  # already on the first option


def test_gpu_report_prices_each_option_it_ran_on(seed004):
    """The wakes and the release above ran on spot and on on-demand: each option's GPU-hours at its own
    price, so the fallback's surcharge shows in the cost."""
    from datetime import UTC, datetime

    from flows.gpu_report import gpu_report

    spec, _ = seed004
    out = gpu_report(specs=[spec], start=datetime.fromtimestamp(STARTED["at"], UTC), end=datetime.now(UTC))
    (row,) = [r for r in out["models"] if r["model"] == spec["name"]]
    spot, od = row["capacity_options"].split("; ")
    assert spot.startswith("[0] 1× nvidia-l4 spot") and "$0.34/GPU-h" in spot
    assert od.startswith("[1] 1× nvidia-l4 on-demand") and "$0.85/GPU-h (+150%)" in od
    hours = [float(part.rsplit(", ", 1)[1].split()[0]) for part in (spot, od)]
    assert hours[0] > 0 and hours[1] > 0, row
    assert row["gpu_hours"] == pytest.approx(sum(hours), rel=0.02, abs=2e-5)
    assert 0.34 < row["usd_per_gpu_hour"] < 0.85  # blended by what each option ran


def test_teardown_removes_the_class_and_every_option_pool(seed004):
    from flows.teardown import teardown
    from tasks import k8s

    spec, kubeconfig = seed004
    out = teardown(spec=spec)
    assert ("ComputeClass", "mistral-7b-default") in {(r["kind"], r["name"]) for r in out["removed"]}
    assert k8s.get_object.fn(kubeconfig=kubeconfig, api_version="cloud.google.com/v1", kind="ComputeClass",
                             name="mistral-7b-default") is None
    out = teardown(spec=spec, cluster=True)
    removed = {(r["kind"], r["name"]) for r in out["removed"]}
    assert {("NodePool", "g2-standard-8"), ("NodePool", "g2-standard-8-od"), ("Cluster", "vllm-serving-cluster")} \
        <= removed, removed
