"""The model-server runtime of the sandbox's pods: vLLM, TGI and SGLang over real HTTP, without a GPU.

The kube controller (sandbox/kube) calls, for each container start of a pod::

    behavior = runtime.behavior_for(pod)          # one call = one start attempt (counts a rule's use)
    if behavior.mode == "image_pull_error": ...   # the controller's business: ErrImagePull/ImagePullBackOff
    server = runtime.start(pod, on_ready=fn(), on_exit=fn(exit_code, reason))

``start`` returns a :class:`~sandbox.engines.podserver.PodServer` already listening on a loopback port. It
starts for the time ``sandbox.coldstart`` gives (``start_plan``: engine init, the weights' bytes -- the
Hub's parameter count, fallback 7B -- at their source's bandwidth, CUDA graph capture), scaled by the
clock (or a behavior's ``load_seconds``), writing the engine's real start-up log lines, then calls ``on_ready()``. ``crash_loop``
and ``oom`` write a realistic traceback partway through loading, close the port (the process died) and
call ``on_exit(1, "Error")`` / ``on_exit(137, "OOMKilled")``. A model whose weights cannot fit on the
pod's GPUs (node selector ``cloud.google.com/gke-accelerator`` × ``nvidia.com/gpu`` limit, e.g. a 70B
model on one L4) goes OOM by itself, like the real thing (``ModelRuntime(auto_oom=False)`` turns that
off); arguments the engine refuses (``sandbox/engines/checks.py``) exit the container before loading.

The engine is picked from the pod's first container (``sandbox/engines/container.py``); its HTTP API is
``sandbox/engines/vllm.py``, ``tgi.py``, ``sglang.py`` or ``generic.py``, unless an image with its own
serving protocol registered a handler in :data:`HANDLER_OVERRIDES` (``sandbox/vertex.py``: Model Garden
vLLM). What the engine reads from the Hub at start (config, chat template, context length, weight size)
comes from the Hub emulator when it knows the model.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sandbox import coldstart
from sandbox.core import Clock, Faults
from sandbox.engines import checks as engine_checks
from sandbox.engines.behaviors import Behavior, Behaviors
from sandbox.engines.container import GPU, ContainerInfo, _int, describe_container
from sandbox.engines.generic import GenericHandler
from sandbox.engines.podserver import PodServer
from sandbox.engines.sglang import SglangHandler
from sandbox.engines.text import _family
from sandbox.engines.tgi import TgiHandler
from sandbox.engines.vllm import VllmHandler

# Images with their own serving protocol register a handler picker here (sandbox/vertex.py: Model Garden vLLM).
HANDLER_OVERRIDES: list[Callable[[ContainerInfo], type | None]] = []
DEFAULT_PARAMS_B = 7.0
SLOW_LOAD_FACTOR = 10.0
ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
# Memory CUDA reports as usable per GPU, in GiB.
GPU_MEMORY_GIB = {"nvidia-l4": 22.03, "nvidia-l4-vws": 22.03, "nvidia-tesla-t4": 14.58, "nvidia-tesla-p100": 15.89,
                  "nvidia-tesla-v100": 15.77, "nvidia-tesla-a100": 39.39, "nvidia-a100-80gb": 79.15,
                  "nvidia-h100-80gb": 79.11, "nvidia-h100-mega-80gb": 79.11}
BYTES_PER_PARAM = {"float32": 4.0, "float": 4.0, "bfloat16": 2.0, "float16": 2.0, "half": 2.0, "auto": 2.0,
                   "fp8": 1.0, "int8": 1.0, "eetq": 1.0, "bitsandbytes": 0.5, "bitsandbytes-nf4": 0.5,
                   "awq": 0.5, "gptq": 0.5, "marlin": 0.5}


START_ANNOTATION = "sandbox.llm-fleet.dev/start"  # the kubelet's view of the pod's volumes and image stream
GCSFUSE_DRIVER = "gcsfuse.csi.storage.gke.io"


def _start_info(pod: dict[str, Any]) -> dict[str, Any]:
    raw = ((pod.get("metadata") or {}).get("annotations") or {}).get(START_ANNOTATION)
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {}


@dataclass(frozen=True)
class StartPlan:
    """Cloud seconds of a container's start, by phase (``sandbox.coldstart``)."""

    init_s: float = 0.0  # process start, CUDA init (+ image-streaming reads)
    weights_s: float = 0.0  # weights from their source onto the GPUs
    graphs_s: float = 0.0  # CUDA graph capture (0 with --enforce-eager)
    load: coldstart.WeightLoad | None = None

    @property
    def seconds(self) -> float:
        return self.init_s + self.weights_s + self.graphs_s


