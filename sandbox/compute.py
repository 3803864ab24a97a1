"""Compute Engine emulator: regions, zones, quotas, accelerator types, managed instance groups.

Speaks the Compute v1 REST dialect that the product (plain JSON, tasks/clients.py), ``google.cloud.compute_v1``
clients (``transport="rest"``) and ``gcloud compute`` send: ``/compute/v1/projects/{project}/regions/{region}``, ``.../regions``,
``.../zones[/{zone}]``, ``.../zones/{zone}/acceleratorTypes[/{type}]``,
``.../aggregated/acceleratorTypes``, ``/compute/v1/projects/{project}`` (project info with the
``GPUS_ALL_REGIONS`` quota), and read-only ``instanceGroupManagers`` / ``instances`` for the node
pools the GKE emulator creates, with each VM's own ``compute.instances.insert`` / ``.delete``
operations (``.../zones/{zone}/operations``, ``.../aggregated/operations``). This module does not import ``compute_v1`` (~8 s to import); the
tests parse every reply strictly with its message types.

Python API (used by the GKE emulator and the control API):

* ``reserve(region, metric, n)`` / ``reserve_many(region, {metric: n})`` / ``release(...)`` move the
  regional usage and, for GPU and CPU metrics, the project-wide ``GPUS_ALL_REGIONS`` /
  ``CPUS_ALL_REGIONS`` usage; a shortfall raises :class:`QuotaExceeded` and changes nothing.
* ``set_quota(region_or_None, metric, limit)``; ``set_stockout(zone, accelerator, on=True)`` with an
  accelerator type, ``None`` (every GPU type) or ``"*"`` (every VM, CPU-only too);
  ``offers(zone, accelerator)``; ``stocked_out(zone, accelerator)``.

Quota state is kept per project (any project id is accepted, created lazily from the defaults);
stockouts are physical and shared by every project.
"""

from __future__ import annotations

import re
import threading
import time
import zlib
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from sandbox.core import Clock, Emulator, Faults, HttpError, JsonHandler, SandboxHTTPServer, route

API_BASE = "https://www.googleapis.com/compute/v1"
CREATION_TS = "2016-05-01T00:00:00.000-07:00"

# region -> (zone suffixes, description)
REGIONS: dict[str, tuple[str, str]] = {
    "us-central1": ("abcf", "Council Bluffs, Iowa, North America"),
    "us-east1": ("bcd", "Moncks Corner, South Carolina, North America"),
    "us-east4": ("abc", "Ashburn, Virginia, North America"),
    "us-west1": ("abc", "The Dalles, Oregon, North America"),
    "us-west4": ("abc", "Las Vegas, Nevada, North America"),
    "europe-west1": ("bcd", "St. Ghislain, Belgium, Europe"),
    "europe-west4": ("abc", "Eemshaven, Netherlands, Europe"),
    "asia-southeast1": ("abc", "Jurong West, Singapore, APAC"),
    "asia-northeast1": ("abc", "Tokyo, Japan, APAC"),
}

# accelerator type -> (description, maximumCardsPerInstance, regional quota metric)
ACCELERATOR_TYPES: dict[str, tuple[str, int, str]] = {
    "nvidia-l4": ("NVIDIA L4", 8, "NVIDIA_L4_GPUS"),
    "nvidia-l4-vws": ("NVIDIA L4 Virtual Workstation", 8, "NVIDIA_L4_VWS_GPUS"),
    "nvidia-tesla-t4": ("NVIDIA T4", 4, "NVIDIA_T4_GPUS"),
    "nvidia-tesla-t4-vws": ("NVIDIA Tesla T4 Virtual Workstation", 4, "NVIDIA_T4_VWS_GPUS"),
    "nvidia-tesla-p100": ("NVIDIA Tesla P100", 4, "NVIDIA_P100_GPUS"),
    "nvidia-tesla-p100-vws": ("NVIDIA Tesla P100 Virtual Workstation", 4, "NVIDIA_P100_VWS_GPUS"),
    "nvidia-tesla-a100": ("NVIDIA A100 40GB", 16, "NVIDIA_A100_GPUS"),
    "nvidia-a100-80gb": ("NVIDIA A100 80GB", 8, "NVIDIA_A100_80GB_GPUS"),
    "nvidia-h100-80gb": ("NVIDIA H100 80GB", 8, "NVIDIA_H100_GPUS"),
}

_L4 = ("nvidia-l4", "nvidia-l4-vws")
_T4 = ("nvidia-tesla-t4", "nvidia-tesla-t4-vws")
_P100 = ("nvidia-tesla-p100", "nvidia-tesla-p100-vws")
_A100 = ("nvidia-tesla-a100",)
_A100_80 = ("nvidia-a100-80gb",)
_H100 = ("nvidia-h100-80gb",)

# Which accelerators each zone offers, with the gaps real regions have (us-central1-f and
# europe-west1-d have no L4, us-east1-c has no L4, most zones have no H100...).
ZONE_ACCELERATORS: dict[str, tuple[str, ...]] = {
    "us-central1-a": _L4 + _T4 + _A100 + _A100_80 + _H100,
    "us-central1-b": _L4 + _T4 + _A100 + _H100,
    "us-central1-c": _L4 + _T4 + _P100 + _A100 + _A100_80 + _H100,
    "us-central1-f": _T4 + _P100 + _A100,
    "us-east1-b": _L4 + _T4 + _P100,
    "us-east1-c": _T4 + _P100 + _A100,
    "us-east1-d": _L4 + _T4,
    "us-east4-a": _L4 + _T4 + _A100_80 + _H100,
    "us-east4-b": _T4,
    "us-east4-c": _L4 + _T4 + _A100_80 + _H100,
    "us-west1-a": _L4 + _T4 + _P100 + _H100,
    "us-west1-b": _L4 + _T4 + _P100 + _A100,
    "us-west1-c": _L4,
    "us-west4-a": _L4 + _T4 + _H100,
    "us-west4-b": _A100_80 + _T4,
    "us-west4-c": _L4 + _T4,
    "europe-west1-b": _L4 + _T4 + _P100,
    "europe-west1-c": _L4 + _T4,
    "europe-west1-d": _T4 + _P100,
    "europe-west4-a": _L4 + _T4 + _A100 + _A100_80 + _H100,
    "europe-west4-b": _L4 + _T4 + _A100 + _H100,
    "europe-west4-c": _L4 + _T4 + _H100,
    "asia-southeast1-a": _L4 + _T4 + _A100_80,
    "asia-southeast1-b": _L4 + _T4 + _A100,
    "asia-southeast1-c": _L4 + _T4 + _A100 + _A100_80 + _H100,
    "asia-northeast1-a": _T4 + _A100,
    "asia-northeast1-b": _L4,
    "asia-northeast1-c": _L4 + _T4 + _A100 + _H100,
}

