"""GKE fast-starting nodes: how long a node GKE creates for an Autopilot-mode workload takes to boot.

GKE pre-initializes hardware so that nodes for compatible Autopilot-mode workloads start "up to four times
faster" than the same request in Standard mode, best effort: "surge requests might only be partially
served", the rest boot at the normal time. Used automatically, no setting, when (all of):

* the workload runs in Autopilot mode: an Autopilot cluster, or a Standard cluster's pod that selects a
  custom ComputeClass with ``spec.autopilot.enabled: true`` (Autopilot ComputeClasses need a Standard
  cluster in the Rapid channel at 1.33.1-gke.1107000 or later, or 1.34.1-gke.1829001 or later; earlier the
  class makes no node at all);
* the cluster is in the Rapid release channel;
* the node is G2 (NVIDIA L4) with a ``pd-balanced`` boot disk of at most 500 GiB;
* none of: G2 on GKE < 1.31; the ``DEFAULT`` GPU driver before 1.33.0-gke.1304000; secondary boot disks
  before 1.33.2-gke.1015000; CMEK; Spot VMs; local SSDs; placement policies; multi-network.

Sources (docs/sandbox-contract.md, "Fast-starting nodes"): cloud.google.com/kubernetes-engine/docs/
concepts/fast-starting-nodes; .../how-to/autopilot-classes-standard-clusters; .../concepts/
about-built-in-compute-classes. GKE shows nothing on the node or the pod that says a node started fast
(no label, condition or event): what differs is the time from the pod's ``TriggeredScaleUp`` to its node.
The sandbox keeps its decision in the autoscaler's record (``GET /sandbox/state``: ``autopilot_node_boot``),
which is the sandbox's own bookkeeping, not a GKE field.

The pre-initialized capacity is a bounded pool per (zone, machine family): ``PREINIT_PER_ZONE`` nodes, each
taken by one fast start and made ready again ``PREINIT_REFILL_S`` cloud seconds later (GKE publishes
neither number; these are the sandbox's, settable per zone for tests: ``FastNodes.pool``).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sandbox import coldstart

if TYPE_CHECKING:
    from sandbox.gke.state import _Cluster

FAST_START_SPEEDUP = 4.0  # "up to four times faster node startup time" (Autopilot GPU workloads)
PREINIT_PER_ZONE = 2
PREINIT_REFILL_S = 600.0
MAX_BOOT_DISK_GIB = 500
FAMILIES = {"g2": "nvidia-l4"}  # compatible machine series (and the GPU that comes with it)
MIN_G2 = (1, 31, 0, 0)
MIN_DEFAULT_DRIVER = (1, 33, 0, 1304000)
MIN_SECONDARY_DISKS = (1, 33, 2, 1015000)
MIN_AUTOPILOT_CLASS_RAPID = (1, 33, 1, 1107000)  # Standard cluster, Rapid channel
MIN_AUTOPILOT_CLASS = (1, 34, 1, 1829001)  # Standard cluster, any channel
AUTOPILOT_NORMAL_CPU_S = 90.0  # a general-purpose Autopilot node (DEFAULT_DELAYS["autopilot_node_provision"])


def version(v: str) -> tuple[int, ...]:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?(?:-gke\.(\d+))?", v or "")
    return tuple(int(x or 0) for x in m.groups()) if m else (0, 0, 0, 0)


@dataclass(frozen=True)
class Shape:
    """What the Autopilot-mode pod asks for: from its node selector and the ComputeClass priority it uses."""
    accelerator: str | None
    gpus: int
    spot: bool = False
    rule: dict[str, Any] | None = None  # the ComputeClass priority the node is made from (None: no class)
    annotations: dict[str, str] | None = None

    @property
    def family(self) -> str:
        rule = self.rule or {}
        if rule.get("machineType"):
            return str(rule["machineType"]).split("-")[0]
        if rule.get("machineFamily"):
            return str(rule["machineFamily"])
        return next((f for f, gpu in FAMILIES.items() if gpu == self.accelerator), "a2" if self.accelerator else "e2")

    @property
    def machine(self) -> str:
        rule = self.rule or {}
        return str(rule.get("machineType") or f"{self.family}-standard-{max(4, 4 * self.gpus)}")


def autopilot_class_problem(cluster_data: dict[str, Any]) -> str | None:
    """Why a Standard cluster cannot run Autopilot-mode workloads through a ComputeClass, or None."""
    if (cluster_data.get("autopilot") or {}).get("enabled"):
        return None
    v = version(cluster_data.get("currentMasterVersion", ""))
    channel = (cluster_data.get("releaseChannel") or {}).get("channel")
    if v >= MIN_AUTOPILOT_CLASS or (channel == "RAPID" and v >= MIN_AUTOPILOT_CLASS_RAPID):
        return None
    return (f"Autopilot ComputeClasses need GKE 1.33.1-gke.1107000 or later in the Rapid channel (or "
            f"1.34.1-gke.1829001 or later); the cluster runs {cluster_data.get('currentMasterVersion')} in "
            f"{channel or 'no channel'}")


def incompatibility(cluster_data: dict[str, Any], shape: Shape) -> str | None:
    """Why this node starts at the normal time (the first broken condition), or None: it may start fast."""
    v = version(cluster_data.get("currentNodeVersion") or cluster_data.get("currentMasterVersion", ""))
    rule = shape.rule or {}
    storage = rule.get("storage") or {}
    gpu = rule.get("gpu") or {}
    if shape.family not in FAMILIES or (shape.accelerator and shape.accelerator != FAMILIES.get(shape.family)):
        return f"machine series {shape.family} ({shape.accelerator or 'no GPU'}) has no fast-starting nodes"
    if (cluster_data.get("releaseChannel") or {}).get("channel") != "RAPID":
        return "the cluster is not in the Rapid release channel"
    if v < MIN_G2:
        return f"G2 on GKE {cluster_data.get('currentNodeVersion')} (< 1.31)"
    if str(gpu.get("driverVersion", "default")).lower() == "default" and v < MIN_DEFAULT_DRIVER:
        return "the DEFAULT GPU driver before 1.33.0-gke.1304000"
    if storage.get("secondaryBootDisks") and v < MIN_SECONDARY_DISKS:
        return "secondary boot disks before 1.33.2-gke.1015000"
    if storage.get("bootDiskKMSKey"):
        return "a customer-managed encryption key (CMEK) on the boot disk"
    if shape.spot or rule.get("spot"):
        return "Spot VMs"
    if int(storage.get("localSSDCount", 0) or 0) > 0:
        return "local SSDs"
    if (rule.get("placement") or {}).get("policyName"):
        return "a placement policy"
    if (shape.annotations or {}).get("networking.gke.io/interfaces"):
        return "multi-network"
    disk = storage.get("bootDiskType", "pd-balanced")
    if disk != "pd-balanced":
        return f"boot disk type {disk} (fast-starting nodes use pd-balanced)"
    if int(storage.get("bootDiskSize", 100) or 100) > MAX_BOOT_DISK_GIB:
        return f"a {storage.get('bootDiskSize')} GiB boot disk (at most {MAX_BOOT_DISK_GIB} GiB)"
    return None


def normal_boot_s(shape: Shape) -> float:
    """The boot of the same node in Standard mode (GKE installs the driver at boot): the cold-start clock."""
    if not shape.accelerator:
        return AUTOPILOT_NORMAL_CPU_S
    return coldstart.node_boot_s(shape.machine, accelerator=shape.accelerator, driver="LATEST")


class FastNodes:
    """One GKE cluster's Autopilot-mode node boots, set on its Kubernetes API (``kube.gke_nodes``)."""

    def __init__(self, gke: Any, cluster: _Cluster) -> None:
        self.gke, self.cluster = gke, cluster

    @property
    def name(self) -> str:
        return self.cluster.name

    def autopilot_class_problem(self) -> str | None:
        return autopilot_class_problem(self.cluster.data)

    def zone(self, shape: Shape) -> str:
        """The zone an Autopilot node of this shape goes to: the cluster's first that offers the GPU (as
        ``AutopilotMixin.autopilot_node_event`` bills it)."""
        compute = self.gke.compute
        zones = [z for z in self.cluster.data.get("locations", [])
                 if not shape.accelerator or compute.offers(z, shape.accelerator)]
        return zones[0] if zones else self.cluster.location

    def boot(self, node: str, shape: Shape) -> float:
        """Cloud seconds until the node is Ready; takes one pre-initialized node when it may start fast."""
        normal = normal_boot_s(shape)
        why = incompatibility(self.cluster.data, shape) if shape.accelerator else "no GPU"
        zone = self.zone(shape)
        if why is None and not self.gke.fast_nodes.take(zone, shape.family):
            why = f"no pre-initialized {shape.family} capacity left in {zone} (best effort)"
        seconds = normal if why else normal / FAST_START_SPEEDUP
        self.gke.autoscaler._record("autopilot_node_boot", "", node,
                                    f"{'normal' if why else 'fast'} {seconds:g} s in {zone}" + (f": {why}" if why else ""))
        return seconds


class PreInitialized:
    """GKE's pre-initialized capacity per (zone, machine family): bounded, taken by fast starts, refilled."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.pool: dict[tuple[str, str], int] = {}  # (zone, family) -> nodes ready now (default PREINIT_PER_ZONE)
        self._refills: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()

    def take(self, zone: str, family: str) -> bool:
        now = self.clock.now()
        with self._lock:
            due = [r for r in self._refills if r[0] <= now]
            self._refills = [r for r in self._refills if r[0] > now]
            for _, z, f in due:
                self.pool[(z, f)] = self.pool.get((z, f), PREINIT_PER_ZONE) + 1
            left = self.pool.get((zone, family), PREINIT_PER_ZONE)
            if left <= 0:
                return False
            self.pool[(zone, family)] = left - 1
            self._refills.append((now + PREINIT_REFILL_S, zone, family))
            return True

    def set(self, zone: str, family: str, nodes: int) -> None:
        with self._lock:
            self.pool[(zone, family)] = nodes
            self._refills = [r for r in self._refills if (r[1], r[2]) != (zone, family)]
