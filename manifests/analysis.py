"""Canary analysis as values: PromQL queries per engine (overridable in ``release.analysis``), rendered for
one color and window, and a pure judge from query results to a verdict with the figures.

Like an Argo Rollouts AnalysisTemplate over Prometheus: each query is run for the candidate's pods and for
the live color's over the same window; a query fails on an absolute bound (``max``/``min``) or on the
candidate ÷ live ratio (``max_ratio``/``min_ratio``). Too few requests in the window to judge
(``min_requests``) makes the step inconclusive (held longer), never passed.

Metric names are the engines' own (vLLM ``vllm/v1/metrics/loggers.py`` and the
prometheus-fastapi-instrumentator its OpenAI server mounts; TGI's router; SGLang's collector).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from manifests.spec import AnalysisQuery, DeploymentSpec

# placeholders: {selector} = the color's pods, {window} = the step's hold (a PromQL duration)


def _delta(series: str) -> str:
    """How much a counter grew over the window: its value now minus its value where the window starts
    (``offset``), a series absent then counting from 0. Not ``increase()``: that takes a series' first sample
    as its baseline, so a counter born inside the window — the instrumentator creates a pod's
    ``status="5xx"`` series at its first error — never counts the errors it was born with (a 5 % step with
    one or two long prompts per candidate pod judged 0 errors and passed). (A pod restarting inside the
    window would undercount; a canary's candidate pods are not expected to.)"""
    return f"((sum({series}) or vector(0)) - (sum({series} offset {{window}}) or vector(0)))"


_HTTP = 'http_requests_total{{{selector},handler=~"/v1/.*"}}'
_HTTP_5XX = 'http_requests_total{{{selector},handler=~"/v1/.*",status="5xx"}}'
_VLLM = [
    AnalysisQuery(name="requests", query=_delta(_HTTP)),
    AnalysisQuery(name="error_rate", max=0.01, min_requests=20, query=f"{_delta(_HTTP_5XX)} / {_delta(_HTTP)}"),
    AnalysisQuery(name="p95_latency_s", max_ratio=1.5, min_requests=20,
                  query="histogram_quantile(0.95, sum by (le) "
                        "(rate(vllm:e2e_request_latency_seconds_bucket{{{selector}}}[{window}])))"),
    AnalysisQuery(name="p99_latency_s", max_ratio=2.0, min_requests=20,
                  query="histogram_quantile(0.99, sum by (le) "
                        "(rate(vllm:e2e_request_latency_seconds_bucket{{{selector}}}[{window}])))"),
    AnalysisQuery(name="ttft_p95_s", max_ratio=1.5, min_requests=20,
                  query="histogram_quantile(0.95, sum by (le) "
                        "(rate(vllm:time_to_first_token_seconds_bucket{{{selector}}}[{window}])))"),
    AnalysisQuery(name="tokens_per_s", min_ratio=0.67, min_requests=20,
                  query="sum(rate(vllm:generation_tokens_total{{{selector}}}[{window}])) / "
                        "sum(rate(vllm:e2e_request_latency_seconds_sum{{{selector}}}[{window}]))"),
]
_TGI = [
    AnalysisQuery(name="requests", query="sum(increase(tgi_request_count{{{selector}}}[{window}]))"),
    AnalysisQuery(name="error_rate", max=0.01, min_requests=20,
                  query="(sum(rate(tgi_request_failure{{{selector}}}[{window}])) or vector(0)) / "
                        "sum(rate(tgi_request_count{{{selector}}}[{window}]))"),
    AnalysisQuery(name="p95_latency_s", max_ratio=1.5, min_requests=20,
                  query="histogram_quantile(0.95, sum by (le) (rate(tgi_request_duration_bucket{{{selector}}}[{window}])))"),
]
_SGLANG = [
    AnalysisQuery(name="requests", query="sum(increase(sglang:num_requests_total{{{selector}}}[{window}]))"),
    AnalysisQuery(name="p95_latency_s", max_ratio=1.5, min_requests=20,
                  query="histogram_quantile(0.95, sum by (le) "
                        "(rate(sglang:e2e_request_latency_seconds_bucket{{{selector}}}[{window}])))"),
    AnalysisQuery(name="ttft_p95_s", max_ratio=1.5, min_requests=20,
                  query="histogram_quantile(0.95, sum by (le) "
                        "(rate(sglang:time_to_first_token_seconds_bucket{{{selector}}}[{window}])))"),
]
DEFAULTS = {"vllm": _VLLM, "tgi": _TGI, "sglang": _SGLANG}


def queries(spec: DeploymentSpec) -> list[AnalysisQuery]:
    """The spec's analysis, else its engine's defaults; a ``requests`` query is always there."""
    chosen = list(spec.release.analysis) if spec.release.analysis is not None else list(DEFAULTS[spec.engine.kind])
    if not any(q.name == "requests" for q in chosen):
        chosen.insert(0, DEFAULTS[spec.engine.kind][0])
    return chosen


def promql_duration(seconds: float) -> str:
    return f"{max(1, round(seconds))}s"


def pod_selector(namespace: str, deployment: str) -> str:
    """The pods of one Deployment as GMP labels them (``pod`` = ``<deployment>-<rs hash>-<suffix>``)."""
    return f'namespace="{namespace}",pod=~"{deployment}-[a-z0-9]+-[a-z0-9]+"'


def render(query: AnalysisQuery, *, selector: str, window_s: float) -> str:
    return query.query.format(selector=selector, window=promql_duration(window_s))


@dataclass(frozen=True)
class Figure:
    name: str
    candidate: float | None
    live: float | None
    ok: bool
    why: str = ""

    def text(self) -> str:
        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.3g}"
        return f"{self.name} {fmt(self.candidate)} (live {fmt(self.live)})" + (f": {self.why}" if self.why else "")


