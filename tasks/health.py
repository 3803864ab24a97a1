"""Talk to the model through its Service: readiness by the engine's own endpoints, smoke prompts.

Requests go through the API server's service proxy, so the flow needs no port-forward and no public
IP — the same path works on GKE and on the sandbox.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import httpx
from prefect import task

from manifests.errors import DeployError, SmokeTestError
from tasks.clients import kube_client, kube_http
from tasks.retry import task_retries


def service_base(namespace: str, service: str, port: str = "http") -> str:
    return f"/api/v1/namespaces/{namespace}/services/{service}:{port}/proxy"


def _json(resp: httpx.Response, engine: str) -> Any:
    """The engine's JSON answer, or one DeployError saying what answered instead (a web page from an image that
    is no model server, a proxy's error page) -- never a bare JSONDecodeError."""
    try:
        return resp.json()
    except ValueError:
        text = " ".join(resp.text.split())[:120]
        raise DeployError(f"{resp.request.url.path} answered {resp.status_code} {resp.headers.get('content-type', '')!r},"
                          f" not {engine}'s JSON: {text!r}",
                          f"check engine.image: the container is not a {engine} server (engine.kind {engine})",
                          reason="NotAnEngine") from None


def _client(kubeconfig: str | None, timeout: float = 60.0) -> httpx.Client:
    return kube_http(kube_client(kubeconfig), timeout=timeout)


@task(**task_retries())
def check_engine_ready(*, kubeconfig: str | None, namespace: str, service: str, engine: str,
                       model_id: str) -> dict[str, Any]:
    """The engine says the model is loaded: /v1/models (vLLM, SGLang) or /health + /info (TGI)."""
    base = service_base(namespace, service)
    http = _client(kubeconfig)
    if engine == "tgi":
        health = http.get(f"{base}/health")
        if health.status_code != 200:
            raise DeployError(f"TGI /health answered {health.status_code}", "wait and rerun", reason="NotReady")
        info = _json(http.get(f"{base}/info"), engine)
        served = info.get("model_id")
    else:
        resp = http.get(f"{base}/v1/models")
        if resp.status_code != 200:
            raise DeployError(f"{engine} /v1/models answered {resp.status_code}", "wait and rerun",
                              reason="NotReady")
        info = _json(resp, engine)
        served = next((m.get("id") for m in info.get("data", [])), None)
    if served != model_id:
        raise DeployError(f"the Service answers with model {served!r}, expected {model_id}",
                          "another deployment shares the Service selector; check the labels", reason="WrongModel")
    return {"model": served}


@dataclass
class SmokeResult:
    prompt: str
    answer: str
    latency_s: float
    tokens: int
    tokens_per_s: float
    streamed: bool


