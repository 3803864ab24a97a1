"""Park and wake on a week of traffic: GPU-hours against the oracle, and who waited for a wake.

Replays ../shared/traces/week.csv (7 days, 3 models) on a virtual, event-driven clock (a week takes
seconds) through the product's own decision code — ``manifests.park``: ``decide_park`` at every
``park_idle`` tick, ``observe_activity`` and ``observe_arrivals`` (learned idle: park after one idle
minute in hours of the day whose next request is more than two wakes away) on the engine's request
counter, ``in_awake_window`` for the schedules, ``desired_schedules``/``prewarm_s`` (p95 of the measured wakes) for the prewarmed scheduled
wakes — with the policies of the bundled specs (``schedule:`` sections). Requests that arrive while
parked are held (hold proxy: ``hold.max_queue``, ``hold.timeout``) and wake the model.

Accounting is the traces README's oracle's: a wake takes W (GPU billed from its start), and a parked
GPU is billed W more (the oracle's 249.5 h = per busy period first−W .. last+W). W is measured, per
model: bench/cold_start.py's cold wake from 0 GPU nodes on the sandbox's cold-start clock
(docs/cold-start.json; seed 001 for gemma and paligemma — both small models on one L4 — seed 004 for
mistral), today's path and the fast-start path, each simulated ± 15 % (seeded), the oracle at the same
W; ``--w 180`` gives the README's constant instead. A wake request reaches wake_model 5 s later
(event → trigger → worker). Baselines: reactive parking after 5 and 30 idle minutes.

    uv run python bench/park_week.py [--png docs/park-week.png] [--wake-json docs/cold-start.json]
"""

from __future__ import annotations

import argparse
import csv
import heapq
import json
import random
import struct
import sys
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from croniter import croniter  # noqa: E402

from manifests import park as P  # noqa: E402
from manifests.spec import DeploymentSpec, load_spec  # noqa: E402

TRACE = ROOT.parent / "shared" / "traces" / "week.csv"
if not TRACE.exists():
    TRACE = Path("/work/shared/traces/week.csv")
SPECS = {"gemma-2-2b-it": "gemma2-2b-it-vllm-l4.yaml", "paligemma2-3b": "paligemma2-tgi-autopilot.yaml",
         "mistral-7b-instruct": "mistral-7b-vllm-spot.yaml"}
W = 180.0  # the README's wake time
JITTER = 0.15
EVENT_LAG = 5.0  # hold proxy event -> deployment trigger -> worker starts wake_model
TICK = 60.0  # park_idle runs every minute
TOKENS_PER_S = 40.0
WEEK = 7 * 86400.0
MONDAY = (2026, 11, 23)  # a Monday: the trace starts Monday 00:00 local time


@dataclass
class Result:
    gpu_s: float = 0.0
    requests: int = 0
    failed: int = 0
    waits: list[float] = field(default_factory=list)
    wakes: int = 0
    held_per_wake: list[int] = field(default_factory=list)
    waited_at: list[float] = field(default_factory=list)  # trace seconds (local time) of each waited request
    on: list[tuple[float, float]] = field(default_factory=list)


def load_trace() -> dict[str, list[tuple[float, int]]]:
    by: dict[str, list[tuple[float, int]]] = defaultdict(list)
    with TRACE.open() as f:
        for row in csv.DictReader(f):
            by[row["model"]].append((float(row["t_s"]), int(row["output_tokens"])))
    for v in by.values():
        v.sort()
    return by


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for s, e in sorted(intervals):
        s, e = max(0.0, s), min(WEEK, e)
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def oracle(reqs: list[tuple[float, int]], w: float = W) -> Result:
    """The README's oracle: on from W before a busy period to W after it; a gap > W splits periods."""
    r = Result(requests=len(reqs))
    times = [t for t, _ in reqs]
    start, last = times[0], times[0]
    for t in times[1:]:
        if t - last > w:
            r.on.append((start - w, last + w))
            start = t
        last = t
    r.on.append((start - w, last + w))
    r.gpu_s = sum(e - s for s, e in r.on)  # summed like the README's figure (overlaps counted twice)
    r.on = union(r.on)
    r.wakes = len(r.on)
    return r


