"""Pure decisions for release_model: what the cluster runs, what the spec wants, and the steps between.

Like Argo Rollouts' blue-green: the live Service's selector names the live color; a change is a new
color beside it (the candidate), checked through the preview Service, then one checked selector switch,
checked again, and the old color kept warm for ``scale_down_delay`` before it is scaled to 0. The pod
template of the live color is never changed in place. Observations come in as values (read by tasks/),
the plan goes out as a value (acted on by targets/gke/strategy.py, printed by dry runs).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from manifests import names
from manifests.names import Color
from manifests.provision import Check, QuotaReading
from manifests.spec import DeploymentSpec, human_duration

HISTORY_ANNOTATION = "llm-fleet.dev/release-history"
PARK_ANNOTATION = "llm-fleet.dev/park-record"  # written by park_model (manifests/park.py)
RELEASE_ANNOTATION = "llm-fleet.dev/release"  # the release in flight: candidate color + revision
HISTORY_KEEP = 10


@dataclass(frozen=True)
class ColorState:
    """One color's Deployment as the cluster reports it."""

    color: Color
    exists: bool = False
    replicas: int = 0  # spec.replicas
    available: int = 0  # status.availableReplicas
    updated: int = 0  # status.updatedReplicas
    generation: int = 0
    observed_generation: int = 0
    revision: str | None = None  # llm-fleet.dev/model-revision annotation
    spec_hash: str | None = None  # llm-fleet.dev/spec-hash annotation

    @property
    def warm(self) -> bool:
        """Fully rolled out and serving: safe to route traffic to."""
        return (self.exists and self.replicas > 0 and self.observed_generation >= self.generation
                and self.updated == self.replicas == self.available)

    @classmethod
    def from_deployment(cls, color: Color, dep: dict[str, Any] | None) -> ColorState:
        if not dep:
            return cls(color)
        meta, spec, status = dep.get("metadata", {}), dep.get("spec", {}), dep.get("status") or {}
        ann = meta.get("annotations") or {}
        return cls(color, True, int(spec.get("replicas") or 0), int(status.get("availableReplicas") or 0),
                   int(status.get("updatedReplicas") or 0), int(meta.get("generation") or 0),
                   int(status.get("observedGeneration") or 0), ann.get(names.REVISION_ANNOTATION),
                   ann.get(names.SPEC_HASH_ANNOTATION))


@dataclass(frozen=True)
class Observed:
    """What the cluster says, read fresh at the start of every run (no local state)."""

    live: Color | None  # from the live Service's selector; None before the first deploy
    service_version: str | None  # the live Service's resourceVersion, for the checked switch
    colors: dict[Color, ColorState]
    history: list[dict[str, Any]] = field(default_factory=list)
    in_flight: dict[str, Any] | None = None  # RELEASE_ANNOTATION of an interrupted release
    parked: dict[str, Any] | None = None  # park_model's record: the GPUs are off, wake_model restores them

    @classmethod
    def from_objects(cls, service: dict[str, Any] | None, deployments: dict[Color, dict[str, Any] | None]
                     ) -> Observed:
        meta = (service or {}).get("metadata", {})
        color = ((service or {}).get("spec", {}).get("selector") or {}).get(names.COLOR_LABEL)
        ann = meta.get("annotations") or {}
        return cls(color if color in names.COLORS else None, meta.get("resourceVersion"),
                   {c: ColorState.from_deployment(c, deployments.get(c)) for c in names.COLORS},
                   _json(ann.get(HISTORY_ANNOTATION), []), _json(ann.get(RELEASE_ANNOTATION), None),
                   _json(ann.get(PARK_ANNOTATION), None))


@dataclass(frozen=True)
class Desired:
    revision: str  # a resolved commit sha
    spec_hash: str
    replicas: int


# The release's named steps, in order. Each is idempotent: a rerun after a crash repeats it harmlessly.
# scale_down comes last and runs outside the model's lock, after scale_down_delay: meanwhile the old
# color is warm and rollback_model can switch back to it at once.
STEPS = ("capacity", "bring_up", "preview", "pre_analysis", "switch", "post_analysis", "record", "scale_down")
RECREATE_STEPS = ("capacity", "stop_live", "bring_up", "preview", "pre_analysis", "switch", "post_analysis",
                  "record", "scale_down")
