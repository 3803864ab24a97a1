"""Model servers for the sandbox's pods: vLLM, TGI and SGLang over real HTTP, without a GPU.

The kube controller (sandbox/kube) calls, for each container start of a pod::

    behavior = runtime.behavior_for(pod)          # one call = one start attempt (counts a rule's use)
    if behavior.mode == "image_pull_error": ...   # the controller's business: ErrImagePull/ImagePullBackOff
    server = runtime.start(pod, on_ready=fn(), on_exit=fn(exit_code, reason))

``start`` returns a :class:`PodServer` already listening on a loopback port. It "loads weights" for
``DEFAULT_DELAYS["weight_load_per_b_params"]`` × the Hub's parameter count in billions (fallback 7B),
at least ``weight_load_min``, scaled by the clock (or a behavior's ``load_seconds``), writing the engine's
real start-up log lines, then calls ``on_ready()``. ``crash_loop`` and ``oom`` write a realistic
traceback partway through loading, close the port (the process died) and call ``on_exit(1, "Error")`` /
``on_exit(137, "OOMKilled")``. A model whose weights cannot fit on the pod's GPUs (node selector
``cloud.google.com/gke-accelerator`` × ``nvidia.com/gpu`` limit, e.g. a 70B model on one L4) goes OOM
by itself, like the real thing (``ModelRuntime(auto_oom=False)`` turns that off).

Engines (picked from the pod's first container by :func:`describe_container`):

* **vLLM** (OpenAI server): ``/health`` (200 as soon as the process is up, before the model can answer),
  ``/ping``, ``/version``, ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (``stream``:
  SSE ``data: {...}`` chunks then ``data: [DONE]``), the legacy ``/generate`` (``{"prompt", "max_tokens"}``
  → ``{"text": [prompt + completion]}``), ``/metrics`` (``vllm:num_requests_running``,
  ``vllm:num_requests_waiting``, ``vllm:gpu_cache_usage_perc``, ``vllm:prompt_tokens_total``,
  ``vllm:generation_tokens_total``, ``vllm:e2e_request_latency_seconds`` ...). Until the model is
  loaded, everything but ``/health``, ``/ping``, ``/version`` and ``/metrics`` answers 503. The legacy
  ``vllm.entrypoints.api_server`` has no ``/v1`` routes (404), like the real one.
* **TGI**: ``/health`` (200 only when ready), ``/info``, ``/generate``, ``/generate_stream``
  (``data:{"token":...}`` events, the last one with ``generated_text``), ``POST /`` (what
  ``InferenceClient.text_generation`` calls), ``/v1/models``, ``/v1/completions``,
  ``/v1/chat/completions`` ("Template error: template not found" for a model without chat template,
  like PaliGemma pt), ``/metrics`` (``tgi_queue_size``, ``tgi_batch_current_size``,
  ``tgi_request_success``, ``tgi_request_duration`` histogram ...). Until ready: 503.
* **SGLang**: ``/health``, ``/health_generate``, ``/get_model_info``, ``/get_server_info``,
  ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``, ``/generate`` (``{"text",
  "sampling_params"}``), ``/metrics`` (with ``--enable-metrics``: ``sglang:num_running_reqs``,
  ``sglang:num_queue_reqs`` ...).
* any other image (nginx, busybox...): a plain server, ready after a second, 200 on every GET.

Answers are deterministic text derived from the prompt (no ML): "What is X?" → "X is ...", a
PaliGemma ``![](.../rabbit.png)caption en\\n`` → "image of a rabbit ...". Token counts are in ``usage``;
generation takes ``prompt_tokens / prefill_tokens_per_s + completion_tokens / tokens_per_s`` cloud
seconds, scaled by the clock. Requests beyond the engine's batch size (``--max-num-seqs``,
``MAX_BATCH_SIZE``, ``--max-running-requests``) wait, and show up as waiting in ``/metrics``.

Behaviors (:class:`Behaviors`, also ``POST /sandbox/behaviors`` on the control API) pick the failure
mode per pod: ``ok``, ``slow_load``, ``crash_loop``, ``oom``, ``image_pull_error``, ``wrong_answers``
(empty text, full token count — what a broken dtype looks like once special tokens are skipped),
``http_500`` (every generation fails), ``hang`` (generations never answer).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import re
import shlex
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from sandbox.core import DEFAULT_DELAYS, Clock, Faults, HttpError, JsonHandler, SandboxHTTPServer, route
from sandbox.engines import checks as engine_checks

# Images with their own serving protocol register a handler picker here (sandbox/vertex.py: Model Garden vLLM).
HANDLER_OVERRIDES: list[Callable[[ContainerInfo], type | None]] = []
MODES = ("ok", "slow_load", "crash_loop", "oom", "image_pull_error", "wrong_answers", "http_500", "hang")
MATCH_KEYS = ("namespace", "labels", "model", "name", "engine", "revision")
ENGINE_DEFAULT_PORTS = {"vllm": 8000, "tgi": 80, "sglang": 30000, "generic": 80}
ENGINE_DEFAULT_MODELS = {"vllm": "facebook/opt-125m", "tgi": "bigscience/bloom-560m", "sglang": None}
DEFAULT_PARAMS_B = 7.0
SLOW_LOAD_FACTOR = 10.0
GPU = "nvidia.com/gpu"
ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
# Memory CUDA reports as usable per GPU, in GiB.
GPU_MEMORY_GIB = {"nvidia-l4": 22.03, "nvidia-l4-vws": 22.03, "nvidia-tesla-t4": 14.58, "nvidia-tesla-p100": 15.89,
                  "nvidia-tesla-v100": 15.77, "nvidia-tesla-a100": 39.39, "nvidia-a100-80gb": 79.15,
                  "nvidia-h100-80gb": 79.11, "nvidia-h100-mega-80gb": 79.11}
BYTES_PER_PARAM = {"float32": 4.0, "float": 4.0, "bfloat16": 2.0, "float16": 2.0, "half": 2.0, "auto": 2.0,
                   "fp8": 1.0, "int8": 1.0, "eetq": 1.0, "bitsandbytes": 0.5, "bitsandbytes-nf4": 0.5,
                   "awq": 0.5, "gptq": 0.5, "marlin": 0.5}


# ---- container description (pure) -----------------------------------------------------------------

@dataclass(frozen=True)
class ContainerInfo:
    engine: str  # "vllm" | "tgi" | "sglang" | "generic"
    model_id: str | None
    served_model_name: str | None
    port: int
    revision: str | None = None
    max_model_len: int | None = None
    max_batch: int | None = None  # --max-num-seqs / MAX_BATCH_SIZE / --max-running-requests
    max_concurrent: int | None = None  # TGI MAX_CONCURRENT_REQUESTS (429 beyond it)
    tensor_parallel: int = 1
    dtype: str | None = None
    quantization: str | None = None
    image: str = ""
    legacy_api: bool = False  # vllm.entrypoints.api_server: /generate only
    metrics_enabled: bool = True  # SGLang serves /metrics only with --enable-metrics
    args: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion of command/args from the container's literal env."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def _tokens(container: dict[str, Any], env: dict[str, str]) -> list[str]:
    words = [_expand(str(w), env) for w in (container.get("command") or []) + (container.get("args") or [])]
    # command: [sh, -c, "python3 -m vllm... --model X"]: split the script
    for i, w in enumerate(words):
        if w == "-c" and i > 0 and words[i - 1].rsplit("/", 1)[-1] in ("sh", "bash", "dash") and i + 1 < len(words):
            try:
                return words[:i - 1] + shlex.split(words[i + 1]) + words[i + 2:]
            except ValueError:
                return words
    return words


def _options(tokens: list[str]) -> tuple[dict[str, str], list[str]]:
    """``--k=v`` / ``--k v`` / ``-k v`` options (last wins; a bare flag is "true") and positionals."""
    opts: dict[str, str] = {}
    pos: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("-") and len(tok) > 1 and not _is_number(tok):
            key, eq, value = tok.partition("=")
            if not eq:
                nxt = tokens[i + 1] if i + 1 < len(tokens) else None
                if nxt is not None and not (nxt.startswith("-") and not _is_number(nxt)):
                    value = nxt
                    i += 1
                else:
                    value = "true"
            opts[key.replace("_", "-")] = value
        else:
            pos.append(tok)
        i += 1
    return opts, pos


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def describe_container(pod: dict[str, Any]) -> ContainerInfo:
    """Engine, model, served name and port of a pod's first container (pure)."""
    containers = (pod.get("spec") or {}).get("containers") or [{}]
    c = containers[0] or {}
    image = str(c.get("image") or "")
    env = {e["name"]: str(e.get("value", "")) for e in c.get("env") or [] if isinstance(e, dict) and "name" in e
           and "valueFrom" not in e}
    tokens = _tokens(c, env)
    opts, pos = _options(tokens)
    joined = " ".join(tokens).lower()
    low = image.lower()
    if "vllm" in low:
        engine = "vllm"
    elif "text-generation-inference" in low or "tgi" in re.split(r"[/:@._-]", low) or "tgi-" in low:
        engine = "tgi"
    elif "sglang" in low:
        engine = "sglang"
    elif "vllm" in joined:
        engine = "vllm"
    elif "text-generation-launcher" in joined:
        engine = "tgi"
    elif "sglang" in joined:
        engine = "sglang"
    else:
        engine = "generic"

    def opt(*names: str) -> str | None:
        for n in names:
            if n in opts and opts[n] != "true":
                return opts[n]
        return None

    model = served = revision = dtype = quant = None
    max_len = max_batch = max_concurrent = None
    tp = 1
    legacy = False
    metrics = True
    if engine == "vllm":
        model = opt("--model")
        if model is None and "serve" in pos:
            after = pos[pos.index("serve") + 1:]
            model = after[0] if after else None
        if model is None:
            # `vllm serve` is the image's entrypoint: the first positional arg is the model
            cands = [p for p in pos if "/" in p and not p.startswith("/") and not p.endswith(".py")]
            model = cands[0] if cands else None
        model = model or ENGINE_DEFAULT_MODELS["vllm"]
        served = opt("--served-model-name") or model
        revision = opt("--revision")
        max_len = _int(opt("--max-model-len"))
        max_batch = _int(opt("--max-num-seqs"))
        tp = _int(opt("--tensor-parallel-size", "-tp")) or 1
        dtype = opt("--dtype")
        quant = opt("--quantization", "-q")
        legacy = "vllm.entrypoints.api_server" in joined
    elif engine == "tgi":
        model = env.get("MODEL_ID") or opt("--model-id") or ENGINE_DEFAULT_MODELS["tgi"]
        served = model
        revision = env.get("REVISION") or opt("--revision")
        max_len = _int(env.get("MAX_TOTAL_TOKENS") or opt("--max-total-tokens"))
        max_batch = _int(env.get("MAX_BATCH_SIZE") or opt("--max-batch-size"))
        max_concurrent = _int(env.get("MAX_CONCURRENT_REQUESTS") or opt("--max-concurrent-requests"))
        gpus = ((c.get("resources") or {}).get("limits") or {}).get(GPU)
        tp = _int(env.get("NUM_SHARD") or opt("--num-shard")) or _int(str(gpus) if gpus is not None else None) or 1
        dtype = env.get("DTYPE") or opt("--dtype")
        quant = env.get("QUANTIZE") or opt("--quantize") or None
    elif engine == "sglang":
        model = opt("--model-path", "--model")
        served = opt("--served-model-name") or model
        revision = opt("--revision")
        max_len = _int(opt("--context-length"))
        max_batch = _int(opt("--max-running-requests"))
        tp = _int(opt("--tp", "--tp-size", "--tensor-parallel-size")) or 1
        dtype = opt("--dtype")
        quant = opt("--quantization")
        metrics = "--enable-metrics" in opts

    port = None
    for p in c.get("ports") or []:
        if isinstance(p, dict) and p.get("containerPort"):
            port = int(p["containerPort"])
            break
    if port is None:
        port = _int(env.get("PORT")) or _int(opt("--port")) or ENGINE_DEFAULT_PORTS[engine]
    return ContainerInfo(engine=engine, model_id=model, served_model_name=served, port=port, revision=revision,
                         max_model_len=max_len, max_batch=max_batch, max_concurrent=max_concurrent,
                         tensor_parallel=tp, dtype=dtype, quantization=(quant or "").lower() or None, image=image,
                         legacy_api=legacy, metrics_enabled=metrics, args=tuple(tokens))