def simulate(reqs: list[tuple[float, int]], spec: DeploymentSpec | None, *, idle_after_s: float | None = None,
             seed: int = 1, w: float = W, learned: bool = True) -> Result:
    """One model for a week. ``spec``: the product's policy; ``idle_after_s``: a reactive baseline;
    ``learned``: park early in hours of learned low traffic (``schedule.learned_idle``)."""
    rng = random.Random(seed)
    tz = ZoneInfo(spec.schedule.timezone) if spec is not None and spec.schedule else ZoneInfo("UTC")
    t0 = datetime(*MONDAY, tzinfo=tz)

    def at(t: float) -> datetime:
        return t0 + timedelta(seconds=t)

    r = Result(requests=len(reqs))
    state, ready_at, on_since = "up", 0.0, -w  # the week starts serving (woken W before Monday 00:00)
    history: list[float] = []
    held = 0
    counter, busy_until, activity = 0, 0.0, None
    arrivals: P.Arrivals | None = None  # the learned arrivals per hour of the day (the Service's annotation)
    last_arrival = -1e9
    events: list[tuple[float, int, str, object]] = []
    seq = 0

    def push(t: float, kind: str, data: object = None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, data))

    def park(t: float) -> None:
        nonlocal state, activity
        r.on.append((on_since, t + w))
        state, activity = "parked", None

    def wake(t: float) -> None:
        nonlocal state, ready_at, on_since, held
        if held:
            r.held_per_wake.append(held)
        took = w * (1 + rng.uniform(-JITTER, JITTER))
        state, ready_at, on_since, held = "waking", t + took, t, 0
        r.wakes += 1
        push(ready_at, "ready", took)

    for i in range(int(WEEK // TICK)):
        push(i * TICK + TICK, "tick")
    sched = spec.schedule if spec is not None else None
    if sched is not None and sched.park and sched.wake:
        for cron, kind in ((sched.park, "park"), (sched.wake, "plan")):
            it = croniter(cron, t0 - timedelta(hours=2))
            while (fire := (it.get_next(datetime) - t0).total_seconds()) < WEEK:
                push(fire - (3600 if kind == "plan" else 0), kind, fire)
    for t, out in reqs:
        push(t, "req", out)

    while events:
        t, _, kind, data = heapq.heappop(events)
        if kind == "req":
            counter += 1
            last_arrival = t
            service = float(data) / TOKENS_PER_S
            if state == "parked":  # the hold proxy holds it and asks for a wake
                wake(t + EVENT_LAG)
            if state == "waking":
                held += 1
                if spec is not None and held > spec.hold.max_queue:
                    r.failed += 1
                    continue
                r.waits.append(ready_at - t)
                r.waited_at.append(t)
                busy_until = max(busy_until, ready_at + service)
                continue
            busy_until = max(busy_until, t + service)
        elif kind == "ready":
            history = P.add_wake(history, float(data))
            # a fresh engine: its counter starts at 0 and then counts the held requests it serves
            state, counter = "up", held
        elif kind == "tick" and state == "up":
            if spec is None:
                if t - max(last_arrival, busy_until) >= idle_after_s:
                    park(t)
                continue
            in_flight = 1.0 if busy_until > t else 0.0
            metrics = P.Metrics(running=in_flight, waiting=0.0, requests=float(counter))
            activity, known = P.observe_activity(activity, metrics, at(t))
            arrivals = P.observe_arrivals(arrivals, float(counter), at(t), tz)
            observed = P.Observed(model=spec.name, parked=False, replicas=1, in_flight=in_flight,
                                  last_active=datetime.fromisoformat(activity.last_active) if known else None)
            wake_s = P.prewarm_s(spec.schedule, history) if learned else None
            if P.decide_park(observed, spec.schedule, at(t), arrivals=arrivals, wake_s=wake_s).action == "park":
                park(t)
        elif kind == "park" and state == "up":
            park(t)
        elif kind == "plan":
            # sync_schedules after each wake: the wake schedule starts early by the p95 of measured wakes
            entry = P.desired_schedules(spec, spec_ref="-", wake_seconds=history)[1]
            fire = (croniter(entry.cron, at(t)).get_next(datetime) - t0).total_seconds()
            push(fire, "scheduled-wake")
        elif kind == "scheduled-wake" and state == "parked":
            wake(t)
    if held:
        r.held_per_wake.append(held)
    if state != "parked":
        r.on.append((on_since, WEEK))
    r.on = union(r.on)
    r.gpu_s = sum(e - s for s, e in r.on)
    timeout = spec.hold.timeout.total_seconds() if spec is not None else 300.0
    r.failed += sum(w > timeout for w in r.waits)
    r.waits = [w for w in r.waits if w <= timeout]
    return r


def measured_w(path: str, constant: float | None) -> tuple[dict[str, float], dict[str, float], str]:
    """W per model, today's path and fast-start, from bench/cold_start.py's JSON (or one constant)."""
    if constant is not None:
        w = dict.fromkeys(SPECS, constant)
        return w, w, "constant"
    data = json.loads(Path(path).read_text())
    by = {(r["seed"], r["variant"]): r["total_s"] for r in data["results"]}
    seed_of = {"gemma-2-2b-it": "001", "paligemma2-3b": "001", "mistral-7b-instruct": "004"}
    # the fastest path bench/cold_start.py measured (it names it: fast-starting nodes since issue 22's last part)
    variant = data.get("fast_variant", "fast-start")
    today = {m: by.get((seed_of[m], "today"), by[("001", "today")]) for m in SPECS}
    fast = {m: by.get((seed_of[m], variant), by[("001", variant)]) for m in SPECS}
    return today, fast, f"measured ({Path(path).name}, {variant!r})"


def total(results: list[Result]) -> Result:
    out = Result()
    for r in results:
        out.gpu_s += r.gpu_s
        out.requests += r.requests
        out.failed += r.failed
        out.waits += r.waits
        out.wakes += r.wakes
        out.held_per_wake += r.held_per_wake
        out.waited_at += r.waited_at
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# ---- PNG (stdlib: zlib + struct) -----------------------------------------------------------------------

def write_png(path: Path, trace: dict[str, list[tuple[float, int]]], ours: dict[str, Result],
              oracles: dict[str, Result]) -> None:
    """Per model: requests per minute (grey bars), GPU on — ours (green) and the oracle's (blue)."""
    width, panel, gap = 1400, 150, 16
    height = len(trace) * (panel + gap) + gap
    img = bytearray(b"\xff" * (width * height * 3))

    def px(x: int, y: int, c: tuple[int, int, int]) -> None:
        if 0 <= x < width and 0 <= y < height:
            i = (y * width + x) * 3
            img[i:i + 3] = bytes(c)

    def band(y0: int, h: int, intervals: list[tuple[float, float]], c: tuple[int, int, int]) -> None:
        for s, e in intervals:
            for x in range(int(s / WEEK * width), max(int(s / WEEK * width) + 1, int(e / WEEK * width))):
                for y in range(y0, y0 + h):
                    px(x, y, c)

    for k, (model, reqs) in enumerate(sorted(trace.items())):
        top = gap + k * (panel + gap)
        counts = [0] * width
        for t, _ in reqs:
            counts[min(width - 1, int(t / WEEK * width))] += 1
        per_min = [c / (WEEK / width / 60) for c in counts]
        peak = max(per_min) or 1
        bars = panel - 40
        for x, v in enumerate(per_min):
            for y in range(int(v / peak * bars)):
                px(x, top + bars - y, (110, 110, 110))
        band(top + bars + 8, 12, ours[model].on, (40, 160, 60))
        band(top + bars + 24, 12, oracles[model].on, (50, 90, 200))
        for day in range(8):  # day boundaries
            for y in range(top, top + panel):
                px(min(width - 1, int(day * width / 7)), y, (200, 60, 60))
    raw = b"".join(b"\x00" + bytes(img[y * width * 3:(y + 1) * width * 3]) for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--png", default=str(ROOT / "docs" / "park-week.png"))
    parser.add_argument("--wake-json", default=str(ROOT / "docs" / "cold-start.json"),
                        help="bench/cold_start.py's measurement (W per model)")
    parser.add_argument("--w", type=float, default=None, help="a constant W instead of the measurement")
    args = parser.parse_args()
    start = time.perf_counter()
    trace = load_trace()
    specs = {m: load_spec(ROOT / "deployments" / f) for m, f in SPECS.items()}
    today_w, fast_w, where = measured_w(args.wake_json, args.w)
    models = sorted(trace.items())
    oracles = {m: oracle(reqs, fast_w[m]) for m, reqs in trace.items()}
    ours = {m: simulate(reqs, specs[m], seed=i, w=fast_w[m]) for i, (m, reqs) in enumerate(models)}
    reactive = {x: {m: simulate(reqs, None, idle_after_s=x * 60, seed=i, w=fast_w[m]) for i, (m, reqs) in
                    enumerate(models)} for x in (5, 30)}
    o = total(list(oracles.values()))
    always_on = len(trace) * WEEK
    rows = [("oracle (README) at the measured W", o)] + [(f"reactive, park after {x} idle min", total(list(v.values())))
                                                       for x, v in reactive.items()]
    rows.append(("llm-fleet (bundled specs' schedules + idle + prewarm)", total(list(ours.values()))))
    today = total([simulate(reqs, specs[m], seed=i, w=today_w[m]) for i, (m, reqs) in enumerate(models)])
    today_oracle = total([oracle(reqs, today_w[m]) for m, reqs in trace.items()])
    print(f"week.csv: {o.requests} requests, {len(trace)} models, always-on {always_on / 3600:.1f} GPU-h; W {where}: "
          + ", ".join(f"{m} {fast_w[m]:.0f} s (today {today_w[m]:.0f} s)" for m, _ in models))
    head = f"{'policy':<56} {'GPU-h':>7} {'÷oracle':>8} {'saved':>6} {'wakes':>6} {'failed':>6} " \
           f"{'waited':>14} {'wait p50':>9} {'wait p99':>9}"
    print(head)
    print("-" * len(head))
    for name, r in rows:
        waited = f"{len(r.waits)} ({len(r.waits) / r.requests:.2%})"
        print(f"{name:<56} {r.gpu_s / 3600:>7.1f} {r.gpu_s / o.gpu_s:>8.3f} {1 - r.gpu_s / always_on:>6.1%} "
              f"{r.wakes:>6} {r.failed:>6} {waited:>14} {pct(r.waits, 0.5):>8.0f}s {pct(r.waits, 0.99):>8.0f}s")
    print()
    print("per model (llm-fleet):")
    for m, r in sorted(ours.items()):
        s = specs[m].schedule
        print(f"  {m:<22} {r.gpu_s / 3600:6.1f} GPU-h ÷ oracle {r.gpu_s / oracles[m].gpu_s:.3f}, "
              f"{r.wakes} wakes, {len(r.waits)} waited, {r.failed} failed  "
              f"[wake {s.wake!r}, park {s.park!r} {s.timezone}, idle_after {s.idle_after}]")
    mine = total(list(ours.values()))
    print(f"\ntoday's wake (W {', '.join(f'{w:.0f}' for w in today_w.values())} s): ÷oracle "
          f"{today.gpu_s / today_oracle.gpu_s:.3f}, waited {len(today.waits)} ({len(today.waits) / today.requests:.2%}), "
          f"wait p50 {pct(today.waits, 0.5):.0f} s, p99 {pct(today.waits, 0.99):.0f} s")
    print(f"with fast-start: ÷oracle {mine.gpu_s / o.gpu_s:.3f} (target ≤ 1.05); waited "
          f"{len(mine.waits)} ({len(mine.waits) / mine.requests:.2%}, target ≤ 0.6 %); wait p50 "
          f"{pct(mine.waits, 0.5):.0f} s, p99 {pct(mine.waits, 0.99):.0f} s (target ≤ 90 s); failed {mine.failed}")
    burst = sum(h for h in mine.held_per_wake if h >= 50)
    print(f"of the waited requests, {burst} arrived during {sum(h >= 50 for h in mine.held_per_wake)} wakes that "
          f"held ≥ 50 each (the night batch bursts, 2 req/s, unannounced), "
          f"{len(mine.waits) - burst} during {sum(0 < h < 50 for h in mine.held_per_wake)} other wakes")
    for name, r in rows[1:]:
        morning = sum(7.5 <= t % 86400 / 3600 < 9 for t in r.waited_at)
        print(f"  {name}: {morning} waited between 07:30 and 09:00 (a scheduled wake's job)")
    early = total([simulate(reqs, specs[m], seed=i, w=fast_w[m], learned=False) for i, (m, reqs) in enumerate(models)])
    print(f"learned idle (schedule.learned_idle) off: ÷oracle {early.gpu_s / o.gpu_s:.3f}, waited "
          f"{len(early.waits)} ({len(early.waits) / early.requests:.2%}), p99 {pct(early.waits, 0.99):.0f} s")
    # Which wake time would meet the waiting targets with this same policy: bursts start unannounced at
    # 2 req/s, so every second of wake is ~2 held requests, and the longest waits are a whole wake.
    for f in (0.9, 0.8, 0.7, 0.6, 0.5, 0.4):
        scaled = total([simulate(reqs, specs[m], seed=i, w=fast_w[m] * f) for i, (m, reqs) in enumerate(models)])
        share, p99 = len(scaled.waits) / scaled.requests, pct(scaled.waits, 0.99)
        print(f"  at W × {f:.1f} ({', '.join(f'{fast_w[m] * f:.0f}' for m, _ in models)} s): waited {share:.2%}, "
              f"p99 {p99:.0f} s")
        if share <= 0.006 and p99 <= 90:
            break
    if args.png:
        write_png(Path(args.png), trace, ours, oracles)
        print(f"week drawn to {args.png}")
    print(f"ran in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