ANY_MACHINE = "*"  # set_stockout(zone, "*"): no VM at all starts there
DEFAULT_GPU_LIMIT = 16.0  # enough for the bundled seed 003 (HPA max 10 replicas)
DEFAULT_REGIONAL_QUOTAS: dict[str, float] = {
    "CPUS": 200.0,
    "DISKS_TOTAL_GB": 40960.0,
    "SSD_TOTAL_GB": 2048.0,
    "LOCAL_SSD_TOTAL_GB": 6000.0,
    "STATIC_ADDRESSES": 8.0,
    "IN_USE_ADDRESSES": 64.0,
    "INSTANCES": 240.0,
    "INSTANCE_GROUPS": 100.0,
    "INSTANCE_GROUP_MANAGERS": 100.0,
    "INSTANCE_TEMPLATES": 100.0,
    "PREEMPTIBLE_CPUS": 0.0,
    "N2_CPUS": 200.0,
    "N2D_CPUS": 200.0,
    "C2_CPUS": 200.0,
    "A2_CPUS": 200.0,
    **{m: DEFAULT_GPU_LIMIT for _, _, m in ACCELERATOR_TYPES.values()},
    **{f"PREEMPTIBLE_{m}": DEFAULT_GPU_LIMIT for _, _, m in ACCELERATOR_TYPES.values()},
}
DEFAULT_PROJECT_QUOTAS: dict[str, float] = {
    "GPUS_ALL_REGIONS": 32.0,
    "CPUS_ALL_REGIONS": 400.0,
    "SNAPSHOTS": 5000.0,
    "NETWORKS": 15.0,
    "FIREWALLS": 200.0,
    "IMAGES": 2000.0,
    "STATIC_ADDRESSES": 8.0,
    "ROUTES": 250.0,
    "FORWARDING_RULES": 45.0,
    "TARGET_POOLS": 50.0,
    "HEALTH_CHECKS": 75.0,
    "IN_USE_ADDRESSES": 23.0,
    "TARGET_HTTP_PROXIES": 10.0,
    "URL_MAPS": 10.0,
    "BACKEND_SERVICES": 50.0,
    "INSTANCE_TEMPLATES": 100.0,
    "SUBNETWORKS": 275.0,
    "SSL_CERTIFICATES": 30.0,
}
# regional metrics that also count against a project-wide one
GLOBAL_COUNTERPART = {"CPUS": "CPUS_ALL_REGIONS"}


def is_gpu_metric(metric: str) -> bool:
    return metric.endswith("_GPUS") and "NVIDIA" in metric


def accelerator_metric(accelerator: str, *, spot: bool = False) -> str:
    """Regional quota metric for an accelerator type (``PREEMPTIBLE_`` variant for spot/preemptible)."""
    if accelerator not in ACCELERATOR_TYPES:
        raise KeyError(accelerator)
    metric = ACCELERATOR_TYPES[accelerator][2]
    return f"PREEMPTIBLE_{metric}" if spot else metric


def region_of(zone: str) -> str:
    return zone.rsplit("-", 1)[0]


def zones_of(region: str) -> list[str]:
    suffixes = REGIONS[region][0]
    return [f"{region}-{s}" for s in suffixes]


def _num(n: float) -> str:
    return f"{float(n):.1f}"


def _rfc3339_pacific(t: float) -> str:
    """GCE's timestamp form: milliseconds, in US Pacific time (``2026-12-05T18:27:39.123-08:00``)."""
    local = datetime.fromtimestamp(t, timezone(timedelta(hours=-8)))
    return local.strftime("%Y-%m-%dT%H:%M:%S.") + f"{local.microsecond // 1000:03d}-08:00"


def _id(*parts: str) -> str:
    """A stable numeric id, like Compute's uint64 ids (as a string)."""
    key = "/".join(parts).encode()
    return str(zlib.crc32(key) * 7919 + 1000000000000000000 + zlib.adler32(key))


class QuotaExceeded(Exception):
    """A reservation that would take usage past the limit."""

    def __init__(self, *, project: str, metric: str, region: str | None, requested: float, limit: float,
                 usage: float) -> None:
        self.project, self.metric, self.region = project, metric, region
        self.requested, self.limit, self.usage = requested, limit, usage
        self.available = max(0.0, limit - usage)
        self.short = requested - self.available
        scope = "regional quota" if region else "quota"
        # The text GKE returns (code=403) when a node pool or cluster would exceed a quota.
        super().__init__(
            f"Insufficient {scope} to satisfy request: resource \"{metric}\": request requires "
            f"'{_num(requested)}' and is short '{_num(self.short)}'. project has a quota of "
            f"'{_num(limit)}' with '{_num(self.available)}' available. View and manage quotas at "
            f"https://console.cloud.google.com/iam-admin/quotas?usage=USED&project={project}."
        )

    @property
    def compute_message(self) -> str:
        """The shorter text Compute itself uses (instance inserts, MIG resizes)."""
        where = f" in region {self.region}" if self.region else ""
        return f"Quota '{self.metric}' exceeded.  Limit: {_num(self.limit)}{where}."


class _ProjectQuota:
    def __init__(self) -> None:
        self.regional: dict[str, dict[str, list[float]]] = {
            r: {m: [lim, 0.0] for m, lim in DEFAULT_REGIONAL_QUOTAS.items()} for r in REGIONS
        }
        self.project: dict[str, list[float]] = {m: [lim, 0.0] for m, lim in DEFAULT_PROJECT_QUOTAS.items()}


