"""The fence every mutating task checks first: does this run still hold the model's lock?

tasks/locks.py takes and renews the lock (a Lease) and registers it here; tasks/k8s.py and tasks/gke.py
call ``fence()`` before each write. Apart from locks.py so the tasks it fences need not import the lock
(which itself creates the namespace through tasks/k8s.py).
"""

from __future__ import annotations

import contextvars
import threading
import time
from dataclasses import dataclass, field

from manifests.errors import FleetError


class LockLost(FleetError):
    """The lease on the model's lock could not be renewed: another run may hold it now."""


@dataclass
class HeldLease:
    """One Lease this process holds; ``valid()`` is the fence."""

    kubeconfig: str
    namespace: str
    name: str
    holder: str
    lease_s: int
    renewed: float = field(default_factory=time.monotonic)  # monotonic time of the last successful write
    resource_version: str = ""
    lost: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def valid(self) -> bool:
        # A contender may take the lease lease_s after our last renewTime; stop acting well before that.
        return self.lost is None and time.monotonic() - self.renewed < 0.75 * self.lease_s


# The leases the running code holds (a context variable: the flow run's thread and the tasks it calls).
held_leases: contextvars.ContextVar[tuple[HeldLease, ...]] = contextvars.ContextVar("llm_fleet_leases", default=())


def fence(namespace: str | None = None) -> None:
    """Raise LockLost if the running code holds a model lock (in ``namespace``, or any) and can no longer
    be sure it still does: called before each mutating step, so a holder that lost the lock changes nothing."""
    for h in held_leases.get():
        if namespace is not None and h.namespace != namespace:
            continue
        if not h.valid():
            raise LockLost(f"the Lease {h.namespace}/{h.name} was {h.lost or 'not renewed within its duration'}; "
                           "another run may hold the lock now, so this run stopped before changing anything more",
                           "check where the model's live Service points, then rerun: it re-observes the cluster "
                           "and converges")
