"""The model-deployment spec: one YAML file under deployments/ describes one served model.

Loading never raises a pydantic traceback at the user: every problem becomes one ``SpecError``
naming the field and the fix.
"""

from __future__ import annotations

import difflib
import os
import re
import zoneinfo
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from croniter import croniter
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from manifests import yamlio
from manifests.catalog import ACCELERATORS, BYTES_PER_PARAM, ENGINES, VLM_SUPPORT, required_gib
from manifests.errors import FleetError
from manifests.startup import StartupSpec
from manifests.startup import check as check_startup


class SpecError(FleetError):
    """A spec problem: which field, what is wrong, how to fix it."""

    def __init__(self, field: str, problem: str, fix: str = "", *, source: str | None = None) -> None:
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {problem}", fix)
        self.field, self.problem, self.source = field, problem, source


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def _duration(value: Any) -> Any:
    """Accept 90, "90s", "30m", "2h", "1d" as well as pydantic's own timedelta forms."""
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    return value


def human_duration(seconds: float) -> str:
    """3600 -> 1h, 5400 -> 1h30m, 90 -> 1m30s: a duration the way a spec writes it."""
    total = round(seconds)
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{s}s" if s or not total else "")


Duration = Annotated[timedelta, BeforeValidator(_duration)]
MIN_PROMOTION_TIMEOUT_S, MAX_PROMOTION_TIMEOUT_S = 60.0, 86400.0
DNS_LABEL = r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$"
K8S_QUANTITY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"


def region_of(location: str) -> str:
    """us-central1-a -> us-central1; a region is its own region."""
    return location if location.count("-") == 1 else location.rsplit("-", 1)[0]


class _Model(BaseModel):
    # Each field's docstring (the string under it) is its description: the help text the Prefect UI's spec
    # form shows under the field (tests/unit/test_operator_names.py checks every field has one).
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, use_attribute_docstrings=True)


class ModelRef(_Model):
    """The Hugging Face Hub model to serve."""

    id: str = Field(pattern=r"^[\w.-]+/[\w.-]+$", description="a Hub repo id such as google/gemma-2-2b-it")
    revision: str = "main"
    """The branch, tag or commit to serve; release_model follows a branch's new commits."""
    task: Literal["text-generation", "image-text-to-text"] = "text-generation"
    """text-generation (an LLM) or image-text-to-text (a vision-language model such as PaliGemma)."""

    @property
    def is_vision(self) -> bool:
        return self.task == "image-text-to-text"

    @property
    def label(self) -> str:
        """The id as a label value, the way seed 000 writes hf.co/model (org--name)."""
        return self.id.replace("/", "--")[:63].rstrip("-_.")


class EngineSpec(_Model):
    """The model server: vLLM, TGI or SGLang, and its settings."""

    kind: Literal["vllm", "tgi", "sglang"] = "vllm"
    """The model server: vllm, tgi (Text Generation Inference) or sglang."""
    image: str | None = None
    """The server's container image; empty: the engine's pinned default image."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Weight and activation precision; auto: the model's own (float16 on GPUs without bfloat16)."""
    quantization: Literal["awq", "gptq", "fp8", "int8", "bitsandbytes", "eetq"] | None = None
    """Load the weights quantized (the checkpoint's own AWQ/GPTQ, or quantized at load); empty: none."""
    tensor_parallel: int = Field(1, ge=1, le=8)
    """GPUs one replica shards the model over (at most accelerator.count)."""
    max_model_len: int | None = Field(None, ge=128)
    """Longest prompt + answer in tokens (vLLM --max-model-len, TGI MAX_TOTAL_TOKENS, SGLang --context-length);
    empty: the model's own limit."""
    gpu_memory_utilization: float | None = Field(None, gt=0.1, le=1.0)
    """vLLM: the share of GPU memory it may take for weights and KV cache (--gpu-memory-utilization); empty: 0.9."""
    max_concurrent_requests: int | None = Field(None, ge=1)
    """Requests one replica runs at once (vLLM --max-num-seqs, TGI MAX_CONCURRENT_REQUESTS); empty: the default."""
    port: int | None = Field(None, ge=1, le=65535)
    """The container's port; empty: the engine's default (vLLM 8000, TGI 80, SGLang 30000)."""
    shm_size: str = Field("2Gi", pattern=K8S_QUANTITY)
    """Size of /dev/shm (an in-memory volume; tensor parallel needs it), a Kubernetes quantity such as 2Gi."""
    extra_args: list[str] = []
    """More command-line arguments for the engine, passed as written (e.g. --enable-prefix-caching)."""
    env: dict[str, str] = {}
    """More environment variables for the engine container."""
    command: list[str] | None = None
    """The container's command, for images that need one (seed 004 runs vLLM's OpenAI entrypoint); empty: the image's."""
    trust_remote_code: bool = False
    """Run Python code shipped in the model repo (custom architectures); only when you have read it: pin
    model.revision to that commit."""

    @property
    def defaults(self):
        return ENGINES[self.kind]

    @property
    def image_ref(self) -> str:
        return self.image or self.defaults.image

    @property
    def container_port(self) -> int:
        return self.port or self.defaults.port

    @property
    def weight_format(self) -> str:
        return self.quantization or self.dtype


class ClusterSpec(_Model):
    """The GKE cluster the model runs in (created by provision_cluster if missing)."""

    project: str = Field(pattern=r"^[a-z][-a-z0-9]{4,28}[a-z0-9]$",
                         description="a GCP project id: 6-30 lowercase letters, digits or '-'")
    location: str = Field(pattern=r"^[a-z]+-[a-z]+\d+(-[a-z])?$",
                          description="a region (us-central1) or a zone (us-central1-a)")
    name: str = Field("llm-fleet", pattern=DNS_LABEL)
    """The cluster's name; several specs may share one cluster."""
    mode: Literal["autopilot", "standard"] = "standard"
    """standard: node pools this product creates; autopilot: GKE makes nodes for the pods."""
    release_channel: Literal["rapid", "regular", "stable"] = "regular"
    """The GKE release channel a new cluster enrols in."""
    version: str | None = Field(None, pattern=r"^1\.\d+(\.\d+(-gke\.\d+)?)?$")
    """GKE version of a new cluster (1.30 or 1.30.5-gke.1014001); empty: the channel's default."""
    workload_identity: bool = True
    """Enable Workload Identity, so pods act as a Google service account (gcp_service_account)."""
    image_streaming: bool = True
    """Stream container images from Artifact Registry instead of pulling them whole (GKE image streaming)."""
    zones: list[str] = Field([], description=(
        "Zones of the location's region in failover order: the GPU node pool is created in the first one "
        "that has capacity, one zone at a time (a pool's min/max nodes count per zone, and one zone's "
        "stockout fails a multi-zone create). To spread replicas over zones, use capacity options."))
    failover_regions: list[str] = []
    """Other regions to try, in order, when every zone is stocked out."""
    node_pool_auto_creation: bool = False
    """With capacity options: let GKE create each option's node pool itself (ComputeClass
    nodePoolAutoCreation; Standard needs GKE 1.33.3+ or node auto-provisioning). Off: one pool per option is
    created up front, labelled and tainted for the class. Autopilot always auto-creates."""

    @property
    def region(self) -> str:
        return region_of(self.location)

    @property
    def is_zonal(self) -> bool:
        return self.location.count("-") == 2


