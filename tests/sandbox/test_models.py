"""Model servers (vLLM, TGI, SGLang) over real HTTP: container detection, lifecycle, behaviors, metrics."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from sandbox import coldstart
from sandbox.core import Clock, Faults
from sandbox.engines import Behavior, Behaviors, ModelRuntime, compose_answer, describe_container
from sandbox.engines.runtime import START_ANNOTATION
from sandbox.hub import Hub

ROOT = Path(__file__).resolve().parents[2]
RABBIT = "![](https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/transformers/rabbit.png)"


def pod(image: str = "vllm/vllm-openai:v0.10.2", args: list[str] | None = None, *, env: dict[str, str] | None = None,
        command: list[str] | None = None, name: str = "p-0", ns: str = "default", labels: dict | None = None,
        gpus: int = 1, accelerator: str | None = "nvidia-l4", ports: list[int] | None = (8000,)) -> dict:
    c: dict = {"name": "server", "image": image, "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
               "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}
    if ports:
        c["ports"] = [{"name": "http", "containerPort": p} for p in ports]
    if args is not None:
        c["args"] = args
    if command is not None:
        c["command"] = command
    spec: dict = {"containers": [c]}
    if accelerator:
        spec["nodeSelector"] = {"cloud.google.com/gke-accelerator": accelerator}
    return {"metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}-{ns}", "labels": labels or {}},
            "spec": spec}


def vllm(model: str = "google/gemma-2-2b-it", *extra: str, **kw) -> dict:
    return pod("vllm/vllm-openai:v0.10.2", [f"--model={model}", *extra], **kw)


def tgi(model: str = "meta-llama/Llama-2-7b-chat-hf", **kw) -> dict:
    env = {"MODEL_ID": model, **kw.pop("env", {})}
    return pod("ghcr.io/huggingface/text-generation-inference:3.0.1", env=env, **kw)


def sglang(model: str = "Qwen/Qwen2.5-7B-Instruct", *extra: str, **kw) -> dict:
    return pod("lmsysorg/sglang:v0.5.2-cu126", ["--model-path", model, "--port", "30000", *extra],
               command=["python3", "-m", "sglang.launch_server"], **kw)


class Events:
    def __init__(self) -> None:
        self.ready = threading.Event()
        self.exited = threading.Event()
        self.exit: tuple[int, str] | None = None
        self.ready_at: float | None = None

    def on_ready(self) -> None:
        self.ready_at = time.monotonic()
        self.ready.set()

    def on_exit(self, code: int, reason: str) -> None:
        self.exit = (code, reason)
        self.exited.set()


@pytest.fixture
def hub():
    return Hub(faults=Faults())  # the runtime reads it in-process; no HTTP needed


@pytest.fixture
def runtime(hub):
    rt = ModelRuntime(clock=Clock(0.0005), faults=Faults(), hub=hub)
    yield rt
    rt.stop()


def start(rt: ModelRuntime, p: dict, timeout: float = 5.0):
    ev = Events()
    server = rt.start(p, on_ready=ev.on_ready, on_exit=ev.on_exit)
    return server, ev


def ready(rt: ModelRuntime, p: dict):
    server, ev = start(rt, p)
    assert ev.ready.wait(5), server.logs()[-5:]
    return server


def sse(resp: httpx.Response, prefix: str = "data:") -> list:
    out = []
    for line in resp.iter_lines():
        if line.startswith(prefix):
            data = line[len(prefix):].strip()
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ---- describe_container (pure) ---------------------------------------------------------------------

def _specs():
    from manifests.spec import load_spec

    return [p for p in sorted((ROOT / "deployments").glob("*.yaml")) if load_spec(p).target == "gke"]


@pytest.mark.parametrize("path", _specs(), ids=lambda p: p.name)
def test_describe_the_products_rendered_pods(path):
    from manifests.render import model_deployment
    from manifests.spec import load_spec

    spec = load_spec(path)
    dep = model_deployment(spec, "blue")
    tpl = dep["spec"]["template"]
    info = describe_container({"metadata": {**tpl["metadata"], "name": "x", "namespace": spec.namespace},
                               "spec": tpl["spec"]})
    assert info.engine == spec.engine.kind
    assert info.model_id == spec.model.id == info.served_model_name
    assert info.port == spec.engine.container_port
    assert info.revision == spec.model.revision


@pytest.mark.parametrize(("p", "engine", "model", "served", "port"), [
    (pod(args=["--model", "m/a", "--port", "9000"], ports=None), "vllm", "m/a", "m/a", 9000),
    (pod(command=["vllm", "serve", "m/b"], args=["--served-model-name", "b"]), "vllm", "m/b", "b", 8000),
    (pod(args=["m/c", "--port", "8080"], ports=None), "vllm", "m/c", "m/c", 8080),
    (pod("us-docker.pkg.dev/vertex-ai/vertex-vision-model-garden-dockers/pytorch-vllm-serve:20240930",
         ["--model=$(MODEL_ID)", "--port=8000"], command=["python", "-m", "vllm.entrypoints.api_server"],
         env={"MODEL_ID": "google/gemma-2-2b-it"}), "vllm", "google/gemma-2-2b-it", "google/gemma-2-2b-it", 8000),
    (pod("python:3.11", command=["/bin/sh", "-c", "pip install vllm && python3 -m vllm.entrypoints.openai.api_server "
                                 "--model 'm/d' --port 7000"], ports=None), "vllm", "m/d", "m/d", 7000),
    (pod(args=[]), "vllm", "facebook/opt-125m", "facebook/opt-125m", 8000),
    (pod("ghcr.io/huggingface/text-generation-inference:2.0", env={"MODEL_ID": "m/e"}, ports=(80,)),
     "tgi", "m/e", "m/e", 80),
    (pod("ghcr.io/huggingface/text-generation-inference:3.3.4", ["--model-id", "m/f"], env={"PORT": "8080"},
         ports=None), "tgi", "m/f", "m/f", 8080),
    (pod("us-central1-docker.pkg.dev/p/deep-learning-images/huggingface-text-generation-inference-gpu.3.0.1",
         env={"MODEL_ID": "m/g"}, ports=None), "tgi", "m/g", "m/g", 80),
    (pod("lmsysorg/sglang:latest", ["--model-path", "m/h"], command=["python3", "-m", "sglang.launch_server"],
         ports=None), "sglang", "m/h", "m/h", 30000),
    (pod("nginx:alpine", ports=(8080,)), "generic", None, None, 8080),
])
def test_describe_container_forms(p, engine, model, served, port):
    info = describe_container(p)
    assert (info.engine, info.model_id, info.served_model_name, info.port) == (engine, model, served, port)


def test_describe_container_details():
    info = describe_container(vllm("m/x", "--max-model-len=2048", "--max-num-seqs=4", "--tensor-parallel-size=2",
                                   "--quantization=awq", "--revision=v1.0"))
    assert (info.max_model_len, info.max_batch, info.tensor_parallel, info.quantization, info.revision) == \
        (2048, 4, 2, "awq", "v1.0")
    legacy = describe_container(pod(args=["--model=m"], command=["python3", "-m", "vllm.entrypoints.api_server"]))
    assert legacy.legacy_api and not describe_container(vllm()).legacy_api
    t = describe_container(tgi(env={"MAX_TOTAL_TOKENS": "4096", "MAX_CONCURRENT_REQUESTS": "8"}, gpus=2))
    assert (t.max_model_len, t.max_concurrent, t.tensor_parallel) == (4096, 8, 2)
    assert describe_container(sglang()).metrics_enabled is False
    assert describe_container(sglang("m", "--enable-metrics")).metrics_enabled is True


# ---- behaviors -------------------------------------------------------------------------------------

def test_behaviors_match_count_and_validate():
    b = Behaviors()
    with pytest.raises(ValueError):
        b.add(mode="explode")
    with pytest.raises(ValueError):
        b.add(mode="oom", match={"color": "blue"})
    r1 = b.add(mode="crash_loop", match={"labels": {"app": "a"}}, count=2)
    r2 = b.add(mode="oom", namespace="ns2")
    b.add(mode="slow_load", model="Qwen/Qwen2.5-7B-Instruct", load_seconds=5)
    b.add(mode="hang", name=r"^vip-")
    a = vllm(labels={"app": "a"})
    assert b.peek(a).id == r1.id and r1.hits == 0
    assert [b.take(a).mode for _ in range(3)] == ["crash_loop", "crash_loop", "ok"]
    assert r1.hits == 2
    assert b.take(vllm(ns="ns2")).id == r2.id
    assert b.take(sglang()).mode == "slow_load"
    assert b.take(vllm(name="vip-7d9f-abc")).mode == "hang"
    assert b.take(vllm(name="other")).mode == "ok"
    assert [r["mode"] for r in b.list()] == ["crash_loop", "oom", "slow_load", "hang"]
    assert b.remove(r2.id) and not b.remove(r2.id)
    b.clear()
    assert b.list() == []
    assert Behavior(mode="ok").to_dict()["mode"] == "ok"


def test_behavior_for_is_one_start(runtime):
    runtime.behaviors.add(mode="image_pull_error", count=1)
    p = vllm()
    assert runtime.behavior_for(p).mode == "image_pull_error"
    assert runtime.behavior_for(p).mode == "ok"  # the rule's single use is spent
    runtime.behaviors.add(mode="wrong_answers", count=1)
    assert runtime.behavior_for(p).mode == "wrong_answers"
    server = ready(runtime, p)  # start() uses the decision behavior_for took, without taking another
    assert server.mode == "wrong_answers"
    assert runtime.behaviors.list()[-1]["hits"] == 1


def _mounted(p: dict, path: str, volume: dict, view: dict) -> dict:
    """``p`` with a volume at ``path``, as the kubelet hands it to the runtime (START_ANNOTATION)."""
    p["spec"]["containers"][0]["volumeMounts"] = [{"name": "w", "mountPath": path}]
    p["spec"]["volumes"] = [{"name": "w", **volume}]
    p["metadata"]["annotations"] = {START_ANNOTATION: json.dumps({"volumes": {"w": view}})}
    return p


def test_load_time_by_weight_source(runtime, hub):
    """Weight bytes (Hub parameter count × dtype) at the source's bandwidth, plus engine init and CUDA graphs."""
    nbytes = 2.614341888e9 * 2  # gemma-2-2b-it in bfloat16
    warm = coldstart.engine_warmup("vllm")
    hub_plan = runtime.start_plan(vllm("google/gemma-2-2b-it"))
    assert hub_plan.load.source == "hub" and hub_plan.load.download_s == pytest.approx(nbytes / 100e6)
    assert hub_plan.seconds == pytest.approx(warm.seconds + nbytes / 100e6 + nbytes / coldstart.DEFAULT_LOADER_BPS)
    gcs = runtime.start_plan(vllm("gs://weights/google/gemma-2-2b-it", "--load-format=runai_streamer",
                                  "--served-model-name=google/gemma-2-2b-it"))
    assert gcs.load.source == "gcs" and gcs.load.loader == "runai_streamer"
    assert gcs.weights_s == pytest.approx(nbytes / coldstart.SOURCE_BPS["gcs"])  # the model's size came from the Hub
    eager = runtime.start_plan(vllm("gs://weights/google/gemma-2-2b-it", "--load-format=runai_streamer",
                                    "--served-model-name=google/gemma-2-2b-it", "--enforce-eager"))
    assert eager.graphs_s == 0 and gcs.graphs_s == coldstart.CUDA_GRAPH_S["vllm"]
    fuse = _mounted(vllm("/models/google/gemma-2-2b-it", "--served-model-name=google/gemma-2-2b-it"), "/models",
                    {"csi": {"driver": "gcsfuse.csi.storage.gke.io"}},
                    {"kind": "csi", "driver": "gcsfuse.csi.storage.gke.io"})
    assert runtime.start_plan(fuse).load.source == "gcsfuse"
    hdml = _mounted(vllm("/models/google/gemma-2-2b-it", "--load-format=runai_streamer",
                         "--served-model-name=google/gemma-2-2b-it"), "/models",
                    {"persistentVolumeClaim": {"claimName": "w"}},
                    {"kind": "pvc", "storageClass": "hyperdisk-ml", "type": "hyperdisk-ml", "uid": "u1"})
    assert runtime.start_plan(hdml).load.source == "hyperdisk-ml"
    assert runtime.start_plan(hdml).weights_s < hub_plan.weights_s / 10
    unknown = runtime.start_plan(vllm("nobody/unknown"))  # not on the Hub: 7B assumed
    assert unknown.load.bytes == pytest.approx(7e9 * 2)
    runtime.behaviors.add(mode="slow_load", model="google/gemma-2-2b-it")
    assert runtime.start_plan(vllm("google/gemma-2-2b-it")).weights_s == pytest.approx(hub_plan.weights_s * 10)
    runtime.behaviors.add(mode="ok", model="Qwen/Qwen2.5-7B-Instruct", load_seconds=3)
    assert runtime.load_seconds(sglang()) == 3
    # a behavior's own load time is the whole start as given, slow_load or not (tests time faults by it)
    runtime.behaviors.add(mode="slow_load", model="meta-llama/Llama-2-7b-chat-hf", load_seconds=600)
    assert runtime.load_seconds(tgi()) == 600


