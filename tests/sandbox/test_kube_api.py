"""The sandbox Kubernetes API against the real kubernetes python client: CRUD, patches, apply, watch, errors."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from sandbox.core import Clock, Faults
from sandbox.kube import KubeCluster
from tests.sandbox.kube_support import StubRuntime, api_client, deployment, http_client, wait_for

SCALE = 0.002


@pytest.fixture(scope="module")
def kube():
    clock = Clock(SCALE)
    k = KubeCluster(clock=clock, faults=Faults(), runtime=StubRuntime(clock))
    k.start()
    k.add_node("cpu-1", capacity={"cpu": "64", "memory": "256Gi"})
    yield k
    k.stop()


@pytest.fixture(scope="module")
def api(kube):
    return api_client(kube)


@pytest.fixture
def core(api):
    return client.CoreV1Api(api)


@pytest.fixture
def apps(api):
    return client.AppsV1Api(api)


@pytest.fixture
def ns(core):
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    return name


def _raises(fn, status: int, reason: str) -> ApiException:
    with pytest.raises(ApiException) as info:
        fn()
    assert info.value.status == status, info.value.body
    body = json.loads(info.value.body)
    assert body["kind"] == "Status" and body["apiVersion"] == "v1" and body["status"] == "Failure"
    assert body["reason"] == reason and body["code"] == status
    return info.value


# ---- discovery -------------------------------------------------------------------------------------
def test_discovery_documents(kube):
    with http_client(kube) as http:
        version = http.get("/version").json()
        assert version["major"] == "1" and version["minor"] == "30"
        assert http.get("/api").json()["versions"] == ["v1"]
        groups = {g["name"] for g in http.get("/apis").json()["groups"]}
        assert {"apps", "networking.k8s.io", "autoscaling", "rbac.authorization.k8s.io", "policy",
                "monitoring.googleapis.com", "discovery.k8s.io"} <= groups
        assert "monitoring.coreos.com" not in groups  # GKE ships GMP's CRDs only (no prometheus-operator)
        apps_list = http.get("/apis/apps/v1").json()
        names = {r["name"]: r for r in apps_list["resources"]}
        assert names["deployments"]["shortNames"] == ["deploy"]
        assert names["deployments/scale"]["kind"] == "Scale" and names["deployments/scale"]["group"] == "autoscaling"
        core_names = {r["name"] for r in http.get("/api/v1").json()["resources"]}
        assert {"pods", "pods/log", "services/proxy", "endpoints", "events", "persistentvolumeclaims"} <= core_names
        v2 = http.get("/openapi/v2")
        assert v2.status_code == 200 and v2.content == b""
        assert v2.headers["content-type"] == "application/octet-stream"
        index = http.get("/openapi/v3").json()["paths"]
        doc = http.get(index["apis/apps/v1"]["serverRelativeURL"]).json()
        patch_op = doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"]
        assert patch_op["x-kubernetes-group-version-kind"] == {"group": "apps", "version": "v1", "kind": "Deployment"}
        assert "fieldValidation" in {p["name"] for p in patch_op["parameters"]}


# ---- CRUD and errors -----------------------------------------------------------------------------
def test_core_crud_and_status_errors(core, ns):
    cm = core.create_namespaced_config_map(ns, {"metadata": {"name": "c1", "labels": {"a": "1"}}, "data": {"k": "v"}})
    assert cm.metadata.uid and cm.metadata.resource_version and cm.metadata.creation_timestamp
    err = _raises(lambda: core.create_namespaced_config_map(ns, {"metadata": {"name": "c1"}}), 409, "AlreadyExists")
    assert 'configmaps "c1" already exists' in json.loads(err.body)["message"]
    _raises(lambda: core.read_namespaced_config_map("nope", ns), 404, "NotFound")
    _raises(lambda: core.create_namespaced_config_map(ns, {"metadata": {"name": "Bad_Name"}}), 422, "Invalid")
    _raises(lambda: core.create_namespaced_config_map("no-such-ns", {"metadata": {"name": "x"}}), 404, "NotFound")

    # optimistic concurrency: a replace with a stale resourceVersion is a 409 Conflict
    cm.data = {"k": "v2"}
    fresh = core.replace_namespaced_config_map("c1", ns, cm)
    assert int(fresh.metadata.resource_version) > int(cm.metadata.resource_version)
    cm.data = {"k": "v3"}
    err = _raises(lambda: core.replace_namespaced_config_map("c1", ns, cm), 409, "Conflict")
    assert "the object has been modified" in json.loads(err.body)["message"]
    # a no-op write keeps the resourceVersion
    same = core.replace_namespaced_config_map("c1", ns, fresh)
    assert same.metadata.resource_version == fresh.metadata.resource_version
    core.delete_namespaced_config_map("c1", ns)
    _raises(lambda: core.read_namespaced_config_map("c1", ns), 404, "NotFound")


def test_invalid_objects_name_their_fields(apps, core, ns):
    bad = deployment("d")
    bad["spec"]["template"]["spec"]["containers"] = []
    err = _raises(lambda: apps.create_namespaced_deployment(ns, bad), 422, "Invalid")
    body = json.loads(err.body)
    assert body["details"]["kind"] == "Deployment"
    assert {"field": "spec.template.spec.containers", "reason": "FieldValueRequired",
            "message": "Required value"} in body["details"]["causes"]
    mismatch = deployment("d2", labels={"app": "other"})
    mismatch["spec"]["selector"] = {"matchLabels": {"app": "d2"}}
    err = _raises(lambda: apps.create_namespaced_deployment(ns, mismatch), 422, "Invalid")
    assert "`selector` does not match template `labels`" in json.loads(err.body)["message"]
    _raises(lambda: core.create_namespaced_service(ns, {"metadata": {"name": "s"}, "spec": {}}), 422, "Invalid")
    _raises(lambda: core.create_namespaced_pod(ns, {"metadata": {"name": "p"}, "spec": {"containers": [
        {"name": "c"}]}}), 422, "Invalid")


def test_defaults_make_objects_complete(core, apps, ns):
    d = apps.create_namespaced_deployment(ns, deployment("web"))
    assert d.spec.strategy.type == "RollingUpdate" and d.spec.strategy.rolling_update.max_surge == "25%"
    assert d.spec.revision_history_limit == 10 and d.spec.progress_deadline_seconds == 600
    assert d.metadata.generation == 1
    c = d.spec.template.spec.containers[0]
    assert c.termination_message_path == "/dev/termination-log" and c.image_pull_policy == "IfNotPresent"
    assert c.ports[0].protocol == "TCP"
    assert d.spec.template.spec.restart_policy == "Always" and d.spec.template.spec.dns_policy == "ClusterFirst"
    svc = core.create_namespaced_service(ns, {"metadata": {"name": "web"}, "spec": {
        "selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}})
    assert svc.spec.cluster_ip.startswith("10.96.") and svc.spec.cluster_ips == [svc.spec.cluster_ip]
    assert svc.spec.session_affinity == "None" and svc.spec.ip_families == ["IPv4"] and svc.spec.type == "ClusterIP"
    lb = core.create_namespaced_service(ns, {"metadata": {"name": "pub"}, "spec": {
        "type": "LoadBalancer", "selector": {"app": "web"}, "ports": [{"port": 80}]}})
    assert lb.status.load_balancer.ingress[0].ip == "127.0.0.1" and 30000 <= lb.spec.ports[0].node_port <= 32767
    secret = core.create_namespaced_secret(ns, {"metadata": {"name": "s"}, "stringData": {"token": "abc"}})
    assert secret.type == "Opaque" and secret.data == {"token": "YWJj"}
    pvc = core.create_namespaced_persistent_volume_claim(ns, {"metadata": {"name": "cache"}, "spec": {
        "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "100Gi"}}}})
    # the default class is filled in; standard-rwo waits for its first consumer (sandbox.kube.storage)
    assert pvc.status.phase == "Pending" and pvc.spec.storage_class_name == "standard-rwo"
    sa = wait_for(lambda: [s for s in core.list_namespaced_service_account(ns).items
                           if s.metadata.name == "default"])
    assert sa


def test_other_groups_crud(api, ns):
    net, hpa_api = client.NetworkingV1Api(api), client.AutoscalingV2Api(api)
    rbac, policy, custom = client.RbacAuthorizationV1Api(api), client.PolicyV1Api(api), client.CustomObjectsApi(api)
    ing = net.create_namespaced_ingress(ns, {"metadata": {"name": "web"}, "spec": {"rules": [{"http": {"paths": [
        {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]}})
    # no class, no controller: no address (sandbox.kube.ingress serves classes whose controller exists)
    assert not (ing.status.load_balancer.ingress if ing.status and ing.status.load_balancer else None)
    hpa = hpa_api.create_namespaced_horizontal_pod_autoscaler(ns, {"metadata": {"name": "web"}, "spec": {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"}, "minReplicas": 1,
        "maxReplicas": 3, "metrics": [{"type": "Pods", "pods": {"metric": {"name": "vllm:num_requests_waiting"},
                                                                  "target": {"type": "AverageValue",
                                                                             "averageValue": "5"}}}]}})
    assert hpa.spec.max_replicas == 3
    rbac.create_namespaced_role(ns, {"metadata": {"name": "r"}, "rules": [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]})
    rbac.create_namespaced_role_binding(ns, {"metadata": {"name": "r"}, "roleRef": {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "r"},
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": ns}]})
    assert [r.metadata.name for r in rbac.list_namespaced_role(ns).items] == ["r"]
    pdb = policy.create_namespaced_pod_disruption_budget(ns, {"metadata": {"name": "p"}, "spec": {
        "minAvailable": 1, "selector": {"matchLabels": {"app": "web"}}}})
    assert pdb.spec.min_available == 1
    pm = custom.create_namespaced_custom_object("monitoring.googleapis.com", "v1", ns, "podmonitorings", {
        "apiVersion": "monitoring.googleapis.com/v1", "kind": "PodMonitoring", "metadata": {"name": "m"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "endpoints": [{"port": "http", "interval": "30s"}]}})
    assert pm["metadata"]["generation"] == 1
    patched = custom.patch_namespaced_custom_object("monitoring.googleapis.com", "v1", ns, "podmonitorings", "m",
                                                    {"spec": {"endpoints": [{"port": "http", "interval": "15s"}]}})
    assert patched["spec"]["endpoints"][0]["interval"] == "15s" and patched["metadata"]["generation"] == 2
    custom.create_namespaced_custom_object("monitoring.googleapis.com", "v1", ns, "rules", {
        "apiVersion": "monitoring.googleapis.com/v1", "kind": "Rules", "metadata": {"name": "r"},
        "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "up == 0"}]}]}})
    listed = custom.list_namespaced_custom_object("monitoring.googleapis.com", "v1", ns, "rules")
    assert [i["metadata"]["name"] for i in listed["items"]] == ["r"]
    custom.delete_namespaced_custom_object("monitoring.googleapis.com", "v1", ns, "podmonitorings", "m")
    with pytest.raises(ApiException) as info:
        custom.get_namespaced_custom_object("monitoring.googleapis.com", "v1", ns, "podmonitorings", "m")
    assert info.value.status == 404


def test_selectors(core, ns):
    for name, labels in (("a", {"tier": "web", "env": "prod"}), ("b", {"tier": "db", "env": "prod"}),
                         ("c", {"tier": "web"})):
        core.create_namespaced_config_map(ns, {"metadata": {"name": name, "labels": labels}})

    def names(**kw):
        return sorted(i.metadata.name for i in core.list_namespaced_config_map(ns, **kw).items)

    assert names(label_selector="tier=web") == ["a", "c"]
    assert names(label_selector="tier=web,env=prod") == ["a"]
    assert names(label_selector="tier in (web,db),env") == ["a", "b"]
    assert names(label_selector="tier notin (db)") == ["a", "c"]
    assert names(label_selector="!env") == ["c"]
    assert names(label_selector="env!=prod") == ["c"]
    assert names(field_selector="metadata.name=b") == ["b"]
    assert names(field_selector="metadata.name!=b") == ["a", "c"]
    listing = core.list_namespaced_config_map(ns)
    assert int(listing.metadata.resource_version) >= max(int(i.metadata.resource_version) for i in listing.items)
    everywhere = core.list_config_map_for_all_namespaces(field_selector=f"metadata.namespace={ns}")
    assert len(everywhere.items) == 3


# ---- patches -------------------------------------------------------------------------------------
def test_patch_content_types(core, apps, ns):
    d = deployment("p")
    d["spec"]["template"]["spec"]["containers"][0]["env"] = [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]
    apps.create_namespaced_deployment(ns, d)
    # strategic merge (the client's default for a dict): env merges by name
    out = apps.patch_namespaced_deployment("p", ns, {"spec": {"template": {"spec": {"containers": [
        {"name": "server", "env": [{"name": "B", "value": "20"}, {"name": "C", "value": "3"}]}]}}}})
    env = {e.name: e.value for e in out.spec.template.spec.containers[0].env}
    assert env == {"A": "1", "B": "20", "C": "3"} and out.metadata.generation == 2
    assert out.spec.template.spec.containers[0].image == "vllm/vllm-openai:v0.6.3"
    # merge patch replaces lists wholesale
    out = apps.patch_namespaced_deployment("p", ns, {"spec": {"template": {"spec": {"containers": [
        {"name": "server", "image": "x:1"}]}}}}, _content_type="application/merge-patch+json")
    assert out.spec.template.spec.containers[0].env is None
    # JSON patch (RFC 6902), including a failing test op -> 422
    out = apps.patch_namespaced_deployment("p", ns, [{"op": "add", "path": "/metadata/labels",
                                                      "value": {"x": "y"}},
                                                     {"op": "replace", "path": "/spec/replicas", "value": 2}],
                                           _content_type="application/json-patch+json")
    assert out.metadata.labels == {"x": "y"} and out.spec.replicas == 2
    _raises(lambda: apps.patch_namespaced_deployment("p", ns, [{"op": "test", "path": "/spec/replicas", "value": 5}],
                                                     _content_type="application/json-patch+json"), 422, "Invalid")
    # a merge patch guarded by resourceVersion: stale -> 409
    svc = core.create_namespaced_service(ns, {"metadata": {"name": "s"}, "spec": {
        "selector": {"color": "blue"}, "ports": [{"port": 80}]}})
    body = {"metadata": {"resourceVersion": svc.metadata.resource_version}, "spec": {"selector": {"color": "green"}}}
    out = core.patch_namespaced_service("s", ns, body, _content_type="application/merge-patch+json")
    assert out.spec.selector == {"color": "green"}
    _raises(lambda: core.patch_namespaced_service("s", ns, body, _content_type="application/merge-patch+json"),
            409, "Conflict")
    _raises(lambda: core.patch_namespaced_service("nope", ns, {"spec": {}}), 404, "NotFound")


def test_server_side_apply(kube, apps, ns, api):
    cfg = deployment("ssa", replicas=0)
    cfg["metadata"]["namespace"] = ns
    cfg["metadata"]["annotations"] = {"keep": "1", "drop": "1"}
    created = apps.patch_namespaced_deployment("ssa", ns, cfg, field_manager="llm-fleet", force=True,
                                               _content_type="application/apply-patch+yaml")
    assert created.metadata.uid and created.metadata.generation == 1
    mf = created.metadata.managed_fields
    assert [(m.manager, m.operation) for m in mf] == [("llm-fleet", "Apply")]
    assert "f:spec" in mf[0].fields_v1 and "f:replicas" in mf[0].fields_v1["f:spec"]
    # re-apply of the same config: nothing changes, resourceVersion kept
    kube.wait_idle()  # the controller writes the status once
    live = apps.read_namespaced_deployment("ssa", ns)
    again = apps.patch_namespaced_deployment("ssa", ns, cfg, field_manager="llm-fleet", force=True,
                                             _content_type="application/apply-patch+yaml")
    assert again.metadata.resource_version == live.metadata.resource_version
    # a field no longer applied is removed
    del cfg["metadata"]["annotations"]["drop"]
    out = apps.patch_namespaced_deployment("ssa", ns, cfg, field_manager="llm-fleet", force=True,
                                           _content_type="application/apply-patch+yaml")
    # "drop" is gone; the controller's own revision annotation is not the applier's to remove
    assert out.metadata.annotations == {"keep": "1", "deployment.kubernetes.io/revision": "1"}
    # another manager changes replicas; a non-forced apply of a different value conflicts
    apps.patch_namespaced_deployment_scale("ssa", ns, {"spec": {"replicas": 3}},
                                           _content_type="application/merge-patch+json")
    cfg["spec"]["replicas"] = 2
    err = _raises(lambda: apps.patch_namespaced_deployment("ssa", ns, cfg, field_manager="llm-fleet",
                                                           _content_type="application/apply-patch+yaml"),
                  409, "Conflict")
    assert "Apply failed with 1 conflict" in json.loads(err.body)["message"]
    assert ".spec.replicas" in json.loads(err.body)["message"]
    out = apps.patch_namespaced_deployment("ssa", ns, cfg, field_manager="llm-fleet", force=True,
                                           _content_type="application/apply-patch+yaml")
    assert out.spec.replicas == 2
    # YAML bodies work as well (what kubectl apply --server-side sends is JSON; other tools send YAML)
    yaml_body = (f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: y\n  namespace: {ns}\n"
                 "data:\n  k: v\n").encode()
    with http_client(kube) as http:
        r = http.patch(f"/api/v1/namespaces/{ns}/configmaps/y", params={"fieldManager": "me"}, content=yaml_body,
                       headers={"Content-Type": "application/apply-patch+yaml"})
        assert r.status_code == 201 and r.json()["data"] == {"k": "v"}
        r = http.patch(f"/api/v1/namespaces/{ns}/configmaps/y", content=yaml_body,
                       headers={"Content-Type": "application/apply-patch+yaml"})
        assert r.status_code == 422 and "fieldManager" in r.json()["message"]


def test_generation_status_and_scale_subresources(apps, ns):
    apps.create_namespaced_deployment(ns, deployment("g", replicas=0))
    d = apps.patch_namespaced_deployment("g", ns, {"metadata": {"labels": {"x": "1"}}})
    assert d.metadata.generation == 1  # metadata only
    d = apps.patch_namespaced_deployment("g", ns, {"status": {"replicas": 99}})
    assert d.status.replicas != 99  # status through the main resource is ignored
    d = apps.patch_namespaced_deployment_status("g", ns, {"status": {"observedGeneration": 7}})
    assert d.status.observed_generation == 7 and d.metadata.generation == 1
    scale = apps.read_namespaced_deployment_scale("g", ns)
    assert scale.kind == "Scale" and scale.spec.replicas == 0 and scale.status.selector == "app=g"
    scale = apps.patch_namespaced_deployment_scale("g", ns, {"spec": {"replicas": 2}},
                                                   _content_type="application/merge-patch+json")
    assert scale.spec.replicas == 2
    d = apps.read_namespaced_deployment("g", ns)
    assert d.spec.replicas == 2 and d.metadata.generation == 2
    scale.spec.replicas = 1
    scale.metadata.resource_version = "1"  # stale: the controller has written status since
    _raises(lambda: apps.replace_namespaced_deployment_scale("g", ns, scale), 409, "Conflict")
    for _ in range(50):  # the controller keeps writing status while pods start: retry on conflict
        scale = apps.read_namespaced_deployment_scale("g", ns)
        scale.spec.replicas = 1
        try:
            assert apps.replace_namespaced_deployment_scale("g", ns, scale).spec.replicas == 1
            break
        except ApiException as exc:
            assert exc.status == 409
    else:
        raise AssertionError("replace_namespaced_deployment_scale kept conflicting")


def test_dry_run_does_not_persist(core, ns):
    out = core.create_namespaced_config_map(ns, {"metadata": {"name": "dry"}}, dry_run="All")
    assert out.metadata.uid
    _raises(lambda: core.read_namespaced_config_map("dry", ns), 404, "NotFound")


# ---- watch ---------------------------------------------------------------------------------------
def test_watch_stream_and_resume(core, ns):
    listing = core.list_namespaced_config_map(ns)
    rv = listing.metadata.resource_version
    seen: list[tuple[str, str]] = []

    def writer():
        time.sleep(0.05)
        core.create_namespaced_config_map(ns, {"metadata": {"name": "w1", "labels": {"w": "y"}}})
        core.patch_namespaced_config_map("w1", ns, {"data": {"a": "b"}})
        core.delete_namespaced_config_map("w1", ns)

    t = threading.Thread(target=writer)
    t.start()
    w = watch.Watch()
    for ev in w.stream(core.list_namespaced_config_map, ns, resource_version=rv, timeout_seconds=5):
        seen.append((ev["type"], ev["object"].metadata.name))
        if ev["type"] == "DELETED":
            w.stop()
    t.join()
    assert seen == [("ADDED", "w1"), ("MODIFIED", "w1"), ("DELETED", "w1")]
    # resume from the list's resourceVersion: the same events replay
    replay = [(e["type"], e["object"].metadata.name) for e in
              watch.Watch().stream(core.list_namespaced_config_map, ns, resource_version=rv, timeout_seconds=1)]
    assert replay == seen


def test_watch_selector_edges_and_timeout(core, ns):
    core.create_namespaced_config_map(ns, {"metadata": {"name": "e", "labels": {"sel": "yes"}}})
    rv = core.list_namespaced_config_map(ns).metadata.resource_version
    core.patch_namespaced_config_map("e", ns, {"metadata": {"labels": {"sel": "no"}}})
    core.patch_namespaced_config_map("e", ns, {"metadata": {"labels": {"sel": "yes"}}})
    start = time.monotonic()
    events = [e["type"] for e in watch.Watch().stream(core.list_namespaced_config_map, ns, label_selector="sel=yes",
                                                       resource_version=rv, timeout_seconds=1)]
    assert events == ["DELETED", "ADDED"]  # leaving and re-entering the selector
    assert 0.9 < time.monotonic() - start < 3  # timeoutSeconds ends the stream
    # no resourceVersion: the current state as ADDED events first
    first = next(iter(watch.Watch().stream(core.list_namespaced_config_map, ns, timeout_seconds=1)))
    assert first["type"] == "ADDED" and first["object"].metadata.name == "e"


def test_watch_too_old_resource_version_is_gone(core, ns):
    from sandbox.kube.store import Store

    clock = Clock(SCALE)
    small = KubeCluster(clock=clock, faults=Faults(), runtime=StubRuntime(clock))
    small.store = Store(history=5)
    small.api.store = small.store
    small.controller.store = small.store
    small.store.add_hook(small.controller.on_event)
    small._bootstrap()
    small.start()
    try:
        c = client.CoreV1Api(api_client(small))
        rv = c.list_namespaced_config_map("default").metadata.resource_version
        for i in range(10):
            c.create_namespaced_config_map("default", {"metadata": {"name": f"x{i}"}})
        with pytest.raises(ApiException) as info:
            list(watch.Watch().stream(c.list_namespaced_config_map, "default", resource_version=rv,
                                      timeout_seconds=1))
        assert info.value.status == 410 and "Expired" in info.value.reason
    finally:
        small.stop()


def test_watch_on_one_object_with_field_selector(apps, ns):
    apps.create_namespaced_deployment(ns, deployment("solo", replicas=0))
    apps.create_namespaced_deployment(ns, deployment("other", replicas=0))
    listing = apps.list_namespaced_deployment(ns, field_selector="metadata.name=solo")
    assert [d.metadata.name for d in listing.items] == ["solo"]

    def later():
        time.sleep(0.05)
        apps.patch_namespaced_deployment("other", ns, {"metadata": {"labels": {"z": "1"}}})
        apps.patch_namespaced_deployment("solo", ns, {"metadata": {"labels": {"z": "1"}}})

    threading.Thread(target=later).start()
    w = watch.Watch()
    got = []
    for ev in w.stream(apps.list_namespaced_deployment, ns, field_selector="metadata.name=solo",
                       resource_version=listing.metadata.resource_version, timeout_seconds=3):
        got.append(ev["object"].metadata.name)
        if ev["object"].metadata.labels.get("z"):
            w.stop()
    assert set(got) == {"solo"}


# ---- deletes -------------------------------------------------------------------------------------
def test_delete_propagation(kube, core, apps, ns):
    apps.create_namespaced_deployment(ns, deployment("cascade", replicas=2))
    wait_for(lambda: len(core.list_namespaced_pod(ns, label_selector="app=cascade").items) == 2)
    apps.delete_namespaced_deployment("cascade", ns, propagation_policy="Foreground")
    wait_for(lambda: not apps.list_namespaced_replica_set(ns).items)
    wait_for(lambda: not core.list_namespaced_pod(ns, label_selector="app=cascade").items)
    # orphan: the ReplicaSet survives without its owner
    apps.create_namespaced_deployment(ns, deployment("orphan", replicas=1))
    wait_for(lambda: apps.list_namespaced_replica_set(ns).items)
    apps.delete_namespaced_deployment("orphan", ns, propagation_policy="Orphan")
    time.sleep(0.1)
    rs = apps.list_namespaced_replica_set(ns).items
    assert len(rs) == 1 and not rs[0].metadata.owner_references


def test_namespace_delete_removes_contents(kube, core, apps):
    name = f"gone-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name}})
    apps.create_namespaced_deployment(name, deployment("m", replicas=1))
    core.create_namespaced_config_map(name, {"metadata": {"name": "c"}})
    wait_for(lambda: [p for p in core.list_namespaced_pod(name).items if p.status.phase == "Running"])
    core.delete_namespace(name)
    assert core.read_namespace(name).status.phase == "Terminating"
    _raises(lambda: core.create_namespaced_config_map(name, {"metadata": {"name": "late"}}), 403, "Forbidden")
    wait_for(lambda: name not in {n.metadata.name for n in core.list_namespace().items})
    assert not [p for p in kube.snapshot()["pods"] if p["namespace"] == name]


# ---- tables, faults, proxy, subscribers -------------------------------------------------------------
def test_table_replies(kube, apps, ns):
    apps.create_namespaced_deployment(ns, deployment("tab", replicas=1))
    with http_client(kube, headers={
            "Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"}) as http:
        t = http.get(f"/apis/apps/v1/namespaces/{ns}/deployments").json()
        assert t["kind"] == "Table"
        assert [c["name"] for c in t["columnDefinitions"]][:5] == ["Name", "Ready", "Up-to-date", "Available", "Age"]
        assert t["rows"][0]["cells"][0] == "tab"
        assert t["rows"][0]["object"]["kind"] == "PartialObjectMetadata"
        one = http.get("/api/v1/nodes/cpu-1").json()
        assert one["kind"] == "Table" and one["rows"][0]["cells"][:2] == ["cpu-1", "Ready"]


def test_injected_faults_answer_as_status(kube, core):
    rule = kube.faults.add(service="kube", method="GET", path="/api/v1/namespaces$", status=503, count=1)
    try:
        _raises(lambda: core.list_namespace(), 503, "ServiceUnavailable")
        assert core.list_namespace().items
    finally:
        kube.faults.remove(rule.id)


def test_service_proxy_and_endpoints(kube, core, apps, ns):
    core.create_namespaced_service(ns, {"metadata": {"name": "api"}, "spec": {
        "selector": {"app": "px"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
    with http_client(kube, timeout=10) as http:
        r = http.get(f"/api/v1/namespaces/{ns}/services/api:http/proxy/whoami")
        assert r.status_code == 503 and r.json()["message"] == 'no endpoints available for service "api"'
        apps.create_namespaced_deployment(ns, deployment("px", replicas=2))
        wait_for(lambda: len(kube.service_backends(ns, "api")) == 2)
        pods = {p.metadata.name for p in core.list_namespaced_pod(ns, label_selector="app=px").items}
        answers = {http.get(f"/api/v1/namespaces/{ns}/services/api:http/proxy/whoami").json()["pod"]
                   for _ in range(20)}
        assert answers <= pods and answers
        echo = http.post(f"/api/v1/namespaces/{ns}/services/api/proxy/echo?x=1", json={"a": 1}).json()
        assert echo["got"] == {"a": 1} and echo["query"] == "x=1"
        pod = sorted(pods)[0]
        assert http.get(f"/api/v1/namespaces/{ns}/pods/{pod}/proxy/whoami").json()["pod"] == pod
        assert http.get(f"/api/v1/namespaces/{ns}/services/missing/proxy/").status_code == 404
    ep = wait_for(lambda: (e := core.read_namespaced_endpoints("api", ns)).subsets and e)
    assert len(ep.subsets[0].addresses) == 2 and ep.subsets[0].ports[0].port == 8000
    assert all(a.ip.startswith("10.") and a.target_ref.kind == "Pod" for a in ep.subsets[0].addresses)
    ports = kube.ready_pod_ports(ns, {"app": "px"})
    assert sorted(ports) == sorted(kube.service_backends(ns, "api"))
    annotated = {int(p.metadata.annotations["sandbox.llm-fleet.dev/port"])
                 for p in core.list_namespaced_pod(ns, label_selector="app=px").items}
    assert annotated == set(ports)


def test_subscribe_sees_every_change(kube, core, ns):
    got: list[tuple[str, str]] = []
    unsubscribe = kube.subscribe(lambda et, obj: got.append((et, obj["metadata"]["name"]))
                                 if obj["metadata"].get("namespace") == ns and obj["kind"] == "ConfigMap" else None)
    try:
        core.create_namespaced_config_map(ns, {"metadata": {"name": "sub"}})
        core.patch_namespaced_config_map("sub", ns, {"data": {"x": "1"}})
        core.delete_namespaced_config_map("sub", ns)
        wait_for(lambda: len(got) == 3)
        assert got == [("ADDED", "sub"), ("MODIFIED", "sub"), ("DELETED", "sub")]
    finally:
        unsubscribe()


def test_unsubscribe_returns_once_every_earlier_change_is_delivered(kube, core, ns):
    """The dispatcher can be behind (a slow subscriber, a loaded machine): unsubscribe() still hands the
    subscriber every change made before it, and none after. Before, a test that read a change through the API
    and then unsubscribed could miss it (a crash loop's last write, in a clean-clone run)."""
    got: list[tuple[str, str]] = []

    def slow(et: str, obj: dict) -> None:
        if obj["metadata"].get("namespace") == ns and obj["kind"] == "ConfigMap":
            time.sleep(0.05)
            got.append((et, obj["metadata"]["name"]))

    unsubscribe = kube.subscribe(slow)
    for i in range(5):
        core.create_namespaced_config_map(ns, {"metadata": {"name": f"u{i}"}})
    unsubscribe()
    assert got == [("ADDED", f"u{i}") for i in range(5)]
    core.create_namespaced_config_map(ns, {"metadata": {"name": "after"}})
    time.sleep(0.3)
    assert ("ADDED", "after") not in got


def test_snapshot_is_json(kube, ns):
    snap = kube.snapshot()
    json.dumps(snap)
    assert snap["nodes"][0]["name"] == "cpu-1" and "namespaces" in snap["objects"]


def test_a_label_patch_owns_only_the_label(kube, core):
    """managedFields as the API server keeps them: an Update (kubectl label, a merge patch) owns the fields it
    changed, never the list items another manager applied -- or every hand label would look like a hand edit
    of the Service's ports."""
    import json

    from sandbox.kube.controllers.common import T

    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "owned", "namespace": "default"},
           "spec": {"selector": {"app": "x"}, "ports": [{"name": "http", "port": 80, "targetPort": 8000}]}}
    kube.api.apply(T[("", "services")], "default", "owned", svc, manager="llm-fleet", force=True)
    core.patch_namespaced_service("owned", "default", {"metadata": {"labels": {"by": "hand"}}})
    managers = {m.manager: m.fields_v1 for m in core.read_namespaced_service("owned", "default").metadata.managed_fields}
    theirs = {k: v for k, v in managers.items() if k != "llm-fleet"}
    assert len(theirs) == 1 and json.dumps(next(iter(theirs.values()))) == json.dumps(
        {"f:metadata": {"f:labels": {"f:by": {}}}})
    assert "f:ports" in managers["llm-fleet"]["f:spec"]


