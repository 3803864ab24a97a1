"""The progressive canary on a Gateway, as values (pure): the steps, the HTTPRoute each step writes, and
what to do after judging a step.

A canary moves the HTTPRoute's ``backendRefs`` weights from the live color's InferencePool to the
candidate's, step by step (Argo Rollouts' ``setWeight`` steps with an analysis per step); each step is held
for its window and judged on the real traffic it carried (manifests.analysis) plus the smoke prompts. A
failed step puts the candidate's weight back to 0 at once. On a Gateway, blue-green is the one-step canary
(0 -> 100), judged after the switch like blue-green's post-promotion analysis.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

from manifests import gateway
from manifests.analysis import Verdict
from manifests.names import Color
from manifests.spec import DeploymentSpec

Obj = dict[str, Any]
# A step's window counts requests, not time: an inconclusive step (fewer requests than a query's
# min_requests) is held window after window while its candidate keeps getting requests; it is aborted after
# MAX_EXTENSIONS windows in a row that brought the candidate none (no traffic to judge), or after MAX_WINDOWS
# in all (a trickle too thin to judge in reasonable time).
MAX_EXTENSIONS = 3
MAX_WINDOWS = 12


@dataclass(frozen=True)
class Step:
    index: int
    weight: int  # the candidate's percent
    hold_s: float

    def label(self, total: int) -> str:
        return f"step {self.index + 1}/{total}: {self.weight}% to the candidate"


def plan(spec: DeploymentSpec) -> list[Step]:
    """The steps of a release of ``spec`` on its Gateway (one 100 % step for blue-green)."""
    rel = spec.release
    if rel.strategy == "canary":
        return [Step(i, s.weight, s.hold.total_seconds()) for i, s in enumerate(rel.steps)]
    return [Step(0, 100, rel.post_promotion.window.total_seconds())]


def plan_steps(blue_green: tuple[str, ...]) -> tuple[str, ...]:
    """Blue-green's release steps on a Gateway: the synthetic analyses through the preview and live Services
    give way to the Gateway objects and the weighted steps on real traffic; the Service selector still
    follows (in-cluster clients, and where the cluster records the live color)."""
    out: list[str] = []
    for name in blue_green:
        if name in ("pre_analysis", "post_analysis"):
            continue
        if name == "switch":
            out += ["gateway", "canary"]
        out.append(name)
    return tuple(out)


def route_weights(route: Obj) -> dict[str, int]:
    """pool name -> weight of the HTTPRoute's first rule, as the cluster holds it."""
    rules = (route.get("spec") or {}).get("rules") or [{}]
    return {ref["name"]: int(ref.get("weight", 1)) for ref in rules[0].get("backendRefs") or []}


def with_weights(route: Obj, spec: DeploymentSpec, split: dict[Color, int]) -> Obj:
    """``route`` (as read, resourceVersion kept for the checked update) with the colors' weights set."""
    out = copy.deepcopy(route)
    want = {gateway.pool_name(spec, c): w for c, w in split.items()}
    for rule in (out.get("spec") or {}).get("rules") or []:
        for ref in rule.get("backendRefs") or []:
            if ref.get("name") in want:
                ref["weight"] = want[ref["name"]]
    for meta_key in ("managedFields",):
        out.get("metadata", {}).pop(meta_key, None)
    return out


def candidate_share(route: Obj, spec: DeploymentSpec, candidate: Color) -> float:
    weights = route_weights(route)
    total = sum(weights.values())
    return 100.0 * weights.get(gateway.pool_name(spec, candidate), 0) / total if total else 0.0


Action = Literal["advance", "hold", "abort"]


def decide(verdict: Verdict, *, smoke_ok: bool, extensions: int, windows: int = 1) -> Action:
    """After a step's window: go on, hold it one more window (too little traffic to judge), or abort.
    ``extensions``: held windows in a row that brought the candidate no request; ``windows``: judged so far."""
    if not smoke_ok or verdict.failed:
        return "abort"
    if verdict.inconclusive:
        return "hold" if extensions < MAX_EXTENSIONS and windows < MAX_WINDOWS else "abort"
    return "advance"


@dataclass(frozen=True)
class StepResult:
    step: Step
    verdict: Verdict
    smoke_ok: bool
    action: Action
    window_s: float

    def text(self, total: int) -> str:
        smoke = "" if self.smoke_ok else "smoke prompts failed; "
        return f"{self.step.label(total)} — {smoke}{self.verdict.summary()} -> {self.action}"
