"""Where a model's GPU nodes come from on GKE: one pool (today's ``accelerator:``), or the spec's
``capacity:`` options behind a ComputeClass (issue 23). Each is a ``Capacity`` implementation; the steps
that create pools, wake a model or say who served it ask ``capacity_for(spec)`` — the one place that
tells them apart.

- ``SinglePool``: the pool provision walks zones for at create time (stockout failover), wake restores
  what park changed on it.
- ``ClassPools``: one pool per option, created empty and labelled for the class; GKE's autoscaler
  picks the first option with capacity at every scale-up (wake, a release's candidate, an HPA step, a
  preempted pod's replacement), so wake changes no pool size: it scales the pods and watches where
  they land — failing fast, with every option's refusal named, when none could start a node.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from manifests import capacity as cap
from manifests import names, startup
from manifests import park as P
from manifests import provision as prov
from manifests.spec import DeploymentSpec
from tasks import compute, gke, k8s
from tasks.inventory import list_kind
from tasks.report import Report
from tasks.settings import get_settings

Walk = Callable[..., tuple[str, dict[str, Any], dict[str, Any] | None]]
Ensure = Callable[..., tuple[dict[str, Any], bool]]


class Capacity:
    """A spec's way to GPU nodes on GKE."""

    name = "single pool"

    def pool_names(self, spec: DeploymentSpec) -> list[str]:
        return [spec.accelerator.pool.name]

    def preflight(self, spec: DeploymentSpec, report: prov.Preflight) -> None:
        """Add the capacity checks of this way to ``report`` (the single pool's are provision's own)."""

    def provision(self, spec: DeploymentSpec, *, location: str, candidates: list[tuple[str, str]],
                  attempts: list[dict[str, str]], walk: Walk, ensure: Ensure
                  ) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
        """(location, cluster, first GPU pool) on a Standard cluster. ``walk``: provision's zone/region
        walk for one pool; ``ensure``: its get-or-create of the cluster."""
        return walk(spec, location=location, candidates=candidates, attempts=attempts)

    def wake_pool_plan(self, record: P.ParkRecord, now: P.PoolState) -> P.PoolPlan:
        return P.plan_wake_pool(record, now)

    def wait_for_nodes(self, spec: DeploymentSpec, *, kubeconfig: str, color: str, timeout_s: float,
                       report: Report) -> None:
        """Until the color's pods have nodes, or the way to nodes is known to be closed (a step of its
        own where the way has choices; the single pool's wait is the rollout's)."""

    def report_placement(self, spec: DeploymentSpec, *, kubeconfig: str, color: str, report: Report,
                         key: str) -> str:
        """Which capacity served the color's pods (Slack note + artifact); "" when there is one way only."""
        return ""

    def placement(self, spec: DeploymentSpec, *, kubeconfig: str, color: str) -> cap.Placement | None:
        return None

    def release_room(self, spec: DeploymentSpec, *, kubeconfig: str, location: str, live_replicas: int,
                     candidate_replicas: int) -> tuple[bool, str, str] | None:
        """(ok, detail, fix) of the candidate's capacity, or None: the single pool's check applies."""
        return None

    def park_fallback_pools(self, spec: DeploymentSpec, *, kubeconfig: str, location: str) -> list[str]:
        """Park: the other options' pools to 0 nodes too (the first is park's own step); what changed."""
        return []


class SinglePool(Capacity):
    pass


