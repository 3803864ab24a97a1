"""Park and wake, the pure part: what a park records, the hold proxy's objects, schedules, idle decisions.

No I/O. ``targets/gke/park_steps.py`` observes the cluster, calls these, and applies what they return;
``bench/park_week.py`` replays a week of traffic through the same functions.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from croniter import croniter

from manifests import names
from manifests.errors import PreflightError
from manifests.names import Color
from manifests.spec import DeploymentSpec, ScheduleSpec

Obj = dict[str, Any]

# What park changed, on the live Service itself: wake restores exactly this (and a rerun sees it).
PARK_RECORD = "llm-fleet.dev/park-record"
# Idle tracking for park_idle: the request counter last seen and when it last moved.
ACTIVITY = "llm-fleet.dev/activity"
# Requests seen per local hour of the day, learned from the engine's counter (kept across park and wake).
ARRIVALS = "llm-fleet.dev/arrivals"
HOLD_COLOR = "hold"  # the color label the hold proxy's pods carry: the live Service selects it while parked
WAKE_EVENT = "llm-fleet.model.wake-requested"
HOLD_PORT = 8080
HOLD_MEMORY_LIMIT_MI = 256
# Held request bodies may use half the container's memory limit (the rest: Python, aiohttp, one request
# being read); past it the proxy answers 503 + Retry-After instead of being OOM-killed with the queue.
HOLD_QUEUE_BYTES = HOLD_MEMORY_LIMIT_MI * 2**20 // 2
HOLD_REPLICAS = 2  # one proxy pod can go (node drain, upgrade) while the other holds: see hold_proxy_budget
# How the hold proxy authenticates its wake events to Prefect: a Secret in the model's namespace, read
# by the kubelet into the proxy's env (never in the Deployment's text). Key -> the variable Prefect's
# own client reads: a self-hosted server's basic auth string, or a Prefect Cloud API key. Both optional:
# a server without auth needs neither.
PREFECT_AUTH_SECRET = "llm-fleet-prefect-auth"
PREFECT_AUTH_KEYS = {"auth-string": "PREFECT_API_AUTH_STRING", "api-key": "PREFECT_API_KEY"}
# Most recent measured wakes kept for the prewarm p95.
WAKE_HISTORY = 20
MIN_WAKES_FOR_P95 = 3


# ---- names ------------------------------------------------------------------------------------------

def hold_deployment_name(spec: DeploymentSpec) -> str:
    return f"{spec.name}-hold"


def awake_service_name(spec: DeploymentSpec) -> str:
    """The Service that always selects the model's own pods: the hold proxy forwards to it, wake checks it."""
    return f"{spec.name}-awake"


def resource_id(spec: DeploymentSpec) -> str:
    return f"llm-fleet.model.{spec.name}"


def wake_variable(spec: DeploymentSpec) -> str:
    """Prefect Variable holding the measured wake times (names: lowercase, digits, underscores)."""
    return "llm_fleet_wake_s_" + re.sub(r"[^a-z0-9]+", "_", spec.name.lower())


def hold_selector(spec: DeploymentSpec) -> dict[str, str]:
    return {"app.kubernetes.io/instance": spec.name, names.COLOR_LABEL: HOLD_COLOR}


# ---- the park record --------------------------------------------------------------------------------

@dataclass(frozen=True)
class PoolState:
    """A Standard GPU pool's settings as GKE reports them (node counts are per zone, as in GKE)."""

    name: str
    autoscaling: bool
    min_nodes: int
    max_nodes: int
    nodes_per_zone: int