# ---- behaviors ------------------------------------------------------------------------------------

@dataclass
class Behavior:
    """How the pods a rule matches behave. ``count``: how many container starts it affects (None: all)."""

    mode: str = "ok"
    match: dict[str, Any] = field(default_factory=dict)
    load_seconds: float | None = None  # cloud seconds (scaled by the clock); overrides the computed load time
    count: int | None = None
    tokens_per_s: float | None = None  # overrides the runtime's generation speed for these pods
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    hits: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; valid: {', '.join(MODES)}")
        if not isinstance(self.match, dict):
            raise ValueError("match must be an object: {namespace?, labels?, model?, name?, engine?}")
        unknown = set(self.match) - set(MATCH_KEYS)
        if unknown:
            raise ValueError(f"unknown match key(s) {', '.join(sorted(unknown))}; valid: {', '.join(MATCH_KEYS)}")
        if "labels" in self.match and not isinstance(self.match["labels"], dict):
            raise ValueError("match.labels must be an object of label: value")
        if self.count is not None and int(self.count) < 0:
            raise ValueError("count must be >= 0 (or null for every start)")
        if self.load_seconds is not None and float(self.load_seconds) < 0:
            raise ValueError("load_seconds must be >= 0")

    def matches(self, pod: dict[str, Any], info: ContainerInfo | None = None) -> bool:
        meta = pod.get("metadata") or {}
        m = self.match
        if m.get("namespace") and meta.get("namespace", "default") != m["namespace"]:
            return False
        labels = meta.get("labels") or {}
        if any(labels.get(k) != str(v) for k, v in (m.get("labels") or {}).items()):
            return False
        if m.get("name") and not re.search(m["name"], meta.get("name", "") or meta.get("generateName", "")):
            return False
        if m.get("model") or m.get("engine") or m.get("revision"):
            info = info or describe_container(pod)
            if m.get("model") and info.model_id != m["model"]:
                return False
            if m.get("engine") and info.engine != m["engine"]:
                return False
            # "The weights of this commit are broken": pods serving that Hub revision behave so.
            if m.get("revision") and info.revision != m["revision"]:
                return False
        return True

    def live(self) -> bool:
        return self.count is None or self.hits < int(self.count)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


OK = Behavior(mode="ok", id="default")


class Behaviors:
    """Thread-safe list of behavior rules; the first live matching rule wins."""

    def __init__(self) -> None:
        self._rules: list[Behavior] = []
        self._lock = threading.Lock()

    def add(self, behavior: Behavior | None = None, *, mode: str = "ok", match: dict[str, Any] | None = None,
            load_seconds: float | None = None, count: int | None = None, tokens_per_s: float | None = None,
            namespace: str | None = None, labels: dict[str, str] | None = None, model: str | None = None,
            name: str | None = None, engine: str | None = None, revision: str | None = None) -> Behavior:
        """Add a rule; ``namespace``/``labels``/``model``/``name``/``engine`` are shortcuts for ``match``."""
        if behavior is None:
            m = dict(match or {})
            for k, v in (("namespace", namespace), ("labels", labels), ("model", model), ("name", name),
                         ("engine", engine), ("revision", revision)):
                if v is not None:
                    m[k] = v
            behavior = Behavior(mode=mode, match=m, load_seconds=load_seconds, count=count,
                                tokens_per_s=tokens_per_s)
        with self._lock:
            self._rules.append(behavior)
        return behavior

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.to_dict() for r in self._rules]

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def remove(self, rule_id: str) -> bool:
        with self._lock:
            before = len(self._rules)
            self._rules = [r for r in self._rules if r.id != rule_id]
            return len(self._rules) < before

    def peek(self, pod: dict[str, Any], info: ContainerInfo | None = None) -> Behavior:
        """The rule that would apply to this pod now (no use consumed)."""
        with self._lock:
            for rule in self._rules:
                if rule.live() and rule.matches(pod, info):
                    return rule
        return OK

    def take(self, pod: dict[str, Any], info: ContainerInfo | None = None) -> Behavior:
        """The rule for one container start of this pod, with one use consumed."""
        with self._lock:
            for rule in self._rules:
                if rule.live() and rule.matches(pod, info):
                    rule.hits += 1
                    return rule
        return OK


# ---- deterministic text ---------------------------------------------------------------------------

_IMG = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
_WORD = re.compile(r"\w+|[^\w\s]")
_PIECE = re.compile(r"\s*\S+")
_CHAT_MARKUP = re.compile(
    r"<start_of_turn>(?:user|model)\n|<end_of_turn>\n?|<bos>|<s>|</s>|\[/?INST\]|<\|im_start\|>(?:system|user|assistant)\n?"
    r"|<\|im_end\|>\n?|<\|begin_of_text\|>|<\|start_header_id\|>\w+<\|end_header_id\|>\n*|<\|eot_id\|>")

_FILLERS = (
    "{T} is usually explained in terms of its purpose, its main parts and how they fit together.",
    "In practice, most people start with a small example and grow from there.",
    "The key ideas are easy to state: keep things simple, measure what matters and automate the repetitive parts.",
    "A good first step is to read the official documentation and try the basic workflow end to end.",
    "Over time, hands-on experience with real workloads matters more than any single tool.",
    "There are trade-offs between cost, speed and reliability, and the right balance depends on the use case.",
    "Many teams also write down what they learn, so that others can benefit from it.",
    "It helps to compare a few options before committing to one.",
    "{T} keeps evolving, so it is worth revisiting the basics from time to time.",
    "Clear goals and short feedback loops make the biggest difference.",
    "Starting small also makes it easier to notice problems early and fix them cheaply.",
    "Most of the difficulty is in the details, which only show up once you try it for real.",
    "If you are unsure where to begin, pick one concrete problem and solve it well.",
    "Good tooling helps, but clear thinking about the problem helps more.",
)
_SUBJECTS = ("cat sitting on a windowsill", "red car parked on a street", "dog running on a beach",
             "bowl of fruit on a wooden table", "mountain lake at sunset", "man in a spacesuit")
_CONTINUATIONS = (
    " place that many people know from pictures, but it is worth a closer look.",
    " good example of something that is simple to describe and hard to master.",
    " topic that comes up often, and for good reasons.",
    " subject with a long history and plenty of surprises.",
)


def _h(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(parts).encode()).digest()[:8], "big")


def count_tokens(text: str) -> int:
    """A stable stand-in for a tokenizer: words and punctuation marks, at least one."""
    return max(1, len(_WORD.findall(text)))


def _user_text(prompt: str) -> str:
    text = _CHAT_MARKUP.sub(" ", prompt)
    return re.sub(r"[ \t]+", " ", text).strip()


_TOPIC_STOP = {"if", "when", "because", "so", "important", "necessary", "useful", "good", "better", "worth",
               "in", "for", "to", "with", "that", "and", "or", "vs", "versus", "really", "still", "always"}


def _topic(question: str) -> str:
    q = re.sub(r"[?.!]+$", "", question.strip())
    q = re.sub(r"(?i)^(please |can you |could you |tell me |explain |describe )+", "", q)
    about = re.search(r"(?i)\babout (.+)$", q)
    if about:
        q = about.group(1)
    q = re.sub(r"(?i)^(what|who|why|how|where|when|which)( (is|are|was|were|do|does|did|can|should))?"
               r"( (i|you|we|they))?\s+", "", q)
    q = re.sub(r"(?i)^(write|explain|describe|list|give|summarize|tell)( me)?\s+", "", q)
    q = re.sub(r"(?i)\s+(is|are|was|were)( (a|an|the))?$", "", q)
    q = re.sub(r"(?i)^(is|are|do|does|can|should|will|would|could)\s+", "", q)
    q = re.sub(r"(?i)^(the|a|an)\s+", "", q)
    words = []
    for w in q.split():
        if w.lower().strip(",;") in _TOPIC_STOP:
            break
        words.append(w.strip(",;"))
    return " ".join(words[:5]) or "this"


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _subject_from_url(url: str) -> str | None:
    if url.startswith("data:"):
        return None
    stem = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    words = [w for w in re.split(r"[-_\s%0-9]+", stem.lower()) if w.isalpha() and len(w) > 1]
    return " ".join(words[:3]) or None


