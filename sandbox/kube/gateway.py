"""GKE's Gateway controller and the Inference Extension's endpoint picker, for Gateways that actually serve.

* GatewayClasses: GKE creates its own (``gke-l7-regional-external-managed``, ``gke-l7-rilb``, …, controller
  ``networking.gke.io/gateway``) when the Gateway API is enabled on the cluster (``--gateway-api=standard``,
  ``sandbox.kube.addons.install_gateway_api``); a Gateway of another or a missing class is not served.
* Gateway: a loopback HTTP server stands for the load balancer. ``status.addresses`` is ``IPAddress
  127.0.0.1`` plus the sandbox's own ``llm-fleet.dev/loopback`` address ``127.0.0.1:PORT`` (a listener's
  port is the loopback port); conditions ``Accepted`` / ``Programmed`` and per listener ``Accepted`` /
  ``Programmed`` / ``ResolvedRefs`` with ``attachedRoutes``, as GKE writes them
  (cloud.google.com/kubernetes-engine/docs/how-to/deploying-gateways, gateway-api.sigs.k8s.io/reference/spec).
* HTTPRoute: attached through ``parentRefs``; ``hostnames``, path (``PathPrefix``/``Exact``), header and
  method matches, precedence as the spec orders it (exact path, longest prefix, method, most headers).
  ``backendRefs`` weights are honoured: the sandbox deals shuffled decks of the weights (exact shares over
  each deck, random order within; Envoy and Google's load balancers pick at random with the same weights).
  Weight 0 gets nothing; all
  zero, or no backend resolvable: 500, as the spec requires. ``status.parents`` carries ``Accepted`` and
  ``ResolvedRefs`` (``BackendNotFound`` / ``InvalidKind``) under ``controllerName networking.gke.io/gateway``.
* Body-based routing (the Inference Extension's BBR, ``body-based-routing`` chart): the OpenAI ``model``
  field of a JSON body is copied into the ``X-Gateway-Model-Name`` header before routes are matched, so
  HTTPRoutes of several models share a Gateway. The sandbox always runs it (on GKE: install the chart).
* InferencePool backends: the endpoint picker (``endpointPickerRef``: its Service must exist with a Ready
  pod, else ``ResolvedRefs`` False and, with ``failureMode: FailClose``, 503) picks among the Ready pods the
  pool's ``selector`` matches on ``targetPorts``, by each pod's queue length and KV-cache use read from the
  pod's own ``/metrics`` (refreshed every 50 ms, as the EPP's metrics scraper), plus the requests it has in
  flight there — the upstream queue and kv-cache scorers (gateway-api-inference-extension
  ``pkg/epp/scheduling``).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import random
import re
import threading
import time
from typing import TYPE_CHECKING, Any

from sandbox.core import HttpError, JsonHandler, SandboxHTTPServer, now_rfc3339, serve
from sandbox.kube import resources as res
from sandbox.kube.controllers import PODS, SVCS, is_ready
from sandbox.kube.selectors import match_selector_dict

if TYPE_CHECKING:
    from sandbox.kube.cluster import KubeCluster

Obj = dict[str, Any]
GATEWAYS = res.BY_KEY[("gateway.networking.k8s.io", "gateways")]
HTTPROUTES = res.BY_KEY[("gateway.networking.k8s.io", "httproutes")]
CLASSES = res.BY_KEY[("gateway.networking.k8s.io", "gatewayclasses")]
POOLS = res.BY_KEY[("inference.networking.k8s.io", "inferencepools")]
CONTROLLER = "networking.gke.io/gateway"
GKE_CLASSES = ("gke-l7-global-external-managed", "gke-l7-regional-external-managed", "gke-l7-rilb",
               "gke-l7-gxlb", "gke-l7-cross-regional-internal-managed-mc")
LOOPBACK_TYPE = "llm-fleet.dev/loopback"
MODEL_HEADER = "X-Gateway-Model-Name"
SCRAPE_EVERY_S = 0.05
# per engine: (queue gauge, KV-cache use gauge) in its /metrics
_SIGNALS = (("vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"),
            ("sglang:num_queue_reqs", "sglang:token_usage"),
            ("tgi_queue_size", None))
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def _cond(type_: str, ok: bool, reason: str, message: str, generation: int) -> Obj:
    return {"type": type_, "status": "True" if ok else "False", "reason": reason, "message": message,
            "observedGeneration": generation, "lastTransitionTime": now_rfc3339()}


def gateway_url(gw: Obj) -> str | None:
    """Where a client reaches a Gateway: the sandbox's loopback address, else ``http://IP`` (port 80)."""
    addrs = (gw.get("status") or {}).get("addresses") or []
    for a in addrs:
        if a.get("type") == LOOPBACK_TYPE:
            return f"http://{a['value']}"
    for a in addrs:
        if a.get("type", "IPAddress") == "IPAddress":
            return f"http://{a['value']}"
    return None