class Compute(Emulator):
    """Compute Engine quotas, zones and accelerator types over REST (service name ``"compute"``)."""

    def __init__(self, *, clock: Clock, faults: Faults, project: str = "sandbox-project") -> None:
        self.clock = clock
        self.faults = faults
        self.project = project
        self.project_number = str(100000000000 + zlib.crc32(project.encode()) % 900000000000)
        self._lock = threading.RLock()
        self._quotas: dict[str, _ProjectQuota] = {}
        self._stockouts: set[tuple[str, str | None]] = set()
        # spot capacity gone (zone, accelerator | None): on-demand VMs still start there
        self._spot_stockouts: set[tuple[str, str | None]] = set()
        # (project, zone, name) -> {"targetSize": int, "baseInstanceName": str, "instances": [names], ...}
        self._migs: dict[tuple[str, str, str], dict[str, Any]] = {}
        # (project, "global" or region, name) -> address resource (gcloud compute addresses create)
        self.addresses: dict[tuple[str, str, str], dict[str, Any]] = {}
        # the VMs' own insert/delete operations (a MIG resize makes one per instance), oldest first, and
        # each live instance's creation time: what `gcloud compute operations list` / `instances list` show
        self._instance_ops: list[dict[str, Any]] = []
        self._instance_created: dict[tuple[str, str, str], str] = {}
        self._handler = ComputeHandler
        self._server: SandboxHTTPServer | None = None

    # ---- lifecycle ---------------------------------------------------------------------
    # ---- catalogue ---------------------------------------------------------------------
    @staticmethod
    def regions() -> list[str]:
        return list(REGIONS)

    @staticmethod
    def zones(region: str | None = None) -> list[str]:
        if region is None:
            return [z for r in REGIONS for z in zones_of(r)]
        return zones_of(region) if region in REGIONS else []

    @staticmethod
    def is_zone(location: str) -> bool:
        return location in ZONE_ACCELERATORS

    @staticmethod
    def is_region(location: str) -> bool:
        return location in REGIONS

    @staticmethod
    def offers(zone: str, accelerator: str) -> bool:
        """Whether ``zone`` has ``accelerator`` at all (regardless of stockouts)."""
        return accelerator in ZONE_ACCELERATORS.get(zone, ())

    # ---- stockouts ---------------------------------------------------------------------
    def set_stockout(self, zone: str, accelerator: str | None = None, on: bool = True, *, spot: bool = False) -> None:
        """Mark ``zone`` out of capacity for new VMs: of one ``accelerator`` type, of every accelerator
        (``None``: GPU VMs fail, plain CPU VMs still start), or of everything (``"*"``); with ``spot``,
        only Spot VMs (spot capacity is the excess Compute Engine has, and goes first)."""
        if zone not in ZONE_ACCELERATORS:
            raise ValueError(f"unknown zone {zone!r}")
        if accelerator not in (None, ANY_MACHINE) and accelerator not in ACCELERATOR_TYPES:
            raise ValueError(f"unknown accelerator type {accelerator!r} (or None for every GPU, '*' for every VM)")
        with self._lock:
            target = self._spot_stockouts if spot else self._stockouts
            if on:
                target.add((zone, accelerator))
            else:
                target.discard((zone, accelerator))

    def clear_stockouts(self) -> None:
        with self._lock:
            self._stockouts.clear()
            self._spot_stockouts.clear()

    def stocked_out(self, zone: str, accelerator: str | None = None, *, spot: bool = False) -> bool:
        """Whether a new VM with ``accelerator`` (``None``: a plain CPU VM) cannot start in ``zone`` (a
        Spot VM also not when the zone's spot capacity is gone)."""
        with self._lock:
            sets = (self._stockouts, self._spot_stockouts) if spot else (self._stockouts,)
            for held in sets:
                if (zone, ANY_MACHINE) in held:
                    return True
                if accelerator is not None and ((zone, None) in held or (zone, accelerator) in held):
                    return True
            return False

    @staticmethod
    def stockout_message(project: str, zone: str) -> str:
        return (f"The zone 'projects/{project}/zones/{zone}' does not have enough resources available to "
                f"fulfill the request.  Try a different zone, or try again later.")

    # ---- quotas ------------------------------------------------------------------------
    def _q(self, project: str | None) -> _ProjectQuota:
        project = project or self.project
        q = self._quotas.get(project)
        if q is None:
            q = self._quotas[project] = _ProjectQuota()
        return q

    def set_quota(self, region: str | None, metric: str, limit: float, *, project: str | None = None) -> None:
        """Set a regional quota limit (``region=None``: a project-wide one such as ``GPUS_ALL_REGIONS``)."""
        with self._lock:
            q = self._q(project)
            if region is None:
                q.project.setdefault(metric, [0.0, 0.0])[0] = float(limit)
            else:
                if region not in REGIONS:
                    raise ValueError(f"unknown region {region!r}")
                q.regional[region].setdefault(metric, [0.0, 0.0])[0] = float(limit)

    def quota(self, region: str | None, metric: str, *, project: str | None = None) -> dict[str, float]:
        """``{"limit", "usage", "available"}`` of one metric."""
        with self._lock:
            q = self._q(project)
            table = q.project if region is None else q.regional[region]
            limit, usage = table.get(metric, [0.0, 0.0])
            return {"limit": limit, "usage": usage, "available": max(0.0, limit - usage)}

    def _charges(self, q: _ProjectQuota, region: str, amounts: Mapping[str, float]
                 ) -> list[tuple[dict[str, list[float]], str, str | None, float]]:
        charges: list[tuple[dict[str, list[float]], str, str | None, float]] = []
        gpus = 0.0
        for metric, n in amounts.items():
            if not n:
                continue
            charges.append((q.regional[region], metric, region, float(n)))
            if is_gpu_metric(metric):
                gpus += float(n)
            if metric in GLOBAL_COUNTERPART:
                charges.append((q.project, GLOBAL_COUNTERPART[metric], None, float(n)))
        if gpus:
            charges.append((q.project, "GPUS_ALL_REGIONS", None, gpus))
        return charges

    def reserve_many(self, region: str, amounts: Mapping[str, float], *, project: str | None = None) -> None:
        """Take all of ``amounts`` at once or nothing (raises :class:`QuotaExceeded`)."""
        if region not in REGIONS:
            raise ValueError(f"unknown region {region!r}")
        with self._lock:
            q = self._q(project)
            charges = self._charges(q, region, amounts)
            for table, metric, reg, n in charges:
                limit, usage = table.setdefault(metric, [0.0, 0.0])
                if n > 0 and usage + n > limit + 1e-9:
                    raise QuotaExceeded(project=project or self.project, metric=metric, region=reg,
                                        requested=n, limit=limit, usage=usage)
            for table, metric, _, n in charges:
                table[metric][1] += n

    def reserve(self, region: str, metric: str, n: float, *, project: str | None = None) -> None:
        self.reserve_many(region, {metric: n}, project=project)

    def release_many(self, region: str, amounts: Mapping[str, float], *, project: str | None = None) -> None:
        with self._lock:
            q = self._q(project)
            for table, metric, _, n in self._charges(q, region, amounts):
                entry = table.setdefault(metric, [0.0, 0.0])
                entry[1] = max(0.0, entry[1] - n)

    def release(self, region: str, metric: str, n: float, *, project: str | None = None) -> None:
        self.release_many(region, {metric: n}, project=project)

    def quota_used(self, *, project: str | None = None) -> dict[str, Any]:
        """Non-zero usage: ``{"project": {metric: usage}, "regions": {region: {metric: usage}}}``."""
        with self._lock:
            q = self._q(project)
            return {
                "project": {m: u for m, (_, u) in q.project.items() if u},
                "regions": {r: {m: u for m, (_, u) in t.items() if u} for r, t in q.regional.items()
                            if any(u for _, u in t.values())},
            }

    # ---- managed instance groups (registered by the GKE emulator) -----------------------
    def set_mig(self, zone: str, name: str, *, instances: list[str], base_instance_name: str,
                project: str | None = None) -> None:
        with self._lock:
            key = (project or self.project, zone, name)
            mig = self._migs.setdefault(key, {"created": True})
            before = set(mig.get("instances") or [])
            mig["instances"] = list(instances)
            mig["baseInstanceName"] = base_instance_name
            self._instance_changes(key[0], zone, before, set(instances))

    def delete_mig(self, zone: str, name: str, *, project: str | None = None) -> None:
        with self._lock:
            mig = self._migs.pop((project or self.project, zone, name), None)
            if mig is not None:
                self._instance_changes(project or self.project, zone, set(mig.get("instances") or []), set())

    def _instance_changes(self, project: str, zone: str, before: set[str], after: set[str]) -> None:
        """Caller holds the lock. The MIG created / deleted these VMs now: one operation each, as GCE
        records them (``compute.instances.insert`` / ``.delete`` by the project's cloudservices account)."""
        now = _rfc3339_pacific(time.time())
        for kind, names in (("insert", sorted(after - before)), ("delete", sorted(before - after))):
            for vm in names:
                if kind == "insert":
                    self._instance_created[(project, zone, vm)] = now
                else:
                    self._instance_created.pop((project, zone, vm), None)
                op = f"operation-{time.time_ns() // 1000}-{zlib.crc32(f'{zone}/{vm}/{kind}'.encode()):08x}"
                self._instance_ops.append({
                    "kind": "compute#operation", "id": _id("op", project, zone, vm, kind, now), "name": op,
                    "zone": self._link(project, "zones", zone), "operationType": f"compute.instances.{kind}",
                    "targetLink": self._link(project, "zones", zone, "instances", vm),
                    "targetId": _id("vm", project, zone, vm), "status": "DONE", "progress": 100,
                    "user": f"{self.project_number}@cloudservices.gserviceaccount.com",
                    "insertTime": now, "startTime": now, "endTime": now,
                    "selfLink": self._link(project, "zones", zone, "operations", op)})
        del self._instance_ops[:-5000]

    def zone_operations(self, project: str, zone: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(o) for o in self._instance_ops if o["selfLink"].split("/projects/", 1)[1].startswith(
                f"{project}/zones/{zone or ''}")]

    # ---- snapshot ----------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "project": self.project,
                "quotas": {
                    p: {"project": {m: {"limit": lim, "usage": u} for m, (lim, u) in q.project.items()},
                        "regions": {r: {m: {"limit": lim, "usage": u} for m, (lim, u) in t.items()
                                        if "GPUS" in m or m == "CPUS"}
                                    for r, t in q.regional.items()}}
                    for p, q in self._quotas.items()
                },
                "quota_used": self.quota_used(),
                "stockouts": sorted([{"zone": z, "accelerator": a} for z, a in self._stockouts] +
                                    [{"zone": z, "accelerator": a, "spot": True} for z, a in self._spot_stockouts],
                                    key=lambda d: (d["zone"], d["accelerator"] or "", "spot" in d)),
                "instance_group_managers": [
                    {"project": p, "zone": z, "name": n, "targetSize": len(m["instances"]),
                     "instances": list(m["instances"])}
                    for (p, z, n), m in sorted(self._migs.items())
                ],
            }

    # ---- REST resources ----------------------------------------------------------------
    def _link(self, project: str, *parts: str) -> str:
        return "/".join([API_BASE, "projects", project, *parts])

    # Replies are plain camelCase JSON (what compute_v1's REST transport parses), built by hand:
    # importing google.cloud.compute_v1 costs ~8 s, too slow for `sandbox up`. The tests parse every
    # reply strictly with compute_v1 messages, so a field the client does not know fails there.
    def region_resource(self, project: str, region: str) -> dict[str, Any]:
        if region not in REGIONS:
            raise _not_found(f"projects/{project}/regions/{region}")
        with self._lock:
            table = self._q(project).regional[region]
            quotas = [{"metric": m, "limit": lim, "usage": u} for m, (lim, u) in table.items()]
        return {
            "kind": "compute#region", "id": _id("region", region), "creationTimestamp": CREATION_TS,
            "name": region, "description": region, "status": "UP",
            "zones": [self._link(project, "zones", z) for z in zones_of(region)],
            "quotas": quotas, "selfLink": self._link(project, "regions", region), "supportsPzs": False,
        }

    def zone_resource(self, project: str, zone: str) -> dict[str, Any]:
        if zone not in ZONE_ACCELERATORS:
            raise _not_found(f"projects/{project}/zones/{zone}")
        return {
            "kind": "compute#zone", "id": _id("zone", zone), "creationTimestamp": CREATION_TS, "name": zone,
            "description": zone, "status": "UP", "region": self._link(project, "regions", region_of(zone)),
            "selfLink": self._link(project, "zones", zone), "supportsPzs": False,
            "availableCpuPlatforms": ["Intel Sapphire Rapids", "Intel Cascade Lake", "AMD Milan"],
        }

    def accelerator_resource(self, project: str, zone: str, name: str) -> dict[str, Any]:
        description, max_cards, _ = ACCELERATOR_TYPES[name]
        return {
            "kind": "compute#acceleratorType", "id": _id("acc", zone, name), "creationTimestamp": CREATION_TS,
            "name": name, "description": description, "zone": self._link(project, "zones", zone),
            "selfLink": self._link(project, "zones", zone, "acceleratorTypes", name),
            "maximumCardsPerInstance": max_cards,
        }

    def project_resource(self, project: str) -> dict[str, Any]:
        with self._lock:
            table = self._q(project).project
            quotas = [{"metric": m, "limit": lim, "usage": u} for m, (lim, u) in table.items()]
        number = self.project_number if project == self.project else _id("project", project)[:12]
        return {
            "kind": "compute#project", "id": number, "creationTimestamp": CREATION_TS, "name": project,
            "commonInstanceMetadata": {"kind": "compute#metadata", "fingerprint": "sandbox="},
            "quotas": quotas, "selfLink": self._link(project),
            "defaultServiceAccount": f"{number}-compute@developer.gserviceaccount.com",
            "xpnProjectStatus": "UNSPECIFIED_XPN_PROJECT_STATUS", "defaultNetworkTier": "PREMIUM",
            "vmDnsSetting": "ZONAL_ONLY",
        }

    def mig_resource(self, project: str, zone: str, name: str) -> dict[str, Any]:
        with self._lock:
            mig = self._migs.get((project, zone, name))
            if mig is None:
                raise _not_found(f"projects/{project}/zones/{zone}/instanceGroupManagers/{name}")
            size = len(mig["instances"])
            base = mig["baseInstanceName"]
        return {
            "kind": "compute#instanceGroupManager", "id": _id("igm", project, zone, name),
            "creationTimestamp": CREATION_TS, "name": name, "zone": self._link(project, "zones", zone),
            "instanceTemplate": self._link(project, "global", "instanceTemplates", base),
            "instanceGroup": self._link(project, "zones", zone, "instanceGroups", name.removesuffix("-grp")),
            "baseInstanceName": base, "fingerprint": "sandbox=", "targetSize": size,
            "currentActions": {"none": size, "creating": 0, "deleting": 0, "recreating": 0, "refreshing": 0,
                               "restarting": 0, "abandoning": 0, "verifying": 0,
                               "creatingWithoutRetries": 0},
            "status": {"isStable": True},
            "selfLink": self._link(project, "zones", zone, "instanceGroupManagers", name),
        }

    def instances_in(self, project: str, zone: str) -> list[dict[str, Any]]:
        with self._lock:
            names = sorted(n for (p, z, _), m in self._migs.items() if p == project and z == zone
                           for n in m["instances"])
            created = {n: self._instance_created.get((project, zone, n), CREATION_TS) for n in names}
        return [{
            "kind": "compute#instance", "id": _id("vm", project, zone, name), "creationTimestamp": created[name],
            "name": name, "status": "RUNNING", "zone": self._link(project, "zones", zone),
            "selfLink": self._link(project, "zones", zone, "instances", name),
        } for name in names]


