"""Canary analysis as values: default queries per engine rendered for a color, the PromQL subset the sandbox's
GMP query API evaluates, and the pure judge on recorded query results."""

from __future__ import annotations

import math

import pytest

from manifests import analysis
from manifests.spec import AnalysisQuery, parse_spec
from sandbox.kube import promql

SPEC = {"name": "mistral", "model": "mistralai/Mistral-7B-Instruct-v0.3", "engine": "vllm",
        "cluster": {"project": "llm-fleet-demo", "location": "us-central1"}, "accelerator": "nvidia-l4",
        "expose": {"gateway": {}}, "release": {"strategy": "canary"}}


def _series(rows):
    """name -> [(labels, samples)] from (name, labels, [(t, v)])."""
    def src(name):
        return [({"__name__": n, **labels}, samples) for n, labels, samples in rows if n == name]
    return src


def test_default_queries_render_for_one_color_and_window():
    spec = parse_spec(SPEC)
    qs = analysis.queries(spec)
    assert [q.name for q in qs][:3] == ["requests", "error_rate", "p95_latency_s"]
    sel = analysis.pod_selector("default", "mistral-green")
    text = analysis.render(qs[1], selector=sel, window_s=60)
    assert text.startswith('((sum(http_requests_total{namespace="default",pod=~"mistral-green-[a-z0-9]+-')
    assert "offset 60s" in text
    for q in qs:
        promql.parse(analysis.render(q, selector=sel, window_s=30))  # every default parses


def test_overridden_analysis_keeps_a_requests_query():
    spec = parse_spec(SPEC | {"release": {"strategy": "canary", "analysis": [
        {"name": "p50", "query": "histogram_quantile(0.5, sum by (le) (rate(x_bucket{{{selector}}}[{window}])))",
         "max": 2.0}]}})
    assert [q.name for q in analysis.queries(spec)] == ["requests", "p50"]


def test_rate_sum_by_and_histogram_quantile():
    pods = {"a": [(0, 0), (15, 30), (30, 60), (45, 90), (60, 120)], "b": [(0, 10), (15, 10), (30, 10), (45, 10),
                                                                          (60, 10)]}
    rows = [("reqs_total", {"pod": p}, s) for p, s in pods.items()]
    # 100 requests: 50 under 0.5 s, 40 in (0.5, 1], 10 in (1, 2.5]
    for le, n in (("0.5", 50), ("1.0", 90), ("2.5", 100), ("+Inf", 100)):
        rows.append(("lat_bucket", {"pod": "a", "le": le}, [(1, 0), (60, n)]))
    src = _series(rows)
    rate = promql.query('rate(reqs_total{pod=~"a|b"}[60s])', src, 60)
    assert rate[(("pod", "a"),)] == pytest.approx(2.0)
    assert rate[(("pod", "b"),)] == 0
    assert promql.scalar_of(promql.query("sum(rate(reqs_total[1m]))", src, 60)) == pytest.approx(2.0)
    assert promql.scalar_of(promql.query('sum(increase(reqs_total{pod="a"}[1m]))', src, 60)) == pytest.approx(120)
    p95 = promql.scalar_of(promql.query("histogram_quantile(0.95, sum by (le) (rate(lat_bucket[1m])))", src, 60))
    assert p95 == pytest.approx(1.0 + 1.5 * 0.5)  # rank 95 falls halfway into (1, 2.5]
    # a counter reset counts from zero again: in (0, 60] 110 -> 5 -> 15 is +15 over 40 s, extrapolated to 60 s
    src2 = _series([("c_total", {}, [(0, 100), (20, 110), (40, 5), (60, 15)])])
    assert promql.scalar_of(promql.query("increase(c_total[60s])", src2, 60)) == pytest.approx(15 * 60 / 40)
    assert math.isnan(promql.scalar_of(promql.query("sum(rate(c_total[1m])) / sum(rate(none_total[1m]))",
                                                    src2, 60)) or math.nan)


def test_unsupported_promql_is_a_bad_data_error():
    with pytest.raises(promql.PromQLError, match="unknown function"):
        promql.parse("irate(x[1m])")
    with pytest.raises(promql.PromQLError, match="range vector"):
        promql.query("x[1m]", _series([]), 0)
    out = promql.api_query("sum(x)", _series([("x", {"a": "1"}, [(0, 2.0)])]), 10)
    assert out == {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [10, "2"]}]}}


QS = [AnalysisQuery(name="requests", query="r"),
      AnalysisQuery(name="error_rate", query="e", max=0.01, min_requests=20),
      AnalysisQuery(name="p95_latency_s", query="p", max_ratio=1.5, min_requests=20),
      AnalysisQuery(name="tokens_per_s", query="t", min_ratio=0.67, min_requests=20)]


def test_judge_passes_a_candidate_like_the_live_color():
    v = analysis.judge(QS, {"requests": 60, "error_rate": 0.0, "p95_latency_s": 1.1, "tokens_per_s": 30},
                       {"requests": 1100, "error_rate": 0.0, "p95_latency_s": 1.0, "tokens_per_s": 31})
    assert v.passed and not v.failed


def test_judge_fails_on_latency_ratio_with_the_figures():
    v = analysis.judge(QS, {"requests": 60, "error_rate": 0.0, "p95_latency_s": 2.4, "tokens_per_s": 30},
                       {"requests": 1100, "error_rate": 0.0, "p95_latency_s": 1.0, "tokens_per_s": 31})
    assert v.failed
    assert "p95_latency_s 2.4 (live 1): 2.40x live > 1.5x" in v.summary()