class GatewayHandler(JsonHandler):
    service = "gateway"
    routes: list = []
    server: Any

    def error_body(self, err: HttpError) -> Any:
        return err.body if err.body is not None else {"error": err.message}

    def _dispatch(self) -> None:
        self.__dict__.pop("_body", None)
        try:
            self.server.state.serve(self)
        except HttpError as err:
            self.body_bytes()
            self.send_text(err.status, err.message.encode(), content_type="text/plain", headers=err.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _dispatch


class _Picker:
    """One InferencePool's endpoint picker: per-pod signals from /metrics, in-flight counts."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inflight: dict[int, int] = {}
        self.scraped: dict[int, tuple[float, float, float]] = {}  # port -> (at, queue, kv use)
        self.picks: dict[int, int] = {}

    def _signals(self, port: int) -> tuple[float, float]:
        at, queue, kv = self.scraped.get(port, (0.0, 0.0, 0.0))
        if time.monotonic() - at < SCRAPE_EVERY_S:
            return queue, kv
        # A failed or slow scrape keeps the pod's last signals, as upstream's refreshMetrics stores nothing when
        # FetchMetrics fails: a busy engine that misses one scrape is still busy, not suddenly idle.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/metrics", headers={"User-Agent": "epp-metrics-scraper"})
            resp = conn.getresponse()
            text = resp.read().decode(errors="replace") if resp.status == 200 else None
        except (OSError, http.client.HTTPException):
            text = None
        finally:
            conn.close()
        if text is not None:
            values: dict[str, float] = {}
            for line in text.splitlines():
                if (m := _SAMPLE.match(line)) and m.group(1) not in values:
                    with contextlib.suppress(ValueError):
                        values[m.group(1)] = float(m.group(3))
            queue, kv = 0.0, 0.0
            for q, k in _SIGNALS:
                if q in values:
                    queue, kv = values[q], values.get(k, 0.0) if k else 0.0
                    break
        self.scraped[port] = (time.monotonic(), queue, kv)
        return queue, kv

    def pick(self, ports: list[int]) -> int:
        scores = []
        for i, port in enumerate(sorted(ports)):
            queue, kv = self._signals(port)
            with self.lock:
                load = self.inflight.get(port, 0)
                picked = self.picks.get(port, 0)
            # queue scorer + kv-cache scorer (weights 1:1 upstream), plus what this picker has in flight there
            scores.append((queue + load + kv * 4, picked, i, port))
        best = min(scores)[3]
        with self.lock:
            self.inflight[best] = self.inflight.get(best, 0) + 1
            self.picks[best] = self.picks.get(best, 0) + 1
        return best

    def done(self, port: int) -> None:
        with self.lock:
            self.inflight[port] = max(0, self.inflight.get(port, 0) - 1)


class _Served:
    """One Gateway's address, its route choices and its pickers."""

    def __init__(self, ctl: GatewayController, ns: str, name: str) -> None:
        self.ctl, self.ns, self.name = ctl, ns, name
        self.http: SandboxHTTPServer = serve(GatewayHandler, state=self, faults=ctl.cluster.faults)
        self.lock = threading.Lock()
        # per route rule: (weights, the cards left of the current deck)
        self.decks: dict[tuple[str, str, int], tuple[list[int], list[int]]] = {}
        self.rng = random.Random(f"{ns}/{name}")  # seeded: one client's request sequence splits the same each run

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.http.stop()

    def _choose(self, key: tuple[str, str, int], refs: list[Obj]) -> Obj | None:
        """A backend by weight: each deck of (weights ÷ their gcd) cards is dealt in a random order, so the
        shares are exact over every deck and no backend's turn has a period a client's own pattern could
        line up with (smooth round-robin gave a 5 % backend exactly every 20th request: with two clients
        sending every 5th prompt long, its every request could be short). Envoy and Google's load balancers
        pick each request at random with the weights; a deck past 1,000 cards does that too."""
        weights = [max(0, int(r.get("weight", 1))) for r in refs]
        if sum(weights) == 0:
            return None
        with self.lock:
            have, cards = self.decks.get(key, ([], []))
            if have != weights or not cards:
                g = math.gcd(*weights)
                if sum(weights) // g > 1000:
                    return refs[self.rng.choices(range(len(refs)), weights=weights)[0]]
                cards = [i for i, w in enumerate(weights) for _ in range(w // g)]
                self.rng.shuffle(cards)
                self.decks[key] = (weights, cards)
            return refs[cards.pop()]

    def serve(self, h: GatewayHandler) -> None:
        from sandbox.routing import proxy

        cluster = self.ctl.cluster
        body = h.body_bytes()
        extra: dict[str, str] = {}
        if body and "json" in (h.headers.get("Content-Type") or "json"):
            with contextlib.suppress(ValueError, AttributeError):
                model = json.loads(body).get("model")
                if isinstance(model, str):
                    extra[MODEL_HEADER] = model
        headers = {k.lower(): v for k, v in h.headers.items()} | {k.lower(): v for k, v in extra.items()}
        host = (h.headers.get("Host") or "").split(":")[0]
        hit = self.ctl.match(self.ns, self.name, host=host, path=h.url.path, method=h.command, headers=headers)
        if hit is None:
            raise HttpError(404, "fault filter abort")
        route_key, refs = hit
        ref = self._choose(route_key, refs)
        if ref is None:
            raise HttpError(500, "no healthy upstream")
        ns = ref.get("namespace") or route_key[0]
        kind = ref.get("kind", "Service")
        path = h.url.path + (f"?{h.url.query}" if h.url.query else "")
        if kind == "Service" and ref.get("group", "") == "":
            ports = cluster.service_backends(ns, ref["name"])
            proxy(h, ports, path, service=ref["name"], headers=extra)
            return
        pool = cluster.store.get(POOLS, ns, ref["name"])
        if pool is None:
            raise HttpError(500, "no healthy upstream")
        ok, _ = self.ctl.picker_ready(ns, pool)
        if not ok and ((pool.get("spec") or {}).get("endpointPickerRef") or {}).get("failureMode",
                                                                                 "FailClose") == "FailClose":
            raise HttpError(503, "upstream connect error or disconnect/reset before headers. reset reason: "
                                 "ext_proc failure (endpoint picker unavailable)")
        ports = self.ctl.pool_ports(ns, pool)
        if not ports:
            raise HttpError(503, "no healthy upstream")
        picker = self.ctl.picker(ns, ref["name"])
        port = picker.pick(ports)
        try:
            proxy(h, [port], path, service=ref["name"], headers=extra)
        finally:
            picker.done(port)


def _path_ok(match: Obj, path: str) -> tuple[bool, int, int]:
    pm = match.get("path") or {"type": "PathPrefix", "value": "/"}
    want, kind = pm.get("value", "/"), pm.get("type", "PathPrefix")
    if kind == "Exact":
        return path == want, 2, len(want)
    if kind == "RegularExpression":
        return bool(re.fullmatch(want, path)), 0, len(want)
    base = want.rstrip("/")
    return (want == "/" or path == base or path.startswith(base + "/")), 1, len(want)


def _route_matches(route: Obj, host: str) -> bool:
    names = (route.get("spec") or {}).get("hostnames") or []
    return not names or any(n == host or (n.startswith("*.") and host.endswith(n[1:])) for n in names)


class GatewayController:
    """Subscribes to the cluster; one served address per Gateway of a GKE class, and the routes' statuses."""

    def __init__(self, cluster: KubeCluster) -> None:
        self.cluster = cluster
        self.served: dict[tuple[str, str], _Served] = {}
        self.pickers: dict[tuple[str, str], _Picker] = {}
        self._lock = threading.Lock()
        cluster.subscribe(self.on_event)

    # ---- lookups ---------------------------------------------------------------------------------
    def _installed(self) -> bool:
        return "gateways.gateway.networking.k8s.io" in self.cluster.installed_crds()

    def picker(self, ns: str, name: str) -> _Picker:
        with self._lock:
            return self.pickers.setdefault((ns, name), _Picker())

    def pool_ports(self, ns: str, pool: Obj) -> list[int]:
        spec = pool.get("spec") or {}
        return self.cluster.ready_pod_ports(ns, (spec.get("selector") or {}).get("matchLabels") or {})

    def picker_ready(self, ns: str, pool: Obj) -> tuple[bool, str]:
        ref = (pool.get("spec") or {}).get("endpointPickerRef") or {}
        svc = self.cluster.store.get(SVCS, ns, ref.get("name", ""))
        if svc is None:
            return False, f'endpoint picker Service "{ref.get("name")}" not found'
        sel = (svc.get("spec") or {}).get("selector") or {}
        pods, _ = self.cluster.store.list(PODS, ns, lambda p: bool(sel) and match_selector_dict(
            sel, p["metadata"].get("labels")) and is_ready(p))
        return (True, "") if pods else (False, f'endpoint picker Service "{ref.get("name")}" has no ready pod')

    def attached(self, ns: str, name: str) -> list[Obj]:
        if not self._installed():
            return []
        routes, _ = self.cluster.store.list(HTTPROUTES, None)
        return [r for r in routes if any(
            p.get("name") == name and (p.get("namespace") or r["metadata"]["namespace"]) == ns
            and p.get("kind", "Gateway") == "Gateway" for p in (r.get("spec") or {}).get("parentRefs") or [])]

    def match(self, ns: str, name: str, *, host: str, path: str, method: str, headers: dict[str, str]
              ) -> tuple[tuple[str, str, int], list[Obj]] | None:
        best: tuple[tuple, tuple[str, str, int], list[Obj]] | None = None
        for route in self.attached(ns, name):
            if not _route_matches(route, host):
                continue
            rns, rname = route["metadata"]["namespace"], route["metadata"]["name"]
            for i, rule in enumerate((route.get("spec") or {}).get("rules") or []):
                for m in rule.get("matches") or [{}]:
                    ok, exact, plen = _path_ok(m, path)
                    if not ok or (m.get("method") and m["method"] != method):
                        continue
                    hdrs = m.get("headers") or []
                    if any(headers.get(hm["name"].lower()) != hm["value"] for hm in hdrs
                           if hm.get("type", "Exact") == "Exact"):
                        continue
                    rank = (exact, plen, bool(m.get("method")), len(hdrs),
                            -_ts(route), rns, rname)
                    if best is None or rank[:5] > best[0][:5]:
                        best = (rank, (rns, rname, i), list(rule.get("backendRefs") or []))
        return None if best is None else (best[1], best[2])

    # ---- reconcile ---------------------------------------------------------------------------------
    def on_event(self, etype: str, obj: Obj) -> None:
        kind = obj.get("kind")
        if kind == "GatewayClass" and etype != "DELETED" and (obj.get("spec") or {}).get(
                "controllerName") == CONTROLLER:  # GKE's controller accepts its own classes
            gen = int(obj["metadata"].get("generation", 1))
            self._set_status(CLASSES, obj, {"conditions": [_cond("Accepted", True, "Accepted", "", gen)]})
        if kind == "Gateway":
            self.sync(obj["metadata"]["namespace"], obj["metadata"]["name"])
        elif kind in ("GatewayClass", "HTTPRoute", "InferencePool", "Service", "CustomResourceDefinition", "Pod"):
            if not self._installed():
                return
            for gw in self.cluster.store.list(GATEWAYS, None)[0]:
                self.sync(gw["metadata"]["namespace"], gw["metadata"]["name"])

    def _class_ok(self, gw: Obj) -> bool:
        cls = self.cluster.store.get(CLASSES, "", (gw.get("spec") or {}).get("gatewayClassName", ""))
        return cls is not None and (cls.get("spec") or {}).get("controllerName") == CONTROLLER

    def sync(self, ns: str, name: str) -> None:
        gw = self.cluster.store.get(GATEWAYS, ns, name) if self._installed() else None
        key = (ns, name)
        with self._lock:
            served = self.served.get(key)
            if gw is None or not self._class_ok(gw):
                if served is not None:
                    served.stop()
                    del self.served[key]
                return
            if served is None:
                served = self.served[key] = _Served(self, ns, name)
        routes = self.attached(ns, name)
        self._gateway_status(gw, served, len(routes))
        for route in routes:
            self._route_status(route, gw)

    def _gateway_status(self, gw: Obj, served: _Served, attached: int) -> None:
        gen = int(gw["metadata"].get("generation", 1))
        listeners = []
        for lst in (gw.get("spec") or {}).get("listeners") or []:
            listeners.append({"name": lst["name"], "attachedRoutes": attached,
                              "supportedKinds": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute"}],
                              "conditions": [_cond("Accepted", True, "Accepted", "", gen),
                                             _cond("Programmed", True, "Programmed", "", gen),
                                             _cond("ResolvedRefs", True, "ResolvedRefs", "", gen)]})
        want = {"addresses": [{"type": "IPAddress", "value": "127.0.0.1"},
                              {"type": LOOPBACK_TYPE, "value": f"127.0.0.1:{served.http.port}"}],
                "conditions": [_cond("Accepted", True, "Accepted", "", gen),
                               _cond("Programmed", True, "Programmed", "", gen)],
                "listeners": listeners}
        self._set_status(GATEWAYS, gw, want)

    def _route_status(self, route: Obj, gw: Obj) -> None:
        ns = route["metadata"]["namespace"]
        gen = int(route["metadata"].get("generation", 1))
        problem = ""
        for rule in (route.get("spec") or {}).get("rules") or []:
            for ref in rule.get("backendRefs") or []:
                rns = ref.get("namespace") or ns
                kind, group = ref.get("kind", "Service"), ref.get("group", "")
                if (group, kind) == ("", "Service"):
                    found = self.cluster.store.get(SVCS, rns, ref["name"]) is not None
                elif (group, kind) == ("inference.networking.k8s.io", "InferencePool"):
                    pool = self.cluster.store.get(POOLS, rns, ref["name"])
                    found = pool is not None
                    if pool is not None:
                        self._pool_status(pool, gw)
                else:
                    problem = problem or f"InvalidKind: {group}/{kind} is not a supported backend"
                    continue
                if not found:
                    problem = problem or f'BackendNotFound: {kind} "{rns}/{ref["name"]}" not found'
        reason, _, msg = problem.partition(": ")
        parent = {"parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                "name": gw["metadata"]["name"], "namespace": gw["metadata"]["namespace"]},
                  "controllerName": CONTROLLER,
                  "conditions": [_cond("Accepted", True, "Accepted", "", gen),
                                 _cond("ResolvedRefs", not problem, reason or "ResolvedRefs", msg, gen)]}
        self._set_status(HTTPROUTES, route, {"parents": [parent]})

    def _pool_status(self, pool: Obj, gw: Obj) -> None:
        gen = int(pool["metadata"].get("generation", 1))
        ok, why = self.picker_ready(pool["metadata"]["namespace"], pool)
        parent = {"parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                "name": gw["metadata"]["name"], "namespace": gw["metadata"]["namespace"]},
                  "controllerName": CONTROLLER,
                  "conditions": [_cond("Accepted", True, "Accepted", "", gen),
                                 _cond("ResolvedRefs", ok, "ResolvedRefs" if ok else "InvalidExtensionRef",
                                       why, gen)]}
        self._set_status(POOLS, pool, {"parents": [parent]})

    def _set_status(self, t: res.RType, obj: Obj, want: Obj) -> None:
        def strip(s: Any) -> Any:  # compare without timestamps
            return re.sub(r'"lastTransitionTime": "[^"]*"', "", json.dumps(s, sort_keys=True))

        def fn(o: Obj) -> Obj | None:
            if strip(o.get("status") or {}) == strip(want):
                return None
            o["status"] = want
            return o

        with contextlib.suppress(Exception):
            self.cluster.store.mutate(t, obj["metadata"].get("namespace", ""), obj["metadata"]["name"], fn)

    def url(self, ns: str, name: str) -> str | None:
        served = self.served.get((ns, name))
        return f"http://127.0.0.1:{served.http.port}" if served is not None else None

    def stop(self) -> None:
        with self._lock:
            for s in self.served.values():
                s.stop()
            self.served.clear()


def _ts(route: Obj) -> float:
    with contextlib.suppress(ValueError):
        return time.mktime(time.strptime(route["metadata"].get("creationTimestamp", ""), "%Y-%m-%dT%H:%M:%SZ"))
    return 0.0
