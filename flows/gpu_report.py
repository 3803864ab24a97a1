"""gpu_report (daily): what each model's GPUs cost yesterday, and what parking saved.

1. Each GPU node's life from its VM's own insert/delete operations (Compute Engine, ms times; nodes no
   flow ever saw are counted too), the pool's usage ledger (tasks/usage.py) for what GCE no longer lists
2. Per model: GPU-hours used, time parked (no GPU node), GPU-hours always-on would have used
3. Price them from the repo's price table (manifests/prices.yaml, or the user's LLM_FLEET_PRICES file)
4. A table artifact, a markdown chart with a sparkline per model, one Slack summary
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from manifests import usage as U
from manifests import wake as W
from manifests.capacity import option_of_node
from manifests.fleet import OptionalDate, OptionalDateTime, OptionalText, SpecParam, bundled_specs, load_fleet
from manifests.prices import load_prices, option_rates
from manifests.spec import DeploymentSpec, SpecError, resolve_spec
from targets.gke.provision import find_cluster
from tasks import gke, schedules
from tasks.log import logger
from tasks.settings import get_settings
from tasks.slack import post_slack
from tasks.usage import (
    ledger_name,
    pool_operations,
    read_ledger,
    record_usage,
    save_ledger,
    vm_bases,
    vm_operations,
)


def model_row(spec: DeploymentSpec, spans: list[U.NodeSpan], *, lo: float, hi: float, share: int,
              prices, time_scale: float, bases: dict[int, set[str]] | None = None) -> dict[str, Any]:
    acc = spec.accelerator
    rate = prices.node_hour(accelerator=acc.type, gpus=acc.count, machine=acc.machine, spot=acc.spot) / acc.count
    used = option_gpu_seconds(spec, spans, lo=lo, hi=hi, bases=bases)
    rates = option_rates(prices, spec)
    if spec.capacity and sum(used.values()):  # each option's GPU-hours at its own price (a fallback's surcharge)
        rate = sum(s * rates[i]["usd_per_gpu_hour"] for i, s in used.items()) / sum(used.values())
    row = U.usage_row(model=spec.name, accelerator=f"{acc.count}× {acc.type}{' spot' if acc.spot else ''}",
                      spans=spans, lo=lo, hi=hi, share=share, replicas=spec.replicas, gpus_per_replica=acc.count,
                      usd_per_gpu_hour=rate, time_scale=time_scale)
    # how long its wakes took (wake_model's measurements; cloud seconds on the sandbox): the price of parking
    wakes = [w / (time_scale or 1.0) for w in schedules.wake_history(spec)]
    row.update({"wakes": len(wakes), "wake_p50_s": round(W.percentile(wakes, 0.5), 1),
                "wake_p95_s": round(W.percentile(wakes, 0.95), 1)})
    if spec.capacity:  # what each capacity option costs and ran: the saving or surcharge of a fallback
        row["capacity_options"] = "; ".join(
            f"[{o['option']}] {o['what']} ${o['usd_per_gpu_hour']:g}/GPU-h"
            + (f" ({o['vs_first_pct']:+g}%)" if o["option"] else "")
            + f", {used.get(o['option'], 0.0) / share / 3600:.4g} GPU-h" for o in rates)
    return row


def option_gpu_seconds(spec: DeploymentSpec, spans: list[U.NodeSpan], *, lo: float, hi: float,
                       bases: dict[int, set[str]] | None = None) -> dict[int, float]:
    """GPU-seconds in [lo, hi) per capacity option, told apart by each pool's VM base names."""
    out: dict[int, float] = {}
    for n in spans:
        i = option_of_node(spec, n.name, bases) or 0
        out[i] = out.get(i, 0.0) + U.gpu_seconds([n], lo, hi)
    return out


