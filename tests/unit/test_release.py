"""plan_release, check_capacity and judge: the release's decisions as pure values."""

from __future__ import annotations

import json

import pytest

from manifests.provision import QuotaReading
from manifests.release import (
    HISTORY_ANNOTATION,
    RELEASE_ANNOTATION,
    ColorState,
    Desired,
    Observed,
    ReleaseRecord,
    check_capacity,
    judge,
    plan_release,
    previous_promoted,
    with_record,
)
from manifests.spec import parse_spec

SPEC = {"name": "m", "model": "Qwen/Qwen2.5-7B-Instruct", "engine": "sglang",
        "cluster": {"project": "proj-one", "location": "us-central1", "zones": ["us-central1-a"]},
        "accelerator": {"type": "nvidia-l4", "pool": {"max_nodes": 2}}}


def state(color, *, hash_="h1", rev="r1", replicas=1, available=None, gen=2, observed=2):
    return ColorState(color, True, replicas, replicas if available is None else available, replicas, gen, observed,
                      rev, hash_)


def observed(live="blue", blue=None, green=None, in_flight=None):
    return Observed(live, "7", {"blue": blue or ColorState("blue"), "green": green or ColorState("green")},
                    [], in_flight)


NEW = Desired("r2", "h2", 1)


def test_first_deploy_when_nothing_serves():
    plan = plan_release(observed(live=None), NEW)
    assert plan.action == "first_deploy" and plan.candidate == "blue"


def test_noop_when_live_runs_the_desired_spec():
    plan = plan_release(observed(blue=state("blue", hash_="h2", rev="r2")), NEW)
    assert plan.action == "noop" and plan.steps == ()


def test_release_brings_up_the_other_color_and_retires_the_live_one():
    plan = plan_release(observed(blue=state("blue")), NEW)
    assert (plan.action, plan.live, plan.candidate, plan.retire) == ("release", "blue", "green", "blue")
    assert plan.steps.index("pre_analysis") < plan.steps.index("switch") < plan.steps.index("post_analysis")
    assert plan.steps[-1] == "scale_down"
    rows = plan.table()
    assert rows[0]["step"] == "plan" and "blue → green" in " ".join(r["detail"] for r in rows)


def test_release_from_green_goes_to_blue():
    plan = plan_release(observed(live="green", green=state("green")), NEW)
    assert (plan.live, plan.candidate) == ("green", "blue")


def test_recreate_stops_the_live_color_first():
    plan = plan_release(observed(blue=state("blue")), NEW, strategy="recreate")
    assert plan.steps.index("stop_live") < plan.steps.index("bring_up")


def test_a_crash_after_the_switch_resumes_with_post_analysis():
    obs = observed(live="green", blue=state("blue"), green=state("green", hash_="h2", rev="r2"),
                   in_flight={"candidate": "green", "revision": "r2"})
    plan = plan_release(obs, NEW)
    assert plan.action == "clean_up" and plan.steps == ("post_analysis", "record", "scale_down")
    assert (plan.live, plan.retire) == ("green", "blue")


def test_a_crash_during_scale_down_only_scales_down():
    obs = observed(live="green", blue=state("blue"), green=state("green", hash_="h2", rev="r2"))
    assert plan_release(obs, NEW).steps == ("scale_down",)


def test_resuming_when_the_candidate_is_already_up():
    obs = observed(blue=state("blue"), green=state("green", hash_="h2", rev="r2"))
    plan = plan_release(obs, NEW)
    assert plan.action == "release" and "resuming" in plan.reason


def test_warm_needs_a_complete_rollout():
    assert state("blue").warm
    assert not state("blue", available=0).warm
    assert not state("blue", observed=1).warm  # the controller has not seen the newest spec
    assert not state("blue", replicas=0).warm


def test_observed_reads_selector_history_and_in_flight():
    svc = {"metadata": {"resourceVersion": "9", "annotations": {
        HISTORY_ANNOTATION: json.dumps([{"revision": "r1", "result": "promoted"}]),
        RELEASE_ANNOTATION: json.dumps({"revision": "r2"})}},
        "spec": {"selector": {"llm-fleet.dev/color": "green"}}}
    obs = Observed.from_objects(svc, {"blue": None, "green": {"metadata": {"generation": 3, "annotations": {
        "llm-fleet.dev/model-revision": "r1"}}, "spec": {"replicas": 1}, "status": {
        "observedGeneration": 3, "availableReplicas": 1, "updatedReplicas": 1}}})
    assert obs.live == "green" and obs.service_version == "9" and obs.colors["green"].warm
    assert obs.history[0]["revision"] == "r1" and obs.in_flight == {"revision": "r2"}
    assert not obs.colors["blue"].exists


def test_capacity_names_max_nodes_and_recreate():
    spec = parse_spec({**SPEC, "accelerator": {"type": "nvidia-l4", "pool": {"max_nodes": 1}}})
    checks = check_capacity(spec, live_replicas=1, candidate_replicas=1, pool_max_nodes=1, pool_nodes=1,
                            quota=QuotaReading("NVIDIA_L4_GPUS", "us-central1", 8, 1))
    bad = [c for c in checks if not c.ok]
    assert len(bad) == 1 and "max_nodes to 2" in bad[0].fix and "recreate" in bad[0].fix


