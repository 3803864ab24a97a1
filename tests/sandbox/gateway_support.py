"""A GKE cluster with the Inference Gateway on the sandbox, for canary tests and ``bench/canary.py``: the
product's rendered objects for both colors of a spec, GMP scraping them, GMP's query API, and client load
through the Gateway's address with every answer recorded."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from kubernetes import client

from manifests import gateway, render
from manifests.names import COLORS, Color
from manifests.spec import DeploymentSpec, parse_spec
from sandbox.core import Clock, Faults
from sandbox.kube import KubeCluster, addons, promql
from sandbox.kube.controllers import PODS
from sandbox.kube.gateway import gateway_url
from tests.sandbox.access_support import configuration
from tests.sandbox.kube_support import wait_for

SEED_004 = "deployments/mistral-7b-vllm-spot.yaml"
LONG_PROMPT = " ".join(["Summarise the following log line carefully please."] * 40)  # ~300 tokens


def canary_spec(*, holds_s: float = 300, steps: tuple[int, ...] = (5, 25, 50, 100), root: str = ".",
                **overrides: Any) -> DeploymentSpec:
    """Seed 004 exposed through a regional Gateway, released by canary (``overrides``: top-level spec keys)."""
    data = yaml.safe_load(Path(root, SEED_004).read_text())
    data["expose"] = {"service_type": "ClusterIP", "port": 8000,
                      "gateway": {"class": "gke-l7-regional-external-managed"}}
    data["release"]["strategy"] = "canary"
    data["release"]["steps"] = [{"weight": w, "hold": f"{holds_s}s"} for w in steps]
    data.pop("schedule", None)
    return parse_spec(data | overrides)


@dataclass
class Load:
    """Clients sending completions through the Gateway without pause; each answer recorded."""

    url: str
    model: str
    threads: int = 3
    long_every: int = 5  # every n-th request has a long prompt (real traffic; smoke prompts are short)
    results: list[tuple[float, int]] = field(default_factory=list)  # (time, status; 0 = no answer)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def _run(self, i: int) -> None:
        n = i
        with httpx.Client(base_url=self.url, timeout=60) as c:
            while not self._stop.is_set():
                n += 1
                prompt = LONG_PROMPT if n % self.long_every == 0 else "San Francisco is a"
                try:
                    status = c.post("/v1/completions", json={"model": self.model, "prompt": prompt,
                                                             "max_tokens": 8}).status_code
                except httpx.HTTPError:
                    status = 0
                self.results.append((time.monotonic(), status))

    def stop(self) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(timeout=30)

    def failed(self) -> int:
        return sum(1 for _, s in list(self.results) if s != 200)


class GatewayBed:
    def __init__(self, spec: DeploymentSpec, *, time_scale: float = 0.01) -> None:
        from sandbox.engines import ModelRuntime
        from sandbox.hub import Hub

        self.spec = spec
        self.clock, faults = Clock(time_scale), Faults()
        self.time_scale = time_scale
        self.runtime = ModelRuntime(clock=self.clock, faults=faults, hub=Hub(faults=faults))
        self.kube = KubeCluster(clock=self.clock, faults=faults, runtime=self.runtime)
        self.kube.start()
        for i in range(2):
            self.kube.add_node(f"gke-cpu-{i}")
        self.api = client.ApiClient(configuration(self.kube))
        addons.install_gateway_api(self.kube)
        addons.install_inference_extension(self.kube)
        self.query_server = promql.serve_query_api([self.kube.gmp])
        self.query_url = f"http://127.0.0.1:{self.query_server.port}"

    # ---- objects ----------------------------------------------------------------------------------
    def _apply(self, obj: dict[str, Any]) -> None:
        from kubernetes import utils

        if obj["kind"] in ("Gateway", "HTTPRoute", "InferencePool", "InferenceObjective", "PodMonitoring"):
            group, version = obj["apiVersion"].split("/")
            plural = {"Gateway": "gateways", "HTTPRoute": "httproutes", "InferencePool": "inferencepools",
                      "InferenceObjective": "inferenceobjectives", "PodMonitoring": "podmonitorings"}[obj["kind"]]
            client.CustomObjectsApi(self.api).create_namespaced_custom_object(
                group, version, obj["metadata"]["namespace"], plural, obj)
        else:
            utils.create_from_dict(self.api, obj)

    def deploy(self, live: Color = "blue", *, candidate_mode: str | None = None) -> str:
        """Both colors serving, the Gateway objects with ``live`` taking all traffic; returns the address.
        ``candidate_mode``: a sandbox behavior for the other color's pods (e.g. ``long_prompt_errors``)."""
        if candidate_mode:
            from manifests.names import other

            self.runtime.behaviors.add(mode=candidate_mode, match={"labels": {"llm-fleet.dev/color": other(live)}})
        return self.apply_spec(self.spec, live)

    def namespace(self, spec: DeploymentSpec) -> None:
        from kubernetes.client.rest import ApiException

        core = client.CoreV1Api(self.api)
        for create in (lambda: core.create_namespace({"metadata": {"name": spec.namespace}}),
                       lambda: core.create_namespaced_secret(spec.namespace, {"metadata": {"name": spec.secret.name},
                                                             "stringData": {spec.secret.key: "hf_sandbox"}}),
                       lambda: spec.service_account and core.create_namespaced_service_account(
                           spec.namespace, {"metadata": {"name": spec.service_account}})):
            try:
                create()
            except ApiException as exc:
                if exc.status != 409:
                    raise

    def apply_spec(self, spec: DeploymentSpec, live: Color = "blue") -> str:
        """``spec``'s rendered Deployments (both colors), Gateway objects and PodMonitoring; its address."""
        from manifests import names

        self.namespace(spec)
        # GPU nodes carrying whatever the rendered pods select (a pool's labels or a ComputeClass's), per spec
        pod = render.model_deployment(spec, "blue")["spec"]["template"]["spec"]
        gpus = pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", "1")
        for i in range(2 * spec.replicas):
            self.kube.add_node(f"gke-{spec.name}-gpu-{i}", capacity={"nvidia.com/gpu": gpus}, labels={
                "cloud.google.com/gke-accelerator": spec.accelerator.type, **(pod.get("nodeSelector") or {})})
        for obj in [render.model_deployment(spec, c) for c in COLORS] + gateway.objects(spec, live) + \
                [o for o in render.monitoring(spec) if o["kind"] == "PodMonitoring"]:
            self._apply(obj)
        wait_for(lambda: all(len(self.kube.ready_pod_ports(spec.namespace, names.selector(spec, c))) ==
                             spec.replicas for c in COLORS), timeout=120)
        custom = client.CustomObjectsApi(self.api)

        def ready() -> str | None:
            gw = custom.get_namespaced_custom_object("gateway.networking.k8s.io", "v1", spec.namespace, "gateways",
                                                     gateway.gateway_name(spec))
            pools = [custom.get_namespaced_custom_object("inference.networking.k8s.io", "v1", spec.namespace,
                                                         "inferencepools", gateway.pool_name(spec, c)) for c in COLORS]
            ok = all(c["status"] == "True" for p in pools for par in (p.get("status") or {}).get("parents") or []
                     for c in par["conditions"]) and all((p.get("status") or {}).get("parents") for p in pools)
            return gateway_url(gw) if ok else None
        return wait_for(ready, timeout=60)

    # ---- what the pods themselves count -------------------------------------------------------------
    def arrivals(self, color: Color) -> dict[str, float]:
        """Per status class, the requests this color's pods answered (their own http_requests_total)."""
        out: dict[str, float] = {}
        for p in self.kube.store.list(PODS, self.spec.namespace)[0]:
            if (p["metadata"].get("labels") or {}).get("llm-fleet.dev/color") != color:
                continue
            port = self.kube.pod_port(self.spec.namespace, p["metadata"]["name"])
            if not port:
                continue
            text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            for status, value in re.findall(r'^http_requests_total\{handler="/v1/[^"]*",method="POST",'
                                            r'status="(\w+)"\} (\S+)$', text, re.M):
                out[status] = out.get(status, 0.0) + float(value)
        return out

    def smoke(self, color: Color) -> bool:
        """The spec's smoke prompts to each of ``color``'s pods (the preview path): all answer with text."""
        ok = True
        for port in self.kube.ready_pod_ports(self.spec.namespace, {"llm-fleet.dev/color": color}):
            for prompt in self.spec.release.smoke_prompts:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, json={
                    "model": self.spec.model.id, "prompt": prompt, "max_tokens": 16})
                ok = ok and r.status_code == 200 and bool(r.json()["choices"][0]["text"].strip())
        return ok

    def stop(self) -> None:
        self.query_server.stop()
        self.kube.stop()
        self.runtime.stop()