class ClassPools(Capacity):
    """``capacity:`` options: a ComputeClass (rendered with the model's objects) over one pool per option."""

    name = "ComputeClass"

    def pool_names(self, spec: DeploymentSpec) -> list[str]:
        return [spec.option_pool(i) for i in range(len(spec.capacity_options))]

    def _offered(self, spec: DeploymentSpec) -> dict[str, list[str]]:
        gpus = dict.fromkeys(o.gpu for o in spec.capacity_options)
        return {g: compute.zones_offering(project=spec.cluster.project, accelerator=g).get(spec.cluster.region, [])
                for g in gpus}

    def preflight(self, spec: DeploymentSpec, report: prov.Preflight) -> None:
        c = spec.cluster
        metrics = dict.fromkeys(o.quota_metric for o in spec.capacity_options)
        quotas = {m: compute.get_region_quota(project=c.project, region=c.region, metric=m) for m in metrics}
        check, _ = prov.check_options(spec, quotas=quotas, offered=self._offered(spec))
        # the single pool's quota check (first option's metric, every GPU at once) does not apply
        report.checks[:] = [ch for ch in report.checks if not ch.name.startswith("quota ")]
        report.checks.append(check)

    def provision(self, spec: DeploymentSpec, *, location: str, candidates: list[tuple[str, str]],
                  attempts: list[dict[str, str]], walk: Walk, ensure: Ensure
                  ) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
        """The cluster, then each option's pool, empty: no VM is asked for, so no stockout meets a create
        (the options' order is the ComputeClass's, which the autoscaler follows at every scale-up)."""
        c = spec.cluster
        cluster, _ = ensure(spec, location=location, zones=[z for _, z in candidates if _ == c.region])
        offered = self._offered(spec)
        first = None
        for i in range(len(spec.capacity_options)):
            zones = prov.option_zones(spec, i, offered)
            name = spec.option_pool(i)
            pool = gke.get_node_pool(project=c.project, location=location, cluster=c.name, name=name)
            if not zones:
                attempts.append({"region": c.region, "zone": "-", "result": "skipped",
                                 "detail": f"option {i}: no zone offers {spec.capacity_options[i].gpu}"})
                continue
            if pool is None:
                op = gke.create_node_pool(project=c.project, location=location, cluster=c.name,
                                          body=prov.option_pool_body(spec, i, zones=zones))
                if op is not None:
                    gke.wait_operation(project=c.project, location=location, operation=op)
                pool = gke.get_node_pool(project=c.project, location=location, cluster=c.name, name=name)
            attempts.append({"region": c.region, "zone": ",".join(zones), "result": "created",
                             "detail": f"option {i} ({spec.capacity_options[i].label()}): pool {name}"})
            first = first or pool
        return location, cluster, first

    def wake_pool_plan(self, record: P.ParkRecord, now: P.PoolState) -> P.PoolPlan:
        # Sizing the first option's pool would ask GCE for its VM directly — and fail the wake on a
        # stockout; the pods' ComputeClass lets the autoscaler try every option instead.
        return P.PoolPlan(note="the ComputeClass picks the first option with capacity")

    def release_room(self, spec: DeploymentSpec, *, kubeconfig: str, location: str, live_replicas: int,
                     candidate_replicas: int) -> tuple[bool, str, str] | None:
        """Every option's pool room and quota: the candidate's nodes go to whichever has room first."""
        c = spec.cluster
        rooms = []
        for i, opt in enumerate(spec.capacity_options):
            name = spec.option_pool(i)
            pool = gke.get_node_pool(project=c.project, location=location, cluster=c.name, name=name) or {}
            hi = int((pool.get("autoscaling") or {}).get("max_node_count") or 0) * max(
                1, len(pool.get("locations") or []))  # GKE's max counts per zone
            nodes = len(k8s.list_objects(kubeconfig=kubeconfig, api_version="v1", kind="Node",
                                         label_selector=f"{cap.POOL_LABEL}={name}"))
            quota = compute.get_region_quota(project=c.project, region=c.region, metric=opt.quota_metric)
            rooms.append(cap.OptionRoom(i, opt.label(), hi, nodes, opt.quota_metric, quota.free, opt.count))
        return cap.release_room(live_replicas=live_replicas, candidate_replicas=candidate_replicas, options=rooms,
                                strategy=spec.release.strategy)

    def park_fallback_pools(self, spec: DeploymentSpec, *, kubeconfig: str, location: str) -> list[str]:
        """The fallback options' nodes go with the parked pods at once, not after the autoscaler's 10
        unneeded minutes (billed); a pool another workload still uses keeps its size. Their autoscaling
        minimum is already 0, so a wake needs nothing restored: the ComputeClass scales them again."""
        c, done = spec.cluster, []
        for i in range(1, len(spec.capacity_options)):
            name = spec.option_pool(i)
            nodes = [n["metadata"]["name"] for n in k8s.list_objects(
                kubeconfig=kubeconfig, api_version="v1", kind="Node", label_selector=f"{cap.POOL_LABEL}={name}")]
            if not nodes:
                continue
            users = P.pool_users(model=spec.name, namespace=spec.namespace, pool=name, nodes=nodes,
                                 pods=list_kind(kubeconfig=kubeconfig, api_version="v1", kind="Pod"),
                                 deployments=list_kind(kubeconfig=kubeconfig, api_version="apps/v1",
                                                       kind="Deployment"))
            if users:
                done.append(f"{name} kept ({len(nodes)} node(s); used by {', '.join(users)})")
                continue
            op = gke.set_node_pool_size(project=c.project, location=location, cluster=c.name, name=name, nodes=0)
            gke.wait_operation(project=c.project, location=location, operation=op)
            done.append(f"{name} (capacity option {i}) {len(nodes)}→0 nodes")
        return done

    def placement(self, spec: DeploymentSpec, *, kubeconfig: str, color: str) -> cap.Placement:
        ns = spec.namespace
        pods = k8s.list_objects(kubeconfig=kubeconfig, api_version="v1", kind="Pod", namespace=ns,
                                label_selector=",".join(f"{k}={v}" for k, v in names.selector(spec, color).items()))
        nodes = k8s.list_objects(kubeconfig=kubeconfig, api_version="v1", kind="Node",
                                 label_selector=f"{names.COMPUTE_CLASS_LABEL}={names.compute_class(spec)}")
        events = k8s.list_objects(kubeconfig=kubeconfig, api_version="v1", kind="Event", namespace=ns)
        return cap.placement(spec, pods=pods, events=events,
                             node_pools={n["metadata"]["name"]: (n["metadata"].get("labels") or {}).get(
                                 cap.POOL_LABEL, "") for n in nodes})

    def wait_for_nodes(self, spec: DeploymentSpec, *, kubeconfig: str, color: str, timeout_s: float,
                       report: Report) -> None:
        """Poll where the pods land; raise ``CapacityExhausted`` naming every option's refusal as soon as
        the autoscaler has none left — then the color goes back to 0 replicas: nothing stays Pending, and
        no node was started, so nothing is paid for."""
        with report.step("Wait for GPU nodes (capacity options in priority order)") as step:
            deadline = time.monotonic() + timeout_s
            pause = max(0.05, min(2.0, 5.0 * (get_settings().time_scale or 1.0)))
            found = self.placement(spec, kubeconfig=kubeconfig, color=color)
            while found.pending and time.monotonic() < deadline:
                if found.exhausted:
                    k8s.scale_deployment(kubeconfig=kubeconfig, namespace=spec.namespace,
                                         name=names.deployment(spec, color), replicas=0)
                    raise cap.exhausted_error(spec, found)
                time.sleep(pause)
                found = self.placement(spec, kubeconfig=kubeconfig, color=color)
            step.detail = found.summary()

    def report_placement(self, spec: DeploymentSpec, *, kubeconfig: str, color: str, report: Report,
                         key: str) -> str:
        found = self.placement(spec, kubeconfig=kubeconfig, color=color)
        report.table_artifact(f"{key}-capacity", found.rows(), f"Which capacity option served {spec.name}")
        line = f"Capacity: {found.summary()}"
        report.note(line)
        return line


