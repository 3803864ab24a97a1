"""Pure decisions for provision_cluster: quota math, zone candidates, GKE request bodies, drift.

Observations come in as plain values (read by tasks/), decisions go out as values (acted on by flows/).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from manifests import names, startup
from manifests.checks import Check
from manifests.spec import DeploymentSpec

QUOTA_URL = "https://console.cloud.google.com/iam-admin/quotas"
GLOBAL_GPU_METRIC = "GPUS_ALL_REGIONS"
SYSTEM_POOL = "default-pool"
SYSTEM_MACHINE = "e2-standard-4"


@dataclass(frozen=True)
class QuotaReading:
    metric: str
    scope: str  # a region, or "global"
    limit: float
    usage: float

    @property
    def free(self) -> float:
        return self.limit - self.usage


@dataclass
class Preflight:
    checks: list[Check] = field(default_factory=list)
    # (region, zone) in the order node-pool creation should try them.
    candidates: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def table(self) -> list[dict[str, str]]:
        return [{"check": c.name, "result": "ok" if c.ok else "FAILED", "detail": c.detail, "fix": c.fix}
                for c in self.checks]


def regions(spec: DeploymentSpec) -> list[str]:
    return [spec.cluster.region, *spec.cluster.failover_regions]


def quota_metric(spec: DeploymentSpec) -> str:
    return spec.accelerator.info.quota_metric_for(spot=spec.accelerator.spot)


def check_quota(spec: DeploymentSpec, reading: QuotaReading, *, need: int) -> Check:
    missing = need - reading.free
    name = f"quota {reading.metric} ({reading.scope})"
    if missing <= 0:
        return Check(name, True, f"need {need}, free {reading.free:g} (limit {reading.limit:g}, used {reading.usage:g})")
    where = "all regions" if reading.scope == "global" else f"region {reading.scope}"
    return Check(name, False,
                 f"{missing:g} GPU(s) missing in {reading.metric} for {where}: need {need}, "
                 f"free {reading.free:g} (limit {reading.limit:g}, used {reading.usage:g})",
                 f"request {reading.metric} ≥ {reading.usage + need:g} in {where} at {QUOTA_URL}"
                 f"?project={spec.cluster.project}, or lower accelerator.pool.max_nodes / replicas")


def zone_candidates(spec: DeploymentSpec, offered: dict[str, list[str]]) -> list[tuple[str, str]]:
    """Zones to try, in order: the spec's zones first, then the region's other zones offering the GPU."""
    out: list[tuple[str, str]] = []
    for region in regions(spec):
        zones = sorted(offered.get(region, []))
        if spec.cluster.is_zonal and region == spec.cluster.region:
            zones = [z for z in zones if z == spec.cluster.location]
        preferred = [z for z in spec.cluster.zones if z in zones]
        rest = [] if spec.cluster.zones and region == spec.cluster.region else [z for z in zones if z not in preferred]
        out += [(region, z) for z in preferred + rest]
    return out


def check_zones(spec: DeploymentSpec, offered: dict[str, list[str]]) -> tuple[Check, list[tuple[str, str]]]:
    acc = spec.accelerator.type
    missing = [z for z in spec.cluster.zones if z not in offered.get(spec.cluster.region, [])]
    candidates = zone_candidates(spec, offered)
    if missing:
        have = ", ".join(sorted(offered.get(spec.cluster.region, []))) or "none"
        return Check(f"{acc} offered in zones", False, f"{', '.join(missing)} do(es) not offer {acc}",
                     f"use zones that do (in {spec.cluster.region}: {have})"), candidates
    if not candidates:
        return Check(f"{acc} offered in zones", False, f"no zone of {', '.join(regions(spec))} offers {acc}",
                     "pick another cluster.location or accelerator.type"), candidates
    return Check(f"{acc} offered in zones", True, ", ".join(z for _, z in candidates)), candidates


def check_version(spec: DeploymentSpec, server_config: dict[str, Any]) -> Check:
    """The release channel exists and the pinned version (if any) is offered on it."""
    channel = spec.cluster.release_channel.upper()
    channels = {c.get("channel"): c for c in server_config.get("channels", [])}
    if channel not in channels:
        return Check("GKE release channel", False, f"channel {channel} not offered in {spec.cluster.location}",
                     f"use one of {', '.join(sorted(channels)) or 'RAPID, REGULAR, STABLE'}")
    want = spec.cluster.version
    if want is None:
        return Check("GKE release channel", True, f"{channel}, default {channels[channel].get('default_version')}")
    valid = channels[channel].get("valid_versions", [])
    if not any(v == want or v.startswith(want + ".") for v in valid):
        newest = ", ".join(sorted({".".join(v.split(".")[:2]) for v in valid}, reverse=True)[:4])
        return Check("GKE version", False, f"{want} is not offered on {channel}", f"use one of {newest}")
    return Check("GKE version", True, f"{want} on {channel}")


def new_cluster_version(spec: DeploymentSpec, server_config: dict[str, Any]) -> str:
    """The version a cluster created from the spec starts at: the pinned one, else its channel's default."""
    channels = {c.get("channel"): c for c in server_config.get("channels", [])}
    return spec.cluster.version or str(channels.get(spec.cluster.release_channel.upper(), {}).get("default_version", ""))