def test_hf_cache_pvc_serves_the_second_start(runtime):
    """The first start downloads from the Hub into the HF cache PVC; once it answered, the next start reads
    the PVC (pd-balanced), not the internet."""
    def cached(name: str) -> dict:
        return _mounted(vllm("google/gemma-2-2b-it", name=name, env={"HF_HOME": "/data"}), "/data",
                        {"persistentVolumeClaim": {"claimName": "cache"}},
                        {"kind": "pvc", "storageClass": "standard-rwo", "type": "pd-balanced", "uid": "pvc-1"})

    runtime.behaviors.add(mode="ok", load_seconds=0)
    first = cached("p-1")
    assert runtime.weight_source(first, describe_container(first)) == ("hub", False)
    ready(runtime, first)
    second = cached("p-2")
    assert runtime.weight_source(second, describe_container(second)) == ("pvc", False)


# ---- vLLM ------------------------------------------------------------------------------------------

def test_vllm_health_before_the_model_can_answer(runtime):
    runtime.behaviors.add(mode="ok", load_seconds=5000)  # 5 s at this time scale
    server, ev = start(runtime, vllm())
    with httpx.Client(base_url=server.url, timeout=2) as http:
        assert http.get("/health").status_code == 200  # like real vLLM: up, not loaded
        r = http.get("/v1/models")
        assert r.status_code == 503 and r.json()["object"] == "error"
        assert http.post("/v1/completions", json={"prompt": "hi"}).status_code == 503
        assert "vllm:num_requests_running" in http.get("/metrics").text
    assert not server.ready and not ev.ready.is_set()
    assert any("Starting to load model google/gemma-2-2b-it" in line for line in server.logs())
    server.stop()
    assert not ev.ready.wait(0.1) and ev.exit is None  # a deliberate stop calls nothing


