"""GKE capacity: what seeds 000, 001 and 004 do by hand with gcloud (the provision_cluster flow).

1. Preflight: GPU quota, accelerator in zone, GKE version — before anything is created or paid for
2. Create the GKE cluster (Autopilot or Standard), get-or-create
3. Create the GPU node pool (Standard), failing over to the next zone/region on stockouts
4. Get cluster credentials (kubeconfig)
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger

from manifests import provision as prov
from manifests import startup
from manifests.errors import DriftError, PreflightError, QuotaError, StockoutError
from manifests.fleet import SpecPath
from manifests.render import adapter_metric
from manifests.spec import DeploymentSpec, resolve_gke_spec
from targets.gke.capacity import capacity_for
from tasks import artifact_registry, cluster_checks, compute, gke
from tasks import canary as canary_tasks
from tasks.report import Report, artifact_key


def find_cluster(spec: DeploymentSpec) -> tuple[str, dict[str, Any] | None]:
    """(location, cluster) — the spec's location, or a failover region where an earlier run put it."""
    c = spec.cluster
    for location in [c.location, *c.failover_regions]:
        found = gke.get_cluster(project=c.project, location=location, name=c.name)
        if found is not None:
            return location, found
    return c.location, None


def cluster_preflight(spec: DeploymentSpec, *, kubeconfig: str, location: str) -> list[str]:
    """One line per check that passed; the first missing piece raises a PreflightError with its install step."""
    notes: list[str] = []
    if spec.cache.enabled and spec.cache.storage_class:
        notes.append(cluster_checks.check_storage_class(kubeconfig=kubeconfig, name=spec.cache.storage_class,
                                                        cluster=spec.cluster.name, location=location))
    ing = spec.expose.ingress
    if ing is not None and ing.class_name == "nginx":
        notes.append(cluster_checks.check_ingress_class(kubeconfig=kubeconfig, name="nginx"))
    if ing is not None and ing.static_ip_name:
        notes.append(cluster_checks.check_static_ip(project=spec.cluster.project, name=ing.static_ip_name))
    if spec.autoscaling is not None:
        metric = adapter_metric(spec.autoscaling.metric or spec.engine.defaults.queue_metric)
        notes.append(cluster_checks.check_metrics_adapter(kubeconfig=kubeconfig, metric=metric))
    if spec.expose.gateway is not None:
        notes.append(canary_tasks.check_gateway(spec, kubeconfig=kubeconfig))
    return notes


def preflight(spec: DeploymentSpec, *, location: str, cluster: dict[str, Any] | None,
              pool: dict[str, Any] | None) -> prov.Preflight:
    c, acc = spec.cluster, spec.accelerator
    report = prov.Preflight()
    offered = compute.zones_offering(project=c.project, accelerator=acc.type)
    zone_check, report.candidates = prov.check_zones(spec, offered)
    report.checks.append(zone_check)
    server_config = gke.get_server_config(project=c.project, location=c.location)
    report.checks.append(prov.check_version(spec, server_config))
    live = (cluster or {}).get("current_master_version")
    fast = startup.fast_nodes_check(spec, version=live or prov.new_cluster_version(spec, server_config), live=bool(live))
    if fast is not None:  # startup.nodes: fast-start — the version GKE needs, before anything is created
        report.checks.append(fast)
    if (repo := startup.image_repository(spec)) is not None:  # startup.image.mirror: artifact-registry
        report.checks.append(startup.image_repository_check(
            spec, live=artifact_registry.get_repository(repo=repo), created_later=True))
    if (image := startup.disk_image_ref(spec)) is not None:  # startup.image.secondary_boot_disk
        report.checks.append(startup.disk_image_check(
            spec, exists=compute.disk_image_exists(project=image[0], name=image[1])))
    if pool is not None or (cluster is not None and c.mode == "autopilot"):
        report.checks.append(prov.Check("GPU quota", True, "capacity already provisioned; nothing new to reserve"))
        return report
    need = spec.max_gpus
    metric = prov.quota_metric(spec)
    usable: list[str] = []
    regional: list[prov.Check] = []
    for region in prov.regions(spec):
        check = prov.check_quota(spec, compute.get_region_quota(project=c.project, region=region, metric=metric),
                                 need=need)
        regional.append(check)
        if check.ok:
            usable.append(region)
    if usable:
        report.checks.append(next(ch for ch in regional if ch.ok))
        report.candidates = [(r, z) for r, z in report.candidates if r in usable]
    else:
        report.checks.append(regional[0])
    report.checks.append(prov.check_quota(spec, compute.get_project_gpu_quota(project=c.project), need=need))
    capacity_for(spec).preflight(spec, report)  # capacity options: quota and zones per option instead
    return report


