"""What a pod's first container runs, read from its spec the way the engines read their arguments (pure).

:func:`describe_container` gives the engine, model, served name, port, revision, context length, batch
size, tensor parallelism, dtype and quantization as a :class:`ContainerInfo`:

* engine: by image (``vllm``, ``text-generation-inference`` / ``tgi``, ``sglang``), else by command
  (``vllm``, ``text-generation-launcher``, ``sglang``), else ``generic``;
* vLLM (``vllm/engine/arg_utils.py``): ``--model`` or the positional after ``vllm serve``,
  ``--served-model-name``, ``--max-model-len``, ``--max-num-seqs``, ``--tensor-parallel-size``/``-tp``;
  ``vllm.entrypoints.api_server`` is the legacy server;
* TGI (``text-generation-launcher``, ``launcher/src/main.rs``: each flag also read from its env var):
  ``MODEL_ID``, ``MAX_TOTAL_TOKENS``, ``MAX_BATCH_SIZE``, ``MAX_CONCURRENT_REQUESTS``, ``NUM_SHARD``
  (else the ``nvidia.com/gpu`` limit), ``QUANTIZE``;
* SGLang (``sglang/srt/server_args.py``): ``--model-path``, ``--context-length``,
  ``--max-running-requests``, ``--tp``; ``/metrics`` only with ``--enable-metrics``.

Command and args get Kubernetes' ``$(VAR)`` expansion from the container's literal env, and a
``sh -c "..."`` script is split into words. Port: the first containerPort, else env ``PORT``, else
``--port``, else the engine's default (vLLM 8000, TGI 80, SGLang 30000).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import asdict, dataclass
from typing import Any

ENGINE_DEFAULT_PORTS = {"vllm": 8000, "tgi": 80, "sglang": 30000, "generic": 80}
ENGINE_DEFAULT_MODELS = {"vllm": "facebook/opt-125m", "tgi": "bigscience/bloom-560m", "sglang": None}
GPU = "nvidia.com/gpu"


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