def test_an_apply_that_finds_the_object_created_since_its_read_applies_onto_it(kube):
    """Two writers apply the same new object at once (deploy_fleet: each model applies the shared operator
    ClusterRoleBinding): the one that read "absent" and then meets the other's object applies onto it — the
    apiserver's GuaranteedUpdate retries; an apply is never answered AlreadyExists. The sandbox once
    answered 409 from its create check; deploy_fleet failed a model on it."""
    from sandbox.kube import resources as res

    t = res.BY_KEY[("", "configmaps")]
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "raced", "namespace": "default"},
            "data": {"k": "v"}}
    kube.api.apply(t, "default", "raced", body, manager="first", force=True)
    real_get, calls = kube.store.get, []

    def stale_get(*args, **kwargs):  # the second writer's read happened just before the first's create
        calls.append(args)
        return None if len(calls) == 1 else real_get(*args, **kwargs)

    kube.store.get = stale_get
    try:
        status, obj = kube.api.apply(t, "default", "raced", dict(body, data={"k": "v", "k2": "w"}),
                                     manager="second", force=True)
    finally:
        kube.store.get = real_get
    assert status == 200 and obj["data"] == {"k": "v", "k2": "w"}


def test_a_watching_client_on_a_descriptor_past_fd_setsize_is_not_taken_for_gone():
    """The watch loop asks whether its client left; select() raises past 1024 descriptors (a busy sandbox
    has more), which read as "gone" and ended a live watch. The check polls instead."""
    import os
    import socket
    import types

    from sandbox.kube.api import _client_gone

    a, b = socket.socketpair()
    high = socket.socket(fileno=os.dup2(a.fileno(), 1501))
    try:
        assert not _client_gone(types.SimpleNamespace(connection=high))  # still there, nothing sent
        b.close()
        assert _client_gone(types.SimpleNamespace(connection=high))  # gone: EOF
    finally:
        for s in (a, b, high):
            s.close()
