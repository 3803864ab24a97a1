"""GCE load-balancer health checks on the backends of every GCE Ingress, unasked, as Google's checkers do.

GKE's Ingress controller (ingress-gce) gives each backend Service of a ``gce`` Ingress a Compute health
check, and Google's health checkers (``User-Agent: GoogleHC/1.0``, from 35.191.0.0/16 and 130.211.0.0/22)
probe every endpoint of its network endpoint group on their own schedule. The load balancer sends
requests only to endpoints that passed; with none healthy it answers **502** with Google's own error page.

The health check (ingress-gce ``pkg/healthchecks/healthchecks.go`` ``SyncServicePort``,
``pkg/translator/healthchecks.go``), for container-native (NEG) backends, GKE's default:

* defaults: ``GET /``, every 15 s, timeout 15 s, healthy after 1 success, unhealthy after 2 failures
  (``defaultNEGHealthCheckInterval``, ``defaultNEGTimeout``, ``defaultHealthyThreshold``,
  ``defaultNEGUnhealthyThreshold``); a check passes only on HTTP 200;
* when the health check is created and the serving pods have an ``httpGet`` readiness probe on the
  Service's target port: its path, ``periodSeconds`` as the interval and ``timeoutSeconds`` as the timeout
  (``ApplyProbeSettingsToHC``) — inferred once: pods that do not exist yet (replicas 0) leave the default
  ``/``, and later probe changes are not picked up (GKE docs, "Health checks" in the Ingress concepts);
* a ``BackendConfig`` (``cloud.google.com/v1``) named by the Service's ``cloud.google.com/backend-config``
  annotation (``{"default": NAME}`` or ``{"ports": {PORT: NAME}}``) overrides any field its
  ``spec.healthCheck`` sets (``checkIntervalSec``, ``timeoutSec``, ``healthyThreshold``,
  ``unhealthyThreshold``, ``requestPath``), always (``UpdateFromBackendConfig``).

Endpoints are the Service's pods as the NEG has them (kube-proxy's lagged view,
``sandbox.kube.kubeproxy``); a new endpoint is checked at once and serves after ``healthyThreshold``
successes. Real waits are never below :data:`sandbox.kube.gmp.MIN_PERIOD_S` and a check's real timeout
never below :data:`sandbox.kube.gmp.MIN_TIMEOUT_S`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from sandbox.kube import resources as res
from sandbox.kube.actors import BackgroundActor, Job
from sandbox.kube.controllers import PODS, SVCS
from sandbox.kube.gmp import MIN_PERIOD_S, MIN_TIMEOUT_S
from sandbox.kube.selectors import match_selector_dict

if TYPE_CHECKING:
    from sandbox.kube.cluster import KubeCluster

Obj = dict[str, Any]
USER_AGENT = "GoogleHC/1.0"
NEG_DEFAULTS = {"path": "/", "interval_s": 15.0, "timeout_s": 15.0, "healthy": 1, "unhealthy": 2}
BACKEND_CONFIG = "cloud.google.com/backend-config"
# What a Google front end sends when no backend can take the request (failed_to_pick_backend).
GFE_502 = ("<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n"
           "  <meta name=viewport content=\"initial-scale=1, minimum-scale=1, width=device-width\">\n"
           "  <title>Error 502 (Server Error)!!1</title>\n"
           "  <p><b>502.</b> <ins>That\u2019s an error.</ins>\n"
           "  <p>The server encountered a temporary error and could not complete your request."
           "<p>Please try again in 30 seconds.  <ins>That\u2019s all we know.</ins>\n")


@dataclass
class HealthCheck:
    path: str
    interval_s: float
    timeout_s: float
    healthy: int
    unhealthy: int
    source: str  # "default", "readinessProbe" or "BackendConfig"


@dataclass
class _Endpoint:
    port: int
    healthy: bool = False  # UNKNOWN until the first checks pass
    ok_streak: int = 0
    fail_streak: int = 0
    checks: int = 0
    in_flight: bool = False


@dataclass
class _Backend:
    namespace: str
    service: str
    base: HealthCheck  # defaults + readiness probe, fixed at creation
    check: HealthCheck  # base + BackendConfig, re-read every round
    next_due: float = 0.0
    endpoints: dict[str, _Endpoint] = field(default_factory=dict)


def _probe_settings(pods: list[Obj], svc: Obj, port: Any) -> dict[str, Any] | None:
    """The readiness probe ingress-gce would copy: an httpGet probe on the container port the Service
    port targets, from the first serving pod that has one."""
    sp = next((p for p in (svc.get("spec") or {}).get("ports") or []
               if port is None or p.get("port") == port or p.get("name") == port), None)
    target = (sp or {}).get("targetPort", (sp or {}).get("port"))
    for pod in pods:
        for c in (pod.get("spec") or {}).get("containers") or []:
            names = {cp.get("name"): cp.get("containerPort") for cp in c.get("ports") or []}
            number = names.get(target) if isinstance(target, str) else target
            probe = (c.get("readinessProbe") or {}).get("httpGet")
            if not probe or number is None:
                continue
            pport = probe.get("port")
            if pport in (number, str(number)) or (isinstance(pport, str) and names.get(pport) == number):
                path = probe.get("path") or "/"
                return {"path": path if path.startswith("/") else "/" + path,
                        "interval_s": float((c["readinessProbe"]).get("periodSeconds", 10)),
                        "timeout_s": float((c["readinessProbe"]).get("timeoutSeconds", 1))}
    return None


class LbHealthChecker(BackgroundActor):
    """Google's health checkers for one cluster's GCE Ingress backends (one thread, a small check pool)."""

    thread_name = "gce-health-checks"
    pool_prefix = "gce-hc"
    restartable = False  # started by the first request; a stopped cluster's checkers stay stopped

    def __init__(self, cluster: KubeCluster, ingress: Any) -> None:
        super().__init__()
        self.cluster = cluster
        self.ingress = ingress  # the IngressController: which Ingresses GCE serves
        self._backends: dict[tuple[str, str], _Backend] = {}
        self.checks = 0  # health-check requests sent (all backends)
        self._later: list[float] = []  # when a lagged Endpoints change reaches the NEGs

    def poke(self, *, endpoints_changed: bool = False) -> None:
        """Look again now; after an Endpoints change also once kube-proxy's lag has passed (the NEG then holds
        the new endpoints, which are checked at once)."""
        if endpoints_changed:
            with self._lock:
                self._later.append(time.monotonic() + self.cluster.clock.scaled(self.cluster.kube_proxy.lag_s) + 0.002)
        self._poke.set()

    # ---- what the load balancer asks ------------------------------------------------------------
    def healthy_ports(self, namespace: str, service: str) -> list[int]:
        """Ports of the endpoints the load balancer may send to now (the backend is created on first use)."""
        self.start()
        with self._lock:
            b = self._backends.get((namespace, service))
            if b is None:
                b = self._create(namespace, service)
                if b is None:
                    return []
                self._poke.set()  # a new backend: check its endpoints now (not on every request: the loop is idle)
            live = set(self.cluster.kube_proxy.pods(namespace, service)) if self.cluster.kube_proxy.lag_s > 0 \
                else None
            return [e.port for uid, e in b.endpoints.items() if e.healthy and (live is None or uid in live)]

    def health(self, namespace: str, service: str) -> Obj | None:
        """The backend's health check and each endpoint's state (for tests and the sandbox state)."""
        with self._lock:
            b = self._backends.get((namespace, service))
            if b is None:
                return None
            return {"check": dict(b.check.__dict__),
                    "endpoints": {uid: {"port": e.port, "healthy": e.healthy, "checks": e.checks}
                                  for uid, e in b.endpoints.items()}}

    def snapshot(self) -> Obj:
        """Every backend's health check and endpoint states, ``"namespace/service"`` -> :meth:`health`."""
        with self._lock:
            keys = list(self._backends)
        return {f"{ns}/{svc}": self.health(ns, svc) for ns, svc in keys}

    # ---- backends -------------------------------------------------------------------------------
    def _create(self, namespace: str, service: str) -> _Backend | None:
        svc = self.cluster.store.get(SVCS, namespace, service)
        if svc is None:
            return None
        selector = (svc.get("spec") or {}).get("selector")
        pods = self.cluster.store.list(PODS, namespace, lambda p: match_selector_dict(
            selector, p["metadata"].get("labels")))[0] if selector else []
        probe = _probe_settings(pods, svc, None)
        base = HealthCheck(**{**NEG_DEFAULTS, **(probe or {})}, source="readinessProbe" if probe else "default")
        b = _Backend(namespace, service, base, base)
        self._backends[(namespace, service)] = b
        return b

    def _with_backend_config(self, b: _Backend) -> HealthCheck:
        svc = self.cluster.store.get(SVCS, b.namespace, b.service) or {}
        raw = (svc.get("metadata", {}).get("annotations") or {}).get(BACKEND_CONFIG)
        name = None
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            ref = json.loads(raw) if raw else {}
            ports = ref.get("ports") or {}
            name = next(iter(ports.values()), None) if ports else ref.get("default")
        t = res.BY_KEY.get(("cloud.google.com", "backendconfigs"))
        bc = self.cluster.store.get(t, b.namespace, name) if (name and t is not None) else None
        hc = ((bc or {}).get("spec") or {}).get("healthCheck") or {}
        if not hc:
            return b.base
        base = b.base
        return HealthCheck(path=hc.get("requestPath") or base.path,
                           interval_s=float(hc.get("checkIntervalSec") or base.interval_s),
                           timeout_s=float(hc.get("timeoutSec") or base.timeout_s),
                           healthy=int(hc.get("healthyThreshold") or base.healthy),
                           unhealthy=int(hc.get("unhealthyThreshold") or base.unhealthy), source="BackendConfig")

    def _gce_backends(self) -> set[tuple[str, str]]:
        out = set()
        for (ns, name) in list(self.ingress.served):
            ing = self.cluster.store.get(res.BY_KEY[("networking.k8s.io", "ingresses")], ns, name)
            if ing is None or self.ingress.controller_of(ing) != "k8s.io/ingress-gce":
                continue
            spec = ing.get("spec") or {}
            backends = [spec.get("defaultBackend") or {}] + [
                p.get("backend") or {} for r in spec.get("rules") or [] for p in (r.get("http") or {}).get("paths") or []]
            out |= {(ns, b["service"]["name"]) for b in backends if (b.get("service") or {}).get("name")}
        return out

    # ---- the loop -------------------------------------------------------------------------------
    def _round(self, now: float) -> tuple[list[Job], float]:
        clock = self.cluster.clock
        self._poke.clear()
        wanted = self._gce_backends()
        jobs: list[tuple[_Backend, str, _Endpoint]] = []
        with self._lock:
            for key in list(self._backends):
                if key not in wanted:
                    del self._backends[key]
            for key in wanted:
                b = self._backends.get(key) or self._create(*key)
                if b is None:
                    continue
                b.check = self._with_backend_config(b)
                uids = self.cluster.kube_proxy.pods(*key) if self.cluster.kube_proxy.lag_s > 0 else \
                    tuple(self._ready_uids(*key))
                fresh = False
                for uid in list(b.endpoints):
                    if uid not in uids:
                        del b.endpoints[uid]
                for uid in uids:
                    port = self._pod_port(uid)
                    if port is None:
                        continue
                    if uid not in b.endpoints:
                        b.endpoints[uid] = _Endpoint(port)
                        fresh = True
                    b.endpoints[uid].port = port
                if fresh or b.next_due <= now:
                    for uid, e in b.endpoints.items():
                        if not e.in_flight and (b.next_due <= now or e.checks == 0):
                            e.in_flight = True
                            jobs.append((b, uid, e))
                    if b.next_due <= now:
                        b.next_due = now + max(MIN_PERIOD_S, clock.scaled(b.check.interval_s))
            self._later = [t for t in self._later if t > now]
            wake = min([*(b.next_due for b in self._backends.values()), *self._later], default=now + 1.0)
        return [partial(self._check, *job) for job in jobs], min(wake, now + 1.0)

    def _ready_uids(self, namespace: str, service: str) -> list[str]:
        ep = self.cluster.store.get(res.BY_KEY[("", "endpoints")], namespace, service) or {}
        return [(a.get("targetRef") or {}).get("uid", "") for s in ep.get("subsets") or []
                for a in s.get("addresses") or [] if (a.get("targetRef") or {}).get("uid")]

    def _pod_port(self, uid: str) -> int | None:
        ctl = self.cluster.controller
        with ctl.runs_lock:
            run = ctl.runs.get(uid)
        if run is None or run.stopped or run.server is None:
            return None
        port = getattr(run.server, "port", None)
        return int(port) if port else None

    def _check(self, b: _Backend, uid: str, e: _Endpoint) -> None:
        hc = b.check
        ok = False
        try:
            conn = http.client.HTTPConnection("127.0.0.1", e.port,
                                              timeout=max(MIN_TIMEOUT_S, self.cluster.clock.scaled(hc.timeout_s)))
            try:
                conn.request("GET", hc.path, headers={"User-Agent": USER_AGENT, "Host": f"127.0.0.1:{e.port}"})
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200  # GCE HTTP health checks pass on 200 only
            finally:
                conn.close()
        except (OSError, http.client.HTTPException):
            ok = False
        with self._lock:
            self.checks += 1
            e.in_flight = False
            e.checks += 1
            if ok:
                e.ok_streak, e.fail_streak = e.ok_streak + 1, 0
                if e.ok_streak >= hc.healthy:
                    e.healthy = True
            else:
                e.ok_streak, e.fail_streak = 0, e.fail_streak + 1
                if e.fail_streak >= hc.unhealthy:
                    e.healthy = False
