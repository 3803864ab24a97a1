"""Prometheus text exposition for the engines' ``/metrics``: latency histograms and the sample writer.

:class:`Histogram` and :func:`_prom` write the Prometheus text format 0.0.4 (``# HELP``, ``# TYPE``,
``_bucket`` with ``le`` up to ``+Inf``, ``_sum``, ``_count``); the metric names per engine are in
:meth:`sandbox.engines.podserver.PodServer.metrics_text`. ``VLLM_LATENCY_BUCKETS`` / ``TTFT_BUCKETS`` are
vLLM's e2e-latency and time-to-first-token buckets (``vllm/v1/metrics/loggers.py``), ``SGLANG_BUCKETS``
SGLang's e2e-latency ones (``sglang/srt/metrics/collector.py``); ``TGI_BUCKETS`` is the sandbox's own
choice for ``tgi_request_duration`` (the TGI router computes its own series).
"""

from __future__ import annotations

VLLM_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                        120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TGI_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SGLANG_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 60.0, 80.0, 120.0, 160.0, 200.0, 250.0,
                  300.0, 350.0, 500.0, 1000.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {float(c)}' for b, c in zip(self.buckets, self.counts,
                                                                                   strict=True)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {float(self.count)}')
        out.append(f"{name}_sum{{{labels}}} {self.sum}")
        out.append(f"{name}_count{{{labels}}} {float(self.count)}")
        return out


def _prom(lines: list[str], name: str, kind: str, help_: str, samples: list[tuple[str, float]] | None = None,
          hist: tuple[Histogram, str] | None = None) -> None:
    lines.append(f"# HELP {name} {help_}")
    lines.append(f"# TYPE {name} {kind}")
    if hist is not None:
        lines.extend(hist[0].lines(name, hist[1]))
    for labels, value in samples or []:
        lines.append(f"{name}{{{labels}}} {float(value)}" if labels else f"{name} {float(value)}")
