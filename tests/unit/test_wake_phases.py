"""A wake split into phases from the kubelet's and the engine's own words (manifests/wake.py, pure)."""

from __future__ import annotations

import pytest

from manifests import wake as W


def test_pulled_seconds_reads_the_kubelet_event():
    assert W.pulled_seconds([{"reason": "Scheduled"}, {"reason": "Pulled", "message":
                             'Successfully pulled image "vllm/vllm-openai:v0.10.2" in 45s (45s including waiting). '
                             "Image size: 9000000000 bytes."}]) == 45.0
    assert W.pulled_seconds([{"reason": "Pulled", "message": 'Successfully pulled image "x" in 812ms (812ms '
                              "including waiting)"}]) == pytest.approx(0.812)
    assert W.pulled_seconds([{"reason": "Pulled", "message": 'Container image "x" already present on machine'}]) == 0
    assert W.pulled_seconds([{"reason": "Started"}]) is None


def test_weight_seconds_reads_the_engine_log():
    lines = ["INFO 12-06 02:00:00 [weight_utils.py:296] Time spent downloading weights for google/gemma-2-2b-it: "
             "52.283419 seconds", "INFO 12-06 02:00:17 [default_loader.py:267] Loading weights took 16.74 seconds",
             "INFO 12-06 02:00:32 [gpu_model_runner.py:2708] Graph capturing finished in 15 secs, took 0.45 GiB"]
    assert W.weight_seconds(lines) == pytest.approx(52.283419 + 16.74)
    assert W.weight_seconds(["INFO:     Application startup complete."]) == 0


def test_phases_split_the_time_to_ready():
    p = W.phases(node_s=62.0, ready_s=40.0, smoke_s=4.0, pulled_s=1.5, weights_s=5.2)
    assert (p.node, p.image, p.weights, p.engine, p.smoke) == pytest.approx((62.0, 1.5, 5.2, 33.3, 4.0))
    assert p.total == pytest.approx(106.0)
    assert p.line() == "node 62 s · image 2 s · weights 5 s · engine 33 s · smoke 4 s"
    # nothing said by the kubelet or engine: the time to Ready is the engine's
    q = W.phases(node_s=0.0, ready_s=10.0, smoke_s=1.0, pulled_s=None, weights_s=0.0)
    assert (q.image, q.weights, q.engine) == (0.0, 0.0, 10.0)
    # words larger than the time measured (clock skew) never make a phase negative
    r = W.phases(node_s=1.0, ready_s=3.0, smoke_s=1.0, pulled_s=2.0, weights_s=5.0)
    assert r.weights == 1.0 and r.engine == 0.0


def test_percentile():
    assert W.percentile([], 0.5) == 0.0
    values = [float(v) for v in range(1, 101)]
    assert W.percentile(values, 0.5) == 50.0 and W.percentile(values, 0.95) == 95.0


def test_a_wake_asked_for_by_a_held_request_counts_from_its_event():
    """The issue's case: the held client waited 14 s, the wake's own steps 5.4 s. The figure is the client's,
    the event -> trigger -> worker part is named beside it (fails before: only the 5.4 s was reported)."""
    from datetime import UTC, datetime, timedelta

    now = datetime(2026, 12, 6, 6, 30, tzinfo=UTC)
    waited = W.held_wait_s(now - timedelta(seconds=14), now=now)
    assert waited == pytest.approx(14.0)
    assert W.held_wait_s(datetime(2026, 12, 6, 6, 29, 46), now=now) == pytest.approx(14.0)  # no offset: UTC
    assert W.held_wait_s(None, now=now) is None
    line = W.outcome("gemma", took_s=6.0, cloud_s=None, phases="node 0 s", waited_s=waited, answering_s=5.4)
    assert line == ("gemma serving again after 14.0 s from the first held request (8.6 s event → trigger → "
                    "worker start, 5.4 s until the model answered); wake 6.0 s: node 0 s")
    assert W.outcome("gemma", took_s=5.4, cloud_s=2700.0, phases="node 62 s", waited_s=None) == \
        "gemma serving again after 5.4 s (2700 s on the cloud clock): node 62 s"