class PoolSpec(_Model):
    """The GPU node pool's settings (Standard clusters)."""

    name: str = Field("gpu-pool", pattern=DNS_LABEL)
    """The node pool's name."""
    min_nodes: int = Field(0, ge=0)
    """Fewest nodes the cluster autoscaler keeps (0: the pool may empty while parked)."""
    max_nodes: int = Field(2, ge=1, le=100)
    """Most nodes the cluster autoscaler adds (a release needs room for a second color)."""
    initial_nodes: int = Field(1, ge=0)
    """Nodes the pool is created with."""
    disk_size_gb: int = Field(200, ge=50)
    """Boot disk per node, GB (images and the Hub cache without a PVC live there)."""
    local_ssd_count: int = Field(0, ge=0)
    """Local SSDs per node (ephemeral storage)."""


class AcceleratorSpec(_Model):
    """The GPU each replica gets."""

    type: str = "nvidia-l4"
    """The GPU type as GKE names it: nvidia-l4, nvidia-tesla-t4, nvidia-tesla-a100, nvidia-h100-80gb, ..."""
    count: int = Field(1, ge=1, le=8)  # = per node: one replica per GPU node
    """GPUs per replica."""
    machine_type: str | None = None
    """The node's machine type; empty: the smallest that carries `count` GPUs of `type` (g2-standard-8 for one L4)."""
    spot: bool = False
    """Spot VMs: cheaper, taken back with ~30 s notice (see on_spot_preemption)."""
    pool: PoolSpec = PoolSpec()
    """The GPU node pool's settings."""

    @property
    def info(self):
        return ACCELERATORS[self.type]

    @property
    def machine(self) -> str:
        return self.machine_type or self.info.machine_types[self.count]


Provisioning = Literal["spot", "on-demand", "flex-start", "reservation"]


class CapacityOption(_Model):
    """One place a replica may run, in the order GKE should try them (a ComputeClass priority): a GPU
    type and count, the machine, how the VM is bought, and the zones it may start in."""

    gpu: str = "nvidia-l4"
    """The GPU type as GKE names it (nvidia-l4, nvidia-tesla-a100, ...)."""
    count: int = Field(1, ge=1, le=8)  # = per node
    """GPUs per replica."""
    machine_type: str | None = None
    """The node's machine type; empty: the smallest that carries `count` GPUs."""
    provisioning: Provisioning = "on-demand"
    """How the VM is bought: spot (cheapest, preempted with ~30 s notice), on-demand, flex-start (Dynamic
    Workload Scheduler queues the VM, up to 7 days, runs at most 7 days) or reservation (the one named)."""
    reservation: str | None = Field(None, pattern=r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$",
                                    description="a Compute Engine reservation name")
    zones: list[str] = []
    """Zones this option may start nodes in; empty: cluster.zones."""
    max_nodes: int | None = Field(None, ge=1, le=100)
    """Most nodes of this option; empty: accelerator.pool.max_nodes."""
    name: str | None = Field(None, pattern=DNS_LABEL)
    """Its node pool's name; empty: derived from accelerator.pool.name."""

    @property
    def info(self):
        return ACCELERATORS[self.gpu]

    @property
    def machine(self) -> str:
        return self.machine_type or self.info.machine_types[self.count]

    @property
    def spot(self) -> bool:
        return self.provisioning == "spot"

    @property
    def quota_metric(self) -> str:
        """Spot and flex-start VMs draw on the preemptible GPU quota (GCE preemptible/DWS quota docs)."""
        return self.info.quota_metric_for(spot=self.provisioning in ("spot", "flex-start"))

    def label(self) -> str:
        """``1× nvidia-l4 spot in us-central1-b,c`` — how reports name the option."""
        how = f"reservation {self.reservation}" if self.provisioning == "reservation" else self.provisioning
        where = f" in {', '.join(self.zones)}" if self.zones else ""
        return f"{self.count}× {self.gpu} {how}{where}"


class CacheSpec(_Model):
    """A PersistentVolumeClaim the pods keep the Hub's downloads in, so a restart does not download again."""

    enabled: bool = True
    """Mount a cache PVC (off: weights go to the node's disk, downloaded again by each new pod)."""
    size: str = Field("100Gi", pattern=K8S_QUANTITY)
    """The claim's size, a Kubernetes quantity (100Gi)."""
    storage_class: str | None = "standard-rwo"
    """The StorageClass (GKE: standard-rwo, premium-rwo; standard-rwx for Filestore); empty: the cluster's default."""
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany"] = "ReadWriteOnce"
    """ReadWriteOnce: one node (Persistent Disk); ReadWriteMany: shared by replicas on several nodes (Filestore)."""
    mount_path: str = "/data"
    """Where the pods see it (the engine's Hub cache, HF_HOME, points there)."""
    keep_on_teardown: bool = False
    """Keep the PVC, and the weights in it, when teardown removes the model."""