def test_vllm_openai_endpoints(runtime):
    t0 = time.monotonic()
    server, ev = start(runtime, vllm("google/gemma-2-2b-it", "--max-model-len=4096"))
    assert ev.ready.wait(5)
    assert ev.ready_at - t0 >= runtime.clock.scaled(runtime.load_seconds(vllm())) * 0.9
    with httpx.Client(base_url=server.url, timeout=5) as http:
        models = http.get("/v1/models").json()
        assert models["data"][0]["id"] == "google/gemma-2-2b-it" and models["data"][0]["max_model_len"] == 4096
        r = http.post("/v1/completions", json={"model": "google/gemma-2-2b-it", "prompt": "What is Kubernetes?",
                                               "max_tokens": 200, "temperature": 0}).json()
        text = r["choices"][0]["text"]
        assert text.startswith("Kubernetes is") and r["choices"][0]["finish_reason"] == "stop"
        assert r["usage"]["completion_tokens"] == len(re.findall(r"\s*\S+", text))
        assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
        short = http.post("/v1/completions", json={"prompt": "What is Kubernetes?", "max_tokens": 5}).json()
        assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 5
        assert text.startswith(short["choices"][0]["text"])  # deterministic
        # streaming: SSE chunks, then [DONE]; same text as without streaming
        with http.stream("POST", "/v1/completions", json={"prompt": "What is Kubernetes?", "max_tokens": 200,
                                                          "stream": True}) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            events = sse(resp)
        assert events[-1] == "[DONE]"
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == text
        assert events[-2]["choices"][0]["finish_reason"] == "stop"
        chat = http.post("/v1/chat/completions", json={"model": "google/gemma-2-2b-it", "max_tokens": 64, "messages": [
            {"role": "user", "content": "Say hello in one short sentence."}]}).json()
        assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"].startswith("Hello!")
        with http.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8, "stream": True,
                "stream_options": {"include_usage": True}}) as resp:
            events = sse(resp)
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert events[-2]["usage"]["completion_tokens"] == 8 and events[-1] == "[DONE]"
        # the OpenAI server has OpenAI routes only: /generate is vllm.entrypoints.api_server's (seed 001)
        gen = http.post("/generate", json={"prompt": "Hi", "max_tokens": 8})
        assert gen.status_code == 404 and gen.json() == {"detail": "Not Found"}
        # errors shaped like vLLM's
        bad = http.post("/v1/completions", json={"model": "other/model", "prompt": "x"})
        assert bad.status_code == 404 and bad.json()["type"] == "NotFoundError"
        long = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 5000})
        assert long.status_code == 400 and "maximum context length is 4096" in long.json()["message"]
        assert http.get("/nope").json() == {"detail": "Not Found"}
        assert http.get("/version").json()["version"]
        metrics = http.get("/metrics").text
    assert server.requests_served == 5
    assert f'vllm:generation_tokens_total{{engine="0",model_name="google/gemma-2-2b-it"}} ' \
           f"{float(server.generation_tokens_total)}" in metrics
    assert 'vllm:e2e_request_latency_seconds_count{engine="0",model_name="google/gemma-2-2b-it"} 5.0' in metrics
    assert "vllm:prompt_tokens_total" in metrics and "vllm:gpu_cache_usage_perc" in metrics
    assert 'vllm:request_success_total{engine="0",model_name="google/gemma-2-2b-it",finished_reason="length"}' \
        in metrics
    assert any('"POST /v1/completions HTTP/1.1" 200' in line for line in server.logs())


