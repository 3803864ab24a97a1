"""One change to a model at a time: a Prefect global concurrency limit per model.

deploy, release, rollback, park and wake of one model take the same lock, so they never interleave;
two different models hold different locks and run in parallel. The slot is a lease that the client
renews while the holder runs: a killed process frees it when the lease expires, so a rerun converges.

Prefect renews the lease from a thread of its own (every 0.75 x LEASE_S), so a holder that blocks for
hours — a release paused at its promotion gate — keeps the lock while its process lives. If renewal
fails (the Prefect API unreachable for longer than its retries), the slot may go to another run: Prefect
then interrupts the holder (strict=True), and model_lock turns that into LockLost, so the run stops
where it is — loudly, without touching the model further — and a rerun converges.

On GKE the lock is a ``coordination.k8s.io/v1`` Lease in the model's namespace (``kubeconfig=`` given):
the cluster is the source of truth, so a Prefect server restart (whose concurrency leases live in
memory by default, ``server.concurrency.lease_storage``) cannot leave it taken. It follows client-go's
leader election (k8s.io/client-go/tools/leaderelection): take it when free or expired (renewTime +
leaseDurationSeconds in the past), every write guarded by resourceVersion, renewed from a thread while
held, cleared on exit. Fencing: every mutating task in tasks/k8s.py and tasks/gke.py calls ``fence()``
first, which raises LockLost once this process can no longer be sure it holds the lease, so a holder
that lost it changes nothing more. Vertex AI models (no cluster) keep the Prefect limit.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from manifests import names
from manifests.errors import FleetError
from manifests.spec import DeploymentSpec
from tasks.fencing import HeldLease, LockLost, fence, held_leases
from tasks.log import logger
from tasks.settings import get_settings

__all__ = ["LockLost", "LockTimeout", "fence", "lease_lock", "lease_name", "model_lock"]

# How long a crashed holder keeps the model locked (the lease is renewed while the holder lives).
LEASE_S = 60.0


class LockTimeout(FleetError):
    """Another run holds the model's lock for longer than this run would wait."""


def lock_name(spec: DeploymentSpec) -> str:
    # Keyed by project and name: two specs of one name in different projects are different models.
    return f"llm-fleet-model-{spec.cluster.project}-{spec.name}"


_known: set[tuple[str, str]] = set()  # (Prefect API URL, limit name) this process has seen exist


def ensure_limit(name: str) -> None:
    """Create the limit (limit 1) if missing: `concurrency()` is a silent no-op on an unknown name."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.settings import PREFECT_API_URL

    key = (str(PREFECT_API_URL.value()), name)
    if key in _known:
        return

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            _known.add(key)
            return
        except ObjectNotFound:
            pass
        with suppress(ObjectAlreadyExists):  # another run created it meanwhile
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    _known.add(key)


def drop_model_lock(spec: DeploymentSpec, *, kubeconfig: str | None) -> None:
    """Teardown: a torn-down model leaves no lock behind -- its Lease (GKE, when its namespace stays for
    another model) and its Prefect limit (Vertex, older runs)."""
    from kubernetes.client.rest import ApiException

    if kubeconfig is not None:
        try:
            _coord(kubeconfig).delete_namespaced_lease(lease_name(spec), spec.namespace,
                                                       _request_timeout=get_settings().call_timeout_s)
        except ApiException as exc:
            if exc.status != 404:
                raise
    with get_client(sync_client=True) as client, suppress(ObjectNotFound):
        client.delete_global_concurrency_limit_by_name(lock_name(spec))
    _known.discard((_api_url(), lock_name(spec)))


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


@contextmanager
def model_lock(spec: DeploymentSpec, *, purpose: str, timeout_s: float | None = 3600.0,
               kubeconfig: str | None = None, lease_s: float = LEASE_S) -> Iterator[None]:
    """Hold the model's lock for ``purpose`` (release, park, ...); wait up to ``timeout_s`` for it.

    With ``kubeconfig`` (GKE) the lock is a Lease in the model's namespace; without, a Prefect limit."""
    if kubeconfig is not None:
        with lease_lock(spec, purpose=purpose, kubeconfig=kubeconfig, timeout_s=timeout_s, lease_s=lease_s):
            yield
        return
    name = lock_name(spec)
    ensure_limit(name)
    log = logger()
    log.info("taking the lock %s for %s", name, purpose)
    held = False
    try:
        with concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True, lease_duration=LEASE_S):
            held = True
            yield
    except TimeoutError:
        if held:  # a timeout inside the body is the body's own error
            raise
        raise LockTimeout(f"another run has held {spec.name}'s lock for over {timeout_s:.0f} s",
                          f"wait for the running release/park/wake of {spec.name} to finish, then rerun; a "
                          "release with auto_promote: false holds it while it waits at its promotion gate — "
                          f"resume that run with promote true or false (Prefect UI → Concurrency → {name})") from None
    except asyncio.CancelledError as exc:
        # Prefect cancels the holder when the lease cannot be renewed (strict=True); a sync flow has no
        # other source of CancelledError inside the lock.
        if not held:
            raise
        raise LockLost(f"the lease on {name} could not be renewed while {purpose} of {spec.name} held it (the "
                       "Prefect API unreachable, or the lease already revoked); another run may hold the lock now, so this run stopped "
                       "where it was", f"check where {spec.name}'s live Service points (this run moved no traffic "
                       f"after that), then rerun {purpose}: it re-observes the cluster and converges") from exc