def _article(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def _vision_answer(task: str, images: list[str], seed: int) -> str:
    subject = next((s for s in (_subject_from_url(u) for u in images) if s), None)
    thing = _article(subject) if subject else _article(_SUBJECTS[seed % len(_SUBJECTS)])
    t = task.strip().lower()
    if t.startswith(("detect", "segment")):
        objs = [o.strip() for o in task.split(None, 1)[1].split(";")] if " " in task.strip() else ["object"]
        locs = []
        for i, o in enumerate(objs):
            n = [(seed >> (10 * (i * 4 + k))) % 1024 for k in range(4)]
            y0, x0 = min(n[0], n[2]), min(n[1], n[3])
            y1, x1 = max(n[0], n[2]) + 1, max(n[1], n[3]) + 1
            locs.append(f"<loc{y0:04d}><loc{x0:04d}><loc{min(y1, 1023):04d}><loc{min(x1, 1023):04d}> {o}")
        return " ; ".join(locs)
    if t.startswith("answer"):
        q = t.split(None, 2)[2] if len(t.split(None, 2)) > 2 else ""
        if q.startswith(("is ", "are ", "does ", "do ", "can ")):
            return "yes"
        if q.startswith("how many"):
            return str(1 + seed % 3)
        return thing
    if t.startswith("ocr"):
        return "sandbox"
    details = ("", " in the grass", " on a white background", " next to a tree", " on a wooden floor")
    return f"image of {thing}{details[seed % len(details)]}"


def compose_answer(prompt: str, model_id: str = "") -> str:
    """The whole answer the model would give to ``prompt`` (deterministic; truncated by the caller)."""
    seed = _h(model_id, prompt)
    images = _IMG.findall(prompt)
    text = _user_text(_IMG.sub(" ", prompt))
    vision = "paligemma" in model_id.lower()
    if images or (vision and re.match(r"(?i)^(caption|describe|answer|detect|segment|ocr)\b", text)):
        return _vision_answer(text, images, seed)
    q = text.strip()
    topic = _topic(q)
    fill = [f.replace("{T}", _cap(topic)) for f in _FILLERS]
    if topic == "this" or re.search(r"(?i)\b(hello|hi|hey)\b", q):
        fill = [f for f in _FILLERS if "{T}" not in f]
    order = sorted(range(len(fill)), key=lambda i: _h(str(seed), str(i)))
    if not q:
        head = "I am ready to help. Ask me anything."
    elif re.search(r"(?i)\b(say )?(hello|hi|hey)\b", q) and len(q.split()) <= 12:
        head = "Hello! It's nice to meet you. How can I help you today?"
    elif q.endswith("?"):
        if re.match(r"(?i)^(what|who) (is|are|was|were)\b", q):
            head = f"{_cap(topic)} is a widely used concept, and the short answer is that it helps people get a job done."
        elif re.match(r"(?i)^(is|are|do|does|can|should|will|would|could)\b", q):
            head = "Yes. In short, it matters, although how much depends on your goals."
        elif re.match(r"(?i)^how\b", q):
            head = f"Here is a short overview of how to {topic[:1].lower() + topic[1:]}."
        elif re.match(r"(?i)^why\b", q):
            head = f"There are a few reasons why {topic}."
        else:
            head = f"Good question. {_cap(topic)} deserves a careful answer."
    elif re.search(r"(?i)\b(is|are) (a|an|the)$", q) or q.endswith((" is", " are", " was")):
        head = _CONTINUATIONS[seed % len(_CONTINUATIONS)].strip()
        return " " + head + " " + " ".join(fill[i] for i in order[:3])
    elif q.endswith((".", "!", ":")) or re.match(r"(?i)^(write|explain|describe|list|give|summarize|tell)\b", q):
        head = f"Sure. Here is a short answer about {topic}." if topic != "this" else "Sure. Here is my answer."
    else:
        return " " + _CONTINUATIONS[seed % len(_CONTINUATIONS)].strip() + " " + \
            " ".join(fill[i] for i in order[:3])
    n = 2 + seed % 4
    if vision:
        n = 1
    return head + " " + " ".join(fill[i] for i in order[:n])


def split_pieces(text: str) -> list[str]:
    """Text as token-like pieces (a word with its leading space); ``"".join`` gives the text back."""
    pieces = _PIECE.findall(text)
    if pieces and len("".join(pieces)) < len(text):
        pieces[-1] += text[len("".join(pieces)):]
    return pieces


@dataclass
class Completion:
    pieces: list[str]
    prompt_tokens: int
    finish_reason: str  # "stop" | "length"

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces)


def plan_completion(prompt: str, model_id: str, max_tokens: int, *, stop: list[str] | None = None,
                    wrong: bool = False, image_tokens: int = 0) -> Completion:
    prompt_tokens = count_tokens(prompt) + image_tokens + 1  # + BOS
    max_tokens = max(0, int(max_tokens))
    if wrong:
        return Completion([""] * max_tokens, prompt_tokens, "length")
    answer = compose_answer(prompt, model_id)
    finish = "stop"
    for s in stop or []:
        if s and s in answer:
            answer = answer[:answer.index(s)]
    pieces = split_pieces(answer)
    if len(pieces) > max_tokens:
        pieces, finish = pieces[:max_tokens], "length"
    return Completion(pieces, prompt_tokens, finish)


def _family(model_id: str, config: dict[str, Any] | None) -> str:
    mt = str((config or {}).get("model_type", "")).lower()
    mid = model_id.lower()
    if "gemma" in mt or "gemma" in mid:
        return "gemma"
    if "llama-3" in mid or "llama3" in mid:
        return "llama3"
    if mt in ("llama", "mistral") or "llama" in mid or "mistral" in mid:
        return "inst"
    return "chatml"


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content or []:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text":
            parts.append(str(part.get("text", "")))
        elif part.get("type") == "image_url":
            url = (part.get("image_url") or {}).get("url", "") if isinstance(part.get("image_url"), dict) \
                else str(part.get("image_url"))
            parts.append(f"![]({url})")
    return "".join(parts)


def render_chat(messages: list[dict[str, Any]], family: str) -> str:
    out = []
    for m in messages:
        role, text = m.get("role", "user"), _content_text(m.get("content"))
        if family == "gemma":
            out.append(f"<start_of_turn>{'model' if role == 'assistant' else 'user'}\n{text}<end_of_turn>\n")
        elif family == "inst":
            out.append(f"[INST] {text} [/INST]" if role != "assistant" else f" {text}</s>")
        elif family == "llama3":
            out.append(f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>")
        else:
            out.append(f"<|im_start|>{role}\n{text}<|im_end|>\n")
    gen = {"gemma": "<start_of_turn>model\n", "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
           "chatml": "<|im_start|>assistant\n", "inst": ""}[family]
    return "".join(out) + gen


# ---- metrics --------------------------------------------------------------------------------------

VLLM_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                        120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TGI_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SGLANG_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 60.0, 80.0, 120.0, 160.0, 200.0, 250.0,
                  300.0, 350.0, 500.0, 1000.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {float(c)}' for b, c in zip(self.buckets, self.counts,
                                                                                   strict=True)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {float(self.count)}')
        out.append(f"{name}_sum{{{labels}}} {self.sum}")
        out.append(f"{name}_count{{{labels}}} {float(self.count)}")
        return out


def _prom(lines: list[str], name: str, kind: str, help_: str, samples: list[tuple[str, float]] | None = None,
          hist: tuple[Histogram, str] | None = None) -> None:
    lines.append(f"# HELP {name} {help_}")
    lines.append(f"# TYPE {name} {kind}")
    if hist is not None:
        lines.extend(hist[0].lines(name, hist[1]))
    for labels, value in samples or []:
        lines.append(f"{name}{{{labels}}} {float(value)}" if labels else f"{name} {float(value)}")


# ---- pod server -----------------------------------------------------------------------------------

