"""Fault rules shaped like the real services' own failures, for ``SandboxClient.add_fault(**rule)``.

    sbc.add_fault(**fault_presets.gke_incompatible_operation(path="/nodePools$"))
    sbc.add_fault(**fault_presets.watch_expire(path="/pods$", after=0.2))

Each returns a plain dict (the control API's FaultRule JSON), so tests, benchmarks and ``curl`` users
get the same bodies. Sources are in docs/sandbox-contract.md ("Faults").
"""

from __future__ import annotations

import uuid
from typing import Any

WATCH_QUERY = r"(^|&)watch=(1|true|True)(&|$)"


def gke_incompatible_operation(*, path: str = ".*", method: str = "POST", count: int | None = 1,
                               operation: str | None = None) -> dict[str, Any]:
    """GKE refusing a mutation while another operation runs on the cluster (400 FAILED_PRECONDITION).

    Real wording and ErrorInfo reason as GKE returns them (seen in cluster-api-provider-gcp #1363 and
    rancher/gke-operator logs): "Cluster is running incompatible operation operation-…".
    """
    op = operation or f"operation-{uuid.uuid4().int % 10**13}-{uuid.uuid4().hex[:8]}"
    body = {"error": {"code": 400, "message": f"Cluster is running incompatible operation {op}.",
                      "status": "FAILED_PRECONDITION",
                      "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                   "reason": "CLUSTER_ALREADY_HAS_OPERATION", "domain": "container.googleapis.com"}]}}
    return {"service": "gke", "method": method, "path": path, "status": 400, "count": count, "body": body}


def kube_too_many_requests(*, retry_after: int = 1, path: str = ".*", method: str = "*",
                           count: int | None = 1) -> dict[str, Any]:
    """kube-apiserver's max-in-flight / API Priority and Fairness rejection: 429 with Retry-After."""
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "Too many requests, please try again later.", "reason": "TooManyRequests",
            "details": {"retryAfterSeconds": retry_after}, "code": 429}
    return {"service": "kube", "method": method, "path": path, "status": 429, "count": count, "body": body,
            "headers": {"Retry-After": str(retry_after)}}


def kube_status(code: int, reason: str, message: str, *, path: str = ".*", method: str = "*",
                count: int | None = 1) -> dict[str, Any]:
    """Any other API-server failure as a Status object (500 InternalError, 503 ServiceUnavailable, ...)."""
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
    return {"service": "kube", "method": method, "path": path, "status": code, "count": count, "body": body}


def connection_reset(*, service: str, path: str = ".*", method: str = "*", count: int | None = 1) -> dict[str, Any]:
    """The TCP connection is reset before any reply (an LB or proxy in between dropping it)."""
    return {"service": service, "method": method, "path": path, "count": count, "action": "reset"}


def truncated_body(*, service: str, path: str = ".*", method: str = "*", count: int | None = 1) -> dict[str, Any]:
    """A 200 whose body ends before its Content-Length (requests: ChunkedEncodingError)."""
    return {"service": service, "method": method, "path": path, "count": count, "action": "truncate"}


def read_timeout(*, service: str, seconds: float, path: str = ".*", method: str = "*",
                 count: int | None = 1) -> dict[str, Any]:
    """The server answers only after ``seconds`` (real time): longer than the client's timeout, it times out."""
    return {"service": service, "method": method, "path": path, "count": count, "latency": seconds}


def watch_expire(*, path: str, after: float = 0.0, count: int | None = 1) -> dict[str, Any]:
    """A Kubernetes watch on ``path`` gets the 410 Expired ERROR event after ``after`` s of streaming."""
    return {"service": "kube", "method": "GET", "path": path, "query": WATCH_QUERY, "count": count,
            "action": "watch_expire", "after": after}


def watch_drop(*, path: str, after: float = 0.0, count: int | None = 1) -> dict[str, Any]:
    """A Kubernetes watch on ``path`` loses its connection after ``after`` s (API-server restart)."""
    return {"service": "kube", "method": "GET", "path": path, "query": WATCH_QUERY, "count": count,
            "action": "watch_drop", "after": after}
