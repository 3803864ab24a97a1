"""The GPU price table (manifests/prices.yaml, overridable): what an hour of a GPU node costs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from manifests.spec import SpecError

BUNDLED = Path(__file__).with_name("prices.yaml")


class Rate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    on_demand: float = Field(ge=0)
    spot: float = Field(ge=0)

    def per_hour(self, *, spot: bool) -> float:
        return self.spot if spot else self.on_demand


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
