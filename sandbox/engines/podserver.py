"""One container's model server process: a loopback HTTP server that loads weights, serves, and dies like
the engine does.

A :class:`PodServer` listens at once (the process is up), "loads weights" for the time the runtime
planned, writing the engine's real start-up log lines (vLLM ``api_server.py`` / ``gpu_model_runner.py``,
TGI launcher and router, SGLang ``ServerArgs`` / TP0), then is ready. ``crash_loop`` and ``oom`` write a
realistic traceback partway through loading (vLLM EngineCore KV-cache ``ValueError``, TGI
``ShardCannotStart``, SGLang "Not enough memory", PyTorch's ``torch.OutOfMemoryError`` text), close the
port with open connections dropped (the process died) and report the exit (1 ``Error`` / 137
``OOMKilled``); a ``launch_error`` (the engine refused its arguments, ``sandbox/engines/checks.py``) exits
before loading. A generation takes ``prompt_tokens / prefill_tokens_per_s + completion_tokens /
tokens_per_s`` cloud seconds, scaled by the clock (:class:`_Pacer`). Requests beyond the engine's batch
size (``--max-num-seqs``, ``MAX_BATCH_SIZE``, ``--max-running-requests``) wait, and show up as waiting in
``/metrics``; beyond TGI's ``MAX_CONCURRENT_REQUESTS`` they get 429 "Model is overloaded".
:meth:`PodServer.metrics_text` writes each engine's metric names (``vllm:num_requests_waiting``,
``tgi_queue_size``, ``sglang:num_queue_reqs`` ...). The HTTP routes are the engine modules'
(``sandbox/engines/vllm.py``, ``tgi.py``, ``sglang.py``, ``generic.py``).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

from sandbox.core import Clock, HttpError, SandboxHTTPServer
from sandbox.engines.behaviors import Behavior
from sandbox.engines.container import ContainerInfo
from sandbox.engines.metrics import (
    SGLANG_BUCKETS,
    TGI_BUCKETS,
    TTFT_BUCKETS,
    VLLM_LATENCY_BUCKETS,
    Histogram,
    _prom,
)
from sandbox.engines.text import _IMG, Completion, plan_completion

LONG_PROMPT_TOKENS = 200  # behaviors long_prompt_errors / slow_long_prompts act from this prompt length

if TYPE_CHECKING:
    from sandbox.engines.runtime import ModelRuntime


class _Draining(BaseHTTPRequestHandler):
    """Mixed into a pod's handler: tells its server when a request is in progress on the connection, and
    answers with ``Connection: close`` (then closes) once the server is shutting down."""

    server: _PodHTTPServer

    def setup(self) -> None:
        self.opened_at = time.time()  # the connection's open (accept) time
        super().setup()

    def handle_one_request(self) -> None:
        # BaseHTTPRequestHandler.handle_one_request, with the connection marked busy the moment its request
        # line is read (a drain closes only connections with no request in progress)
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline:
                self.close_connection = True
                return
            self.server.begin(self.connection)
            try:
                if len(self.raw_requestline) > 65536:
                    self.requestline = self.request_version = self.command = ""
                    self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                    return
                if not self.parse_request():
                    return
                method = getattr(self, "do_" + self.command, None)
                if method is None:
                    self.send_error(HTTPStatus.NOT_IMPLEMENTED, f"Unsupported method ({self.command!r})")
                    return
                method()
                self.wfile.flush()
            finally:
                if self.server.end(self.connection):
                    self.close_connection = True
        except TimeoutError as e:
            self.log_error("Request timed out: %r", e)
            self.close_connection = True

    def end_headers(self) -> None:
        if self.server.draining:  # uvicorn (httptools): a response begun after SIGTERM says "connection: close"
            self.send_header("Connection", "close")
        super().end_headers()


_DRAINING_CLASSES: dict[type, type] = {}


def _draining(handler: type) -> type:
    cls = _DRAINING_CLASSES.get(handler)
    if cls is None:
        cls = _DRAINING_CLASSES[handler] = type(handler.__name__, (_Draining, handler), {})
    return cls


class _PodHTTPServer(SandboxHTTPServer):
    """A pod's listening socket. :meth:`drain` is the engine's graceful shutdown at SIGTERM; :meth:`kill`
    also drops open keep-alive connections, like a dead process."""

    def __init__(self, handler: type, *args: Any, **kwargs: Any) -> None:
        super().__init__(_draining(handler), *args, **kwargs)
        self._conns: set[socket.socket] = set()
        self._busy: set[socket.socket] = set()  # connections with a request in progress
        self._conns_lock = threading.Lock()
        self._killed = False
        self.draining = False

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            killed = self._killed
            if not killed:
                self._conns.add(request)
        if killed:  # outside the lock: shutdown_request takes it (it is not reentrant)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def adopt(self, request: Any, client_address: Any) -> bool:
        with self._conns_lock:
            if self._killed or self.draining:
                return False  # no longer listening: the connection is refused
        return super().adopt(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
            self._busy.discard(request)
        super().shutdown_request(request)

    def begin(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._busy.add(conn)

    def end(self, conn: socket.socket) -> bool:
        """The request on ``conn`` is answered; True when the connection must close now (draining)."""
        with self._conns_lock:
            self._busy.discard(conn)
            return self.draining

    def run(self) -> None:
        self._thread = self.start_serving(f"sandbox-model-{self.port}")

    def drain(self) -> None:
        """uvicorn's ``Server.shutdown`` (vLLM, SGLang; TGI's axum graceful shutdown alike): stop accepting
        (new connections are refused), close every connection with no request in progress, let the
        requests in progress finish — answered with ``Connection: close``, then their connection closes."""
        with self._conns_lock:
            if self.draining or self._killed:
                return
            self.draining = True
        self.shutdown()
        super().server_close()
        with self._conns_lock:
            idle = [c for c in self._conns if c not in self._busy]
        for conn in idle:
            try:  # a request that has already arrived is read and answered, as the event loop would
                if conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                    continue
            except BlockingIOError:
                pass
            except OSError:
                continue
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # FIN now; the handler's read returns EOF and it closes

    @property
    def idle(self) -> bool:
        """No connection left (every request answered and its connection closed)."""
        with self._conns_lock:
            return not self._conns

    def kill(self) -> None:
        with self._conns_lock:
            if self._killed:
                return
            self._killed = True
            conns = list(self._conns)
            draining = self.draining
        if not draining:
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
                 start_index: int = 0, plan: Any = None) -> None:
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
        self.start_plan = plan  # runtime.StartPlan: init, weights, CUDA graphs (cloud seconds); None = all weights
        self.tokens_per_s = behavior.tokens_per_s or runtime.tokens_per_s
        self.start_index = start_index
        self.started_at = time.time()
        self.ready_at: float | None = None
        self.phase = "loading"
        self.exit_code: int | None = None
        self.exit_reason: str | None = None
        self.requests_served = 0
        # (arrival time, its connection's open time) of every POST (an access log's timestamps): lets a
        # benchmark tell which pod got a request sent after a selector switch, and on which connection.
        self.arrivals: deque[tuple[float, float]] = deque(maxlen=200_000)
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
        self.http_requests: dict[tuple[str, str, str], int] = {}  # (handler, method, "2xx") -> count
        self.failures = 0
        self.e2e = Histogram(SGLANG_BUCKETS if info.engine == "sglang" else VLLM_LATENCY_BUCKETS)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tgi_duration = Histogram(TGI_BUCKETS)
        self.model_meta = runtime.model_meta(info)
        self._server = _PodHTTPServer(runtime.handler_for(info), state=self, faults=runtime.faults)
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

    def terminate(self) -> None:
        """SIGTERM: the engine's graceful shutdown (:meth:`_PodHTTPServer.drain`). Generations in progress go
        on; the process exits once every connection is closed (:attr:`drained`), or when the kubelet kills
        it at the end of the grace period (:meth:`stop`)."""
        if self._stop.is_set() or self._server.draining:
            return
        e = self.info.engine
        if e == "tgi":
            self.log(self._line("Signal received. Shutting down", src="text_generation_router::server"))
        elif e in ("vllm", "sglang"):
            self.log("INFO:     Shutting down", "INFO:     Waiting for connections to close. (CTRL+C to force quit)")
        self._server.drain()

    @property
    def drained(self) -> bool:
        """Exited on its own after SIGTERM: no connection left."""
        return self._server.draining and self._server.idle

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

    def _phases(self) -> tuple[float, float, float, Any]:
        p = self.start_plan
        if p is None:
            return 0.0, self.load_seconds, 0.0, None
        return p.init_s, p.weights_s, p.graphs_s, p.load

    def _weight_lines(self, took: float, load: Any) -> list[str]:
        """What the engine prints once the weights are on the GPUs (the download first, from the Hub)."""
        e, m = self.info.engine, self.runtime.hub_id(self.info)
        lines = []
        if load is not None and load.download_s and e == "vllm":
            lines.append(self._line(f"Time spent downloading weights for {m}: {load.download_s:.6f} seconds",
                                    src="weight_utils.py:296"))
        if e == "vllm" and load is not None and load.loader == "runai_streamer":
            lines.append(self._line(f"Loading weights took {took:.2f} seconds", src="runai_streamer_loader.py:97"))
        return lines

    def _graph_lines(self, took: float) -> list[str]:
        e = self.info.engine
        if e == "vllm":
            return [self._line(f"Graph capturing finished in {took:.0f} secs, took 0.45 GiB",
                               src="gpu_model_runner.py:2708")]
        if e == "sglang":
            return [self._line(f"Capture cuda graph end. Time elapsed: {took:.2f} s. mem usage=0.42 GB.", src="TP0")]
        if e == "tgi":
            return [self._line("Cuda Graphs are enabled for sizes [32, 16, 8, 4, 2, 1]",
                               src="text_generation_launcher")]
        return []

    def _load(self) -> None:
        self.log(*self._startup_lines())
        if self.mode == "launch_error":  # refused its arguments: exits before loading anything
            self._die()
            return
        init_s, weights_s, graphs_s, load = self._phases()
        if init_s and self._stop.wait(self.clock.scaled(init_s)):
            return
        total = self.clock.scaled(weights_s)
        fail_at = {"crash_loop": 0.6, "oom": 0.5}.get(self.mode)
        shards = self._shards() if self.info.engine != "generic" else 1
        for k in range(1, shards + 1):
            if self._stop.wait(total / shards):
                return
            frac = k / shards
            if self.info.engine in ("vllm", "sglang"):
                elapsed = weights_s * frac
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
        self.log(*self._weight_lines(weights_s * load.load_s / load.seconds if load is not None and load.seconds
                                     else weights_s, load))
        if graphs_s:
            if self.info.engine == "sglang":
                self.log(self._line("Capture cuda graph begin. This can take up to several minutes.", src="TP0"))
            if self._stop.wait(self.clock.scaled(graphs_s)):
                return
            self.log(*self._graph_lines(graphs_s))
        # the loader's own figure: the load only (a Hub download was its own line), slow_load included
        loaded_s = weights_s * load.load_s / load.seconds if load is not None and load.seconds else weights_s
        ready = self._ready_lines(loaded_s)
        if self.info.engine == "vllm" and load is not None and load.loader == "runai_streamer":
            ready = ready[1:]  # the streamer's loader printed "Loading weights took" instead of default_loader's
        self.log(*ready)
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
        key = (path, method, f"{status // 100}xx")  # prometheus-fastapi-instrumentator groups status codes
        with self._cond:
            self.http_requests[key] = self.http_requests.get(key, 0) + 1
        if self.info.engine in ("vllm", "sglang"):
            phrase = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error",
                      503: "Service Unavailable"}.get(status, "")
            self.log(f'INFO:     10.0.0.1:{40000 + self.requests_served % 20000} - "{method} {path} HTTP/1.1" '
                     f"{status} {phrase}")

    def check_generation(self, c: Completion | None = None) -> None:
        """Apply the behavior to one generation: hang forever, fail with 500, or go on."""
        long_prompt = c is not None and c.prompt_tokens >= LONG_PROMPT_TOKENS
        if self.mode == "hang":
            stop = self.runtime.faults.stop
            while not (self._stop.is_set() or stop.is_set()):
                self._stop.wait(0.2)
            raise _Aborted("pod stopped")
        if self.mode == "http_500" or (self.mode == "long_prompt_errors" and long_prompt):
            self.failures += 1
            msgs = {"vllm": "EngineCore encountered an issue. See stack trace (above) for the root cause.",
                    "tgi": "Request failed during generation: Server error: CUDA error: an illegal memory access "
                           "was encountered",
                    "sglang": "Internal server error: the scheduler process died."}
            msg = msgs.get(self.info.engine, "internal error")
            self.log(self._line(msg, level="ERROR"))
            raise HttpError(500, msg, reason="InternalServerError")

    def plan(self, prompt: str, max_tokens: int, *, stop: list[str] | None = None, sample: int = 0) -> Completion:
        images = len(_IMG.findall(prompt)) if "paligemma" in (self.info.model_id or "").lower() else 0
        return plan_completion(prompt, self.info.model_id or "", max_tokens, stop=stop,
                               wrong=self.mode == "wrong_answers", image_tokens=256 * images, sample=sample)

    def cloud_latency(self, c: Completion) -> tuple[float, float]:
        """(time to first token, total) in cloud seconds."""
        ttft = c.prompt_tokens / self.runtime.prefill_tokens_per_s + 1 / self.tokens_per_s
        total = ttft + max(0, c.completion_tokens - 1) / self.tokens_per_s
        if self.mode == "slow_long_prompts" and c.prompt_tokens >= LONG_PROMPT_TOKENS:
            return ttft * 3, total * 3  # a regression only real (long) prompts meet; smoke prompts are short
        return ttft, total

    @contextlib.contextmanager
    def generation(self, c: Completion) -> Iterator[_Pacer]:
        """Admission (batch slots, waiting queue), pacing and metrics for one generation."""
        self.check_generation(c)
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
            # vLLM's OpenAI server mounts prometheus-fastapi-instrumentator: every answered request by status class
            with self._cond:
                http = sorted(self.http_requests.items())
            _prom(lines, "http_requests_total", "counter", "Total number of requests by method, status and handler.",
                  [(f'handler="{p}",method="{m}",status="{st}"', n) for (p, m, st), n in http])
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
