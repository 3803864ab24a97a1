"""gpu_report (daily): what each model's GPUs cost yesterday, and what parking saved.

1. For each spec, fold today's sighting of its GPU nodes into the pool's usage ledger (tasks/usage.py)
2. Read the pool's GKE operations: their precise end times mark when nodes came and went
3. Per model: GPU-hours used, hours parked (no GPU node), GPU-hours always-on would have used
4. Price them from the repo's price table (manifests/prices.yaml, or the user's LLM_FLEET_PRICES file)
5. A table artifact, a markdown chart with a sparkline per model, one Slack summary
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from manifests import usage as U
from manifests.fleet import SpecPath, bundled_specs, load_fleet
from manifests.prices import load_prices
from manifests.spec import DeploymentSpec, SpecError, resolve_spec
from targets.gke.provision import find_cluster
from tasks import gke
from tasks.log import logger
from tasks.settings import get_settings
from tasks.slack import post_slack
from tasks.usage import ledger_name, pool_operations, read_ledger, record_usage, save_ledger


def window(day: str | None, start: str | float | None, end: str | float | None, now: float) -> tuple[float, float]:
    """[start, end) in epoch seconds: explicit bounds, else the given UTC day, else yesterday (UTC)."""
    if start is not None or end is not None:
        lo = U.ts(start) if start is not None else now - 86400
        hi = U.ts(end) if end is not None else now
        return float(lo), float(hi)
    d = datetime.fromisoformat(day).replace(tzinfo=UTC) if day else \
        datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
    return d.timestamp(), (d + timedelta(days=1)).timestamp()


def model_row(spec: DeploymentSpec, spans: list[U.NodeSpan], *, lo: float, hi: float, share: int,
              prices, time_scale: float) -> dict[str, Any]:
    acc = spec.accelerator
    used_s = U.gpu_seconds(spans, lo, hi) / share
    first = min((s.start for s in spans), default=None)
    since = max(lo, first) if first is not None else None
    parked_s = U.zero_seconds(spans, lo, hi, since=since) if since is not None else 0.0
    always_on_s = (hi - since) * spec.replicas * acc.count if since is not None else 0.0
    rate = prices.node_hour(accelerator=acc.type, gpus=acc.count, machine=acc.machine, spot=acc.spot) / acc.count
    cost, always_cost = used_s / 3600 * rate, always_on_s / 3600 * rate
    row = {"model": spec.name, "accelerator": f"{acc.count}× {acc.type}{' spot' if acc.spot else ''}",
           "gpu_hours": round(used_s / 3600, 6), "parked_hours": round(parked_s / 3600, 6),
           "always_on_gpu_hours": round(always_on_s / 3600, 6), "usd_per_gpu_hour": round(rate, 4),
           "cost": round(cost, 4), "always_on_cost": round(always_cost, 4), "saving": round(always_cost - cost, 4),
           "saving_pct": round(100 * (1 - used_s / always_on_s), 1) if always_on_s else 0.0,
           "shared_pool_with": share - 1}
    if time_scale != 1.0:  # the sandbox's clock runs fast: the same figures in cloud time
        row["cloud_gpu_hours"] = round(used_s / time_scale / 3600, 3)
    return row


@flow(name="gpu_report", log_prints=True)
def gpu_report(specs: list[SpecPath | str | dict[str, Any]] | None = None, fleet: str | None = None,
               day: str | None = None, start: str | float | None = None, end: str | float | None = None,
               prices: str | None = None) -> dict[str, Any]:
    """Per model: GPU-hours used, hours parked, the saving against always-on, priced (default: yesterday, UTC)."""
    log = logger()
    now = time.time()
    lo, hi = window(day, start, end, now)
    hi_eff = min(hi, now)
    table = load_prices(prices)
    settings = get_settings()
    loaded: list[DeploymentSpec] = []
    for ref in [str(p) for p in load_fleet(fleet)] if fleet else (list(specs) if specs else bundled_specs()):
        try:
            spec = resolve_spec(ref)
        except SpecError as exc:
            log.warning("skipped: %s", exc)
            continue
        if spec.target == "gke":
            loaded.append(spec)
    # Specs on one pool share its nodes: each gets an equal share (their pods are not told apart).
    by_pool: dict[str, list[DeploymentSpec]] = {}
    for spec in loaded:
        by_pool.setdefault(ledger_name(spec), []).append(spec)
    rows: list[dict[str, Any]] = []
    charts: list[str] = []
    nodes: dict[str, list[dict[str, Any]]] = {}
    for members in by_pool.values():
        spec = members[0]
        c = spec.cluster
        location, cluster = find_cluster(spec)
        if cluster is not None:
            kubeconfig = gke.get_credentials(project=c.project, location=location, name=c.name)
            ledger = record_usage(spec, kubeconfig=kubeconfig)
        else:
            ledger = read_ledger(spec)
        if not ledger.get("nodes"):
            continue
        ops = pool_operations(project=c.project, location=location, cluster=c.name,
                              pool=spec.accelerator.pool.name if c.mode == "standard" else None)
        spans = U.spans(ledger, ops, now)
        nodes[ledger_name(spec)] = [vars(n) for n in spans]
        line = U.sparkline(spans, lo, hi_eff)
        for member in members:
            row = model_row(member, spans, lo=lo, hi=hi_eff, share=len(members), prices=table,
                            time_scale=settings.time_scale)
            rows.append(row)
            charts.append(f"| `{member.name}` | `{line}` | {row['gpu_hours']:.3f} | {row['parked_hours']:.2f} | "
                          f"{row['saving_pct']:.0f} % |")
        if day:  # a reported day's finished nodes are no longer needed a week later
            save_ledger(spec, U.prune(ledger, before=lo - 7 * 86400))
    span = f"{datetime.fromtimestamp(lo, UTC):%Y-%m-%d %H:%M} – {datetime.fromtimestamp(hi, UTC):%Y-%m-%d %H:%M} UTC"
    total_cost = sum(r["cost"] for r in rows)
    total_saving = sum(r["saving"] for r in rows)
    create_table_artifact(key="gpu-report", table=rows or [{"model": "(no GPU usage recorded)"}],
                          description=f"GPU-hours and cost per model, {span} ({table.currency}, {table.region} list)")
    md = [f"# GPU usage {span}", "", "GPUs on across the window (each character is 1/24 of it):", "",
          "| model | GPUs on | GPU-hours | parked h | saving |", "|---|---|---|---|---|", *charts, "",
          f"Total {total_cost:.2f} {table.currency}; parking saved {total_saving:.2f} {table.currency}."]
    create_markdown_artifact(key="gpu-report-chart", markdown="\n".join(md), description="gpu_report")
    summary = "\n".join([f"📊 *gpu_report* {span}: {total_cost:.2f} {table.currency} spent, "
                         f"{total_saving:.2f} saved by parking"] +
                        [f"• `{r['model']}` {r['gpu_hours']:.2f} GPU-h, parked {r['parked_hours']:.1f} h, "
                         f"{r['cost']:.2f} {table.currency} (saved {r['saving_pct']:.0f} %)" for r in rows])
    post_slack(channel=settings.slack_channel, text=summary)
    return {"window": [lo, hi], "models": rows, "cost": total_cost, "saving": total_saving, "nodes": nodes}
