"""The sandbox cluster's controllers: deployments, rollouts, scheduler, kubelet states, Autopilot, endpoints."""

from __future__ import annotations

import os
import threading
import time

import pytest
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from sandbox.core import Clock, Faults
from sandbox.kube import KubeCluster
from tests.sandbox.kube_support import StubRuntime, api_client, deployment, http_client, wait_for

SCALE = 0.002
L4 = {"cloud.google.com/gke-accelerator": "nvidia-l4"}
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
TOLERATE_GPU = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


@pytest.fixture
def runtime():
    return StubRuntime(Clock(SCALE))


@pytest.fixture
def kube(runtime):
    k = KubeCluster(clock=runtime.clock, faults=Faults(), runtime=runtime)
    k.start()
    yield k
    k.stop()


@pytest.fixture
def api(kube):
    return api_client(kube)


@pytest.fixture
def core(api):
    return client.CoreV1Api(api)


@pytest.fixture
def apps(api):
    return client.AppsV1Api(api)


def gpu_node(kube, name, gpus=1, labels=None, taint=True):
    kube.add_node(name, labels={**L4, **(labels or {})}, capacity={"nvidia.com/gpu": str(gpus)},
                  taints=[GPU_TAINT] if taint else [])


def gpu_deployment(name, **kw):
    kw.setdefault("gpus", 1)
    kw.setdefault("node_selector", dict(L4))
    kw.setdefault("tolerations", TOLERATE_GPU)
    return deployment(name, **kw)


def pods(core, ns="default", selector=None):
    return core.list_namespaced_pod(ns, label_selector=selector).items


def ready(p) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])


def events_for(core, name, ns="default"):
    return [(e.reason, e.message) for e in core.list_namespaced_event(
        ns, field_selector=f"involvedObject.name={name}").items]


# ---- deployments -----------------------------------------------------------------------------------
def test_deployment_becomes_available(kube, core, apps):
    gpu_node(kube, "n1", gpus=2)
    apps.create_namespaced_deployment("default", gpu_deployment("m", replicas=2))
    wait_for(lambda: (apps.read_namespaced_deployment("m", "default").status.ready_replicas or 0) == 2)
    d = apps.read_namespaced_deployment("m", "default")
    assert (d.status.replicas, d.status.updated_replicas, d.status.available_replicas) == (2, 2, 2)
    assert d.status.observed_generation == d.metadata.generation
    conds = {c.type: (c.status, c.reason) for c in d.status.conditions}
    assert conds == {"Available": ("True", "MinimumReplicasAvailable"),
                     "Progressing": ("True", "NewReplicaSetAvailable")}
    rs = apps.list_namespaced_replica_set("default").items
    assert len(rs) == 1 and rs[0].metadata.owner_references[0].kind == "Deployment"
    h = rs[0].metadata.labels["pod-template-hash"]
    assert rs[0].metadata.name == f"m-{h}" and rs[0].metadata.annotations["deployment.kubernetes.io/revision"] == "1"
    ps = pods(core, selector="app=m")
    assert all(p.metadata.labels["pod-template-hash"] == h and p.metadata.name.startswith(f"m-{h}-") for p in ps)
    p = ps[0]
    assert p.status.phase == "Running" and p.spec.node_name == "n1" and p.status.pod_ip.startswith("10.")
    cs = p.status.container_statuses[0]
    assert cs.ready and cs.started and cs.state.running.started_at and cs.restart_count == 0
    reasons = [r for r, _ in events_for(core, p.metadata.name)]
    assert reasons[:2] == ["Scheduled", "Pulling"] and {"Pulled", "Created", "Started"} <= set(reasons)
    assert any(r == "ScalingReplicaSet" for r, _ in events_for(core, "m"))