# release.auto_promote: false puts a manual gate between the analysis and the switch (Argo Rollouts'
# autoPromotionEnabled: false): the preview is announced and the flow run pauses for a decision.
GATE = "promotion_gate"


def with_gate(steps: tuple[str, ...]) -> tuple[str, ...]:
    i = steps.index("pre_analysis") + 1
    return steps[:i] + (GATE,) + steps[i:]


@dataclass(frozen=True)
class ReleasePlan:
    action: Literal["first_deploy", "noop", "release", "clean_up", "parked"]
    reason: str
    live: Color | None  # serving now
    candidate: Color | None  # to bring up beside it
    steps: tuple[str, ...] = ()
    revision: str = ""
    live_revision: str | None = None
    retire: Color | None = None  # scaled to 0 at the end (the old live color)
    promotion_timeout_s: float = 0.0  # with the promotion gate: how long it waits for a decision

    def table(self) -> list[dict[str, str]]:
        head = {"step": "plan", "detail": f"{self.action}: {self.reason}"}
        return [head] + [{"step": s, "detail": STEP_TEXT[s].format(
            live=self.live, candidate=self.candidate, retire=self.retire, revision=self.revision[:12],
            timeout=human_duration(self.promotion_timeout_s))} for s in self.steps]


STEP_TEXT = {
    "capacity": "check the GPU pool and quota hold both colors at once",
    "stop_live": "recreate: scale {live} to 0 (announced downtime)",
    "bring_up": "apply {candidate} at {revision} and wait for its rollout",
    "preview": "point the preview Service at {candidate}; wait for its endpoints",
    "pre_analysis": "engine, smoke prompts, error rate and latency through the preview Service, vs {live}",
    GATE: "wait for promotion: announce the preview of {candidate} on Slack, pause this flow run until it is "
          "resumed with promote true (switch) or false (roll back); no answer within {timeout} rolls back",
    "switch": "patch the live Service's selector {live} → {candidate} (checked by resourceVersion)",
    "post_analysis": "analysis through the live Service; switch back to {live} on failure",
    "gateway": "InferencePools, endpoint pickers and the HTTPRoute for both colors ({live} keeps its weight)",
    "canary": "move the HTTPRoute's weight to {candidate} step by step, each judged on real traffic by PromQL vs "
              "{live}, plus smoke prompts; a failed step puts the weight back on {live} at once",
    "placement": "check {candidate} landed on a better capacity option than {live}; else roll back (retry later)",
    "scale_down": "keep {retire} warm for scale_down_delay, then scale it to 0",
    "record": "append the release to the history on the live Service",
}