def test_vllm_stop_reason_and_n_choices(runtime):
    """vLLM reports the stop string that ended the output as ``stop_reason``; ``n`` > 1 with sampling (its default
    temperature 1.0) gives distinct choices, greedy (temperature 0) identical ones."""
    server, ev = start(runtime, vllm("google/gemma-2-2b-it", "--max-model-len=4096"))
    assert ev.ready.wait(5)
    with httpx.Client(base_url=server.url, timeout=5) as http:
        full = http.post("/v1/completions", json={"prompt": "What is Kubernetes?", "max_tokens": 200,
                                                  "temperature": 0}).json()["choices"][0]
        assert full["finish_reason"] == "stop" and full["stop_reason"] is None  # ended by EOS
        word = full["text"].split()[3]
        cut = http.post("/v1/completions", json={"prompt": "What is Kubernetes?", "max_tokens": 200,
                                                 "temperature": 0, "stop": ["\n\n", word]}).json()["choices"][0]
        assert cut["finish_reason"] == "stop" and cut["stop_reason"] == word
        assert word not in cut["text"] and full["text"].startswith(cut["text"])
        two = http.post("/v1/completions", json={"prompt": "Tell me about GPUs.", "max_tokens": 200, "n": 2}).json()
        texts = [c["text"] for c in two["choices"]]
        assert [c["index"] for c in two["choices"]] == [0, 1] and texts[0] != texts[1]
        greedy = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Tell me about GPUs."}],
                                                         "max_tokens": 200, "n": 2, "temperature": 0}).json()
        assert len({c["message"]["content"] for c in greedy["choices"]}) == 1
        chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Tell me about GPUs."}],
                                                       "max_tokens": 200, "n": 2}).json()
        assert len({c["message"]["content"] for c in chat["choices"]}) == 2
    server.stop()