def test_readiness_is_visible_at_once(kube, core, apps, runtime):
    """The runtime's on_ready writes Ready itself, before it returns (no poll in between): a read right
    after on_ready sees Ready, and the watch delivers it. Checked by order, not by wall time."""
    gpu_node(kube, "n1")
    runtime.load_s = 100  # 0.2 s real
    started = threading.Event()  # start() has returned: on_ready takes the direct path, not start's own write
    ready_on_return: list[bool] = []
    real_start = runtime.start

    def start(pod, *, on_ready, on_exit):
        def mark():
            started.wait(10)
            on_ready()
            p = core.read_namespaced_pod(pod["metadata"]["name"], "default")
            ready_on_return.append(ready(p))
        server = real_start(pod, on_ready=mark, on_exit=on_exit)
        started.set()
        return server

    runtime.start = start
    rv = core.list_namespaced_pod("default").metadata.resource_version
    apps.create_namespaced_deployment("default", gpu_deployment("fast"))
    w = watch.Watch()
    seen = False
    for ev in w.stream(core.list_namespaced_pod, "default", resource_version=rv, timeout_seconds=30):
        if ready(ev["object"]):
            seen = True
            w.stop()
    wait_for(lambda: ready_on_return)  # mark's own read may finish after the watch's event
    assert seen and ready_on_return == [True]


def test_scale_up_and_down_stops_servers(kube, core, apps, runtime):
    gpu_node(kube, "n1", gpus=4)
    apps.create_namespaced_deployment("default", gpu_deployment("s", replicas=3))
    wait_for(lambda: len(kube.ready_pod_ports("default", {"app": "s"})) == 3)
    apps.patch_namespaced_deployment_scale("s", "default", {"spec": {"replicas": 1}},
                                           _content_type="application/merge-patch+json")
    wait_for(lambda: len(pods(core, selector="app=s")) == 1)
    assert len(kube.ready_pod_ports("default", {"app": "s"})) == 1
    wait_for(lambda: sum(1 for s in runtime.started if not s._stopped.is_set()) == 1)
    apps.patch_namespaced_deployment("default" and "s", "default", {"spec": {"replicas": 0}})
    wait_for(lambda: not pods(core, selector="app=s"))
    wait_for(lambda: all(s._stopped.is_set() for s in runtime.started))
    d = wait_for(lambda: (d := apps.read_namespaced_deployment("s", "default")).status.replicas is None and d)
    assert {c.type: c.status for c in d.status.conditions} == {"Available": "True", "Progressing": "True"}


def test_a_scale_patch_is_reapplied_over_a_concurrent_write_not_refused(kube, apps):
    """``kubectl scale`` / ``patch .../scale`` name no resourceVersion: the API server re-applies the patch to
    whatever a controller wrote meanwhile (its status updates) and never answers 409 Conflict for it; one
    that names a stale resourceVersion is refused."""
    from sandbox.kube.controllers.common import DEPLOYS

    apps.create_namespaced_deployment("default", gpu_deployment("busy", replicas=0))
    stop = threading.Event()

    def write_status() -> None:  # what the deployment controller does, a write every millisecond
        n = 0
        while not stop.wait(0.001):
            n += 1
            kube.store.mutate(DEPLOYS, "default", "busy",
                              lambda d, n=n: {**d, "status": {**(d.get("status") or {}), "observedGeneration": n}})

    writer = threading.Thread(target=write_status, daemon=True)
    writer.start()
    try:
        for i in range(60):
            apps.patch_namespaced_deployment_scale("busy", "default", {"spec": {"replicas": i % 2}},
                                                   _content_type="application/merge-patch+json")
    finally:
        stop.set()
        writer.join()
    assert apps.read_namespaced_deployment("busy", "default").spec.replicas == 1
    stale = apps.read_namespaced_deployment_scale("busy", "default").metadata.resource_version
    kube.store.mutate(DEPLOYS, "default", "busy", lambda d: {**d, "status": {"observedGeneration": 0}})
    with pytest.raises(ApiException) as info:
        apps.patch_namespaced_deployment_scale("busy", "default", {"metadata": {"resourceVersion": stale},
                                                                   "spec": {"replicas": 0}})
    assert info.value.status == 409