# ---- REST handler ------------------------------------------------------------------------

_STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 409: "ALREADY_EXISTS", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL",
                 501: "NOT_IMPLEMENTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
_REASONS = {400: "invalid", 401: "required", 403: "forbidden", 404: "notFound", 409: "alreadyExists",
            429: "rateLimitExceeded", 500: "backendError", 503: "backendError"}


def _not_found(resource: str) -> HttpError:
    return HttpError(404, f"The resource '{resource}' was not found", reason="notFound")


def compute_error_body(err: HttpError) -> dict[str, Any]:
    if err.body is not None:
        return err.body
    reason = err.reason if err.reason and err.reason[0].islower() else _REASONS.get(err.status, "error")
    return {"error": {"code": err.status, "message": err.message,
                      "errors": [{"message": err.message, "domain": "global", "reason": reason}]}}


_P = r"/compute/v1/projects/(?P<project>[^/]+)"
_ROUTES: list = []


class ComputeHandler(JsonHandler):
    service = "compute"
    routes = _ROUTES
    server: SandboxHTTPServer

    @property
    def compute(self) -> Compute:
        return self.server.state

    def error_body(self, err: HttpError) -> Any:
        return compute_error_body(err)


def _list_reply(kind: str, project: str, path: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"kind": kind, "id": f"projects/{project}/{path}", "items": items,
            "selfLink": f"{API_BASE}/projects/{project}/{path}"}