def plan_release(observed: Observed, desired: Desired, *, strategy: str = "blue-green", auto_promote: bool = True,
                 promotion_timeout_s: float = 3600.0) -> ReleasePlan:
    """The steps from what the cluster runs to what the spec wants. Pure, total, printed before acting.

    A crash after the switch needs no gate again (traffic already moved with someone's approval); before
    the switch the rerun re-observes, finds the candidate up, previews and analyses it, and gates again.
    """
    if observed.parked:
        # The live Service points at the hold proxy and the GPUs are off: a release now would have no
        # stable color to fall back to, and a deploy would fight wake_model's record.
        return ReleasePlan("parked", f"parked since {observed.parked.get('parked_at', '?')}: wake it first",
                           observed.parked.get("color"), None, revision=desired.revision)
    live = observed.live
    if live is None or not observed.colors[live].exists:
        return ReleasePlan("first_deploy", "no color serves yet: nothing to protect, deploy directly",
                           None, "blue", revision=desired.revision)
    cur = observed.colors[live]
    other = observed.colors[names.other(live)]
    if cur.spec_hash == desired.spec_hash and cur.replicas > 0:
        if other.exists and other.replicas > 0:
            # A crash after the switch (or an abandoned candidate): finish by scaling the other color down.
            why = ("the live color already runs the desired revision; the other color is still up"
                   if other.spec_hash != desired.spec_hash or other.revision != desired.revision
                   else "an earlier run switched but did not scale down")
            # Interrupted between the switch and the record: the post-promotion analysis is still owed.
            interrupted = bool(observed.in_flight) and observed.in_flight.get("revision") == desired.revision
            steps = ("post_analysis", "record", "scale_down") if interrupted else ("scale_down",)
            return ReleasePlan("clean_up", why + (" (resuming after the switch)" if interrupted else ""), live, None,
                               steps, desired.revision, cur.revision, retire=names.other(live))
        return ReleasePlan("noop", f"{live} already runs {desired.revision[:12]} (spec {desired.spec_hash})",
                           live, None, (), desired.revision, cur.revision)
    steps = RECREATE_STEPS if strategy == "recreate" else STEPS
    if not auto_promote:
        steps = with_gate(steps)
    resume = ""
    if other.spec_hash == desired.spec_hash and other.warm:
        resume = " (resuming: the candidate is already up"
        in_flight = observed.in_flight or {}
        gate = in_flight.get("gate") or {}
        if gate.get("flow_run") and in_flight.get("revision") == desired.revision:
            resume += f"; flow run {gate['flow_run'][:8]} left its promotion gate open: it opens again here"
        resume += ")"
    return ReleasePlan("release", f"{live} runs {(cur.revision or '?')[:12]}, spec wants "
                       f"{desired.revision[:12]}{resume}", live, names.other(live), steps,
                       desired.revision, cur.revision, retire=live,
                       promotion_timeout_s=0.0 if auto_promote else promotion_timeout_s)


def check_capacity(spec: DeploymentSpec, *, live_replicas: int, candidate_replicas: int,
                   pool_max_nodes: int | None, pool_nodes: int, quota: QuotaReading | None,
                   strategy: str = "blue-green") -> list[Check]:
    """Both colors at once need GPUs for both; say which knob to turn when they don't fit."""
    if strategy == "recreate":
        return [Check("capacity", True, "recreate: the old color stops first (downtime announced)")]
    need_replicas = live_replicas + candidate_replicas
    checks: list[Check] = []
    per_node = spec.accelerator.count
    fix_recreate = "or set release.strategy: recreate (the model is down while the new one loads)"
    if spec.cluster.mode == "standard" and pool_max_nodes is not None:
        ok = pool_max_nodes >= need_replicas
        checks.append(Check(
            "GPU pool max nodes", ok,
            f"{need_replicas} replicas during the release ({live_replicas} live + {candidate_replicas} candidate), "
            f"pool max {pool_max_nodes}",
            "" if ok else f"raise accelerator.pool.max_nodes to {need_replicas} and rerun provision_cluster, "
                          + fix_recreate))
    if quota is not None:
        extra_nodes = max(0, need_replicas - pool_nodes) if spec.cluster.mode == "standard" else candidate_replicas
        need = extra_nodes * per_node
        ok = quota.free >= need
        checks.append(Check(
            f"quota {quota.metric} ({quota.scope})", ok,
            f"need {need} more GPU(s) for the candidate, free {quota.free:g}",
            "" if ok else f"request more {quota.metric} quota in {quota.scope}, " + fix_recreate))
    return checks


@dataclass(frozen=True)
class AnalysisVerdict:
    ok: bool
    reason: str


