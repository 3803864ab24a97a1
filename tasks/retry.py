"""Which errors are worth retrying, and the Prefect retry options every thin task shares."""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from tasks.clients import GOOGLE_TRANSIENT
from tasks.settings import get_settings

TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}


def is_transient(exc: BaseException | None) -> bool:
    """429, 5xx and network errors are transient; 4xx, quota and validation errors are not."""
    if exc is None:
        return False
    if isinstance(exc, GOOGLE_TRANSIENT):
        return True
    status = getattr(exc, "status", None) or getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):
        return status in TRANSIENT_HTTP
    import httpx
    import urllib3

    return isinstance(exc, httpx.TransportError | urllib3.exceptions.HTTPError | ConnectionError | TimeoutError)


def retry_transient(task, task_run, state) -> bool:  # Prefect's retry_condition_fn signature
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - we classify, not handle
        return is_transient(exc)
    return False


def task_retries() -> dict[str, Any]:
    """Options for @task: exponential backoff with jitter, only for transient errors."""
    s = get_settings()
    # Side-effecting calls are never cached (and secrets are never hashed into cache keys).
    return {"retries": s.task_retries, "retry_delay_seconds": exponential_backoff(backoff_factor=s.retry_initial_s),
            "retry_jitter_factor": 0.5, "retry_condition_fn": retry_transient, "cache_policy": NO_CACHE}
