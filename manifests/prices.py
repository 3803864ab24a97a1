"""The GPU price table (manifests/prices.yaml, overridable): what an hour of a GPU node costs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from manifests.spec import DeploymentSpec, SpecError

BUNDLED = Path(__file__).with_name("prices.yaml")


class Rate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    on_demand: float = Field(ge=0)
    spot: float = Field(ge=0)
    # Dynamic Workload Scheduler flex-start (discounted on-demand); None: the on-demand rate
    flex_start: float | None = Field(None, ge=0)

    def per_hour(self, *, spot: bool = False, provisioning: str | None = None) -> float:
        """The hourly rate for ``provisioning`` (spot | on-demand | flex-start | reservation), or by ``spot``.
        A reservation is billed at the on-demand rate (committed-use discounts are outside this table)."""
        how = provisioning or ("spot" if spot else "on-demand")
        if how == "spot":
            return self.spot
        if how == "flex-start" and self.flex_start is not None:
            return self.flex_start
        return self.on_demand


class Prices(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    currency: str = "USD"
    region: str = ""
    gpus: dict[str, Rate] = {}
    machines: dict[str, Rate] = {}

    def node_hour(self, *, accelerator: str, gpus: int, machine: str | None, spot: bool) -> float:
        """One node-hour: the machine's rate when listed (VM + GPUs), else the GPUs' rate alone."""
        if machine and machine in self.machines:
            return self.machines[machine].per_hour(spot=spot)
        if accelerator not in self.gpus:
            raise SpecError(f"gpus.{accelerator}", "no price for this accelerator",
                            "add it to your price file (LLM_FLEET_PRICES)")
        return self.gpus[accelerator].per_hour(spot=spot) * gpus


def option_rates(prices: Prices, spec: DeploymentSpec) -> list[dict[str, Any]]:
    """Each capacity option's node-hour and GPU-hour price, and how it compares with the first option
    (the saving or surcharge a fallback brings)."""
    rows: list[dict[str, Any]] = []
    for i, opt in enumerate(spec.capacity_options):
        if opt.machine in prices.machines:
            node = prices.machines[opt.machine].per_hour(provisioning=opt.provisioning)
        elif opt.gpu in prices.gpus:
            node = prices.gpus[opt.gpu].per_hour(provisioning=opt.provisioning) * opt.count
        else:
            raise SpecError(f"gpus.{opt.gpu}", "no price for this accelerator",
                            "add it to your price file (LLM_FLEET_PRICES)")
        first = rows[0]["usd_per_node_hour"] if rows else node
        rows.append({"option": i, "what": opt.label(), "usd_per_node_hour": round(node, 4),
                     "usd_per_gpu_hour": round(node / opt.count, 4),
                     "vs_first_pct": round(100 * (node / first - 1), 1) if first else 0.0})
    return rows


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def load_prices(override: str | Path | None = None) -> Prices:
    """The bundled table, with the user's file (argument, else $LLM_FLEET_PRICES) laid over it."""
    data = yaml.safe_load(BUNDLED.read_text())
    path = override or os.environ.get("LLM_FLEET_PRICES")
    if path:
        try:
            data = _merge(data, yaml.safe_load(Path(path).read_text()) or {})
        except OSError as exc:
            raise SpecError("LLM_FLEET_PRICES", f"cannot read {path}: {exc.strerror}", "fix the path") from None
    try:
        return Prices.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        raise SpecError(".".join(map(str, err["loc"])), err["msg"], "fix the price file", source=str(path or BUNDLED)) from None