def ensure_cluster(spec: DeploymentSpec, *, location: str, zones: list[str]) -> tuple[dict[str, Any], bool]:
    """(cluster, created_now). Get-or-create, then wait until RUNNING; a rerun converges."""
    c = spec.cluster
    existing = gke.get_cluster(project=c.project, location=location, name=c.name)
    if existing is not None:
        mode = "autopilot" if (existing.get("autopilot") or {}).get("enabled") else "standard"
        if mode != c.mode:
            raise DriftError(f"cluster {c.name} exists as {mode}, the spec says {c.mode}",
                             f"set cluster.mode: {mode}, or pick another cluster.name")
        if existing.get("status") != "RUNNING":
            existing = gke.wait_cluster_running(project=c.project, location=location, name=c.name)
        filestore = ((existing.get("addons_config") or {}).get("gcp_filestore_csi_driver_config") or {}).get("enabled")
        if prov.needs_filestore(spec) and c.mode == "standard" and not filestore:
            # the spec's RWX cache needs the add-on on a cluster created without it: converge in place
            op = gke.enable_filestore_csi(project=c.project, location=location, name=c.name)
            gke.wait_operation(project=c.project, location=location, operation=op)
            existing = gke.wait_cluster_running(project=c.project, location=location, name=c.name)
        return existing, False
    op = gke.create_cluster(project=c.project, location=location,
                            body=prov.cluster_body(spec, location=location, zones=zones))
    if op is not None:
        gke.wait_operation(project=c.project, location=location, operation=op)
    return gke.wait_cluster_running(project=c.project, location=location, name=c.name), op is not None


def ensure_gpu_pool(spec: DeploymentSpec, *, location: str, zone: str) -> tuple[dict[str, Any], str]:
    """(pool, what was done: created | updated | exists): get-or-create the pool in ``zone``; drift is
    updated where GKE allows, refused otherwise."""
    c, p = spec.cluster, spec.accelerator.pool
    pool = gke.get_node_pool(project=c.project, location=location, cluster=c.name, name=p.name)
    if pool is not None and pool.get("status") == "ERROR":
        # A failed create (e.g. a stockout) leaves an ERROR pool behind: clear it before retrying.
        remove_pool(spec, location=location)
        pool = None
    if pool is None:
        op = gke.create_node_pool(project=c.project, location=location, cluster=c.name,
                                  body=prov.node_pool_body(spec, zone=zone))
        if op is not None:
            gke.wait_operation(project=c.project, location=location, operation=op)
        return gke.get_node_pool(project=c.project, location=location, cluster=c.name, name=p.name), "created"
    drift = prov.pool_drift(spec, pool)
    fixed = [d for d in drift if not d.updatable]
    if fixed:
        d = fixed[0]
        raise DriftError(f"node pool {p.name} has {d.field} = {d.have}, the spec says {d.want}; GKE cannot change "
                         "this in place", f"set {d.field}: {d.have} in the spec, or delete the pool and rerun")
    if drift:
        op = gke.set_node_pool_autoscaling(project=c.project, location=location, cluster=c.name, name=p.name,
                                           min_nodes=p.min_nodes, max_nodes=p.max_nodes)
        gke.wait_operation(project=c.project, location=location, operation=op)
        return gke.get_node_pool(project=c.project, location=location, cluster=c.name, name=p.name), "updated"
    return pool, "exists"


def remove_pool(spec: DeploymentSpec, *, location: str, name: str | None = None) -> None:
    c = spec.cluster
    op = gke.delete_node_pool(project=c.project, location=location, cluster=c.name,
                              name=name or spec.accelerator.pool.name)
    if op is not None:
        gke.wait_operation(project=c.project, location=location, operation=op)


def remove_cluster(spec: DeploymentSpec, *, location: str) -> None:
    c = spec.cluster
    op = gke.delete_cluster(project=c.project, location=location, name=c.name)
    if op is not None:
        gke.wait_operation(project=c.project, location=location, operation=op)


def provision_with_failover(spec: DeploymentSpec, *, location: str, candidates: list[tuple[str, str]],
                            attempts: list[dict[str, str]]) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """Cluster + pool(s): the single pool walks the (region, zone) candidates on ZONE_RESOURCE_POOL_EXHAUSTED
    (a failed zone's ERROR pool is deleted before the next try; a cluster this run created in a region it
    then leaves is deleted too, so nothing is left behind in the first region); capacity options get one
    empty pool each behind their ComputeClass (targets/gke/capacity.py)."""
    c = spec.cluster
    if c.mode == "autopilot":
        cluster, _ = ensure_cluster(spec, location=location, zones=[])
        return location, cluster, None
    return capacity_for(spec).provision(spec, location=location, candidates=candidates, attempts=attempts,
                                        walk=walk_zones, ensure=ensure_cluster)