@dataclass(frozen=True)
class ParkRecord:
    color: Color
    replicas: int
    selector: dict[str, str]
    parked_at: str
    pool: PoolState | None = None  # None on Autopilot: the nodes go with the pods
    held: bool = False  # the live Service was pointed at the hold proxy
    # What park changed on the pool: "min" (autoscaling minimum → 0), "size" (→ 0). Wake undoes exactly
    # these. None: a record from before pools could be shared, whose park always did both.
    pool_changed: tuple[str, ...] | None = None
    # expose.gateway: the HTTPRoute's backend weights (pool -> weight) before park moved it to the hold
    # proxy; wake puts exactly these back. None: no Gateway (or a record from before Gateways were held).
    route: dict[str, int] | None = None
    # expose.gateway: the endpoint pickers' Deployments (name -> replicas) park scaled to 0 once the route
    # had left their pools; wake brings them back, Ready, before the route returns. None: not yet recorded.
    pickers: dict[str, int] | None = None

    def to_annotation(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_annotation(cls, text: str | None) -> ParkRecord | None:
        if not text:
            return None
        data = json.loads(text)
        pool = data.pop("pool", None)
        changed = data.pop("pool_changed", None)
        return cls(**data, pool=PoolState(**pool) if pool else None,
                   pool_changed=None if changed is None else tuple(changed))


def picker_replicas(deployments: dict[str, Obj | None]) -> dict[str, int]:
    """What the park record keeps of the endpoint pickers' Deployments (name -> object as read, None when
    missing): each one's replicas, 0 read as the chart's 1 (a picker at 0 would fail every request to its
    pool once the route returns: ``failureMode: FailClose``); a missing one is not recorded."""
    return {name: int((dep.get("spec") or {}).get("replicas") or 0) or 1
            for name, dep in sorted(deployments.items()) if dep is not None}


def read_record(service: Obj | None) -> ParkRecord | None:
    ann = ((service or {}).get("metadata") or {}).get("annotations") or {}
    return ParkRecord.from_annotation(ann.get(PARK_RECORD))


def pool_state(pool: Obj, node_count: int, zones: int) -> PoolState:
    """From a get_node_pool dict (proto field names) and the pool's nodes as Kubernetes lists them."""
    auto = pool.get("autoscaling") or {}
    return PoolState(name=pool["name"], autoscaling=bool(auto.get("enabled")),
                     min_nodes=int(auto.get("min_node_count") or 0), max_nodes=int(auto.get("max_node_count") or 0),
                     nodes_per_zone=math.ceil(node_count / max(1, zones)))


# ---- the GPU pool: park zeroes it only when nobody else needs it ------------------------------------

POOL_LABEL = "cloud.google.com/gke-nodepool"
# Cluster plumbing that reschedules elsewhere when a node goes (GKE moves it on any resize too).
SYSTEM_NAMESPACES = ("kube-system", "gmp-system", "gke-")


def _owner(name: str, namespace: str, labels: dict[str, str], model_namespace: str) -> str:
    instance = labels.get("app.kubernetes.io/instance")
    if instance is None:
        return f"{namespace}/{name}"
    return instance if namespace == model_namespace else f"{namespace}/{instance}"


def pool_users(*, model: str, namespace: str, pool: str, nodes: list[str], pods: list[Obj],
               deployments: list[Obj]) -> list[str]:
    """Who besides ``model`` (in ``namespace``: a model is its namespace and name — a same-named one in
    another namespace is another model) needs the GPU pool, as the cluster reports it (sorted, one each).

    A pod counts when it runs on one of the pool's ``nodes`` (or waits unscheduled with a nodeSelector
    naming the pool) and is not finished, not a DaemonSet's or a static pod (those belong to the node),
    not in a system namespace and not the model's own. Terminating pods count: they may still be
    draining requests. A Deployment counts when it asks for replicas on the pool: its pods may not exist
    yet (another model's wake or release in flight).
    """
    on_pool = set(nodes)
    users: set[str] = set()
    for pod in pods:
        meta, spec_ = pod.get("metadata") or {}, pod.get("spec") or {}
        labels, ns = meta.get("labels") or {}, meta.get("namespace", "default")
        if (labels.get("app.kubernetes.io/instance") == model and ns == namespace) or ns.startswith(SYSTEM_NAMESPACES):
            continue
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        if any(o.get("kind") == "DaemonSet" for o in meta.get("ownerReferences") or []) or \
                "kubernetes.io/config.mirror" in (meta.get("annotations") or {}):
            continue
        node = spec_.get("nodeName")
        if node in on_pool or (not node and (spec_.get("nodeSelector") or {}).get(POOL_LABEL) == pool):
            users.add(_owner(meta.get("name", ""), ns, labels, namespace))
    for dep in deployments:
        meta, spec_ = dep.get("metadata") or {}, dep.get("spec") or {}
        labels, ns = meta.get("labels") or {}, meta.get("namespace", "default")
        if (labels.get("app.kubernetes.io/instance") == model and ns == namespace) or ns.startswith(SYSTEM_NAMESPACES):
            continue
        pod_spec = (spec_.get("template") or {}).get("spec") or {}
        if int(spec_.get("replicas", 1) or 0) > 0 and (pod_spec.get("nodeSelector") or {}).get(POOL_LABEL) == pool:
            users.add(_owner(meta.get("name", ""), ns, labels, namespace))
    return sorted(users)


@dataclass(frozen=True)
class PoolPlan:
    """What to do to a Standard GPU pool: the autoscaling minimum and/or the size (per zone), or nothing."""

    min_nodes: int | None = None  # set the autoscaling minimum to this (maximum unchanged)
    size: int | None = None  # set the size to this many nodes per zone
    changed: tuple[str, ...] = ()  # park: what the record says park changed, this run's and earlier runs'
    note: str = ""  # why, for the step detail and the Slack thread


def plan_park_pool(current: PoolState, *, users: list[str], changed: tuple[str, ...] = ()) -> PoolPlan:
    """Park: the pool to 0 when nobody else needs it; otherwise only its autoscaling minimum to 0.

    A pool shared with a model still serving keeps its size (setSize would take nodes that run the other
    model's pods); with the minimum at 0 the cluster autoscaler removes the node(s) this model left once
    they are unneeded. ``changed``: what an earlier run of this park recorded (a rerun keeps it).
    """
    min_nodes = 0 if current.autoscaling and current.min_nodes > 0 else None
    if users:
        size = None
        note = (f"shared with {', '.join(users)}: only this model's replicas parked, size left at "
                f"{current.nodes_per_zone} per zone; " +
                ("the cluster autoscaler removes the node(s) it no longer uses" if current.autoscaling else
                 "autoscaling is off on the pool, so its node(s) stay up (enable autoscaling to let them go)"))
    else:
        size = 0 if current.nodes_per_zone > 0 else None
        note = "no other workload needs it"
    done = set(changed) | ({"min"} if min_nodes is not None else set()) | ({"size"} if size is not None else set())
    return PoolPlan(min_nodes, size, tuple(sorted(done)), note)


def plan_wake_pool(record: ParkRecord, current: PoolState) -> PoolPlan:
    """Wake: undo exactly what this model's park changed — and nothing another park or wake did since.

    The minimum goes back only while it is still the 0 park set; the size only grows (back to what park
    saw), so a pool another wake or the autoscaler already restored is never shrunk, and a pool another
    model's park zeroed is that park's to restore: the autoscaler adds nodes for this model's pods. Only
    a pool at 0 nodes that cannot autoscale is sized up, or the pods would never find a node.
    """
    rec = record.pool
    if rec is None:
        return PoolPlan(note="Autopilot: nodes come with the pods")
    changed = record.pool_changed if record.pool_changed is not None else ("min", "size")
    min_nodes = size = None
    if "min" in changed and current.autoscaling and current.min_nodes == 0 and rec.min_nodes > 0:
        min_nodes = min(rec.min_nodes, current.max_nodes)
    # What the replicas need (a GPU node holds one), never more than park saw: park may have found the
    # pool at a peak (both colors of a release, another model's pods) that the wake has no use for. The
    # autoscaler adds more if the pods ask for it.
    want = min(rec.nodes_per_zone, max(1, record.replicas))
    if "size" in changed and current.nodes_per_zone < want:
        size = want
    if size is None and current.nodes_per_zone == 0 and not current.autoscaling:
        size, note = max(1, rec.nodes_per_zone), "at 0 nodes without autoscaling: sized up so the pods find a node"
    elif "size" in changed:
        note = "as park found it" if size is not None else "already restored (another wake or the autoscaler)"
    else:
        note = "park left its size (shared with another model)"
        if current.nodes_per_zone == 0:
            note += "; at 0 nodes now (another model's park): the cluster autoscaler adds nodes for the pods"
    return PoolPlan(min_nodes, size, changed, note)


# ---- the hold proxy's objects ---------------------------------------------------------------------

def awake_service(spec: DeploymentSpec, color: Color) -> Obj:
    """ClusterIP Service on the model's own pods: where the hold proxy forwards, what wake checks."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": awake_service_name(spec), "namespace": spec.namespace,
                     "labels": {**names.common_labels(spec), "llm-fleet.dev/role": "awake"}},
        "spec": {"type": "ClusterIP", "selector": names.selector(spec, color),
                 "ports": [{"name": "http", "port": spec.expose.port, "targetPort": "http", "protocol": "TCP"}]},
    }


def require_image(spec: DeploymentSpec, what: str) -> str:
    """The product image the hold proxy / playground run (``hold.image``, default ``$LLM_FLEET_IMAGE``), or one
    error naming the field and the fix, before anything is changed."""
    image = spec.hold.image
    if not image or not re.fullmatch(r"[a-z0-9][\w.\-/:@]*", image):
        raise PreflightError(f"hold.image: {what} needs the product's image, {'not ' + repr(image) if image else 'none is set'}",
                             "build and push the flows image (README 'The flows image': docker build -t "
                             "us-docker.pkg.dev/PROJECT/llm-fleet/flows:TAG .), then set LLM_FLEET_IMAGE to it "
                             "(or hold.image in the spec); the sandbox's env file sets it")
    return image


def hold_proxy_deployment(spec: DeploymentSpec, *, prefect_api_url: str | None,
                          spec_ref: str | None = None) -> Obj:
    """The always-on, CPU-only proxy that holds requests while the model is parked."""
    hold = spec.hold
    labels = {**names.common_labels(spec), "app.kubernetes.io/component": "hold-proxy",
              names.COLOR_LABEL: HOLD_COLOR}
    env = {
        "HOLD_MODEL": spec.name,
        "HOLD_ENGINE": spec.engine.kind,
        "HOLD_NAMESPACE": spec.namespace,
        "HOLD_UPSTREAM_SERVICE": awake_service_name(spec),
        "HOLD_UPSTREAM_PORT": str(spec.expose.port),
        "HOLD_MAX_QUEUE": str(hold.max_queue),
        "HOLD_MAX_QUEUE_BYTES": str(HOLD_QUEUE_BYTES),
        "HOLD_TIMEOUT_S": f"{hold.timeout.total_seconds():g}",
        "HOLD_RETRY_AFTER_S": f"{math.ceil(hold.retry_after.total_seconds())}",
        "HOLD_EVENT": WAKE_EVENT,
        "HOLD_RESOURCE_ID": resource_id(spec),
        "HOLD_SPEC": spec_ref or spec.name,
    }
    if hold.prefect_api_url or prefect_api_url:
        env["PREFECT_API_URL"] = hold.prefect_api_url or prefect_api_url
    probe = {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5, "timeoutSeconds": 2}
    container = {
        "name": "hold-proxy", "image": hold.image,
        "command": ["python", "-m", "servers.holdproxy"],
        "ports": [{"name": "http", "containerPort": HOLD_PORT, "protocol": "TCP"}],
        "env": [{"name": "PORT", "value": str(HOLD_PORT)}] + [{"name": k, "value": v} for k, v in env.items()]
        + [{"name": var, "valueFrom": {"secretKeyRef": {"name": PREFECT_AUTH_SECRET, "key": key, "optional": True}}}
           for key, var in PREFECT_AUTH_KEYS.items()],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                      "limits": {"memory": f"{HOLD_MEMORY_LIMIT_MI}Mi"}},
        # Pod Security "restricted" (the namespace enforces baseline and warns on restricted).
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                            "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000},
        "readinessProbe": probe,
        "livenessProbe": {**probe, "periodSeconds": 20, "failureThreshold": 3},
    }
    selector = {"app.kubernetes.io/instance": spec.name, "app.kubernetes.io/component": "hold-proxy"}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": hold_deployment_name(spec), "namespace": spec.namespace,
                     "labels": {**names.common_labels(spec), "app.kubernetes.io/component": "hold-proxy"}},
        "spec": {
            "replicas": HOLD_REPLICAS,
            # Generous on purpose: the flow's own wait is the real bound (and the sandbox runs the proxy as
            # a real process whose start is not time-scaled like the Deployment's deadline).
            "progressDeadlineSeconds": 3600,
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": {**labels, **selector}},
                         # held requests finish or get their 503 before the pod goes
                         "spec": {"containers": [container],
                                  "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                                  "automountServiceAccountToken": False,  # it never calls the Kubernetes API
                                  "terminationGracePeriodSeconds": int(hold.timeout.total_seconds()) + 5}},
        },
    }


def hold_proxy_budget(spec: DeploymentSpec) -> Obj:
    """At most one hold-proxy pod disrupted at a time (drain, upgrade, autoscaler): a parked model is never
    left with nobody to hold its requests. With the proxy at 0 (the model awake) it constrains nothing."""
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": hold_deployment_name(spec), "namespace": spec.namespace,
                     "labels": {**names.common_labels(spec), "app.kubernetes.io/component": "hold-proxy"}},
        "spec": {"maxUnavailable": 1,
                 "selector": {"matchLabels": {"app.kubernetes.io/instance": spec.name,
                                              "app.kubernetes.io/component": "hold-proxy"}}},
    }


def hold_proxy_peer(spec: DeploymentSpec) -> Obj:
    """The model NetworkPolicy's peer for the hold proxy: its pods, in the model's own namespace (a bare
    ``podSelector`` peer means this namespace), which forward held requests to the model."""
    return {"podSelector": {"matchLabels": {"app.kubernetes.io/instance": spec.name,
                                            "app.kubernetes.io/component": "hold-proxy"}}}


# ---- schedules ----------------------------------------------------------------------------------------

def _tz(schedule: ScheduleSpec) -> ZoneInfo:
    return ZoneInfo(schedule.timezone)


def last_fire(cron: str, now: datetime, tz: ZoneInfo) -> datetime:
    return croniter(cron, now.astimezone(tz)).get_prev(datetime)


def next_fire(cron: str, now: datetime, tz: ZoneInfo) -> datetime:
    return croniter(cron, now.astimezone(tz)).get_next(datetime)


def in_awake_window(schedule: ScheduleSpec | None, now: datetime) -> bool:
    """Between a scheduled wake and the next scheduled park (False without park/wake crons)."""
    if schedule is None or not schedule.park or not schedule.wake:
        return False
    tz = _tz(schedule)
    return last_fire(schedule.wake, now, tz) > last_fire(schedule.park, now, tz)


def p95(values: list[float]) -> float:
    """Nearest-rank 95th percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def prewarm_s(schedule: ScheduleSpec, wake_seconds: list[float]) -> float:
    """How early a scheduled wake starts: p95 of measured wakes, or schedule.prewarm until there are enough."""
    if len(wake_seconds) >= MIN_WAKES_FOR_P95:
        return p95(wake_seconds)
    return schedule.prewarm.total_seconds()


def add_wake(history: list[float], seconds: float) -> list[float]:
    return [*history, round(seconds, 3)][-WAKE_HISTORY:]


_NUM = re.compile(r"^\d+$")


def _expand_dow(field_: str) -> list[int] | None:
    if field_ == "*":
        return None
    out: list[int] = []
    for part in field_.split(","):
        if _NUM.match(part):
            out.append(int(part) % 7)
        elif m := re.match(r"^(\d+)-(\d+)$", part):
            out += [d % 7 for d in range(int(m.group(1)), int(m.group(2)) + 1)]
        else:
            raise ValueError(part)
    return sorted(set(out))


def shift_cron(cron: str, minutes: int) -> str | None:
    """``cron`` fired ``minutes`` earlier (whole minutes), or None when the expression can't be shifted.

    Handles the common shape: numeric minute and hour(s), day of month/month ``*``, day of week ``*`` or
    numbers/ranges (moved back a day when the shift crosses midnight).
    """
    if minutes <= 0:
        return cron
    parts = cron.split()
    if len(parts) != 5:
        return None
    minute, hour, dom, month, dow = parts
    if not _NUM.match(minute) or dom != "*" or month != "*":
        return None
    try:
        hours = [int(h) for h in hour.split(",")]
        days = _expand_dow(dow)
    except ValueError:
        return None
    shifted = [(h * 60 + int(minute) - minutes) for h in hours]
    if len({t % 60 for t in shifted}) != 1 or any(t < -1440 for t in shifted):
        return None
    crosses = {t < 0 for t in shifted}
    if len(crosses) != 1:
        return None
    new_minute = shifted[0] % 60
    new_hours = ",".join(str((t % 1440) // 60) for t in shifted)
    if crosses.pop() and days is not None:
        dow = ",".join(str(d) for d in sorted({(d - 1) % 7 for d in days}))
    return f"{new_minute} {new_hours} {dom} {month} {dow}"


@dataclass(frozen=True)
class ScheduleEntry:
    """One Prefect deployment schedule the specs ask for (the slug identifies it across syncs)."""

    slug: str
    deployment: str  # "flow/deployment"
    cron: str
    timezone: str
    parameters: dict[str, Any] = field(default_factory=dict)
    note: str = ""


SLUG_PREFIX = "llm-fleet-"


def desired_schedules(spec: DeploymentSpec, *, spec_ref: str, wake_seconds: list[float],
                      park_deployment: str | None = None,
                      wake_deployment: str | None = None) -> list[ScheduleEntry]:
    """The park and (prewarmed) wake schedules of one spec, on the park_model / wake_model deployments
    (default: the ones prefect.yaml declares)."""
    from manifests.fleet import deployment_name

    park_deployment = park_deployment or deployment_name("park_model")
    wake_deployment = wake_deployment or deployment_name("wake_model")
    sched = spec.schedule
    if sched is None or not sched.park or not sched.wake:
        return []
    lead_s = prewarm_s(sched, wake_seconds)
    lead_min = math.ceil(lead_s / 60)
    wake_cron = shift_cron(sched.wake, lead_min)
    note = f"prewarm {lead_min} min ({'p95 of ' + str(len(wake_seconds)) + ' wakes' if len(wake_seconds) >= MIN_WAKES_FOR_P95 else 'schedule.prewarm'})"
    if wake_cron is None:
        wake_cron, note = sched.wake, f"no prewarm: cannot shift {sched.wake!r} by {lead_min} min"
    params = {"spec": spec_ref}
    return [
        ScheduleEntry(f"{SLUG_PREFIX}park-{spec.name}", park_deployment, sched.park, sched.timezone,
                      {**params, "reason": "schedule"}, "scheduled park"),
        ScheduleEntry(f"{SLUG_PREFIX}wake-{spec.name}", wake_deployment, wake_cron, sched.timezone,
                      {**params, "reason": "schedule"}, note),
    ]


@dataclass(frozen=True)
class ScheduleChange:
    action: Literal["create", "update", "delete", "unchanged"]
    slug: str
    deployment: str
    cron: str
    timezone: str
    id: str | None = None  # the existing schedule's id (update/delete)
    parameters: dict[str, Any] = field(default_factory=dict)


def plan_schedules(desired: list[ScheduleEntry], existing: dict[str, list[dict[str, Any]]]) -> list[ScheduleChange]:
    """What to change so the deployments' llm-fleet schedules equal ``desired``.

    ``existing``: deployment -> its schedules as ``{"id", "slug", "cron", "timezone", "parameters"}``; only
    slugs with our prefix are ours (hand-made schedules are left alone).
    """
    out: list[ScheduleChange] = []
    want = {(d.deployment, d.slug): d for d in desired}
    for dep, items in existing.items():
        for s in items:
            slug = s.get("slug") or ""
            if not slug.startswith(SLUG_PREFIX):
                continue
            d = want.pop((dep, slug), None)
            if d is None:
                out.append(ScheduleChange("delete", slug, dep, s.get("cron", ""), s.get("timezone", ""), s["id"]))
            elif (s.get("cron"), s.get("timezone"), s.get("parameters") or {}) != (d.cron, d.timezone, d.parameters):
                out.append(ScheduleChange("update", slug, dep, d.cron, d.timezone, s["id"], d.parameters))
            else:
                out.append(ScheduleChange("unchanged", slug, dep, d.cron, d.timezone, s["id"], d.parameters))
    out += [ScheduleChange("create", d.slug, d.deployment, d.cron, d.timezone, None, d.parameters)
            for d in want.values()]
    return out


# ---- idle policy ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Metrics:
    running: float
    waiting: float
    requests: float  # a counter of requests seen (finished or failed)


_METRICS = {
    "vllm": (("vllm:num_requests_running",), ("vllm:num_requests_waiting",),
             ("vllm:request_success", "vllm:request_success_total")),
    "tgi": (("tgi_batch_current_size",), ("tgi_queue_size",), ("tgi_request_count", "tgi_request_count_total")),
    "sglang": (("sglang:num_running_reqs",), ("sglang:num_queue_reqs",),
               ("sglang:num_requests", "sglang:num_requests_total")),
}


def parse_metrics(text: str, engine: str) -> Metrics:
    """The engine's in-flight gauges and request counter from a Prometheus /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    running_names, waiting_names, count_names = _METRICS[engine]
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith(("_bucket", "_created")):
                continue
            sums[sample.name] = sums.get(sample.name, 0.0) + float(sample.value)

    def pick(candidates: tuple[str, ...]) -> float:
        return next((sums[n] for n in candidates if n in sums), 0.0)

    return Metrics(pick(running_names), pick(waiting_names), pick(count_names))


def parse_pod_metrics(pages: list[str], engine: str) -> Metrics:
    """Every replica's page summed: what the model as a whole is doing and has served."""
    each = [parse_metrics(p, engine) for p in pages]
    return Metrics(sum(m.running for m in each), sum(m.waiting for m in each), sum(m.requests for m in each))


@dataclass(frozen=True)
class Activity:
    """Stored on the live Service: the counter value last seen and when traffic was last seen."""

    requests: float
    last_active: str  # ISO time

    def to_annotation(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_annotation(cls, text: str | None) -> Activity | None:
        return cls(**json.loads(text)) if text else None


def observe_activity(previous: Activity | None, metrics: Metrics, now: datetime) -> tuple[Activity, bool]:
    """(new record, whether the idle time is known): busy or a moved counter resets the idle clock.

    A first observation (no record) starts the clock now: an idle time is only claimed once seen.
    """
    busy = metrics.running + metrics.waiting > 0
    if previous is None:
        return Activity(metrics.requests, now.isoformat()), False
    if busy or metrics.requests != previous.requests:
        return Activity(metrics.requests, now.isoformat()), True
    return previous, True


@dataclass(frozen=True)
class Observed:
    model: str
    parked: bool
    replicas: int
    in_flight: float  # running + waiting
    last_active: datetime | None  # None: not known yet


@dataclass(frozen=True)
class Decision:
    model: str
    idle_for_s: float | None
    action: Literal["park", "keep", "skip"]
    reason: str

    def row(self) -> dict[str, Any]:
        idle = "unknown" if self.idle_for_s is None else human(self.idle_for_s)
        return {"model": self.model, "idle for": idle, "action": self.action, "reason": self.reason}


def human(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# ---- learned arrivals: park at once in hours whose next request is far away ------------------------------

ARRIVAL_MIN_HOURS = 2.0  # an hour of the day is known once this many of it were observed (two days)
ARRIVAL_MEMORY_HOURS = 14.0  # per hour of the day: older observations fade (two weeks)
ARRIVAL_MAX_GAP_S = 7 * 86400  # a longer silence (park_idle stopped) is not credited as observed time
EARLY_IDLE_S = 60.0  # one park_idle tick without a request: the request that woke it is served
BREAK_EVEN_WAKES = 2.0  # parking costs about two wakes of GPU time (billed W after park, W to wake again)


@dataclass(frozen=True)
class Arrivals:
    """Per local hour of the day: requests counted and hours observed (parked hours included)."""

    counts: tuple[float, ...]
    hours: tuple[float, ...]
    requests: float  # the engine counter last seen
    seen_at: str  # ISO time of the last observation

    def rate(self, hour: int) -> float | None:
        """Requests per hour in this hour of the day, or None until ``ARRIVAL_MIN_HOURS`` were observed."""
        return self.counts[hour] / self.hours[hour] if self.hours[hour] >= ARRIVAL_MIN_HOURS else None

    def to_annotation(self) -> str:
        return json.dumps({"c": [round(x, 3) for x in self.counts], "h": [round(x, 4) for x in self.hours],
                           "r": self.requests, "t": self.seen_at}, separators=(",", ":"))

    @classmethod
    def from_annotation(cls, text: str | None) -> Arrivals | None:
        if not text:
            return None
        d = json.loads(text)
        return cls(tuple(d["c"]), tuple(d["h"]), d["r"], d["t"])


def observe_arrivals(previous: Arrivals | None, requests: float, now: datetime, tz: ZoneInfo) -> Arrivals:
    """Credit the time since the last observation to the hours of the day it spans (parked time too: the
    next observation after a wake covers it), and the counter's increase to the current hour — a fresh
    engine's counter (lower than last seen) starts from 0, so the requests held during a wake count."""
    if previous is None:
        return Arrivals((0.0,) * 24, (0.0,) * 24, requests, now.isoformat())
    counts, hours = list(previous.counts), list(previous.hours)
    t, end = datetime.fromisoformat(previous.seen_at).astimezone(tz), now.astimezone(tz)
    t0 = t
    if 0 < (end - t).total_seconds() <= ARRIVAL_MAX_GAP_S:
        while t < end:
            nxt = min(end, t.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1))
            hours[t.hour] += (nxt - t).total_seconds() / 3600
            t = nxt
    new = requests - previous.requests if requests >= previous.requests else requests
    counts[(end - timedelta(microseconds=1)).hour if end > t0 else end.hour] += new  # the span's last hour
    for h in range(24):  # fade: each hour of the day keeps about ARRIVAL_MEMORY_HOURS of observations
        if hours[h] > ARRIVAL_MEMORY_HOURS:
            keep = ARRIVAL_MEMORY_HOURS / hours[h]
            counts[h], hours[h] = counts[h] * keep, ARRIVAL_MEMORY_HOURS
    return Arrivals(tuple(counts), tuple(hours), requests, now.isoformat())


def early_park(arrivals: Arrivals | None, wake_s: float | None, now: datetime, tz: ZoneInfo) -> str | None:
    """Why parking now beats waiting out ``idle_after``, or None: in this hour of the day the learned
    arrival rate puts the next request further away than parking costs (``BREAK_EVEN_WAKES`` wakes)."""
    if arrivals is None or not wake_s:
        return None
    hour = now.astimezone(tz).hour
    rate = arrivals.rate(hour)
    if rate is None:
        return None
    gap = math.inf if rate <= 0 else 3600 / rate
    if gap < BREAK_EVEN_WAKES * wake_s:
        return None
    return (f"{hour:02d}:00-{hour:02d}:59 sees {rate:.1f} req/h (next in ~{human(gap) if gap < math.inf else 'never'})"
            f" > {BREAK_EVEN_WAKES:g} × wake {human(wake_s)}")


def decide_park(observed: Observed, policy: ScheduleSpec | None, now: datetime, *,
                arrivals: Arrivals | None = None, wake_s: float | None = None) -> Decision:
    """Park a model idle longer than ``idle_after`` — never inside a schedule's awake window unless allowed.

    With ``schedule.learned_idle`` (default), ``arrivals`` (the learned rate per hour of the day) and
    ``wake_s`` (the p95 of measured wakes), park after one idle tick instead, in an hour whose next request
    is expected later than parking and waking again cost.
    """
    m = observed.model
    idle = None if observed.last_active is None else max(0.0, (now - observed.last_active).total_seconds())
    if observed.parked:
        return Decision(m, idle, "skip", "already parked")
    if observed.replicas == 0:
        return Decision(m, idle, "skip", "no replicas running (not parked by llm-fleet)")
    if policy is None or policy.idle_after is None:
        return Decision(m, idle, "keep", "no schedule.idle_after in the spec")
    if observed.in_flight > 0:
        return Decision(m, 0.0, "keep", f"{observed.in_flight:g} request(s) in flight")
    if idle is None:
        return Decision(m, None, "keep", "first observation: idle time starts now")
    limit = policy.idle_after.total_seconds()
    if in_awake_window(policy, now) and not policy.idle_in_awake_window:
        return Decision(m, idle, "keep", f"inside the scheduled awake window (wake {policy.wake!r}, "
                                         f"park {policy.park!r}, {policy.timezone})")
    if idle < limit and policy.learned_idle and idle >= EARLY_IDLE_S and \
            (why := early_park(arrivals, wake_s, now, _tz(policy))) is not None:
        return Decision(m, idle, "park", f"idle {human(idle)}; {why}: parking before idle_after {human(limit)}")
    if idle < limit:
        return Decision(m, idle, "keep", f"idle {human(idle)} < idle_after {human(limit)}")
    return Decision(m, idle, "park", f"idle {human(idle)} ≥ idle_after {human(limit)}")


def iso_now() -> str:
    from datetime import UTC

    return datetime.now(UTC).isoformat()