def test_scaled_down_pods_pass_through_terminating():
    """A scaled-down pod is marked for deletion first (kubectl shows Terminating, a watch sees MODIFIED with
    deletionTimestamp), its server gets SIGTERM, and it is gone only once the engine has exited (2 cloud s)."""
    from sandbox.kube.controllers import PODS
    from sandbox.kube.controllers.common import T
    from sandbox.kube.controllers.kubelet import SHUTDOWN_SECONDS

    runtime = StubRuntime(Clock(0.1))
    k = KubeCluster(clock=runtime.clock, faults=Faults(), runtime=runtime)
    k.start()
    try:
        k.add_node("n1", capacity={"nvidia.com/gpu": "4"})
        k.api.create(T[("apps", "deployments")], "default", deployment("t", replicas=2))
        wait_for(lambda: len(k.ready_pod_ports("default", {"app": "t"})) == 2, timeout=20)
        seen: list[tuple[float, str, bool]] = []
        k.subscribe(lambda t, o: seen.append((time.monotonic(), t, bool(o["metadata"].get("deletionTimestamp"))))
                    if o.get("kind") == "Pod" else None)
        k.store.mutate(T[("apps", "deployments")], "default", "t", lambda d: {**d, "spec": {**d["spec"], "replicas": 1}})
        wait_for(lambda: len(k.store.list(PODS, "default")[0]) == 1, timeout=20)
        wait_for(lambda: any(t == "DELETED" for _, t, _ in seen), timeout=5)
        marked = next(at for at, t, gone in seen if t == "MODIFIED" and gone)
        deleted = next(at for at, t, _ in seen if t == "DELETED")
        assert deleted - marked >= runtime.clock.scaled(SHUTDOWN_SECONDS) * 0.9
    finally:
        k.stop()


def test_rolling_update_replaces_pods(kube, core, apps):
    gpu_node(kube, "n1", gpus=2)
    apps.create_namespaced_deployment("default", gpu_deployment("r", replicas=1))
    wait_for(lambda: (apps.read_namespaced_deployment("r", "default").status.ready_replicas or 0) == 1)
    old = {p.metadata.name for p in pods(core, selector="app=r")}
    apps.patch_namespaced_deployment("r", "default", {"spec": {"template": {"spec": {"containers": [
        {"name": "server", "image": "vllm/vllm-openai:v0.7.0"}]}}}})

    def done():
        d = apps.read_namespaced_deployment("r", "default")
        ps = pods(core, selector="app=r")
        return (d.status.updated_replicas == 1 and d.status.ready_replicas == 1 and len(ps) == 1
                and ps[0].metadata.name not in old and ready(ps[0]))

    wait_for(done)
    rss = {r.metadata.name: r for r in apps.list_namespaced_replica_set("default").items}
    assert len(rss) == 2
    assert sorted((r.spec.replicas, r.metadata.annotations["deployment.kubernetes.io/revision"])
                  for r in rss.values()) == [(0, "1"), (1, "2")]
    d = apps.read_namespaced_deployment("r", "default")
    assert d.metadata.generation == 2 and d.status.observed_generation == 2
    # The controller mirrors the new ReplicaSet's revision onto the Deployment, as the real one does.
    assert d.metadata.annotations["deployment.kubernetes.io/revision"] == "2"


def test_rolling_update_without_surge_fits_one_gpu(kube, core, apps):
    """maxSurge 0 / maxUnavailable 1 on a single GPU: the old pod goes first, then the new one runs."""
    gpu_node(kube, "n1", gpus=1)
    strategy = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    apps.create_namespaced_deployment("default", gpu_deployment("ns0", strategy=strategy))
    wait_for(lambda: len(kube.ready_pod_ports("default", {"app": "ns0"})) == 1)
    apps.patch_namespaced_deployment("ns0", "default", {"spec": {"template": {"metadata": {
        "annotations": {"rev": "2"}}}}})
    wait_for(lambda: [p for p in pods(core, selector="app=ns0")
                      if ready(p) and (p.metadata.annotations or {}).get("rev") == "2"], timeout=10)


def test_recreate_strategy(kube, core, apps):
    gpu_node(kube, "n1", gpus=2)
    apps.create_namespaced_deployment("default", gpu_deployment("rc", replicas=2, strategy={"type": "Recreate"}))
    wait_for(lambda: len(kube.ready_pod_ports("default", {"app": "rc"})) == 2)
    seen_mixed = []

    def watch_mix(stop):
        while not stop.is_set():
            hashes = {p.metadata.labels["pod-template-hash"] for p in pods(core, selector="app=rc")}
            if len(hashes) > 1:
                seen_mixed.append(hashes)
            time.sleep(0.005)

    stop = threading.Event()
    t = threading.Thread(target=watch_mix, args=(stop,))
    t.start()
    apps.patch_namespaced_deployment("rc", "default", {"spec": {"template": {"metadata": {
        "annotations": {"rev": "2"}}}}})
    wait_for(lambda: len([p for p in pods(core, selector="app=rc")
                          if ready(p) and (p.metadata.annotations or {}).get("rev") == "2"]) == 2)
    stop.set()
    t.join()
    assert not seen_mixed  # never old and new pods at once