def walk_zones(spec: DeploymentSpec, *, location: str, candidates: list[tuple[str, str]],
               attempts: list[dict[str, str]]) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """The single GPU pool, created zone by zone (then region by region) until one is not stocked out."""
    c = spec.cluster
    by_region: dict[str, list[str]] = {}
    for region, zone in candidates:
        by_region.setdefault(region, []).append(zone)
    for region, zones in by_region.items():
        loc = location if region == c.region else region
        cluster, created = ensure_cluster(spec, location=loc, zones=zones)
        for zone in zones:
            try:
                pool, done = ensure_gpu_pool(spec, location=loc, zone=zone)
            except gke.OperationFailed as exc:
                if not prov.stockout(exc.message):
                    raise
                attempts.append({"region": region, "zone": zone, "result": "stockout", "detail": exc.message})
                remove_pool(spec, location=loc)
                continue
            attempts.append({"region": region, "zone": zone, "result": done,
                             "detail": f"node pool {pool.get('name')} {pool.get('status', '')}"})
            return loc, cluster, pool
        if created and region != list(by_region)[-1]:
            remove_cluster(spec, location=loc)
            attempts.append({"region": region, "zone": "-", "result": "cluster removed",
                             "detail": "every zone stocked out; moving to the next region"})
    tried = ", ".join(a["zone"] for a in attempts if a["result"] == "stockout")
    raise StockoutError(f"{spec.accelerator.type} is stocked out in every allowed zone ({tried})",
                        "add zones or cluster.failover_regions, use accelerator.spot: false/true the other way, "
                        "or retry later")


def provision(spec: SpecPath | str | dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
    """GPU quota and zone preflight → GKE cluster → GPU node pool (with stockout failover) → kubeconfig."""
    log = get_run_logger()
    spec = resolve_gke_spec(spec, flow="provision_cluster")
    c = spec.cluster
    report = Report("provision_cluster", f"{spec.name} → {c.project}/{c.location}/{c.name}", spec.slack_channel)
    key = artifact_key("provision", spec.name)
    attempts: list[dict[str, str]] = []
    try:
        with report.step("Preflight: GPU quota, zones and GKE version") as step:
            location, cluster = find_cluster(spec)
            pool = None
            if cluster is not None and c.mode == "standard":
                pool = gke.get_node_pool(project=c.project, location=location, cluster=c.name,
                                         name=spec.accelerator.pool.name)
                pool = None if pool is not None and pool.get("status") == "ERROR" else pool
            checks = preflight(spec, location=location, cluster=cluster, pool=pool)
            report.table_artifact(f"{key}-preflight", checks.table(), f"Preflight for {spec.name}")
            if not checks.ok:
                first = checks.failures[0]
                cls = QuotaError if first.name.startswith("quota") else PreflightError
                raise cls(first.detail, first.fix)
            step.detail = f"{len(checks.checks)} checks passed; zones {', '.join(z for _, z in checks.candidates)}"
        plan = prov.plan_provision(spec, cluster=cluster, pool=pool, preflight=checks)
        for action in plan:
            log.info("plan: %s %s (%s)", action.verb, action.target, action.why)
        if dry_run:
            report.table_artifact(f"{key}-plan", [a.__dict__ for a in plan], "What provision_cluster would do")
            report.succeed("dry run: nothing was created")
            return {"dry_run": True, "plan": [a.__dict__ for a in plan]}

        existed = cluster if (pool is not None or startup.autopilot_mode(spec) or spec.capacity) else None
        with report.step("Create the GKE cluster and GPU node pool") as step:
            location, cluster, pool = provision_with_failover(spec, location=location,
                                                              candidates=checks.candidates, attempts=attempts)
            step.detail = f"{c.mode} cluster RUNNING in {location}" + (
                f"; pool {pool['name']} in {', '.join(pool.get('locations', []))}" if pool else "")
            if any(a["result"] not in ("created", "exists") for a in attempts):
                step.detail += "; attempts: " + ", ".join(f"{a['zone']} {a['result']}" for a in attempts)
            # what this run did: a rerun on what exists says so (its plan said "keep")
            result = ("created" if existed is None or any(a["result"] == "created" for a in attempts) else
                      "updated" if any(a["result"] == "updated" for a in attempts) else "exists")
            step.detail += f" ({result})"

        with report.step("Get cluster credentials") as step:
            kubeconfig = gke.get_credentials(project=c.project, location=location, name=c.name)
            step.detail = kubeconfig
        report.succeed(f"Cluster {c.name} ready in {location}. Next: deploy_model")
        return {"result": result, "cluster": c.name, "location": location, "status": cluster.get("status"),
                "node_pool": pool.get("name") if pool else None,
                "zones": pool.get("locations") if pool else [], "kubeconfig": kubeconfig, "attempts": attempts}
    except Exception as exc:
        report.fail(exc)
        raise
    finally:
        if attempts:
            report.table_artifact(f"{key}-attempts", attempts, "Node-pool placement attempts")
        report.markdown_artifact(key)