def judge(figures: dict[str, Any], *, max_error_rate: float, max_p95_s: float, min_tokens_per_s: float | None,
          baseline: dict[str, Any] | None = None, max_latency_ratio: float | None = None,
          noise_s: float = 0.0) -> AnalysisVerdict:
    """Analysis figures against the release policy (and against the live color, when measured).

    A slowdown counts only above ``noise_s`` seconds as well as above the ratio: a few milliseconds of
    jitter on a fast model is not a slower model.
    """
    if figures["error_rate"] > max_error_rate:
        return AnalysisVerdict(False, f"error rate {figures['error_rate']:.1%} above {max_error_rate:.1%} "
                               f"({figures['errors']} of {figures['requests']} requests failed: "
                               f"{figures.get('first_error') or '?'})")
    if figures["p95_s"] > max_p95_s:
        return AnalysisVerdict(False, f"p95 latency {figures['p95_s']:.2f}s above {max_p95_s:g}s")
    if min_tokens_per_s and figures["tokens_per_s"] < min_tokens_per_s:
        return AnalysisVerdict(False, f"{figures['tokens_per_s']:.1f} tokens/s below {min_tokens_per_s:g}")
    if baseline and max_latency_ratio and baseline.get("p50_s"):
        ratio = figures["p50_s"] / baseline["p50_s"]
        if ratio > max_latency_ratio and figures["p50_s"] - baseline["p50_s"] > noise_s:
            return AnalysisVerdict(False, f"{ratio:.1f}× slower than the live color (p50 {figures['p50_s']:.3f}s "
                                   f"vs {baseline['p50_s']:.3f}s; limit {max_latency_ratio:g}×)")
    return AnalysisVerdict(True, f"{figures['requests']} requests, {figures['errors']} errors, "
                           f"p95 {figures['p95_s']:.3f}s, {figures['tokens_per_s']:.0f} tokens/s")


def baseline_text(baseline: dict[str, Any] | None, *, color: str = "") -> str:
    """The live color's measurement as a summary says it: a baseline whose requests failed is no fast one
    (its p50 is of no answered request), so it says how many failed instead."""
    if not baseline:
        return ""
    who = f"live {color}".rstrip()
    errors, requests = int(baseline.get("errors") or 0), int(baseline.get("requests") or 0)
    if requests and errors >= requests:
        return f"{who} not measured: {errors} of {requests} requests failed ({baseline.get('first_error') or '?'})"
    text = f"{who} p50 {baseline.get('p50_s', 0):.3f}s"
    return text + (f" ({errors} of {requests} failed)" if errors else "")


@dataclass
class ReleaseRecord:
    revision: str
    spec_hash: str
    color: Color
    previous_revision: str | None
    previous_color: Color | None
    started: str
    result: str  # promoted | rolled_back | failed
    cause: str = ""
    figures: dict[str, Any] = field(default_factory=dict)


def with_record(history: list[dict[str, Any]], record: ReleaseRecord) -> str:
    """The history annotation value with ``record`` appended (the newest HISTORY_KEEP kept)."""
    return json.dumps((history + [asdict(record)])[-HISTORY_KEEP:], separators=(",", ":"), sort_keys=True)


def _started(entry: dict[str, Any] | None) -> datetime | None:
    try:
        return datetime.fromisoformat(str((entry or {}).get("started")))
    except ValueError:
        return None


def serving_problems(observed: Observed, *, now: datetime, settle: timedelta) -> list[str]:
    """What check_fleet reports about the colors, read from the cluster: a live color at 0 replicas is not
    "parked" unless park_model's record says so; a second color with replicas and no release within
    ``settle`` (a release's load, analyses and scale-down delay) is a stray that costs GPUs."""
    if observed.parked is not None or observed.live is None:
        return []
    out: list[str] = []
    live = observed.colors[observed.live]
    if live.replicas == 0:
        out.append(f"the live Service selects {observed.live}, which has 0 replicas, and no park record says the "
                   "model is parked: nothing serves it — run wake_model (or rollback_model if the other color "
                   "is warm)")
    other = observed.colors[names.other(observed.live)]
    last = [t for t in (_started(observed.in_flight), *(_started(h) for h in observed.history[-1:])) if t]
    recent = any(now - (t if t.tzinfo else t.replace(tzinfo=now.tzinfo)) < settle for t in last)
    if other.replicas > 0 and not recent:
        out.append(f"stray color {other.color}: {other.replicas} replica(s) beside the live {observed.live} "
                   "(an interrupted release?) hold GPUs — rollback_model retires it")
    return out