def test_progress_deadline_exceeded(kube, core, apps):
    apps.create_namespaced_deployment("default", gpu_deployment("late", progress_deadline=30))  # 0.06 s
    d = wait_for(lambda: any(c.reason == "ProgressDeadlineExceeded" for c in
                             apps.read_namespaced_deployment("late", "default").status.conditions or [])
                 and apps.read_namespaced_deployment("late", "default"))
    conds = {c.type: (c.status, c.reason) for c in d.status.conditions}
    assert conds["Progressing"] == ("False", "ProgressDeadlineExceeded")
    assert conds["Available"] == ("False", "MinimumReplicasUnavailable")
    # progress (a node appears, the pod becomes ready) clears it
    gpu_node(kube, "n1")
    wait_for(lambda: {c.type: c.reason for c in apps.read_namespaced_deployment("late", "default").status.conditions}
             .get("Progressing") == "NewReplicaSetAvailable")


def test_a_progress_deadline_is_never_shorter_than_the_clocks_real_floor(kube, core, apps):
    """The flow tests' sandbox floors cloud-side deadlines in real seconds (Clock.min_deadline_s, the product's
    own load-wait floor): 30 cloud s is 0.06 s here, and a pod a starved machine held up a couple of real
    seconds missed a bundled spec's 17 minutes. The deadline still fires, at the floor."""
    kube.clock.min_deadline_s = 0.8
    try:
        start = time.monotonic()
        apps.create_namespaced_deployment("default", gpu_deployment("late", progress_deadline=30))
        wait_for(lambda: any(c.reason == "ProgressDeadlineExceeded" for c in
                             apps.read_namespaced_deployment("late", "default").status.conditions or []), timeout=10)
        assert time.monotonic() - start >= 0.8
    finally:
        kube.clock.min_deadline_s = 0.0


# ---- scheduler -------------------------------------------------------------------------------------
def _pending_message(core, selector):
    def get():
        for p in pods(core, selector=selector):
            for c in p.status.conditions or []:
                if c.type == "PodScheduled" and c.status == "False":
                    return p, c
        return None

    return wait_for(get)


def test_unschedulable_reasons(kube, core, apps):
    apps.create_namespaced_deployment("default", gpu_deployment("u"))
    p, c = _pending_message(core, "app=u")
    assert c.reason == "Unschedulable" and c.message == "no nodes available to schedule pods"
    assert p.status.phase == "Pending"
    apps.delete_namespaced_deployment("u", "default")
    wait_for(lambda: not pods(core, selector="app=u"))
    kube.add_node("cpu", capacity={"cpu": "8"})
    gpu_node(kube, "busy", gpus=1, labels={"cloud.google.com/gke-accelerator": "nvidia-l4"})
    gpu_node(kube, "a100", gpus=1, labels={"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"})
    filler = gpu_deployment("filler")
    filler["spec"]["template"]["spec"]["nodeSelector"]["kubernetes.io/hostname"] = "busy"
    apps.create_namespaced_deployment("default", filler)
    # a GPU pod gets the GPU toleration by admission (ExtendedResourceToleration); one that asks for no GPU
    # but selects the GPU nodes does not tolerate their taint
    apps.create_namespaced_deployment("default", deployment("u2", node_selector=dict(L4)))
    wait_for(lambda: [p for p in pods(core, selector="app=filler") if p.spec.node_name == "busy"])
    apps.create_namespaced_deployment("default", gpu_deployment("u3"))

    def message(sel):
        return wait_for(lambda: next((c.message for p in pods(core, selector=sel) for c in p.status.conditions or []
                                      if c.type == "PodScheduled" and c.status == "False"
                                      and "3 " not in c.message[:3] and c.message.startswith("0/3")), None))

    assert message("app=u3") == ("0/3 nodes are available: 1 Insufficient nvidia.com/gpu, "
                                 "2 node(s) didn't match Pod's node affinity/selector.")
    m = message("app=u2")
    assert "node(s) had untolerated taint {nvidia.com/gpu: present}" in m
    pod = pods(core, selector="app=u3")[0].metadata.name
    assert ("FailedScheduling", "0/3 nodes are available: 1 Insufficient nvidia.com/gpu, "
            "2 node(s) didn't match Pod's node affinity/selector.") in events_for(core, pod)


