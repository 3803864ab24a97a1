"""One change to a model at a time: a Prefect global concurrency limit per model.

deploy, release, rollback, park and wake of one model take the same lock, so they never interleave;
two different models hold different locks and run in parallel. The slot is a lease that the client
renews while the holder runs: a killed process frees it when the lease expires, so a rerun converges.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress

from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from manifests.errors import FleetError
from manifests.spec import DeploymentSpec
from tasks.log import logger

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


@contextmanager
def model_lock(spec: DeploymentSpec, *, purpose: str, timeout_s: float | None = 3600.0) -> Iterator[None]:
    """Hold the model's lock for ``purpose`` (release, park, ...); wait up to ``timeout_s`` for it."""
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
                          f"wait for the running release/park/wake of {spec.name} to finish, then rerun "
                          f"(Prefect UI → Concurrency → {name})") from None