def test_vllm_chat_needs_a_chat_template(runtime):
    server = ready(runtime, vllm("mistralai/Mistral-7B-v0.1"))
    with httpx.Client(base_url=server.url) as http:
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "chat template" in r.json()["message"]
        r = http.post("/v1/completions", json={"prompt": "San Francisco is a", "max_tokens": 250})
        assert r.json()["choices"][0]["text"].startswith(" ")


def test_vllm_legacy_api_server(runtime):
    server = ready(runtime, pod(args=["--model=google/gemma-2-2b-it"],
                                command=["python3", "-m", "vllm.entrypoints.api_server"]))
    with httpx.Client(base_url=server.url) as http:
        assert http.get("/v1/models").status_code == 404
        assert http.post("/generate", json={"prompt": "Hi", "max_tokens": 4}).json()["text"][0].startswith("Hi")
        with http.stream("POST", "/generate", json={"prompt": "Hi", "max_tokens": 3, "stream": True}) as resp:
            parts = [json.loads(p) for p in resp.read().split(b"\0") if p]
        assert len(parts) == 3 and parts[-1]["text"][0].startswith("Hi")


# ---- TGI -------------------------------------------------------------------------------------------

def test_tgi_is_unhealthy_until_the_shards_are_ready(runtime):
    runtime.behaviors.add(mode="ok", load_seconds=5000, count=1)
    server, _ = start(runtime, tgi())
    with httpx.Client(base_url=server.url, timeout=5) as http:
        assert http.get("/health").status_code == 503  # TGI: 200 only once the model is loaded
        assert http.post("/generate", json={"inputs": "x"}).status_code == 503
        assert http.get("/metrics").status_code == 200
    assert any("Starting shard rank=0" in line for line in server.logs())


def test_tgi_endpoints(runtime):
    server, ev = start(runtime, tgi(env={"MAX_TOTAL_TOKENS": "4096"}))
    with httpx.Client(base_url=server.url, timeout=5) as http:
        assert ev.ready.wait(5)
        assert http.get("/health").status_code == 200
        info = http.get("/info").json()
        assert info["model_id"] == "meta-llama/Llama-2-7b-chat-hf" and info["max_total_tokens"] == 4096
        assert len(info["model_sha"]) == 40 and info["version"] == "3.0.1"
        g = http.post("/generate", json={"inputs": "What is Kubernetes?",
                                         "parameters": {"max_new_tokens": 200, "details": True}})
        body = g.json()
        assert body["generated_text"].startswith("Kubernetes is")
        assert body["details"]["finish_reason"] == "eos_token"
        assert body["details"]["generated_tokens"] == len(body["details"]["tokens"])
        assert int(g.headers["x-generated-tokens"]) == body["details"]["generated_tokens"]
        assert "details" not in http.post("/generate", json={"inputs": "hi"}).json()
        with http.stream("POST", "/generate_stream", json={"inputs": "What is Kubernetes?",
                                                           "parameters": {"max_new_tokens": 200}}) as resp:
            events = sse(resp)
        assert all(e["generated_text"] is None for e in events[:-1])
        assert events[-1]["generated_text"] == body["generated_text"] == "".join(e["token"]["text"] for e in events)
        chat = http.post("/v1/chat/completions", json={"model": "tgi", "messages": [
            {"role": "user", "content": "What is TGI?"}], "max_tokens": 16}).json()
        assert chat["choices"][0]["finish_reason"] == "length" and chat["usage"]["completion_tokens"] == 16
        bad = http.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 5000}})
        assert bad.status_code == 422 and bad.json()["error_type"] == "validation"
        assert http.post("/generate", json={"inputs": ""}).status_code == 422
        metrics = http.get("/metrics").text
    for name in ("tgi_queue_size", "tgi_batch_current_size", "tgi_request_success", "tgi_request_duration_bucket",
                 "tgi_request_count"):
        assert re.search(rf"^{name}\b", metrics, re.M), name
    assert "tgi_request_success 4.0" in metrics
    assert any("Connected" in line for line in server.logs())


