"""Progressive canary through the GKE Inference Gateway on the sandbox, under constant client load.

Seed 004 (vLLM) exposed by a regional Gateway; blue live, green the candidate; steps 5 -> 25 -> 50 -> 100,
each held for its window and judged by PromQL over GMP's query API against the live color, plus smoke
prompts (tasks/canary.run_canary, the same loop the release uses). Three runs:

* good candidate: reaches 100 %; each step's share measured from the pods' own request counters
  (``http_requests_total`` of each color's pods, the step's delta) next to the step's weight;
* candidate failing long prompts only (``long_prompt_errors``; the short smoke prompts pass): stopped at the
  first step, weight back to 0; requests affected vs the step's share; 5xx answered by the live color;
* candidate 3x slower on long prompts only (``slow_long_prompts``): stopped at the first step on p95/p99.

Prints per step ``weight``, ``measured share``, the verdict, and ends with ``dropped: <n>`` — client
requests through the Gateway that got no 200 in the good run plus those the live color failed in the bad
runs (every weight change happens under load).

    uv run --frozen python bench/canary.py [--time-scale 0.01] [--hold 300]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks import canary as canary_tasks  # noqa: E402
from tests.sandbox.gateway_support import GatewayBed, Load, canary_spec  # noqa: E402


def run(mode: str | None, *, time_scale: float, hold: float) -> dict:
    spec = canary_spec(holds_s=hold, root=str(ROOT))
    bed = GatewayBed(spec, time_scale=time_scale)
    try:
        url = bed.deploy("blue", candidate_mode=mode)
        load = Load(url, spec.model.id).start()
        time.sleep(max(0.5, 60 * time_scale))  # the live color has a history for the comparison
        shares: list[tuple[int, float, str]] = []
        base: dict[str, dict[str, float]] = {}

        def on_step(step, text: str) -> None:
            if text == "weights set":
                base.update(blue=bed.arrivals("blue"), green=bed.arrivals("green"))
                return
            now = {c: bed.arrivals(c) for c in ("blue", "green")}
            got = {c: sum(now[c].values()) - sum(base[c].values()) for c in now}
            share = 100 * got["green"] / max(1, got["green"] + got["blue"])
            shares.append((step.weight, share, text))
            print(f"  {mode or 'good'}: weight {step.weight:3d}%  measured {share:5.1f}%  "
                  f"({got['green']:.0f}/{got['green'] + got['blue']:.0f})  {text.split(' — ', 1)[-1]}", flush=True)

        started = len(load.results)
        before_live = bed.arrivals("blue")
        outcome = canary_tasks.run_canary(
            api=bed.api, spec=spec, live="blue",
            query=canary_tasks.gmp_query_fn(bed.query_url, "sandbox-project"),
            smoke=lambda: bed.smoke("green"), sleep=canary_tasks.wall_sleep(time_scale),
            now=bed.clock.now, on_step=on_step)
        time.sleep(max(0.3, 20 * time_scale))  # requests in flight at the last weight change finish
        load.stop()
        results = load.results[started:]
        live_5xx = bed.arrivals("blue").get("5xx", 0) - before_live.get("5xx", 0)
        return {"mode": mode or "good", "promoted": outcome.promoted, "shares": shares,
                "requests": len(results), "failed": sum(1 for _, s in results if s != 200),
                "live_5xx": live_5xx, "stopped_at": outcome.failed_step.step.weight if outcome.failed_step else None}
    finally:
        bed.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time-scale", type=float, default=0.01)
    ap.add_argument("--hold", type=float, default=300, help="cloud seconds each step is held")
    args = ap.parse_args()
    dropped = 0
    for mode in (None, "long_prompt_errors", "slow_long_prompts"):
        r = run(mode, time_scale=args.time_scale, hold=args.hold)
        off = max((abs(share - w) for w, share, _ in r["shares"] if w < 100 or r["promoted"]), default=0.0)
        affected = 100 * r["failed"] / max(1, r["requests"])
        print(f"{r['mode']}: promoted={r['promoted']} stopped_at={r['stopped_at']} requests={r['requests']} "
              f"failed={r['failed']} ({affected:.2f}%) live_5xx={r['live_5xx']:.0f} "
              f"max share error={off:.1f} points", flush=True)
        dropped += r["failed"] if mode is None else int(r["live_5xx"])
    print(f"dropped: {dropped}")


if __name__ == "__main__":
    main()
