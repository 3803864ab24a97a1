"""The model lock as a coordination.k8s.io Lease (tasks/locks.py) against the sandbox's API server:
resourceVersion conflicts, expiry of a dead holder, fencing, the operator Role, no Prefect server needed."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from manifests import names
from manifests.render import operator_rbac
from manifests.spec import load_spec
from sandbox.core import Clock, Faults
from sandbox.kube import KubeCluster
from tasks import k8s
from tasks.locks import LockLost, LockTimeout, fence, lease_lock, lease_name, model_lock
from tests.sandbox.kube_support import StubRuntime, api_client, write_kubeconfig

ROOT = Path(__file__).resolve().parents[2]
SPEC = load_spec(ROOT / "deployments/gemma2-2b-it-vllm-l4.yaml")
NS = SPEC.namespace


@pytest.fixture(scope="module")
def kube():
    clock = Clock(0.002)
    k = KubeCluster(clock=clock, faults=Faults(), runtime=StubRuntime(clock))
    k.start()
    yield k
    k.stop()


@pytest.fixture(scope="module")
def kubeconfig(kube, tmp_path_factory):
    return write_kubeconfig(kube, tmp_path_factory.mktemp("kube") / "config")


@pytest.fixture(autouse=True)
def no_prefect(monkeypatch):
    # The Lease lock must not need the Prefect server (whose concurrency leases a restart forgets):
    # point the API at a closed port. The old Prefect-limit lock failed here.
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")


def _lease(kube) -> client.V1Lease:
    return client.CoordinationV1Api(api_client(kube)).read_namespaced_lease(lease_name(SPEC), NS)


def test_the_api_server_refuses_a_stale_lease_write(kube):
    coord = client.CoordinationV1Api(api_client(kube))
    client.CoreV1Api(api_client(kube)).create_namespace({"metadata": {"name": "lease-rv"}})
    made = coord.create_namespaced_lease("lease-rv", {"metadata": {"name": "x"}, "spec": {"holderIdentity": "a"}})
    made.spec.holder_identity = "b"
    coord.replace_namespaced_lease("x", "lease-rv", made)
    made.spec.holder_identity = "c"  # still the first resourceVersion
    with pytest.raises(ApiException) as err:
        coord.replace_namespaced_lease("x", "lease-rv", made)
    assert err.value.status == 409 and json.loads(err.value.body)["reason"] == "Conflict"


def test_lock_is_a_lease_taken_in_turn_and_given_up(kube, kubeconfig):
    with model_lock(SPEC, purpose="release", kubeconfig=kubeconfig, lease_s=4):  # creates the namespace too
        held = _lease(kube).spec
        assert held.holder_identity.startswith("release@") and held.lease_duration_seconds == 4
        with pytest.raises(LockTimeout, match="release@"), \
                model_lock(SPEC, purpose="park", kubeconfig=kubeconfig, timeout_s=0.5, lease_s=4):
            pass
        fence(NS)  # held and renewed: mutating steps go on
    assert not _lease(kube).spec.holder_identity  # given up at once, not left to expire
    with model_lock(SPEC, purpose="park", kubeconfig=kubeconfig, timeout_s=1, lease_s=4):
        pass


def test_a_dead_holder_frees_the_lock_after_the_lease_and_changes_nothing_after(kube, kubeconfig):
    """A killed holder (renewals stop, nothing released) blocks the next run for one lease duration, not
    an hour; and once another run holds the lock, the old holder's next mutating step raises LockLost."""
    lease_s = 2
    client.CoreV1Api(api_client(kube)).create_namespaced_config_map(NS, {"metadata": {"name": "probe"}})
    entered, taken, outcome = threading.Event(), threading.Event(), {}

    def old_holder() -> None:  # its own thread: its own context, as another process would be
        with lease_lock(SPEC, purpose="release", kubeconfig=kubeconfig, lease_s=lease_s) as h:
            h.stop.set()  # "dies": no renewals, no release
            entered.set()
            taken.wait(30)
            try:
                k8s.annotate.fn(kubeconfig=kubeconfig, api_version="v1", kind="ConfigMap", name="probe",
                                namespace=NS, annotations={"stale": "write"})
            except LockLost as exc:
                outcome["lost"] = exc

    t = threading.Thread(target=old_holder)
    t.start()
    assert entered.wait(30)
    died = time.monotonic()
    with model_lock(SPEC, purpose="wake", kubeconfig=kubeconfig, timeout_s=30, lease_s=lease_s):
        waited = time.monotonic() - died
        assert _lease(kube).spec.holder_identity.startswith("wake@")
        assert 0.5 * lease_s <= waited < lease_s + 5
        taken.set()
        t.join(30)
        fence(NS)  # the new holder's own steps go on
    assert "lost" in outcome  # fencing: the old holder changed nothing
    cm = client.CoreV1Api(api_client(kube)).read_namespaced_config_map("probe", NS)
    assert "stale" not in (cm.metadata.annotations or {})


def test_the_operator_role_may_take_the_lock(kube, tmp_path):
    """The rendered operator Role allows the Lease verbs (the RBAC authorizer as the real one decides)."""
    admin = api_client(kube)
    rbac, core = client.RbacAuthorizationV1Api(admin), client.CoreV1Api(admin)
    sa, role, binding = operator_rbac(SPEC)[:3]
    core.create_namespaced_service_account(NS, sa)
    rbac.create_namespaced_role(NS, role)
    rbac.create_namespaced_role_binding(NS, binding)
    token = core.create_namespaced_service_account_token(names.OPERATOR_ACCOUNT, NS, {"spec": {}}).status.token
    path = write_kubeconfig(kube, tmp_path / "operator", token=token)
    with model_lock(SPEC, purpose="deploy", kubeconfig=path, timeout_s=5, lease_s=4):
        assert _lease(kube).spec.holder_identity.startswith("deploy@")
    assert not _lease(kube).spec.holder_identity