class _PodHTTPServer(SandboxHTTPServer):
    """A pod's listening socket; :meth:`kill` also drops open keep-alive connections, like a dead process."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._killed = False

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            if self._killed:
                self.shutdown_request(request)
                return
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def run(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"sandbox-model-{self.port}", daemon=True)
        self._thread.start()

    def kill(self) -> None:
        with self._conns_lock:
            if self._killed:
                return
            self._killed = True
            conns = list(self._conns)
        self.shutdown()
        self.server_close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()


class _Aborted(ConnectionResetError):
    """The pod died (or the sandbox stopped) while a request was in flight: drop the connection."""


class PodServer:
    """One container's model server. Created by :meth:`ModelRuntime.start`."""

    def __init__(self, runtime: ModelRuntime, pod: dict[str, Any], info: ContainerInfo, behavior: Behavior,
                 load_seconds: float, on_ready: Callable[[], Any] | None,
                 on_exit: Callable[[int, str], Any] | None, *, fail: tuple[str, str] | None = None,
                 start_index: int = 0) -> None:
        meta = pod.get("metadata") or {}
        self.runtime = runtime
        self.clock: Clock = runtime.clock
        self.namespace = meta.get("namespace", "default")
        self.name = meta.get("name", "")
        self.uid = meta.get("uid", "")
        self.pod = pod
        self.info = info
        self.behavior = behavior
        self.mode = fail[0] if fail else behavior.mode
        self._fail_detail = fail[1] if fail else ""
        self.load_seconds = load_seconds
        self.tokens_per_s = behavior.tokens_per_s or runtime.tokens_per_s
        self.start_index = start_index
        self.started_at = time.time()
        self.ready_at: float | None = None
        self.phase = "loading"
        self.exit_code: int | None = None
        self.exit_reason: str | None = None
        self.requests_served = 0
        # Arrival time of every POST (an access log's timestamps): lets a benchmark tell which pod got a
        # request sent after a selector switch.
        self.arrivals: deque[float] = deque(maxlen=200_000)
        self._on_ready = on_ready
        self._on_exit = on_exit
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._logs: deque[str] = deque(maxlen=5000)
        self._log_lock = threading.Lock()
        self._cond = threading.Condition()
        self.running = 0
        self.waiting = 0
        self.max_batch = info.max_batch or {"vllm": 256, "tgi": 64, "sglang": 256}.get(info.engine, 256)
        self.max_concurrent = info.max_concurrent or (128 if info.engine == "tgi" else None)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.success: dict[str, int] = {}
        self.failures = 0
        self.e2e = Histogram(SGLANG_BUCKETS if info.engine == "sglang" else VLLM_LATENCY_BUCKETS)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tgi_duration = Histogram(TGI_BUCKETS)
        self.model_meta = runtime.model_meta(info)
        handler = next((h for f in HANDLER_OVERRIDES if (h := f(info)) is not None), None) or {
            "vllm": VllmHandler, "tgi": TgiHandler, "sglang": SglangHandler}.get(info.engine, GenericHandler)
        self._server = _PodHTTPServer(handler, state=self, faults=runtime.faults)
        self._server.run()
        self._loader = threading.Thread(target=self._load, name=f"model-load-{self.name}", daemon=True)
        self._loader.start()

    # ---- public ----------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._server.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._stop.is_set()

    @property
    def alive(self) -> bool:
        return self.phase in ("loading", "ready")

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout) and self.ready

    def logs(self) -> list[str]:
        with self._log_lock:
            return list(self._logs)

    def log(self, *lines: str) -> None:
        with self._log_lock:
            for line in lines:
                self._logs.extend(line.split("\n"))

    def stop(self) -> None:
        """The container is killed (pod deleted, scaled down): no on_exit callback."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._ready.clear()
        if self.phase in ("loading", "ready"):
            self.phase = "stopped"
        with self._cond:
            self._cond.notify_all()
        self._server.kill()
        self.runtime._forget(self)

    def snapshot(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "name": self.name, "uid": self.uid, "engine": self.info.engine,
                "model": self.info.model_id, "served_model_name": self.info.served_model_name,
                "revision": self.info.revision, "port": self.port, "phase": self.phase, "ready": self.ready,
                "mode": self.mode, "behavior_id": self.behavior.id, "load_seconds": self.load_seconds,
                "requests_served": self.requests_served, "running": self.running, "waiting": self.waiting,
                "exit_code": self.exit_code, "exit_reason": self.exit_reason, "start": self.start_index}

    # ---- loading ---------------------------------------------------------------------------------
    def _stamp(self) -> str:
        t = time.time()
        e = self.info.engine
        if e == "vllm":
            return time.strftime("%m-%d %H:%M:%S", time.gmtime(t))
        if e == "tgi":
            return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))

    def _line(self, msg: str, *, src: str = "", level: str = "INFO") -> str:
        e = self.info.engine
        if e == "vllm":
            return f"{level} {self._stamp()} [{src or 'api_server.py:1885'}] {msg}"
        if e == "tgi":
            return f"{self._stamp()}  {level} {src or 'text_generation_launcher'}: {msg}"
        if e == "sglang":
            return f"[{self._stamp()}{' ' + src if src else ''}] {msg}"
        return f"{self._stamp()} [notice] 1#1: {msg}"

    def _startup_lines(self) -> list[str]:
        i, m = self.info, self.info.model_id
        arch = ((self.model_meta.get("config") or {}).get("architectures") or ["LlamaForCausalLM"])[0]
        if i.engine == "vllm":
            args = {"model": m, "revision": i.revision, "port": i.port, "dtype": i.dtype or "auto",
                    "max_model_len": i.max_model_len, "tensor_parallel_size": i.tensor_parallel}
            return [self._line("Automatically detected platform cuda.", src="__init__.py:241"),
                    self._line("vLLM API server version 0.10.2", src="api_server.py:1805"),
                    self._line(f"non-default args: {({k: v for k, v in args.items() if v is not None})}",
                               src="utils.py:326"),
                    self._line(f"Resolved architecture: {arch}", src="model.py:547"),
                    self._line(f"Using max model len {self.max_model_len}", src="model.py:1510"),
                    self._line(f"Starting to load model {m}...", src="gpu_model_runner.py:1953")]
        if i.engine == "tgi":
            return [self._line(f'Args {{ model_id: "{m}", revision: {json.dumps(i.revision)}, '
                               f"sharded: None, num_shard: Some({i.tensor_parallel}), quantize: "
                               f"{json.dumps(i.quantization)}, dtype: {json.dumps(i.dtype)}, "
                               f"max_total_tokens: Some({self.max_model_len}), port: {i.port}, .. }}"),
                    self._line(f"Starting check and download process for {m}", src="download"),
                    self._line(f"Successfully downloaded weights for {m}", src="download"),
                    self._line("Starting shard rank=0", src="shard-manager: text_generation_launcher")]
        if i.engine == "sglang":
            return [self._line(f"server_args=ServerArgs(model_path='{m}', revision={i.revision!r}, "
                               f"tp_size={i.tensor_parallel}, port={i.port}, dtype='{i.dtype or 'auto'}', "
                               f"context_length={i.max_model_len}, enable_metrics={i.metrics_enabled}, ...)"),
                    self._line("Init torch distributed begin.", src="TP0"),
                    self._line(f"Load weight begin. avail mem={self.runtime.gpu_memory_gib(self.pod):.2f} GB",
                               src="TP0")]
        return [self._line("using the \"epoll\" event method"), self._line("start worker processes")]

    def _ready_lines(self, took: float) -> list[str]:
        i = self.info
        gib = self.runtime.weights_gib(self.pod, i)
        if i.engine == "vllm":
            return [self._line(f"Loading weights took {took:.2f} seconds", src="default_loader.py:267"),
                    self._line(f"Model loading took {gib:.4f} GiB and {took + 0.8:.6f} seconds",
                               src="gpu_model_runner.py:1975"),
                    self._line(f"Available KV cache memory: {max(0.5, self._free_gib()):.2f} GiB",
                               src="gpu_worker.py:276"),
                    self._line(f"Maximum concurrency for {self.max_model_len} tokens per request: "
                               f"{self.max_batch / 10:.2f}x", src="kv_cache_utils.py:993"),
                    self._line(f"Starting vLLM API server 0 on http://0.0.0.0:{i.port}", src="launcher.py:36"),
                    "INFO:     Started server process [1]", "INFO:     Waiting for application startup.",
                    "INFO:     Application startup complete."]
        if i.engine == "tgi":
            return [self._line(f"Shard ready in {took:.1f}s rank=0", src="shard-manager: text_generation_launcher"),
                    self._line("Starting Webserver"),
                    self._line("Using the Hugging Face API to retrieve tokenizer config",
                               src="text_generation_router::server: router/src/server.rs:1730"),
                    self._line("Connected", src="text_generation_router::server: router/src/server.rs:2328")]
        if i.engine == "sglang":
            return [self._line(f"Load weight end. type={self.model_meta.get('arch', 'LlamaForCausalLM')}, "
                               f"dtype=torch.bfloat16, avail mem={self._free_gib():.2f} GB, mem usage={gib:.2f} GB.",
                               src="TP0"),
                    self._line(f"KV Cache is allocated. #tokens: {self.max_batch * 400}", src="TP0"),
                    self._line(f"INFO:     Uvicorn running on http://0.0.0.0:{i.port} (Press CTRL+C to quit)"),
                    self._line("The server is fired up and ready to roll!")]
        return [self._line("ready")]

    def _free_gib(self) -> float:
        return max(0.3, self.runtime.gpu_memory_gib(self.pod) * 0.9 - self.runtime.weights_gib(self.pod, self.info))

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len or self.model_meta.get("max_len") or 4096

    def _shards(self) -> int:
        return max(1, min(8, self.model_meta.get("shards") or 4))

    def _load(self) -> None:
        self.log(*self._startup_lines())
        if self.mode == "launch_error":  # refused its arguments: exits before loading anything
            self._die()
            return
        total = self.clock.scaled(self.load_seconds)
        fail_at = {"crash_loop": 0.6, "oom": 0.5}.get(self.mode)
        shards = self._shards() if self.info.engine != "generic" else 1
        for k in range(1, shards + 1):
            if self._stop.wait(total / shards):
                return
            frac = k / shards
            if self.info.engine in ("vllm", "sglang"):
                elapsed = self.load_seconds * frac
                self.log(f"Loading safetensors checkpoint shards: {int(frac * 100):3d}% Completed | {k}/{shards} "
                         f"[{int(elapsed // 60):02d}:{int(elapsed % 60):02d}<00:00, {1 / max(elapsed / k, 1e-3):.2f}it/s]")
            elif self.info.engine == "tgi" and k < shards:
                self.log(self._line("Waiting for shard to be ready... rank=0",
                                    src="shard-manager: text_generation_launcher"))
            if fail_at is not None and frac >= fail_at:
                self._die()
                return
        if self._stop.is_set():
            return
        self.log(*self._ready_lines(self.load_seconds))
        self.phase = "ready"
        self.ready_at = time.time()
        self._ready.set()
        if self._on_ready is not None:
            try:
                self._on_ready()
            except Exception as exc:  # noqa: BLE001 - the controller's bug must not kill the pod thread
                self.log(f"(sandbox) on_ready callback failed: {exc!r}")

    def _die(self) -> None:
        if self.mode == "oom":
            code, reason, lines = 137, "OOMKilled", self._oom_lines()
        else:
            code, reason, lines = 1, "Error", self._crash_lines()
        self.log(*lines)
        self.exit_code, self.exit_reason = code, reason
        self.phase = "exited"
        self._ready.clear()
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._server.kill()
        if self._on_exit is not None:
            try:
                self._on_exit(code, reason)
            except Exception as exc:  # noqa: BLE001
                self.log(f"(sandbox) on_exit callback failed: {exc!r}")

    def _oom_lines(self) -> list[str]:
        total = self.runtime.gpu_memory_gib(self.pod)
        need = self.runtime.weights_gib(self.pod, self.info) / max(1, self.info.tensor_parallel)
        ask = max(0.5, min(need, total) * 0.09)
        free = max(0.02, total - min(need, total) * 0.95)
        used = total - free
        msg = (f"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {ask:.2f} GiB. GPU 0 has a total "
               f"capacity of {total:.2f} GiB of which {free * 1024:.2f} MiB is free. Process 1 has {used:.2f} GiB "
               f"memory in use. Of the allocated memory {used - 0.35:.2f} GiB is allocated by PyTorch, and "
               f"116.21 MiB is reserved by PyTorch but unallocated. If reserved but unallocated memory is large "
               f"try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See "
               f"documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html"
               f"#environment-variables)")
        if self.info.engine == "tgi":
            return [self._line("Error when initializing model", level="ERROR",
                               src="shard-manager: text_generation_launcher"),
                    "Traceback (most recent call last):",
                    '  File "/opt/conda/lib/python3.11/site-packages/text_generation_server/server.py", line 268, '
                    "in serve_inner", "    model = get_model_with_lora_adapters(",
                    '  File "/opt/conda/lib/python3.11/site-packages/torch/nn/modules/module.py", line 1340, in convert',
                    "    return t.to(", msg,
                    self._line("Shard 0 failed to start", level="ERROR"),
                    self._line("Shutting down shards"), "Error: ShardCannotStart"]
        return ["Traceback (most recent call last):",
                '  File "/usr/local/lib/python3.12/dist-packages/vllm/model_executor/model_loader/base_loader.py", '
                "line 49, in load_model" if self.info.engine == "vllm" else
                '  File "/sgl-workspace/sglang/python/sglang/srt/model_loader/loader.py", line 381, in load_model',
                "    model = initialize_model(vllm_config=vllm_config," if self.info.engine == "vllm" else
                "    model = _initialize_model(",
                '  File "/usr/local/lib/python3.12/dist-packages/torch/utils/_device.py", line 104, '
                "in __torch_function__", "    return func(*args, **kwargs)", msg]

    def _crash_lines(self) -> list[str]:
        e = self.info.engine
        if self.mode == "launch_error":
            return self._fail_detail.split("\n")
        if e == "vllm":
            return [self._line("EngineCore failed to start.", level="ERROR", src="core.py:718"),
                    "Traceback (most recent call last):",
                    '  File "/usr/local/lib/python3.12/dist-packages/vllm/v1/engine/core.py", line 709, '
                    "in run_engine_core",
                    "    engine_core = EngineCoreProc(*args, **kwargs)",
                    '  File "/usr/local/lib/python3.12/dist-packages/vllm/v1/core/kv_cache_utils.py", line 700, '
                    "in check_enough_kv_cache_memory",
                    "    raise ValueError(",
                    f"ValueError: To serve at least one request with the models's max seq len "
                    f"({self.max_model_len}), (1.31 GiB KV cache is needed, which is larger than the available KV "
                    f"cache memory (0.62 GiB). Based on the available memory, the estimated maximum model length is "
                    f"{self.max_model_len // 2}. Try increasing `gpu_memory_utilization` or decreasing "
                    f"`max_model_len` when initializing the engine.",
                    "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}"]
        if e == "tgi":
            return [self._line("Error when initializing model", level="ERROR",
                               src="shard-manager: text_generation_launcher"),
                    "Traceback (most recent call last):",
                    '  File "/opt/conda/lib/python3.11/site-packages/text_generation_server/models/'
                    'flash_causal_lm.py", line 1466, in warmup',
                    "    raise RuntimeError(",
                    "RuntimeError: Not enough memory to handle 4096 prefill tokens. You need to decrease "
                    "`--max-batch-prefill-tokens`",
                    self._line("Shard 0 failed to start", level="ERROR"),
                    self._line("Shutting down shards"), "Error: ShardCannotStart"]
        if e == "sglang":
            return ["Traceback (most recent call last):",
                    '  File "/sgl-workspace/sglang/python/sglang/srt/managers/scheduler.py", line 2586, '
                    "in run_scheduler_process",
                    "    scheduler = Scheduler(server_args, port_args, gpu_id, tp_rank, moe_ep_rank, pp_rank, dp_rank)",
                    '  File "/sgl-workspace/sglang/python/sglang/srt/model_executor/model_runner.py", line 1208, '
                    "in init_memory_pool",
                    "    raise RuntimeError(",
                    "RuntimeError: Not enough memory. Please try to increase --mem-fraction-static.",
                    self._line("Received sigquit from a child process. It usually means the child failed.")]
        return [self._line("[emerg] 1#1: host not found in upstream \"backend\" in /etc/nginx/nginx.conf:12")]

    # ---- serving helpers -------------------------------------------------------------------------
    def request_log(self, method: str, path: str, status: int) -> None:
        if self.info.engine in ("vllm", "sglang"):
            phrase = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error",
                      503: "Service Unavailable"}.get(status, "")
            self.log(f'INFO:     10.0.0.1:{40000 + self.requests_served % 20000} - "{method} {path} HTTP/1.1" '
                     f"{status} {phrase}")

    def check_generation(self) -> None:
        """Apply the behavior to one generation: hang forever, fail with 500, or go on."""
        if self.mode == "hang":
            stop = self.runtime.faults.stop
            while not (self._stop.is_set() or stop.is_set()):
                self._stop.wait(0.2)
            raise _Aborted("pod stopped")
        if self.mode == "http_500":
            self.failures += 1
            msgs = {"vllm": "EngineCore encountered an issue. See stack trace (above) for the root cause.",
                    "tgi": "Request failed during generation: Server error: CUDA error: an illegal memory access "
                           "was encountered",
                    "sglang": "Internal server error: the scheduler process died."}
            msg = msgs.get(self.info.engine, "internal error")
            self.log(self._line(msg, level="ERROR"))
            raise HttpError(500, msg, reason="InternalServerError")

    def plan(self, prompt: str, max_tokens: int, *, stop: list[str] | None = None) -> Completion:
        images = len(_IMG.findall(prompt)) if "paligemma" in (self.info.model_id or "").lower() else 0
        return plan_completion(prompt, self.info.model_id or "", max_tokens, stop=stop,
                               wrong=self.mode == "wrong_answers", image_tokens=256 * images)

    def cloud_latency(self, c: Completion) -> tuple[float, float]:
        """(time to first token, total) in cloud seconds."""
        ttft = c.prompt_tokens / self.runtime.prefill_tokens_per_s + 1 / self.tokens_per_s
        return ttft, ttft + max(0, c.completion_tokens - 1) / self.tokens_per_s

    @contextlib.contextmanager
    def generation(self, c: Completion) -> Iterator[_Pacer]:
        """Admission (batch slots, waiting queue), pacing and metrics for one generation."""
        self.check_generation()
        with self._cond:
            if self.max_concurrent is not None and self.running + self.waiting >= self.max_concurrent:
                raise HttpError(429, "Model is overloaded", reason="overloaded")
            self.waiting += 1
            try:
                while self.running >= self.max_batch and not self._stop.is_set():
                    self._cond.wait(0.5)
            finally:
                self.waiting -= 1
            if self._stop.is_set():
                raise _Aborted("pod stopped")
            self.running += 1
        ttft, total = self.cloud_latency(c)
        pacer = _Pacer(self, ttft, 1 / self.tokens_per_s)
        try:
            yield pacer
            pacer.finish()
            with self._cond:
                self.requests_served += 1
                self.prompt_tokens_total += c.prompt_tokens
                self.generation_tokens_total += c.completion_tokens
                self.success[c.finish_reason] = self.success.get(c.finish_reason, 0) + 1
                self.e2e.observe(total)
                self.ttft.observe(ttft)
                self.tgi_duration.observe(total)
        finally:
            with self._cond:
                self.running -= 1
                self._cond.notify()

    def run(self, c: Completion) -> None:
        """A whole non-streamed generation."""
        with self.generation(c) as pacer:
            pacer.first()
            pacer.tokens(max(0, c.completion_tokens - 1))

    def metrics_text(self) -> str:
        i = self.info
        name = i.served_model_name or i.model_id or ""
        lines: list[str] = []
        usage = min(1.0, self.running / max(1, self.max_batch) * 0.8 + (0.02 if self.running else 0.0))
        if i.engine == "vllm":
            lb = f'engine="0",model_name="{name}"'
            _prom(lines, "vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
                  [(lb, self.running)])
            _prom(lines, "vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
                  [(lb, self.waiting)])
            _prom(lines, "vllm:gpu_cache_usage_perc", "gauge",
                  "GPU KV-cache usage. 1 means 100 percent usage. DEPRECATED: Use vllm:kv_cache_usage_perc instead.",
                  [(lb, usage)])
            _prom(lines, "vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
                  [(lb, usage)])
            _prom(lines, "vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
                  [(lb, self.prompt_tokens_total)])
            _prom(lines, "vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
                  [(lb, self.generation_tokens_total)])
            _prom(lines, "vllm:request_success_total", "counter", "Count of successfully processed requests.",
                  [(f'{lb},finished_reason="{r}"', n) for r, n in sorted(self.success.items())] or
                  [(f'{lb},finished_reason="stop"', 0)])
            _prom(lines, "vllm:time_to_first_token_seconds", "histogram", "Histogram of time to first token in seconds.",
                  hist=(self.ttft, lb))
            _prom(lines, "vllm:e2e_request_latency_seconds", "histogram",
                  "Histogram of e2e request latency in seconds.", hist=(self.e2e, lb))
        elif i.engine == "tgi":
            _prom(lines, "tgi_queue_size", "gauge", "Current queue size", [("", self.waiting)])
            _prom(lines, "tgi_batch_current_size", "gauge", "Current batch size", [("", self.running)])
            _prom(lines, "tgi_batch_current_max_tokens", "gauge", "Maximum tokens for the current batch",
                  [("", self.running * self.max_model_len)])
            _prom(lines, "tgi_request_count", "counter", "Total number of requests",
                  [("", self.requests_served + self.failures)])
            _prom(lines, "tgi_request_success", "counter", "Number of successful requests",
                  [("", self.requests_served)])
            _prom(lines, "tgi_request_failure", "counter", "Number of failed requests",
                  [('err="generation"', self.failures)])
            _prom(lines, "tgi_request_duration", "histogram", "Request duration", hist=(self.tgi_duration, ""))
            _prom(lines, "tgi_request_input_length", "counter", "Input tokens (sandbox: total)",
                  [("", self.prompt_tokens_total)])
            _prom(lines, "tgi_request_generated_tokens", "counter", "Generated tokens (sandbox: total)",
                  [("", self.generation_tokens_total)])
        else:
            lb = f'model_name="{name}"'
            _prom(lines, "sglang:num_running_reqs", "gauge", "The number of running requests.", [(lb, self.running)])
            _prom(lines, "sglang:num_queue_reqs", "gauge", "The number of requests in the waiting queue.",
                  [(lb, self.waiting)])
            _prom(lines, "sglang:num_used_tokens", "gauge", "The number of used tokens.",
                  [(lb, self.running * 400)])
            _prom(lines, "sglang:token_usage", "gauge", "The token usage.", [(lb, usage)])
            _prom(lines, "sglang:gen_throughput", "gauge", "The generation throughput (token/s).",
                  [(lb, self.tokens_per_s * self.running)])
            _prom(lines, "sglang:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
                  [(lb, self.prompt_tokens_total)])
            _prom(lines, "sglang:generation_tokens_total", "counter", "Number of generation tokens processed.",
                  [(lb, self.generation_tokens_total)])
            _prom(lines, "sglang:num_requests_total", "counter", "Number of requests processed.",
                  [(lb, self.requests_served)])
            _prom(lines, "sglang:time_to_first_token_seconds", "histogram", "Histogram of time to first token.",
                  hist=(self.ttft, lb))
            _prom(lines, "sglang:e2e_request_latency_seconds", "histogram", "Histogram of E2E request latency.",
                  hist=(self.e2e, lb))
        return "\n".join(lines) + "\n"


class _Pacer:
    """Sleeps the scaled generation time: the first token after the prefill, then per token."""

    def __init__(self, pod: PodServer, ttft: float, per_token: float) -> None:
        self.pod = pod
        self.ttft = ttft
        self.per_token = per_token
        self._debt = 0.0  # real seconds owed

    def _sleep(self, seconds: float) -> None:
        self._debt += seconds
        if self._debt >= 0.002:
            if self.pod._stop.wait(self._debt):
                raise _Aborted("pod stopped")
            self._debt = 0.0

    def first(self) -> None:
        self._sleep(self.pod.clock.scaled(self.ttft))

    def tokens(self, n: int = 1) -> None:
        self._sleep(self.pod.clock.scaled(self.per_token * n))

    def finish(self) -> None:
        if self._debt > 0 and self.pod._stop.wait(self._debt):
            raise _Aborted("pod stopped")
        self._debt = 0.0


# ---- HTTP: common ---------------------------------------------------------------------------------

class _ModelHandler(JsonHandler):
    service = "model"
    server: _PodHTTPServer

    @property
    def pod(self) -> PodServer:
        return self.server.state

    def _gate(self) -> bool:
        """Answer the request before routing (True if it did). For engines that are closed while loading."""
        return False

    def _model_dispatch(self) -> None:
        if self.pod._stop.is_set():
            self.close_connection = True
            return
        if self.command == "POST":
            self.pod.arrivals.append(time.time())
        if self._gate():
            return
        JsonHandler._dispatch(self)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _model_dispatch

    def send_response(self, code: int, message: str | None = None) -> None:
        super().send_response(code, message)
        if self.url.path not in ("/health", "/metrics", "/ping"):
            self.pod.request_log(self.command, self.url.path, code)

    def stream(self, c: Completion, events: Callable[[_Pacer], Iterator[str]], *, prefix: str = "data: ",
               suffix: str = "\n\n", content_type: str = "text/event-stream; charset=utf-8") -> None:
        """Admit the generation (before any header is sent), then stream its events as chunks."""
        with self.pod.generation(c) as pacer:
            self.start_chunked(200, content_type, headers={"Cache-Control": "no-cache"})
            for ev in events(pacer):
                self.write_chunk(f"{prefix}{ev}{suffix}")
            self.end_chunked()


def _num(body: dict[str, Any], key: str, default: Any, cast: type = int) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise HttpError(400, f"{key} must be a number") from None


def _stops(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _oai_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _require_ready(h: _ModelHandler) -> None:
    if not h.pod.ready:
        raise HttpError(503, "The model is still loading.", reason="ServiceUnavailableError")


def _check_model(h: _ModelHandler, body: dict[str, Any]) -> str:
    name = h.pod.info.served_model_name or h.pod.info.model_id or ""
    asked = body.get("model")
    if asked and asked != name and h.pod.info.engine == "vllm":
        raise HttpError(404, f"The model `{asked}` does not exist.", reason="NotFoundError")
    return name


def _check_len(h: _ModelHandler, prompt_tokens: int, max_tokens: int, *, chat: bool) -> None:
    limit = h.pod.max_model_len
    if prompt_tokens + max_tokens > limit:
        where = "messages" if chat else "prompt"
        raise HttpError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                             f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {where}, {max_tokens} in "
                             f"the completion). Please reduce the length of the {where} or completion.",
                        reason="BadRequestError")


def _usage(c: Completion) -> dict[str, Any]:
    return {"prompt_tokens": c.prompt_tokens, "total_tokens": c.prompt_tokens + c.completion_tokens,
            "completion_tokens": c.completion_tokens, "prompt_tokens_details": None}


def _oai_models(h: _ModelHandler, owned_by: str) -> dict[str, Any]:
    i = h.pod.info
    name = i.served_model_name or i.model_id
    return {"object": "list", "data": [{
        "id": name, "object": "model", "created": int(h.pod.started_at), "owned_by": owned_by,
        "root": i.model_id, "parent": None, "max_model_len": h.pod.max_model_len,
        "permission": [{"id": f"modelperm-{uuid.uuid5(uuid.NAMESPACE_URL, name or '').hex}",
                        "object": "model_permission", "created": int(h.pod.started_at), "allow_create_engine": False,
                        "allow_sampling": True, "allow_logprobs": True, "allow_search_indices": False,
                        "allow_view": True, "allow_fine_tuning": False, "organization": "*", "group": None,
                        "is_blocking": False}]}]}


def _oai_completions(h: _ModelHandler) -> None:
    _require_ready(h)
    body = h.json_body()
    name = _check_model(h, body)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(p, str) for p in prompt):
            raise HttpError(400, "prompt must be a string or a list of strings", reason="BadRequestError")
        prompts = prompt
    elif isinstance(prompt, str):
        prompts = [prompt]
    else:
        raise HttpError(400, "prompt is required", reason="BadRequestError")
    max_tokens = _num(body, "max_tokens", 16)
    stop = _stops(body.get("stop"))
    echo = bool(body.get("echo"))
    plans = [h.pod.plan(p, max_tokens, stop=stop) for p in prompts]
    for c in plans:
        _check_len(h, c.prompt_tokens, max_tokens, chat=False)
    cid, created = _oai_id("cmpl"), int(time.time())
    fp = "tgi" if h.pod.info.engine == "tgi" else None
    if not body.get("stream"):
        choices = []
        n = _n_choices(body)
        for idx, (p, c) in enumerate((p, c) for p, c in zip(prompts, plans, strict=True) for _ in range(n)):
            h.pod.run(c)
            choices.append({"index": idx, "text": (p if echo else "") + c.text, "logprobs": None,
                            "finish_reason": c.finish_reason, "stop_reason": None, "prompt_logprobs": None})
        usage = {"prompt_tokens": sum(c.prompt_tokens for c in plans),
                 "completion_tokens": n * sum(c.completion_tokens for c in plans),
                 "total_tokens": sum(c.prompt_tokens + c.completion_tokens for c in plans), "prompt_tokens_details": None}
        out = {"id": cid, "object": "text_completion", "created": created, "model": name, "choices": choices,
               "usage": usage, "service_tier": None, "system_fingerprint": fp, "kv_transfer_params": None}
        h.send_json(200, out)
        return
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    c = plans[0]

    def events(pacer: _Pacer) -> Iterator[str]:
        pacer.first()
        for k, piece in enumerate(c.pieces):
            if k:
                pacer.tokens()
            last = k == len(c.pieces) - 1
            yield json.dumps({"id": cid, "object": "text_completion", "created": created, "model": name,
                              "choices": [{"index": 0, "text": piece, "logprobs": None,
                                           "finish_reason": c.finish_reason if last else None,
                                           "stop_reason": None}]})
        if not c.pieces:
            yield json.dumps({"id": cid, "object": "text_completion", "created": created, "model": name,
                              "choices": [{"index": 0, "text": "", "logprobs": None,
                                           "finish_reason": c.finish_reason, "stop_reason": None}]})
        if include_usage:
            yield json.dumps({"id": cid, "object": "text_completion", "created": created, "model": name,
                              "choices": [], "usage": _usage(c)})
        yield "[DONE]"

    h.stream(c, events)


def _n_choices(body: dict[str, Any]) -> int:
    """OpenAI ``n``: that many choices per prompt (vLLM and TGI both honour it; must be >= 1)."""
    n = body.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise HttpError(400, f"n must be at least 1, got {n}.", reason="BadRequestError")
    return n


def _oai_chat(h: _ModelHandler, *, has_template: bool, template_error: HttpError) -> None:
    _require_ready(h)
    body = h.json_body()
    name = _check_model(h, body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, "messages must be a non-empty list", reason="BadRequestError")
    if not has_template:
        raise template_error
    prompt = render_chat(messages, h.pod.model_meta.get("family", "chatml"))
    mt = body.get("max_completion_tokens") or body.get("max_tokens")
    probe = h.pod.plan(prompt, 0)
    max_tokens = int(mt) if mt is not None else max(1, h.pod.max_model_len - probe.prompt_tokens)
    _check_len(h, probe.prompt_tokens, max_tokens, chat=True)
    c = h.pod.plan(prompt, max_tokens, stop=_stops(body.get("stop")))
    cid, created = _oai_id("chatcmpl"), int(time.time())
    fp = f"{h.pod.runtime.tgi_version(h.pod.info)}-sha-sandbox" if h.pod.info.engine == "tgi" else None
    if not body.get("stream"):
        n = _n_choices(body)
        for _ in range(n):
            h.pod.run(c)
        usage = _usage(c)
        usage["completion_tokens"] *= n
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        h.send_json(200, {
            "id": cid, "object": "chat.completion", "created": created, "model": name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None,
                                                 "annotations": None, "audio": None, "function_call": None,
                                                 "tool_calls": [], "reasoning_content": None},
                         "logprobs": None, "finish_reason": c.finish_reason, "stop_reason": None} for i in range(n)],
            "service_tier": None, "system_fingerprint": fp, "usage": usage, "prompt_logprobs": None,
            "kv_transfer_params": None})
        return
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    def chunk(delta: dict[str, Any], finish: str | None) -> str:
        return json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                           "system_fingerprint": fp,
                           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    def events(pacer: _Pacer) -> Iterator[str]:
        yield chunk({"role": "assistant", "content": ""}, None)
        pacer.first()
        for k, piece in enumerate(c.pieces):
            if k:
                pacer.tokens()
            yield chunk({"content": piece}, None)
        yield chunk({}, c.finish_reason)
        if include_usage:
            yield json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                              "choices": [], "usage": _usage(c)})
        yield "[DONE]"

    h.stream(c, events)


# ---- vLLM -----------------------------------------------------------------------------------------

_VLLM: list = []


class VllmHandler(_ModelHandler):
    routes = _VLLM

    def error_body(self, err: HttpError) -> Any:
        if err.body is not None:
            return err.body
        if err.status == 404 and err.reason == "NotFound":
            return {"detail": "Not Found"}
        kind = err.reason if err.reason not in ("", HttpError(err.status, "").reason) else {
            400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError",
            503: "ServiceUnavailableError"}.get(err.status, "Error")
        return {"object": "error", "message": err.message, "type": kind, "param": None, "code": err.status}


def _no_legacy(h: _ModelHandler) -> None:
    if h.pod.info.legacy_api:
        raise HttpError(404, "Not Found", reason="NotFound")


@route(_VLLM, "GET", r"/health")
def _vllm_health(h: VllmHandler):
    h.send_text(200, b"", content_type="application/json")


@route(_VLLM, "GET", r"/ping")
def _vllm_ping(h: VllmHandler):
    _no_legacy(h)
    h.send_text(200, b"", content_type="application/json")


@route(_VLLM, "GET", r"/version")
def _vllm_version(h: VllmHandler):
    _no_legacy(h)
    return {"version": "0.10.2"}


@route(_VLLM, "GET", r"/v1/models")
def _vllm_models(h: VllmHandler):
    _no_legacy(h)
    _require_ready(h)
    return _oai_models(h, "vllm")


@route(_VLLM, "POST", r"/v1/completions")
def _vllm_completions(h: VllmHandler):
    _no_legacy(h)
    _oai_completions(h)


@route(_VLLM, "POST", r"/v1/chat/completions")
def _vllm_chat(h: VllmHandler):
    _no_legacy(h)
    _oai_chat(h, has_template=h.pod.model_meta.get("chat_template", True), template_error=HttpError(
        400, "As of transformers v4.44, default chat template is no longer allowed, so you must provide a chat "
             "template if the tokenizer does not define one.", reason="BadRequestError"))


@route(_VLLM, "POST", r"/generate")
def _vllm_generate(h: VllmHandler):
    if not h.pod.info.legacy_api:  # the OpenAI server (vllm.entrypoints.openai.api_server) has no /generate
        raise HttpError(404, "Not Found", reason="NotFound")
    _require_ready(h)
    body = h.json_body()
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise HttpError(400, "prompt is required", reason="BadRequestError")
    max_tokens = _num(body, "max_tokens", 16)
    c = h.pod.plan(prompt, max_tokens, stop=_stops(body.get("stop")))
    _check_len(h, c.prompt_tokens, max_tokens, chat=False)
    if not body.get("stream"):
        h.pod.run(c)
        return {"text": [prompt + c.text]}

    def events(pacer: _Pacer) -> Iterator[str]:
        pacer.first()
        for k in range(len(c.pieces)):
            if k:
                pacer.tokens()
            yield json.dumps({"text": [prompt + "".join(c.pieces[:k + 1])]})

    # the legacy server streams NUL-separated JSON objects
    h.stream(c, events, prefix="", suffix="\0", content_type="application/json")
    return None


@route(_VLLM, "GET", r"/metrics")
def _vllm_metrics(h: VllmHandler):
    _no_legacy(h)
    h.send_text(200, h.pod.metrics_text(), content_type="text/plain; version=0.0.4; charset=utf-8")


# ---- TGI ------------------------------------------------------------------------------------------

_TGI: list = []


class TgiHandler(_ModelHandler):
    routes = _TGI

    def error_body(self, err: HttpError) -> Any:
        if err.body is not None:
            return err.body
        kind = {400: "validation", 422: "validation", 429: "overloaded", 500: "generation",
                503: "unhealthy", 404: "not_found"}.get(err.status, "error")
        if err.reason == "template_error":
            kind = "template_error"
        return {"error": err.message, "error_type": kind}

    def _gate(self) -> bool:
        if not self.pod.ready and self.url.path != "/metrics":
            # the router only serves once the shards are ready
            self.__dict__.pop("_body", None)
            self.body_bytes()
            self.send_json(503, {"error": "Model is loading", "error_type": "unhealthy"})
            return True
        return False


def _tgi_params(h: TgiHandler, body: dict[str, Any]) -> tuple[str, dict[str, Any], Completion]:
    inputs = body.get("inputs")
    if not isinstance(inputs, str) or not inputs:
        raise HttpError(422, "Input validation error: `inputs` cannot be empty")
    params = body.get("parameters") or {}
    max_new = _num(params, "max_new_tokens", 100)
    if max_new < 1:
        raise HttpError(422, "Input validation error: `max_new_tokens` must be strictly positive")
    stop = _stops(params.get("stop"))
    if len(stop) > 4:
        raise HttpError(422, f"Input validation error: `stop` supports up to 4 stop sequences. Given: {len(stop)}")
    c = h.pod.plan(inputs, max_new, stop=stop)
    limit = h.pod.max_model_len
    if c.prompt_tokens + max_new > limit:
        raise HttpError(422, f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {limit}. "
                             f"Given: {c.prompt_tokens} `inputs` tokens and {max_new} `max_new_tokens`")
    return inputs, params, c


def _tok(piece: str, i: int) -> dict[str, Any]:
    return {"id": _h(piece) % 32000, "text": piece, "logprob": -round(0.05 + (_h(piece, str(i)) % 200) / 100, 4),
            "special": False}


def _tgi_finish(c: Completion, params: dict[str, Any]) -> str:
    if c.finish_reason == "length":
        return "length"
    return "stop_sequence" if _stops(params.get("stop")) else "eos_token"


def _tgi_details(c: Completion, params: dict[str, Any]) -> dict[str, Any]:
    return {"finish_reason": _tgi_finish(c, params), "generated_tokens": c.completion_tokens,
            "seed": params.get("seed"), "prefill": [], "tokens": [_tok(p, i) for i, p in enumerate(c.pieces)],
            "top_tokens": None, "best_of_sequences": None}


def _tgi_text(c: Completion, inputs: str, params: dict[str, Any]) -> str:
    return (inputs if params.get("return_full_text") else "") + c.text


def _tgi_headers(h: TgiHandler, c: Completion) -> dict[str, str]:
    ttft, total = h.pod.cloud_latency(c)
    ms = max(1, int(total * 1000))
    return {"x-compute-type": "gpu+optimized", "x-compute-time": f"{total:.6f}",
            "x-compute-characters": str(len(c.text)), "x-total-time": str(ms), "x-validation-time": "0",
            "x-queue-time": "0", "x-inference-time": str(ms), "x-time-per-token": str(int(1000 / h.pod.tokens_per_s)),
            "x-prompt-tokens": str(c.prompt_tokens), "x-generated-tokens": str(c.completion_tokens)}


def _tgi_generate_json(h: TgiHandler, *, as_list: bool = False) -> None:
    inputs, params, c = _tgi_params(h, h.json_body())
    h.pod.run(c)
    out: dict[str, Any] = {"generated_text": _tgi_text(c, inputs, params)}
    if params.get("details"):
        out["details"] = _tgi_details(c, params)
    h.send_json(200, [out] if as_list else out, headers=_tgi_headers(h, c))


def _tgi_stream(h: TgiHandler, body: dict[str, Any] | None = None) -> None:
    inputs, params, c = _tgi_params(h, body if body is not None else h.json_body())

    def events(pacer: _Pacer) -> Iterator[str]:
        pacer.first()
        n = len(c.pieces)
        for k, piece in enumerate(c.pieces):
            if k:
                pacer.tokens()
            last = k == n - 1
            yield json.dumps({"index": k + 1, "token": _tok(piece, k), "top_tokens": None,
                              "generated_text": _tgi_text(c, inputs, params) if last else None,
                              "details": {"finish_reason": _tgi_finish(c, params), "generated_tokens": n,
                                          "seed": params.get("seed"), "input_length": c.prompt_tokens}
                              if last else None})

    h.stream(c, events, prefix="data:")


@route(_TGI, "GET", r"/health")
def _tgi_health(h: TgiHandler):
    h.send_text(200, b"", content_type="application/json")


@route(_TGI, "GET", r"/info")
def _tgi_info(h: TgiHandler):
    i, pod = h.pod.info, h.pod
    version = pod.runtime.tgi_version(i)
    return {"model_id": i.model_id, "model_sha": pod.model_meta.get("sha"), "model_pipeline_tag":
            pod.model_meta.get("pipeline_tag", "text-generation"), "max_concurrent_requests": pod.max_concurrent,
            "max_best_of": 2, "max_stop_sequences": 4, "max_input_tokens": pod.max_model_len - 1,
            "max_total_tokens": pod.max_model_len, "validation_workers": 2, "max_client_batch_size": 4,
            "router": "text-generation-router", "version": version, "sha": "sandbox", "docker_label": None}


@route(_TGI, "POST", r"/generate")
def _tgi_generate(h: TgiHandler):
    _tgi_generate_json(h)


@route(_TGI, "POST", r"/generate_stream")
def _tgi_generate_stream(h: TgiHandler):
    _tgi_stream(h)


@route(_TGI, "POST", r"/")
def _tgi_compat(h: TgiHandler):
    body = h.json_body()
    if body.get("stream"):
        _tgi_stream(h, body)
        return
    inputs, params, c = _tgi_params(h, body)
    h.pod.run(c)
    out: dict[str, Any] = {"generated_text": _tgi_text(c, inputs, params)}
    if params.get("details"):
        out["details"] = _tgi_details(c, params)
    h.send_json(200, [out], headers=_tgi_headers(h, c))


@route(_TGI, "GET", r"/v1/models")
def _tgi_models(h: TgiHandler):
    i = h.pod.info
    return {"object": "list", "data": [{"id": i.model_id, "object": "model", "created": 0, "owned_by": i.model_id}]}


@route(_TGI, "POST", r"/v1/completions")
def _tgi_completions(h: TgiHandler):
    _oai_completions(h)


@route(_TGI, "POST", r"/v1/chat/completions")
def _tgi_chat(h: TgiHandler):
    _oai_chat(h, has_template=h.pod.model_meta.get("chat_template", True),
              template_error=HttpError(422, "Template error: template not found", reason="template_error"))


@route(_TGI, "GET", r"/metrics")
def _tgi_metrics(h: TgiHandler):
    h.send_text(200, h.pod.metrics_text(), content_type="text/plain; version=0.0.4")


# ---- SGLang ---------------------------------------------------------------------------------------

_SGL: list = []


class SglangHandler(_ModelHandler):
    routes = _SGL

    def error_body(self, err: HttpError) -> Any:
        if err.body is not None:
            return err.body
        kind = err.reason if err.reason not in ("", HttpError(err.status, "").reason) else {
            400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}.get(err.status, "Error")
        return {"object": "error", "message": err.message, "type": kind, "param": None, "code": err.status}


@route(_SGL, "GET", r"/health")
def _sgl_health(h: SglangHandler):
    if not h.pod.ready:
        raise HttpError(503, "Server is not ready", reason="ServiceUnavailableError")
    h.send_text(200, b"", content_type="text/plain")


@route(_SGL, "GET", r"/health_generate")
def _sgl_health_generate(h: SglangHandler):
    if not h.pod.ready:
        raise HttpError(503, "Server is not ready", reason="ServiceUnavailableError")
    if h.pod.mode == "hang":
        # the real one gives up after HEALTH_CHECK_TIMEOUT (20 s)
        if h.pod._stop.wait(h.pod.clock.scaled(20.0)):
            raise _Aborted("pod stopped")
        raise HttpError(503, "health check timed out", reason="ServiceUnavailableError")
    if h.pod.mode == "http_500":
        raise HttpError(503, "health check failed", reason="ServiceUnavailableError")
    h.send_text(200, b"", content_type="text/plain")


@route(_SGL, "GET", r"/get_model_info")
def _sgl_model_info(h: SglangHandler):
    i, meta = h.pod.info, h.pod.model_meta
    return {"model_path": i.model_id, "tokenizer_path": i.model_id, "is_generation": True,
            "preferred_sampling_params": None, "weight_version": "default",
            "has_image_understanding": "paligemma" in (i.model_id or "").lower(), "has_audio_understanding": False,
            "model_type": (meta.get("config") or {}).get("model_type"),
            "architectures": (meta.get("config") or {}).get("architectures")}


@route(_SGL, "GET", r"/get_server_info")
def _sgl_server_info(h: SglangHandler):
    i = h.pod.info
    return {"model_path": i.model_id, "served_model_name": i.served_model_name, "revision": i.revision,
            "tp_size": i.tensor_parallel, "port": i.port, "context_length": h.pod.max_model_len,
            "max_running_requests": h.pod.max_batch, "enable_metrics": i.metrics_enabled, "version": "0.5.2",
            "internal_states": [{"last_gen_throughput": h.pod.tokens_per_s}]}


@route(_SGL, "GET", r"/v1/models")
def _sgl_models(h: SglangHandler):
    _require_ready(h)
    return _oai_models(h, "sglang")


@route(_SGL, "POST", r"/v1/completions")
def _sgl_completions(h: SglangHandler):
    _oai_completions(h)


@route(_SGL, "POST", r"/v1/chat/completions")
def _sgl_chat(h: SglangHandler):
    _oai_chat(h, has_template=h.pod.model_meta.get("chat_template", True), template_error=HttpError(
        400, "Chat template not found: the tokenizer does not define one; pass --chat-template",
        reason="BadRequestError"))


@route(_SGL, "POST", r"/generate")
def _sgl_generate(h: SglangHandler):
    _require_ready(h)
    body = h.json_body()
    text = body.get("text")
    if not isinstance(text, str):
        raise HttpError(400, "text is required (input_ids are not supported by the sandbox)",
                        reason="BadRequestError")
    sp = body.get("sampling_params") or {}
    max_new = _num(sp, "max_new_tokens", 128)
    c = h.pod.plan(text, max_new, stop=_stops(sp.get("stop")))
    _check_len(h, c.prompt_tokens, max_new, chat=False)
    rid = uuid.uuid4().hex

    def meta(k: int, done: bool) -> dict[str, Any]:
        _, total = h.pod.cloud_latency(c)
        fr = ({"type": "length", "length": max_new} if c.finish_reason == "length" else
              {"type": "stop", "matched": 151645}) if done else None
        return {"id": rid, "finish_reason": fr, "prompt_tokens": c.prompt_tokens, "completion_tokens": k,
                "cached_tokens": 0, "e2e_latency": round(total, 4)}

    if not body.get("stream"):
        h.pod.run(c)
        return {"text": c.text, "meta_info": meta(c.completion_tokens, True)}

    def events(pacer: _Pacer) -> Iterator[str]:
        pacer.first()
        for k in range(len(c.pieces)):
            if k:
                pacer.tokens()
            yield json.dumps({"text": "".join(c.pieces[:k + 1]),
                              "meta_info": meta(k + 1, k == len(c.pieces) - 1)})
        yield "[DONE]"

    h.stream(c, events)
    return None


@route(_SGL, "GET", r"/metrics")
def _sgl_metrics(h: SglangHandler):
    if not h.pod.info.metrics_enabled:
        raise HttpError(404, "Not Found", body={"detail": "Not Found"})
    h.send_text(200, h.pod.metrics_text(), content_type="text/plain; version=0.0.4; charset=utf-8")


# ---- generic containers ---------------------------------------------------------------------------

_GENERIC: list = []


class GenericHandler(_ModelHandler):
    routes = _GENERIC


@route(_GENERIC, "GET", r"/.*")
def _generic_get(h: GenericHandler):
    if not h.pod.ready:
        raise HttpError(503, "starting")
    h.send_text(200, "<html><body><h1>Welcome!</h1></body></html>\n", content_type="text/html")


# ---- runtime --------------------------------------------------------------------------------------

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
        if behavior.mode in ("ok", "slow_load", "wrong_answers", "http_500", "hang") and self.auto_oom:
            shards = max(1, min(info.tensor_parallel, self._gpus(pod)))
            need, have = self.weights_gib(pod, info) / shards, self.gpu_memory_gib(pod, default=0)
            if have and need > have * 0.95:
                fail = ("oom", f"{need:.1f} GiB of weights per GPU > {have:.1f} GiB")
        if behavior.mode in ("ok", "slow_load", "wrong_answers", "http_500", "hang"):
            refused = engine_checks.launch_error(pod, info.engine, gpus=int(self._gpus(pod) or 0),
                                                 model_max_len=self.model_meta(info).get("max_len"))
            if refused:  # the engine exits at start with its own message (sandbox/engines/checks.py)
                fail = ("launch_error", "\n".join(refused))
        load = self.load_seconds(pod, info, behavior)
        with self._lock:
            old = self._servers.get(key)
            n = self._starts[key] = self._starts.get(key, 0) + 1
        if old is not None and old.alive:
            old.stop()
        server = PodServer(self, pod, info, behavior, load, on_ready, on_exit, fail=fail, start_index=n)
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
        """Cloud seconds the weight load takes for this pod (before clock scaling)."""
        info = info or describe_container(pod)
        behavior = behavior or self.behaviors.peek(pod, info)
        if behavior.load_seconds is not None:
            return float(behavior.load_seconds)
        if info.engine == "generic":
            base = 1.0
        else:
            params = self._hub_params(info.model_id)
            billions = params / 1e9 if params else DEFAULT_PARAMS_B
            base = max(DEFAULT_DELAYS["weight_load_min"], DEFAULT_DELAYS["weight_load_per_b_params"] * billions)
        return base * (SLOW_LOAD_FACTOR if behavior.mode == "slow_load" else 1.0)

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
        params = self._hub_params(info.model_id)
        if params is None:
            params = int(DEFAULT_PARAMS_B * 1e9) if info.engine != "generic" else 0
        quantized = info.quantization in ("awq", "gptq", "marlin", "awq_marlin", "gptq_marlin")
        cfg_q = False
        if self.hub is not None and info.model_id:
            with contextlib.suppress(Exception):
                cfg_q = "quantization_config" in self.hub.config(info.model_id)
        if (quantized or cfg_q) and self.hub is not None:
            with contextlib.suppress(Exception):
                return self.hub.weight_bytes(info.model_id) / 2**30
        bpp = BYTES_PER_PARAM.get((info.quantization or info.dtype or "auto").lower(), 2.0)
        return params * bpp / 2**30

    def model_meta(self, info: ContainerInfo) -> dict[str, Any]:
        """What the engine reads from the Hub at start: config, chat template, sha, context length."""
        meta: dict[str, Any] = {"chat_template": _guess_chat(info.model_id), "family": _family(info.model_id or "",
                                                                                                None)}
        hub, model = self.hub, info.model_id
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