def test_capacity_needs_quota_for_the_extra_node():
    spec = parse_spec(SPEC)
    checks = check_capacity(spec, live_replicas=1, candidate_replicas=1, pool_max_nodes=2, pool_nodes=1,
                            quota=QuotaReading("NVIDIA_L4_GPUS", "us-central1", 1, 1))
    assert [c.ok for c in checks] == [True, False]
    assert check_capacity(spec, live_replicas=1, candidate_replicas=1, pool_max_nodes=1, pool_nodes=1, quota=None,
                          strategy="recreate")[0].ok


FIG = {"requests": 20, "errors": 0, "error_rate": 0.0, "p50_s": 0.2, "p95_s": 0.3, "tokens_per_s": 50.0,
       "first_error": None}


@pytest.mark.parametrize(("change", "reason"), [
    ({"errors": 2, "error_rate": 0.1, "first_error": "HTTP 500"}, "HTTP 500"),
    ({"p95_s": 11.0}, "p95 latency"),
    ({"tokens_per_s": 1.0}, "tokens/s"),
    ({"p50_s": 0.5}, "slower than the live color"),
])
def test_judge_fails_with_the_reason(change, reason):
    v = judge({**FIG, **change}, max_error_rate=0.0, max_p95_s=10, min_tokens_per_s=5,
              baseline={"p50_s": 0.2}, max_latency_ratio=1.5)
    assert not v.ok and reason in v.reason


def test_judge_ignores_jitter_below_the_noise_floor():
    v = judge({**FIG, "p50_s": 0.04}, max_error_rate=0, max_p95_s=10, min_tokens_per_s=None,
              baseline={"p50_s": 0.02}, max_latency_ratio=1.5, noise_s=0.1)
    assert v.ok


def test_history_keeps_the_newest_and_finds_the_previous_promoted():
    hist: list[dict] = []
    for i in range(12):
        rec = ReleaseRecord(f"r{i}", "h", "blue", f"r{i - 1}" if i else None, None, "t", "promoted")
        hist = json.loads(with_record(hist, rec))
    assert len(hist) == 10 and hist[-1]["revision"] == "r11"
    assert previous_promoted(hist, "r11")["revision"] == "r10"
    only = [{"revision": "r2", "result": "promoted", "previous_revision": "r1", "previous_color": "blue"}]
    assert previous_promoted(only, "r2") == {"revision": "r1", "color": "blue"}


def test_a_parked_model_is_not_released():
    obs = Observed(None, "3", {"blue": state("blue"), "green": ColorState("green")}, [], None,
                   {"color": "blue", "parked_at": "2026-12-01T20:00:00Z"})
    plan = plan_release(obs, NEW)
    assert plan.action == "parked" and "wake" in plan.reason and plan.steps == ()


def _observed(*, live_replicas: int, other_replicas: int, parked: bool = False, started: str | None = None):
    from manifests.release import HISTORY_ANNOTATION, PARK_ANNOTATION, Observed

    ann = {HISTORY_ANNOTATION: json.dumps([{"started": started, "result": "promoted"}])} if started else {}
    if parked:
        ann[PARK_ANNOTATION] = json.dumps({"parked_at": "2026-01-01T00:00:00+00:00"})
    svc = {"metadata": {"annotations": ann, "resourceVersion": "1"},
           "spec": {"selector": {"app.kubernetes.io/instance": "m", "llm-fleet.dev/color": "blue"}}}
    dep = lambda n: {"metadata": {"annotations": {}}, "spec": {"replicas": n}, "status": {}}  # noqa: E731
    return Observed.from_objects(svc, {"blue": dep(live_replicas), "green": dep(other_replicas)})


def test_serving_problems_live_color_at_zero_is_not_parked_without_a_record():
    """check_fleet read a live color at 0 replicas as "parked" (the release bug that scaled the live color
    down then raised no incident). Only park_model's record makes 0 replicas "parked"."""
    from datetime import UTC, datetime, timedelta

    from manifests.release import serving_problems

    now, settle = datetime(2026, 6, 1, tzinfo=UTC), timedelta(minutes=30)
    (problem,) = serving_problems(_observed(live_replicas=0, other_replicas=0), now=now, settle=settle)
    assert "0 replicas" in problem and "no park record" in problem
    assert serving_problems(_observed(live_replicas=0, other_replicas=0, parked=True), now=now, settle=settle) == []
    assert serving_problems(_observed(live_replicas=1, other_replicas=0), now=now, settle=settle) == []