class AutopilotNodes(Capacity):
    """``startup.nodes: fast-start`` on a Standard cluster: the pods select an Autopilot-mode ComputeClass
    (rendered with the model's objects), GKE makes each node for its pod — from its pre-initialized G2
    capacity when it can (fast-starting nodes). No pool to create, size at park or restore at wake."""

    name = "Autopilot-mode ComputeClass"

    def pool_names(self, spec: DeploymentSpec) -> list[str]:
        return []

    def provision(self, spec: DeploymentSpec, *, location: str, candidates: list[tuple[str, str]],
                  attempts: list[dict[str, str]], walk: Walk, ensure: Ensure
                  ) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
        c = spec.cluster
        cluster, created = ensure(spec, location=location, zones=[z for r, z in candidates if r == c.region])
        attempts.append({"region": c.region, "zone": "-", "result": "created" if created else "exists",
                         "detail": f"no GPU pool: GKE makes the nodes of ComputeClass {names.compute_class(spec)} "
                                   "(Autopilot mode, fast-starting nodes)"})
        return location, cluster, None

    def wake_pool_plan(self, record: P.ParkRecord, now: P.PoolState) -> P.PoolPlan:
        return P.PoolPlan(note="GKE makes the node for the pod (Autopilot mode, fast-starting nodes)")


def capacity_for(spec: DeploymentSpec) -> Capacity:
    """The spec's way to GPU nodes: nodes GKE makes in Autopilot mode (fast-starting nodes), its
    ``capacity:`` options, or the one pool."""
    if startup.fast_nodes(spec) and spec.cluster.mode == "standard":
        return AutopilotNodes()
    return ClassPools() if spec.capacity else SinglePool()