# ---- the Lease lock (GKE) -------------------------------------------------------------------------------

def lease_name(spec: DeploymentSpec) -> str:
    """The model's Lease: one per model, in its namespace."""
    return names.lock_lease(spec)


def _now() -> datetime:
    return datetime.now(UTC)


def _expired(lease: Any, now: datetime) -> bool:
    s = lease.spec
    if not s or not s.holder_identity:
        return True
    renewed = s.renew_time or s.acquire_time
    if renewed is None:
        return True
    if renewed.tzinfo is None:
        renewed = renewed.replace(tzinfo=UTC)
    return renewed + timedelta(seconds=s.lease_duration_seconds or 0) < now


def _coord(kubeconfig: str):
    from kubernetes import client as k8s

    from tasks.clients import kube_client

    return k8s.CoordinationV1Api(kube_client(kubeconfig))


def _body(h: HeldLease, *, transitions: int, acquired: datetime, rv: str | None = None) -> dict[str, Any]:
    now = _now()
    meta: dict[str, Any] = {"name": h.name, "namespace": h.namespace,
                            "labels": {"app.kubernetes.io/managed-by": "llm-fleet"}}
    if rv:
        meta["resourceVersion"] = rv
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta,
            "spec": {"holderIdentity": h.holder, "leaseDurationSeconds": h.lease_s,
                     "acquireTime": acquired.isoformat(), "renewTime": now.isoformat(),
                     "leaseTransitions": transitions}}


def _read_lease(api: Any, h: HeldLease) -> Any:
    """The Lease as the API server has it; None when there is none (404)."""
    from kubernetes.client.rest import ApiException

    try:
        return api.read_namespaced_lease(h.name, h.namespace, _request_timeout=get_settings().call_timeout_s)
    except ApiException as exc:
        if exc.status != 404:
            raise
        return None


def _try_acquire(h: HeldLease, spec: DeploymentSpec) -> str | None:
    """One attempt; None when taken, else who holds it. 409s (a race) count as held by someone else."""
    from kubernetes.client.rest import ApiException

    api, timeout = _coord(h.kubeconfig), get_settings().call_timeout_s
    started = time.monotonic()
    live = _read_lease(api, h)
    try:
        if live is None:
            try:
                out = api.create_namespaced_lease(h.namespace, _body(h, transitions=0, acquired=_now()),
                                                  _request_timeout=timeout)
            except ApiException as exc:
                if exc.status != 404:  # 404: the namespace itself is missing (a first deploy)
                    raise
                _ensure_namespace(h.kubeconfig, spec)
                out = api.create_namespaced_lease(h.namespace, _body(h, transitions=0, acquired=_now()),
                                                  _request_timeout=timeout)
        elif live.spec.holder_identity == h.holder or _expired(live, _now()):
            out = api.replace_namespaced_lease(
                h.name, h.namespace, _body(h, transitions=(live.spec.lease_transitions or 0) + 1, acquired=_now(),
                                           rv=live.metadata.resource_version), _request_timeout=timeout)
        else:
            return live.spec.holder_identity
    except ApiException as exc:
        if exc.status == 409:  # another contender wrote first (AlreadyExists / Conflict)
            return "another run (raced)"
        raise
    h.renewed, h.resource_version = started, out.metadata.resource_version
    return None


def _ensure_namespace(kubeconfig: str, spec: DeploymentSpec) -> None:
    from manifests.render import namespace
    from tasks.k8s import apply_object

    apply_object.fn(kubeconfig=kubeconfig, obj=namespace(spec))


