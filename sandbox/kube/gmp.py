"""Google Managed Prometheus' collector in the sandbox: it scrapes what every PodMonitoring selects, unasked.

On GKE, GMP's collectors (a DaemonSet in ``gmp-system``) turn each ``PodMonitoring`` (namespaced, selects pods
of its namespace) and ``ClusterPodMonitoring`` (every namespace) of ``monitoring.googleapis.com/v1`` into
Prometheus scrape jobs and scrape every target at its endpoint's interval, whoever else is (or is not)
sending traffic. This module does the same for one :class:`~sandbox.kube.cluster.KubeCluster`, so a pod
that must not count scrapes as demand (a hold proxy) meets them in tests as it would on GKE.

What it does (``prometheus-engine`` ``pkg/operator/apis/monitoring/v1/pod_config.go``, Prometheus ``scrape/``):

* targets: pods matched by ``spec.selector`` (``matchLabels`` and ``matchExpressions``), not in phase
  ``Failed``/``Succeeded`` (GMP's ``filterRunning`` default), with a running container; an endpoint's
  ``port`` by name must be a declared container port name, a number scrapes the pod whatever it declares;
  ``path`` (default ``/metrics``), ``interval`` (default ``1m``), ``timeout`` (default: the interval, at
  most Prometheus' 10 s);
* each scrape is a real ``GET`` to the pod's server with Prometheus' headers: ``User-Agent:
  Prometheus/2.45.3``, its ``Accept`` list (OpenMetrics first), ``Accept-Encoding: gzip`` and
  ``X-Prometheus-Scrape-Timeout-Seconds``; targets are spread over the interval by a stable per-target
  offset, as Prometheus does;
* every sample gets the target labels GMP forces — ``project_id``, ``location``, ``cluster`` (when the
  sandbox knows them: :attr:`GmpCollector.external_labels`), ``namespace``, ``job`` (the PodMonitoring's
  name), ``instance`` (``<pod>:<port>``) and ``pod``/``container`` — and each scrape adds Prometheus' own
  ``up``, ``scrape_duration_seconds`` and ``scrape_samples_scraped``.

Time runs on the sandbox's scaled clock (:meth:`sandbox.core.Clock.now`, cloud seconds): a 30 s interval
is 30 cloud seconds apart in the samples' timestamps whatever ``time_scale`` is. The real wait between two
scrapes of one target is never below :data:`MIN_PERIOD_S` and a scrape's real timeout never below
:data:`MIN_TIMEOUT_S` (the suite's machines are slow; see "kept lenient" in docs/sandbox-contract.md);
``min_period_s`` lowers that floor for one collector.

In-process API (the gateway's PromQL HTTP API is meant to sit on it)::

    gmp = kube.gmp                      # one collector per cluster; Sandbox.gmp(name) finds a GKE cluster's
    gmp.targets()                       # [{"job", "namespace", "pod", "instance", "path", "interval_s",
                                        #   "health": "up"|"down"|"unknown", "last_scrape", "last_error",
                                        #   "scrapes"}]
    gmp.series({"__name__": "up", "namespace": "default"}, start=t0, end=t1)
                                        # [{"labels": {...}, "samples": [(cloud_ts, value), ...]}], oldest first
    gmp.scrapes(namespace="default", pod="p")   # how many scrapes reached a pod so far
    gmp.now()                           # the cloud time the timestamps use

``series`` matches labels exactly (``__name__`` is the metric name); each series keeps the samples of the
last ``retention_s`` cloud seconds (6 h), at most ``max_samples`` (720: 6 h at 30 s), and series whose
target went away are dropped ``retention_s`` after their last sample — bounded memory however long the
sandbox runs (a vLLM pod exposes ~200 series).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import re
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from sandbox.kube import resources as res
from sandbox.kube.actors import BackgroundActor, Job
from sandbox.kube.controllers import PODS
from sandbox.kube.selectors import match_label_selector

if TYPE_CHECKING:
    from sandbox.kube.cluster import KubeCluster

Obj = dict[str, Any]
USER_AGENT = "Prometheus/2.45.3"  # the Prometheus release GMP's collector is built from
ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
          "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")  # Prometheus 2.45 scrape.go acceptHeader
DEFAULT_INTERVAL_S = 60.0  # GMP ScrapeEndpoint.interval default "1m"
MAX_DEFAULT_TIMEOUT_S = 10.0  # Prometheus' global scrape_timeout default
MIN_PERIOD_S = 0.25  # real seconds: a scaled interval never fires faster (every test cluster is scraped)
MIN_TIMEOUT_S = 2.0  # real seconds: a scaled timeout never fails a slow-but-alive target on a loaded machine
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str | None, default: float) -> float:
    """A Prometheus duration (``30s``, ``1m30s``, ``500ms``) in seconds; ``default`` when empty."""
    if not text:
        return default
    parts = _DURATION.findall(str(text))
    if not parts or "".join(n + u for n, u in parts) != str(text):
        raise ValueError(f"invalid Prometheus duration {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


@dataclass
class Target:
    key: tuple[str, ...]
    job: str
    namespace: str
    pod: str
    uid: str
    container: str
    port_label: str
    path: str
    interval_s: float
    timeout_s: float
    labels: dict[str, str]
    next_due: float = 0.0
    in_flight: bool = False
    health: str = "unknown"
    last_scrape: float | None = None
    last_error: str = ""
    scrapes: int = 0
    # the last page and its samples: an idle engine serves the same page scrape after scrape, and parsing it
    # (prometheus_client's text parser, ~2 ms for vLLM's page) was most of the collector's CPU
    last_page: tuple[bytes, str] = (b"", "")
    last_samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


@dataclass
class _Series:
    labels: dict[str, str]
    samples: deque[tuple[float, float]] = field(default_factory=deque)


class GmpCollector(BackgroundActor):
    """Scrapes one cluster's PodMonitoring/ClusterPodMonitoring targets on a background thread."""

    thread_name = "gmp-collector"
    pool_prefix = "gmp-scrape"

    def __init__(self, cluster: KubeCluster, *, max_samples: int = 720, retention_s: float = 6 * 3600.0) -> None:
        super().__init__()
        self.cluster = cluster
        self.clock = cluster.clock
        self.max_samples = max_samples
        self.retention_s = retention_s
        self.external_labels: dict[str, str] = {}  # project_id / location / cluster, set by the sandbox
        # the real-time floor of a scrape interval; a test bed that needs denser samples on a tiny time scale
        # (a PromQL rate over a short window) may lower it for its own cluster
        self.min_period_s = MIN_PERIOD_S
        self._targets: dict[tuple[str, ...], Target] = {}
        self._series: dict[frozenset[tuple[str, str]], _Series] = {}
        self._scrapes: dict[tuple[str, str], int] = {}
        cluster.subscribe(self._on_event)

    def now(self) -> float:
        return self.clock.now()

    # ---- the in-process API ---------------------------------------------------------------------
    def targets(self) -> list[Obj]:
        with self._lock:
            return [{"job": t.job, "namespace": t.namespace, "pod": t.pod, "instance": t.labels["instance"],
                     "path": t.path, "interval_s": t.interval_s, "health": t.health, "last_scrape": t.last_scrape,
                     "last_error": t.last_error, "scrapes": t.scrapes} for t in self._targets.values()]

    def series(self, match: dict[str, str] | None = None, *, start: float | None = None,
               end: float | None = None) -> list[Obj]:
        match = dict(match or {})
        out = []
        with self._lock:
            for s in self._series.values():
                if any(s.labels.get(k) != v for k, v in match.items()):
                    continue
                samples = [(t, v) for t, v in s.samples
                           if (start is None or t >= start) and (end is None or t <= end)]
                if samples:
                    out.append({"labels": dict(s.labels), "samples": samples})
        return sorted(out, key=lambda x: sorted(x["labels"].items()))

    def scrapes(self, *, namespace: str | None = None, pod: str | None = None) -> int:
        with self._lock:
            return sum(n for (ns, p), n in self._scrapes.items()
                       if (namespace is None or ns == namespace) and (pod is None or p == pod))

    # ---- discovery ------------------------------------------------------------------------------
    def _on_event(self, etype: str, obj: Obj) -> None:
        if obj.get("kind") in ("PodMonitoring", "ClusterPodMonitoring", "Pod"):
            self._poke.set()

    def _monitorings(self) -> list[tuple[Obj, bool]]:
        out: list[tuple[Obj, bool]] = []
        for resource, cluster_scoped in (("podmonitorings", False), ("clusterpodmonitorings", True)):
            t = res.BY_KEY.get(("monitoring.googleapis.com", resource))
            if t is None:
                continue
            with contextlib.suppress(Exception):
                out += [(m, cluster_scoped) for m in self.cluster.store.list(t, None)[0]]
        return out

    def _discover(self) -> dict[tuple[str, ...], Target]:
        found: dict[tuple[str, ...], Target] = {}
        monitorings = self._monitorings()
        if not monitorings:
            return found
        pods = self.cluster.store.list(PODS, None)[0]
        for mon, cluster_scoped in monitorings:
            meta, spec = mon["metadata"], mon.get("spec") or {}
            for p in pods:
                pm = p["metadata"]
                if not cluster_scoped and pm.get("namespace") != meta.get("namespace"):
                    continue
                if (p.get("status") or {}).get("phase") in ("Failed", "Succeeded") or pm.get("deletionTimestamp"):
                    continue
                if not match_label_selector(spec.get("selector"), pm.get("labels") or {}):
                    continue
                for i, ep in enumerate(spec.get("endpoints") or []):
                    tgt = self._target(mon, cluster_scoped, i, ep, p)
                    if tgt is not None:
                        found[tgt.key] = tgt
        return found

    def _target(self, mon: Obj, cluster_scoped: bool, index: int, ep: Obj, pod: Obj) -> Target | None:
        port = ep.get("port")
        container = ""
        if isinstance(port, str) and not port.isdigit():
            for c in (pod.get("spec") or {}).get("containers") or []:
                if any(cp.get("name") == port for cp in c.get("ports") or []):
                    container = c.get("name", "")
                    break
            else:
                return None  # GMP keeps only targets whose declared port name matches
        elif port is None:
            return None
        try:
            interval = parse_duration(ep.get("interval"), DEFAULT_INTERVAL_S)
            timeout = parse_duration(ep.get("timeout"), min(interval, MAX_DEFAULT_TIMEOUT_S))
        except ValueError:
            return None
        pm = pod["metadata"]
        labels = {**self.external_labels, "namespace": pm["namespace"], "job": mon["metadata"]["name"],
                  "instance": f"{pm['name']}:{port}", "pod": pm["name"]}
        if container:
            labels["container"] = container
        scope = "cluster" if cluster_scoped else mon["metadata"].get("namespace", "")
        key = (scope, mon["metadata"]["name"], str(index), pm["namespace"], pm["name"], pm["uid"])
        return Target(key, mon["metadata"]["name"], pm["namespace"], pm["name"], pm["uid"], container, str(port),
                      ep.get("path") or "/metrics", interval, timeout, labels)

    # ---- the loop -------------------------------------------------------------------------------
    def _period(self, t: Target) -> float:
        return max(self.min_period_s, self.clock.scaled(t.interval_s))

    def _round(self, now: float) -> tuple[list[Job], float]:
        if self._resync_due(now):
            self._sync(self._discover(), now)
        with self._lock:
            due = [t for t in self._targets.values() if t.next_due <= now and not t.in_flight]
            for t in due:
                t.in_flight = True
                t.next_due = max(t.next_due + self._period(t), now)
            wake = min((t.next_due for t in self._targets.values()), default=now + 1.0)
        return [partial(self._scrape, t) for t in due], min(wake, self._resync_at)

    def _sync(self, found: dict[tuple[str, ...], Target], now: float) -> None:
        cutoff = self.now() - self.retention_s
        with self._lock:
            for key in list(self._targets):
                if key not in found:
                    del self._targets[key]
            for key, t in found.items():
                if key in self._targets:
                    continue
                # Prometheus spreads targets over the interval by a hash of the target (scrape offset)
                frac = int(hashlib.sha256(repr(key).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
                t.next_due = now + frac * self._period(t)
                self._targets[key] = t
            for k in [k for k, s in self._series.items() if not s.samples or s.samples[-1][0] < cutoff]:
                del self._series[k]

    def _scrape(self, t: Target) -> None:
        try:
            self._scrape_once(t)
        finally:
            with self._lock:
                t.in_flight = False

    def _scrape_once(self, t: Target) -> None:
        started, at = time.monotonic(), self.now()
        port = self.cluster.pod_port(t.namespace, t.pod)
        samples: list[tuple[str, dict[str, str], float]] = []
        error = ""
        if not port:
            error = "connection refused (no running container)"
        else:
            timeout = max(MIN_TIMEOUT_S, self.clock.scaled(t.timeout_s))
            conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=timeout)
            try:
                conn.request("GET", t.path, headers={
                    "User-Agent": USER_AGENT, "Accept": ACCEPT, "Accept-Encoding": "gzip",
                    "X-Prometheus-Scrape-Timeout-Seconds": f"{t.timeout_s:g}"})
                resp = conn.getresponse()
                body = resp.read()
                with self._lock:
                    self._scrapes[(t.namespace, t.pod)] = self._scrapes.get((t.namespace, t.pod), 0) + 1
                if resp.status != 200:
                    error = f"server returned HTTP status {resp.status} {resp.reason}"
                else:
                    if (resp.getheader("Content-Encoding") or "").lower() == "gzip":
                        body = gzip.decompress(body)
                    page = (body, resp.getheader("Content-Type") or "")
                    if page != t.last_page:
                        t.last_samples = _parse(body.decode("utf-8", "replace"), page[1])
                        t.last_page = page
                    samples = list(t.last_samples)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                error = f"{exc.__class__.__name__}: {exc}"
            finally:
                conn.close()
        duration = time.monotonic() - started
        up = 0.0 if error else 1.0
        samples = [] if error else samples
        samples += [("up", {}, up), ("scrape_duration_seconds", {}, duration / self.clock.time_scale),
                    ("scrape_samples_scraped", {}, float(len(samples)))]
        with self._lock:
            if t.key not in self._targets:
                return
            t.scrapes += 1
            t.last_scrape, t.health, t.last_error = at, ("down" if error else "up"), error
            for name, labels, value in samples:
                full = {**labels, **t.labels, "__name__": name}  # target labels win (honor_labels: false)
                key = frozenset(full.items())
                s = self._series.get(key)
                if s is None:
                    s = self._series[key] = _Series(full, deque(maxlen=self.max_samples))
                s.samples.append((at, value))
                while s.samples[0][0] < at - self.retention_s:  # older than the retention: gone
                    s.samples.popleft()


def _parse(text: str, content_type: str) -> list[tuple[str, dict[str, str], float]]:
    if "openmetrics" in content_type:
        from prometheus_client.openmetrics.parser import text_string_to_metric_families
    else:
        from prometheus_client.parser import text_string_to_metric_families
    return [(s.name, dict(s.labels), float(s.value)) for fam in text_string_to_metric_families(text)
            for s in fam.samples]