def pool_spans(spec: DeploymentSpec, *, now: float
               ) -> tuple[dict[str, Any], list[U.NodeSpan], dict[int, set[str]]]:
    """(the pool's ledger, every GPU node of the spec's pool): the VMs' operations, then the ledger's sightings."""
    c = spec.cluster
    location, cluster = find_cluster(spec)
    pools: list[dict[str, Any] | None] = []
    if cluster is not None:
        kubeconfig = gke.get_credentials(project=c.project, location=location, name=c.name)
        ledger = record_usage(spec, kubeconfig=kubeconfig)
        if c.mode == "standard":  # every capacity option's pool (today's spec: its one pool)
            pools = [gke.get_node_pool(project=c.project, location=location, cluster=c.name,
                                       name=spec.option_pool(i)) for i in range(len(spec.capacity_options))]
    else:
        ledger = read_ledger(spec)
    standard = c.mode == "standard"
    bases = set().union(*(vm_bases(ledger, p) for p in pools)) if pools else vm_bases(ledger, None)
    vm = vm_operations(project=c.project, bases=bases) if standard else []
    ops = pool_operations(project=c.project, location=location, cluster=c.name,
                          pool=spec.accelerator.pool.name if standard else None)
    by_option = {i: vm_bases({}, p) for i, p in enumerate(pools) if p}  # each option's VM base names
    return ledger, U.node_spans(ledger, ops, vm, gpus=spec.accelerator.count, now=now), by_option


@flow(name="gpu_report", log_prints=True)
def gpu_report(specs: tuple[SpecParam, ...] = (), fleet: OptionalText = None,
               day: OptionalDate = None, start: OptionalDateTime = None, end: OptionalDateTime = None,
               prices: OptionalText = None) -> dict[str, Any]:
    """Per model: GPU-hours used, time parked, the saving against always-on, priced.

    Args:
        specs: Deployment specs to report on (paths under deployments/); empty = every bundled spec.
        fleet: A fleet file (deployments/fleets/*.yaml) instead of specs.
        day: A whole UTC day to report (default: yesterday), unless start or end is given.
        start: Start of the window (UTC when no time zone is given); default: a day before end.
        end: End of the window; default: now.
        prices: A price table YAML instead of manifests/prices.yaml (or $LLM_FLEET_PRICES).
    """
    log = logger()
    now = time.time()
    lo, hi = U.report_window(day, start, end, now)
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
        ledger, spans, bases = pool_spans(spec, now=now)
        if not spans:
            continue
        nodes[ledger_name(spec)] = [vars(n) for n in spans]
        line = U.sparkline(spans, lo, hi_eff)
        for member in members:
            row = model_row(member, spans, lo=lo, hi=hi_eff, share=len(members), prices=table,
                            time_scale=settings.time_scale, bases=bases)
            rows.append(row)
            charts.append(f"| `{member.name}` | `{line}` | {row['gpu_hours']:.3f} | {row['parked']} | "
                          f"{row['saving_pct']:.0f} % |")
        if day:  # a reported day's finished nodes are no longer needed a week later
            save_ledger(spec, U.prune(ledger, before=lo - 7 * 86400))
    span = f"{datetime.fromtimestamp(lo, UTC):%Y-%m-%d %H:%M} – {datetime.fromtimestamp(hi, UTC):%Y-%m-%d %H:%M} UTC"
    total_cost = sum(r["cost"] for r in rows)
    total_saving = sum(r["saving"] for r in rows)
    create_table_artifact(key="gpu-report", table=rows or [{"model": "(no GPU usage recorded)"}],
                          description=f"GPU-hours and cost per model, {span} ({table.currency}, {table.region} list)")
    md = [f"# GPU usage {span}", "", "GPUs on across the window (each character is 1/24 of it):", "",
          "| model | GPUs on | GPU-hours | parked | saving |", "|---|---|---|---|---|", *charts, "",
          f"Total {total_cost:.2f} {table.currency}; parking saved {total_saving:.2f} {table.currency}."]
    create_markdown_artifact(key="gpu-report-chart", markdown="\n".join(md), description="gpu_report")
    summary = "\n".join([f"📊 *gpu_report* {span}: {total_cost:.2f} {table.currency} spent, "
                         f"{total_saving:.2f} saved by parking"] +
                        [f"• `{r['model']}` {r['gpu_hours']:.2f} GPU-h, parked {r['parked']}, "
                         f"{r['cost']:.2f} {table.currency} (saved {r['saving_pct']:.0f} %)"
                         + (f", wake p50 {r['wake_p50_s']:.0f} s / p95 {r['wake_p95_s']:.0f} s over {r['wakes']}"
                            if r.get("wakes") else "") for r in rows])
    post_slack(channel=settings.slack_channel, text=summary)
    return {"window": [lo, hi], "models": rows, "cost": total_cost, "saving": total_saving, "nodes": nodes}
