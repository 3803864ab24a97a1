"""A small httpx client of the sandbox control API, for tests, benchmarks and users' scripts.

    sb = SandboxClient.from_env()                      # LLM_FLEET_SANDBOX_URL
    sb.add_fault(service="gke", method="POST", path="/nodePools", status=503, count=2)
    sb.set_stockout("us-central1-a", "nvidia-l4")
    sb.set_quota("us-central1", "NVIDIA_L4_GPUS", 1)
    sb.state()["quota_used"]
"""

from __future__ import annotations

import os
from typing import Any

import httpx


class SandboxError(RuntimeError):
    """The control API refused a request (bad fault rule, unknown zone, ...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class SandboxClient:
    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    @classmethod
    def from_env(cls, **kwargs: Any) -> SandboxClient:
        url = os.environ.get("LLM_FLEET_SANDBOX_URL")
        if not url:
            raise RuntimeError("LLM_FLEET_SANDBOX_URL is not set: run `llm-fleet sandbox up` and source its env file")
        return cls(url, **kwargs)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SandboxClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        resp = self._http.request(method, path, json=json, params={k: v for k, v in (params or {}).items()
                                                                   if v is not None})
        if resp.status_code >= 400:
            try:
                err = resp.json().get("error", {})
                message = err.get("message", resp.text) if isinstance(err, dict) else str(err)
            except ValueError:
                message = resp.text
            raise SandboxError(resp.status_code, message)
        return resp.json()

    # ---- inspection ----------------------------------------------------------------------
    def health(self) -> bool:
        try:
            return bool(self._call("GET", "/healthz").get("ok"))
        except (httpx.HTTPError, SandboxError):
            return False

    def state(self) -> dict[str, Any]:
        return self._call("GET", "/sandbox/state")

    def quota_used(self, project: str | None = None) -> dict[str, Any]:
        """Non-zero usage: ``{"project": {metric: n}, "regions": {region: {metric: n}}}``."""
        return self._call("GET", "/sandbox/quota", params={"project": project})

    # ---- faults --------------------------------------------------------------------------
    def add_fault(self, **rule: Any) -> dict[str, Any]:
        """Add a FaultRule (``service`` required; ``method``, ``path`` regex, ``status``, ``count``,
        ``latency``, ``hang``, ``body``, ``headers``); returns it with its ``id``."""
        return self._call("POST", "/sandbox/faults", json=rule)

    def faults(self) -> list[dict[str, Any]]:
        return self._call("GET", "/sandbox/faults")["faults"]

    def remove_fault(self, rule_id: str) -> None:
        self._call("DELETE", f"/sandbox/faults/{rule_id}")

    def clear_faults(self, service: str | None = None) -> None:
        self._call("DELETE", "/sandbox/faults", params={"service": service})

    # ---- the cluster's own behaviour -------------------------------------------------------
    def set_endpoint_lag(self, seconds: float) -> float:
        """Cloud seconds between an Endpoints change and Services routing by it (kube-proxy's programming
        delay), on every cluster; 0 routes by the Endpoints of now. Returns the value set."""
        return self._call("POST", "/sandbox/endpoint-lag", json={"seconds": seconds})["seconds"]

    def endpoint_lag(self) -> float:
        return self._call("GET", "/sandbox/endpoint-lag")["seconds"]

    # ---- capacity ------------------------------------------------------------------------
    def set_stockout(self, zone: str, accelerator: str | None = None, on: bool = True, *, spot: bool = False
                     ) -> list[dict[str, Any]]:
        """``accelerator``: one type, ``None`` for every GPU type, ``"*"`` for every VM (CPU-only too);
        ``spot``: only Spot VMs cannot start there (on-demand still can)."""
        return self._call("POST", "/sandbox/stockouts", json={"zone": zone, "accelerator": accelerator, "on": on,
                                                              "spot": spot})["stockouts"]

    def preempt_node(self, node: str) -> dict[str, Any]:
        """Compute Engine preempts the Spot VM behind GKE node ``node`` (a fault): ~30 s notice (the node is
        tainted, its pods get 15 s to stop), then the node is gone and its pods' owners replace them —
        through their ComputeClass, on the next option when spot capacity is gone. Returns ``{"node",
        "cluster", "pool", "zone"}``."""
        return self._call("POST", f"/sandbox/nodes/{node}/preempt")

    def clear_stockouts(self) -> None:
        self._call("DELETE", "/sandbox/stockouts")

    def stockouts(self) -> list[dict[str, Any]]:
        return self._call("GET", "/sandbox/stockouts")["stockouts"]

    def set_quota(self, region: str | None, metric: str, limit: float, *, project: str | None = None
                  ) -> dict[str, Any]:
        """Set a regional quota limit (``region=None`` for a project-wide metric like GPUS_ALL_REGIONS) of
        ``project`` (default: the sandbox's project; every project id has its own quotas)."""
        return self._call("POST", "/sandbox/quota", json={"region": region, "metric": metric, "limit": limit,
                                                          "project": project})

    # ---- model-server behaviors ------------------------------------------------------------
    def add_behavior(self, **behavior: Any) -> Any:
        return self._call("POST", "/sandbox/behaviors", json=behavior)

    def behaviors(self) -> list[Any]:
        return self._call("GET", "/sandbox/behaviors")["behaviors"]

    def remove_behavior(self, rule_id: str) -> None:
        self._call("DELETE", f"/sandbox/behaviors/{rule_id}")

    def clear_behaviors(self) -> None:
        self._call("DELETE", "/sandbox/behaviors")

    # ---- vertex ai -----------------------------------------------------------------------------
    def set_vertex_quota(self, region: str, accelerator: str, limit: int, *, project: str | None = None
                         ) -> dict[str, Any]:
        """Vertex AI serving GPU quota (custom_model_serving_<gpu>_gpus) of a region, per accelerator
        (NVIDIA_L4, NVIDIA_TESLA_T4 ...) of ``project`` (default: the sandbox's)."""
        return self._call("POST", "/sandbox/vertex/quota", json={"region": region, "accelerator": accelerator,
                                                                 "limit": limit, "project": project})

    # ---- slack -----------------------------------------------------------------------------
    def slack_messages(self, channel: str | None = None) -> list[dict[str, Any]]:
        return self._call("GET", "/sandbox/slack/messages", params={"channel": channel})["messages"]

    # ---- accounting ----------------------------------------------------------------------------
    def accounting(self, cluster: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        """Node/pod lifetimes (epoch ``start``/``end``, ``gpus``, ``labels``); ``cluster`` is project/location/name."""
        return self._call("GET", "/sandbox/accounting", params={"cluster": cluster, "kind": kind})["records"]

    # ---- hub -------------------------------------------------------------------------------
    def push_revision(self, repo: str, *, branch: str = "main", title: str | None = None) -> str:
        """A new commit on ``branch`` of a Hub repo (its webhooks fire); returns the commit sha."""
        return self._call("POST", "/sandbox/hub/revisions", json={"repo": repo, "branch": branch,
                                                                  "title": title})["sha"]

    def add_hub_webhook(self, url: str, *, secret: str | None = None, repos: list[str] | None = None
                        ) -> dict[str, Any]:
        """Register a Hub repo webhook (every repo when ``repos`` is empty); returns it with its ``id``."""
        return self._call("POST", "/sandbox/hub/webhooks", json={"url": url, "secret": secret, "repos": repos})

    def hub_webhooks(self) -> list[dict[str, Any]]:
        """Registered webhooks with their ``deliveries`` (status of each POST), secrets omitted."""
        return self._call("GET", "/sandbox/hub/webhooks")["webhooks"]

    def remove_hub_webhook(self, hook_id: str) -> None:
        self._call("DELETE", f"/sandbox/hub/webhooks/{hook_id}")
