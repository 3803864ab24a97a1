"""Capacity that follows the GPUs, on a week of traffic: seed 004's capacity list (spot L4 → on-demand L4)
against today's single spot pool, with seeded stockouts and preemptions.

The week: ../shared/traces/week.csv, seed 004's model (``mistral-7b-instruct``), its park/wake timeline
from the product's own policy (``bench/park_week.py``'s replay of ``manifests.park`` with the bundled
spec's schedule, idle parking and prewarm). Over it, capacity as GCE has it (seeded, ``--seed``):

- the first option (spot L4, both zones) is stocked out on 30 % of mornings, from 07:00 for 2-5 h;
- the spot node is preempted twice a day at random times, and spot capacity stays gone 30-120 min.

A scale-up (a wake, a preempted node's replacement) then takes, as the sandbox's GKE autoscaler does it:

- **fallback** (the ComputeClass): the first option with capacity — on a spot stockout one refused probe
  per spot zone (20 s each, ``autoscaler_scale_up_error``) then the on-demand node's boot and load (W);
  back to spot at the next wake (seed 004 keeps one replica: no active migration, which would restart it;
  with two or more replicas, migration back once spot frees up), or with the ``migrate_back`` flow (every
  30 min) at its first run after spot frees up, by a new color beside the live one;
- **single pool** (spot only): nothing until spot capacity is back — the autoscaler retries after its
  backoff (5, 10, 20, 30 min…), then boot and load (W).

Requests arriving while no node serves wait (the hold proxy holds them; past ``hold.timeout`` they get
503 + Retry-After: failed). GPU cost = node-hours × the option's price (``manifests/prices.yaml`` via
``manifests.prices.option_rates``). W = 180 s ± 15 % (the traces README's wake time, as park_week).

    uv run python bench/capacity.py [--seed 7] [--seeds 20]
"""

from __future__ import annotations

import argparse
import bisect
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import park_week as PW  # noqa: E402
from manifests.prices import load_prices, option_rates  # noqa: E402
from manifests.render import migrates_back  # noqa: E402
from manifests.spec import DeploymentSpec, load_spec  # noqa: E402

MODEL, SPEC = "mistral-7b-instruct", "mistral-7b-vllm-spot.yaml"
MIGRATE_EVERY_S = 30 * 60  # the migrate_back deployment's schedule (prefect.yaml)
DAY = 86400.0
PROBE = 20.0  # GCE refuses a VM this soon after the MIG asks (sandbox autoscaler_scale_up_error)
BACKOFF = (300.0, 600.0, 1200.0, 1800.0)  # cluster-autoscaler's node-group backoff, growing, capped at 30 min
MORNING_STOCKOUT_P, MORNING_FROM_H, MORNING_HOURS = 0.30, 7.0, (2.0, 5.0)
PREEMPTIONS_PER_DAY, SPOT_GONE_MIN = 2, (30.0, 120.0)


@dataclass
class Run:
    waits: list[float] = field(default_factory=list)  # per request that waited (s), answered or not
    failed: int = 0  # waited past hold.timeout: 503 + Retry-After
    requests: int = 0
    cost: float = 0.0
    node_s: dict[str, float] = field(default_factory=dict)  # option label -> node-seconds
    scale_ups: int = 0
    fallbacks: int = 0
    longest_gap: float = 0.0


def spot_outages(seed: int) -> list[tuple[float, float]]:
    """When the spot option cannot start a VM: stocked-out mornings (30 %), and after each preemption."""
    rng = random.Random(seed)
    out: list[tuple[float, float]] = []
    for d in range(7):
        if rng.random() < MORNING_STOCKOUT_P:
            s = d * DAY + MORNING_FROM_H * 3600
            out.append((s, s + rng.uniform(*MORNING_HOURS) * 3600))
    return out


def preemptions(seed: int) -> list[float]:
    rng = random.Random(seed * 7919 + 1)
    return sorted(d * DAY + rng.uniform(0, DAY) for d in range(7) for _ in range(PREEMPTIONS_PER_DAY))


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def gone_until(outages: list[tuple[float, float]], t: float) -> float | None:
    """The end of the spot outage covering ``t``, or None when spot can start a VM at ``t``."""
    for s, e in outages:
        if s <= t < e:
            return e
    return None


def single_pool_ready(outages: list[tuple[float, float]], t: float, w: float) -> float:
    """Spot only: an attempt at ``t``; each refusal backs the node group off (5, 10, 20, 30, 30… min) before
    the next attempt; the first attempt that finds spot capacity boots and loads (``w``)."""
    at, k = t, 0
    while gone_until(outages, at) is not None:
        at += BACKOFF[min(k, len(BACKOFF) - 1)]
        k += 1
    return at + w