def test_pending_pod_schedules_when_a_node_arrives_and_gpus_are_counted(kube, core, apps):
    apps.create_namespaced_deployment("default", gpu_deployment("w", replicas=3, gpus=2))
    _pending_message(core, "app=w")
    gpu_node(kube, "big", gpus=4)
    wait_for(lambda: len([p for p in pods(core, selector="app=w") if p.spec.node_name == "big"]) == 2)
    time.sleep(0.05)
    assert len([p for p in pods(core, selector="app=w") if p.spec.node_name]) == 2  # 4 GPUs, 2 each
    gpu_node(kube, "big2", gpus=2)
    wait_for(lambda: len(kube.ready_pod_ports("default", {"app": "w"})) == 3)


def test_remove_node_evicts_and_replaces(kube, core, apps, runtime):
    gpu_node(kube, "n1")
    apps.create_namespaced_deployment("default", gpu_deployment("e"))
    first = wait_for(lambda: [p for p in pods(core, selector="app=e") if ready(p)])[0]
    assert kube.remove_node("n1")
    assert not kube.remove_node("n1")
    wait_for(lambda: [p for p in pods(core, selector="app=e") if p.metadata.name != first.metadata.name
                      and p.status.phase == "Pending"])
    assert kube.ready_pod_ports("default", {"app": "e"}) == []
    wait_for(lambda: all(s._stopped.is_set() for s in runtime.started))
    gpu_node(kube, "n2")
    wait_for(lambda: [p for p in pods(core, selector="app=e") if ready(p) and p.spec.node_name == "n2"])


# ---- kubelet states --------------------------------------------------------------------------------
def test_image_pull_error(kube, core, apps):
    gpu_node(kube, "n1")
    apps.create_namespaced_deployment("default", gpu_deployment("img", labels={"app": "img",
                                                                                "mode": "image_pull_error"}))

    def waiting(reason):
        return wait_for(lambda: next((p for p in pods(core, selector="app=img")
                                      if p.status.container_statuses and
                                      p.status.container_statuses[0].state.waiting and
                                      p.status.container_statuses[0].state.waiting.reason == reason), None))

    p = waiting("ErrImagePull")
    assert "failed to pull and unpack image" in p.status.container_statuses[0].state.waiting.message
    waiting("ImagePullBackOff")
    evs = events_for(core, p.metadata.name)
    assert any(r == "Failed" and m.startswith('Failed to pull image "vllm/vllm-openai:v0.6.3"') for r, m in evs)
    with pytest.raises(ApiException) as info:
        core.read_namespaced_pod_log(p.metadata.name, "default")
    assert info.value.status == 400 and "trying and failing to pull image" in info.value.body


@pytest.mark.parametrize(("mode", "code", "reason"), [("crash_loop", 1, "Error"), ("oom", 137, "OOMKilled")])
def test_crash_loop_backoff(kube, core, apps, mode, code, reason):
    gpu_node(kube, "n1")
    apps.create_namespaced_deployment("default", gpu_deployment("c", labels={"app": "c", "mode": mode}))
    p = wait_for(lambda: next((p for p in pods(core, selector="app=c") if p.status.container_statuses
                               and p.status.container_statuses[0].restart_count >= 2), None))
    cs = p.status.container_statuses[0]
    assert cs.last_state.terminated.exit_code == code and cs.last_state.terminated.reason == reason
    assert p.status.phase == "Running" and not ready(p)
    p = wait_for(lambda: next((p for p in pods(core, selector="app=c") if p.status.container_statuses[0].state.waiting
                               and p.status.container_statuses[0].state.waiting.reason == "CrashLoopBackOff"), None))
    assert "back-off" in p.status.container_statuses[0].state.waiting.message
    previous = core.read_namespaced_pod_log(p.metadata.name, "default", previous=True)
    assert ("CUDA out of memory" if mode == "oom" else "bad engine args") in previous
    assert core.read_namespaced_pod_log(p.metadata.name, "default", previous=True, tail_lines=1).count("\n") == 1
    assert any(r == "BackOff" for r, _ in events_for(core, p.metadata.name))