def test_tgi_with_the_real_inference_client(runtime):
    from huggingface_hub import InferenceClient

    server = ready(runtime, tgi())
    client = InferenceClient(server.url, api_key="-")
    text = client.text_generation("What is Kubernetes?", max_new_tokens=12, seed=42)
    assert text.startswith("Kubernetes is") and len(text.split()) == 12
    out = client.text_generation("What is Kubernetes?", max_new_tokens=12, details=True)
    assert out.details.generated_tokens == 12 and out.generated_text == text
    streamed = "".join(client.text_generation("What is Kubernetes?", max_new_tokens=12, stream=True))
    assert streamed == text


def test_paligemma_on_tgi(runtime):
    server = ready(runtime, tgi("google/paligemma2-3b-pt-224"))
    with httpx.Client(base_url=server.url, timeout=5) as http:
        r = http.post("/generate", json={"inputs": f"{RABBIT}caption en\n",
                                         "parameters": {"max_new_tokens": 128, "seed": 42}})
        assert r.status_code == 200 and r.json()["generated_text"].startswith("image of a rabbit")
        plain = http.post("/generate", json={"inputs": "What is Kubernetes?", "parameters": {"max_new_tokens": 32}})
        assert plain.json()["generated_text"].strip()
        chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 422
        assert chat.json() == {"error": "Template error: template not found", "error_type": "template_error"}
        assert http.get("/info").json()["model_pipeline_tag"] == "image-text-to-text"


def test_answers_are_deterministic_and_plausible():
    assert compose_answer(f"{RABBIT}caption en\n", "google/paligemma2-3b-pt-224").startswith("image of a rabbit")
    assert compose_answer("What is Kubernetes?", "m") == compose_answer("What is Kubernetes?", "m")
    assert compose_answer("What is Kubernetes?", "m").startswith("Kubernetes is")
    assert compose_answer("<|im_start|>user\nSay hello<|im_end|>\n<|im_start|>assistant\n", "m").startswith("Hello")
    assert compose_answer(f"{RABBIT}detect rabbit ; tree\n", "google/paligemma2-3b-pt-224").count("<loc") == 8


# ---- SGLang ----------------------------------------------------------------------------------------

def test_sglang_endpoints(runtime):
    server = ready(runtime, sglang("Qwen/Qwen2.5-7B-Instruct", "--enable-metrics"))
    with httpx.Client(base_url=server.url, timeout=5) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/health_generate").status_code == 200
        info = http.get("/get_model_info").json()
        assert info["model_path"] == "Qwen/Qwen2.5-7B-Instruct" and info["is_generation"] is True
        assert info["model_type"] == "qwen2"
        assert http.get("/v1/models").json()["data"][0]["owned_by"] == "sglang"
        g = http.post("/generate", json={"text": "What is SGLang?", "sampling_params": {"max_new_tokens": 8}}).json()
        assert g["meta_info"]["completion_tokens"] == 8 and g["meta_info"]["finish_reason"]["type"] == "length"
        with http.stream("POST", "/generate", json={"text": "What is SGLang?", "stream": True,
                                                    "sampling_params": {"max_new_tokens": 8}}) as resp:
            events = sse(resp)
        assert events[-1] == "[DONE]" and events[-2]["text"] == g["text"]  # cumulative text
        chat = http.post("/v1/chat/completions", json={"model": "Qwen/Qwen2.5-7B-Instruct", "messages": [
            {"role": "user", "content": "Say hello"}], "max_tokens": 32}).json()
        assert chat["choices"][0]["message"]["content"].startswith("Hello")
        metrics = http.get("/metrics").text
    for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:generation_tokens_total",
                 "sglang:e2e_request_latency_seconds_bucket"):
        assert name in metrics
    assert 'sglang:num_requests_total{model_name="Qwen/Qwen2.5-7B-Instruct"} 3.0' in metrics