@route(_ROUTES, "GET", _P)
def _get_project(h: ComputeHandler, project: str):
    return h.compute.project_resource(project)


@route(_ROUTES, "GET", _P + r"/regions")
def _list_regions(h: ComputeHandler, project: str):
    items = [h.compute.region_resource(project, r) for r in REGIONS]
    return _list_reply("compute#regionList", project, "regions", items)


@route(_ROUTES, "GET", _P + r"/regions/(?P<region>[^/]+)")
def _get_region(h: ComputeHandler, project: str, region: str):
    return h.compute.region_resource(project, region)


@route(_ROUTES, "GET", _P + r"/zones")
def _list_zones(h: ComputeHandler, project: str):
    items = [h.compute.zone_resource(project, z) for z in ZONE_ACCELERATORS]
    return _list_reply("compute#zoneList", project, "zones", items)


@route(_ROUTES, "GET", _P + r"/zones/(?P<zone>[^/]+)")
def _get_zone(h: ComputeHandler, project: str, zone: str):
    return h.compute.zone_resource(project, zone)


@route(_ROUTES, "GET", _P + r"/zones/(?P<zone>[^/]+)/acceleratorTypes")
def _list_accelerators(h: ComputeHandler, project: str, zone: str):
    if zone not in ZONE_ACCELERATORS:
        raise _not_found(f"projects/{project}/zones/{zone}")
    wanted = _name_filter(h.q("filter"))
    items = [h.compute.accelerator_resource(project, zone, a) for a in ZONE_ACCELERATORS[zone]
             if wanted is None or a == wanted]
    return _list_reply("compute#acceleratorTypeList", project, f"zones/{zone}/acceleratorTypes", items)