def switch_back_target(observed: Observed) -> Color | None:
    """The other color when rollback_model may switch traffic to it: warm, and what it runs served before
    — the live color before a later release, or promoted on it. A candidate a release rolled back (and
    ``keep_for_debug`` left running) is warm too, but it was rejected: never a target."""
    if observed.live is None:
        return None
    other = names.other(observed.live)
    state = observed.colors[other]
    if not (state.warm and state.revision):
        return None
    for h in reversed(observed.history):
        if h.get("color") == other and h.get("revision") == state.revision:
            return other if h.get("result") == "promoted" else None
        if h.get("previous_color") == other and h.get("previous_revision") == state.revision:
            return other
    return None


def unpromoted_candidate(observed: Observed) -> Color | None:
    """The other color when it is an interrupted release's candidate — brought up, never promoted (killed at
    the promotion gate, say). It is not what rollback_model may switch "back" to: the live color is."""
    if observed.live is None:
        return None
    other = names.other(observed.live)
    state = observed.colors[other]
    if (observed.in_flight or {}).get("candidate") == other and state.exists and state.replicas > 0:
        return other
    return None


def previous_promoted(history: list[dict[str, Any]], current_revision: str | None) -> dict[str, Any] | None:
    """The newest promoted release whose revision differs from what serves now (what rollback goes back to)."""
    for rec in reversed(history):
        if rec.get("result") == "promoted" and rec.get("revision") != current_revision:
            return rec
    for rec in reversed(history):  # the first deploy's revision is the previous release's previous_revision
        if rec.get("result") == "promoted" and rec.get("previous_revision") not in (None, current_revision):
            return {"revision": rec["previous_revision"], "color": rec.get("previous_color")}
    return None


PROBE = {"vllm": "/v1/models", "sglang": "/v1/models", "tgi": "/info"}


def promotion_notice(spec: DeploymentSpec, *, live: Color, candidate: Color, revision: str,
                     figures: dict[str, Any], flow_run_id: str, ui_url: str | None, timeout_s: float) -> str:
    """What the promotion gate posts: where the preview is, how it measured, how to promote or abort."""
    preview = names.preview_service(spec)
    pre, base = figures.get("pre") or {}, figures.get("baseline")
    measured = (f"{pre.get('requests')} requests, {pre.get('errors')} errors, p50 {pre.get('p50_s', 0):.3f}s, "
                f"p95 {pre.get('p95_s', 0):.3f}s, {pre.get('tokens_per_s', 0):.0f} tokens/s" if pre else "-")
    if base:
        measured += "; " + baseline_text(base, color=live)
    smoke = figures.get("smoke") or []
    if smoke:
        measured += f"; {len(smoke)} smoke prompt(s) answered"

    def body(promote: bool) -> str:
        return json.dumps({"run_input": {"promote": promote, "reason": "...", "by": "..."}})

    where = f"Prefect UI: {ui_url} → Resume" if ui_url else f"Prefect UI: flow run {flow_run_id} → Resume"
    return "\n".join([
        f"⏸️ Preview ready, waiting for promotion: {spec.name} {revision[:12]} on {candidate} "
        f"(traffic stays on {live} until promoted).",
        f"• Reach it: `kubectl port-forward -n {spec.namespace} service/{preview} 8080:{spec.expose.port}` "
        f"then `curl localhost:8080{PROBE.get(spec.engine.kind, '/health')}`",
        f"• Pre-promotion analysis: {measured}",
        f"• Promote: {where} with promote ✓ — or "
        f"`prefect api POST /flow_runs/{flow_run_id}/resume --data '{body(True)}'` — or "
        f"`curl -X POST \"$PREFECT_API_URL/flow_runs/{flow_run_id}/resume\" -H 'Content-Type: application/json' "
        f"-d '{body(True)}'`",
        f"• Abort: the same with \"promote\": false ({candidate} goes to 0, {live} keeps serving). "
        f"No answer within {human_duration(timeout_s)}: rolled back the same way.",
    ])


def _json(raw: str | None, default: Any) -> Any:
    if not raw:
        return default
    try:
        return json.loads(raw)
    except ValueError:
        return default
