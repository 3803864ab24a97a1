"""Is the deployed model right: smoke prompts through predict and rawPredict, and the post-promotion
analysis (error rate, p95 latency, who answered) a release runs after the switch."""

from __future__ import annotations

import re
from typing import Any

from manifests import vertex as vx
from manifests.errors import SmokeTestError
from manifests.spec import DeploymentSpec
from tasks import vertex as tv


def smoke(spec: DeploymentSpec, endpoint: str, *, want_id: str | None = None) -> list[dict[str, Any]]:
    """Every smoke prompt through predict, the last one again as an OpenAI chat body through rawPredict."""
    from google.api_core import exceptions as gexc

    rel = spec.release
    rows = []
    try:
        for prompt in rel.smoke_prompts:
            got = tv.predict_once(endpoint=endpoint, instances=[vx.smoke_instance(prompt, rel.smoke_max_tokens)])
            answer = str(got["predictions"][0]) if got["predictions"] else ""
            rows.append({"via": "predict", "prompt": prompt, "answer": answer,
                         "latency_s": round(got["latency_s"], 3), "deployed_model_id": got["deployed_model_id"]})
        raw = tv.raw_predict_once(endpoint=endpoint, body=vx.chat_body(rel.smoke_prompts[-1], rel.smoke_max_tokens))
    except gexc.GoogleAPICallError as exc:
        raise SmokeTestError(f"smoke prompt failed: {exc.code} {exc.message[:200]}",
                             "read the deployed model's logs; the engine failed the request") from None
    choices = (raw["json"] or {}).get("choices") or [{}]
    rows.append({"via": "rawPredict", "prompt": rel.smoke_prompts[-1],
                 "answer": str((choices[0].get("message") or {}).get("content") or ""),
                 "latency_s": round(raw["latency_s"], 3), "deployed_model_id": raw["deployed_model_id"]})
    for r in rows:
        if not r["answer"].strip() or (rel.expect and not re.search(rel.expect, r["answer"])):
            raise SmokeTestError(f"smoke prompt {r['prompt']!r} via {r['via']} got {r['answer'][:80]!r}",
                                 "check the model's dtype/quantization and release.expect")
        if want_id and r["deployed_model_id"] != want_id:
            raise SmokeTestError(f"{r['via']} was answered by deployed model {r['deployed_model_id']}, "
                                 f"not {want_id}", "check the endpoint's traffic split")
    return rows


def analysis(spec: DeploymentSpec, endpoint: str, *, want_id: str) -> dict[str, Any]:
    """post-promotion analysis: N requests through predict; error rate and p95 latency vs the thresholds."""
    a = spec.release.post_promotion
    prompt = spec.release.smoke_prompts[0]
    errors, lat, others = 0, [], 0
    for _ in range(a.requests):
        try:
            got = tv.predict_once(endpoint=endpoint, instances=[vx.smoke_instance(prompt, spec.release.smoke_max_tokens)])
            if not got["predictions"] or not str(got["predictions"][0]).strip():
                errors += 1
            others += got["deployed_model_id"] != want_id
            lat.append(got["latency_s"])
        except Exception:  # noqa: BLE001 - every failed request counts, whatever its kind
            errors += 1
    lat.sort()
    p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else float("inf")
    rate = errors / a.requests
    out = {"requests": a.requests, "errors": errors, "error_rate": rate, "p95_latency_s": round(p95, 3),
           "answered_by_other": others}
    if rate > a.max_error_rate or p95 > a.max_p95_latency_s or others:
        raise SmokeTestError(f"post-promotion analysis failed: {errors}/{a.requests} failed, p95 {p95:.2f} s, "
                             f"{others} answered by another model",
                             f"thresholds: release.post_promotion.max_error_rate {a.max_error_rate}, "
                             f"max_p95_latency_s {a.max_p95_latency_s}")
    return out
