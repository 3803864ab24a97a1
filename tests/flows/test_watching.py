"""Issue 13.3: waits survive an expired watch (410 Gone) and a dropped one (API-server restart).

The faults are the sandbox's ``watch_expire`` (the ERROR event with a 410 Expired Status the real API
server sends when etcd compacted past the watch; the history is compacted too, so resuming from the
last resourceVersion fails again) and ``watch_drop`` (the connection closes mid-stream).
"""

from __future__ import annotations

import queue
import uuid
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from sandbox import fault_presets as fp
from tests.flows.conftest import spec_dict
from tests.flows.test_deploy_model import kube, routed_model

pytestmark = pytest.mark.usefixtures("prefect_server")

# the lists and watches every wait makes in the model's namespace (pods, ReplicaSets, the Deployment)
WAITS = r"/namespaces/default/(pods|replicasets|deployments|endpoints)$"


def _hits(sbc, rule: dict) -> int:
    return next(f["hits"] for f in sbc.faults() if f["id"] == rule["id"])


def _progress(state) -> dict[str, float]:
    """The flow run's progress artifacts (13.8): description -> final percent."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
            type=ArtifactFilterType(any_=["progress"])))
    return {a.description.split(":")[0]: float(a.data) for a in arts}


def test_deploy_survives_watch_expiry_and_an_api_server_restart_mid_wait(sbc):
    from flows.provision_cluster import provision_cluster

    spec = spec_dict("gemma2-2b-it-vllm-l4.yaml")
    provisioned = provision_cluster(spec=spec, return_state=True)
    # the long GKE waits left progress artifacts that reached 100 %
    bars = _progress(provisioned)
    assert any(k.startswith("GKE create cluster") and v == 100 for k, v in bars.items()), bars
    assert any(k.startswith("GKE create node pool") and v == 100 for k, v in bars.items()), bars
    # The model takes ~1.2 s (real) to load — inside the Deployment's progress deadline (~760 cloud s) —
    # so every fault below lands while deploy is waiting.
    sbc.add_behavior(match={"labels": {"app.kubernetes.io/instance": spec["name"]}}, mode="slow_load",
                     load_seconds=600)
    expire = sbc.add_fault(**fp.watch_expire(path=WAITS, after=0.2))
    drop = sbc.add_fault(**fp.watch_drop(path=WAITS, after=0.2))
    # ... and while the "restarted" API server comes back, lists are reset and answered 503.
    sbc.add_fault(**fp.kube_status(503, "ServiceUnavailable", "the server is currently unable to handle the request",
                                   path=WAITS, method="GET", count=2))
    from flows.deploy_model import deploy_model

    state = deploy_model(spec=spec, return_state=True)
    result = state.result()
    assert _hits(sbc, expire) == 1 and _hits(sbc, drop) == 1
    assert any(k.startswith("model load") and v == 100 for k, v in _progress(state).items())
    assert result["replicas"] == 1 and all(r["tokens"] > 0 for r in result["smoke"])
    assert routed_model(spec) == "google/gemma-2-2b-it"
    _, apps, _ = kube(spec)
    assert apps.read_namespaced_deployment(f"{spec['name']}-blue", "default").status.ready_replicas == 1


def _default_api(sandbox, tmp_path) -> client.CoreV1Api:
    from tasks.clients import kube_client

    config = yaml.safe_load(Path(sandbox.env()["KUBECONFIG"]).read_text())
    config["current-context"] = "sandbox"
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return client.CoreV1Api(kube_client(str(path)))


def test_informer_relists_after_each_expiry_and_misses_nothing(sandbox, sbc, tmp_path):
    """Three expiries in a row (each resume from the old resourceVersion would 410 again): the informer
    relists every time and still ends up with every object created along the way."""
    from manifests.rollout import Progress
    from tasks.watching import Informer, watch_until

    core = _default_api(sandbox, tmp_path)
    ns = f"w-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": ns}})
    expire = sbc.add_fault(**fp.watch_expire(path=f"/namespaces/{ns}/configmaps$", after=0.1, count=3))
    inf = Informer(core.api_client, core.list_namespaced_config_map, queue.Queue(), namespace=ns)
    names = ["c0", "c1", "c2", "c3"]
    created: list[str] = []

    def evaluate() -> Progress:
        # one more ConfigMap after each relist, so the later ones exist only for relisted watches
        if len(created) < len(names) and len(created) <= inf.relists:
            created.append(names[len(created)])
            core.create_namespaced_config_map(ns, {"metadata": {"name": created[-1]}})
        missing = [n for n in names if n not in inf.items]
        return Progress("waiting", "Missing", f"missing {missing}") if missing else Progress("ready", "All", "")

    progress = watch_until([inf], evaluate, timeout_s=30, log_prefix="configmaps")
    assert progress is not None and progress.state == "ready"
    assert _hits(sbc, expire) == 3 and inf.relists >= 3


def test_informer_stops_on_a_permanent_error(sandbox, sbc, tmp_path):
    from manifests.rollout import Progress
    from tasks.watching import Informer, watch_until

    core = _default_api(sandbox, tmp_path)
    ns = f"w-{uuid.uuid4().hex[:8]}"
    sbc.add_fault(**fp.kube_status(403, "Forbidden", "configmaps is forbidden", path=f"/namespaces/{ns}/configmaps$",
                                   count=None))
    inf = Informer(core.api_client, core.list_namespaced_config_map, queue.Queue(), namespace=ns)
    with pytest.raises(Exception) as err:  # noqa: B017 - ApiException(403), or KubeForbidden naming the permission
        watch_until([inf], lambda: Progress("waiting", "x", "x"), timeout_s=20, log_prefix="configmaps")
    assert "forbidden" in str(err.value).lower()
    assert not inf.relists  # never retried