def _renew_once(h: HeldLease) -> None:
    from kubernetes.client.rest import ApiException

    api, timeout = _coord(h.kubeconfig), get_settings().call_timeout_s
    started = time.monotonic()
    live = _read_lease(api, h)
    if live is None:
        _lease_gone(h, started)
        return
    if live.spec.holder_identity != h.holder:
        h.lost = f"taken by {live.spec.holder_identity or 'nobody (released by hand)'}"
        return
    try:
        out = api.replace_namespaced_lease(
            h.name, h.namespace, _body(h, transitions=live.spec.lease_transitions or 0,
                                       acquired=live.spec.acquire_time or _now(),
                                       rv=live.metadata.resource_version), _request_timeout=timeout)
    except ApiException as exc:
        if exc.status == 409:  # written meanwhile: the next round re-reads who holds it
            return
        raise
    h.renewed, h.resource_version = started, out.metadata.resource_version


def _lease_gone(h: HeldLease, started: float) -> None:
    """The Lease vanished. With its namespace gone or terminating (this holder's teardown deleted it) no
    one else can hold it — a contender must first make the namespace anew, and then its Lease shows up
    here as taken — so the hold stands. In a live namespace (deleted by hand) it is written anew."""
    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException

    from tasks.clients import kube_client

    timeout = get_settings().call_timeout_s
    try:
        ns = k8s.CoreV1Api(kube_client(h.kubeconfig)).read_namespace(h.namespace, _request_timeout=timeout)
    except ApiException as exc:
        if exc.status != 404:
            raise
        ns = None
    if ns is None or ns.metadata.deletion_timestamp or (ns.status and ns.status.phase == "Terminating"):
        h.renewed = started
        return
    out = _coord(h.kubeconfig).create_namespaced_lease(h.namespace, _body(h, transitions=0, acquired=_now()),
                                                       _request_timeout=timeout)
    h.renewed, h.resource_version = started, out.metadata.resource_version


def _renewer(h: HeldLease) -> None:
    period = h.lease_s / 4
    while not h.stop.wait(period):
        with suppress(Exception):  # transient API errors: retried next round; the fence covers the gap
            _renew_once(h)
        if h.lost is not None or time.monotonic() - h.renewed >= h.lease_s:
            h.lost = h.lost or "not renewed within its duration"
            logger().warning("lost the lock %s/%s: %s", h.namespace, h.name, h.lost)
            return


def _release(h: HeldLease) -> None:
    """Give the Lease up at once (client-go's ReleaseOnCancel): holder cleared, guarded by resourceVersion."""
    # Best effort: unreleased, it expires within its duration anyway (and a teardown may have removed the
    # namespace, the cluster or its kubeconfig by now).
    with suppress(Exception):
        api = _coord(h.kubeconfig)
        live = _read_lease(api, h)
        if live is None or live.spec.holder_identity != h.holder:
            return
        live.spec.holder_identity = None
        live.spec.lease_duration_seconds = 1
        api.replace_namespaced_lease(h.name, h.namespace, live, _request_timeout=get_settings().call_timeout_s)


@contextmanager
def lease_lock(spec: DeploymentSpec, *, purpose: str, kubeconfig: str, timeout_s: float | None = 3600.0,
               lease_s: float = LEASE_S) -> Iterator[HeldLease]:
    h = HeldLease(kubeconfig=str(kubeconfig), namespace=spec.namespace, name=lease_name(spec),
                  holder=f"{purpose}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
                  lease_s=max(1, round(lease_s)))
    log = logger()
    log.info("taking the lock %s/%s for %s", h.namespace, h.name, purpose)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    poll = min(2.0, max(0.1, h.lease_s / 10))
    while (holder := _try_acquire(h, spec)) is not None:
        if deadline is not None and time.monotonic() + poll > deadline:
            raise LockTimeout(f"{holder} has held {spec.name}'s lock (Lease {h.namespace}/{h.name}) for over "
                              f"{timeout_s:.0f} s",
                              f"wait for the running release/park/wake of {spec.name} to finish, then rerun; a "
                              "release with auto_promote: false holds it while it waits at its promotion gate — "
                              "resume that run with promote true or false. A holder that died frees it within "
                              f"{h.lease_s} s")
        time.sleep(poll)
    token = held_leases.set((*held_leases.get(), h))
    renewer = threading.Thread(target=_renewer, args=(h,), name=f"lease-{h.name}", daemon=True)
    renewer.start()
    try:
        yield h
    finally:
        h.stop.set()
        renewer.join(timeout=5)
        held_leases.reset(token)
        if h.lost is None:
            _release(h)
