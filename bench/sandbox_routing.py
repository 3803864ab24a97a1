"""How much latency does the sandbox's Service routing add? Direct to a model server vs through a route.

    .venv/bin/python bench/sandbox_routing.py [--n 2000] [--path /v1/completions] [--rounds 4]

Starts one vLLM-style model server (ModelRuntime, time scale 1e-6 so generation time is ~0) and a
ServicePorts route in front of it, then sends N small requests each way over httpx keep-alive
clients, alternating in rounds so both sides see the same machine load. Prints requests/s and
mean/p50/p99 latency for both, the latency the route adds per request and the ratio. Exit code 1
with ``--check`` when the route adds more than ``--budget-ms`` (default 2 ms) at the median.
Loopback only, bounded loops.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandbox.core import Clock, Faults  # noqa: E402
from sandbox.engines import ModelRuntime  # noqa: E402
from sandbox.routing import ServicePorts  # noqa: E402

POD = {"metadata": {"name": "bench-0", "namespace": "bench", "uid": "bench-0"},
       "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.10.2",
                                "args": ["--model=Qwen/Qwen2.5-1.5B-Instruct"],
                                "ports": [{"containerPort": 8000}]}]}}


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def _run(client: httpx.Client, path: str, n: int) -> list[float]:
    lat = []
    body = {"model": "Qwen/Qwen2.5-1.5B-Instruct", "prompt": "Say hello.", "max_tokens": 8, "temperature": 0}
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.post(path, json=body) if path.startswith("/v1/") else client.get(path)
        lat.append(time.perf_counter() - t0)
        if r.status_code != 200:
            raise SystemExit(f"{path} answered {r.status_code}: {r.text[:200]}")
    return lat


def _row(name: str, lat: list[float], wall: float) -> str:
    ms = [x * 1000 for x in lat]
    return (f"{name:<8} {len(lat) / wall:>9.0f} req/s   mean {statistics.fmean(ms):6.3f} ms   "
            f"p50 {_pct(ms, 50):6.3f} ms   p99 {_pct(ms, 99):6.3f} ms")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="requests per side (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds (default %(default)s)")
    ap.add_argument("--path", default="/v1/completions", help="/v1/completions or /health (default %(default)s)")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--check", action="store_true", help="exit 1 when the route adds more than --budget-ms (p50)")
    ap.add_argument("--budget-ms", type=float, default=2.0)
    args = ap.parse_args(argv)
    n = max(1, min(args.n, 200_000))
    rounds = max(1, min(args.rounds, 100))
    per_round = max(1, n // rounds)

    runtime = ModelRuntime(clock=Clock(1e-6), faults=Faults(), tokens_per_s=1e6)
    server = runtime.start(POD)
    assert server is not None
    if not server.wait_ready(10):
        raise SystemExit("model server did not become ready")
    routes = ServicePorts(lambda ns, name: [server.port])
    port = routes.open("bench", "svc")
    direct_lat: list[float] = []
    route_lat: list[float] = []
    direct_wall = route_wall = 0.0
    try:
        with httpx.Client(base_url=server.url, timeout=10) as direct, \
                httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as routed:
            _run(direct, args.path, args.warmup)
            _run(routed, args.path, args.warmup)
            for _ in range(rounds):
                t0 = time.perf_counter()
                direct_lat += _run(direct, args.path, per_round)
                direct_wall += time.perf_counter() - t0
                t0 = time.perf_counter()
                route_lat += _run(routed, args.path, per_round)
                route_wall += time.perf_counter() - t0
    finally:
        routes.stop()
        runtime.stop()

    d_mean, r_mean = statistics.fmean(direct_lat) * 1000, statistics.fmean(route_lat) * 1000
    d_p50, r_p50 = _pct(direct_lat, 50) * 1000, _pct(route_lat, 50) * 1000
    added_mean, added_p50 = r_mean - d_mean, r_p50 - d_p50
    print(f"sandbox routing: {len(direct_lat)} x {args.path} each way, {rounds} alternating rounds, httpx keep-alive")
    print(_row("direct", direct_lat, direct_wall))
    print(_row("routed", route_lat, route_wall))
    print(f"added by the route: mean {added_mean:.3f} ms, p50 {added_p50:.3f} ms per request "
          f"(budget {args.budget_ms:g} ms); routed/direct latency ratio {r_mean / d_mean:.2f}x, "
          f"throughput ratio {(len(route_lat) / route_wall) / (len(direct_lat) / direct_wall):.2f}x")
    if args.check and added_p50 > args.budget_ms:
        print("FAIL: routing adds more than the budget", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