def _generate(http: httpx.Client, base: str, engine: str, model_id: str, prompt: str, max_tokens: int,
              stream: bool) -> tuple[str, int]:
    if engine == "tgi":
        body = {"inputs": prompt, "parameters": {"max_new_tokens": max_tokens, "seed": 42}}
        if not stream:
            resp = http.post(f"{base}/generate", json=body)
            resp.raise_for_status()
            data = _json(resp, engine)
            text = data.get("generated_text", "")
            return text, int((data.get("details") or {}).get("generated_tokens") or len(text.split()))
        text, tokens = "", 0
        with http.stream("POST", f"{base}/generate_stream", json=body) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    event = json.loads(line[5:])
                    tokens += 1
                    if event.get("generated_text") is not None:
                        text = event["generated_text"]
        return text, tokens
    body = {"model": model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if not stream:
        resp = http.post(f"{base}/v1/completions", json=body)
        resp.raise_for_status()
        data = _json(resp, engine)
        return data["choices"][0].get("text", ""), int((data.get("usage") or {}).get("completion_tokens") or 0)
    parts: list[str] = []
    with http.stream("POST", f"{base}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                parts.append(json.loads(line[5:])["choices"][0].get("text", ""))
    return "".join(parts), len(parts)


@task(**task_retries())
def smoke_test(*, kubeconfig: str | None, namespace: str, service: str, engine: str, model_id: str,
               prompts: list[str], max_tokens: int, expect: str | None = None, stream: bool = True) -> list[SmokeResult]:
    """Each prompt must get a non-empty answer (matching ``expect``); the last one is also streamed."""
    import re

    base = service_base(namespace, service)
    results: list[SmokeResult] = []
    runs = [(p, False) for p in prompts] + ([(prompts[-1], True)] if stream and prompts else [])
    http = _client(kubeconfig, timeout=120)
    for prompt, streamed in runs:
        start = time.perf_counter()
        try:
            answer, tokens = _generate(http, base, engine, model_id, prompt, max_tokens, streamed)
        except httpx.HTTPStatusError as exc:
            raise SmokeTestError(f"smoke prompt failed: HTTP {exc.response.status_code} from {engine}",
                                 "read the model server logs", reason="SmokeFailed") from None
        elapsed = time.perf_counter() - start
        if not answer.strip() or (expect and not re.search(expect, answer)):
            raise SmokeTestError(f"smoke prompt got a bad answer: {answer[:80]!r}",
                                 "check the model revision and engine args (dtype, max_model_len)",
                                 reason="WrongAnswer")
        results.append(SmokeResult(prompt[:60], answer[:200], round(elapsed, 4), tokens,
                                   round(tokens / elapsed, 1) if elapsed > 0 else 0.0, streamed))
    return results


@task(**task_retries())
def analyze(*, kubeconfig: str | None, namespace: str, service: str, engine: str, model_id: str,
            prompts: list[str], max_tokens: int, requests: int, concurrency: int = 4,
            expect: str | None = None) -> dict[str, Any]:
    """``requests`` generations through ``service`` (``concurrency`` at a time): error rate, latency, speed.

    A wrong answer (empty, or not matching ``expect``) counts as an error, like a 5xx: a model that
    answers garbage is not healthy. Returns figures only; judging them is the release policy's job.
    """
    import re
    from concurrent.futures import ThreadPoolExecutor

    base = service_base(namespace, service)
    http = _client(kubeconfig, timeout=120)

    def one(i: int) -> tuple[float, int, str | None]:
        prompt = prompts[i % len(prompts)]
        start = time.perf_counter()
        try:
            answer, tokens = _generate(http, base, engine, model_id, prompt, max_tokens, False)
        except httpx.HTTPStatusError as exc:
            return time.perf_counter() - start, 0, f"HTTP {exc.response.status_code}"
        except httpx.HTTPError as exc:
            return time.perf_counter() - start, 0, type(exc).__name__
        elapsed = time.perf_counter() - start
        if not answer.strip() or (expect and not re.search(expect, answer)):
            return elapsed, tokens, f"wrong answer {answer[:40]!r}"
        return elapsed, tokens, None

    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, requests))) as pool:
        results = list(pool.map(one, range(requests)))
    ok = [r for r in results if r[2] is None]
    errors = [r[2] for r in results if r[2] is not None]
    latencies = sorted(r[0] for r in ok) or [0.0]

    def pct(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 4)

    busy = sum(r[0] for r in ok)
    return {"service": service, "requests": requests, "errors": len(errors), "error_rate": len(errors) / requests,
            "first_error": errors[0] if errors else None, "p50_s": pct(0.5), "p95_s": pct(0.95),
            "tokens_per_s": round(sum(r[1] for r in ok) / busy, 1) if busy > 0 else 0.0}


@task(**task_retries())
def read_metrics(*, kubeconfig: str | None, namespace: str, service: str) -> str:
    """The engine's Prometheus /metrics page, through the Service."""
    resp = _client(kubeconfig).get(f"{service_base(namespace, service)}/metrics")
    resp.raise_for_status()
    return resp.text


@task(**task_retries())
def read_pod_metrics(*, kubeconfig: str | None, namespace: str, pods: list[str], port: int) -> list[str]:
    """Each pod's own /metrics page, through the API server's pod proxy: a Service answers from one pod at
    random, and counters differ per pod, so one page per read looked like traffic between any two reads."""
    http = _client(kubeconfig)
    pages = []
    for pod in pods:
        resp = http.get(f"/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy/metrics")
        resp.raise_for_status()
        pages.append(resp.text)
    return pages