def replay(spec: DeploymentSpec, reqs: list[tuple[float, int]], on: list[tuple[float, float]], *,
           seed: int, fallback: bool, on_demand_only: bool = False, migrate: bool | None = None,
           check_every: float | None = None) -> Run:
    """GPU-on intervals ``on`` (the policy's), with every scale-up meeting GCE's capacity of the moment."""
    rng = random.Random(seed * 31 + (1 if fallback else 0))
    rates = {r["option"]: r for r in option_rates(load_prices(), spec)}
    migrates = migrates_back(spec) if migrate is None else migrate
    zones = len(spec.option_zones(0)) or 1
    preempt = preemptions(seed)
    outages = merged(spot_outages(seed) + [(p, p + rng.uniform(*SPOT_GONE_MIN) * 60) for p in preempt])
    run = Run(requests=len(reqs))
    gaps: list[tuple[float, float]] = []  # no node serving: requests wait until the gap's end
    segments: list[tuple[float, float, int]] = []  # (start, end, option) node billed

    def scale_up(t: float, until: float) -> float:
        """A node for ``[t, until)``; returns when it serves. Bills what it runs on."""
        run.scale_ups += 1
        w = PW.W * (1 + rng.uniform(-PW.JITTER, PW.JITTER))
        if on_demand_only:  # the reference: never spot, never stocked out here
            segments.append((t, until, 1))
            return t + w
        end = gone_until(outages, t)
        if end is None:  # spot starts
            segments.append((t, until, 0))
            return t + w
        if not fallback:
            ready = single_pool_ready(outages, t, w)
            segments.append((ready - w, until, 0))
            return ready
        run.fallbacks += 1
        ready = t + PROBE * zones + w  # each spot zone refused, then the on-demand node boots and loads
        # active migration (two replicas or more): a spot node once it frees up, billed from `end`; a single
        # replica stays on its fallback until the next park (manifests.render.migrates_back)
        # the migrate_back flow (a single replica, run every `check_every` s): at its first run after spot is
        # back, a spot color boots beside the on-demand one, then takes the traffic (no gap: nobody waits)
        start = end
        if not migrates and check_every:
            start = -(-end // check_every) * check_every
        back = min(until, start + w) if migrates or check_every else until
        segments.append((t + PROBE * zones, back, 1))
        if back < until:
            segments.append((start, until, 0))
        return ready

    for s, e in on:
        t = s
        ready = scale_up(t, e)
        gaps.append((s, ready))
        for p in preempt:  # the serving spot node is preempted mid-interval (30 s notice, then gone)
            if s < p < e and any(a <= p < b and o == 0 for a, b, o in segments):
                # bill the lost node only up to the preemption
                segments[:] = [(a, min(b, p) if a <= p < b and o == 0 else b, o) for a, b, o in segments]
                ready_p = scale_up(p, e)
                gaps.append((p, ready_p))
    gaps = merged([(a, b) for a, b in gaps if b > a])
    starts = [a for a, _ in gaps]
    timeout = spec.hold.timeout.total_seconds()
    for t, _ in reqs:
        i = bisect.bisect_right(starts, t) - 1
        if i >= 0 and gaps[i][0] <= t < gaps[i][1]:
            wait = gaps[i][1] - t
            run.waits.append(wait)
            run.failed += wait > timeout
    run.longest_gap = max((b - a for a, b in gaps), default=0.0)
    for a, b, o in segments:
        if b > a:
            r = rates[o]
            run.node_s[r["what"]] = run.node_s.get(r["what"], 0.0) + (b - a)
            run.cost += (b - a) / 3600 * r["usd_per_node_hour"]
    return run


def pct(values: list[float], q: float) -> float:
    return PW.pct(values, q)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--seeds", type=int, default=20, help="also the mean over seeds 1..N")
    args = parser.parse_args()
    start = time.perf_counter()
    spec = load_spec(ROOT / "deployments" / SPEC)
    reqs = PW.load_trace()[MODEL]
    policy = PW.simulate(reqs, spec, seed=0)  # the product's park/wake timeline for the week
    print(f"week.csv, {MODEL} (seed 004): {len(reqs)} requests; GPU on {policy.gpu_s / 3600:.1f} h in "
          f"{len(policy.on)} intervals (park/wake policy of {SPEC}); capacity: "
          + " → ".join(o.label() for o in spec.capacity_options))
    print("prices: " + "; ".join(f"[{r['option']}] {r['what']} ${r['usd_per_node_hour']:g}/node-h"
                                 for r in option_rates(load_prices(), spec)))
    print(f"seeded GCE: option 0 stocked out {MORNING_STOCKOUT_P:.0%} of mornings ({MORNING_FROM_H:.0f}:00, "
          f"{MORNING_HOURS[0]:g}-{MORNING_HOURS[1]:g} h), spot preempted {PREEMPTIONS_PER_DAY}×/day "
          f"(spot gone {SPOT_GONE_MIN[0]:g}-{SPOT_GONE_MIN[1]:g} min after)")

    def row(name: str, r: Run) -> str:
        waited = f"{len(r.waits)} ({len(r.waits) / r.requests:.2%})"  # answered late or 503
        return (f"{name:<34} {waited:>14} {r.failed:>7} {pct(r.waits, 0.5):>8.0f}s {pct(r.waits, 0.99):>8.0f}s "
                f"{r.longest_gap:>8.0f}s {r.cost:>8.2f} {r.scale_ups:>6} {r.fallbacks:>6}")

    head = (f"{'seed ' + str(args.seed):<34} {'waited':>14} {'failed':>7} {'wait p50':>9} {'wait p99':>9} "
            f"{'longest':>9} {'GPU $':>8} {'scale':>6} {'fallbk':>6}")
    print()
    print(head)
    print("-" * len(head))
    one = replay(spec, reqs, policy.on, seed=args.seed, fallback=False)
    fb = replay(spec, reqs, policy.on, seed=args.seed, fallback=True)
    print(row("single spot pool (today)", one))
    print(row("capacity list (ComputeClass)", fb))
    print(row("capacity list, migrating back", replay(spec, reqs, policy.on, seed=args.seed,
                                                             fallback=True, migrate=True)))
    print(row("capacity list + migrate_back 30m", replay(spec, reqs, policy.on, seed=args.seed, fallback=True,
                                                             check_every=MIGRATE_EVERY_S)))
    print(row("on-demand pool only (reference)", replay(spec, reqs, policy.on, seed=args.seed, fallback=False,
                                                         on_demand_only=True)))
    for name, r in (("single", one), ("fallback", fb)):
        print(f"  {name}: " + ", ".join(f"{k} {v / 3600:.1f} node-h" for k, v in sorted(r.node_s.items())))

    many = [(replay(spec, reqs, policy.on, seed=s, fallback=False), replay(spec, reqs, policy.on, seed=s,
                                                                           fallback=True))
            for s in range(1, args.seeds + 1)]

    def mean(f) -> tuple[float, float]:
        return (sum(f(a) for a, _ in many) / len(many), sum(f(b) for _, b in many) / len(many))

    moved = [replay(spec, reqs, policy.on, seed=s, fallback=True, check_every=MIGRATE_EVERY_S)
             for s in range(1, args.seeds + 1)]
    w1, w2 = mean(lambda r: len(r.waits))
    f1, f2 = mean(lambda r: r.failed)
    p1, p2 = mean(lambda r: pct(r.waits, 0.99))
    c1, c2 = mean(lambda r: r.cost)
    print(f"\nmean over seeds 1..{args.seeds}: waited {w1:.0f} → {w2:.0f} ({w2 / w1 if w1 else 0:.2f}×), "
          f"failed (503 past hold.timeout) {f1:.0f} → {f2:.0f}, wait p99 {p1:.0f} s → {p2:.0f} s "
          f"({p2 / p1 if p1 else 0:.2f}×), GPU cost ${c1:.2f} → ${c2:.2f} ({c2 / c1 if c1 else 0:.2f}×: the "
          "on-demand surcharge while spot is gone)")
    c3 = sum(r.cost for r in moved) / len(moved)
    print(f"with migrate_back every {MIGRATE_EVERY_S / 60:.0f} min (prefect.yaml): GPU cost ${c2:.2f} → ${c3:.2f} "
          f"({c3 / c1 if c1 else 0:.2f}× the single pool), failed {sum(r.failed for r in moved) / len(moved):.0f}, "
          f"waited {sum(len(r.waits) for r in moved) / len(moved):.0f} (moving back drops nothing)")
    print("(waited: requests that found no node serving, answered late or given 503 + Retry-After past "
          f"hold.timeout {spec.hold.timeout.total_seconds():.0f} s = failed; waits of failed requests count "
          "in the percentiles)")
    print(f"ran in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