@dataclass(frozen=True)
class Verdict:
    passed: bool
    inconclusive: bool
    figures: tuple[Figure, ...]

    @property
    def failed(self) -> bool:
        return not self.passed and not self.inconclusive

    def summary(self) -> str:
        state = "passed" if self.passed else "inconclusive" if self.inconclusive else "failed"
        bad = [f.text() for f in self.figures if not f.ok] or [f.text() for f in self.figures]
        return f"analysis {state}: " + "; ".join(bad)


def _num(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) or math.isinf(v) else float(v)


def judge(qs: list[AnalysisQuery], candidate: dict[str, float | None], live: dict[str, float | None]) -> Verdict:
    """Query results (name -> value; None or NaN = no data) -> the verdict, with one figure per query."""
    figures: list[Figure] = []
    inconclusive = False
    requests = _num(candidate.get("requests"))
    for q in qs:
        c, lv = _num(candidate.get(q.name)), _num(live.get(q.name))
        if q.min_requests is not None and (requests is None or requests < q.min_requests):
            inconclusive = True
            figures.append(Figure(q.name, c, lv, True, f"only {requests or 0:.0f} requests (< {q.min_requests})"))
            continue
        if c is None:
            if q.max is not None or q.min is not None or q.max_ratio or q.min_ratio:
                inconclusive = True
                figures.append(Figure(q.name, c, lv, True, "no data"))
            else:
                figures.append(Figure(q.name, c, lv, True))
            continue
        why = ""
        if q.max is not None and c > q.max:
            why = f"{c:.3g} > max {q.max:g}"
        elif q.min is not None and c < q.min:
            why = f"{c:.3g} < min {q.min:g}"
        elif lv is not None and lv > 0 and q.max_ratio is not None and c / lv > q.max_ratio:
            why = f"{c / lv:.2f}x live > {q.max_ratio:g}x"
        elif lv is not None and lv > 0 and q.min_ratio is not None and c / lv < q.min_ratio:
            why = f"{c / lv:.2f}x live < {q.min_ratio:g}x"
        figures.append(Figure(q.name, c, lv, not why, why))
    failed = any(not f.ok for f in figures)
    return Verdict(passed=not failed and not inconclusive, inconclusive=inconclusive and not failed,
                   figures=tuple(figures))
