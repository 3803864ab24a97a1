"""The manual promotion gate (release.auto_promote: false) as pure values: spec checks, plan, Slack notice."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from manifests.names import preview_service
from manifests.release import (
    GATE,
    ColorState,
    Desired,
    Observed,
    plan_release,
    promotion_notice,
    unpromoted_candidate,
)
from manifests.spec import SpecError, human_duration, parse_spec

SPEC = {"name": "m", "model": "Qwen/Qwen2.5-7B-Instruct", "engine": "sglang",
        "cluster": {"project": "proj-one", "location": "us-central1", "zones": ["us-central1-a"]},
        "accelerator": {"type": "nvidia-l4", "pool": {"max_nodes": 2}}}
NEW = Desired("r2", "h2", 1)


def state(color, *, hash_="h1", rev="r1", replicas=1):
    return ColorState(color, True, replicas, replicas, replicas, 2, 2, rev, hash_)


def observed(blue=None, green=None, in_flight=None, live="blue"):
    return Observed(live, "7", {"blue": blue or ColorState("blue"), "green": green or ColorState("green")},
                    [], in_flight)


def spec(**release):
    return parse_spec(dict(SPEC, release=release))


# ---- spec ----------------------------------------------------------------------------------------

def test_defaults_keep_automatic_promotion_with_a_one_hour_gate_timeout():
    s = parse_spec(SPEC)
    assert s.release.auto_promote is True and s.release.promotion_timeout.total_seconds() == 3600


def test_promotion_timeout_takes_spec_durations():
    assert spec(auto_promote=False, promotion_timeout="30m").release.promotion_timeout.total_seconds() == 1800


@pytest.mark.parametrize(("value", "why"), [("5s", "a person needs time"), ("2d", "holds its GPUs")])
def test_promotion_timeout_out_of_range_names_the_field(value, why):
    with pytest.raises(SpecError) as err:
        spec(auto_promote=False, promotion_timeout=value)
    assert err.value.field == "release.promotion_timeout"
    assert why in str(err.value) and "30m" in err.value.fix


def test_not_a_duration_names_the_field():
    with pytest.raises(SpecError) as err:
        spec(promotion_timeout="soon")
    assert err.value.field == "release.promotion_timeout"


def test_validate_warns_about_the_gate_and_about_a_timeout_without_one():
    assert any("waits at its promotion gate" in w for w in spec(auto_promote=False).warnings)
    assert any("has no effect" in w for w in spec(promotion_timeout="2h").warnings)
    assert parse_spec(SPEC).warnings == []


def test_gate_with_recreate_is_refused():
    with pytest.raises(SpecError) as err:
        spec(auto_promote=False, strategy="recreate")
    assert err.value.field == "release.auto_promote" and "down" in str(err.value)


def test_gate_on_vertex_is_refused():
    data = dict(SPEC, target="vertex", vertex={"endpoint_display_name": "e"}, release={"auto_promote": False})
    with pytest.raises(SpecError) as err:
        parse_spec(data)
    assert err.value.field == "release.auto_promote" and "preview" in str(err.value)


# ---- plan ----------------------------------------------------------------------------------------

def test_gate_sits_between_the_analysis_and_the_switch():
    plan = plan_release(observed(blue=state("blue")), NEW, auto_promote=False, promotion_timeout_s=5400)
    assert plan.steps == ("capacity", "bring_up", "preview", "pre_analysis", GATE, "switch", "post_analysis",
                          "record", "scale_down")
    row = next(r for r in plan.table() if r["step"] == GATE)
    assert row["detail"].startswith("wait for promotion") and "green" in row["detail"] and "1h30m" in row["detail"]


def test_no_gate_by_default():
    assert GATE not in plan_release(observed(blue=state("blue")), NEW).steps


def test_rerun_after_a_dead_paused_run_gates_again():
    """Killed while paused: the candidate is up, the gate is recorded; the rerun previews and gates again."""
    obs = observed(blue=state("blue"), green=state("green", hash_="h2", rev="r2"),
                   in_flight={"candidate": "green", "revision": "r2", "gate": {"flow_run": "0123456789abcdef"}})
    plan = plan_release(obs, NEW, auto_promote=False)
    assert plan.action == "release" and plan.candidate == "green"
    assert plan.steps.index("preview") < plan.steps.index(GATE) < plan.steps.index("switch")
    assert "already up" in plan.reason and "01234567" in plan.reason and "opens again" in plan.reason


def test_crash_after_an_approved_switch_is_not_gated_again():
    obs = observed(live="green", blue=state("blue"), green=state("green", hash_="h2", rev="r2"),
                   in_flight={"candidate": "green", "revision": "r2", "gate": {"flow_run": "x"}})
    plan = plan_release(obs, NEW, auto_promote=False)
    assert plan.action == "clean_up" and GATE not in plan.steps


def test_an_interrupted_candidate_is_no_rollback_target():
    """Killed at the gate: green is warm but was never promoted; rollback_model must not switch to it."""
    stray = observed(blue=state("blue"), green=state("green", hash_="h2", rev="r2"),
                     in_flight={"candidate": "green", "revision": "r2", "gate": {"flow_run": "x"}})
    assert unpromoted_candidate(stray) == "green"
    # After a promoted release the old color is warm for scale_down_delay with no release in flight.
    assert unpromoted_candidate(observed(live="green", blue=state("blue"), green=state("green"))) is None
    # Interrupted after the switch: the candidate is the live color, not the other one.
    after = observed(live="green", blue=state("blue"), green=state("green", hash_="h2", rev="r2"),
                     in_flight={"candidate": "green", "revision": "r2"})
    assert unpromoted_candidate(after) is None
    # Already scaled to 0: nothing to retire.
    cold = observed(blue=state("blue"), green=state("green", replicas=0), in_flight={"candidate": "green"})
    assert unpromoted_candidate(cold) is None


@pytest.mark.parametrize(("seconds", "text"), [(3600, "1h"), (5400, "1h30m"), (90, "1m30s"), (0, "0s"),
                                               (86400, "24h")])
def test_human_duration(seconds, text):
    assert human_duration(seconds) == text


# ---- the Slack notice ----------------------------------------------------------------------------

def test_notice_says_where_the_preview_is_what_it_measured_and_how_to_decide():
    s = spec(auto_promote=False)
    run = "6f1c1a52-9f0e-4b8e-9d8e-3c1f3b0e9a11"
    figures = {"pre": {"requests": 6, "errors": 0, "p50_s": 0.05, "p95_s": 0.081, "tokens_per_s": 40.0},
               "baseline": {"p50_s": 0.048}, "smoke": [{"prompt": "hi", "answer": "hello"}]}
    text = promotion_notice(s, live="blue", candidate="green", revision="abcdef0123456789", figures=figures,
                            flow_run_id=run, ui_url=f"http://ui/flow-runs/flow-run/{run}", timeout_s=3600)
    assert f"service/{preview_service(s)} 8080:{s.expose.port}" in text and "-n default" in text
    assert "curl localhost:8080/v1/models" in text
    assert "6 requests, 0 errors" in text and "p95 0.081s" in text and "live blue p50 0.048s" in text
    assert f"http://ui/flow-runs/flow-run/{run}" in text and "1h" in text
    cli = re.search(r"`(prefect api POST [^`]+)`", text).group(1)
    argv = shlex.split(cli)
    assert argv[:4] == ["prefect", "api", "POST", f"/flow_runs/{run}/resume"] and argv[4] == "--data"
    assert json.loads(argv[5]) == {"run_input": {"promote": True, "reason": "...", "by": "..."}}
    assert '"promote": false' in text and "green goes to 0" in text