def test_one_crash_is_a_restart_and_the_second_a_crash_loop(kube, core, apps):
    """kuberuntime's doBackOff: a container's first exit restarts it at once (RESTARTS 1, no CrashLoopBackOff,
    no BackOff event); only an exit within the back-off entry waits (``back-off 10s``, then 20s). A single
    crash, or a liveness kill of a slow start, is not a crash loop, and a reader that takes it for one (a
    rollout that fails on it) fails where GKE would recover."""
    gpu_node(kube, "n1")
    gpu_node(kube, "n2")
    seen: list[tuple[str, str, int, str]] = []  # (pod, waiting reason, restartCount, message) of each pod write
    unsubscribe = kube.subscribe(lambda _t, o: seen.extend(
        (o["metadata"]["name"], (w := (cs.get("state") or {}).get("waiting") or {}).get("reason", ""),
         cs.get("restartCount", 0), w.get("message", ""))
        for cs in (o.get("status") or {}).get("containerStatuses") or []))
    try:
        apps.create_namespaced_deployment("default", gpu_deployment("once", labels={"app": "once",
                                                                                   "mode": "crash_once"}))
        apps.create_namespaced_deployment("default", gpu_deployment("loop", labels={"app": "loop",
                                                                                   "mode": "crash_loop"}))
        p = wait_for(lambda: next((p for p in pods(core, selector="app=once") if ready(p)), None))
        cs = p.status.container_statuses[0]
        assert cs.restart_count == 1 and cs.last_state.terminated.exit_code == 1 and cs.state.running
        loop = wait_for(lambda: next((p for p in pods(core, selector="app=loop")
                                      if p.status.container_statuses[0].restart_count >= 3), None))
    finally:
        unsubscribe()
    once = {r for name, r, _, _ in seen if name == p.metadata.name}
    assert "CrashLoopBackOff" not in once, once
    assert not any(r == "BackOff" for r, _ in events_for(core, p.metadata.name))
    backoffs = {n: m.split(" restarting")[0] for name, r, n, m in seen
                if name == loop.metadata.name and r == "CrashLoopBackOff"}
    assert backoffs == {2: "back-off 10s", 3: "back-off 20s"}, backoffs  # the second exit is the first back-off


def test_a_pod_created_for_a_replicaset_being_deleted_is_garbage_collected(kube, core, apps):
    """The ReplicaSet controller can start a pod for a ReplicaSet the API server removes a moment later
    (a teardown deleting the Deployment while a pod is replaced): the garbage collector deletes a dependent
    whose owner is gone. Before, the sandbox left that pod running for ever (a Gateway teardown's verify
    found one model pod left)."""
    gpu_node(kube, "n1", gpus=2)
    apps.create_namespaced_deployment("default", gpu_deployment("m", replicas=1))
    wait_for(lambda: any(ready(p) for p in pods(core, selector="app=m")))
    rs = apps.list_namespaced_replica_set("default").items[0]
    template = rs.spec.template
    apps.delete_namespaced_deployment("m", "default", propagation_policy="Foreground")
    wait_for(lambda: not apps.list_namespaced_replica_set("default").items)
    # the racing sync's pod: created after its ReplicaSet was removed, owned by it
    core.create_namespaced_pod("default", {
        "metadata": {"name": "late", "labels": template.metadata.labels, "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs.metadata.name, "uid": rs.metadata.uid,
            "controller": True, "blockOwnerDeletion": True}]},
        "spec": client.ApiClient().sanitize_for_serialization(template.spec)})
    wait_for(lambda: not pods(core, selector="app=m"), timeout=10)


def test_logs_and_pod_delete(kube, core, apps, runtime):
    gpu_node(kube, "n1")
    core.create_namespaced_pod("default", {"metadata": {"name": "solo", "labels": {"app": "solo"}}, "spec": {
        "containers": [{"name": "s", "image": "vllm/vllm-openai:v1"}], "tolerations": TOLERATE_GPU}})
    wait_for(lambda: ready(core.read_namespaced_pod("solo", "default")))
    text = core.read_namespaced_pod_log("solo", "default")
    assert "Application startup complete." in text
    assert core.read_namespaced_pod_log("solo", "default", tail_lines=1) == "INFO Application startup complete.\n"
    with pytest.raises(ApiException) as info:
        core.read_namespaced_pod_log("solo", "default", previous=True)
    assert info.value.status == 400
    core.delete_namespaced_pod("solo", "default")
    wait_for(lambda: not pods(core, selector="app=solo"))
    assert runtime.started[0]._stopped.is_set()


