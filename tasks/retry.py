"""Which errors are worth retrying, and the Prefect retry options every thin task shares.

Transient (retried with backoff): 408/425/429/500/502/503/504, GKE's "another operation is in
progress" (400 FAILED_PRECONDITION), connection resets/refusals, timeouts and cut-off bodies — from
requests (Google's REST transport), urllib3 (the kubernetes client) and httpx (Hub, model servers).
Permanent (never retried): every other 4xx — 400, 401, 403, 404, 409, 422 — and our own FleetErrors.
A 429's Retry-After is honoured: the retry waits at least that long.
"""

from __future__ import annotations

import email.utils
import time
from typing import Any

from google.api_core import exceptions as gexc
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from tasks.clients import google_transient
from tasks.settings import get_settings

TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
MAX_RETRY_AFTER_S = 300.0  # a server asking for longer than this is treated as down, not throttling


def http_status(exc: BaseException) -> int | None:
    """The HTTP status an exception carries, whichever client raised it."""
    for value in (getattr(exc, "status", None), getattr(exc, "code", None),
                  getattr(getattr(exc, "response", None), "status_code", None)):
        if isinstance(value, int) and 100 <= value < 600:
            return value
    return None


def is_transient(exc: BaseException | None) -> bool:
    """429, 5xx, a busy GKE cluster and network errors are transient; 4xx, quota and validation errors are not."""
    if exc is None:
        return False
    if isinstance(exc, gexc.RetryError):  # the call's own retry gave up: judge by what it kept failing on
        return is_transient(exc.cause)
    if google_transient(exc):
        return True
    status = http_status(exc)
    if status is not None:
        return status in TRANSIENT_HTTP
    import httpx
    import requests
    import urllib3

    return isinstance(exc, httpx.TransportError | urllib3.exceptions.HTTPError | requests.RequestException
                      | ConnectionError | TimeoutError)


def retry_after_s(exc: BaseException) -> float | None:
    """Seconds a 429/503 asked us to wait (Retry-After: seconds or an HTTP date), capped."""
    headers = getattr(exc, "headers", None) or getattr(getattr(exc, "response", None), "headers", None)
    if not headers:
        return None
    raw = headers.get("Retry-After") if hasattr(headers, "get") else None
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(raw).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def retry_transient(task, task_run, state) -> bool:  # Prefect's retry_condition_fn signature
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - we classify, not handle
        if not is_transient(exc):
            return False
        # Prefect's delays are fixed per attempt; a server's Retry-After is waited out here, before them.
        wait = retry_after_s(exc)
        if wait:
            time.sleep(wait)
        return True
    return False


def task_retries() -> dict[str, Any]:
    """Options for @task: exponential backoff with jitter, only for transient errors."""
    s = get_settings()
    # Side-effecting calls are never cached (and secrets are never hashed into cache keys).
    return {"retries": s.task_retries, "retry_delay_seconds": exponential_backoff(backoff_factor=s.retry_initial_s),
            "retry_jitter_factor": 0.5, "retry_condition_fn": retry_transient, "cache_policy": NO_CACHE}