def test_sglang_metrics_need_the_flag_and_health_waits_for_load(runtime):
    runtime.behaviors.add(mode="ok", load_seconds=3000)
    server, _ = start(runtime, sglang())
    with httpx.Client(base_url=server.url) as http:
        assert http.get("/health").status_code == 503
        assert http.get("/metrics").status_code == 404


def test_generic_container(runtime):
    server = ready(runtime, pod("nginx:alpine", ports=(8080,), accelerator=None))
    assert httpx.get(server.url + "/anything").status_code == 200


# ---- failure modes -------------------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "code", "reason", "needle"), [
    ("crash_loop", 1, "Error", "Traceback (most recent call last):"),
    ("oom", 137, "OOMKilled", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate"),
])
@pytest.mark.parametrize("make", [vllm, tgi, sglang], ids=["vllm", "tgi", "sglang"])
def test_crash_and_oom_exit_partway_through_loading(runtime, mode, code, reason, needle, make):
    runtime.behaviors.add(mode=mode, count=1)
    p = make()
    server, ev = start(runtime, p)
    assert ev.exited.wait(5)
    assert ev.exit == (code, reason) and not ev.ready.is_set()
    assert server.phase == "exited" and server.exit_code == code
    logs = server.logs()
    assert any(needle in line for line in logs), logs[-6:]
    assert not any("Application startup complete" in line or "Connected" in line for line in logs)
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=1)  # the process is gone
    again, ev2 = start(runtime, p)  # the restart: the rule's only use is spent
    assert ev2.ready.wait(5) and again.mode == "ok"


def test_too_big_for_the_gpu_goes_oom_by_itself(hub):
    rt = ModelRuntime(clock=Clock(0.0002), faults=Faults(), hub=hub)
    try:
        server, ev = start(rt, vllm("meta-llama/Llama-3.1-70B-Instruct"))  # 141 GB of bf16 on one L4
        assert ev.exited.wait(5) and ev.exit == (137, "OOMKilled")
        assert "CUDA out of memory" in server.logs()[-1]
        fits = vllm("meta-llama/Llama-3.1-70B-Instruct", "--tensor-parallel-size=8", gpus=8,
                    accelerator="nvidia-h100-80gb", name="big-ok")
        server, ev = start(rt, fits)
        assert ev.ready.wait(5), server.logs()[-3:]
        awq = vllm("TheBloke/Llama-2-7B-Chat-AWQ", "--quantization=awq", name="awq", accelerator="nvidia-tesla-t4")
        assert start(rt, awq)[1].ready.wait(5)
    finally:
        rt.stop()


@pytest.mark.parametrize("make", [vllm, tgi, sglang], ids=["vllm", "tgi", "sglang"])
def test_wrong_answers_are_empty_with_full_token_counts(runtime, make):
    runtime.behaviors.add(mode="wrong_answers")
    server = ready(runtime, make())
    with httpx.Client(base_url=server.url) as http:
        if server.info.engine == "tgi":
            r = http.post("/generate", json={"inputs": "What is Kubernetes?",
                                             "parameters": {"max_new_tokens": 20, "details": True}}).json()
            assert r["generated_text"] == "" and r["details"]["generated_tokens"] == 20
        else:
            r = http.post("/v1/completions", json={"prompt": "What is Kubernetes?", "max_tokens": 20}).json()
            assert r["choices"][0]["text"] == "" and r["usage"]["completion_tokens"] == 20


@pytest.mark.parametrize(("make", "path", "body", "shape"), [
    (vllm, "/v1/completions", {"prompt": "x"}, {"object": "error", "type": "InternalServerError"}),
    (tgi, "/generate", {"inputs": "x"}, {"error_type": "generation"}),
    (sglang, "/generate", {"text": "x"}, {"object": "error"}),
], ids=["vllm", "tgi", "sglang"])
def test_http_500_fails_generations_only(runtime, make, path, body, shape):
    runtime.behaviors.add(mode="http_500")
    server = ready(runtime, make())
    with httpx.Client(base_url=server.url) as http:
        r = http.post(path, json=body)
        assert r.status_code == 500 and shape.items() <= r.json().items()
        assert http.get("/health").status_code == 200
    assert server.requests_served == 0 and server.failures == 1


def test_hang_never_answers_until_the_pod_stops(runtime):
    runtime.behaviors.add(mode="hang")
    server = ready(runtime, vllm())
    with httpx.Client(base_url=server.url, timeout=0.3) as http:
        assert http.get("/v1/models").status_code == 200
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json={"prompt": "x"})
    done = threading.Event()
    errors: list[Exception] = []

    def call():
        try:
            httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, timeout=10)
        except httpx.HTTPError as exc:
            errors.append(exc)
        done.set()

    threading.Thread(target=call, daemon=True).start()
    time.sleep(0.1)
    assert not done.is_set()
    server.stop()
    assert done.wait(3) and errors  # the connection is dropped, like a killed process


