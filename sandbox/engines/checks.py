"""The argument checks the real engines run at start, with their own messages: a bad combination exits the
container at once (CrashLoopBackOff), before any weight is loaded.

* TGI ``text-generation-launcher`` (launcher/src/main.rs): ``max_input_tokens`` (legacy
  ``MAX_INPUT_LENGTH``) must be < ``max_total_tokens``; ``max_batch_prefill_tokens`` >= ``max_input_tokens``;
  ``max_total_tokens`` <= ``max_batch_total_tokens``; ``num_shard`` <= visible GPUs.
* vLLM (``vllm/config``): ``--max-model-len`` above the model's ``max_position_embeddings`` is refused
  unless ``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1``; tensor parallel size above the node's GPUs is refused.
"""

from __future__ import annotations

from typing import Any


def _env(pod: dict[str, Any]) -> dict[str, str]:
    c = ((pod.get("spec") or {}).get("containers") or [{}])[0]
    return {e["name"]: str(e.get("value", "")) for e in c.get("env") or [] if "value" in e}


def _opt(args: list[str], *names: str) -> str | None:
    for i, a in enumerate(args):
        for n in names:
            if a == n and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(n + "="):
                return a.split("=", 1)[1]
    return None


def _int(v: str | None) -> int | None:
    try:
        return int(v) if v not in (None, "") else None
    except ValueError:
        return None


def tgi(pod: dict[str, Any], args: list[str], gpus: int) -> list[str] | None:
    env = _env(pod)

    def val(env_names: tuple[str, ...], flags: tuple[str, ...]) -> int | None:
        for n in env_names:
            if _int(env.get(n)) is not None:
                return _int(env.get(n))
        return _int(_opt(args, *flags))

    max_input = val(("MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH"), ("--max-input-tokens", "--max-input-length"))
    max_total = val(("MAX_TOTAL_TOKENS",), ("--max-total-tokens",))
    prefill = val(("MAX_BATCH_PREFILL_TOKENS",), ("--max-batch-prefill-tokens",))
    batch_total = val(("MAX_BATCH_TOTAL_TOKENS",), ("--max-batch-total-tokens",))
    shards = val(("NUM_SHARD",), ("--num-shard",))
    err = None
    if max_input is not None and max_total is not None and max_input >= max_total:
        err = f"`max_input_tokens`({max_input}) must be < `max_total_tokens`({max_total})"
    elif prefill is not None and max_input is not None and prefill < max_input:
        err = f"`max_batch_prefill_tokens` must be >= `max_input_tokens`. Given: {prefill} and {max_input}"
    elif batch_total is not None and max_total is not None and batch_total < max_total:
        err = f"`max_total_tokens` must be <= `max_batch_total_tokens`. Given: {max_total} and {batch_total}"
    elif shards is not None and gpus and shards > gpus:
        err = f"`num_shard` ({shards}) cannot be larger than the number of visible CUDA devices ({gpus})"
    if err is None:
        return None
    return [f'Error: ArgumentValidation("{err}")']


def vllm(pod: dict[str, Any], args: list[str], gpus: int, model_max_len: int | None) -> list[str] | None:
    env = _env(pod)
    max_len = _int(_opt(args, "--max-model-len"))
    tp = _int(_opt(args, "--tensor-parallel-size", "-tp")) or 1
    if max_len and model_max_len and max_len > model_max_len and env.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN") != "1":
        return ["Traceback (most recent call last):",
                '  File "/usr/local/lib/python3.12/dist-packages/vllm/config/model.py", line 1702, in '
                "_get_and_verify_max_len",
                "    raise ValueError(",
                f"ValueError: User-specified max_model_len ({max_len}) is greater than the derived max_model_len "
                f"(max_position_embeddings={model_max_len} or model_max_length=None in model's config.json). "
                "This may lead to incorrect model outputs or CUDA errors. To allow overriding this maximum, set "
                "the env var VLLM_ALLOW_LONG_MAX_MODEL_LEN=1"]
    if gpus and tp > gpus:
        return ["Traceback (most recent call last):",
                '  File "/usr/local/lib/python3.12/dist-packages/vllm/config/parallel.py", line 452, in '
                "__post_init__",
                "    raise ValueError(",
                f"ValueError: World size ({tp}) is larger than the number of available GPUs ({gpus}) in this node. "
                "If this is intentional and you are using:\n- ray, set '--distributed-executor-backend ray'.\n"
                "- multiprocessing, set '--nnodes' appropriately."]
    return None


def launch_error(pod: dict[str, Any], engine: str, *, gpus: int, model_max_len: int | None) -> list[str] | None:
    """The engine's own error lines if it would refuse its arguments at start, else None."""
    c = ((pod.get("spec") or {}).get("containers") or [{}])[0]
    args = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
    if engine == "tgi":
        return tgi(pod, args, gpus)
    if engine == "vllm":
        return vllm(pod, args, gpus, model_max_len)
    return None
