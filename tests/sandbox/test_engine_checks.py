"""Engines like the engines: TGI's launcher and vLLM refuse bad arguments at start with their own message
(exit 1 before loading), the vLLM OpenAI server has no legacy /generate, ``n`` returns n choices."""

from __future__ import annotations

import httpx
import pytest

from sandbox.core import Clock, Faults
from sandbox.engines import ModelRuntime
from sandbox.hub import Hub
from tests.sandbox.test_models import Events, pod, ready, tgi, vllm


@pytest.fixture
def runtime():
    rt = ModelRuntime(clock=Clock(0.0005), faults=Faults(), hub=Hub(faults=Faults()))
    yield rt
    rt.stop()


def _exits(rt, p) -> tuple[int, str, list[str]]:
    ev = Events()
    server = rt.start(p, on_ready=ev.on_ready, on_exit=ev.on_exit)
    assert ev.exited.wait(5), server.logs()[-5:]
    assert not ev.ready.is_set()
    return (*ev.exit, server.logs())


@pytest.mark.parametrize(("env", "message"), [
    ({"MAX_INPUT_LENGTH": "4096", "MAX_TOTAL_TOKENS": "4096"},
     'Error: ArgumentValidation("`max_input_tokens`(4096) must be < `max_total_tokens`(4096)")'),
    ({"MAX_INPUT_TOKENS": "4000", "MAX_TOTAL_TOKENS": "4096", "MAX_BATCH_PREFILL_TOKENS": "2048"},
     "`max_batch_prefill_tokens` must be >= `max_input_tokens`. Given: 2048 and 4000"),
    ({"MAX_INPUT_TOKENS": "1000", "MAX_TOTAL_TOKENS": "4096", "MAX_BATCH_TOTAL_TOKENS": "2048"},
     "`max_total_tokens` must be <= `max_batch_total_tokens`. Given: 4096 and 2048"),
    ({"NUM_SHARD": "2"}, "`num_shard` (2) cannot be larger than the number of visible CUDA devices (1)"),
])
def test_tgi_launcher_refuses_bad_limits(runtime, env, message):
    code, reason, logs = _exits(runtime, tgi(env=env, ports=[80]))
    assert code == 1 and reason == "Error"
    assert message in "\n".join(logs)
    assert not any("Waiting for shard" in line for line in logs)  # refused before loading


def test_tgi_good_limits_start(runtime):
    ready(runtime, tgi(env={"MAX_INPUT_LENGTH": "4095", "MAX_TOTAL_TOKENS": "4096",
                            "MAX_BATCH_PREFILL_TOKENS": "4096", "MAX_BATCH_TOTAL_TOKENS": "8192"}, ports=[80]))


def test_vllm_refuses_max_model_len_above_the_model_context(runtime):
    code, _, logs = _exits(runtime, vllm("meta-llama/Llama-2-7b-chat-hf", "--max-model-len=8192"))
    assert code == 1
    assert "User-specified max_model_len (8192) is greater than the derived max_model_len " \
           "(max_position_embeddings=4096" in "\n".join(logs)


def test_vllm_allows_it_with_the_override_env(runtime):
    ready(runtime, vllm("meta-llama/Llama-2-7b-chat-hf", "--max-model-len=8192",
                        env={"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}))


def test_vllm_refuses_tensor_parallel_above_the_gpus(runtime):
    code, _, logs = _exits(runtime, vllm("google/gemma-2-2b-it", "--tensor-parallel-size=2", gpus=1))
    assert code == 1 and "World size (2) is larger than the number of available GPUs (1)" in "\n".join(logs)


def test_openai_server_has_no_legacy_generate_and_n_returns_n_choices(runtime):
    server = ready(runtime, vllm("google/gemma-2-2b-it"))
    with httpx.Client(base_url=server.url) as http:
        assert http.post("/generate", json={"prompt": "Hi"}).json() == {"detail": "Not Found"}
        out = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "n": 3}).json()
        assert [c["index"] for c in out["choices"]] == [0, 1, 2]
        assert out["usage"]["completion_tokens"] == 3 * 4
        chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 4, "n": 2}).json()
        assert len(chat["choices"]) == 2
        assert http.post("/v1/completions", json={"prompt": "x", "n": 0}).status_code == 400
    legacy = ready(runtime, pod(args=["--model=google/gemma-2-2b-it"], name="legacy",
                                command=["python3", "-m", "vllm.entrypoints.api_server"]))
    with httpx.Client(base_url=legacy.url) as http:
        assert http.post("/generate", json={"prompt": "Hi", "max_tokens": 4}).json()["text"][0].startswith("Hi")


def test_a_connection_accepted_after_the_pod_died_is_closed_not_deadlocked():
    """The kill races the accept loop: a connection it accepts after the kill is closed at once. It once
    took the connection lock twice (not reentrant), hanging the pod's accept thread, the kubelet's stop and
    the sandbox's shutdown with it (seen at the end of a test session)."""
    import socket
    import threading

    from sandbox.core import JsonHandler
    from sandbox.engines.podserver import _PodHTTPServer

    server = _PodHTTPServer(JsonHandler, state=None, faults=None)
    try:
        server._killed = True  # the kill happened between the accept and process_request
        a, b = socket.socketpair()
        t = threading.Thread(target=server.process_request, args=(a, ("127.0.0.1", 1)), daemon=True)
        t.start()
        t.join(5)
        assert not t.is_alive(), "process_request deadlocked on its own lock"
        assert b.recv(1) == b""  # the connection was closed
        b.close()
    finally:
        server.server_close()