# ---- request bodies (proto field names, snake_case) -------------------------------------------------

def needs_filestore(spec: DeploymentSpec) -> bool:
    """A ReadWriteMany cache (or a Filestore class such as ``standard-rwx``) needs the Filestore CSI add-on."""
    cache = spec.cache
    return cache.enabled and (cache.access_mode == "ReadWriteMany" or (cache.storage_class or "").endswith("-rwx"))


def cluster_body(spec: DeploymentSpec, *, location: str, zones: list[str]) -> dict[str, Any]:
    c = spec.cluster
    body: dict[str, Any] = {
        "name": c.name,
        "release_channel": {"channel": c.release_channel.upper()},
        "logging_config": {"component_config": {"enable_components": ["SYSTEM_COMPONENTS", "WORKLOADS"]}},
        "monitoring_config": {"component_config": {"enable_components": ["SYSTEM_COMPONENTS"]},
                              "managed_prometheus_config": {"enabled": True}},
        "resource_labels": {"managed-by": "llm-fleet", "llm-fleet-spec": spec.name},
    }
    if c.version:
        body["initial_cluster_version"] = c.version
    if needs_filestore(spec) and c.mode != "autopilot":  # Autopilot has the driver on already
        # The *-rwx StorageClasses exist only with the Filestore CSI driver add-on.
        body["addons_config"] = {"gcp_filestore_csi_driver_config": {"enabled": True}}
    if startup.cluster_addons(spec):  # the GCS FUSE CSI driver for weights mounted from a bucket
        body.setdefault("addons_config", {}).update(startup.cluster_addons(spec))
    if spec.expose.gateway is not None:  # gcloud ... --gateway-api=standard: the CRDs and GKE's GatewayClasses
        body["network_config"] = {"gateway_api_config": {"channel": "CHANNEL_STANDARD"}}
    if c.mode == "autopilot":
        body["autopilot"] = {"enabled": True}
        return body
    if c.workload_identity:
        body["workload_identity_config"] = {"workload_pool": f"{c.project}.svc.id.goog"}
    body["ip_allocation_policy"] = {"use_ip_aliases": True}
    body["shielded_nodes"] = {"enabled": True}
    if spec.expose.network_policy:
        # NetworkPolicy is enforced only with Dataplane V2 (Autopilot's default); set at create time only.
        body.setdefault("network_config", {})["datapath_provider"] = "ADVANCED_DATAPATH"
    if zones:
        body["locations"] = zones[:1]  # the small system pool lives in one zone (seed 004)
    if c.image_streaming:
        # Image streaming cuts multi-GB serving-image pulls from minutes to seconds.
        body["node_pool_defaults"] = {"node_config_defaults": {"gcfs_config": {"enabled": True}}}
    body["node_pools"] = [{"name": SYSTEM_POOL, "initial_node_count": 1,
                           "config": {"machine_type": SYSTEM_MACHINE, "disk_size_gb": 100},
                           "autoscaling": {"enabled": True, "min_node_count": 1, "max_node_count": 3},
                           "management": {"auto_repair": True, "auto_upgrade": True}}]
    return body


def node_pool_body(spec: DeploymentSpec, *, zone: str) -> dict[str, Any]:
    acc, pool = spec.accelerator, spec.accelerator.pool
    config: dict[str, Any] = {
        "machine_type": acc.machine,
        "disk_size_gb": pool.disk_size_gb,
        "accelerators": [{"accelerator_count": acc.count, "accelerator_type": acc.type,
                          "gpu_driver_installation_config": {"gpu_driver_version": "LATEST"}}],
        "spot": acc.spot,
        "labels": {"llm-fleet.dev/spec": spec.name},
        "shielded_instance_config": {"enable_secure_boot": True, "enable_integrity_monitoring": True},
    }
    config.update(startup.node_config(spec))  # image streaming, the secondary boot disk
    if pool.local_ssd_count:
        config["ephemeral_storage_local_ssd_config"] = {"local_ssd_count": pool.local_ssd_count}
    if spec.cluster.workload_identity:
        config["workload_metadata_config"] = {"mode": "GKE_METADATA"}
    return {
        "name": pool.name,
        "initial_node_count": pool.initial_nodes,
        "locations": [zone],
        "config": config,
        "autoscaling": {"enabled": True, "min_node_count": pool.min_nodes, "max_node_count": pool.max_nodes},
        "management": {"auto_repair": True, "auto_upgrade": True},
    }