class ModelRuntime:
    """Starts a :class:`PodServer` per container start; keeps the behaviors registry."""

    def __init__(self, *, clock: Clock, faults: Faults, hub: Any = None, tokens_per_s: float = 40.0,
                 prefill_tokens_per_s: float = 5000.0, auto_oom: bool = True) -> None:
        self.clock = clock
        self.faults = faults
        self.hub = hub
        self.tokens_per_s = float(tokens_per_s)
        self.prefill_tokens_per_s = float(prefill_tokens_per_s)
        self.auto_oom = auto_oom
        self.behaviors = Behaviors()
        self._lock = threading.Lock()
        self._servers: dict[str, PodServer] = {}
        self._pending: dict[str, Behavior] = {}
        self._starts: dict[str, int] = {}
        self._counter = itertools.count()
        self._filled: set[tuple[Any, Any]] = set()  # (HF cache PVC uid, model) a load has written
        self._filling: dict[str, tuple[Any, Any]] = {}  # pod key -> the cache it downloads into

    # ---- lifecycle (the Sandbox calls start()/stop() with no pod) --------------------------------
    def start(self, pod: dict[str, Any] | None = None, *, on_ready: Callable[[], Any] | None = None,
              on_exit: Callable[[int, str], Any] | None = None) -> PodServer | None:
        """``start()``: nothing to do; ``start(pod, on_ready=, on_exit=)``: start that pod's server."""
        if pod is None:
            return None
        return self.start_pod(pod, on_ready=on_ready, on_exit=on_exit)

    def stop(self) -> None:
        for server in self.servers():
            server.stop()
        with self._lock:
            self._servers.clear()

    # ---- per pod ---------------------------------------------------------------------------------
    @staticmethod
    def pod_key(pod: dict[str, Any]) -> str:
        meta = pod.get("metadata") or {}
        return meta.get("uid") or f"{meta.get('namespace', 'default')}/{meta.get('name', '')}"

    def describe(self, pod: dict[str, Any]) -> ContainerInfo:
        return describe_container(pod)

    def behavior_for(self, pod: dict[str, Any]) -> Behavior:
        """The behavior of this pod's next container start (consumes one use of a counted rule).

        The next :meth:`start` of the pod uses this same decision instead of taking another one.
        """
        b = self.behaviors.take(pod, describe_container(pod))
        with self._lock:
            self._pending[self.pod_key(pod)] = b
        return b

    def start_pod(self, pod: dict[str, Any], *, on_ready: Callable[[], Any] | None = None,
                  on_exit: Callable[[int, str], Any] | None = None) -> PodServer:
        info = describe_container(pod)
        key = self.pod_key(pod)
        with self._lock:
            behavior = self._pending.pop(key, None)
        if behavior is None:
            behavior = self.behaviors.take(pod, info)
        fail = None
        if behavior.mode in ("ok", "slow_load", "wrong_answers", "http_500", "hang",
                            "long_prompt_errors", "slow_long_prompts") and self.auto_oom:
            shards = max(1, min(info.tensor_parallel, self._gpus(pod)))
            need, have = self.weights_gib(pod, info) / shards, self.gpu_memory_gib(pod, default=0)
            if have and need > have * 0.95:
                fail = ("oom", f"{need:.1f} GiB of weights per GPU > {have:.1f} GiB")
        if behavior.mode in ("ok", "slow_load", "wrong_answers", "http_500", "hang",
                            "long_prompt_errors", "slow_long_prompts"):
            refused = engine_checks.launch_error(pod, info.engine, gpus=int(self._gpus(pod) or 0),
                                                 model_max_len=self.model_meta(info).get("max_len"))
            if refused:  # the engine exits at start with its own message (sandbox/engines/checks.py)
                fail = ("launch_error", "\n".join(refused))
        plan = self.start_plan(pod, info, behavior)
        load = plan.seconds
        with self._lock:
            old = self._servers.get(key)
            n = self._starts[key] = self._starts.get(key, 0) + 1
        if old is not None and old.alive:
            old.stop()
        filling = self._filling.pop(key, None)

        def ready() -> Any:
            if filling is not None:  # the weights are in the HF cache volume now: the next start reads them there
                with self._lock:
                    self._filled.add(filling)
            return on_ready() if on_ready is not None else None

        server = PodServer(self, pod, info, behavior, load, ready, on_exit, fail=fail, start_index=n, plan=plan)
        with self._lock:
            self._servers[key] = server
        return server

    def _forget(self, server: PodServer) -> None:
        with self._lock:
            for key, s in list(self._servers.items()):
                if s is server:
                    del self._servers[key]

    def servers(self) -> list[PodServer]:
        with self._lock:
            return list(self._servers.values())

    def server(self, namespace: str, name: str) -> PodServer | None:
        for s in self.servers():
            if s.namespace == namespace and s.name == name:
                return s
        return None

    @staticmethod
    def handler_for(info: ContainerInfo) -> type:
        """The HTTP handler of this container's server: an image's own (HANDLER_OVERRIDES), else its engine's."""
        return next((h for f in HANDLER_OVERRIDES if (h := f(info)) is not None), None) or {
            "vllm": VllmHandler, "tgi": TgiHandler, "sglang": SglangHandler}.get(info.engine, GenericHandler)

    # ---- model facts (from the Hub emulator when it knows the model) -----------------------------
    def _hub_params(self, model_id: str | None) -> int | None:
        if not model_id or self.hub is None:
            return None
        try:
            return int(self.hub.params(model_id))
        except Exception:  # noqa: BLE001 - unknown to the hub: fall back
            return None

    def load_seconds(self, pod: dict[str, Any], info: ContainerInfo | None = None,
                     behavior: Behavior | None = None) -> float:
        """Cloud seconds from container start to a model that answers (before clock scaling)."""
        return self.start_plan(pod, info, behavior).seconds

    def hub_id(self, info: ContainerInfo) -> str | None:
        """The Hub repo the weights are from: the model argument, or -- for weights read from a bucket or a
        mounted volume (``gs://...``, ``/models/...``) -- the served model name the spec gives them."""
        for mid in (info.model_id, info.served_model_name):
            if mid and re.fullmatch(r"[\w.-]+/[\w.-]+", mid):
                return mid
        return info.model_id

    def weight_source(self, pod: dict[str, Any], info: ContainerInfo) -> tuple[str, bool]:
        """Where the engine reads weights from (a ``coldstart.SOURCES`` key) and whether through the Run:ai
        streamer: ``gs://`` with ``--load-format runai_streamer``; a model path on a GCS FUSE CSI volume
        or a Hyperdisk ML / other PVC; else the Hub, through the HF cache volume when it already holds
        this model's weights (a PVC that a load has filled) -- read from the pod the kubelet started."""
        opts = " ".join(info.args)
        streamer = bool(re.search(r"--load-format[= ]runai_streamer", opts))
        model = info.model_id or ""
        start = _start_info(pod)
        volumes = start.get("volumes") or {}
        c = ((pod.get("spec") or {}).get("containers") or [{}])[0]
        env = {e.get("name"): e.get("value") for e in c.get("env") or [] if "value" in e}

        def volume_at(path: str) -> dict[str, Any] | None:
            best = None
            for m in c.get("volumeMounts") or []:
                mp = m.get("mountPath", "").rstrip("/")
                if mp and (path == mp or path.startswith(mp + "/")) and (best is None or len(mp) > len(best[0])):
                    best = (mp, volumes.get(m.get("name"), {}))
            return best[1] if best else None

        if model.startswith("gs://"):
            return "gcs", streamer
        if model.startswith("/"):
            vol = volume_at(model) or {}
            if vol.get("kind") == "csi" and vol.get("driver") == GCSFUSE_DRIVER:
                return "gcsfuse", streamer
            if vol.get("kind") == "pvc" and "hyperdisk-ml" in (vol.get("type"), vol.get("storageClass")):
                return "hyperdisk-ml", streamer
            return ("pvc" if vol.get("kind") == "pvc" else "hub"), streamer
        cache = volume_at(env.get("HF_HOME") or env.get("HUGGINGFACE_HUB_CACHE") or "/root/.cache/huggingface")
        if cache and cache.get("kind") == "pvc":
            with self._lock:
                if (cache.get("uid"), self.hub_id(info)) in self._filled:
                    return "pvc", streamer
            self._filling[self.pod_key(pod)] = (cache.get("uid"), self.hub_id(info))
        return "hub", streamer

    def start_plan(self, pod: dict[str, Any], info: ContainerInfo | None = None,
                   behavior: Behavior | None = None) -> StartPlan:
        """The container's start, phase by phase (``sandbox.coldstart``): the engine's init (plus what
        image streaming still reads), the weights by size and source, the CUDA graph capture."""
        info = info or describe_container(pod)
        behavior = behavior or self.behaviors.peek(pod, info)
        if info.engine == "generic":
            return StartPlan(init_s=1.0)
        if behavior.load_seconds is not None:  # a behavior's own load time is the whole start, as given
            return StartPlan(weights_s=float(behavior.load_seconds))
        slow = SLOW_LOAD_FACTOR if behavior.mode == "slow_load" else 1.0
        nbytes = self.weights_gib(pod, info) * 2**30
        source, streamer = self.weight_source(pod, info)
        load = coldstart.weight_load(nbytes, source, streamer=streamer)
        opts = " ".join(info.args)
        env = {e.get("name"): e.get("value") for e in
               (((pod.get("spec") or {}).get("containers") or [{}])[0].get("env") or []) if "value" in e}
        if info.engine == "tgi":  # TGI captures graphs unless CUDA_GRAPHS=0 / --cuda-graphs 0
            graphs = not (str(env.get("CUDA_GRAPHS", "")).strip() == "0" or re.search(r"--cuda-graphs[= ]0\b", opts))
        else:
            graphs = not ("--enforce-eager" in opts or "--disable-cuda-graph" in opts)
        warm = coldstart.engine_warmup(info.engine, cuda_graphs=graphs)
        return StartPlan(init_s=warm.init_s + float(_start_info(pod).get("image_stream_s") or 0.0),
                         weights_s=load.seconds * slow, graphs_s=warm.graphs_s, load=load)

    @staticmethod
    def _gpus(pod: dict[str, Any]) -> int:
        c = ((pod.get("spec") or {}).get("containers") or [{}])[0] or {}
        res = c.get("resources") or {}
        value = (res.get("limits") or {}).get(GPU) or (res.get("requests") or {}).get(GPU)
        return _int(str(value)) or 1 if value is not None else 1

    def gpu_memory_gib(self, pod: dict[str, Any], default: float = 22.03) -> float:
        sel = (pod.get("spec") or {}).get("nodeSelector") or {}
        acc = sel.get(ACCELERATOR_LABEL)
        return GPU_MEMORY_GIB.get(acc, default) if acc else default

    def weights_gib(self, pod: dict[str, Any], info: ContainerInfo) -> float:
        """GiB of weights the engine puts on the GPUs (dtype and quantization applied)."""
        params = self._hub_params(self.hub_id(info))
        if params is None:
            params = int(DEFAULT_PARAMS_B * 1e9) if info.engine != "generic" else 0
        quantized = info.quantization in ("awq", "gptq", "marlin", "awq_marlin", "gptq_marlin")
        cfg_q = False
        if self.hub is not None and info.model_id:
            with contextlib.suppress(Exception):
                cfg_q = "quantization_config" in self.hub.config(self.hub_id(info))
        if (quantized or cfg_q) and self.hub is not None:
            with contextlib.suppress(Exception):
                return self.hub.weight_bytes(self.hub_id(info)) / 2**30
        bpp = BYTES_PER_PARAM.get((info.quantization or info.dtype or "auto").lower(), 2.0)
        return params * bpp / 2**30

    def model_meta(self, info: ContainerInfo) -> dict[str, Any]:
        """What the engine reads from the Hub at start: config, chat template, sha, context length."""
        meta: dict[str, Any] = {"chat_template": _guess_chat(info.model_id), "family": _family(info.model_id or "",
                                                                                                None)}
        hub, model = self.hub, self.hub_id(info)
        if hub is None or not model:
            return meta
        with contextlib.suppress(Exception):
            rev = info.revision or "main"
            cfg = hub.config(model, rev)
            meta["config"] = cfg
            meta["family"] = _family(model, cfg.get("text_config") or cfg)
            text_cfg = cfg.get("text_config") or cfg
            max_len = cfg.get("max_position_embeddings") or text_cfg.get("max_position_embeddings")
            if max_len:
                meta["max_len"] = int(max_len)
            meta["arch"] = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
            meta["chat_template"] = bool(hub.chat_template(model, rev))
            meta["sha"] = hub.resolve(model, rev)
            meta["shards"] = max(1, math.ceil(hub.weight_bytes(model) / 5e9))
            repo = getattr(hub, "repos", {}).get(model)
            meta["pipeline_tag"] = getattr(repo, "pipeline_tag", None) or "text-generation"
        return meta

    @staticmethod
    def tgi_version(info: ContainerInfo) -> str:
        m = re.search(r"(\d+\.\d+(?:\.\d+)?)\s*$", info.image.split(":")[-1] if ":" in info.image else info.image)
        if not m:
            return "3.3.4"
        v = m.group(1)
        return v if v.count(".") == 2 else v + ".0"

    # ---- inspection ------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return {"behaviors": self.behaviors.list(), "tokens_per_s": self.tokens_per_s,
                "pods": [s.snapshot() for s in self.servers()]}


def _guess_chat(model_id: str | None) -> bool:
    mid = (model_id or "").lower()
    return any(k in mid for k in ("-it", "instruct", "chat"))