@route(_ROUTES, "GET", _P + r"/zones/(?P<zone>[^/]+)/acceleratorTypes/(?P<name>[^/]+)")
def _get_accelerator(h: ComputeHandler, project: str, zone: str, name: str):
    if zone not in ZONE_ACCELERATORS:
        raise _not_found(f"projects/{project}/zones/{zone}")
    if name not in ZONE_ACCELERATORS[zone]:
        raise _not_found(f"projects/{project}/zones/{zone}/acceleratorTypes/{name}")
    return h.compute.accelerator_resource(project, zone, name)


def _name_filter(expr: str | None) -> str | None:
    """The name in a ``name = X`` / ``name eq X`` list filter (the only form the sandbox honours)."""
    if not expr:
        return None
    m = re.fullmatch(r'\s*\(?\s*name\s*(?:=|eq)\s*"?([\w.-]+)"?\s*\)?\s*', expr)
    return m.group(1) if m else None


def _paged(h: ComputeHandler, reply: dict[str, Any], key: str) -> dict[str, Any]:
    """An aggregated list reply cut into pages as the API does: ``maxResults`` results a page (0-500, default
    500), the rest behind ``nextPageToken`` (opaque to clients; here the offset). A scope whose results are all
    on other pages is left out of this one."""
    raw_size, token = h.q("maxResults") or "500", h.q("pageToken") or "0"
    if not raw_size.isdigit() or int(raw_size) > 500:
        raise HttpError(400, f"Invalid value for field 'maxResults': '{raw_size}'. Must be less than or equal to "
                        "500", reason="invalid")
    if not token.isdigit():
        raise HttpError(400, f"Invalid value for field 'pageToken': '{token}'.", reason="invalid")
    size, start = int(raw_size), int(token)
    flat = [(scope, item) for scope, scoped in reply["items"].items() for item in scoped.get(key, [])]
    if size == 0 or len(flat) <= size and start == 0:
        return reply
    items: dict[str, Any] = {}
    for scope, item in flat[start:start + size]:
        items.setdefault(scope, {key: []})[key].append(item)
    page = {**reply, "items": items}
    if start + size < len(flat):
        page["nextPageToken"] = str(start + size)
    return page


@route(_ROUTES, "GET", _P + r"/aggregated/acceleratorTypes")
def _aggregated_accelerators(h: ComputeHandler, project: str):
    wanted = _name_filter(h.q("filter"))
    items: dict[str, Any] = {}
    for zone, accelerators in ZONE_ACCELERATORS.items():
        accelerators = tuple(a for a in accelerators if wanted is None or a == wanted)
        if accelerators:
            items[f"zones/{zone}"] = {
                "acceleratorTypes": [h.compute.accelerator_resource(project, zone, a) for a in accelerators]}
        else:  # pragma: no cover - every catalogued zone has at least one
            items[f"zones/{zone}"] = {"warning": {
                "code": "NO_RESULTS_ON_PAGE", "message": f"There are no results for scope 'zones/{zone}' on this page.",
                "data": [{"key": "scope", "value": f"zones/{zone}"}]}}
    return _paged(h, {"kind": "compute#acceleratorTypeAggregatedList",
                      "id": f"projects/{project}/aggregated/acceleratorTypes", "items": items,
                      "selfLink": f"{API_BASE}/projects/{project}/aggregated/acceleratorTypes"}, "acceleratorTypes")


@route(_ROUTES, "GET", _P + r"/zones/(?P<zone>[^/]+)/instanceGroupManagers/(?P<name>[^/]+)")
def _get_mig(h: ComputeHandler, project: str, zone: str, name: str):
    return h.compute.mig_resource(project, zone, name)


@route(_ROUTES, "GET", _P + r"/zones/(?P<zone>[^/]+)/instanceGroupManagers")
def _list_migs(h: ComputeHandler, project: str, zone: str):
    with h.compute._lock:
        names = sorted(n for (p, z, n) in h.compute._migs if p == project and z == zone)
    items = [h.compute.mig_resource(project, zone, n) for n in names]
    return _list_reply("compute#instanceGroupManagerList", project, f"zones/{zone}/instanceGroupManagers", items)


@route(_ROUTES, "GET", _P + r"/zones/(?P<zone>[^/]+)/instances")
def _list_instances(h: ComputeHandler, project: str, zone: str):
    if zone not in ZONE_ACCELERATORS:
        raise _not_found(f"projects/{project}/zones/{zone}")
    return _list_reply("compute#instanceList", project, f"zones/{zone}/instances",
                       h.compute.instances_in(project, zone))


@route(_ROUTES, "GET", _P + r"/zones/(?P<zone>[^/]+)/instances/(?P<name>[^/]+)")
def _get_instance(h: ComputeHandler, project: str, zone: str, name: str):
    for item in h.compute.instances_in(project, zone):
        if item["name"] == name:
            return item
    raise _not_found(f"projects/{project}/zones/{zone}/instances/{name}")