def test_slow_load_takes_ten_times_longer(runtime):
    """slow_load: the weights come ten times slower (the engine's init and graph capture do not)."""
    ok = runtime.start_plan(vllm("Qwen/Qwen2.5-1.5B-Instruct"))
    runtime.behaviors.add(mode="slow_load", count=1)
    t0 = time.monotonic()
    server, ev = start(runtime, vllm("Qwen/Qwen2.5-1.5B-Instruct"))
    assert server.start_plan.weights_s == pytest.approx(ok.weights_s * 10)
    assert server.load_seconds == pytest.approx(ok.seconds + ok.weights_s * 9)
    assert ev.ready.wait(5) and ev.ready_at - t0 >= runtime.clock.scaled(server.load_seconds) * 0.9


def test_batch_slots_and_waiting_requests_show_in_metrics(hub):
    rt = ModelRuntime(clock=Clock(0.05), faults=Faults(), hub=hub)
    running = 'vllm:num_requests_running{engine="0",model_name="google/gemma-2-2b-it"} '
    waiting = 'vllm:num_requests_waiting{engine="0",model_name="google/gemma-2-2b-it"} '
    try:
        rt.behaviors.add(mode="ok", load_seconds=0.1, tokens_per_s=1.0)  # 10 tokens: 10 cloud s = 0.5 s
        server = ready(rt, vllm("google/gemma-2-2b-it", "--max-num-seqs=2"))
        clients = [httpx.Client(base_url=server.url, timeout=10) for _ in range(5)]
        codes: list[int] = []

        def call(c: httpx.Client) -> None:
            codes.append(c.post("/v1/completions", json={"prompt": "What is Kubernetes?", "max_tokens": 10})
                         .status_code)

        threads = [threading.Thread(target=call, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        seen = set()
        deadline = time.monotonic() + 1.0
        with httpx.Client(base_url=server.url) as http:
            while time.monotonic() < deadline and (2, 3) not in seen:
                text = http.get("/metrics").text
                seen.add((int(float(text.split(running)[1].split()[0])), int(float(text.split(waiting)[1].split()[0]))))
                time.sleep(0.01)
        assert (2, 3) in seen, seen  # two in the batch, three queued
        for t in threads:
            t.join(5)
        for c in clients:
            c.close()
        assert codes == [200] * 5
        assert server.requests_served == 5 and server.running == 0 and server.waiting == 0
    finally:
        rt.stop()


def test_stop_drops_keep_alive_connections(runtime):
    server = ready(runtime, vllm())
    with httpx.Client(base_url=server.url, timeout=2) as http:
        assert http.get("/health").status_code == 200
        server.stop()
        with pytest.raises(httpx.TransportError):
            http.get("/health")
    assert runtime.server("default", "p-0") is None


def test_model_faults_status_and_latency(runtime):
    server = ready(runtime, vllm())
    runtime.faults.add(service="model", method="POST", path=r"^/v1/completions$", status=503, count=2)
    runtime.faults.add(service="model", path=r"^/v1/models$", latency=0.15, count=1)
    with httpx.Client(base_url=server.url) as http:
        codes = [http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code for _ in range(3)]
        assert codes == [503, 503, 200]
        t0 = time.perf_counter()
        assert http.get("/v1/models").status_code == 200
        assert time.perf_counter() - t0 >= 0.15
    assert server.requests_served == 1


def test_snapshot(runtime):
    a = ready(runtime, vllm(name="a"))
    ready(runtime, tgi(name="b"))
    httpx.post(a.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
    snap = runtime.snapshot()
    pods = {p["name"]: p for p in snap["pods"]}
    assert pods["a"]["requests_served"] == 1 and pods["a"]["phase"] == "ready" and pods["a"]["port"] == a.port
    assert pods["b"]["engine"] == "tgi" and pods["b"]["model"] == "meta-llama/Llama-2-7b-chat-hf"
    json.dumps(snap)


def test_engine_log_accounts_for_its_weights(runtime):
    """What vLLM prints (download, then load) adds up to the weights phase the runtime timed: the line
    wake_model's phase report reads (manifests.wake.weight_seconds)."""
    from manifests.wake import weight_seconds

    for p in (vllm("google/gemma-2-2b-it", name="hub-0"),
              vllm("gs://w/google/gemma-2-2b-it", "--load-format=runai_streamer",
                   "--served-model-name=google/gemma-2-2b-it", name="gcs-0")):
        plan = runtime.start_plan(p)
        server = ready(runtime, p)
        assert weight_seconds(server.logs()) == pytest.approx(plan.weights_s, rel=1e-3)
        assert any("Graph capturing finished in 15 secs" in ln for ln in server.logs())