def test_serving_problems_reports_a_stray_second_color_once_no_release_explains_it():
    from datetime import UTC, datetime, timedelta

    from manifests.release import serving_problems

    now, settle = datetime(2026, 6, 1, 12, tzinfo=UTC), timedelta(minutes=30)
    recent, old = (now - timedelta(minutes=5)).isoformat(), (now - timedelta(hours=3)).isoformat()
    assert serving_problems(_observed(live_replicas=1, other_replicas=1, started=recent), now=now, settle=settle) == []
    (problem,) = serving_problems(_observed(live_replicas=1, other_replicas=2, started=old), now=now, settle=settle)
    assert problem.startswith("stray color green: 2 replica(s)")


def test_rollback_never_switches_to_a_candidate_the_release_rejected():
    """keep_for_debug leaves a rolled-back candidate warm; rollback_model switched traffic to it (failed
    before: any warm other color was a target). The old live color after a release is one."""
    from manifests.release import HISTORY_ANNOTATION, Observed, switch_back_target

    def observed(history):
        svc = {"metadata": {"annotations": {HISTORY_ANNOTATION: json.dumps(history)}, "resourceVersion": "1"},
               "spec": {"selector": {"llm-fleet.dev/color": "blue"}}}
        warm = {"metadata": {"annotations": {"llm-fleet.dev/model-revision": "bad"}, "generation": 1},
                "spec": {"replicas": 1}, "status": {"availableReplicas": 1, "updatedReplicas": 1,
                                                    "observedGeneration": 1}}
        return Observed.from_objects(svc, {"blue": dict(warm), "green": warm})

    rejected = {"color": "green", "revision": "bad", "previous_color": "blue", "previous_revision": "good",
                "result": "rolled_back"}
    assert switch_back_target(observed([rejected])) is None
    # green served "bad" before blue took over: a real previous version
    earlier = {"color": "blue", "revision": "new", "previous_color": "green", "previous_revision": "bad",
               "result": "promoted"}
    assert switch_back_target(observed([earlier])) == "green"
    assert switch_back_target(observed([])) is None


def test_a_failing_live_baseline_does_not_read_as_a_fast_one():
    from manifests.release import baseline_text

    failed = {"requests": 20, "errors": 20, "error_rate": 1.0, "p50_s": 0.0, "first_error": "HTTP 503"}
    assert baseline_text(failed) == "live not measured: 20 of 20 requests failed (HTTP 503)"
    assert "0.000" not in baseline_text(failed, color="blue")
    assert baseline_text({"requests": 20, "errors": 2, "p50_s": 0.25}, color="blue") == \
        "live blue p50 0.250s (2 of 20 failed)"
    assert baseline_text({"requests": 20, "errors": 0, "p50_s": 0.25}) == "live p50 0.250s"


def test_prefects_traceback_of_a_rolled_back_run_is_kept_at_debug():
    """After an automatic rollback the run's ERROR line names the cause; the engine's own ERROR traceback of
    the failed run ("Engine execution exited with unexpected exception") is demoted to DEBUG."""
    import logging

    from targets.gke.strategy import ROLLED_BACK_TO

    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    log = logging.getLogger("prefect.flow_runs")
    handler = Keep(level=logging.INFO)
    log.addHandler(handler)
    try:
        for rolled_back in (True, False):
            exc = RuntimeError("smoke prompt got a bad answer")
            if rolled_back:
                setattr(exc, ROLLED_BACK_TO, "green")
            try:
                raise exc
            except RuntimeError:
                log.error("Engine execution exited with unexpected exception", exc_info=True)
    finally:
        log.removeHandler(handler)
    assert len(seen) == 1 and not getattr(seen[0].exc_info[1], ROLLED_BACK_TO, None)  # only the plain failure


def test_a_failing_tasks_traceback_inside_a_release_s_steps_is_kept_at_debug():
    """Prefect's task engine logs a failed task ("Task run failed with exception: …") at ERROR with its
    traceback; inside a release's steps the failure is rolled back (one ERROR line names it) or the rollback
    fails (RollbackFailed, ERROR): the task's traceback goes to DEBUG, its "Finished in state Failed" line to
    INFO. Outside the steps both stay ERROR."""
    import contextlib
    import logging

    from targets.gke.strategy import _release_steps

    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    log = logging.getLogger("prefect.task_runs")
    handler = Keep(level=logging.INFO)
    log.addHandler(handler)
    try:
        for inside in (True, False):
            try:
                raise RuntimeError(f"candidate crashed ({inside})")
            except RuntimeError as exc:
                with _release_steps() if inside else contextlib.nullcontext():
                    log.error("Task run failed with exception: %r - Retries are exhausted", exc, exc_info=True)
                    log.error("Finished in state Failed('Task run encountered an exception %r')", exc)
    finally:
        log.removeHandler(handler)
    assert [(r.levelname, r.getMessage()) for r in seen] == [
        ("INFO", "Finished in state Failed('Task run encountered an exception RuntimeError('candidate crashed "
                 "(True)')')"),
        ("ERROR", "Task run failed with exception: RuntimeError('candidate crashed (False)') - Retries are "
                  "exhausted"),
        ("ERROR", "Finished in state Failed('Task run encountered an exception RuntimeError('candidate crashed "
                  "(False)')')")]