# ---- static IP addresses (gcloud compute addresses create NAME --global | --region R) -----------------------
def _scope_parts(scope: str) -> list[str]:
    return ["global"] if scope == "global" else ["regions", scope]


def _address_op(h: ComputeHandler, project: str, scope: str, kind: str, target: str) -> dict[str, Any]:
    name = f"operation-{zlib.crc32((target + kind + str(len(h.compute.addresses))).encode()):08x}"
    op = {"kind": "compute#operation", "id": _id("op", name), "name": name, "operationType": kind,
          "targetLink": target, "status": "DONE", "progress": 100, "insertTime": CREATION_TS,
          "startTime": CREATION_TS, "endTime": CREATION_TS,
          "selfLink": h.compute._link(project, *_scope_parts(scope), "operations", name)}
    if scope != "global":
        op["region"] = h.compute._link(project, "regions", scope)
    h.compute.__dict__.setdefault("_address_ops", {})[(project, scope, name)] = op
    return op


def reserve_address(compute: Compute, project: str, scope: str, name: str, *, address: str | None = None) -> dict:
    """Reserve a static IP (what ``gcloud compute addresses create`` does); returns the resource."""
    with compute._lock:
        if (project, scope, name) in compute.addresses:
            raise HttpError(409, f"The resource 'projects/{project}/{'/'.join(_scope_parts(scope))}/addresses/"
                            f"{name}' already exists", reason="alreadyExists")
        n = len(compute.addresses) + 10
        res = {"kind": "compute#address", "id": _id("address", project, scope, name), "name": name,
               "address": address or f"34.117.{n // 250}.{n % 250 + 1}", "status": "RESERVED",
               "addressType": "EXTERNAL", "ipVersion": "IPV4", "networkTier": "PREMIUM",
               "creationTimestamp": CREATION_TS,
               "selfLink": compute._link(project, *_scope_parts(scope), "addresses", name)}
        if scope != "global":
            res["region"] = compute._link(project, "regions", scope)
        compute.addresses[(project, scope, name)] = res
        return res


def _address_scope(region: str | None) -> str:
    if region is not None and region not in REGIONS:
        raise _not_found(f"projects/-/regions/{region}")
    return region or "global"


def _list_addresses(h: ComputeHandler, project: str, region: str | None = None):
    scope = _address_scope(region)
    with h.compute._lock:
        items = [a for (p, sc, _), a in sorted(h.compute.addresses.items()) if p == project and sc == scope]
    return _list_reply("compute#addressList", project, "/".join([*_scope_parts(scope), "addresses"]), items)

def _get_address(h: ComputeHandler, project: str, name: str, region: str | None = None):
    scope = _address_scope(region)
    with h.compute._lock:
        found = h.compute.addresses.get((project, scope, name))
    if found is None:
        raise _not_found(f"projects/{project}/{'/'.join(_scope_parts(scope))}/addresses/{name}")
    return found

def _insert_address(h: ComputeHandler, project: str, region: str | None = None):
    scope = _address_scope(region)
    body = h.json_body()
    name = body.get("name") or ""
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name):
        raise HttpError(400, f"Invalid value for field 'resource.name': '{name}'. Must be a match of regex "
                        "'(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'", reason="invalid")
    res = reserve_address(h.compute, project, scope, name, address=body.get("address"))
    return _address_op(h, project, scope, "insert", res["selfLink"])

def _delete_address(h: ComputeHandler, project: str, name: str, region: str | None = None):
    scope = _address_scope(region)
    with h.compute._lock:
        res = h.compute.addresses.pop((project, scope, name), None)
    if res is None:
        raise _not_found(f"projects/{project}/{'/'.join(_scope_parts(scope))}/addresses/{name}")
    return _address_op(h, project, scope, "delete", res["selfLink"])

def _get_address_op(h: ComputeHandler, project: str, name: str, region: str | None = None):
    scope = _address_scope(region)
    op = h.compute.__dict__.get("_address_ops", {}).get((project, scope, name))
    if op is None:
        raise _not_found(f"projects/{project}/{'/'.join(_scope_parts(scope))}/operations/{name}")
    return op


@route(_ROUTES, "GET", _P + r"/zones/(?P<zone>[^/]+)/operations")
def _list_zone_operations(h: ComputeHandler, project: str, zone: str):
    if zone not in ZONE_ACCELERATORS:
        raise _not_found(f"projects/{project}/zones/{zone}")
    return _list_reply("compute#operationList", project, f"zones/{zone}/operations",
                       h.compute.zone_operations(project, zone))


@route(_ROUTES, "GET", _P + r"/aggregated/operations")
def _aggregated_operations(h: ComputeHandler, project: str):
    """``globalOperations.aggregatedList`` (``gcloud compute operations list``): the zones' VM operations by
    scope (``zones/Z``); scopes with none carry the NO_RESULTS_ON_PAGE warning, as the API does."""
    ops = h.compute.zone_operations(project)
    items: dict[str, Any] = {}
    for zone in ZONE_ACCELERATORS:
        found = [o for o in ops if o["zone"].endswith(f"/zones/{zone}")]
        items[f"zones/{zone}"] = {"operations": found} if found else {"warning": {
            "code": "NO_RESULTS_ON_PAGE", "message": f"There are no results for scope 'zones/{zone}' on this page.",
            "data": [{"key": "scope", "value": f"zones/{zone}"}]}}
    return _paged(h, {"kind": "compute#operationAggregatedList", "id": f"projects/{project}/aggregated/operations",
                      "items": items, "selfLink": f"{API_BASE}/projects/{project}/aggregated/operations"}, "operations")