# ---- capacity options (spec.capacity): one pool per option, a ComputeClass over them ------------------

def option_zones(spec: DeploymentSpec, index: int, offered: dict[str, list[str]]) -> list[str]:
    """Zones of option ``index`` that offer its GPU (its own zones, else the cluster's, else every zone of
    the region that does). ``offered``: GPU type -> zones of the cluster's region offering it."""
    have = sorted(offered.get(spec.capacity_options[index].gpu, []))
    return [z for z in (spec.option_zones(index) or have) if z in have]


def option_pool_body(spec: DeploymentSpec, index: int, *, zones: list[str]) -> dict[str, Any]:
    """Option ``index``'s node pool, created with no nodes: the autoscaler adds them through the
    ComputeClass, in priority order (a stockout then meets the next option, not a failed create).
    Labelled and tainted for the class, as GKE requires of manually created pools a class may use."""
    opt = spec.capacity_options[index]
    acc = opt
    body = node_pool_body(spec, zone=zones[0])
    cls = names.compute_class(spec)
    config = body["config"]
    config["machine_type"] = acc.machine
    config["accelerators"][0].update({"accelerator_count": acc.count, "accelerator_type": acc.gpu})
    config["spot"] = opt.provisioning == "spot"
    if opt.provisioning == "flex-start":
        config["flex_start"] = True
    if opt.provisioning == "reservation":
        config["reservation_affinity"] = {"consume_reservation_type": "SPECIFIC_RESERVATION",
                                          "key": "compute.googleapis.com/reservation-name",
                                          "values": [opt.reservation]}
    config["labels"] = {**config["labels"], names.COMPUTE_CLASS_LABEL: cls}
    config["taints"] = [{"key": names.COMPUTE_CLASS_LABEL, "value": cls, "effect": "NO_SCHEDULE"}]
    lo = spec.accelerator.pool.min_nodes if index == 0 else 0
    body.update({"name": spec.option_pool(index), "initial_node_count": 0, "locations": zones,
                 "autoscaling": {"enabled": True, "min_node_count": lo,
                                 "max_node_count": spec.option_max_nodes(index),
                                 # GKE's advice for scarce GPUs and spot: any zone with capacity
                                 "location_policy": "ANY"}})
    return body


@dataclass(frozen=True)
class OptionStatus:
    """Whether capacity option ``index`` can take a replica now (quota and zones; stockouts show only
    when a VM is asked for)."""
    index: int
    label: str
    pool: str
    metric: str
    zones: list[str]
    free: float
    need: int  # GPUs of one replica
    usable: bool
    why: str


def check_options(spec: DeploymentSpec, *, quotas: dict[str, QuotaReading],
                  offered: dict[str, list[str]]) -> tuple[Check, list[OptionStatus]]:
    """Quota and zones per capacity option, in order: the preflight passes when at least one option can
    take a replica now, and says which ones can and why the others cannot. ``quotas``: metric -> the
    cluster region's reading; ``offered``: GPU type -> zones of the region offering it."""
    out: list[OptionStatus] = []
    for i, opt in enumerate(spec.capacity_options):
        zones = option_zones(spec, i, offered)
        reading = quotas.get(opt.quota_metric)
        free = reading.free if reading else 0.0
        if not zones:
            why = f"no zone of {spec.cluster.region} offers {opt.gpu}"
        elif free < opt.count:
            why = (f"quota {opt.quota_metric} in {spec.cluster.region}: {free:g} free, one replica needs "
                   f"{opt.count} (request more at {QUOTA_URL}?project={spec.cluster.project})")
        else:
            why = f"{free:g} {opt.quota_metric} free, zones {', '.join(zones)}"
        out.append(OptionStatus(i, opt.label(), spec.option_pool(i), opt.quota_metric, zones, free, opt.count,
                                bool(zones) and free >= opt.count, why))
    usable = [o for o in out if o.usable]
    detail = "; ".join(f"[{o.index}] {o.label}: {'usable' if o.usable else 'NOT usable'} — {o.why}" for o in out)
    if not usable:
        return Check("capacity options", False, detail,
                     "raise a quota named above, or add an option in another zone/GPU type/provisioning"), out
    return Check("capacity options", True, detail), out


