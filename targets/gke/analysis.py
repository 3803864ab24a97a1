"""Is the candidate good enough? The pre-promotion analysis (through the preview Service, beside the
live color) and the post-promotion analysis (through the live Service, in batches over a window).

The figures are judged by ``manifests.release.judge`` (pure); a failure raises ``AnalysisFailed``
with the figures, which the rollback quotes in the Slack thread.
"""

from __future__ import annotations

import math
import time
from typing import Any

from manifests import names
from manifests.errors import DeployError
from manifests.release import baseline_text, judge
from manifests.spec import AnalysisSpec
from targets.gke.release_steps import Release
from targets.gke.serving import scaled, smoke, smoke_rows
from tasks import health


class AnalysisFailed(DeployError):
    """The candidate answered, but not well enough for the release policy."""

    def __init__(self, problem: str, fix: str, *, figures: dict[str, Any]) -> None:
        super().__init__(problem, fix, reason="AnalysisFailed")
        self.figures = figures


def _p95_limit(policy: AnalysisSpec) -> float:
    # Latency limits are cloud seconds; on the sandbox's scaled clock a floor absorbs HTTP overhead.
    return max(scaled(policy.max_p95_latency_s), min(policy.max_p95_latency_s, 1.0))


def _noise_s() -> float:
    """Latency differences below this are noise, not a slower model (sandbox: real HTTP overhead)."""
    return 0.1 if scaled(1.0) < 1.0 else 0.02


def _analysis(r: Release, service: str, policy: AnalysisSpec, requests: int) -> dict[str, Any]:
    spec = r.spec
    return health.analyze(kubeconfig=r.kubeconfig, namespace=spec.namespace, service=service, engine=spec.engine.kind,
                          model_id=spec.model.id, prompts=spec.release.smoke_prompts,
                          max_tokens=spec.release.smoke_max_tokens, requests=requests,
                          concurrency=policy.concurrency, expect=spec.release.expect)


def step_pre_analysis(r: Release) -> str:
    spec, policy = r.spec, r.spec.release.pre_promotion
    try:
        results = smoke(spec, kubeconfig=r.kubeconfig, service=names.preview_service(spec))
    except DeployError as exc:
        raise AnalysisFailed(f"pre-promotion smoke test of {r.candidate}: {exc.problem}", exc.fix,
                             figures={}) from None
    r.figures["smoke"] = smoke_rows(results)
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        # Candidate and live measured side by side: same moment, same load on the cluster.
        cand = pool.submit(contextvars.copy_context().run, _analysis, r, names.preview_service(spec), policy,
                           policy.requests)
        base = (pool.submit(contextvars.copy_context().run, _analysis, r, names.service(spec), policy,
                            policy.requests)
                if policy.max_latency_ratio and not r.live_stopped else None)
        figures, baseline = cand.result(), base.result() if base else None
    r.figures["pre"], r.figures["baseline"] = figures, baseline
    verdict = judge(figures, max_error_rate=policy.max_error_rate, max_p95_s=_p95_limit(policy),
                    min_tokens_per_s=policy.min_tokens_per_s, baseline=baseline,
                    max_latency_ratio=policy.max_latency_ratio, noise_s=_noise_s())
    if not verdict.ok:
        raise AnalysisFailed(f"pre-promotion analysis of {r.candidate}: {verdict.reason}",
                             "no traffic moved; fix the revision or the engine settings and release again",
                             figures=figures)
    r.times["analysis_passed"] = time.time()
    return verdict.reason + (f"; {baseline_text(baseline)}" if baseline else "")


def step_post_analysis(r: Release) -> str:
    spec, policy = r.spec, r.spec.release.post_promotion
    batches = max(1, int(policy.window.total_seconds() // max(policy.interval.total_seconds(), 1e-9)))
    per_batch = max(1, math.ceil(policy.requests / batches))
    total: list[dict[str, Any]] = []
    begin = time.monotonic()
    for i in range(batches):
        figures = _analysis(r, names.service(spec), policy, per_batch)
        total.append(figures)
        verdict = judge(figures, max_error_rate=policy.max_error_rate, max_p95_s=_p95_limit(policy),
                        min_tokens_per_s=policy.min_tokens_per_s)
        if not verdict.ok:
            r.figures["post"] = figures
            raise AnalysisFailed(f"post-promotion analysis (batch {i + 1}/{batches}): {verdict.reason}",
                                 f"traffic switched back to {r.stable}; fix the revision and release again",
                                 figures=figures)
        if i < batches - 1:  # batches start on the interval grid: the window is the window
            time.sleep(max(0.0, begin + (i + 1) * scaled(policy.interval.total_seconds()) - time.monotonic()))
    r.times["post_analysis_done"] = time.time()
    r.figures["post"] = {"requests": sum(f["requests"] for f in total), "errors": sum(f["errors"] for f in total),
                         "p95_s": max(f["p95_s"] for f in total)}
    return f"{batches} batch(es), {r.figures['post']['requests']} requests, {r.figures['post']['errors']} errors"