@route(_ROUTES, "GET", _P + r"/aggregated/addresses")
def _aggregated_addresses(h: ComputeHandler, project: str):
    """``addresses.aggregatedList`` (what ``gcloud compute addresses list`` calls): every scope, global and
    each region, with its addresses or the API's NO_RESULTS_ON_PAGE warning."""
    items: dict[str, Any] = {}
    with h.compute._lock:
        for scope in ["global", *REGIONS]:
            key = "/".join(_scope_parts(scope))
            found = [a for (p, sc, _), a in sorted(h.compute.addresses.items()) if p == project and sc == scope]
            items[key] = {"addresses": found} if found else {"warning": {
                "code": "NO_RESULTS_ON_PAGE", "message": f"There are no results for scope '{key}' on this page.",
                "data": [{"key": "scope", "value": key}]}}
    return {"kind": "compute#addressAggregatedList", "id": f"projects/{project}/aggregated/addresses",
            "items": items, "selfLink": f"{API_BASE}/projects/{project}/aggregated/addresses"}


for _prefix in (_P + r"/global", _P + r"/regions/(?P<region>[^/]+)"):
    route(_ROUTES, "GET", _prefix + r"/addresses")(_list_addresses)
    route(_ROUTES, "POST", _prefix + r"/addresses")(_insert_address)
    route(_ROUTES, "GET", _prefix + r"/addresses/(?P<name>[^/]+)")(_get_address)
    route(_ROUTES, "DELETE", _prefix + r"/addresses/(?P<name>[^/]+)")(_delete_address)
    route(_ROUTES, "GET", _prefix + r"/operations/(?P<name>[^/]+)")(_get_address_op)
    route(_ROUTES, "POST", _prefix + r"/operations/(?P<name>[^/]+)/wait")(_get_address_op)


# ---- subnetworks: each region's auto-mode "default" subnet, plus what users create (proxy-only ones) ------
# compute/v1 subnetworks (insert/get/list/aggregatedList); a regional Gateway's proxies need a subnet with
# purpose REGIONAL_MANAGED_PROXY and role ACTIVE in its region and network (GKE Gateway docs: "Configure a
# proxy-only subnet"). Operations complete at once (as the address ones here).
def _subnets(compute: Compute, project: str) -> dict[tuple[str, str], dict[str, Any]]:
    table = compute.__dict__.setdefault("_subnets", {})
    if project not in table:
        table[project] = {(r, "default"): {
            "kind": "compute#subnetwork", "id": _id("subnet", project, r, "default"), "name": "default",
            "network": compute._link(project, "global", "networks", "default"), "ipCidrRange": "10.128.0.0/20",
            "region": compute._link(project, "regions", r), "purpose": "PRIVATE", "stackType": "IPV4_ONLY",
            "creationTimestamp": CREATION_TS, "selfLink": compute._link(project, "regions", r, "subnetworks",
                                                                          "default")} for r in REGIONS}
    return table[project]


@route(_ROUTES, "GET", _P + r"/regions/(?P<region>[^/]+)/subnetworks")
def _list_subnets(h: ComputeHandler, project: str, region: str):
    _address_scope(region)
    with h.compute._lock:
        items = [s for (r, _), s in sorted(_subnets(h.compute, project).items()) if r == region]
    return _list_reply("compute#subnetworkList", project, f"regions/{region}/subnetworks", items)


@route(_ROUTES, "GET", _P + r"/regions/(?P<region>[^/]+)/subnetworks/(?P<name>[^/]+)")
def _get_subnet(h: ComputeHandler, project: str, region: str, name: str):
    with h.compute._lock:
        found = _subnets(h.compute, project).get((region, name))
    if found is None:
        raise _not_found(f"projects/{project}/regions/{region}/subnetworks/{name}")
    return found


@route(_ROUTES, "POST", _P + r"/regions/(?P<region>[^/]+)/subnetworks")
def _insert_subnet(h: ComputeHandler, project: str, region: str):
    _address_scope(region)
    body = h.json_body()
    name, purpose = body.get("name") or "", body.get("purpose") or "PRIVATE"
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name):
        raise HttpError(400, f"Invalid value for field 'resource.name': '{name}'. Must be a match of regex "
                        "'(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'", reason="invalid")
    if not body.get("ipCidrRange"):
        raise HttpError(400, "Invalid value for field 'resource.ipCidrRange': ''. Must be a CIDR range.",
                        reason="invalid")
    network = body.get("network") or h.compute._link(project, "global", "networks", "default")
    with h.compute._lock:
        table = _subnets(h.compute, project)
        if (region, name) in table:
            raise HttpError(409, f"The resource 'projects/{project}/regions/{region}/subnetworks/{name}' already "
                            "exists", reason="alreadyExists")
        if purpose == "REGIONAL_MANAGED_PROXY" and body.get("role", "ACTIVE") == "ACTIVE" and any(
                s.get("purpose") == purpose and s.get("role") == "ACTIVE" and s["network"].endswith(
                    network.rsplit("/", 1)[-1]) for (r, _), s in table.items() if r == region):
            raise HttpError(400, "Invalid resource usage: 'There can only be one active proxy-only subnetwork "
                            f"per region per network ({region}).'", reason="invalidResourceUsage")
        res = {"kind": "compute#subnetwork", "id": _id("subnet", project, region, name), "name": name,
               "network": network if network.startswith("http") else h.compute._link(
                   project, "global", "networks", network.rsplit("/", 1)[-1]),
               "ipCidrRange": body["ipCidrRange"], "region": h.compute._link(project, "regions", region),
               "purpose": purpose, "stackType": "IPV4_ONLY", "creationTimestamp": CREATION_TS,
               "selfLink": h.compute._link(project, "regions", region, "subnetworks", name)}
        if purpose == "REGIONAL_MANAGED_PROXY":
            res["role"] = body.get("role", "ACTIVE")
        table[(region, name)] = res
    return _address_op(h, project, region, "insert", res["selfLink"])


@route(_ROUTES, "GET", _P + r"/aggregated/subnetworks")
def _aggregated_subnets(h: ComputeHandler, project: str):
    with h.compute._lock:
        table = _subnets(h.compute, project)
        items = {f"regions/{r}": {"subnetworks": [s for (rr, _), s in sorted(table.items()) if rr == r]}
                 for r in REGIONS}
    return _paged(h, {"kind": "compute#subnetworkAggregatedList", "id": f"projects/{project}/aggregated/subnetworks",
                      "items": items, "selfLink": f"{API_BASE}/projects/{project}/aggregated/subnetworks"}, "subnetworks")