class SecretSpec(_Model):
    """Where the HF token comes from and how the pods see it (never its value)."""

    name: str = Field("hf-secret", pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    """The Kubernetes Secret holding the token in the model's namespace."""
    key: str = Field("hf_token", pattern=r"^[-._a-zA-Z0-9]+$")
    """The Secret's key holding the token."""
    env: str = Field("HF_TOKEN", pattern=r"^[A-Z_][A-Z0-9_]*$")
    """The environment variable the engine reads it from."""
    prefect_block: str | None = "hf-token"
    """The Prefect Secret block deploy_model copies the token from; empty: the HF_TOKEN environment variable."""


class IngressSpec(_Model):
    """An Ingress in front of the live Service."""

    class_name: Literal["gce", "nginx"] = Field("gce", alias="class")
    """gce: a Google Cloud load balancer; nginx: ingress-nginx (installed in the cluster first)."""
    host: str | None = Field(None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    """Route only this host name; empty: any host."""
    tls_secret: str | None = None
    """A TLS Secret (tls.crt, tls.key) for HTTPS; empty: HTTP only."""
    cluster_issuer: str | None = None
    """A cert-manager ClusterIssuer that fills tls_secret."""
    static_ip_name: str | None = Field(None, pattern=r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$",
                                       description="gce: a reserved global static IP's name (gcloud compute "
                                       "addresses create NAME --global): lowercase letters, digits or '-'")
    rate_limit_rps: int | None = Field(None, ge=1)
    """nginx: requests per second per client IP (burst 5x); empty: no limit."""
    proxy_body_size: str = "10m"
    """nginx: the largest request body (10m; images for a VLM need more)."""
    read_timeout_s: int = Field(300, ge=1)
    """Seconds the load balancer waits for an answer (long generations and held requests need minutes)."""
    auth_secret: str | None = Field(None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    """nginx: an htpasswd Secret (key `auth`) for basic auth at the edge (seed 003's API key); in-cluster
    probes and the flows' checks go around it."""


GKE_GATEWAY_CLASSES = ("gke-l7-regional-external-managed", "gke-l7-rilb", "gke-l7-global-external-managed",
                       "gke-l7-cross-regional-internal-managed-mc")


class GatewaySpec(_Model):
    """The GKE Inference Gateway: a Gateway (this spec's own, or an existing one shared with other specs,
    routed by the OpenAI ``model`` field), an HTTPRoute, an InferencePool and an InferenceObjective per color."""

    class_name: Literal[GKE_GATEWAY_CLASSES] = Field("gke-l7-regional-external-managed", alias="class")
    """The GKE GatewayClass (regional or global, external or internal load balancer)."""
    existing: str | None = Field(None, pattern=DNS_LABEL)
    """Attach to this existing Gateway in the spec's namespace instead of rendering one."""
    host: str | None = Field(None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    """Route by this host name too; empty: any host."""
    priority: int = Field(0, ge=-1000, le=1000)
    """The InferenceObjective's priority: below 0 is sheddable under load."""
    epp_image: str = "registry.k8s.io/gateway-api-inference-extension/epp:v1.0.1"
    """The endpoint picker's image (picks the replica by queue and KV-cache use)."""

    @property
    def regional(self) -> bool:
        return self.class_name in ("gke-l7-regional-external-managed", "gke-l7-rilb")


class ExposeSpec(_Model):
    """How clients reach the model: the live Service, and an Ingress or Gateway in front of it."""

    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    """The live Service's type (LoadBalancer: an external address without an Ingress)."""
    port: int = Field(8080, ge=1, le=65535)
    """The Service's port."""
    ingress: IngressSpec | None = None
    """An Ingress in front of the live Service; empty: none."""
    gateway: GatewaySpec | None = None
    """The GKE Inference Gateway in front of the model (needed for canary releases); empty: none."""
    network_policy: bool = False
    """A NetworkPolicy admitting only the Ingress/Gateway, Prometheus and the API server's proxy (needs
    network policy enforcement: Dataplane V2, default on Autopilot)."""
    allow_from_namespaces: list[Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]] = []
    """With network_policy: more namespaces whose pods may call the model."""
    playground: bool = False
    """A chat web page beside the model (seed 004's web client): talks to the live Service, so to the color
    that serves, or to the hold proxy while parked; at /playground/ on the Ingress when there is one."""


class AutoscalingSpec(_Model):
    """A HorizontalPodAutoscaler on the engine's queue (or CPU)."""

    min_replicas: int = Field(1, ge=1)
    """Fewest replicas the HPA keeps."""
    max_replicas: int = Field(4, ge=1, le=100)
    """Most replicas the HPA adds (each needs a GPU node)."""
    metric: str | None = None
    """The per-pod metric to scale on; empty: the engine's queue gauge (e.g. TGI's tgi_queue_size)."""
    target_queue: float = Field(10, gt=0)
    """Average queued requests per pod the HPA aims for."""
    cpu_utilization: int | None = Field(None, ge=1, le=100)
    """Scale on CPU utilization (percent of requests) as well; empty: queue only."""
    scale_down_stabilization: Duration = timedelta(minutes=5)
    """How long the HPA waits before removing a replica."""


class AlertSpec(_Model):
    """Thresholds check_fleet alerts on (one Slack thread per incident)."""

    p95_latency_s: float = Field(5.0, gt=0)
    """p95 request latency above this, seconds."""
    queue_size: int = Field(50, ge=1)
    """Queued requests per pod above this."""
    min_success_rps: float | None = Field(None, ge=0)
    """Successful requests per second below this; empty: not checked."""


class MonitoringSpec(_Model):
    """How Managed Prometheus scrapes the engine's /metrics."""

    scrape: Literal["annotations", "podmonitoring", "none"] = "podmonitoring"
    """podmonitoring: a GMP PodMonitoring (what GKE's Managed Prometheus reads); annotations: prometheus.io
    annotations for a self-run Prometheus; none."""
    interval: Duration = timedelta(seconds=30)
    """How often the metrics are scraped."""
    alerts: AlertSpec | None = None
    """Alert thresholds; empty: no alerts."""


class AnalysisSpec(_Model):
    """A batch of test requests and what they must show."""

    requests: int = Field(20, ge=1)
    """Requests per batch."""
    concurrency: int = Field(4, ge=1, le=64)
    """Requests in flight at once."""
    max_error_rate: float = Field(0.0, ge=0, le=1)
    """Share of failed requests allowed (0: none)."""
    max_p95_latency_s: float = Field(10.0, gt=0)
    """p95 latency allowed, seconds."""
    min_tokens_per_s: float | None = Field(None, gt=0)
    """Generated tokens per second required; empty: not checked."""
    max_latency_ratio: float | None = Field(1.5, gt=1)
    """Candidate p50 latency ÷ the live color's, measured side by side (pre-promotion only); empty: off."""
    window: Duration = timedelta(seconds=60)
    """Post-promotion: keep analysing this long, one batch per interval (a failure switches back at once)."""
    interval: Duration = timedelta(seconds=10)
    """Post-promotion: time between batches."""


class CanaryStep(_Model):
    """One step of a canary release."""

    weight: int = Field(ge=1, le=100)
    """The candidate's share of the HTTPRoute's traffic, percent."""
    hold: Duration = timedelta(minutes=5)
    """Judged on real traffic over this window before the next step."""


class AnalysisQuery(_Model):
    """One metric judged per canary step, like an Argo AnalysisTemplate metric: PromQL over Managed Prometheus.
    ``{selector}`` in ``query`` becomes the color's pod selector, ``{window}`` the step's hold."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,40}$")
    """The metric's name in reports."""
    query: str = Field(min_length=1)
    """PromQL; {selector} is the color's pod selector, {window} the step's hold."""
    max: float | None = None
    """The candidate's value must not exceed this; empty: no bound."""
    min: float | None = None
    """The candidate's value must not fall below this; empty: no bound."""
    max_ratio: float | None = Field(None, gt=0)
    """Candidate ÷ live color over the same window must not exceed this; empty: no comparison."""
    min_ratio: float | None = Field(None, gt=0)
    """Candidate ÷ live color must reach this (e.g. tokens/s); empty: no comparison."""
    min_requests: int | None = Field(None, ge=0)
    """Too few requests in the window to judge: the step is held, not failed; empty: always judged."""


def _default_steps() -> list[CanaryStep]:
    return [CanaryStep(weight=w) for w in (5, 25, 50, 100)]


class ReleaseSpec(_Model):
    """How release_model replaces the serving color with a new revision or spec."""

    strategy: Literal["blue-green", "recreate", "canary"] = "blue-green"
    """blue-green: the candidate runs beside the live color (2x GPUs), checked, then switched; recreate: the
    live color stops first (the model is down while the new one loads); canary (Gateway only): traffic moves
    to the candidate step by step, each step judged on real traffic against the live color."""
    steps: list[CanaryStep] = Field(default_factory=_default_steps, min_length=1)
    """Canary: the candidate's traffic share per step (default 5, 25, 50, 100 %)."""
    analysis: list[AnalysisQuery] | None = None
    """Canary: the metrics judged per step; empty: the engine's defaults (errors, latency, tokens/s)."""
    smoke_prompts: list[str] = Field(default_factory=lambda: ["Say hello in one short sentence."], min_length=1)
    """Prompts the new color must answer before it gets traffic."""
    smoke_max_tokens: int = Field(32, ge=1, le=4096)
    """Tokens per smoke answer."""
    expect: str | None = None
    """A regular expression every smoke answer must match; empty: any non-empty answer."""
    pre_promotion: AnalysisSpec = AnalysisSpec()
    """Checks on the candidate through its preview Service, before the switch."""
    post_promotion: AnalysisSpec = AnalysisSpec()
    """Checks after the switch; a failure switches back to the old color at once."""
    scale_down_delay: Duration = timedelta(seconds=30)
    """The old color stays warm this long after the switch (load balancers catch up; rollback_model can
    switch back instantly meanwhile)."""
    auto_promote: bool = True
    """false: a manual gate after the pre-promotion analysis — the release pauses until someone resumes it
    with promote true (switch) or false (roll back)."""
    promotion_timeout: Duration = timedelta(hours=1)
    """With auto_promote false: no answer within this rolls back."""

    @field_validator("expect")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"{v!r} is not a regular expression ({exc}); escape literal brackets") from None
        return v


class ScheduleSpec(_Model):
    """When the model is parked (no GPU, requests held) and woken."""

    timezone: str = "UTC"
    """The IANA time zone the cron lines are read in (Europe/Paris)."""
    park: str | None = None
    """Cron: when to scale to zero (0 20 * * 1-5); empty: no scheduled park."""
    wake: str | None = None
    """Cron: when to be serving again (the wake starts early by prewarm); empty: no scheduled wake."""
    idle_after: Duration | None = None
    """Park when no request came for this long; empty: no idle parking."""
    prewarm: Duration = timedelta(minutes=5)
    """Lead time of a scheduled wake until wakes were measured; then the p95 of measured wake times."""
    idle_in_awake_window: bool = False
    """May idle parking act between a scheduled wake and the next scheduled park?"""
    learned_idle: bool = True
    """Park after one idle minute (not idle_after) in hours of the day whose learned arrival rate puts the
    next request further away than two wakes."""

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {v!r}; use an IANA name such as Europe/Paris") from exc
        return v

    @field_validator("park", "wake")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is not None and not croniter.is_valid(v):
            raise ValueError(f"{v!r} is not a cron expression; use five fields, e.g. '0 20 * * 1-5'")
        return v


class HoldSpec(_Model):
    """Requests that arrive while parked: an always-on CPU proxy holds them and asks for a wake."""

    enabled: bool = True
    """Hold requests while parked (off: the Service has no backend, clients are refused)."""
    max_queue: int = Field(10_000, ge=1)  # Knative's activator holds up to 10,000 per revision
    """Most requests held at once; more get 503."""
    timeout: Duration = timedelta(seconds=300)  # Knative's request timeout
    """How long a request is held; past it: 503 with Retry-After."""
    retry_after: Duration = timedelta(seconds=30)
    """The Retry-After a refused request gets."""
    # Named once, by LLM_FLEET_IMAGE (what the sandbox's env file sets, and the production deployments run);
    # the spec may name another. Checked before park or a playground deploy does anything.
    image: str | None = Field(default_factory=lambda: os.environ.get("LLM_FLEET_IMAGE") or None, description=(
        "The hold proxy's (and playground's) image: the flows image the README builds from the Dockerfile; "
        "default: $LLM_FLEET_IMAGE"))
    prefect_api_url: str | None = None
    """The Prefect API as the cluster reaches it (the proxy posts its wake event there); empty: the flow's own."""


class VertexSpec(_Model):
    """Seed 002: the model on a Vertex AI endpoint (target: vertex)."""

    endpoint_display_name: str
    """The Vertex AI endpoint's display name (found again by it)."""
    machine_type: str = "g2-standard-12"
    """The serving machine type."""
    accelerator_type: Literal["NVIDIA_L4", "NVIDIA_TESLA_T4", "NVIDIA_TESLA_A100", "NVIDIA_H100_80GB"] = "NVIDIA_L4"
    """The GPU type as Vertex AI names it."""
    accelerator_count: int = Field(1, ge=1, le=8)
    """GPUs per replica."""
    min_replica_count: int = Field(1, ge=1)
    """Replicas always running."""
    max_replica_count: int = Field(1, ge=1)
    """Most replicas."""
    serving_container_image_uri: str = (
        "us-docker.pkg.dev/vertex-ai/vertex-vision-model-garden-dockers/pytorch-vllm-serve:latest"
    )
    """The serving container (Model Garden's vLLM image by default)."""
    artifact_uri: str | None = None
    """A Cloud Storage folder with the weights; empty: the container downloads the Hub model."""
    health_route: str = "/health"
    """The container's health route."""
    predict_route: str = "/generate"
    """The container's predict route."""
    port: int = 8080
    """The container's port."""


def _shorthand(key: str):
    def to_mapping(value: Any) -> Any:
        return {key: value} if isinstance(value, str) else value

    return BeforeValidator(to_mapping)


class DeploymentSpec(_Model):
    """One model deployment: the model, its engine, GPUs, cluster, exposure, autoscaling, monitoring, release
    policy and schedule (one YAML file per model under deployments/)."""

    name: str = Field(pattern=DNS_LABEL, description="a DNS label: lowercase letters, digits and '-', "
                      "starting with a letter, at most 40 characters (it prefixes every object name)")
    target: Literal["gke", "vertex"] = "gke"
    """Where the model is served: gke (a GKE cluster) or vertex (a Vertex AI endpoint, see `vertex`)."""
    model: Annotated[ModelRef, _shorthand("id")]
    """The Hub model: its id (google/gemma-2-2b-it), or the id with a revision and task."""
    engine: Annotated[EngineSpec, _shorthand("kind")] = EngineSpec()
    """The model server: its kind (vllm, tgi, sglang), or the kind with its settings."""
    cluster: ClusterSpec
    """The GKE cluster: project, location, zones, mode."""
    accelerator: Annotated[AcceleratorSpec, _shorthand("type")] = AcceleratorSpec()
    """The GPU per replica: its type (nvidia-l4), or the type with count, machine and node pool."""
    capacity: list[CapacityOption] | None = Field(None, min_length=1, max_length=10)
    """Where replicas may run, most preferred first (GKE ComputeClass priorities: GPU, machine, spot/on-demand,
    zones). Without it, the accelerator is the one option; with it, the first option is the accelerator (keep
    only accelerator.pool)."""
    namespace: str = Field("default", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    """The Kubernetes namespace of the model's objects."""
    replicas: int = Field(1, ge=0, le=100)
    """Pods serving the model (each on its own GPU node); with autoscaling the HPA decides."""
    on_spot_preemption: Literal["keep_serving", "accept_gap"] = "keep_serving"
    """What a spot preemption may cost (GCE takes a Spot VM back with ~30 s notice; the replacement loads for
    minutes). keep_serving: at least 2 replicas, spread over zones under a PodDisruptionBudget, so a Ready one
    always serves. accept_gap: one replica; while its replacement loads, clients' connections are refused."""
    cache: CacheSpec = CacheSpec()
    """The PVC the Hub's downloads are kept in."""
    startup: StartupSpec = StartupSpec()
    """Fast-start paths: the image from Artifact Registry / a secondary boot disk, the weights from Cloud
    Storage or Hyperdisk ML, CUDA graphs. Left out: the image from its registry, the weights from the Hub."""
    secret: SecretSpec = SecretSpec()
    """The HF token's Secret."""
    expose: ExposeSpec = ExposeSpec()
    """How clients reach the model: Service, Ingress or Gateway, network policy, playground."""
    autoscaling: AutoscalingSpec | None = None
    """An HPA on the engine's queue; empty: a fixed number of replicas."""
    monitoring: MonitoringSpec = MonitoringSpec()
    """Metrics scraping and alerts."""
    release: ReleaseSpec = ReleaseSpec()
    """How a new revision or spec replaces the serving one: strategy, smoke prompts, analysis, promotion."""
    schedule: ScheduleSpec | None = None
    """When to park (scale to zero) and wake; empty: always on."""
    hold: HoldSpec = HoldSpec()
    """What happens to requests while parked."""
    slack_channel: str | None = Field(None, pattern=r"^[#@]?[-_a-z0-9.]{1,80}$")
    """The Slack channel each run's thread goes to (#ml-serving); empty: no Slack."""
    service_account: str | None = Field(None, pattern=DNS_LABEL)
    """The pods' Kubernetes service account (Workload Identity, seed 004); empty: the namespace's default."""
    gcp_service_account: str | None = Field(None, pattern=r"^[^@\s]+@[^@\s]+\.gserviceaccount\.com$",
                                            description="a Google service account e-mail (...@PROJECT.iam.gserviceaccount.com)")
    load_timeout: Duration | None = None
    """Upper bound for "pod created -> model answers"; empty: sized to the model."""
    keep_for_debug: bool = False
    """On a failed deploy keep the failing pods for debugging (they cost GPU money)."""
    vertex: VertexSpec | None = None
    """target: vertex — the Vertex AI endpoint's settings."""

    @model_validator(mode="before")
    @classmethod
    def _first_option_is_the_accelerator(cls, data: Any) -> Any:
        """With ``capacity:``, the accelerator (what the single-pool paths read) is its first option."""
        if not isinstance(data, dict) or not isinstance(data.get("capacity"), list) or not data["capacity"]:
            return data
        first, acc = data["capacity"][0], data.get("accelerator")
        if not isinstance(first, dict):
            return data
        if isinstance(acc, str) or (isinstance(acc, dict) and set(acc) - {"pool"}):
            extra = "type" if isinstance(acc, str) else ", ".join(sorted(set(acc) - {"pool"}))
            raise SpecError(f"accelerator.{extra.split(', ')[0]}", "capacity: lists the GPUs already "
                            f"(accelerator {extra} would be a second, conflicting answer)",
                            "move it into the first capacity option and keep only accelerator.pool")
        derived = {"type": first.get("gpu", "nvidia-l4"), "count": first.get("count", 1),
                   "machine_type": first.get("machine_type"), "spot": first.get("provisioning") == "spot"}
        if isinstance(acc, dict) and "pool" in acc:
            derived["pool"] = acc["pool"]
        if first.get("name"):  # the first option's pool is the accelerator's pool (park/wake/release read it)
            derived["pool"] = {**(derived.get("pool") or {}), "name": first["name"]}
        return {**data, "accelerator": derived}

    # Cross-field checks: raised as SpecError so the field path is exact.
    @model_validator(mode="after")
    def _consistent(self) -> DeploymentSpec:
        self._check_capacity()
        acc, eng = self.accelerator, self.engine
        if acc.type not in ACCELERATORS:
            close = difflib.get_close_matches(acc.type, ACCELERATORS, n=1)
            raise SpecError("accelerator.type", f"unknown accelerator {acc.type!r}",
                            f"use {close[0]!r}" if close else f"use one of {', '.join(ACCELERATORS)}")
        if acc.machine_type is None and acc.count not in acc.info.machine_types:
            raise SpecError("accelerator.count", f"{acc.type} nodes come with "
                            f"{'/'.join(map(str, acc.info.machine_types))} GPUs, not {acc.count}",
                            "pick one of those counts or set accelerator.machine_type")
        if eng.tensor_parallel > acc.count:
            raise SpecError("engine.tensor_parallel",
                            f"{eng.tensor_parallel} shards need {eng.tensor_parallel} GPUs per replica "
                            f"but accelerator.count is {acc.count}",
                            f"set accelerator.count to {eng.tensor_parallel} or lower engine.tensor_parallel")
        if self.model.is_vision:
            family = self.model.id.split("/", 1)[1].lower()
            if not any(family.startswith(p) for p in VLM_SUPPORT[eng.kind]):
                able = [k for k, fams in VLM_SUPPORT.items() if any(family.startswith(p) for p in fams)]
                raise SpecError("engine.kind", f"{eng.kind} cannot serve the vision-language model {self.model.id}",
                                f"use engine.kind {' or '.join(able)}" if able else "pick a supported VLM")
        if any(a.split("=", 1)[0] == "--trust-remote-code" for a in eng.extra_args) or any(
                k == "TRUST_REMOTE_CODE" for k in eng.env):
            raise SpecError("engine.extra_args", "--trust-remote-code runs Python code from the model repository",
                            "drop it from extra_args/env and set engine.trust_remote_code: true if the model "
                            "really needs it (pin model.revision to a commit you have read)")
        if eng.quantization and eng.kind == "tgi" and eng.quantization in ("int8",):
            raise SpecError("engine.quantization", "TGI has no plain int8 mode", "use bitsandbytes, eetq, awq or gptq")
        pool = acc.pool
        if pool.min_nodes > pool.max_nodes:
            raise SpecError("accelerator.pool.min_nodes", f"{pool.min_nodes} is above max_nodes {pool.max_nodes}",
                            "lower min_nodes or raise max_nodes")
        if not pool.min_nodes <= pool.initial_nodes <= pool.max_nodes:
            raise SpecError("accelerator.pool.initial_nodes",
                            f"{pool.initial_nodes} is outside [{pool.min_nodes}, {pool.max_nodes}]",
                            "set it between min_nodes and max_nodes")
        if self.cluster.mode == "standard" and self.target == "gke" and self.replicas > pool.max_nodes:
            raise SpecError("replicas", f"{self.replicas} replicas need {self.replicas} GPU nodes but "
                            f"accelerator.pool.max_nodes is {pool.max_nodes}",
                            f"raise accelerator.pool.max_nodes to {self.replicas}")
        for i, zone in enumerate(self.cluster.zones):
            if not zone.startswith(self.cluster.region + "-"):
                raise SpecError(f"cluster.zones[{i}]", f"{zone} is not in region {self.cluster.region}",
                                f"use zones like {self.cluster.region}-a")
        if self.cluster.is_zonal and self.cluster.failover_regions:
            raise SpecError("cluster.failover_regions", "a zonal cluster cannot move to another region",
                            "set cluster.location to a region to allow regional failover")
        ing = self.expose.ingress
        if ing is not None:
            if ing.tls_secret and not ing.host:
                raise SpecError("expose.ingress.host", "TLS needs a host name for the certificate",
                                "set expose.ingress.host (e.g. llm.example.com) or drop tls_secret")
            if ing.cluster_issuer and not ing.tls_secret:
                raise SpecError("expose.ingress.tls_secret", "cert-manager needs a Secret name to write the cert to",
                                "set expose.ingress.tls_secret")
            if ing.rate_limit_rps and ing.class_name != "nginx":
                raise SpecError("expose.ingress.rate_limit_rps", "the GCE load balancer has no per-client rate limit",
                                "use ingress class nginx, or Cloud Armor outside this spec")
            if ing.auth_secret and ing.class_name != "nginx":
                raise SpecError("expose.ingress.auth_secret", "the GCE load balancer cannot check credentials",
                                "use ingress class nginx, or IAP outside this spec")
            if ing.static_ip_name and ing.class_name != "gce":
                raise SpecError("expose.ingress.static_ip_name", "a global static IP only applies to class gce",
                                "drop static_ip_name or use class gce")
        if self.expose.network_policy and self.expose.service_type == "LoadBalancer" and ing is None:
            raise SpecError("expose.network_policy", "a LoadBalancer Service is reached straight from clients, "
                            "so there is no gateway to admit", "add expose.ingress, or list the clients' "
                            "namespaces in expose.allow_from_namespaces and use service_type ClusterIP")
        gw = self.expose.gateway
        if gw is not None and ing is not None:
            raise SpecError("expose.gateway", "a model is exposed by an Ingress or by a Gateway, not both",
                            "drop expose.ingress (the Gateway replaces it) or expose.gateway")
        if self.release.strategy == "recreate" and gw is not None:
            raise SpecError("release.strategy", "recreate stops the live color first; on a Gateway the HTTPRoute "
                            "moves traffic between two warm colors", "use blue-green (one step) or canary")
        if self.release.strategy == "canary" and gw is None:
            raise SpecError("release.strategy", "a canary shifts HTTPRoute weights, so it needs a Gateway",
                            "add expose.gateway (class gke-l7-regional-external-managed), or use blue-green")
        weights = [s.weight for s in self.release.steps]
        if weights != sorted(set(weights)) or weights[-1] != 100:
            raise SpecError("release.steps", f"weights {weights} must rise step by step and end at 100",
                            "e.g. steps: [{weight: 5}, {weight: 25}, {weight: 50}, {weight: 100}]")
        if self.expose.allow_from_namespaces and not self.expose.network_policy:
            raise SpecError("expose.allow_from_namespaces", "only applies with a NetworkPolicy",
                            "set expose.network_policy: true or drop allow_from_namespaces")
        hpa = self.autoscaling
        self._check_spot_replicas()
        if hpa is not None and hpa.min_replicas > hpa.max_replicas:
            raise SpecError("autoscaling.min_replicas", f"{hpa.min_replicas} is above max_replicas {hpa.max_replicas}",
                            "lower min_replicas or raise max_replicas")
        if hpa is not None and self.cluster.mode == "standard" and hpa.max_replicas > pool.max_nodes:
            raise SpecError("autoscaling.max_replicas", f"{hpa.max_replicas} replicas cannot fit on "
                            f"{pool.max_nodes} GPU nodes", f"raise accelerator.pool.max_nodes to {hpa.max_replicas}")
        sched = self.schedule
        if sched is not None and (sched.park is None) != (sched.wake is None):
            missing = "wake" if sched.wake is None else "park"
            raise SpecError(f"schedule.{missing}", "park and wake go together",
                            f"set schedule.{missing} too, or use schedule.idle_after alone")
        rel = self.release
        timeout_s = rel.promotion_timeout.total_seconds()
        if not MIN_PROMOTION_TIMEOUT_S <= timeout_s <= MAX_PROMOTION_TIMEOUT_S:
            raise SpecError("release.promotion_timeout",
                            f"{timeout_s:g}s is outside 1m..24h" + (" (a person needs time to check the preview)"
                                                                     if timeout_s < MIN_PROMOTION_TIMEOUT_S else
                                                                     " (the candidate holds its GPUs and the model's "
                                                                     "lock while it waits)"),
                            "use a duration such as 30m or 2h (default 1h)")
        if not rel.auto_promote and rel.strategy == "recreate":
            raise SpecError("release.auto_promote", "a manual promotion gate with strategy recreate would keep the "
                            "model down (the live color is stopped first) while it waits for a person",
                            "use release.strategy: blue-green with auto_promote: false, or keep auto_promote: true")
        if not rel.auto_promote and self.target == "vertex":
            raise SpecError("release.auto_promote", "target vertex has no preview to check: a model at 0 % "
                            "traffic on the endpoint cannot be reached (docs/vertex.md)",
                            "keep auto_promote: true (the analysis gates the release) or use target: gke")
        if self.target == "vertex" and self.vertex is None:
            raise SpecError("vertex", "target vertex needs a vertex section",
                            "add vertex.endpoint_display_name (and machine/accelerator settings)")
        if self.service_account is None and self.gcp_service_account is not None:
            raise SpecError("service_account", "workload identity needs a Kubernetes service account to annotate",
                            "set service_account (e.g. vllm)")
        check_startup(self, SpecError)
        return self

    def _check_spot_replicas(self) -> None:
        """A single replica on spot capacity loses the model at every preemption (issue 19, I3: found by the
        campaign): refused unless the spec says it accepts that gap."""
        spot = next((i for i, opt in enumerate(self.capacity_options) if opt.spot), None)
        if spot is None or self.target != "gke" or self.on_spot_preemption == "accept_gap":
            return
        least = self.autoscaling.min_replicas if self.autoscaling else self.replicas
        if least >= 2 or self.replicas == 0:
            return
        where = f"capacity[{spot}]" if self.capacity else "accelerator.spot"
        field = "autoscaling.min_replicas" if self.autoscaling else "replicas"
        raise SpecError(field, f"1 replica on spot capacity ({where}): when GCE preempts its node (~30 s notice) "
                        "the Service has no endpoint until a replacement loads, and clients' connections are refused "
                        "for minutes", f"set {field}: 2 (one per node, spread over zones, under a "
                        "PodDisruptionBudget), or on_spot_preemption: accept_gap to take that gap knowingly")

    @property
    def keeps_serving_through_preemption(self) -> bool:
        """Spot in the options and >= 2 replicas: render the zone spread and the PodDisruptionBudget."""
        least = self.autoscaling.min_replicas if self.autoscaling else self.replicas
        return any(opt.spot for opt in self.capacity_options) and least >= 2

    def _check_capacity(self) -> None:
        """Each option on its own: a known GPU in the cluster's region, a machine that carries it, room for
        the engine's shards, the weights (when the model id names its size) — the first problem, named."""
        if not self.capacity:
            return
        if self.cluster.failover_regions:
            raise SpecError("cluster.failover_regions", "capacity options name zones of the cluster's region; "
                            "the cluster does not move region when they are stocked out",
                            "drop failover_regions, and add options (other zones, GPU types, on-demand) instead")
        names_seen: dict[str, int] = {}
        hint = params_hint(self.model.id)
        for i, opt in enumerate(self.capacity):
            at = f"capacity[{i}]"
            if opt.gpu not in ACCELERATORS:
                close = difflib.get_close_matches(opt.gpu, ACCELERATORS, n=1)
                raise SpecError(f"{at}.gpu", f"unknown accelerator {opt.gpu!r}",
                                f"use {close[0]!r}" if close else f"use one of {', '.join(ACCELERATORS)}")
            if opt.machine_type is None and opt.count not in opt.info.machine_types:
                raise SpecError(f"{at}.count", f"{opt.gpu} nodes come with "
                                f"{'/'.join(map(str, opt.info.machine_types))} GPUs, not {opt.count}",
                                "pick one of those counts or set machine_type")
            if (opt.provisioning == "reservation") != (opt.reservation is not None):
                raise SpecError(f"{at}.reservation", "a reservation name goes with provisioning: reservation"
                                if opt.reservation else "provisioning: reservation needs the reservation's name",
                                "set both provisioning: reservation and reservation: NAME, or neither")
            if opt.count < self.capacity[0].count:
                raise SpecError(f"{at}.count", f"the pods ask for {self.capacity[0].count} GPUs (capacity[0]) but "
                                f"{opt.label()} has {opt.count}: they could never start there",
                                f"set count ≥ {self.capacity[0].count} on this option, or drop it")
            if self.engine.tensor_parallel > opt.count:
                raise SpecError(f"{at}.count", f"{opt.label()} cannot hold engine.tensor_parallel "
                                f"{self.engine.tensor_parallel} ({self.engine.tensor_parallel} GPUs per replica)",
                                f"set count: {self.engine.tensor_parallel} on this option, or drop the option")
            for j, zone in enumerate(opt.zones):
                if not zone.startswith(self.cluster.region + "-"):
                    raise SpecError(f"{at}.zones[{j}]", f"{zone} is not in region {self.cluster.region}",
                                    f"use zones like {self.cluster.region}-b")
            pool = self.option_pool(i)
            if pool in names_seen:
                raise SpecError(f"{at}.name", f"node pool {pool!r} is also capacity[{names_seen[pool]}]'s",
                                "give each option its own name")
            names_seen[pool] = i
            if self.cluster.mode == "standard" and self.replicas > self.option_max_nodes(i):
                raise SpecError(f"{at}.max_nodes", f"{self.replicas} replicas cannot fit on "
                                f"{self.option_max_nodes(i)} nodes of {opt.label()}",
                                f"raise max_nodes to {self.replicas}")
            if hint is not None:
                fit = check_fit(self, hint, option=opt)
                if not fit.fits:
                    raise SpecError(at, f"{fit.message(self, option=opt)} (the model id names ~{hint / 1e9:g}B "
                                    "params)", fit_fix(self, fit, option=opt, where=at))

    # ---- derived values the rest of the product uses ----------------------------------------
    @property
    def capacity_options(self) -> list[CapacityOption]:
        """Where replicas may run, most preferred first; today's single accelerator is a one-option list."""
        if self.capacity:
            return list(self.capacity)
        acc = self.accelerator
        return [CapacityOption(gpu=acc.type, count=acc.count, machine_type=acc.machine_type,
                               provisioning="spot" if acc.spot else "on-demand")]

    def option_pool(self, index: int) -> str:
        """The node pool of option ``index``: the first keeps ``accelerator.pool.name`` (today's pool)."""
        opt = self.capacity_options[index]
        if opt.name:
            return opt.name
        base = self.accelerator.pool.name
        return base if index == 0 else f"{base[:36].rstrip('-')}-{index}"

    def option_zones(self, index: int) -> list[str]:
        return list(self.capacity_options[index].zones or self.cluster.zones)

    def option_max_nodes(self, index: int) -> int:
        return self.capacity_options[index].max_nodes or self.accelerator.pool.max_nodes

    @property
    def warnings(self) -> list[str]:
        """Valid but risky choices, for `llm-fleet validate` and the deploy log."""
        out = []
        if self.engine.trust_remote_code:
            pinned = re.fullmatch(r"[0-9a-f]{40}", self.model.revision or "")
            out.append(f"engine.trust_remote_code: the pods run Python code from {self.model.id}"
                       + ("" if pinned else f" at {self.model.revision!r}, which can change under you — pin "
                          "model.revision to a commit you have read"))
        rel = self.release
        if not rel.auto_promote:
            out.append(f"release.auto_promote false: every release waits at its promotion gate for a person (up to "
                       f"{human_duration(rel.promotion_timeout.total_seconds())}), holding both colors' GPUs and the model's lock meanwhile")
        elif "promotion_timeout" in rel.model_fields_set:
            out.append("release.promotion_timeout has no effect while release.auto_promote is true")
        return out

    @property
    def gpus_per_replica(self) -> int:
        return self.accelerator.count

    @property
    def max_gpus(self) -> int:
        """GPUs the spec may hold at once (quota must cover this): two colors during a release."""
        replicas = max(self.replicas, self.autoscaling.max_replicas if self.autoscaling else 0)
        if self.cluster.mode == "standard":
            replicas = max(replicas, self.accelerator.pool.max_nodes)
        return replicas * self.accelerator.count

    def default_load_timeout(self, params: int | None = None) -> timedelta:
        """Pod scheduled -> model answering: node boot + image pull + weights, with margin."""
        if self.load_timeout is not None:
            return self.load_timeout
        b = (params or 7_000_000_000) / 1e9
        return timedelta(seconds=600 + 60 * b)


class FitReport(BaseModel):
    params: int
    weight_format: str
    weights_gib: float
    required_gib: float
    available_gib: float
    fits: bool

    def message(self, spec: DeploymentSpec, *, option: CapacityOption | None = None) -> str:
        count, gpu = (option.count, option.gpu) if option else (spec.accelerator.count, spec.accelerator.type)
        return (f"{spec.model.id} needs ~{self.required_gib:.1f} GiB ({self.params / 1e9:.2f}B params × "
                f"{BYTES_PER_PARAM[self.weight_format]:g} bytes as {self.weight_format}, +20% and 1 GiB headroom) "
                f"but {count} × {gpu} has {self.available_gib:.0f} GiB"
                + (f" at engine.gpu_memory_utilization {spec.engine.gpu_memory_utilization:g}"
                   if spec.engine.gpu_memory_utilization else ""))


def check_fit(spec: DeploymentSpec, params: int, *, option: CapacityOption | None = None) -> FitReport:
    """Do the weights fit the GPUs of one replica (of ``option``, default the accelerator)? Pure; the HF
    preflight supplies ``params``. The engine may use only ``gpu_memory_utilization`` of the memory."""
    fmt = spec.engine.weight_format
    need = required_gib(params, fmt)
    info, count = (option.info, option.count) if option else (spec.accelerator.info, spec.accelerator.count)
    have = info.memory_gib * count * (spec.engine.gpu_memory_utilization or 1.0)
    return FitReport(params=params, weight_format=fmt, weights_gib=round(params * BYTES_PER_PARAM[fmt] / 2**30, 2),
                     required_gib=round(need, 2), available_gib=have, fits=need <= have)


def check_fit_all(spec: DeploymentSpec, params: int) -> list[tuple[int, CapacityOption, FitReport]]:
    """``check_fit`` for every capacity option, in order (the HF preflight with the real parameter count)."""
    return [(i, opt, check_fit(spec, params, option=opt)) for i, opt in enumerate(spec.capacity_options)]


def fit_fix(spec: DeploymentSpec, report: FitReport, *, option: CapacityOption | None = None,
            where: str = "accelerator") -> str:
    """The cheapest change that makes ``report`` fit, as advice."""
    info, have = (option.info, option.count) if option else (spec.accelerator.info, spec.accelerator.count)
    for count in sorted(info.machine_types):
        if count > have and report.required_gib <= info.memory_gib * count:
            return (f"set {where}.count: {count} and engine.tensor_parallel: {count}, "
                    "or use a quantized variant (engine.quantization: awq)"
                    + (", or drop this option" if option is not None and spec.capacity else ""))
    return "use a larger accelerator (nvidia-a100-80gb / nvidia-h100-80gb) or a quantized variant"


_PARAMS_IN_ID = re.compile(r"(?:^|[-_/.])(\d+(?:\.\d+)?)[bB](?=$|[-_.])")


def params_hint(model_id: str) -> int | None:
    """The parameter count a Hub id names (``Mistral-7B-v0.1`` -> 7e9), or None: a validate-time estimate
    only; the HF preflight checks again with the repo's safetensors count."""
    m = _PARAMS_IN_ID.search(model_id.split("/", 1)[-1])
    return int(float(m.group(1)) * 1e9) if m else None


# ---- loading ------------------------------------------------------------------------------------

def _field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("function-", "constrained-", "str", "dict", "json-or-python")):
            continue  # pydantic's union/validator branch names, not user fields
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: Any = DeploymentSpec
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return model if isinstance(model, type) else None
        ann = field.annotation
        for cand in (ann, *getattr(ann, "__args__", ())):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                model = cand
                break
        else:
            return None
    return model


def _to_spec_error(err: ValidationError, source: str | None) -> SpecError:
    first = err.errors(include_url=False)[0]
    loc = tuple(first["loc"])
    path = _field_path(loc)
    kind, msg = first["type"], first["msg"]
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        known = list(parent.model_fields) if parent else []
        aliases = [f.alias for f in (parent.model_fields.values() if parent else []) if f.alias]
        close = difflib.get_close_matches(str(loc[-1]), known + aliases, n=1)
        fix = f"did you mean {close[0]!r}?" if close else (f"known fields: {', '.join(known)}" if known else "remove it")
        return SpecError(path, "unknown field", fix, source=source)
    if kind == "missing":
        return SpecError(path, "is required", "add it to the spec", source=source)
    if kind == "literal_error":
        return SpecError(path, f"{first.get('input')!r} is not allowed", msg.replace("Input should be", "use"),
                         source=source)
    if kind == "string_pattern_mismatch":
        parent = _model_at(loc[:-1])
        field = parent.model_fields.get(str(loc[-1])) if parent else None
        hint = field.description.rstrip(".") if field is not None and field.description else None
        pattern = f"match the pattern {first.get('ctx', {}).get('pattern')}"
        return SpecError(path, f"{first.get('input')!r} is not valid", f"{pattern} ({hint})" if hint else pattern,
                         source=source)
    if kind == "value_error":
        return SpecError(path, msg.removeprefix("Value error, "), source=source)
    if kind in ("bool_parsing", "bool_type"):
        return SpecError(path, f"{first.get('input')!r} is not a boolean", "use true or false", source=source)
    return SpecError(path, msg, f"got {first.get('input')!r}", source=source)


def parse_spec(data: Any, *, source: str | None = None) -> DeploymentSpec:
    if not isinstance(data, dict):
        raise SpecError("(top level)", "a spec is a YAML mapping", "start with 'name: ...'", source=source)
    try:
        return DeploymentSpec.model_validate(data)
    except SpecError as exc:
        exc.source = source
        exc.args = (str(SpecError(exc.field, exc.problem, exc.fix, source=source)),)
        raise
    except ValidationError as exc:
        raise _to_spec_error(exc, source) from None


def load_spec(path: str | Path) -> DeploymentSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError("(file)", f"cannot read {path}: {exc.strerror}", "check the path", source=str(path)) from None
    try:
        data = yamlio.load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError("(yaml)", f"not valid YAML{where}", "fix the indentation or quoting there",
                        source=str(path)) from None
    return parse_spec(data, source=str(path))


def resolve_spec(spec: DeploymentSpec | str | Path | dict[str, Any]) -> DeploymentSpec:
    """Flows accept a spec object, a path to a YAML file, or a mapping (Prefect parameters)."""
    if isinstance(spec, DeploymentSpec):
        return spec
    if isinstance(spec, dict):
        return parse_spec(spec, source="(parameters)")
    return load_spec(spec)


def resolve_gke_spec(spec: DeploymentSpec | str | Path | dict[str, Any], *, flow: str) -> DeploymentSpec:
    """resolve_spec, refusing specs a GKE-only step cannot run (target: vertex has its own, targets/vertex/)."""
    spec = resolve_spec(spec)
    if spec.target != "gke":
        raise SpecError("target", f"{flow} runs on GKE; this spec targets {spec.target}",
                        "target: vertex runs through deploy_model, release_model, park_model/wake_model and "
                        "teardown (Vertex AI provisions the machines: there is no cluster step)")
    return spec


def with_revision(spec: DeploymentSpec, revision: str | None) -> DeploymentSpec:
    """The spec with ``model.revision`` replaced (a deploy or release of a given commit, branch or tag)."""
    if not revision:
        return spec
    return spec.model_copy(update={"model": spec.model.model_copy(update={"revision": revision})})