@dataclass(frozen=True)
class Drift:
    field: str
    want: Any
    have: Any
    updatable: bool


def pool_drift(spec: DeploymentSpec, pool: dict[str, Any]) -> list[Drift]:
    """Differences between an existing pool (proto dict, snake_case) and the spec."""
    acc, want = spec.accelerator, spec.accelerator.pool
    cfg = pool.get("config", {})
    accs = cfg.get("accelerators") or [{}]
    auto = pool.get("autoscaling", {})
    pairs = [
        ("accelerator.machine_type", acc.machine, cfg.get("machine_type"), False),
        ("accelerator.type", acc.type, accs[0].get("accelerator_type"), False),
        ("accelerator.count", acc.count, int(accs[0].get("accelerator_count") or 0), False),
        ("accelerator.spot", acc.spot, bool(cfg.get("spot") or cfg.get("preemptible")), False),
        ("accelerator.pool.min_nodes", want.min_nodes, int(auto.get("min_node_count") or 0), True),
        ("accelerator.pool.max_nodes", want.max_nodes, int(auto.get("max_node_count") or 0), True),
    ]
    return [Drift(f, w, h, u) for f, w, h, u in pairs if w != h]


def stockout(message: str) -> bool:
    return "ZONE_RESOURCE_POOL_EXHAUSTED" in message or "does not have enough resources" in message


# Why a GPU pool has one zone (cluster.zones is a failover order, not a spread): a pool's autoscaling
# min/max count per zone (N zones hold N x min_nodes GPUs), and a multi-zone pool create fails as a whole on
# one zone's stockout; the next zone is tried instead. Capacity options (spec.capacity) spread over zones.
ONE_ZONE_WHY = ("one zone at a time: min/max nodes count per zone of a pool, and one zone's stockout fails a "
                "multi-zone create; use spec.capacity to spread over zones")


@dataclass(frozen=True)
class Action:
    verb: str  # create | update | keep | wait
    target: str
    why: str


def plan_provision(spec: DeploymentSpec, *, cluster: dict[str, Any] | None, pool: dict[str, Any] | None,
                   preflight: Preflight) -> list[Action]:
    """What provision_cluster would do, given what exists. Used for dry runs and for the report."""
    c = spec.cluster
    actions: list[Action] = []
    where = f"{c.project}/{c.location}"
    if cluster is None:
        actions.append(Action("create", f"{c.mode} cluster {c.name} in {where}",
                              f"release channel {c.release_channel}" + (f", version {c.version}" if c.version else "")))
    else:
        actions.append(Action("keep", f"cluster {c.name} ({cluster.get('status', '?')})", "already exists"))
    if c.mode == "standard" and spec.capacity:
        for i, opt in enumerate(spec.capacity_options):
            what = f"node pool {spec.option_pool(i)}: {opt.machine} with {opt.label()}"
            exists = pool is not None and i == 0
            actions.append(Action("keep" if exists else "create", what,
                                  f"capacity option {i}, 0 nodes until the ComputeClass "
                                  f"{names.compute_class(spec)} asks for one"))
    elif c.mode == "standard" and startup.fast_nodes(spec):
        actions.append(Action("keep", "no GPU node pool", f"startup.nodes: fast-start — GKE makes each node for the "
                              f"pods of ComputeClass {names.compute_class(spec)} (Autopilot mode)"))
    elif c.mode == "standard":
        acc, p = spec.accelerator, spec.accelerator.pool
        zones = ", ".join(z for _, z in preflight.candidates) or "none"
        what = (f"node pool {p.name}: {acc.machine} with {acc.count}× {acc.type}"
                f"{' spot' if acc.spot else ''}, autoscaling {p.min_nodes}..{p.max_nodes}")
        if pool is None:
            actions.append(Action("create", what, f"try zones in order: {zones} -- {ONE_ZONE_WHY}"))
        else:
            drift = pool_drift(spec, pool)
            if not drift:
                actions.append(Action("keep", what, "already matches the spec"))
            for d in drift:
                actions.append(Action("update" if d.updatable else "refuse", f"node pool {p.name} {d.field}",
                                      f"spec {d.want} != live {d.have}"))
    actions.append(Action("write", f"kubeconfig for {c.name}", "endpoint + CA + Google token"))
    return actions