# ---- Autopilot -------------------------------------------------------------------------------------
def test_autopilot_provisions_and_removes_nodes(kube, core, apps):
    kube.autopilot_idle_seconds = 50  # 0.1 s
    kube.enable_autopilot("ap-1")
    apps.create_namespaced_deployment("default", deployment("ap", gpus=1, node_selector=dict(L4)))
    p = wait_for(lambda: next((p for p in pods(core, selector="app=ap") if ready(p)), None))
    node = core.read_node(p.spec.node_name)
    assert node.metadata.name.startswith("gk3-ap-1-")
    assert node.metadata.labels["cloud.google.com/gke-accelerator"] == "nvidia-l4"
    assert node.status.capacity["nvidia.com/gpu"] == "1"
    assert any(r == "TriggeredScaleUp" for r, _ in events_for(core, p.metadata.name))
    apps.delete_namespaced_deployment("ap", "default")
    wait_for(lambda: not core.list_node().items)


def test_autopilot_off_leaves_pods_pending(kube, core, apps):
    apps.create_namespaced_deployment("default", deployment("ap", gpus=1, node_selector=dict(L4)))
    _pending_message(core, "app=ap")
    time.sleep(0.3)  # longer than a scaled Autopilot provision
    assert not core.list_node().items


# ---- services, HPA, namespaces ---------------------------------------------------------------------
def test_service_backends_follow_the_selector(kube, core, apps):
    gpu_node(kube, "n1", gpus=2)
    apps.create_namespaced_deployment("default", gpu_deployment("blue", labels={"app": "blue", "color": "blue"}))
    apps.create_namespaced_deployment("default", gpu_deployment("green", labels={"app": "green", "color": "green"}))
    core.create_namespaced_service("default", {"metadata": {"name": "live"}, "spec": {
        "selector": {"color": "blue"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
    blue = wait_for(lambda: kube.ready_pod_ports("default", {"color": "blue"}))
    green = wait_for(lambda: kube.ready_pod_ports("default", {"color": "green"}))
    assert kube.service_backends("default", "live") == blue
    core.patch_namespaced_service("live", "default", {"spec": {"selector": {"color": "green"}}},
                                  _content_type="application/merge-patch+json")
    assert kube.service_backends("default", "live") == green  # at call time, no controller lag
    ep = wait_for(lambda: (e := core.read_namespaced_endpoints("live", "default")).subsets and
                  e.subsets[0].addresses[0].target_ref.name.startswith("green") and e)
    assert ep.subsets[0].ports[0].name == "http"
    assert kube.service_backends("default", "missing") == []


def test_hpa_keeps_replicas_within_bounds(kube, api, apps):
    hpa = client.AutoscalingV2Api(api)
    apps.create_namespaced_deployment("default", deployment("h", replicas=1))
    hpa.create_namespaced_horizontal_pod_autoscaler("default", {"metadata": {"name": "h"}, "spec": {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "h"}, "minReplicas": 2,
        "maxReplicas": 4}})
    wait_for(lambda: apps.read_namespaced_deployment("h", "default").spec.replicas == 2)
    # the next sync (within range) reads metrics: no CPU requests here, so ScalingActive is False
    h = wait_for(lambda: (h := hpa.read_namespaced_horizontal_pod_autoscaler("h", "default")).status.desired_replicas
                 == 2 and {c.type for c in h.status.conditions or []} >= {"AbleToScale", "ScalingActive"} and h)
    assert next(c for c in h.status.conditions if c.type == "ScalingActive").reason == "FailedGetResourceMetric"
    apps.patch_namespaced_deployment_scale("h", "default", {"spec": {"replicas": 0}},
                                           _content_type="application/merge-patch+json")
    time.sleep(0.1)
    assert apps.read_namespaced_deployment("h", "default").spec.replicas == 0  # scaled to zero: HPA disabled


def test_namespace_delete_stops_servers(kube, core, apps, runtime):
    gpu_node(kube, "n1")
    core.create_namespace({"metadata": {"name": "gone"}})
    apps.create_namespaced_deployment("gone", gpu_deployment("m"))
    wait_for(lambda: kube.ready_pod_ports("gone", {"app": "m"}))
    core.delete_namespace("gone")
    wait_for(lambda: "gone" not in {n.metadata.name for n in core.list_namespace().items})
    wait_for(lambda: all(s._stopped.is_set() for s in runtime.started))


# ---- scale -----------------------------------------------------------------------------------------
def _rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_fifty_deployments_hundred_pods(kube, core, apps):
    for i in range(13):
        gpu_node(kube, f"g{i}", gpus=8)
    before = _rss_mib()
    start = time.monotonic()
    for i in range(50):
        ns = f"m{i}"
        core.create_namespace({"metadata": {"name": ns}})
        apps.create_namespaced_deployment(ns, gpu_deployment("model", replicas=2))
        core.create_namespaced_service(ns, {"metadata": {"name": "model"}, "spec": {
            "selector": {"app": "model"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
    wait_for(lambda: sum(1 for p in core.list_pod_for_all_namespaces().items if ready(p)) == 100, timeout=25)
    elapsed = time.monotonic() - start
    assert all(len(kube.service_backends(f"m{i}", "model")) == 2 for i in range(50))
    t0 = time.monotonic()
    listing = core.list_pod_for_all_namespaces()
    assert len(listing.items) == 100 and time.monotonic() - t0 < 2
    grown = _rss_mib() - before
    assert grown < 300, f"RSS grew {grown:.0f} MiB for 100 pods"
    assert elapsed < 25


# ---- with the real model runtime and router (sandbox/engines/, sandbox/routing.py) ----------------
@pytest.fixture
def real():
    models = pytest.importorskip("sandbox.engines")
    from sandbox.hub import Hub

    clock, faults = Clock(SCALE), Faults()
    runtime = models.ModelRuntime(clock=clock, faults=faults, hub=Hub(faults=faults))
    k = KubeCluster(clock=clock, faults=faults, runtime=runtime)
    k.start()
    gpu_node(k, "l4-1", gpus=2)
    yield k, runtime, api_client(k)
    k.stop()
    runtime.stop()


def vllm_deployment(name, labels=None):
    d = gpu_deployment(name, labels=labels or {"app": name})
    d["spec"]["template"]["spec"]["containers"][0]["args"] = ["--model=facebook/opt-125m", "--port=8000"]
    return d


def test_real_runtime_serves_through_the_service_proxy(real):

    kube, runtime, api = real
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    apps.create_namespaced_deployment("default", vllm_deployment("opt"))
    core.create_namespaced_service("default", {"metadata": {"name": "opt"}, "spec": {
        "selector": {"app": "opt"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
    wait_for(lambda: kube.service_backends("default", "opt"), timeout=20)
    with http_client(kube, timeout=30) as http:
        # No readinessProbe: the pod is Ready once its container runs, as on Kubernetes, and the engine may
        # still be loading (the proxy answers 503 until it listens) — wait for its answer, not for Ready.
        url = "/api/v1/namespaces/default/services/opt:http/proxy/v1/models"
        wait_for(lambda: http.get(url).status_code == 200, timeout=20)
        models = http.get(url).json()
        assert models["data"][0]["id"] == "facebook/opt-125m"
    pod = pods(core, selector="app=opt")[0].metadata.name
    assert "facebook/opt-125m" in core.read_namespaced_pod_log(pod, "default")


def test_real_runtime_failure_modes(real):
    kube, runtime, api = real
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    runtime.behaviors.add(mode="crash_loop", labels={"app": "bad"})
    runtime.behaviors.add(mode="image_pull_error", labels={"app": "img"}, count=1)
    apps.create_namespaced_deployment("default", vllm_deployment("bad"))
    apps.create_namespaced_deployment("default", vllm_deployment("img"))
    p = wait_for(lambda: next((p for p in pods(core, selector="app=bad") if p.status.container_statuses
                               and p.status.container_statuses[0].restart_count >= 1
                               and p.status.container_statuses[0].state.waiting), None), timeout=20)
    assert p.status.container_statuses[0].state.waiting.reason == "CrashLoopBackOff"
    assert core.read_namespaced_pod_log(p.metadata.name, "default", previous=True)
    # a counted image pull fault: ErrImagePull, back-off, then the next pull works and the pod is Ready
    wait_for(lambda: any(r == "Failed" for pd in pods(core, selector="app=img")
                         for r, _ in events_for(core, pd.metadata.name)), timeout=20)
    wait_for(lambda: kube.ready_pod_ports("default", {"app": "img"}), timeout=20)