def test_judge_fails_on_errors_and_on_nan_free_data_only():
    v = analysis.judge(QS, {"requests": 50, "error_rate": 0.2, "p95_latency_s": math.nan, "tokens_per_s": 30},
                       {"requests": 900, "error_rate": 0.0, "p95_latency_s": 1.0, "tokens_per_s": 30})
    assert v.failed and "error_rate 0.2" in v.summary()


def test_judge_is_inconclusive_with_too_few_requests():
    v = analysis.judge(QS, {"requests": 3, "error_rate": 0.0, "p95_latency_s": 9.0},
                       {"requests": 900, "p95_latency_s": 1.0})
    assert v.inconclusive and not v.passed and not v.failed


def test_the_errors_a_pods_5xx_series_is_born_with_are_counted():
    """The instrumentator creates a pod's status="5xx" series at its first error, so its first sample is
    already 1: increase()/rate() take that sample as the baseline and count 0 errors (the old default judged a
    5 % step whose candidate pod met one long prompt as error-free). The default counts the counter's growth
    since the window's start, a series absent then counting from 0."""
    spec = parse_spec(SPEC)
    sel = analysis.pod_selector("default", "mistral-green")
    pod = {"namespace": "default", "pod": "mistral-green-5d8f9-abcde", "handler": "/v1/completions"}
    src = _series([("http_requests_total", pod | {"status": "2xx"}, [(0, 5), (20, 10), (40, 17), (60, 24)]),
                   ("http_requests_total", pod | {"status": "5xx"}, [(40, 1), (60, 1)])])
    qs = {q.name: q for q in analysis.queries(spec)}
    value = {n: promql.scalar_of(promql.query(analysis.render(q, selector=sel, window_s=60), src, 60.5))
             for n, q in qs.items() if n in ("requests", "error_rate")}
    assert value == {"requests": 20, "error_rate": 1 / 20}
    old = ('(sum(rate(http_requests_total{{{selector},handler=~"/v1/.*",status="5xx"}}[{window}])) or vector(0)) '
           '/ sum(rate(http_requests_total{{{selector},handler=~"/v1/.*"}}[{window}]))')
    assert promql.scalar_of(promql.query(old.format(selector=sel, window="60s"), src, 60.5)) == 0.0  # the blind spot
    verdict = analysis.judge(list(qs.values()), {"requests": 20, "error_rate": 1 / 20}, {"requests": 380})
    assert verdict.failed and "error_rate 0.05" in verdict.summary()


def test_offset_reads_a_counter_where_the_window_starts():
    src = _series([("c_total", {}, [(0, 3), (30, 7), (60, 12)])])
    assert promql.scalar_of(promql.query("sum(c_total offset 30s)", src, 60)) == 7
    assert promql.scalar_of(promql.query("sum(c_total) - sum(c_total offset 1m)", src, 60)) == 9
    assert promql.scalar_of(promql.query("sum(increase(c_total[70s] offset 5s))", src, 65)) is not None
    with pytest.raises(promql.PromQLError, match="duration after"):
        promql.parse("c_total offset x")


def test_or_vector_zero_makes_a_counter_that_never_moved_zero():
    src = _series([("req_total", {"status": "2xx"}, [(1, 0), (60, 60)])])
    q = '(sum(rate(req_total{status="5xx"}[1m])) or vector(0)) / sum(rate(req_total[1m]))'
    assert promql.scalar_of(promql.query(q, src, 60)) == 0.0


def test_canary_plan_steps_and_decisions():
    from manifests import canary

    spec = parse_spec(SPEC)
    assert [(s.weight, s.hold_s) for s in canary.plan(spec)] == [(5, 300), (25, 300), (50, 300), (100, 300)]
    bg = parse_spec(SPEC | {"release": {"strategy": "blue-green"}})
    assert [s.weight for s in canary.plan(bg)] == [100]  # blue-green on a Gateway: one step
    assert canary.plan_steps(("capacity", "bring_up", "preview", "pre_analysis", "switch", "post_analysis", "record",
                              "scale_down")) == ("capacity", "bring_up", "preview", "gateway", "canary", "switch",
                                                 "record", "scale_down")
    ok = analysis.judge(QS, {"requests": 60, "error_rate": 0.0, "p95_latency_s": 1.0, "tokens_per_s": 30},
                        {"p95_latency_s": 1.0, "tokens_per_s": 30})
    few = analysis.judge(QS, {"requests": 2}, {})
    assert canary.decide(ok, smoke_ok=True, extensions=0) == "advance"
    assert canary.decide(ok, smoke_ok=False, extensions=0) == "abort"  # smoke prompts still count
    assert canary.decide(few, smoke_ok=True, extensions=0) == "hold"
    assert canary.decide(few, smoke_ok=True, extensions=canary.MAX_EXTENSIONS) == "abort"  # no new requests
    assert canary.decide(few, smoke_ok=True, extensions=0, windows=canary.MAX_WINDOWS - 1) == "hold"  # a trickle
    assert canary.decide(few, smoke_ok=True, extensions=0, windows=canary.MAX_WINDOWS) == "abort"


def test_with_weights_keeps_the_resource_version_for_the_checked_update():
    from manifests import canary, gateway

    spec = parse_spec(SPEC)
    route = gateway.http_route(spec, gateway.weights("blue", 0))
    route["metadata"]["resourceVersion"] = "42"
    moved = canary.with_weights(route, spec, gateway.weights("blue", 25))
    assert canary.route_weights(moved) == {"mistral-blue": 75, "mistral-green": 25}
    assert moved["metadata"]["resourceVersion"] == "42" and canary.route_weights(route)["mistral-green"] == 0
    assert canary.candidate_share(moved, spec, "green") == 25
